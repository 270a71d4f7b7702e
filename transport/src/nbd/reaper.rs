//! A thread's own reading of its NBD legs' replies.
//!
//! Each NBD leg has a reader thread that sleeps in `poll` on the socket. A virtqueue's worker
//! sends a pass's commands itself (inline, see the module above), so with the reader thread a
//! mirrored request costs a wake-up of two more threads, one per leg, each a trip through the
//! hypervisor on a virtual machine's vCPUs, and the worker another one when the answer comes.
//! A worker that owns a [`Reaper`] reads the replies itself instead, as qemu-storage-daemon's
//! single I/O thread does: the first time it submits to a leg inside [`Reaper::enter`], the
//! reaper adopts the leg, the socket joins the reaper's epoll (whose descriptor the worker
//! waits on with its other events), and the leg's reader thread goes to sleep. Replies that
//! came in during a pass are read at its end, the others when [`Reaper::fd`] is readable.
//!
//! Only one reaper reads a leg; the legs of a multi-queue device are adopted by the first
//! worker that submits to them, and that worker completes the other queues' requests too, as
//! the reader thread would. Reading never waits for the socket (a read payload that arrives in
//! pieces is received piece by piece, see `PartialRead`), so a slow leg does not hold up the
//! worker's queue.
//!
//! The reader thread takes the connection back for good when the leg dies (an abort, or the
//! reaper found the connection over): failing the outstanding requests and lingering on the
//! old connection may wait, so they stay on that thread. [`Reaper::close`] (and dropping the
//! reaper) gives every leg back, for a worker about to exit.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use vmm_sys_util::eventfd::EventFd;

use super::{nonblocking_eventfd, pump, wake_up, End, Shared};
use crate::block::LegError;

thread_local! {
    /// The reaper of the `enter` this thread is inside, if any.
    static CURRENT: Cell<*const Reaper> = const { Cell::new(ptr::null()) };
}

/// The epoll token of the reaper's own eventfd.
const KICK: u64 = u64::MAX;
/// Events taken per `epoll_wait`; more stay ready for the next one.
const EVENTS: usize = 8;
/// Bursts of replies (up to 64 each) one readiness of a socket takes before the worker goes
/// back to its queue.
const BURSTS_PER_READ: u32 = 4;

/// One thread's reading of the NBD legs it submits to. See the module documentation.
pub struct Reaper {
    core: Arc<Core>,
}

/// The part of a reaper its legs know of (weakly), to leave it when they die.
pub(super) struct Core {
    epoll: OwnedFd,
    /// In the epoll: fired when a leg was given back, so the owner forgets it.
    kick: EventFd,
    legs: Mutex<Legs>,
    /// `legs.adopted.len()`, readable without the lock.
    count: AtomicUsize,
}

struct Legs {
    adopted: Vec<Arc<Shared>>,
    /// Adopts nothing any more (see [`Reaper::close`]).
    closed: bool,
}

impl Reaper {
    /// A reaper with its own epoll; it adopts legs once its thread submits inside
    /// [`Reaper::enter`].
    pub fn new() -> io::Result<Reaper> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked below.
        let efd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a freshly created descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(efd) };
        let kick = nonblocking_eventfd()?;
        epoll_ctl(&epoll, libc::EPOLL_CTL_ADD, kick.as_raw_fd(), KICK)?;
        Ok(Reaper {
            core: Arc::new(Core {
                epoll,
                kick,
                legs: Mutex::new(Legs {
                    adopted: Vec::new(),
                    closed: false,
                }),
                count: AtomicUsize::new(0),
            }),
        })
    }

    /// The descriptor to wait on: readable when an adopted leg's socket is (or a leg left),
    /// and [`Reaper::poll`] has work.
    pub fn fd(&self) -> RawFd {
        self.core.epoll.as_raw_fd()
    }

    /// Runs `f` with this reaper adopting the NBD legs this thread submits to, then reads the
    /// replies that are there already. The thread that enters a reaper must keep calling
    /// [`Reaper::poll`] when [`Reaper::fd`] is readable, until it closes the reaper.
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(*const Reaper);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(self)));
        let r = f();
        if self.adopted() > 0 {
            self.poll();
        }
        r
    }

    /// Reads and completes the replies that have arrived on the adopted legs, and forgets the
    /// legs that were given back.
    pub fn poll(&self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        // SAFETY: `events` is a live array of EVENTS entries for the kernel to fill; a zero
        // timeout does not wait.
        let n = unsafe {
            libc::epoll_wait(
                self.core.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                EVENTS as libc::c_int,
                0,
            )
        };
        for ev in events.iter().take(n.max(0) as usize) {
            let token = ev.u64;
            if token == KICK {
                let _ = self.core.kick.read();
                self.core.prune();
            } else {
                self.core.read(token as RawFd);
            }
        }
    }

    /// How many legs this reaper reads.
    pub fn adopted(&self) -> usize {
        self.core.count.load(Ordering::Acquire)
    }

    /// Gives every leg back to its reader thread and adopts none any more: for a worker about
    /// to stop polling. May be called from any thread.
    pub fn close(&self) {
        let legs = {
            let mut l = self.core.lock();
            l.closed = true;
            std::mem::take(&mut l.adopted)
        };
        self.core.count.store(0, Ordering::Release);
        for sh in legs {
            sh.release_from(&self.core);
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.close();
    }
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, Legs> {
        self.legs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes this reaper the reader of `sh`, unless it is dead, read by another reaper already,
    /// or this one is closed.
    fn adopt(self: &Arc<Self>, sh: &Arc<Shared>) {
        let mut legs = self.lock();
        if legs.closed || legs.adopted.iter().any(|l| Arc::ptr_eq(l, sh)) {
            return;
        }
        {
            let mut st = sh.lock();
            if st.dead.is_some() || st.reaper.is_some() {
                return;
            }
            // Into the epoll before the leg is ours, under its lock: whoever gives it back
            // (under the same lock, e.g. on its death) finds the socket there to remove, and a
            // failed add leaves nothing to undo. Level-triggered: what one poll leaves unread
            // is reported again.
            let fd = sh.fd.as_raw_fd();
            if let Err(e) = epoll_ctl(&self.epoll, libc::EPOLL_CTL_ADD, fd, fd as u64) {
                log::debug!(
                    "NBD leg {}: its replies stay with its reader thread ({e})",
                    sh.uri
                );
                return;
            }
            st.reaper = Some(Arc::downgrade(self));
            sh.adopted.store(true, Ordering::Release);
        }
        legs.adopted.push(Arc::clone(sh));
        self.count.store(legs.adopted.len(), Ordering::Release);
        // The reader thread stops reading (it may be inside a burst; the lock on the reading
        // side keeps the two apart until it is out).
        sh.wake_reader();
    }

    /// Reads what the socket `fd` of an adopted leg has, a few bursts at most (level-triggered
    /// epoll reports the rest, after the worker's queue had its turn). A leg whose connection
    /// is over dies and goes back to its reader thread, which fails what is outstanding.
    fn read(self: &Arc<Self>, fd: RawFd) {
        let Some(sh) = self
            .lock()
            .adopted
            .iter()
            .find(|s| s.fd.as_raw_fd() == fd)
            .cloned()
        else {
            return;
        };
        // A sink that panics must not leave the leg without a reader.
        struct GiveBack<'a>(&'a Shared, &'a Arc<Core>);
        impl Drop for GiveBack<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.release_from(self.1);
                }
            }
        }
        let _give_back = GiveBack(&sh, self);
        // The reader thread has not let go yet (it is finishing a burst, or it took the leg back
        // for good); level-triggered epoll reports the socket again.
        let Some(mut rd) = sh.try_reading() else {
            return;
        };
        if !sh.reaper_is(self) {
            return;
        }
        let mut bursts = 0;
        if let Err((why, end)) = pump(&sh, &mut rd, || {
            bursts += 1;
            bursts < BURSTS_PER_READ
        }) {
            // Dead at once, so that nothing is submitted to it (nor another reaper adopts it)
            // before its reader thread takes over.
            if !matches!(end, End::GaveUp) {
                sh.die(LegError::Lost(why.clone()));
            }
            rd.ended = Some((why, end));
            drop(rd);
            sh.release_from(self);
        }
    }

    /// Stops watching the socket `fd` of a leg that was given back, and has the owner forget
    /// the leg at its next poll.
    pub(super) fn forget(&self, fd: RawFd) {
        // Failure means it is not there (any more); either way no event comes from it now.
        let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, fd, 0);
        wake_up(&self.kick);
    }

    /// Drops the legs that were given back.
    fn prune(self: &Arc<Self>) {
        let mut legs = self.lock();
        legs.adopted.retain(|sh| sh.reaper_is(self));
        self.count.store(legs.adopted.len(), Ordering::Release);
    }
}

impl Shared {
    /// Whether `core` reads this leg's replies.
    fn reaper_is(&self, core: &Arc<Core>) -> bool {
        is(self.lock().reaper.as_ref(), core)
    }

    /// Gives the leg back to its reader thread if `core` reads it (and not a reaper that has
    /// adopted it since).
    fn release_from(&self, core: &Arc<Core>) {
        let mut st = self.lock();
        if !is(st.reaper.as_ref(), core) {
            return;
        }
        st.reaper = None;
        drop(st);
        self.let_go(Some(Arc::clone(core)));
    }
}

fn is(reaper: Option<&Weak<Core>>, core: &Arc<Core>) -> bool {
    reaper.is_some_and(|w| ptr::eq(w.as_ptr(), Arc::as_ptr(core)))
}

/// Has the reaper of this thread's `enter`, if any, adopt `sh`.
pub(super) fn adopt_here(sh: &Arc<Shared>) {
    let current = CURRENT.with(Cell::get);
    if current.is_null() {
        return;
    }
    // SAFETY: `CURRENT` is set only by `enter`, to the reaper it borrows, and put back before
    // that borrow ends (also on unwind), so the reaper is alive here.
    let reaper = unsafe { &*current };
    reaper.core.adopt(sh);
}

fn epoll_ctl(epoll: &OwnedFd, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: `ev` is a live event for the duration of the call (ignored for EPOLL_CTL_DEL);
    // `fd` is a descriptor the caller keeps open.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
