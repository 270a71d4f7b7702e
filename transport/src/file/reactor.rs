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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::Duration;

use io_uring::IoUring;

use super::engine::{Done, Engine};
use super::{Shared, CQ_ENTRIES, SQ_ENTRIES};
use crate::block::LegRequest;

thread_local! {
    /// The reactor of the `enter` this thread is inside, if any.
    static CURRENT: Cell<*const Reactor> = const { Cell::new(ptr::null()) };
}

/// One thread's io_uring for its file-leg requests. See the module documentation.
pub struct Reactor {
    state: Mutex<State>,
    kick: Arc<Kick>,
}

/// How a leg tells the reactors holding its requests that it died.
pub(super) struct Kick {
    /// Registered with the ring, so it also counts completions; the owner's epoll waits on it.
    eventfd: OwnedFd,
    /// Bumped by every death of a leg this reactor has served.
    deaths: AtomicU64,
}

impl Kick {
    /// A leg this reactor served has died: its requests here must be cancelled.
    pub(super) fn fire(&self) {
        self.deaths.fetch_add(1, Ordering::AcqRel);
        write_eventfd(self.eventfd.as_raw_fd());
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
        // SAFETY: eventfd has no memory arguments; the result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a freshly created descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Reactor {
            state: Mutex::new(State {
                engine: Engine::for_reactor(ring),
                watched: Vec::new(),
                deaths_seen: 0,
                spare: Vec::new(),
            }),
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
        read_eventfd(self.kick.eventfd.as_raw_fd());
        self.enter(|| ());
    }

    /// Whether [`Reactor::poll`] has something to do: a completion is waiting or a leg died.
    /// Cheap; for a thread that spins looking for work.
    pub fn has_work(&self) -> bool {
        let mut st = self.lock();
        st.engine.cq_ready() || self.kick.deaths.load(Ordering::Acquire) != st.deaths_seen
    }

    /// Completes what the kernel has finished, submitting nothing. For any thread, such as one
    /// that drains the requests of an owner that has exited (a task's requests all finish
    /// before it is gone).
    pub fn reap(&self) {
        let mut done = {
            let mut st = self.lock();
            st.engine.reap();
            let mut done = std::mem::take(&mut st.spare);
            st.engine.take_done(&mut done);
            done
        };
        if !done.is_empty() {
            crate::batch::run(|| Engine::deliver(&mut done));
        }
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
                    st.engine.eventfd_notifications(true);
                    // A completion posted between the reap and the enable signalled nothing:
                    // look once more (the enable is a locked instruction, a full barrier).
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

impl Drop for Reactor {
    fn drop(&mut self) {
        // The kernel may still read or fill the buffers of requests in flight: wait for them.
        let mut nap = Duration::from_millis(1);
        loop {
            self.flush();
            let mut st = self.lock();
            if st.engine.outstanding() == 0 {
                return;
            }
            if st.engine.is_lost() {
                // No more io_uring_enter: the kernel still posts completions, which show up
                // in the CQ.
                drop(st);
                thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(50));
                continue;
            }
            st.engine.enter(1);
        }
    }
}

fn write_eventfd(fd: RawFd) {
    let one: u64 = 1;
    loop {
        // SAFETY: writes 8 bytes from a live local to an eventfd we own.
        let r = unsafe { libc::write(fd, ptr::addr_of!(one).cast(), std::mem::size_of::<u64>()) };
        if r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // EAGAIN means the counter is already set, which is all a wake-up needs.
            return;
        }
    }
}

fn read_eventfd(fd: RawFd) {
    let mut buf: u64 = 0;
    loop {
        // SAFETY: reads 8 bytes into a live local from a non-blocking eventfd we own.
        let r = unsafe {
            libc::read(
                fd,
                ptr::addr_of_mut!(buf).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}
