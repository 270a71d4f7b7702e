//! Local file or block device leg, driven through io_uring.
//!
//! Each leg owns one ring and one thread. [`FileLeg::submit`] only validates a request, queues it
//! on a channel and pokes an eventfd. The ring thread keeps a read of that eventfd armed inside
//! the ring, so one `io_uring_enter` sleeps until either a new request or an I/O completion
//! arrives. Every pass of the thread turns all queued requests into SQEs, submits them with one
//! system call and reaps every CQE that is ready.
//!
//! In-flight requests live in a fixed slab indexed by the low half of the SQE's `user_data`; the
//! high half is a generation counter, so a stray CQE can never complete a reused slot. A slot is
//! completed by exactly one call to `Engine::finish`, and only once the kernel has returned its
//! last CQE: no buffer (the caller's or a bounce buffer) is given back while the kernel may still
//! read or fill it, not even on abort or when the ring fails.
//!
//! With O_DIRECT, requests whose buffers are aligned go straight from guest memory to the device.
//! Requests whose offset and length are aligned but whose segments are not go through an aligned
//! bounce buffer. Requests whose offset or length is not aligned cannot be done with O_DIRECT
//! without a read-modify-write that would race with neighbouring writes, so they go through a
//! second, buffered descriptor of the same file, where the page cache serialises partial blocks;
//! `fdatasync` on either descriptor flushes the inode, so flush still covers them.

use std::alloc::{self, Layout};
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, SendError, Sender, TryRecvError};
use io_uring::{opcode, squeue, types, IoUring, Probe};
use smallvec::SmallVec;

use crate::block::{BlockLeg, Buffers, CompletionSink, LegError, LegInfo, LegOp, LegRequest, Tag};
use crate::{OpenError, OpenOptions};

/// Submission queue size.
const SQ_ENTRIES: u32 = 256;
/// Completion queue size. At most `MAX_SLOTS` requests, one cancel per request and the eventfd
/// read can have a CQE pending at once (513), so the CQ can never overflow.
const CQ_ENTRIES: u32 = 1024;
/// Requests in flight at once; the rest wait in the channel.
const MAX_SLOTS: usize = 256;
/// `user_data` of the eventfd read.
const EVENTFD_UD: u64 = u64::MAX;
/// Set in the `user_data` of an async cancel; the rest is the target's `user_data`.
const CANCEL_BIT: u64 = 1 << 63;
/// Generations use 31 bits so a slot's `user_data` never has `CANCEL_BIT` set.
const GEN_MASK: u32 = 0x7fff_ffff;
/// Most iovecs one `readv`/`writev` accepts (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
/// Size of the shared zero buffer used when the file system cannot zero a range itself.
const ZERO_BUF_LEN: usize = 1 << 20;
/// Zero-buffer segments per SQE when writing zeroes by hand.
const ZERO_IOVS: usize = 8;
/// Resubmissions after EAGAIN/EINTR before the error is reported.
const MAX_RETRIES: u8 = 8;
/// Memory alignment of bounce buffers (at least one page).
const PAGE: usize = 4096;
/// Consecutive EAGAIN/EBUSY from `io_uring_enter` while the SQ is full before giving up.
const MAX_ENTER_BUSY: u32 = 5000;

const IOC_DIRSHIFT: u32 = if cfg!(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc",
    target_arch = "sparc64"
)) {
    29
} else {
    30
};
/// `_IOR(0x12, 114, size_t)`; libc does not export it.
const BLKGETSIZE64: u32 =
    (2 << IOC_DIRSHIFT) | ((std::mem::size_of::<usize>() as u32) << 16) | (0x12 << 8) | 114;

/// A local file or block device. See the module documentation.
pub struct FileLeg {
    uri: String,
    info: LegInfo,
    /// Whether the main descriptor uses O_DIRECT (false after a fallback).
    direct: bool,
    shared: Arc<Shared>,
    /// `None` only while dropping.
    tx: Option<Sender<LegRequest>>,
    thread: Option<JoinHandle<()>>,
    /// The ring's descriptor, so tests can break the ring from outside.
    #[cfg(test)]
    ring_fd: RawFd,
}

impl fmt::Debug for FileLeg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLeg")
            .field("uri", &self.uri)
            .field("info", &self.info)
            .field("direct", &self.direct)
            .field("alive", &self.is_alive())
            .finish()
    }
}

impl FileLeg {
    /// Opens `path` (a regular file or a block device), with O_DIRECT when `direct` and the file
    /// system allows it, and starts its ring thread. Completions go to `sink`.
    pub fn open(
        uri: String,
        path: &Path,
        direct: bool,
        opts: &OpenOptions,
        sink: Arc<dyn CompletionSink>,
    ) -> Result<FileLeg, OpenError> {
        let read_only = opts.read_only;
        let io_err = |source: io::Error| OpenError::Io {
            uri: uri.clone(),
            source,
        };
        let unusable = |reason: String| OpenError::Unusable {
            uri: uri.clone(),
            reason,
        };

        let mut direct = direct;
        let mut file = match open_file(path, read_only, direct) {
            Ok(f) => f,
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "leg {uri}: {} refuses O_DIRECT ({e}); falling back to buffered I/O \
                     (flush will fsync)",
                    path.display()
                );
                direct = false;
                open_file(path, read_only, false).map_err(io_err)?
            }
            Err(e) => return Err(io_err(e)),
        };

        let meta = file
            .metadata()
            .map_err(|e| io_err(context(e, "cannot stat")))?;
        let file_type = meta.file_type();
        let is_bdev = file_type.is_block_device();
        let capacity = if file_type.is_file() {
            meta.len()
        } else if is_bdev {
            bdev_size(&file).map_err(|e| io_err(context(e, "cannot get block device size")))?
        } else {
            return Err(unusable(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        };
        if capacity == 0 {
            return Err(unusable(format!("{} has size zero", path.display())));
        }

        let mut block_size = 512;
        if is_bdev {
            block_size = bdev_logical_block_size(&file)
                .map_err(|e| io_err(context(e, "cannot get logical block size")))?;
            if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
                return Err(unusable(format!(
                    "{} reports a logical block size of {block_size}",
                    path.display()
                )));
            }
        } else if direct {
            match probe_dio_block_size(&file) {
                Some(bs) => block_size = bs,
                None => {
                    log::warn!(
                        "leg {uri}: O_DIRECT reads of {} fail even when page-aligned; falling \
                         back to buffered I/O (flush will fsync)",
                        path.display()
                    );
                    direct = false;
                    file = open_twin(&file, path, read_only, &meta).map_err(|e| match e {
                        TwinError::Io(e) => io_err(context(e, "cannot reopen without O_DIRECT")),
                        TwinError::Changed => unusable(format!(
                            "{} was replaced while it was being opened",
                            path.display()
                        )),
                    })?;
                }
            }
        }

        // Requests O_DIRECT cannot take (offset or length not block-aligned) use this twin.
        let twin = if direct {
            Some(
                open_twin(&file, path, read_only, &meta).map_err(|e| match e {
                    TwinError::Io(e) => io_err(context(e, "cannot open a buffered descriptor")),
                    TwinError::Changed => unusable(format!(
                        "{} was replaced while it was being opened",
                        path.display()
                    )),
                })?,
            )
        } else {
            None
        };

        // SAFETY: eventfd has no memory arguments; the result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io_err(context(
                io::Error::last_os_error(),
                "cannot create eventfd",
            )));
        }
        // SAFETY: `efd` is a freshly created descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };

        let ring: IoUring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)
            .map_err(|e| io_err(context(e, "cannot set up io_uring")))?;
        check_opcodes(&ring).map_err(unusable)?;
        #[cfg(test)]
        let ring_fd = ring.as_raw_fd();

        let shared = Arc::new(Shared {
            uri: uri.clone(),
            sink,
            eventfd,
            notified: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            death: Mutex::new(None),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let parts = Parts {
            ring,
            shared: Arc::clone(&shared),
            rx,
            main: file,
            twin,
            direct,
            block_size,
        };
        let thread = thread::Builder::new()
            .name("file-leg".into())
            .spawn(move || Engine::new(parts).run())
            .map_err(|e| io_err(context(e, "cannot start the I/O thread")))?;

        log::info!(
            "leg {uri}: opened {} ({capacity} bytes, block size {block_size}, {}{})",
            path.display(),
            if direct { "O_DIRECT" } else { "buffered" },
            if read_only { ", read-only" } else { "" }
        );
        Ok(FileLeg {
            uri,
            info: LegInfo {
                capacity,
                block_size,
                flush: true,
                fua: true,
                discard: true,
                write_zeroes: true,
                read_only,
            },
            direct,
            shared,
            tx: Some(tx),
            thread: Some(thread),
            #[cfg(test)]
            ring_fd,
        })
    }

    /// Checks a request against the leg's size and mode. `Ok(true)` means there is nothing to do.
    fn validate(&self, op: &LegOp) -> Result<bool, LegError> {
        let (offset, len, writes) = match op {
            LegOp::Read { offset, bufs } | LegOp::Write { offset, bufs, .. } => {
                if bufs
                    .iovecs()
                    .iter()
                    .any(|v| v.ptr().is_null() && !v.is_empty())
                {
                    return Err(LegError::Io(libc::EFAULT));
                }
                let writes = matches!(op, LegOp::Write { .. });
                (*offset, bufs.total_len() as u64, writes)
            }
            LegOp::Flush => return Ok(false),
            LegOp::Discard { offset, len } | LegOp::WriteZeroes { offset, len, .. } => {
                (*offset, *len, true)
            }
        };
        if writes && self.info.read_only {
            return Err(LegError::Io(libc::EROFS));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.info.capacity => Ok(len == 0),
            _ => Err(LegError::Io(libc::EINVAL)),
        }
    }
}

impl BlockLeg for FileLeg {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn info(&self) -> &LegInfo {
        &self.info
    }

    fn submit(&self, req: LegRequest) {
        if let Some(err) = self.shared.death() {
            self.shared.complete(req.tag, Err(err));
            return;
        }
        match self.validate(&req.op) {
            Err(e) => return self.shared.complete(req.tag, Err(e)),
            Ok(true) => return self.shared.complete(req.tag, Ok(())),
            Ok(false) => {}
        }
        let Some(tx) = &self.tx else {
            self.shared
                .complete(req.tag, Err(LegError::Lost("leg is closing".into())));
            return;
        };
        match tx.send(req) {
            Ok(()) => self.shared.nudge(),
            Err(SendError(req)) => {
                // Only reachable if the ring thread died abnormally.
                self.shared
                    .kill(LegError::Lost("the I/O thread has exited".into()));
                let err = self
                    .shared
                    .death()
                    .unwrap_or_else(|| LegError::Lost("the I/O thread has exited".into()));
                self.shared.complete(req.tag, Err(err));
            }
        }
    }

    fn abort(&self, reason: &str) {
        if self.shared.kill(LegError::Aborted(reason.to_string())) {
            log::info!("leg {}: aborted: {reason}", self.uri);
        }
        self.shared.wake();
    }

    fn is_alive(&self) -> bool {
        !self.shared.dead.load(Ordering::Acquire)
    }
}

impl Drop for FileLeg {
    fn drop(&mut self) {
        // Dropping the only sender tells the thread no more requests will come; it finishes what
        // is queued and in flight, then exits.
        drop(self.tx.take());
        self.shared.wake();
        if let Some(handle) = self.thread.take() {
            if handle.thread().id() == thread::current().id() {
                // Dropped from inside our own completion callback: the thread cannot wait for
                // itself, and it winds down on its own once this callback returns.
                return;
            }
            if handle.join().is_err() {
                log::error!("leg {}: the I/O thread panicked", self.uri);
            }
        }
    }
}

/// State shared between the leg handle and its ring thread.
struct Shared {
    uri: String,
    sink: Arc<dyn CompletionSink>,
    eventfd: OwnedFd,
    /// Set by a submitter that has written (or is about to write) the eventfd; cleared by the
    /// ring thread when it reads the eventfd. Saves a system call per request under load.
    notified: AtomicBool,
    /// Fast check for `death`.
    dead: AtomicBool,
    /// Why the leg is dead; the first reason wins.
    death: Mutex<Option<LegError>>,
}

impl Shared {
    /// Reports a request's outcome. A panicking sink must not take the ring thread (and every
    /// other request's completion) down with it.
    fn complete(&self, tag: Tag, result: Result<(), LegError>) {
        if catch_unwind(AssertUnwindSafe(|| self.sink.complete(tag, result))).is_err() {
            log::error!(
                "leg {}: completion sink panicked on request {tag}",
                self.uri
            );
        }
    }

    fn death_lock(&self) -> MutexGuard<'_, Option<LegError>> {
        self.death.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The error every request fails with, once the leg is dead.
    fn death(&self) -> Option<LegError> {
        if !self.dead.load(Ordering::Acquire) {
            return None;
        }
        Some(
            self.death_lock()
                .clone()
                .unwrap_or_else(|| LegError::Lost("leg is dead".into())),
        )
    }

    /// Marks the leg dead with `err` unless it already is. Returns whether this call killed it.
    fn kill(&self, err: LegError) -> bool {
        let mut death = self.death_lock();
        if death.is_some() {
            return false;
        }
        *death = Some(err);
        self.dead.store(true, Ordering::Release);
        true
    }

    /// Wakes the ring thread unless a wake-up is already pending.
    fn nudge(&self) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            self.wake();
        }
    }

    /// Wakes the ring thread unconditionally.
    fn wake(&self) {
        let one: u64 = 1;
        loop {
            // SAFETY: writes 8 bytes from a live local to our own eventfd.
            let r = unsafe {
                libc::write(
                    self.eventfd.as_raw_fd(),
                    ptr::addr_of!(one).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
            if r >= 0 {
                return;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                log::error!("leg {}: cannot wake the I/O thread: {err}", self.uri);
                return;
            }
        }
    }
}

/// An owned, aligned heap allocation handed to the kernel as an I/O buffer.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    /// `len` bytes aligned to `align`, zeroed if asked. `None` if the allocation fails.
    fn new(len: usize, align: usize, zeroed: bool) -> Option<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), align).ok()?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe {
            if zeroed {
                alloc::alloc_zeroed(layout)
            } else {
                alloc::alloc(layout)
            }
        };
        NonNull::new(raw).map(|ptr| AlignedBuf { ptr, layout })
    }

    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc`/`alloc_zeroed` with exactly this layout and is freed
        // only here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

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
}

impl Slot {
    fn user_data(&self, idx: usize) -> u64 {
        (u64::from(self.gen) << 32) | idx as u64
    }
}

/// Everything the ring thread needs, built on the opening thread.
struct Parts {
    ring: IoUring,
    shared: Arc<Shared>,
    rx: Receiver<LegRequest>,
    main: File,
    twin: Option<File>,
    direct: bool,
    block_size: u32,
}

/// The ring thread's state. Only that thread touches it, so nothing here is locked.
struct Engine {
    ring: IoUring,
    shared: Arc<Shared>,
    rx: Receiver<LegRequest>,
    main_fd: RawFd,
    twin_fd: Option<RawFd>,
    /// Keeps the descriptors above open.
    _files: (File, Option<File>),
    direct: bool,
    /// O_DIRECT alignment of offsets, lengths and memory.
    align: u64,
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
    punch_unsupported: bool,
    zero_range_unsupported: bool,
    /// The handle is gone: finish what is in flight, then exit.
    closing: bool,
    /// The leg is dead (aborted or lost); new requests fail with this.
    death: Option<LegError>,
    /// The ring itself failed: no more `io_uring_enter`.
    lost: bool,
}

impl Engine {
    fn new(p: Parts) -> Engine {
        let main_fd = p.main.as_raw_fd();
        let twin_fd = p.twin.as_ref().map(|f| f.as_raw_fd());
        Engine {
            ring: p.ring,
            shared: p.shared,
            rx: p.rx,
            main_fd,
            twin_fd,
            _files: (p.main, p.twin),
            direct: p.direct,
            align: u64::from(p.block_size),
            slots: (0..MAX_SLOTS).map(|_| Slot::default()).collect(),
            free: (0..MAX_SLOTS as u32).rev().collect(),
            busy: 0,
            cancels: 0,
            eventfd_buf: Box::new(UnsafeCell::new(0)),
            eventfd_armed: false,
            unconsumed: VecDeque::with_capacity(SQ_ENTRIES as usize * 2),
            cqes: Vec::with_capacity(CQ_ENTRIES as usize),
            zero_buf: None,
            punch_unsupported: false,
            zero_range_unsupported: false,
            closing: false,
            death: None,
            lost: false,
        }
    }

    fn run(mut self) {
        loop {
            self.check_death();
            self.intake();
            if self.lost {
                self.run_lost();
                return;
            }
            if !self.eventfd_armed && !self.closing {
                self.arm_eventfd();
                continue;
            }
            if self.closing && self.busy == 0 && self.cancels == 0 {
                if !self.eventfd_armed {
                    return;
                }
                // The handle's last wake-up may have been eaten by an earlier read (say while
                // every slot was busy and the disconnect went unnoticed), so nobody else will
                // complete this one: do it ourselves, leaving nothing in the kernel at exit.
                self.shared.wake();
            }
            self.enter(1);
            self.reap();
        }
    }

    /// After the ring failed: no more `io_uring_enter`, so completions are picked up by polling
    /// the CQ (the kernel still posts them, running its task work when this thread makes any
    /// system call, such as the sleep). In-flight requests still wait for their CQE.
    fn run_lost(&mut self) {
        let mut nap = Duration::from_millis(1);
        loop {
            let before = self.busy;
            self.reap();
            self.intake();
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

    /// Picks up an abort (or a loss noticed by the handle) and starts cancelling.
    fn check_death(&mut self) {
        if self.death.is_some() {
            return;
        }
        let Some(err) = self.shared.death() else {
            return;
        };
        self.death = Some(err.clone());
        for idx in 0..self.slots.len() {
            let slot = &mut self.slots[idx];
            if !slot.busy {
                continue;
            }
            slot.failure.get_or_insert_with(|| err.clone());
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

    /// Moves queued requests into free slots (or fails them, once the leg is dead).
    fn intake(&mut self) {
        loop {
            if self.death.is_none() && self.free.is_empty() {
                return;
            }
            match self.rx.try_recv() {
                Ok(req) => self.start(req),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.closing = true;
                    return;
                }
            }
        }
    }

    fn start(&mut self, req: LegRequest) {
        if let Some(err) = &self.death {
            let err = err.clone();
            self.shared.complete(req.tag, Err(err));
            return;
        }
        let Some(idx) = self.free.pop() else {
            // `intake` only starts requests when a slot is free.
            self.shared
                .complete(req.tag, Err(LegError::Io(libc::EBUSY)));
            return;
        };
        let idx = idx as usize;
        self.busy += 1;
        let align = self.align;
        let bounce_align = PAGE.max(self.align as usize);
        let direct = self.direct;
        let zero_how = |may_unmap: bool, punch_unsupported: bool, range_unsupported: bool| {
            if may_unmap && !punch_unsupported {
                ZeroHow::Punch
            } else if !range_unsupported {
                ZeroHow::Range
            } else {
                ZeroHow::Fill
            }
        };
        let (punch_unsupported, range_unsupported) =
            (self.punch_unsupported, self.zero_range_unsupported);

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
                slot.kind = Kind::Zero(zero_how(may_unmap, punch_unsupported, range_unsupported));
                slot.offset = offset;
                slot.len = len;
            }
        }
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
            let err = self.death_error();
            self.finish(idx, Err(err));
        }
    }

    fn build_sqe(&mut self, idx: usize) -> Result<squeue::Entry, LegError> {
        if self.slots[idx].kind == Kind::Zero(ZeroHow::Fill) && self.zero_buf.is_none() {
            self.zero_buf = AlignedBuf::new(ZERO_BUF_LEN, PAGE, true);
        }
        let zero_ptr = self.zero_buf.as_ref().map(|b| b.as_ptr());
        let (main, twin, direct, align) = (self.main_fd, self.twin_fd, self.direct, self.align);
        let slot = &mut self.slots[idx];
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
            // SQE's CQE has been reaped.
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

    /// Submits what is queued and waits for `want` completions.
    fn enter(&mut self, want: usize) {
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

    fn arm_eventfd(&mut self) {
        let buf: *mut u8 = self.eventfd_buf.get().cast();
        let entry = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            buf,
            std::mem::size_of::<u64>() as u32,
        )
        .build()
        .user_data(EVENTFD_UD);
        if self.push(&entry, EVENTFD_UD) {
            self.eventfd_armed = true;
        }
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        // One completion batch per reap: the layers above may answer these requests together.
        crate::batch::run(|| {
            for &(ud, res) in &cqes {
                self.on_cqe(ud, res);
            }
        });
        self.cqes = cqes;
    }

    fn on_cqe(&mut self, ud: u64, res: i32) {
        if ud == EVENTFD_UD {
            self.eventfd_armed = false;
            // Pairs with `Shared::nudge`: whoever set the flag after this sees it clear and
            // writes the eventfd again; whoever set it before has its request in the channel,
            // which `intake` drains after this.
            self.shared.notified.swap(false, Ordering::AcqRel);
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
                "leg {}: ignoring a completion for unknown request {ud:#x}",
                self.shared.uri
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
                        self.shared.uri,
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
        let uri = Arc::clone(&self.shared);
        let uri = &uri.uri;
        let slot = &mut self.slots[idx];
        if matches!(errno, libc::EAGAIN | libc::EINTR) && slot.retries < MAX_RETRIES {
            slot.retries += 1;
            return self.issue(idx);
        }
        let unsupported = errno == libc::EOPNOTSUPP;
        match slot.kind {
            Kind::Zero(ZeroHow::Punch) if unsupported || errno == libc::EINVAL => {
                if unsupported && !self.punch_unsupported {
                    self.punch_unsupported = true;
                    log::info!("leg {uri}: cannot punch holes; write-zeroes will zero instead");
                }
                slot.kind = Kind::Zero(if self.zero_range_unsupported {
                    ZeroHow::Fill
                } else {
                    ZeroHow::Range
                });
                self.issue(idx)
            }
            Kind::Zero(ZeroHow::Range) if unsupported || errno == libc::EINVAL => {
                if unsupported && !self.zero_range_unsupported {
                    self.zero_range_unsupported = true;
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
        self.busy = self.busy.saturating_sub(1);
        self.free.push(idx as u32);
        self.shared.complete(tag, result);
    }

    fn death_error(&self) -> LegError {
        self.death
            .clone()
            .unwrap_or_else(|| LegError::Lost("leg is dead".into()))
    }

    /// The ring failed: the leg is lost. Requests the kernel never saw complete now; those it
    /// did complete when their CQE arrives.
    fn lose(&mut self, reason: String) {
        if self.lost {
            return;
        }
        self.lost = true;
        log::error!("leg {}: lost: {reason}", self.shared.uri);
        self.shared.kill(LegError::Lost(reason));
        self.death = self.shared.death();
        let err = self.death_error();
        // We never call io_uring_enter again (and use no SQ polling), so whatever is still in the
        // SQ will never reach the kernel.
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
                    self.finish(idx, Err(err.clone()));
                }
            }
        }
        for slot in self.slots.iter_mut().filter(|s| s.busy) {
            slot.failure.get_or_insert_with(|| err.clone());
        }
    }
}

/// Whether a request needs the bounce buffer: its segments break O_DIRECT's alignment (while
/// its offset and length do not, else the buffered twin takes it), or there are more segments
/// than one `readv`/`writev` accepts.
fn needs_bounce(bufs: &Buffers, offset: u64, direct: bool, align: u64) -> bool {
    if bufs.iovecs().len() > IOV_MAX {
        return true;
    }
    if !direct || !is_aligned(offset | bufs.total_len() as u64, align) {
        return false;
    }
    bufs.iovecs()
        .iter()
        .any(|v| !is_aligned((v.ptr() as usize | v.len()) as u64, align))
}

/// Whether `value` is a multiple of `align`, a power of two (block sizes are checked at open).
fn is_aligned(value: u64, align: u64) -> bool {
    value & (align - 1) == 0
}

fn iovec(base: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    }
}

/// Copies the caller's segments into `bounce`, which holds at least their total length.
fn copy_in(bufs: &Buffers, bounce: &AlignedBuf) {
    let mut pos = 0;
    for v in bufs.iovecs().iter().filter(|v| !v.is_empty()) {
        // SAFETY: `Buffers::push` guarantees each segment is readable for its length until the
        // request completes; `bounce` was allocated with `bufs.total_len()` bytes, so
        // `pos + v.len()` stays inside it; the two never overlap because `bounce` is ours.
        unsafe { ptr::copy_nonoverlapping(v.ptr(), bounce.as_ptr().add(pos), v.len()) };
        pos += v.len();
    }
}

/// Copies a completed read from `bounce` to the caller's segments.
fn copy_out(bounce: &AlignedBuf, bufs: &Buffers) {
    let mut pos = 0;
    for v in bufs.iovecs().iter().filter(|v| !v.is_empty()) {
        // SAFETY: `Buffers::push` guarantees each segment is writable for its length until the
        // request completes (it has not yet); `bounce` holds `bufs.total_len()` bytes that the
        // kernel has finished filling; ours and theirs never overlap.
        unsafe { ptr::copy_nonoverlapping(bounce.as_ptr().add(pos), v.ptr(), v.len()) };
        pos += v.len();
    }
}

fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn open_file(path: &Path, read_only: bool, direct: bool) -> io::Result<File> {
    #[cfg(test)]
    if direct && tests::REFUSE_O_DIRECT.with(|r| r.get()) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(!read_only);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

enum TwinError {
    Io(io::Error),
    Changed,
}

/// A second, buffered descriptor for the very file `file` has open.
fn open_twin(
    file: &File,
    path: &Path,
    read_only: bool,
    meta: &std::fs::Metadata,
) -> Result<File, TwinError> {
    // /proc/self/fd reaches the same inode even if the path was renamed in the meantime.
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let twin = open_file(Path::new(&proc_path), read_only, false)
        .or_else(|_| open_file(path, read_only, false))
        .map_err(TwinError::Io)?;
    let tmeta = twin.metadata().map_err(TwinError::Io)?;
    if tmeta.dev() != meta.dev() || tmeta.ino() != meta.ino() || tmeta.rdev() != meta.rdev() {
        return Err(TwinError::Changed);
    }
    Ok(twin)
}

fn bdev_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 stores one u64 through the pointer, which points at a live local.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKGETSIZE64 as libc::Ioctl,
            ptr::addr_of_mut!(size),
        )
    };
    if r == 0 {
        return Ok(size);
    }
    let err = io::Error::last_os_error();
    // Seeking to the end of a block device also yields its size.
    let mut f = file;
    f.seek(SeekFrom::End(0)).map_err(|_| err)
}

fn bdev_logical_block_size(file: &File) -> io::Result<u32> {
    let mut bs: libc::c_int = 0;
    // SAFETY: BLKSSZGET stores one int through the pointer, which points at a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, ptr::addr_of_mut!(bs)) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(bs).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The smallest O_DIRECT unit the file's file system accepts (512 or 4096), found by reading
/// the first block; `None` if O_DIRECT reads fail with EINVAL even when page-aligned.
fn probe_dio_block_size(file: &File) -> Option<u32> {
    let Some(buf) = AlignedBuf::new(PAGE, PAGE, true) else {
        return Some(512);
    };
    for bs in [512u32, 4096] {
        loop {
            // SAFETY: `buf` is ours and valid for writes of PAGE >= bs bytes.
            let r = unsafe { libc::pread(file.as_raw_fd(), buf.as_ptr().cast(), bs as usize, 0) };
            if r >= 0 {
                return Some(bs);
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EINVAL) => break,
                // Some other failure tells us nothing about alignment; I/O will report it.
                _ => return Some(bs),
            }
        }
    }
    None
}

/// Refuses kernels whose io_uring lacks an operation we depend on.
fn check_opcodes(ring: &IoUring) -> Result<(), String> {
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring is too old (no opcode probe: {e})"))?;
    let needed = [
        ("READV", opcode::Readv::CODE),
        ("WRITEV", opcode::Writev::CODE),
        ("FSYNC", opcode::Fsync::CODE),
        ("FALLOCATE", opcode::Fallocate::CODE),
        ("READ", opcode::Read::CODE),
        ("ASYNC_CANCEL", opcode::AsyncCancel::CODE),
    ];
    for (name, code) in needed {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks IORING_OP_{name}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::path::PathBuf;
    use std::sync::atomic::AtomicU64;
    use std::time::Instant;

    type Done = (Tag, Result<(), LegError>);

    thread_local! {
        /// Makes `open_file` fail O_DIRECT opens with EINVAL on this thread, like a file system
        /// without direct I/O.
        pub(super) static REFUSE_O_DIRECT: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
    }

    struct ChanSink(Sender<Done>);

    impl CompletionSink for ChanSink {
        fn complete(&self, tag: Tag, result: Result<(), LegError>) {
            let _ = self.0.send((tag, result));
        }
    }

    /// A scratch directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(base: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let base = if Path::new(base).is_dir() {
                PathBuf::from(base)
            } else {
                std::env::temp_dir()
            };
            let dir = base.join(format!(
                "vhost-mirror-file-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        /// A real file system, so O_DIRECT works.
        fn real() -> TempDir {
            TempDir::new("/var/tmp")
        }

        /// tmpfs, which refuses O_DIRECT.
        fn tmpfs() -> TempDir {
            TempDir::new("/dev/shm")
        }

        fn file(&self, name: &str, size: u64) -> PathBuf {
            let p = self.0.join(name);
            let f = File::create(&p).unwrap();
            f.set_len(size).unwrap();
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A test buffer, page-aligned, with a page of slack so segments can start at odd addresses.
    struct TBuf {
        buf: AlignedBuf,
        cap: usize,
    }

    impl TBuf {
        fn new(len: usize) -> TBuf {
            let cap = len + PAGE;
            TBuf {
                buf: AlignedBuf::new(cap, PAGE, true).unwrap(),
                cap,
            }
        }

        fn ptr(&self, off: usize) -> *mut u8 {
            assert!(off < self.cap);
            self.buf.as_ptr().wrapping_add(off)
        }

        fn get(&self, off: usize, len: usize) -> Vec<u8> {
            assert!(off + len <= self.cap);
            // SAFETY: in bounds (checked above) and no request is using the buffer now.
            unsafe { std::slice::from_raw_parts(self.ptr(off), len) }.to_vec()
        }

        fn set(&self, off: usize, data: &[u8]) {
            assert!(off + data.len() <= self.cap);
            // SAFETY: in bounds (checked above) and no request is using the buffer now.
            unsafe { ptr::copy_nonoverlapping(data.as_ptr(), self.ptr(off), data.len()) };
        }
    }

    /// Builds `Buffers` from (buffer, offset, length) triples.
    fn buffers(segs: &[(&TBuf, usize, usize)]) -> Buffers {
        let mut b = Buffers::new();
        for &(t, off, len) in segs {
            assert!(off + len <= t.cap);
            // SAFETY: every test keeps its TBufs alive until the request has completed.
            unsafe { b.push(t.ptr(off), len) };
        }
        b
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn open(path: &Path, direct: bool, read_only: bool) -> (FileLeg, Receiver<Done>) {
        try_open(path, direct, read_only).unwrap()
    }

    fn try_open(
        path: &Path,
        direct: bool,
        read_only: bool,
    ) -> Result<(FileLeg, Receiver<Done>), OpenError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let opts = OpenOptions {
            read_only,
            ..OpenOptions::default()
        };
        let uri = format!("file:{}", path.display());
        let leg = FileLeg::open(uri, path, direct, &opts, Arc::new(ChanSink(tx)))?;
        Ok((leg, rx))
    }

    /// Waits for exactly `tags`, each once; panics on a duplicate, a stranger or a timeout.
    fn collect(
        rx: &Receiver<Done>,
        tags: impl IntoIterator<Item = Tag>,
    ) -> HashMap<Tag, Result<(), LegError>> {
        let want: HashSet<Tag> = tags.into_iter().collect();
        let mut got = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.len() < want.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let (tag, result) = rx
                .recv_timeout(left)
                .expect("timed out waiting for completions");
            assert!(want.contains(&tag), "completion for unexpected tag {tag}");
            assert!(
                got.insert(tag, result).is_none(),
                "tag {tag} completed twice"
            );
        }
        assert!(
            rx.recv_timeout(Duration::from_millis(20)).is_err(),
            "completion after all expected tags"
        );
        got
    }

    fn run(leg: &FileLeg, rx: &Receiver<Done>, tag: Tag, op: LegOp) -> Result<(), LegError> {
        leg.submit(LegRequest { tag, op });
        collect(rx, [tag]).remove(&tag).unwrap()
    }

    fn read_into(leg: &FileLeg, rx: &Receiver<Done>, offset: u64, len: usize) -> Vec<u8> {
        let t = TBuf::new(len);
        let bufs = buffers(&[(&t, 0, len)]);
        assert_eq!(run(leg, rx, 9999, LegOp::Read { offset, bufs }), Ok(()));
        t.get(0, len)
    }

    fn write_from(leg: &FileLeg, rx: &Receiver<Done>, offset: u64, data: &[u8]) {
        let t = TBuf::new(data.len());
        t.set(0, data);
        let bufs = buffers(&[(&t, 0, data.len())]);
        let op = LegOp::Write {
            offset,
            bufs,
            fua: false,
        };
        assert_eq!(run(leg, rx, 9998, op), Ok(()));
    }

    #[test]
    fn write_then_read_128_in_flight_multi_segment() {
        const REQS: usize = 128;
        const SEGS: usize = 4;
        const SEG: usize = 4096;
        const REQ_LEN: usize = SEGS * SEG;
        let dir = TempDir::real();
        let path = dir.file("disk.img", (REQS * REQ_LEN) as u64);
        let wbufs: Vec<Vec<TBuf>> = (0..REQS)
            .map(|_| (0..SEGS).map(|_| TBuf::new(SEG)).collect())
            .collect();
        let rbufs: Vec<Vec<TBuf>> = (0..REQS)
            .map(|_| (0..SEGS).map(|_| TBuf::new(SEG)).collect())
            .collect();
        let (leg, rx) = open(&path, true, false);
        assert!(leg.direct, "O_DIRECT should work on a real file system");
        assert!(leg.is_alive());
        assert_eq!(leg.info().capacity, (REQS * REQ_LEN) as u64);
        assert_eq!(leg.info().block_size, 512);
        assert!(!leg.info().read_only);

        let mut expected = vec![0u8; REQS * REQ_LEN];
        for (i, segs) in wbufs.iter().enumerate() {
            let data = pattern(i as u64, REQ_LEN);
            expected[i * REQ_LEN..(i + 1) * REQ_LEN].copy_from_slice(&data);
            for (s, t) in segs.iter().enumerate() {
                t.set(0, &data[s * SEG..(s + 1) * SEG]);
            }
            let segs: Vec<_> = segs.iter().map(|t| (t, 0, SEG)).collect();
            leg.submit(LegRequest {
                tag: i as Tag,
                op: LegOp::Write {
                    offset: (i * REQ_LEN) as u64,
                    bufs: buffers(&segs),
                    fua: i % 8 == 0,
                },
            });
        }
        let done = collect(&rx, 0..REQS as Tag);
        assert!(done.values().all(|r| r.is_ok()), "{done:?}");

        for (i, segs) in rbufs.iter().enumerate() {
            let segs: Vec<_> = segs.iter().map(|t| (t, 0, SEG)).collect();
            leg.submit(LegRequest {
                tag: 1000 + i as Tag,
                op: LegOp::Read {
                    offset: (i * REQ_LEN) as u64,
                    bufs: buffers(&segs),
                },
            });
        }
        let done = collect(&rx, (0..REQS as Tag).map(|i| 1000 + i));
        assert!(done.values().all(|r| r.is_ok()), "{done:?}");
        for (i, segs) in rbufs.iter().enumerate() {
            let got: Vec<u8> = segs.iter().flat_map(|t| t.get(0, SEG)).collect();
            assert!(
                got == expected[i * REQ_LEN..(i + 1) * REQ_LEN],
                "request {i} read back different data"
            );
        }
        drop(leg);
        assert!(
            std::fs::read(&path).unwrap() == expected,
            "file contents differ"
        );
    }

    #[test]
    fn unaligned_buffers_go_through_bounce() {
        let dir = TempDir::real();
        let path = dir.file("disk.img", 1 << 20);
        let (a, b, c) = (TBuf::new(4096), TBuf::new(4096), TBuf::new(4096));
        let (r1, r2, r3) = (TBuf::new(4096), TBuf::new(8192), TBuf::new(4096));
        let (leg, rx) = open(&path, true, false);
        assert!(leg.direct);

        // 100 + 4000 + 4092 = 8192 bytes at an aligned offset, from odd addresses.
        let data = pattern(7, 8192);
        a.set(1, &data[..100]);
        b.set(3, &data[100..4100]);
        c.set(5, &data[4100..]);
        let bufs = buffers(&[(&a, 1, 100), (&b, 3, 4000), (&c, 5, 4092)]);
        let op = LegOp::Write {
            offset: 4096,
            bufs,
            fua: false,
        };
        assert_eq!(run(&leg, &rx, 1, op), Ok(()));

        // Read it back split differently, again at odd addresses.
        let bufs = buffers(&[(&r1, 7, 1000), (&r2, 9, 5000), (&r3, 11, 2192)]);
        let op = LegOp::Read { offset: 4096, bufs };
        assert_eq!(run(&leg, &rx, 2, op), Ok(()));
        let mut got = r1.get(7, 1000);
        got.extend(r2.get(9, 5000));
        got.extend(r3.get(11, 2192));
        assert!(got == data, "bounced read differs");
        assert!(read_into(&leg, &rx, 4096, 8192) == data);
        drop(leg);
        assert!(std::fs::read(&path).unwrap()[4096..12288] == data[..]);
    }

    #[test]
    fn unaligned_offset_and_length_use_buffered_descriptor() {
        let dir = TempDir::real();
        let path = dir.file("disk.img", 1 << 20);
        let (leg, rx) = open(&path, true, false);
        assert!(leg.direct);
        let data = pattern(3, 1000);
        write_from(&leg, &rx, 700, &data);
        // Unaligned read of the same range, then an aligned (O_DIRECT) read around it.
        assert!(read_into(&leg, &rx, 700, 1000) == data);
        let page = read_into(&leg, &rx, 0, 4096);
        assert!(page[..700].iter().all(|&b| b == 0));
        assert!(page[700..1700] == data[..]);
        assert!(page[1700..].iter().all(|&b| b == 0));
        // An aligned O_DIRECT write over it, read back unaligned.
        let data2 = pattern(4, 4096);
        write_from(&leg, &rx, 0, &data2);
        assert!(read_into(&leg, &rx, 513, 99) == data2[513..612]);
    }

    #[test]
    fn more_segments_than_iov_max() {
        const SEGS: usize = 1100;
        let dir = TempDir::real();
        let path = dir.file("disk.img", 1 << 20);
        let w = TBuf::new(SEGS * 512);
        let r = TBuf::new(SEGS * 512);
        let (leg, rx) = open(&path, true, false);
        let data = pattern(11, SEGS * 512);
        w.set(0, &data);
        let segs: Vec<_> = (0..SEGS).map(|i| (&w, i * 512, 512)).collect();
        let op = LegOp::Write {
            offset: 0,
            bufs: buffers(&segs),
            fua: false,
        };
        assert_eq!(run(&leg, &rx, 1, op), Ok(()));
        let segs: Vec<_> = (0..SEGS).map(|i| (&r, i * 512, 512)).collect();
        let op = LegOp::Read {
            offset: 0,
            bufs: buffers(&segs),
        };
        assert_eq!(run(&leg, &rx, 2, op), Ok(()));
        assert!(r.get(0, SEGS * 512) == data);
    }

    #[test]
    fn fua_write_and_flush() {
        let dir = TempDir::real();
        let path = dir.file("disk.img", 1 << 20);
        let t = TBuf::new(8192);
        let (leg, rx) = open(&path, true, false);
        let data = pattern(5, 8192);
        t.set(0, &data);
        let op = LegOp::Write {
            offset: 65536,
            bufs: buffers(&[(&t, 0, 8192)]),
            fua: true,
        };
        assert_eq!(run(&leg, &rx, 1, op), Ok(()));
        assert_eq!(run(&leg, &rx, 2, LegOp::Flush), Ok(()));
        assert!(read_into(&leg, &rx, 65536, 8192) == data);
        // Flush on a buffered leg too.
        let (leg2, rx2) = open(&path, false, false);
        assert!(!leg2.direct);
        assert_eq!(run(&leg2, &rx2, 3, LegOp::Flush), Ok(()));
    }

    fn check_zeroing(leg: &FileLeg, rx: &Receiver<Done>) {
        let size = leg.info().capacity as usize;
        let data = pattern(9, size);
        write_from(leg, rx, 0, &data);
        let mut expected = data.clone();
        let ops = [
            (
                65536u64,
                65536u64,
                LegOp::Discard {
                    offset: 65536,
                    len: 65536,
                },
            ),
            (
                196608,
                65536,
                LegOp::WriteZeroes {
                    offset: 196608,
                    len: 65536,
                    may_unmap: false,
                },
            ),
            (
                327680,
                65536,
                LegOp::WriteZeroes {
                    offset: 327680,
                    len: 65536,
                    may_unmap: true,
                },
            ),
            (
                1000,
                3000,
                LegOp::WriteZeroes {
                    offset: 1000,
                    len: 3000,
                    may_unmap: false,
                },
            ),
        ];
        for (i, (offset, len, op)) in ops.into_iter().enumerate() {
            let discard = matches!(op, LegOp::Discard { .. });
            match run(leg, rx, 100 + i as Tag, op) {
                Ok(()) => expected[offset as usize..(offset + len) as usize].fill(0),
                // A file system without hole punching (ramfs) cannot discard; nothing changes.
                Err(LegError::Unsupported) if discard => {}
                other => panic!("op {i}: {other:?}"),
            }
        }
        // A write-zeroes larger than one zero-fill SQE (8 MiB) when the fallback is used.
        if size > (9 << 20) {
            let op = LegOp::WriteZeroes {
                offset: 1 << 20,
                len: (9 << 20) + 512,
                may_unmap: false,
            };
            assert_eq!(run(leg, rx, 200, op), Ok(()));
            expected[1 << 20..(10 << 20) + 512].fill(0);
        }
        let got = read_into(leg, rx, 0, size);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g, e, "byte {i} differs");
        }
    }

    #[test]
    fn discard_and_write_zeroes_read_back_zeroes() {
        let dir = TempDir::real();
        let path = dir.file("disk.img", 12 << 20);
        let (leg, rx) = open(&path, true, false);
        assert!(leg.direct);
        check_zeroing(&leg, &rx);
    }

    /// Writes, reads, flushes and zeroes on a leg whose file system has no ZERO_RANGE.
    fn check_buffered_leg(leg: &FileLeg, rx: &Receiver<Done>) {
        assert_eq!(leg.info().block_size, 512);
        // Unaligned address, offset and length.
        let t = TBuf::new(4096);
        let data = pattern(1, 3000);
        t.set(17, &data);
        let op = LegOp::Write {
            offset: 12345,
            bufs: buffers(&[(&t, 17, 3000)]),
            fua: true,
        };
        assert_eq!(run(leg, rx, 1, op), Ok(()));
        assert_eq!(run(leg, rx, 2, LegOp::Flush), Ok(()));
        assert!(read_into(leg, rx, 12345, 3000) == data);
        // tmpfs and ramfs have no ZERO_RANGE, so this also covers writing zeroes by hand.
        check_zeroing(leg, rx);
        assert!(leg.is_alive());
    }

    #[test]
    fn tmpfs_leg_works() {
        let dir = TempDir::tmpfs();
        let path = dir.file("disk.img", 12 << 20);
        let (leg, rx) = open(&path, true, false);
        // Before Linux 6.6 tmpfs refuses O_DIRECT and the leg falls back; since then it accepts
        // it. Either way the leg must work.
        check_buffered_leg(&leg, &rx);
    }

    #[test]
    fn refused_o_direct_falls_back_to_buffered_io() {
        let dir = TempDir::tmpfs();
        let path = dir.file("disk.img", 12 << 20);
        REFUSE_O_DIRECT.with(|r| r.set(true));
        let opened = try_open(&path, true, false);
        REFUSE_O_DIRECT.with(|r| r.set(false));
        let (leg, rx) = opened.unwrap();
        assert!(!leg.direct, "the leg must fall back to buffered I/O");
        check_buffered_leg(&leg, &rx);
    }

    /// Mounts a ramfs (which has no O_DIRECT): needs root, as the test suite does.
    #[test]
    fn ramfs_refuses_o_direct() {
        let dir = TempDir::real();
        let status = std::process::Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(&dir.0)
            .status()
            .unwrap();
        assert!(status.success(), "mount failed");
        let result = std::panic::catch_unwind(|| {
            let path = dir.file("disk.img", 12 << 20);
            let (leg, rx) = open(&path, true, false);
            assert!(
                !leg.direct,
                "ramfs refuses O_DIRECT, the leg must fall back"
            );
            check_buffered_leg(&leg, &rx);
        });
        let _ = std::process::Command::new("umount").arg(&dir.0).status();
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }

    #[test]
    fn out_of_range_requests_are_einval() {
        let dir = TempDir::real();
        let path = dir.file("disk.img", 1 << 20);
        let t = TBuf::new(4096);
        let (leg, rx) = open(&path, true, false);
        let cap = leg.info().capacity;
        let einval = Err(LegError::Io(libc::EINVAL));
        let ops = vec![
            LegOp::Read {
                offset: cap - 512,
                bufs: buffers(&[(&t, 0, 1024)]),
            },
            LegOp::Write {
                offset: cap,
                bufs: buffers(&[(&t, 0, 512)]),
                fua: false,
            },
            LegOp::Read {
                offset: u64::MAX - 100,
                bufs: buffers(&[(&t, 0, 512)]),
            },
            LegOp::Discard {
                offset: cap - 4096,
                len: 8192,
            },
            LegOp::WriteZeroes {
                offset: u64::MAX,
                len: 1,
                may_unmap: false,
            },
        ];
        for (i, op) in ops.into_iter().enumerate() {
            assert_eq!(run(&leg, &rx, i as Tag, op), einval, "op {i}");
        }
        // The last block and an empty request at the very end are fine.
        let op = LegOp::Read {
            offset: cap - 4096,
            bufs: buffers(&[(&t, 0, 4096)]),
        };
        assert_eq!(run(&leg, &rx, 10, op), Ok(()));
        let op = LegOp::Read {
            offset: cap,
            bufs: Buffers::new(),
        };
        assert_eq!(run(&leg, &rx, 11, op), Ok(()));
        assert!(leg.is_alive());
    }

    #[test]
    fn read_only_leg_refuses_writes() {
        let dir = TempDir::real();
        let path = dir.file("disk.img", 1 << 20);
        let t = TBuf::new(4096);
        let (leg, rx) = open(&path, true, true);
        assert!(leg.info().read_only);
        let erofs = Err(LegError::Io(libc::EROFS));
        let op = LegOp::Write {
            offset: 0,
            bufs: buffers(&[(&t, 0, 4096)]),
            fua: false,
        };
        assert_eq!(run(&leg, &rx, 1, op), erofs);
        let op = LegOp::Discard {
            offset: 0,
            len: 4096,
        };
        assert_eq!(run(&leg, &rx, 2, op), erofs);
        let op = LegOp::WriteZeroes {
            offset: 0,
            len: 4096,
            may_unmap: true,
        };
        assert_eq!(run(&leg, &rx, 3, op), erofs);
        let op = LegOp::Read {
            offset: 0,
            bufs: buffers(&[(&t, 0, 4096)]),
        };
        assert_eq!(run(&leg, &rx, 4, op), Ok(()));
        assert_eq!(run(&leg, &rx, 5, LegOp::Flush), Ok(()));
        assert!(leg.is_alive());
    }

    #[test]
    fn abort_fails_in_flight_and_later_requests() {
        const REQS: usize = 200;
        const LEN: usize = 256 << 10;
        let dir = TempDir::real();
        let path = dir.file("disk.img", (REQS * LEN) as u64);
        let bufs: Vec<TBuf> = (0..REQS).map(|_| TBuf::new(LEN)).collect();
        let (leg, rx) = open(&path, true, false);
        for (i, t) in bufs.iter().enumerate() {
            let op = if i % 2 == 0 {
                LegOp::Read {
                    offset: (i * LEN) as u64,
                    bufs: buffers(&[(t, 0, LEN)]),
                }
            } else {
                LegOp::Write {
                    offset: (i * LEN) as u64,
                    bufs: buffers(&[(t, 0, LEN)]),
                    fua: true,
                }
            };
            leg.submit(LegRequest { tag: i as Tag, op });
        }
        // Once one request has completed the ring thread has the others in flight, so the abort
        // has to cancel them in the kernel rather than just drop them from the queue.
        let (first, _) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        leg.abort("test abort");
        assert!(!leg.is_alive());
        let mut done = collect(&rx, (0..REQS as Tag).filter(|&t| t != first));
        done.insert(first, Ok(()));
        let aborted = Err(LegError::Aborted("test abort".into()));
        for (tag, r) in &done {
            assert!(r.is_ok() || *r == aborted, "tag {tag}: {r:?}");
        }
        // Later requests fail at once, with the first reason.
        leg.abort("second abort");
        assert_eq!(run(&leg, &rx, 1000, LegOp::Flush), aborted);
        let op = LegOp::Read {
            offset: 0,
            bufs: buffers(&[(&bufs[0], 0, 512)]),
        };
        assert_eq!(run(&leg, &rx, 1001, op), aborted);
        assert!(!leg.is_alive());
    }

    #[test]
    fn drop_completes_everything_in_flight() {
        const REQS: usize = 300;
        let dir = TempDir::real();
        let path = dir.file("disk.img", (REQS * 4096) as u64);
        let bufs: Vec<TBuf> = (0..REQS).map(|_| TBuf::new(4096)).collect();
        let (leg, rx) = open(&path, true, false);
        for (i, t) in bufs.iter().enumerate() {
            t.set(0, &pattern(i as u64, 4096));
            let op = LegOp::Write {
                offset: (i * 4096) as u64,
                bufs: buffers(&[(t, 0, 4096)]),
                fua: false,
            };
            leg.submit(LegRequest { tag: i as Tag, op });
        }
        drop(leg);
        let mut seen = HashSet::new();
        for (tag, r) in rx.try_iter() {
            assert!(seen.insert(tag), "tag {tag} completed twice");
            assert_eq!(r, Ok(()), "tag {tag}");
        }
        assert_eq!(seen.len(), REQS);
        let file = std::fs::read(&path).unwrap();
        for i in 0..REQS {
            assert!(file[i * 4096..(i + 1) * 4096] == pattern(i as u64, 4096)[..]);
        }
    }

    #[test]
    fn concurrent_submitters() {
        const PER_THREAD: usize = 2000;
        const THREADS: usize = 2;
        let dir = TempDir::real();
        let path = dir.file("disk.img", (THREADS * PER_THREAD * 512) as u64);
        let bufs: Vec<TBuf> = (0..THREADS).map(|_| TBuf::new(PER_THREAD * 512)).collect();
        let (leg, rx) = open(&path, true, false);
        let mut expected = vec![0u8; THREADS * PER_THREAD * 512];
        for (n, t) in bufs.iter().enumerate() {
            let data = pattern(100 + n as u64, PER_THREAD * 512);
            t.set(0, &data);
            let start = n * PER_THREAD * 512;
            expected[start..start + data.len()].copy_from_slice(&data);
        }
        // Buffers are built here because test buffers are not `Sync`; `Buffers` is `Send`.
        let per_thread: Vec<Vec<Buffers>> = bufs
            .iter()
            .map(|t| {
                (0..PER_THREAD)
                    .map(|i| buffers(&[(t, i * 512, 512)]))
                    .collect()
            })
            .collect();
        thread::scope(|s| {
            for (n, list) in per_thread.into_iter().enumerate() {
                let leg = &leg;
                s.spawn(move || {
                    for (i, bufs) in list.into_iter().enumerate() {
                        let tag = (n * PER_THREAD + i) as Tag;
                        let op = LegOp::Write {
                            offset: tag * 512,
                            bufs,
                            fua: false,
                        };
                        leg.submit(LegRequest { tag, op });
                    }
                });
            }
        });
        let done = collect(&rx, 0..(THREADS * PER_THREAD) as Tag);
        assert!(done.values().all(|r| r.is_ok()));
        drop(leg);
        assert!(std::fs::read(&path).unwrap() == expected);
    }

    #[test]
    fn short_read_at_eof_is_eio_and_leg_survives() {
        let dir = TempDir::real();
        let path = dir.file("disk.img", 1 << 20);
        let t = TBuf::new(8192);
        let (leg, rx) = open(&path, true, false);
        // The file shrinks behind the leg's back.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let op = LegOp::Read {
            offset: 0,
            bufs: buffers(&[(&t, 0, 8192)]),
        };
        assert_eq!(run(&leg, &rx, 1, op), Err(LegError::Io(libc::EIO)));
        assert!(leg.is_alive(), "an I/O error must not kill the leg");
        let op = LegOp::Read {
            offset: 0,
            bufs: buffers(&[(&t, 0, 4096)]),
        };
        assert_eq!(run(&leg, &rx, 2, op), Ok(()));
    }

    #[test]
    fn ring_failure_loses_the_leg() {
        const REQS: usize = 64;
        const LEN: usize = 1 << 20;
        let dir = TempDir::real();
        let path = dir.file("disk.img", (REQS * LEN) as u64);
        let bufs: Vec<TBuf> = (0..REQS).map(|_| TBuf::new(LEN)).collect();
        let (leg, rx) = open(&path, true, false);
        for (i, t) in bufs.iter().enumerate() {
            let op = LegOp::Write {
                offset: (i * LEN) as u64,
                bufs: buffers(&[(t, 0, LEN)]),
                fua: true,
            };
            leg.submit(LegRequest { tag: i as Tag, op });
        }
        // Wait until the ring thread has handed the writes to the kernel (one has completed),
        // so some are in flight when the ring breaks.
        let (first, first_result) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(first_result, Ok(()));
        // Replace the ring's descriptor with /dev/null: the next io_uring_enter fails.
        let null = File::open("/dev/null").unwrap();
        // SAFETY: both descriptors are open; dup2 only swaps what `ring_fd` refers to, and the
        // ring stays alive through its memory mappings.
        assert!(unsafe { libc::dup2(null.as_raw_fd(), leg.ring_fd) } >= 0);
        let op = LegOp::Read {
            offset: 0,
            bufs: buffers(&[(&bufs[0], 0, 512)]),
        };
        leg.submit(LegRequest { tag: 500, op });
        let mut done = collect(&rx, (0..REQS as Tag).filter(|&t| t != first).chain([500]));
        assert!(
            matches!(done.remove(&500), Some(Err(LegError::Lost(_)))),
            "a request after the failure is lost"
        );
        for (tag, r) in &done {
            assert!(
                r.is_ok() || matches!(r, Err(LegError::Lost(_))),
                "tag {tag}: {r:?}"
            );
        }
        assert!(!leg.is_alive());
        assert!(matches!(
            run(&leg, &rx, 501, LegOp::Flush),
            Err(LegError::Lost(_))
        ));
        drop(leg);
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let dir = TempDir::real();
        let path = dir.0.join("does-not-exist.img");
        match try_open(&path, true, false) {
            Err(e @ OpenError::Io { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&path.display().to_string()), "{msg}");
                match e {
                    OpenError::Io { source, .. } => {
                        assert_eq!(source.kind(), io::ErrorKind::NotFound)
                    }
                    _ => unreachable!(),
                }
            }
            other => panic!("expected OpenError::Io, got {other:?}"),
        }
    }

    #[test]
    fn unusable_files() {
        let dir = TempDir::real();
        let empty = dir.file("empty.img", 0);
        assert!(matches!(
            try_open(&empty, true, false),
            Err(OpenError::Unusable { .. })
        ));
        assert!(matches!(
            try_open(&dir.0, false, true),
            Err(OpenError::Unusable { .. })
        ));
    }

    /// A loop device: needs root, as the test suite does.
    #[test]
    fn block_device_through_loop() {
        let dir = TempDir::real();
        let path = dir.file("backing.img", 16 << 20);
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup failed: {out:?}");
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let result = std::panic::catch_unwind(|| {
            let (leg, rx) = open(&dev, true, false);
            assert!(leg.direct);
            assert_eq!(leg.info().capacity, 16 << 20);
            assert_eq!(leg.info().block_size, 512);
            let data = pattern(42, 1 << 20);
            write_from(&leg, &rx, 4096, &data);
            assert_eq!(run(&leg, &rx, 1, LegOp::Flush), Ok(()));
            assert!(read_into(&leg, &rx, 4096, 1 << 20) == data);
            // Unaligned segments (bounce) and unaligned offset (buffered descriptor).
            let t = TBuf::new(4096);
            let op = LegOp::Read {
                offset: 4096,
                bufs: buffers(&[(&t, 1, 4096)]),
            };
            assert_eq!(run(&leg, &rx, 2, op), Ok(()));
            assert!(t.get(1, 4096) == data[..4096]);
            assert!(read_into(&leg, &rx, 4096 + 100, 300) == data[100..400]);
            let op = LegOp::WriteZeroes {
                offset: 8192,
                len: 8192,
                may_unmap: false,
            };
            assert_eq!(run(&leg, &rx, 3, op), Ok(()));
            assert!(read_into(&leg, &rx, 8192, 8192).iter().all(|&b| b == 0));
            let op = LegOp::Discard {
                offset: 1 << 20,
                len: 1 << 20,
            };
            let r = run(&leg, &rx, 4, op);
            assert!(r.is_ok() || r == Err(LegError::Unsupported), "{r:?}");
        });
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&dev)
            .status();
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }
}
