//! A thread's own io_uring for file legs.
//!
//! A file leg's own ring thread costs every request a hand-off (a channel and an eventfd) and
//! every pass a wake-up of that thread, per leg: on two vCPUs shared with the guest's client that
//! is most of a mirrored write's cost. A thread that owns a [`Reactor`] (a virtqueue's worker)
//! instead puts the SQEs of whatever it submits to any file leg into the reactor's ring itself,
//! hands both legs' requests to the kernel with one `io_uring_enter` when its pass ends, and
//! reaps the completions itself: those the kernel finished at once (the page cache, tmpfs) in
//! the same pass, the others when the ring's eventfd, which the thread waits on with its other
//! events, fires. io_uring runs a request's completion work in the task that submitted it, so
//! submitting and reaping belong on the same thread; this is the shape of Firecracker's and
//! cloud-hypervisor's block devices.
//!
//! A leg finds the reactor through a thread-local set by [`Reactor::enter`]. Requests submitted
//! anywhere else (other threads, such as the resync's) and those that find the reactor's slots
//! all taken still go through the leg's own thread. An abort of a leg wakes every reactor that
//! holds its requests, which cancels them in the kernel as the leg's own thread does.

use std::cell::Cell;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use io_uring::IoUring;
use vmm_sys_util::eventfd::EventFd;

use super::engine::{Done, Engine};
use super::{Shared, CQ_ENTRIES, SQ_ENTRIES};
use crate::block::LegRequest;

thread_local! {
    /// The reactor of the `enter` this thread is inside, if any.
    static CURRENT: Cell<*const Reactor> = const { Cell::new(ptr::null()) };
}

/// One thread's io_uring for its file-leg requests. See the module documentation.
pub struct Reactor {
    /// Dropped only once nothing is in the kernel (see `Drop`).
    state: ManuallyDrop<Mutex<State>>,
    kick: Arc<Kick>,
}

/// How a leg tells the reactors holding its requests that it died.
pub(super) struct Kick {
    /// Registered with the ring, so it also counts completions; the owner's epoll waits on it.
    eventfd: EventFd,
    /// Bumped by every death of a leg this reactor has served.
    deaths: AtomicU64,
}

impl Kick {
    /// A leg this reactor served has died: its requests here must be cancelled.
    pub(super) fn fire(&self) {
        self.deaths.fetch_add(1, Ordering::Release);
        write_eventfd(&self.eventfd);
    }
}

struct State {
    engine: Engine,
    /// Legs this reactor has registered its kick with, so it registers once per leg. Weak
    /// references keep the addresses unique without keeping the legs.
    watched: Vec<Weak<Shared>>,
    /// `Kick::deaths` when this reactor last cancelled the requests of dead legs.
    deaths_seen: u64,
    /// An empty list kept for the next delivery, so a pass allocates nothing.
    spare: Vec<Done>,
}

impl Reactor {
    /// A reactor with its own ring and eventfd.
    pub fn new() -> io::Result<Reactor> {
        let ring: IoUring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)?;
        let eventfd = EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Reactor {
            state: ManuallyDrop::new(Mutex::new(State {
                engine: Engine::for_reactor(ring),
                watched: Vec::new(),
                deaths_seen: 0,
                spare: Vec::new(),
            })),
            kick: Arc::new(Kick {
                eventfd,
                deaths: AtomicU64::new(0),
            }),
        })
    }

    /// The descriptor to wait on: readable when a request has completed (or a leg died) and
    /// [`Reactor::poll`] has work.
    pub fn fd(&self) -> RawFd {
        self.kick.eventfd.as_raw_fd()
    }

    /// Runs `f` with this reactor taking the file-leg requests this thread submits, then hands
    /// them to the kernel and completes whatever is already done. The thread that enters a
    /// reactor must keep calling [`Reactor::poll`] when [`Reactor::fd`] is readable, for as
    /// long as it lives.
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(*const Reactor);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(self)));
        let r = f();
        self.flush();
        r
    }

    /// Completes what has finished (and cancels the requests of legs that died), for when
    /// [`Reactor::fd`] is readable. On the owning thread: what the completions submit in turn
    /// is taken by this reactor too.
    pub fn poll(&self) {
        read_eventfd(&self.kick.eventfd);
        self.enter(|| ());
    }

    /// Whether [`Reactor::poll`] has something to do: a completion is waiting or a leg died.
    /// An uncontended lock and two loads; for a thread that spins looking for work.
    pub fn has_work(&self) -> bool {
        let mut st = self.lock();
        st.engine.cq_ready() || self.kick.deaths.load(Ordering::Acquire) != st.deaths_seen
    }

    /// Drives the reactor from this thread until it holds nothing, or `limit` passes; says
    /// whether it got there. For a thread that takes over from an owner that has exited with
    /// requests still in the ring (or that is about to drop the reactor): it waits on the fd,
    /// submits what completions push and cancels the requests of legs that die. The calling
    /// thread becomes the submitter of whatever it pushes, so it must not exit before this
    /// returns.
    pub fn settle(&self, limit: Duration) -> bool {
        let start = Instant::now();
        loop {
            self.enter(|| ());
            if self.in_flight() == 0 {
                return true;
            }
            let left = limit.saturating_sub(start.elapsed());
            if left.is_zero() {
                return false;
            }
            if self.wait(left.min(Duration::from_millis(100))) {
                read_eventfd(&self.kick.eventfd);
            }
        }
    }

    /// Waits up to `limit` (at least a millisecond) for [`Reactor::fd`] to become readable, as
    /// an owner's event loop would; says whether it did.
    pub fn wait(&self, limit: Duration) -> bool {
        let ms = limit.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        crate::readable(self.fd(), ms)
    }

    /// The ring's descriptor, so tests can break the ring from outside.
    #[cfg(test)]
    pub(super) fn ring_fd(&self) -> RawFd {
        self.lock().engine.ring_fd()
    }

    /// Requests this reactor holds that have not completed.
    pub fn in_flight(&self) -> usize {
        self.lock().engine.outstanding()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Submits what `enter` collected and completes what is done, until nothing is left: a
    /// completion may submit again (the mirror's resend of a failed read), and that may
    /// complete at once.
    fn flush(&self) {
        let mut done: Vec<Done> = Vec::new();
        loop {
            {
                let mut st = self.lock();
                if done.capacity() == 0 {
                    done = std::mem::take(&mut st.spare);
                }
                let deaths = self.kick.deaths.load(Ordering::Acquire);
                if deaths != st.deaths_seen {
                    st.deaths_seen = deaths;
                    st.engine.cancel_dead();
                }
                // What completes while this thread submits and reaps is found here; the
                // eventfd would only wake this thread again to find nothing.
                st.engine.eventfd_notifications(false);
                st.engine.enter(0);
                st.engine.reap();
                st.engine.take_done(&mut done);
                if done.is_empty() {
                    // What the reap pushed (the rest of a short transfer, a retry, a zeroing
                    // fallback) has not reached the kernel yet: nothing would ever wake us.
                    if st.engine.sq_pending() {
                        continue;
                    }
                    st.engine.eventfd_notifications(true);
                    // A completion posted between the reap and the enable signalled nothing:
                    // look once more, after a full barrier against the kernel's post-then-check.
                    fence(Ordering::SeqCst);
                    if !st.engine.cq_ready() {
                        st.spare = done;
                        return;
                    }
                    continue;
                }
            }
            crate::batch::run(|| Engine::deliver(&mut done));
        }
    }

    /// Takes `req` of `leg` if this thread is inside a reactor's `enter` and that reactor has
    /// room; otherwise gives it back.
    pub(super) fn submit_here(leg: &Arc<Shared>, req: LegRequest) -> Option<LegRequest> {
        let current = CURRENT.with(Cell::get);
        if current.is_null() {
            return Some(req);
        }
        // SAFETY: `CURRENT` is set only by `enter`, to the reactor it borrows, and put back
        // before that borrow ends (also on unwind), so the reactor is alive here.
        let reactor = unsafe { &*current };
        reactor.take(leg, req)
    }

    fn take(&self, leg: &Arc<Shared>, req: LegRequest) -> Option<LegRequest> {
        let mut st = self.lock();
        if st.engine.is_lost() || !st.engine.has_free_slot() {
            return Some(req);
        }
        if !st
            .watched
            .iter()
            .any(|w| ptr::eq(w.as_ptr(), Arc::as_ptr(leg)))
        {
            st.watched.retain(|w| w.strong_count() > 0);
            st.watched.push(Arc::downgrade(leg));
            // Registered before the request starts, which checks the leg's death after this:
            // a death either shows there or fires the kick.
            leg.watch(&self.kick);
        }
        st.engine.start(Arc::clone(leg), req);
        None
    }
}

/// How long a dropped reactor waits for the requests it still holds.
const DROP_WAIT: Duration = Duration::from_secs(5);

impl Drop for Reactor {
    fn drop(&mut self) {
        // The kernel may still read or fill the buffers of requests in flight.
        if self.settle(DROP_WAIT) {
            // SAFETY: `state` is dropped only here, once, and `self` is not used after.
            unsafe { ManuallyDrop::drop(&mut self.state) };
            return;
        }
        // A hung device: whoever drops us must not hang with it, and nothing the kernel may
        // still touch (the ring, bounce buffers, the requests' hold on guest memory) may go.
        log::error!(
            "a queue's io_uring still holds {} requests after {DROP_WAIT:?}; leaving them to the \
             kernel and leaking the ring",
            self.in_flight()
        );
    }
}

fn write_eventfd(fd: &EventFd) {
    match fd.write(1) {
        // A full counter (EAGAIN) means a wake-up is pending anyway.
        Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
            log::error!("cannot wake a queue's io_uring: {e}")
        }
        _ => {}
    }
}

/// Resets the counter; empty (EAGAIN) is as good.
fn read_eventfd(fd: &EventFd) {
    let _ = fd.read();
}
