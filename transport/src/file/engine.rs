//! The io_uring engine under file legs: one ring and a slab of in-flight requests.
//!
//! Two kinds of owner drive an engine. A leg's own ring thread ([`Engine::run`]) serves the
//! requests that arrive on the leg's channel; a [`super::Reactor`] drives one on the thread that
//! owns it (a virtqueue's worker) for whatever that thread submits to any file leg. Each slot
//! knows its leg, so one engine can serve many legs.
//!
//! In-flight requests live in a fixed slab indexed by the low half of the SQE's `user_data`; the
//! high half is a generation counter, so a stray CQE can never complete a reused slot. A slot is
//! completed by exactly one call to `Engine::finish`, and only once the kernel has returned its
//! last CQE: no buffer (the caller's or a bounce buffer) is given back while the kernel may still
//! read or fill it, not even on abort or when the ring fails. `finish` only records the outcome;
//! the owner hands it to the leg's sink with `Engine::deliver` once it holds no lock on the
//! engine, because a completion may submit again.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, TryRecvError};
use io_uring::{opcode, squeue, types, IoUring};
use smallvec::SmallVec;

use super::{
    copy_in, copy_out, iovec, is_aligned, needs_bounce, AlignedBuf, Shared, CQ_ENTRIES, MAX_SLOTS,
    PAGE, SQ_ENTRIES,
};
use crate::block::{Buffers, LegError, LegOp, LegRequest, Tag};

/// `user_data` of the eventfd read.
const EVENTFD_UD: u64 = u64::MAX;
/// Set in the `user_data` of an async cancel; the rest is the target's `user_data`.
const CANCEL_BIT: u64 = 1 << 63;
/// Generations use 31 bits so a slot's `user_data` never has `CANCEL_BIT` set.
const GEN_MASK: u32 = 0x7fff_ffff;
/// Size of the shared zero buffer used when the file system cannot zero a range itself.
const ZERO_BUF_LEN: usize = 1 << 20;
/// Zero-buffer segments per SQE when writing zeroes by hand.
const ZERO_IOVS: usize = 8;
/// Resubmissions after EAGAIN/EINTR before the error is reported.
const MAX_RETRIES: u8 = 8;
/// Consecutive EAGAIN/EBUSY from `io_uring_enter` while the SQ is full before giving up.
const MAX_ENTER_BUSY: u32 = 5000;

/// How a write-zeroes request is being carried out; each step falls back to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ZeroHow {
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: deallocates (zeroes with unmap on block devices).
    Punch,
    /// `fallocate(ZERO_RANGE | KEEP_SIZE)`.
    Range,
    /// `writev` from the shared zero buffer.
    Fill,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Kind {
    #[default]
    Read,
    Write,
    Flush,
    Discard,
    Zero(ZeroHow),
}

/// One in-flight request.
#[derive(Default)]
struct Slot {
    /// Bumped whenever the slot is freed, so a stale `user_data` cannot match.
    gen: u32,
    /// Holds a request.
    busy: bool,
    /// An SQE for this slot has been pushed and its CQE not yet reaped.
    in_kernel: bool,
    tag: Tag,
    kind: Kind,
    offset: u64,
    len: u64,
    /// Bytes transferred so far (reads, writes, zero fill).
    done: u64,
    fua: bool,
    /// The caller's segments.
    bufs: Buffers,
    /// Replaces `bufs` as the kernel's buffer when they cannot be used directly.
    bounce: Option<AlignedBuf>,
    /// The iovec array of the current SQE. The slab never moves, and this is only rebuilt once
    /// the previous SQE's CQE has arrived, so the kernel always sees a stable array.
    iov: SmallVec<[libc::iovec; 8]>,
    /// Set on abort or loss: the request fails with this once its CQE arrives.
    failure: Option<LegError>,
    cancel_sent: bool,
    retries: u8,
    /// The leg the request belongs to (an engine driven by a reactor serves many).
    leg: Option<Arc<Shared>>,
}

impl Slot {
    fn user_data(&self, idx: usize) -> u64 {
        (u64::from(self.gen) << 32) | idx as u64
    }
}

/// A finished request, waiting to be handed to its leg's sink.
pub(super) struct Done {
    leg: Arc<Shared>,
    tag: Tag,
    result: Result<(), LegError>,
}

/// A leg's own ring thread: what it serves besides its engine.
pub(super) struct Own {
    pub(super) shared: Arc<Shared>,
    pub(super) rx: Receiver<LegRequest>,
}

/// One ring and its in-flight requests. Only its owner touches it (a leg's thread, or a
/// reactor's thread under the reactor's lock).
pub(super) struct Engine {
    ring: IoUring,
    /// Set for a leg's own ring thread.
    own: Option<Own>,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    busy: usize,
    /// Cancel SQEs whose CQE has not arrived.
    cancels: usize,
    /// Target of the armed eventfd read. Boxed so it stays put; written only by the kernel.
    eventfd_buf: Box<UnsafeCell<u64>>,
    eventfd_armed: bool,
    /// `user_data` of pushed SQEs the kernel may not have consumed yet, oldest first.
    unconsumed: VecDeque<u64>,
    /// Reaped CQEs, reused between passes.
    cqes: Vec<(u64, i32)>,
    zero_buf: Option<AlignedBuf>,
    /// Finished requests not yet delivered.
    done: Vec<Done>,
    /// The leg's handle is gone (own thread): finish what is in flight, then exit.
    closing: bool,
    /// Own thread: the leg is dead (aborted or lost); new requests fail with this.
    death: Option<LegError>,
    /// The ring itself failed: no more `io_uring_enter`.
    lost: bool,
}

// SAFETY: an engine moves to the thread that drives it, or lives behind a reactor's mutex.
// What is not `Send` by itself are raw pointers: those in `Buffers` (which the submitter
// guarantees stay valid until completion, from any thread), the bounce and zero buffers (owned
// allocations) and the iovec arrays pointing into them; none is tied to a thread.
unsafe impl Send for Engine {}

impl Engine {
    fn new(ring: IoUring, own: Option<Own>) -> Engine {
        Engine {
            ring,
            own,
            slots: (0..MAX_SLOTS).map(|_| Slot::default()).collect(),
            free: (0..MAX_SLOTS as u32).rev().collect(),
            busy: 0,
            cancels: 0,
            eventfd_buf: Box::new(UnsafeCell::new(0)),
            eventfd_armed: false,
            unconsumed: VecDeque::with_capacity(SQ_ENTRIES as usize * 2),
            cqes: Vec::with_capacity(CQ_ENTRIES as usize),
            zero_buf: None,
            done: Vec::new(),
            closing: false,
            death: None,
            lost: false,
        }
    }

    /// The engine of a leg's own ring thread.
    pub(super) fn for_leg(ring: IoUring, own: Own) -> Engine {
        Engine::new(ring, Some(own))
    }

    /// An engine without a leg of its own, for a reactor.
    pub(super) fn for_reactor(ring: IoUring) -> Engine {
        Engine::new(ring, None)
    }

    /// The ring's descriptor, so tests can break the ring from outside.
    #[cfg(test)]
    pub(super) fn ring_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }

    /// Whether SQEs wait to be handed to the kernel (a reap may push some: the rest of a short
    /// transfer, a retry, a zeroing fallback).
    pub(super) fn sq_pending(&mut self) -> bool {
        !self.lost && !self.ring.submission().is_empty()
    }

    /// Whether a CQE is waiting.
    pub(super) fn cq_ready(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Turns the ring's eventfd notifications on or off (a reactor reaping by itself).
    pub(super) fn eventfd_notifications(&mut self, on: bool) {
        if on {
            self.ring.completion().enable_eventfd();
        } else {
            self.ring.completion().disable_eventfd();
        }
    }

    /// Requests in flight, and cancels whose CQE has not arrived.
    pub(super) fn outstanding(&self) -> usize {
        self.busy + self.cancels
    }

    pub(super) fn has_free_slot(&self) -> bool {
        !self.free.is_empty()
    }

    pub(super) fn is_lost(&self) -> bool {
        self.lost
    }

    /// The thread of a leg: serves its channel until the handle is gone and nothing is left.
    pub(super) fn run(mut self) {
        let own_eventfd = match &self.own {
            Some(own) => own.shared.eventfd.as_raw_fd(),
            None => return,
        };
        loop {
            self.check_own_death();
            self.intake();
            self.deliver_all();
            if self.lost {
                self.run_lost();
                return;
            }
            if !self.eventfd_armed && !self.closing {
                self.arm_eventfd(own_eventfd);
                continue;
            }
            if self.closing && self.busy == 0 && self.cancels == 0 {
                if !self.eventfd_armed {
                    return;
                }
                // The handle's last wake-up may have been eaten by an earlier read (say while
                // every slot was busy and the disconnect went unnoticed), so nobody else will
                // complete this one: do it ourselves, leaving nothing in the kernel at exit.
                if let Some(own) = &self.own {
                    own.shared.wake();
                }
            }
            self.enter(1);
            // One completion batch per reap: the layers above may answer these requests
            // together.
            crate::batch::run(|| {
                self.reap();
                self.deliver_all();
            });
        }
    }

    /// After the ring failed: no more `io_uring_enter`, so completions are picked up by polling
    /// the CQ (the kernel still posts them, running its task work when this thread makes any
    /// system call, such as the sleep). In-flight requests still wait for their CQE.
    fn run_lost(&mut self) {
        let mut nap = Duration::from_millis(1);
        loop {
            let before = self.busy;
            crate::batch::run(|| {
                self.reap();
                self.intake();
                self.deliver_all();
            });
            if self.closing && self.busy == 0 {
                break;
            }
            if self.busy < before {
                nap = Duration::from_millis(1);
            } else {
                nap = (nap * 2).min(Duration::from_millis(50));
            }
            thread::sleep(nap);
        }
        if self.eventfd_armed {
            // The kernel may still complete this read after we are gone; the 8 bytes must stay.
            std::mem::forget(std::mem::replace(
                &mut self.eventfd_buf,
                Box::new(UnsafeCell::new(0)),
            ));
        }
    }

    /// Own thread: picks up an abort (or a loss noticed by the handle) and starts cancelling.
    fn check_own_death(&mut self) {
        if self.death.is_some() {
            return;
        }
        let Some(err) = self.own.as_ref().and_then(|own| own.shared.death()) else {
            return;
        };
        self.death = Some(err);
        self.cancel_dead();
    }

    /// Fails every request of a dead leg: each gets its leg's error once its CQE arrives, and
    /// those in the kernel are cancelled so that is soon.
    pub(super) fn cancel_dead(&mut self) {
        for idx in 0..self.slots.len() {
            let slot = &mut self.slots[idx];
            if !slot.busy || slot.failure.is_some() {
                continue;
            }
            let Some(err) = slot.leg.as_ref().and_then(|leg| leg.death()) else {
                continue;
            };
            slot.failure = Some(err);
            if slot.in_kernel && !slot.cancel_sent && !self.lost {
                slot.cancel_sent = true;
                let target = slot.user_data(idx);
                let entry = opcode::AsyncCancel::new(target)
                    .build()
                    .user_data(CANCEL_BIT | target);
                if self.push(&entry, CANCEL_BIT | target) {
                    self.cancels += 1;
                }
            }
        }
    }

    /// Own thread: moves queued requests into free slots (or fails them, once the leg is dead).
    fn intake(&mut self) {
        loop {
            if self.death.is_none() && self.free.is_empty() {
                return;
            }
            let Some(own) = &self.own else {
                return;
            };
            let leg = Arc::clone(&own.shared);
            match own.rx.try_recv() {
                Ok(req) => self.start(leg, req),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.closing = true;
                    return;
                }
            }
        }
    }

    /// Takes `req` of `leg` into a free slot and pushes its first SQE (or fails it).
    pub(super) fn start(&mut self, leg: Arc<Shared>, req: LegRequest) {
        if let Some(err) = leg.death() {
            self.done.push(Done {
                leg,
                tag: req.tag,
                result: Err(err),
            });
            return;
        }
        let Some(idx) = self.free.pop() else {
            // Owners only start requests when a slot is free.
            self.done.push(Done {
                leg,
                tag: req.tag,
                result: Err(LegError::Io(libc::EBUSY)),
            });
            return;
        };
        let idx = idx as usize;
        self.busy += 1;
        leg.held.fetch_add(1, Ordering::AcqRel);
        let align = leg.align;
        let bounce_align = PAGE.max(leg.align as usize);
        let direct = leg.direct;
        let zero_how = |may_unmap: bool| {
            if may_unmap && !leg.punch_unsupported.load(Ordering::Relaxed) {
                ZeroHow::Punch
            } else if !leg.zero_range_unsupported.load(Ordering::Relaxed) {
                ZeroHow::Range
            } else {
                ZeroHow::Fill
            }
        };

        let slot = &mut self.slots[idx];
        slot.busy = true;
        slot.tag = req.tag;
        slot.done = 0;
        slot.fua = false;
        slot.retries = 0;
        let mut error = None;
        match req.op {
            LegOp::Read { offset, bufs } => {
                slot.kind = Kind::Read;
                slot.offset = offset;
                slot.len = bufs.total_len() as u64;
                if needs_bounce(&bufs, offset, direct, align) {
                    match AlignedBuf::new(bufs.total_len(), bounce_align, false) {
                        Some(b) => slot.bounce = Some(b),
                        None => error = Some(LegError::Io(libc::ENOMEM)),
                    }
                }
                slot.bufs = bufs;
            }
            LegOp::Write { offset, bufs, fua } => {
                slot.kind = Kind::Write;
                slot.offset = offset;
                slot.len = bufs.total_len() as u64;
                slot.fua = fua;
                if needs_bounce(&bufs, offset, direct, align) {
                    match AlignedBuf::new(bufs.total_len(), bounce_align, false) {
                        Some(b) => {
                            copy_in(&bufs, &b);
                            slot.bounce = Some(b);
                        }
                        None => error = Some(LegError::Io(libc::ENOMEM)),
                    }
                }
                slot.bufs = bufs;
            }
            LegOp::Flush => slot.kind = Kind::Flush,
            LegOp::Discard { offset, len } => {
                slot.kind = Kind::Discard;
                slot.offset = offset;
                slot.len = len;
            }
            LegOp::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => {
                slot.kind = Kind::Zero(zero_how(may_unmap));
                slot.offset = offset;
                slot.len = len;
            }
        }
        slot.leg = Some(leg);
        match error {
            Some(err) => self.finish(idx, Err(err)),
            None => self.issue(idx),
        }
    }

    /// Pushes the next SQE for slot `idx` (first submission or the rest of a short transfer).
    fn issue(&mut self, idx: usize) {
        let entry = match self.build_sqe(idx) {
            Ok(entry) => entry,
            Err(err) => return self.finish(idx, Err(err)),
        };
        // A retry after EAGAIN goes to the kernel's worker threads, where the I/O may block
        // instead of failing again at once (a device queue that stays full for a while).
        let entry = if self.slots[idx].retries > 0 {
            entry.flags(squeue::Flags::ASYNC)
        } else {
            entry
        };
        let ud = entry.get_user_data();
        if self.push(&entry, ud) {
            self.slots[idx].in_kernel = true;
        } else {
            let err = self.death_error(idx);
            self.finish(idx, Err(err));
        }
    }

    fn build_sqe(&mut self, idx: usize) -> Result<squeue::Entry, LegError> {
        if self.slots[idx].kind == Kind::Zero(ZeroHow::Fill) && self.zero_buf.is_none() {
            self.zero_buf = AlignedBuf::new(ZERO_BUF_LEN, PAGE, true);
        }
        let zero_ptr = self.zero_buf.as_ref().map(|b| b.as_ptr());
        let slot = &mut self.slots[idx];
        let leg = slot.leg.as_ref().ok_or(LegError::Io(libc::EBADF))?;
        let (main, twin, direct, align) = (
            leg.main.as_raw_fd(),
            leg.twin.as_ref().map(|f| f.as_raw_fd()),
            leg.direct,
            leg.align,
        );
        let ud = slot.user_data(idx);
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let entry = match slot.kind {
            Kind::Flush => opcode::Fsync::new(types::Fd(main))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Kind::Discard | Kind::Zero(ZeroHow::Punch) => {
                opcode::Fallocate::new(types::Fd(main), slot.len)
                    .offset(slot.offset)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | keep)
                    .build()
            }
            Kind::Zero(ZeroHow::Range) => opcode::Fallocate::new(types::Fd(main), slot.len)
                .offset(slot.offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | keep)
                .build(),
            Kind::Read | Kind::Write | Kind::Zero(ZeroHow::Fill) => {
                let pos = slot.offset + slot.done;
                let remaining = slot.len - slot.done;
                slot.iov.clear();
                if let Kind::Zero(_) = slot.kind {
                    let zero = zero_ptr.ok_or(LegError::Io(libc::ENOMEM))?;
                    let mut left = remaining;
                    while left > 0 && slot.iov.len() < ZERO_IOVS {
                        let n = left.min(ZERO_BUF_LEN as u64) as usize;
                        slot.iov.push(iovec(zero, n));
                        left -= n as u64;
                    }
                } else if let Some(bounce) = &slot.bounce {
                    let start = bounce.as_ptr().wrapping_add(slot.done as usize);
                    slot.iov.push(iovec(start, remaining as usize));
                } else {
                    let mut skip = slot.done as usize;
                    for v in slot.bufs.iovecs() {
                        if skip >= v.len() {
                            skip -= v.len();
                            continue;
                        }
                        slot.iov
                            .push(iovec(v.ptr().wrapping_add(skip), v.len() - skip));
                        skip = 0;
                    }
                }
                let bytes: u64 = slot.iov.iter().map(|v| v.iov_len as u64).sum();
                let aligned = is_aligned(pos | bytes, align)
                    && slot
                        .iov
                        .iter()
                        .all(|v| is_aligned((v.iov_base as usize | v.iov_len) as u64, align));
                // O_DIRECT refuses unaligned transfers; the buffered twin takes them.
                let fd = match twin {
                    Some(twin) if direct && !aligned => twin,
                    _ => main,
                };
                let (iov_ptr, iov_len) = (slot.iov.as_ptr(), slot.iov.len() as u32);
                if slot.kind == Kind::Read {
                    opcode::Readv::new(types::Fd(fd), iov_ptr, iov_len)
                        .offset(pos)
                        .build()
                } else {
                    let flags = if slot.fua { libc::RWF_DSYNC } else { 0 };
                    opcode::Writev::new(types::Fd(fd), iov_ptr, iov_len)
                        .offset(pos)
                        .rw_flags(flags)
                        .build()
                }
            }
        };
        Ok(entry.user_data(ud))
    }

    /// Pushes one SQE, handing queued ones to the kernel first if the SQ is full. Returns false
    /// if the ring failed, in which case the SQE was not pushed.
    fn push(&mut self, entry: &squeue::Entry, ud: u64) -> bool {
        let mut busy = 0;
        loop {
            if self.lost {
                return false;
            }
            // SAFETY: every buffer and iovec array an SQE points to lives in a slot, the slab's
            // bounce/zero buffers or the caller's `Buffers` (valid by `Buffers::push`'s contract
            // until we complete the request), and none of them is freed or rebuilt before the
            // SQE's CQE has been reaped. The descriptors stay open as long as the slot holds
            // its leg.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.unconsumed.push_back(ud);
                return true;
            }
            match self.ring.submit() {
                Ok(_) => {
                    self.trim_unconsumed();
                    busy = 0;
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN) | Some(libc::EBUSY) if busy < MAX_ENTER_BUSY => {
                        busy += 1;
                        thread::sleep(Duration::from_millis(1));
                    }
                    _ => self.lose(format!("io_uring_enter failed: {e}")),
                },
            }
        }
    }

    /// Submits what is queued and waits for `want` completions. Without anything queued and
    /// nothing to wait for there is no system call.
    pub(super) fn enter(&mut self, want: usize) {
        // After a loss the SQ still holds entries whose requests have been completed (their
        // buffers given back): the kernel must never see them.
        if self.lost || (want == 0 && self.ring.submission().is_empty()) {
            return;
        }
        match self.ring.submit_and_wait(want) {
            Ok(_) => self.trim_unconsumed(),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) => self.trim_unconsumed(),
                Some(libc::EAGAIN) | Some(libc::EBUSY) => {
                    // The kernel is short of resources; reap, then try again shortly.
                    self.trim_unconsumed();
                    thread::sleep(Duration::from_millis(1));
                }
                _ => self.lose(format!("io_uring_enter failed: {e}")),
            },
        }
    }

    /// Forgets the SQEs the kernel has consumed (the SQ is a FIFO, so they are the oldest).
    fn trim_unconsumed(&mut self) {
        let pending = self.ring.submission().len();
        while self.unconsumed.len() > pending {
            self.unconsumed.pop_front();
        }
    }

    fn arm_eventfd(&mut self, fd: std::os::fd::RawFd) {
        let buf: *mut u8 = self.eventfd_buf.get().cast();
        let entry = opcode::Read::new(types::Fd(fd), buf, std::mem::size_of::<u64>() as u32)
            .build()
            .user_data(EVENTFD_UD);
        if self.push(&entry, EVENTFD_UD) {
            self.eventfd_armed = true;
        }
    }

    /// Handles every CQE that is ready. What finishes waits in `done` for [`Engine::deliver`].
    pub(super) fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(ud, res) in &cqes {
            self.on_cqe(ud, res);
        }
        self.cqes = cqes;
    }

    /// Moves the finished requests into `out` (emptied first), for delivery outside a lock.
    pub(super) fn take_done(&mut self, out: &mut Vec<Done>) {
        out.clear();
        std::mem::swap(&mut self.done, out);
    }

    /// Hands finished requests to their legs' sinks; what they submit in turn is not locked out.
    pub(super) fn deliver(done: &mut Vec<Done>) {
        for d in done.drain(..) {
            d.leg.complete(d.tag, d.result);
        }
    }

    /// Own thread: delivers what has finished (nothing else holds this engine).
    fn deliver_all(&mut self) {
        if !self.done.is_empty() {
            let mut done = std::mem::take(&mut self.done);
            Engine::deliver(&mut done);
            self.done = done;
        }
    }

    fn on_cqe(&mut self, ud: u64, res: i32) {
        if ud == EVENTFD_UD {
            self.eventfd_armed = false;
            if let Some(own) = &self.own {
                // Pairs with `Shared::nudge`: whoever set the flag after this sees it clear and
                // writes the eventfd again; whoever set it before has its request in the
                // channel, which `intake` drains after this.
                own.shared.notified.swap(false, Ordering::AcqRel);
            }
            if res < 0 && !matches!(-res, libc::EINTR | libc::EAGAIN | libc::ECANCELED) {
                self.lose(format!(
                    "reading the wake-up eventfd failed: {}",
                    io::Error::from_raw_os_error(-res)
                ));
            }
            return;
        }
        if ud & CANCEL_BIT != 0 {
            // The outcome does not matter: the target's own CQE settles it.
            self.cancels = self.cancels.saturating_sub(1);
            return;
        }
        let idx = (ud & 0xffff_ffff) as usize;
        let gen = (ud >> 32) as u32;
        let valid = self
            .slots
            .get(idx)
            .is_some_and(|s| s.busy && s.in_kernel && s.gen == gen);
        if !valid {
            log::error!(
                "{}: ignoring a completion for unknown request {ud:#x}",
                self.name()
            );
            return;
        }
        let slot = &mut self.slots[idx];
        slot.in_kernel = false;
        if let Some(err) = slot.failure.take() {
            return self.finish(idx, Err(err));
        }
        if res < 0 {
            return self.on_error(idx, -res);
        }
        match slot.kind {
            Kind::Read | Kind::Write | Kind::Zero(ZeroHow::Fill) => {
                let n = res as u64;
                if n == 0 {
                    // Every request is within the capacity seen at open, so a zero-byte
                    // transfer means the file shrank (or the device made no progress).
                    log::warn!(
                        "leg {}: {} at {} made no progress (file shrunk?)",
                        slot.leg.as_ref().map_or("?", |l| l.uri.as_str()),
                        if slot.kind == Kind::Read {
                            "read"
                        } else {
                            "write"
                        },
                        slot.offset + slot.done
                    );
                    return self.finish(idx, Err(LegError::Io(libc::EIO)));
                }
                slot.done = (slot.done + n).min(slot.len);
                slot.retries = 0;
                if slot.done < slot.len {
                    return self.issue(idx);
                }
                if slot.kind == Kind::Read {
                    if let Some(bounce) = &slot.bounce {
                        copy_out(bounce, &slot.bufs);
                    }
                }
                self.finish(idx, Ok(()))
            }
            Kind::Flush | Kind::Discard | Kind::Zero(_) => self.finish(idx, Ok(())),
        }
    }

    fn on_error(&mut self, idx: usize, errno: i32) {
        let slot = &mut self.slots[idx];
        let Some(leg) = slot.leg.clone() else {
            return self.finish(idx, Err(LegError::Io(errno)));
        };
        let uri = &leg.uri;
        if matches!(errno, libc::EAGAIN | libc::EINTR) && slot.retries < MAX_RETRIES {
            slot.retries += 1;
            return self.issue(idx);
        }
        let unsupported = errno == libc::EOPNOTSUPP;
        match slot.kind {
            Kind::Zero(ZeroHow::Punch) if unsupported || errno == libc::EINVAL => {
                if unsupported && !leg.punch_unsupported.swap(true, Ordering::Relaxed) {
                    log::info!("leg {uri}: cannot punch holes; write-zeroes will zero instead");
                }
                slot.kind = Kind::Zero(if leg.zero_range_unsupported.load(Ordering::Relaxed) {
                    ZeroHow::Fill
                } else {
                    ZeroHow::Range
                });
                self.issue(idx)
            }
            Kind::Zero(ZeroHow::Range) if unsupported || errno == libc::EINVAL => {
                if unsupported && !leg.zero_range_unsupported.swap(true, Ordering::Relaxed) {
                    log::info!(
                        "leg {uri}: no fallocate(ZERO_RANGE); write-zeroes will write zeroes"
                    );
                }
                slot.kind = Kind::Zero(ZeroHow::Fill);
                slot.done = 0;
                self.issue(idx)
            }
            Kind::Discard if unsupported => self.finish(idx, Err(LegError::Unsupported)),
            _ => {
                log::warn!(
                    "leg {uri}: {:?} at {} failed: {}",
                    slot.kind,
                    slot.offset + slot.done,
                    std::io::Error::from_raw_os_error(errno)
                );
                self.finish(idx, Err(LegError::Io(errno)))
            }
        }
    }

    /// Completes slot `idx` and frees it. The only place a slot's request completes.
    fn finish(&mut self, idx: usize, result: Result<(), LegError>) {
        let slot = &mut self.slots[idx];
        let tag = slot.tag;
        slot.busy = false;
        slot.in_kernel = false;
        slot.gen = slot.gen.wrapping_add(1) & GEN_MASK;
        slot.bufs = Buffers::new();
        slot.bounce = None;
        slot.iov.clear();
        slot.failure = None;
        slot.cancel_sent = false;
        let leg = slot.leg.take();
        self.busy = self.busy.saturating_sub(1);
        self.free.push(idx as u32);
        match leg {
            Some(leg) => {
                leg.held.fetch_sub(1, Ordering::AcqRel);
                self.done.push(Done { leg, tag, result })
            }
            None => log::error!("{}: request {tag} finished without a leg", self.name()),
        }
    }

    /// What a request of slot `idx` fails with when the ring cannot take it.
    fn death_error(&self, idx: usize) -> LegError {
        self.slots[idx]
            .leg
            .as_ref()
            .and_then(|leg| leg.death())
            .or_else(|| self.death.clone())
            .unwrap_or_else(|| LegError::Lost("the io_uring failed".into()))
    }

    /// Who this engine serves, for log lines.
    fn name(&self) -> String {
        match &self.own {
            Some(own) => format!("leg {}", own.shared.uri),
            None => "a queue's io_uring".into(),
        }
    }

    /// The ring failed. Its leg (and in a reactor, every leg with a request in it) is lost:
    /// requests the kernel never saw complete now; those it did complete when their CQE
    /// arrives.
    pub(super) fn lose(&mut self, reason: String) {
        if self.lost {
            return;
        }
        self.lost = true;
        log::error!("{}: lost: {reason}", self.name());
        let err = LegError::Lost(reason);
        // A leg's own ring is the leg: it is lost with it. A reactor's ring is a queue's, and
        // its failure says nothing about the legs: what the kernel took completes as the kernel
        // says, only what it never saw fails, and later requests go through the legs' threads.
        let Some(own) = &self.own else {
            self.fail_unconsumed();
            return;
        };
        own.shared.kill(err.clone());
        self.death = own.shared.death();
        self.fail_unconsumed();
        for slot in self.slots.iter_mut().filter(|s| s.busy) {
            slot.failure.get_or_insert_with(|| err.clone());
        }
    }

    /// After the ring failed: completes the requests whose SQE the kernel never consumed (no
    /// `io_uring_enter` follows a loss, and no SQ polling is set up, so it never will).
    fn fail_unconsumed(&mut self) {
        let pending = self.ring.submission().len();
        let consumed = self.unconsumed.len().saturating_sub(pending);
        let never: Vec<u64> = self.unconsumed.drain(..).skip(consumed).collect();
        for ud in never {
            if ud == EVENTFD_UD {
                self.eventfd_armed = false;
            } else if ud & CANCEL_BIT != 0 {
                self.cancels = self.cancels.saturating_sub(1);
            } else {
                let idx = (ud & 0xffff_ffff) as usize;
                let gen = (ud >> 32) as u32;
                if self
                    .slots
                    .get(idx)
                    .is_some_and(|s| s.busy && s.in_kernel && s.gen == gen)
                {
                    let err = self.death_error(idx);
                    self.finish(idx, Err(err));
                }
            }
        }
    }
}
