//! Moving requests from a virtqueue into the mirror, and answers back into the used ring.
//!
//! The vring thread never waits for I/O: it pops chains, parses them, hands them to the mirror and
//! returns to its event loop. Answers are written by whichever thread finishes the request (a leg's
//! completion thread), which saves a thread hop per request over routing them back through the
//! vring thread; the vring lock is held only to add the used entry.

use std::cell::{OnceCell, RefCell};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::warn;
use mirror::{IoStatus, KeepAlive};
use smallvec::SmallVec;
use transport::file::Reactor;
use transport::nbd::Reaper;
use transport::{Buffers, LegOp};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    VolatileMemory,
};

use super::request::{self, Limits, ParseError, Request, RequestKind, MAX_DATA_SEGMENTS};
use super::BlkMirror;

/// Chains popped per lock of the vring, and started as one completion batch. Small, so that the
/// driver sees answers while the rest of the queue is still being worked through and can refill
/// it meanwhile: measured with null legs at queue depth 32, 4 gave twice the IOPS of 32, whose
/// answers all came at the end of the pass and left driver and device taking turns.
const POP_BATCH: usize = 4;

/// Per-queue bookkeeping shared by the vring thread and the completing threads.
pub struct QueueState {
    inflight: AtomicUsize,
    /// Used by the queue's vring thread only.
    pub poller: Poller,
    /// The worker's own io_uring for the file legs' requests of this queue (see
    /// [`transport::file::reactor`]); `None` if the leg threads take them.
    pub reactor: Option<Reactor>,
    /// The worker's own reading of the NBD legs' replies (see [`transport::nbd::reaper`]);
    /// `None` if the legs' reader threads read them.
    pub reaper: Option<Reaper>,
}

impl QueueState {
    /// A queue whose worker polls for new requests for up to `poll_max`, submits file-leg
    /// I/O through `reactor` and reads NBD replies through `reaper`, if any.
    pub fn new(poll_max: Duration, reactor: Option<Reactor>, reaper: Option<Reaper>) -> Self {
        QueueState {
            inflight: AtomicUsize::new(0),
            poller: Poller::new(poll_max),
            reactor,
            reaper,
        }
    }

    /// Runs one pass of the queue's worker: file-leg requests it submits go into the queue's
    /// reactor and are handed to the kernel when the pass ends; the NBD legs it submits to
    /// are read by its reaper, which takes what replies have come in by then.
    pub fn run_pass<R>(&self, pass: impl FnOnce() -> R) -> R {
        match (&self.reactor, &self.reaper) {
            (None, None) => pass(),
            (Some(reactor), None) => reactor.enter(pass),
            (None, Some(reaper)) => reaper.enter(pass),
            (Some(reactor), Some(reaper)) => reactor.enter(|| reaper.enter(pass)),
        }
    }

    /// Whether the worker has completions of its own to reap. Not the NBD replies its reaper
    /// reads: a socket can only be asked with a system call, which made every round of the
    /// worker's polling one (the daemon's CPU per request went up by a sixth in alternating
    /// runs); those are read at the end of every pass, and from the worker's epoll.
    pub fn has_completions(&self) -> bool {
        self.reactor.as_ref().is_some_and(Reactor::has_work)
    }

    /// Requests accepted and not yet answered.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }
}

/// Adaptive polling of a queue's available ring, after QEMU's `aio_poll`: a wake-up through the
/// kick eventfd costs a system call in the driver and a sleep and wake-up here (tens of
/// microseconds on a virtual machine's vCPUs); a short spin with notifications off costs
/// neither when the next requests come soon. The window grows while polling finds requests
/// and shrinks when it does not, so an idle or slow queue soon stops spinning and leaves the
/// CPU to the legs' threads.
pub struct Poller {
    max_ns: u64,
    /// Current window in nanoseconds; only the queue's vring thread touches it.
    window_ns: AtomicU64,
}

/// Smallest window a poller grows from.
const POLL_GROW_FROM_NS: u64 = 4_000;

impl Poller {
    fn new(max: Duration) -> Self {
        let max_ns = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        Poller {
            max_ns,
            window_ns: AtomicU64::new(max_ns),
        }
    }

    /// Spins for up to the current window until the driver has made new requests available or
    /// `other_work` says there is something else to do (the worker's own completions). Returns
    /// whether either happened; the caller keeps notifications off meanwhile.
    pub fn wait_for_requests(
        &self,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        other_work: impl Fn() -> bool,
    ) -> bool {
        let window = self.window_ns.load(Ordering::Relaxed);
        if self.max_ns == 0 {
            return false;
        }
        let start = Instant::now();
        let mut spins = 0u32;
        let found = loop {
            if has_available(vring, mem) || other_work() {
                break true;
            }
            if window == 0 || start.elapsed().as_nanos() as u64 >= window {
                break false;
            }
            spins += 1;
            // Two cores may be shared with the legs' threads: let them run now and then.
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        };
        self.window_ns
            .store(next_window(window, found, self.max_ns), Ordering::Relaxed);
        found
    }
}

/// The polling window after a poll that `found` requests or not: doubled (from at least
/// [`POLL_GROW_FROM_NS`]) up to `max_ns`, or halved.
fn next_window(window: u64, found: bool, max_ns: u64) -> u64 {
    if found {
        window.saturating_mul(2).max(POLL_GROW_FROM_NS).min(max_ns)
    } else {
        window / 2
    }
}

/// Whether the driver has published requests the device has not taken yet.
fn has_available(vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
    let guard = vring.get_ref();
    let queue = guard.get_queue();
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => idx.0 != queue.next_avail(),
        Err(_) => false,
    }
}

/// Descriptors yielded before a chain is cut off: enough for `request::parse_chain` to see that
/// a longer chain has too many.
const CHAIN_CAP: usize = MAX_DATA_SEGMENTS + 4;

/// The descriptors of `chain`, as iterating it yields them (up to [`CHAIN_CAP`]), read from the
/// descriptor table at `table` (`size` entries). `DescriptorChain` reads each descriptor with
/// `read_obj`: a region lookup and a `memcpy` call for 16 bytes, 10 % of the vring thread on
/// null legs. Here the table is looked up once per chain and each descriptor is one 16-byte
/// volatile load. The chain's own iterator does every case this does not: an indirect table,
/// or a table that is not in one memory region.
fn chain_descriptors<M: GuestMemory + GuestMemoryBackend>(
    mem: &M,
    table: GuestAddress,
    size: u16,
    chain: DescriptorChain<&M>,
) -> SmallVec<[Descriptor; 16]> {
    let fallback = |chain: DescriptorChain<&M>| chain.take(CHAIN_CAP).collect();
    let slice = mem.to_region_addr(table).and_then(|(region, at)| {
        region
            .get_slice(at, usize::from(size) * std::mem::size_of::<RawDescriptor>())
            .ok()
    });
    let Some(slice) = slice else {
        return fallback(chain);
    };
    let Ok(descs) = slice.get_array_ref::<RawDescriptor>(0, usize::from(size)) else {
        return fallback(chain);
    };
    // The same walk as `DescriptorChain::next`: at most `size` descriptors, an index past the
    // table or more than 4 GiB in all ends the chain.
    let mut out = SmallVec::new();
    let (mut idx, mut ttl, mut bytes) = (chain.head_index(), size, 0u32);
    while ttl != 0 && idx < size && out.len() < CHAIN_CAP {
        let d = Descriptor::from(descs.load(usize::from(idx)));
        if d.refers_to_indirect_table() {
            return fallback(chain);
        }
        let Some(b) = bytes.checked_add(d.len()) else {
            break;
        };
        bytes = b;
        out.push(d);
        if !d.has_next() {
            break;
        }
        idx = d.next();
        ttl -= 1;
    }
    out
}

/// The queue a request is answered on and the memory map it came with, shared by the requests
/// of one pass over the queue: one reference count per request where separate handles took
/// three, and the same reference keeps the memory mapped while legs use the buffers.
pub struct Answerer {
    vring: VringRwLock,
    mem: Arc<GuestMemoryMmap>,
    state: Arc<QueueState>,
}

/// Everything needed to answer one request; it travels through the mirror as the request's
/// context.
pub struct Completion {
    to: Arc<Answerer>,
    head: u16,
    status: GuestAddress,
    used_len: u32,
}

impl Completion {
    /// Writes the status byte, returns the chain to the driver and notifies it if it asked to be.
    pub fn finish(self, status: IoStatus) {
        let (byte, used_len) = match status {
            IoStatus::Ok => (VIRTIO_BLK_S_OK as u8, self.used_len),
            IoStatus::IoError => (VIRTIO_BLK_S_IOERR as u8, 1),
            IoStatus::Unsupported => (VIRTIO_BLK_S_UNSUPP as u8, 1),
        };
        status_byte_answer(&self.to.mem, self.status, u32::from(byte));
        if transport::batch::active() {
            // Inside a completion batch (a queue pass that completed requests inline, a leg's
            // completion loop): the used entries go in together at its end, under one lock of
            // the vring and with at most one notification.
            ANSWERS.with(|a| {
                a.borrow_mut().push(Answer {
                    to: self.to,
                    head: self.head,
                    used_len,
                })
            });
            transport::batch::at_end(publish_answers);
            return;
        }
        answer(&self.to.vring, self.head, used_len);
        self.to.state.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A finished request whose used entry waits for the end of this thread's completion batch.
struct Answer {
    to: Arc<Answerer>,
    head: u16,
    used_len: u32,
}

thread_local! {
    static ANSWERS: RefCell<Vec<Answer>> = const { RefCell::new(Vec::new()) };
}

/// Puts the answers of this thread's batch into their used rings: per run of answers to the same
/// queue, one lock of the vring and at most one notification.
fn publish_answers() {
    let mut list = ANSWERS.with(|a| std::mem::take(&mut *a.borrow_mut()));
    let mut i = 0;
    while i < list.len() {
        let first = &list[i];
        let n = list[i..]
            .iter()
            .take_while(|a| Arc::ptr_eq(&a.to.state, &first.to.state))
            .count();
        let notify = {
            let mut vring = first.to.vring.get_mut();
            for a in &list[i..i + n] {
                if let Err(e) = vring.add_used(a.head, a.used_len) {
                    warn!("cannot add used entry for descriptor {}: {e}", a.head);
                }
            }
            // With EVENT_IDX the driver says when it wants an interrupt; without it this is
            // always true.
            vring.needs_notification()
        };
        if !matches!(notify, Ok(false)) {
            if let Err(e) = first.to.vring.signal_used_queue() {
                warn!("cannot signal used queue: {e}");
            }
        }
        // Only now: `drain` (GET_VRING_BASE) must not see a request gone before its used entry.
        first.to.state.inflight.fetch_sub(n, Ordering::AcqRel);
        i += n;
    }
    list.clear();
    // Keep the allocation for the next batch.
    ANSWERS.with(|a| {
        let mut a = a.borrow_mut();
        if a.is_empty() {
            *a = list;
        }
    });
}

fn answer(vring: &VringRwLock, head: u16, used_len: u32) {
    if let Err(e) = vring.add_used(head, used_len) {
        warn!("cannot add used entry for descriptor {head}: {e}");
        return;
    }
    // With EVENT_IDX the driver says when it wants an interrupt; without it this is always true.
    match vring.needs_notification() {
        Ok(false) => {}
        _ => {
            if let Err(e) = vring.signal_used_queue() {
                warn!("cannot signal used queue: {e}");
            }
        }
    }
}

/// Writes the status byte: one region lookup and a store, where `write_obj` walks the range
/// with a slice iterator and copies one byte with `memcpy`.
fn status_byte_answer(mem: &GuestMemoryMmap, status: GuestAddress, byte: u32) {
    let written = mem
        .get_slice(status, 1)
        .and_then(|v| Ok(v.store(byte as u8, 0, Ordering::Relaxed)?));
    if let Err(e) = written {
        warn!("cannot write status byte at {:#x}: {e}", status.0);
    }
}

/// One pass over one queue, borrowed from the device for the duration of an event.
pub struct QueueContext<'a> {
    mirror: &'a BlkMirror,
    limits: &'a Limits,
    serial: &'a [u8; 20],
    state: &'a Arc<QueueState>,
    vring: &'a VringRwLock,
    mem: &'a Arc<GuestMemoryMmap>,
    /// Made by the pass's first request that goes to the mirror.
    answerer: OnceCell<Arc<Answerer>>,
}

impl<'a> QueueContext<'a> {
    pub fn new(
        mirror: &'a BlkMirror,
        limits: &'a Limits,
        serial: &'a [u8; 20],
        state: &'a Arc<QueueState>,
        vring: &'a VringRwLock,
        mem: &'a Arc<GuestMemoryMmap>,
    ) -> Self {
        QueueContext {
            mirror,
            limits,
            serial,
            state,
            vring,
            mem,
            answerer: OnceCell::new(),
        }
    }

    /// Takes every available chain off the queue and starts it.
    pub fn process(&self) {
        loop {
            let mut batch: SmallVec<[(u16, Result<Request, ParseError>); POP_BATCH]> =
                SmallVec::new();
            {
                let mut guard = self.vring.get_mut();
                let queue = guard.get_queue_mut();
                let (table, size) = (GuestAddress(queue.desc_table()), queue.size());
                while batch.len() < POP_BATCH {
                    let Some(chain) = queue.pop_descriptor_chain(&**self.mem) else {
                        break;
                    };
                    let head = chain.head_index();
                    let descs = chain_descriptors(&**self.mem, table, size, chain);
                    batch.push((head, request::parse_chain(&descs, &**self.mem, self.limits)));
                }
            }
            // The vring lock is released before the mirror sees the requests: a leg may complete
            // one inline, and answering takes that lock. What completes inline is answered at
            // the end of the batch, under one lock and with at most one notification.
            if batch.is_empty() {
                return;
            }
            transport::batch::run(|| {
                for (head, parsed) in batch {
                    match parsed {
                        Ok(req) => self.start(head, req),
                        Err(e) => self.refuse(head, e),
                    }
                }
            });
        }
    }

    fn refuse(&self, head: u16, e: ParseError) {
        warn!("refusing request (descriptor {head}): {e}");
        match e.status {
            Some(status) => {
                let byte = if e.is_unsupported() {
                    VIRTIO_BLK_S_UNSUPP
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                status_byte_answer(self.mem, status, byte);
                answer(self.vring, head, 1);
            }
            // Nowhere to put a status: hand the chain back with nothing written so the driver's
            // descriptors are not lost.
            None => answer(self.vring, head, 0),
        }
    }

    fn start(&self, head: u16, req: Request) {
        if req.kind == RequestKind::GetId {
            let mut left: &[u8] = self.serial;
            for seg in &req.data {
                let n = (seg.len as usize).min(left.len());
                if self.mem.write_slice(&left[..n], seg.addr).is_err() {
                    status_byte_answer(self.mem, req.status, VIRTIO_BLK_S_IOERR);
                    answer(self.vring, head, 1);
                    return;
                }
                left = &left[n..];
            }
            status_byte_answer(self.mem, req.status, VIRTIO_BLK_S_OK);
            answer(self.vring, head, req.used_len());
            return;
        }
        let op = match req.kind {
            RequestKind::In | RequestKind::Out => {
                let Some(bufs) = self.host_buffers(&req) else {
                    status_byte_answer(self.mem, req.status, VIRTIO_BLK_S_IOERR);
                    answer(self.vring, head, 1);
                    return;
                };
                if req.kind == RequestKind::In {
                    LegOp::Read {
                        offset: req.offset,
                        bufs,
                    }
                } else {
                    LegOp::Write {
                        offset: req.offset,
                        bufs,
                        fua: false,
                    }
                }
            }
            RequestKind::Flush => LegOp::Flush,
            RequestKind::Discard => LegOp::Discard {
                offset: req.offset,
                len: req.len,
            },
            RequestKind::WriteZeroes { unmap } => LegOp::WriteZeroes {
                offset: req.offset,
                len: req.len,
                may_unmap: unmap,
            },
            RequestKind::GetId => return,
        };
        self.state.inflight.fetch_add(1, Ordering::AcqRel);
        let to = self
            .answerer
            .get_or_init(|| {
                Arc::new(Answerer {
                    vring: self.vring.clone(),
                    mem: self.mem.clone(),
                    state: self.state.clone(),
                })
            })
            .clone();
        let keep: Arc<dyn KeepAlive> = to.clone();
        self.mirror.submit(
            op,
            Some(keep),
            Completion {
                to,
                head,
                status: req.status,
                used_len: req.used_len(),
            },
        );
    }

    /// Host addresses of the request's buffers. A guest buffer may straddle two memory regions,
    /// so one segment can become several iovecs.
    fn host_buffers(&self, req: &Request) -> Option<Buffers> {
        let mut bufs = Buffers::new();
        for seg in &req.data {
            // A buffer in one region (almost all of them) is one lookup; `get_slices` builds a
            // slice with its bitmap and guard per region.
            if let Some((region, at)) = self.mem.to_region_addr(seg.addr) {
                let fits =
                    at.0.checked_add(u64::from(seg.len))
                        .is_some_and(|end| end <= region.len());
                if let (true, Ok(ptr)) = (fits, region.get_host_address(at)) {
                    // SAFETY: `ptr..ptr + seg.len` lies inside the region's mapping (checked just
                    // above), which the `keep` handed to the mirror with this request holds open
                    // until no leg can touch the buffer any more; the driver gave the buffer to
                    // the device until the request is answered.
                    unsafe { bufs.push(ptr, seg.len as usize) };
                    continue;
                }
            }
            for slice in GuestMemoryBackend::get_slices(&**self.mem, seg.addr, seg.len as usize) {
                let slice = slice.ok()?;
                // SAFETY: the pointer is into the guest memory mapping, which the `keep` handed to
                // the mirror with this request holds open until no leg can touch the buffer any
                // more. The driver gave this buffer to the device until the request is answered,
                // so nothing in the guest accesses it meanwhile.
                unsafe { bufs.push(slice.ptr_guard_mut().as_ptr(), slice.len()) };
            }
        }
        Some(bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    fn fields(d: &Descriptor) -> (u64, u32, u16, u16) {
        (d.addr().0, d.len(), d.flags(), d.next())
    }

    /// Walks the chain at the head of `q`'s available ring both ways and compares.
    fn same_as_chain(mem: &GuestMemoryMmap, q: &MockSplitQueue<'_, GuestMemoryMmap>) -> usize {
        let mut queue: Queue = q.create_queue().unwrap();
        let (table, size) = (GuestAddress(queue.desc_table()), queue.size());
        let chain = queue.iter(mem).unwrap().next().unwrap();
        let want: Vec<_> = chain.clone().take(CHAIN_CAP).map(|d| fields(&d)).collect();
        let got: Vec<_> = chain_descriptors(mem, table, size, chain)
            .iter()
            .map(fields)
            .collect();
        assert_eq!(got, want);
        got.len()
    }

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    #[test]
    fn descriptors_read_from_the_table_match_the_chain() {
        // The mock puts indirect tables at 768 MiB.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x3100_0000)]).unwrap();
        let n = VRING_DESC_F_NEXT as u16;
        // Plain, a loop, a next index past the table, more than 4 GiB, longer than the cap.
        let cases: Vec<Vec<RawDescriptor>> = vec![
            vec![
                raw(0x10_0000, 16, n, 1),
                raw(0x20_0000, 4096, n | 2, 2),
                raw(0x30_0000, 1, 2, 0),
            ],
            vec![raw(0x10_0000, 16, n, 1), raw(0x20_0000, 512, n, 0)],
            vec![raw(0x10_0000, 16, n, 1), raw(0x20_0000, 512, n, 300)],
            vec![raw(0x10_0000, u32::MAX, n, 1), raw(0x20_0000, 2, 0, 0)],
            (0..200u16)
                .map(|i| raw(0x10_0000 + u64::from(i) * 512, 512, n, i + 1))
                .collect(),
        ];
        let mut lens = Vec::new();
        for descs in &cases {
            let q = MockSplitQueue::new(&mem, 256);
            q.add_desc_chains(descs, 0).unwrap();
            lens.push(same_as_chain(&mem, &q));
        }
        assert_eq!(lens, [3, 256.min(CHAIN_CAP), 2, 1, CHAIN_CAP]);

        // An indirect table: the chain's own iterator follows it.
        let mut q = MockSplitQueue::new(&mem, 16);
        q.add_indirect_chain(5).unwrap();
        assert_eq!(same_as_chain(&mem, &q), 5);

        // Random tables, flags and heads.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let q = MockSplitQueue::new(&mem, 64);
            let descs: Vec<RawDescriptor> = (0..64)
                .map(|_| {
                    let r = rnd();
                    let mut flags = (r & 7) as u16;
                    if r & 0x300 == 0x300 {
                        flags |= VRING_DESC_F_INDIRECT as u16;
                    }
                    raw(
                        0x10_0000 + (r >> 40) % 0x80_0000,
                        (r >> 16) as u32 % 0x2000,
                        flags,
                        (r >> 32) as u16 % 80,
                    )
                })
                .collect();
            q.add_desc_chains(&descs, 0).unwrap();
            same_as_chain(&mem, &q);
        }
    }

    #[test]
    fn the_poll_window_grows_on_hits_and_shrinks_on_misses_within_its_limit() {
        let max = 32_000;
        assert_eq!(next_window(32_000, false, max), 16_000);
        assert_eq!(next_window(0, false, max), 0);
        assert_eq!(next_window(0, true, max), POLL_GROW_FROM_NS);
        assert_eq!(next_window(20_000, true, max), max);
        // A limit below the growth floor (--poll-us 1) is still the limit.
        assert_eq!(next_window(0, true, 1_000), 1_000);
        assert_eq!(next_window(u64::MAX / 2 + 1, true, u64::MAX), u64::MAX);
    }
}
