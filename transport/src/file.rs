//! Local file or block device leg, driven through io_uring.
//!
//! Each leg owns one ring and one thread. [`FileLeg::submit`] only validates a request, queues it
//! on a channel and pokes an eventfd. The ring thread keeps a read of that eventfd armed inside
//! the ring, so one `io_uring_enter` sleeps until either a new request or an I/O completion
//! arrives. Every pass of the thread turns all queued requests into SQEs, submits them with one
//! system call and reaps every CQE that is ready. A thread that owns a [`Reactor`] (a
//! virtqueue's worker) skips that thread: inside [`Reactor::enter`] its requests go into the
//! reactor's ring, and it submits and reaps them itself (see [`reactor`]). Both drive the same
//! engine (`file/engine.rs`), which keeps every buffer alive until the kernel is done with it.
//!
//! With O_DIRECT, requests whose buffers are aligned go straight from guest memory to the device.
//! Requests whose offset and length are aligned but whose segments are not go through an aligned
//! bounce buffer. Requests whose offset or length is not aligned cannot be done with O_DIRECT
//! without a read-modify-write that would race with neighbouring writes, so they go through a
//! second, buffered descriptor of the same file, where the page cache serialises partial blocks;
//! `fdatasync` on either descriptor flushes the inode, so flush still covers them.

mod engine;
pub mod reactor;

use std::alloc::{self, Layout};
use std::fmt;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};

use crossbeam_channel::{SendError, Sender};
use io_uring::{opcode, IoUring, Probe};
use vmm_sys_util::eventfd::EventFd;

use crate::block::{BlockLeg, Buffers, CompletionSink, LegError, LegInfo, LegOp, LegRequest, Tag};
use crate::{OpenError, OpenOptions};
use engine::{Engine, Own};
use reactor::Kick;
pub use reactor::Reactor;

/// Submission queue size.
const SQ_ENTRIES: u32 = 256;
/// Completion queue size. At most `MAX_SLOTS` requests, one cancel per request and the eventfd
/// read can have a CQE pending at once (513), so the CQ can never overflow.
const CQ_ENTRIES: u32 = 1024;
/// Requests in flight at once in one ring; the rest wait in the channel.
const MAX_SLOTS: usize = 256;
/// Most iovecs one `readv`/`writev` accepts (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
/// Memory alignment of bounce buffers (at least one page).
const PAGE: usize = 4096;

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
    info: LegInfo,
    shared: Arc<Shared>,
    /// `None` only while dropping.
    tx: Option<Sender<LegRequest>>,
    thread: Option<JoinHandle<()>>,
    /// The ring's descriptor, so tests can break the ring from outside.
    #[cfg(test)]
    ring_fd: std::os::fd::RawFd,
}

impl fmt::Debug for FileLeg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLeg")
            .field("uri", &self.shared.uri)
            .field("info", &self.info)
            .field("direct", &self.direct())
            .field("alive", &self.is_alive())
            .finish()
    }
}

impl FileLeg {
    /// Whether the main descriptor uses O_DIRECT (false after a fallback).
    fn direct(&self) -> bool {
        self.shared.direct
    }

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

        let eventfd = EventFd::new(libc::EFD_CLOEXEC)
            .map_err(|e| io_err(context(e, "cannot create eventfd")))?;

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
            main: file,
            twin,
            direct,
            align: u64::from(block_size),
            punch_unsupported: AtomicBool::new(false),
            zero_range_unsupported: AtomicBool::new(false),
            watchers: Mutex::new(Vec::new()),
            held: AtomicUsize::new(0),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let own = Own {
            shared: Arc::clone(&shared),
            rx,
        };
        let thread = thread::Builder::new()
            .name("file-leg".into())
            .spawn(move || Engine::for_leg(ring, own).run())
            .map_err(|e| io_err(context(e, "cannot start the I/O thread")))?;

        log::info!(
            "leg {uri}: opened {} ({capacity} bytes, block size {block_size}, {}{})",
            path.display(),
            if direct { "O_DIRECT" } else { "buffered" },
            if read_only { ", read-only" } else { "" }
        );
        Ok(FileLeg {
            info: LegInfo {
                capacity,
                block_size,
                flush: true,
                fua: true,
                discard: true,
                write_zeroes: true,
                read_only,
            },
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
        &self.shared.uri
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
        let Some(req) = Reactor::submit_here(&self.shared, req) else {
            return;
        };
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
            log::info!("leg {}: aborted: {reason}", self.shared.uri);
        }
        self.shared.wake();
    }

    fn is_alive(&self) -> bool {
        !self.shared.dead.load(Ordering::Acquire)
    }

    /// Requests of this leg may sit in reactors' rings as well as in its own, and the handle's
    /// drop waits only for its own thread: whoever repairs the file through a new handle waits
    /// here until the kernel is done with all of them.
    fn wait_quiet(&self, timeout: std::time::Duration) -> bool {
        let start = std::time::Instant::now();
        while self.shared.held.load(Ordering::Acquire) > 0 {
            if start.elapsed() >= timeout {
                return false;
            }
            thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }
}

impl Drop for FileLeg {
    fn drop(&mut self) {
        // Dropping the only sender tells the thread no more requests will come; it finishes what
        // is queued and in flight, then exits. Requests reactors hold finish there, keeping the
        // files open meanwhile (`wait_quiet` waits for them).
        drop(self.tx.take());
        self.shared.wake();
        if let Some(handle) = self.thread.take() {
            if handle.thread().id() == thread::current().id() {
                // Dropped from inside our own completion callback: the thread cannot wait for
                // itself, and it winds down on its own once this callback returns.
                return;
            }
            if handle.join().is_err() {
                log::error!("leg {}: the I/O thread panicked", self.shared.uri);
            }
        }
    }
}

/// The leg itself, shared by its handle, its ring thread and every reactor holding one of its
/// requests (which keeps the descriptors open while the kernel may use them).
struct Shared {
    uri: String,
    sink: Arc<dyn CompletionSink>,
    /// Wakes the leg's own ring thread.
    eventfd: EventFd,
    /// Set by a submitter that has written (or is about to write) the eventfd; cleared by the
    /// ring thread when it reads the eventfd. Saves a system call per request under load.
    notified: AtomicBool,
    /// Fast check for `death`.
    dead: AtomicBool,
    /// Why the leg is dead; the first reason wins.
    death: Mutex<Option<LegError>>,
    main: File,
    /// The buffered descriptor of the same file that takes what O_DIRECT cannot.
    twin: Option<File>,
    /// Whether `main` uses O_DIRECT.
    direct: bool,
    /// O_DIRECT alignment of offsets, lengths and memory.
    align: u64,
    /// Learned from the file system: write-zeroes stops trying these.
    punch_unsupported: AtomicBool,
    zero_range_unsupported: AtomicBool,
    /// Reactors that have taken requests of this leg, woken when it dies.
    watchers: Mutex<Vec<Weak<Kick>>>,
    /// Requests of this leg the kernel may still be working on, in any ring.
    held: AtomicUsize,
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

    /// Marks the leg dead with `err` unless it already is, and wakes the reactors holding its
    /// requests. Returns whether this call killed it.
    fn kill(&self, err: LegError) -> bool {
        {
            let mut death = self.death_lock();
            if death.is_some() {
                return false;
            }
            *death = Some(err);
            self.dead.store(true, Ordering::Release);
        }
        let watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for kick in watchers.iter().filter_map(Weak::upgrade) {
            kick.fire();
        }
        true
    }

    /// Has `kick` fired when this leg dies.
    fn watch(&self, kick: &Arc<Kick>) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        watchers.retain(|w| w.strong_count() > 0);
        watchers.push(Arc::downgrade(kick));
    }

    /// Wakes the ring thread unless a wake-up is already pending.
    fn nudge(&self) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            self.wake();
        }
    }

    /// Wakes the ring thread unconditionally.
    fn wake(&self) {
        loop {
            match self.eventfd.write(1) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::error!("leg {}: cannot wake the I/O thread: {e}", self.uri);
                    return;
                }
                Ok(()) => return,
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
    use crossbeam_channel::Receiver;
    use std::collections::{HashMap, HashSet};
    use std::path::PathBuf;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;
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
        assert!(leg.direct(), "O_DIRECT should work on a real file system");
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
        assert!(leg.direct());

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
        assert!(leg.direct());
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
        assert!(!leg2.direct());
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
        assert!(leg.direct());
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
        assert!(!leg.direct(), "the leg must fall back to buffered I/O");
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
                !leg.direct(),
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
            assert!(leg.direct());
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

    type ThreadDone = (Tag, Result<(), LegError>, thread::ThreadId);

    /// Records the thread each request completed on; may submit a follow-up on a completion.
    struct ThreadSink {
        tx: Sender<ThreadDone>,
        /// On the completion of the first tag, submits the request to the leg.
        follow_up: Mutex<Option<(Tag, std::sync::Weak<FileLeg>, LegRequest)>>,
    }

    impl CompletionSink for ThreadSink {
        fn complete(&self, tag: Tag, result: Result<(), LegError>) {
            let _ = self.tx.send((tag, result, thread::current().id()));
            let next = {
                let mut f = self.follow_up.lock().unwrap();
                match f.as_ref() {
                    Some((after, _, _)) if *after == tag => f.take(),
                    _ => None,
                }
            };
            if let Some((_, leg, req)) = next {
                leg.upgrade().unwrap().submit(req);
            }
        }
    }

    fn thread_sink() -> (Arc<ThreadSink>, Receiver<ThreadDone>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let sink = Arc::new(ThreadSink {
            tx,
            follow_up: Mutex::new(None),
        });
        (sink, rx)
    }

    fn open_with(path: &Path, sink: &Arc<ThreadSink>) -> FileLeg {
        let uri = format!("file:{}", path.display());
        let sink: Arc<dyn CompletionSink> = sink.clone();
        FileLeg::open(uri, path, true, &OpenOptions::default(), sink).unwrap()
    }

    /// Polls `reactor` as its owner's event loop would, when its fd is readable, until `n`
    /// completions have arrived.
    fn poll_until(reactor: &Reactor, rx: &Receiver<ThreadDone>, n: usize) -> Vec<ThreadDone> {
        let mut got: Vec<ThreadDone> = rx.try_iter().collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} completions",
                got.len()
            );
            // Only when its fd says so: a request the reactor failed to hand to the kernel
            // would never make it readable, and the owner would sleep on.
            if reactor.wait(Duration::from_millis(100)) {
                reactor.poll();
            }
            got.extend(rx.try_iter());
        }
        got
    }

    /// Inside `reactor`: one FUA write of `len` bytes from each buffer, buffer `i` at offset
    /// `i * len` with tag `i`.
    fn fua_writes(reactor: &Reactor, leg: &FileLeg, bufs: &[TBuf], len: usize) {
        reactor.enter(|| {
            for (i, t) in bufs.iter().enumerate() {
                let op = LegOp::Write {
                    offset: (i * len) as u64,
                    bufs: buffers(&[(t, 0, len)]),
                    fua: true,
                };
                leg.submit(LegRequest { tag: i as Tag, op });
            }
        });
    }

    /// [`fua_writes`] until the reactor still holds some of them after the submitting pass,
    /// which reaps until a look finds nothing: a thread descheduled for as long as the disk
    /// takes would see a whole batch done. Says how many it holds.
    fn fua_writes_held(
        reactor: &Reactor,
        leg: &FileLeg,
        bufs: &[TBuf],
        len: usize,
        rx: &Receiver<ThreadDone>,
    ) -> usize {
        for _ in 0..5 {
            fua_writes(reactor, leg, bufs, len);
            let held = reactor.in_flight();
            if held > 0 {
                return held;
            }
            poll_until(reactor, rx, bufs.len());
        }
        panic!("five batches of writes each finished inside the pass that submitted them");
    }

    fn write_op(t: &TBuf, off: usize, len: usize, offset: u64) -> LegOp {
        LegOp::Write {
            offset,
            bufs: buffers(&[(t, off, len)]),
            fua: false,
        }
    }

    #[test]
    fn a_reactor_submits_and_reaps_on_its_own_thread() {
        const REQS: usize = 100;
        let (real, shm) = (TempDir::real(), TempDir::tmpfs());
        let paths = [
            real.file("disk.img", (REQS * 4096) as u64),
            shm.file("disk.img", (REQS * 4096) as u64),
        ];
        let (sink, rx) = thread_sink();
        let legs: Vec<FileLeg> = paths.iter().map(|p| open_with(p, &sink)).collect();
        let src = TBuf::new(REQS * 4096);
        let data = pattern(7, REQS * 4096);
        src.set(0, &data);
        let reactor = Reactor::new().unwrap();
        let me = thread::current().id();
        reactor.enter(|| {
            for (l, leg) in legs.iter().enumerate() {
                for i in 0..REQS {
                    let op = write_op(&src, i * 4096, 4096, (i * 4096) as u64);
                    let tag = (l * 1000 + i) as Tag;
                    leg.submit(LegRequest { tag, op });
                }
            }
        });
        let done = poll_until(&reactor, &rx, 2 * REQS);
        let tags: HashSet<Tag> = done.iter().map(|d| d.0).collect();
        assert_eq!(tags.len(), 2 * REQS, "every request completes once");
        for (tag, result, thread) in &done {
            assert_eq!(*result, Ok(()), "tag {tag}");
            assert_eq!(*thread, me, "tag {tag} completed on another thread");
        }
        assert_eq!(reactor.in_flight(), 0);
        assert!(rx.try_recv().is_err());
        // Reads through the reactor see the data, and so do the files.
        let dst = TBuf::new(2 * REQS * 4096);
        reactor.enter(|| {
            for (l, leg) in legs.iter().enumerate() {
                let op = LegOp::Read {
                    offset: 0,
                    bufs: buffers(&[(&dst, l * REQS * 4096, REQS * 4096)]),
                };
                leg.submit(LegRequest { tag: 5000, op });
            }
        });
        let done = poll_until(&reactor, &rx, 2);
        assert!(done.iter().all(|d| d.1.is_ok() && d.2 == me), "{done:?}");
        for l in 0..2 {
            assert!(dst.get(l * REQS * 4096, REQS * 4096) == data);
        }
        drop(legs);
        for p in &paths {
            assert!(std::fs::read(p).unwrap() == data);
        }
    }

    #[test]
    fn requests_beyond_the_reactors_slots_go_through_the_leg_thread() {
        const REQS: usize = MAX_SLOTS + 44;
        let dir = TempDir::real();
        let path = dir.file("disk.img", (REQS * 512) as u64);
        let (sink, rx) = thread_sink();
        let leg = open_with(&path, &sink);
        let src = TBuf::new(REQS * 512);
        let data = pattern(3, REQS * 512);
        src.set(0, &data);
        let reactor = Reactor::new().unwrap();
        reactor.enter(|| {
            for i in 0..REQS {
                let op = write_op(&src, i * 512, 512, (i * 512) as u64);
                leg.submit(LegRequest { tag: i as Tag, op });
            }
        });
        let done = poll_until(&reactor, &rx, REQS);
        let me = thread::current().id();
        assert!(done.iter().all(|d| d.1.is_ok()));
        let here = done.iter().filter(|d| d.2 == me).count();
        assert_eq!(here, MAX_SLOTS, "the reactor takes what its slots hold");
        drop(leg);
        assert!(std::fs::read(&path).unwrap() == data);
    }

    #[test]
    fn a_completion_that_submits_again_is_handed_to_the_kernel() {
        let dir = TempDir::real();
        let path = dir.file("disk.img", 1 << 20);
        let (sink, rx) = thread_sink();
        let leg = Arc::new(open_with(&path, &sink));
        let src = TBuf::new(8192);
        src.set(0, &pattern(9, 8192));
        // Like the mirror's resend of a failed read: submitted from inside a completion.
        *sink.follow_up.lock().unwrap() = Some((
            1,
            Arc::downgrade(&leg),
            LegRequest {
                tag: 2,
                op: write_op(&src, 4096, 4096, 4096),
            },
        ));
        let reactor = Reactor::new().unwrap();
        let me = thread::current().id();
        reactor.enter(|| {
            leg.submit(LegRequest {
                tag: 1,
                op: write_op(&src, 0, 4096, 0),
            })
        });
        let done = poll_until(&reactor, &rx, 2);
        assert_eq!(
            done.iter().map(|d| (d.0, d.2)).collect::<Vec<_>>(),
            [(1, me), (2, me)]
        );
        assert!(done.iter().all(|d| d.1.is_ok()));
        assert_eq!(reactor.in_flight(), 0);
        drop(leg);
        assert!(std::fs::read(&path).unwrap()[..8192] == pattern(9, 8192)[..]);
    }

    #[test]
    fn a_leg_that_dies_wakes_the_reactors_holding_its_requests() {
        let dir = TempDir::real();
        let path = dir.file("disk.img", 1 << 20);
        let (sink, rx) = thread_sink();
        let leg = open_with(&path, &sink);
        let t = TBuf::new(4096);
        let reactor = Reactor::new().unwrap();
        reactor.enter(|| {
            leg.submit(LegRequest {
                tag: 1,
                op: write_op(&t, 0, 4096, 0),
            })
        });
        poll_until(&reactor, &rx, 1);
        reactor.poll();
        assert!(!reactor.has_work());
        leg.abort("test abort");
        assert!(reactor.has_work(), "the abort must reach the reactor");
        assert!(reactor.wait(Duration::from_secs(1)), "its fd is readable");
        reactor.poll();
        assert!(!reactor.has_work());
        reactor.enter(|| {
            leg.submit(LegRequest {
                tag: 2,
                op: write_op(&t, 0, 4096, 0),
            })
        });
        let done = poll_until(&reactor, &rx, 1);
        assert_eq!(done[0].1, Err(LegError::Aborted("test abort".into())));
    }

    #[test]
    fn an_abort_settles_everything_a_reactor_holds() {
        const REQS: usize = 200;
        const LEN: usize = 256 << 10;
        let dir = TempDir::real();
        let path = dir.file("disk.img", (REQS * LEN) as u64);
        let bufs: Vec<TBuf> = (0..REQS).map(|_| TBuf::new(LEN)).collect();
        let (sink, rx) = thread_sink();
        let leg = open_with(&path, &sink);
        let reactor = Reactor::new().unwrap();
        // Only `poll` reaps, so what the reactor holds now is what the abort finds.
        let held = fua_writes_held(&reactor, &leg, &bufs, LEN, &rx);
        leg.abort("test abort");
        let done = poll_until(&reactor, &rx, REQS);
        let aborted = Err(LegError::Aborted("test abort".into()));
        assert_eq!(done.iter().map(|d| d.0).collect::<HashSet<_>>().len(), REQS);
        for (tag, r, _) in &done {
            assert!(r.is_ok() || *r == aborted, "tag {tag}: {r:?}");
        }
        // Whatever the kernel made of them, the requests held when the leg died report its
        // death (those beyond the reactor's slots went through the leg's own thread).
        let failed = done.iter().filter(|d| d.1 == aborted).count();
        assert!(
            failed >= held,
            "{held} requests were held by the reactor at the abort, {failed} failed with it"
        );
        assert_eq!(reactor.in_flight(), 0);
    }

    #[test]
    fn dropping_a_reactor_waits_for_its_requests() {
        const REQS: usize = 200;
        const LEN: usize = 64 << 10;
        let dir = TempDir::real();
        let path = dir.file("disk.img", (REQS * LEN) as u64);
        let (sink, rx) = thread_sink();
        let leg = open_with(&path, &sink);
        let src = TBuf::new(REQS * LEN);
        let data = pattern(11, REQS * LEN);
        src.set(0, &data);
        let reactor = Reactor::new().unwrap();
        reactor.enter(|| {
            for i in 0..REQS {
                let op = write_op(&src, i * LEN, LEN, (i * LEN) as u64);
                leg.submit(LegRequest { tag: i as Tag, op });
            }
        });
        drop(reactor);
        let done: Vec<ThreadDone> = rx.try_iter().collect();
        assert_eq!(
            done.len(),
            REQS,
            "every request completed before the drop returned"
        );
        assert!(done.iter().all(|d| d.1.is_ok()));
        drop(leg);
        assert!(std::fs::read(&path).unwrap() == data);
    }

    /// On tmpfs write-zeroes falls back from ZERO_RANGE to writing zeroes, 8 MiB per SQE: each
    /// next SQE is pushed while a completion is reaped, and must still reach the kernel.
    #[test]
    fn a_reactor_submits_what_its_reaping_pushes() {
        const LEN: u64 = 20 << 20;
        let dir = TempDir::tmpfs();
        let path = dir.file("disk.img", LEN);
        std::fs::write(&path, vec![0xa5u8; LEN as usize]).unwrap();
        let (sink, rx) = thread_sink();
        let leg = open_with(&path, &sink);
        let reactor = Reactor::new().unwrap();
        reactor.enter(|| {
            let op = LegOp::WriteZeroes {
                offset: 0,
                len: LEN,
                may_unmap: false,
            };
            leg.submit(LegRequest { tag: 1, op });
        });
        let done = poll_until(&reactor, &rx, 1);
        assert_eq!(done[0].1, Ok(()));
        assert_eq!(reactor.in_flight(), 0);
        drop(leg);
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
    }

    /// A queue's ring that fails is the queue's problem, not the legs': what the kernel took
    /// completes as the kernel says, only what it never saw fails, the legs stay alive and
    /// later requests go through their own threads.
    #[test]
    fn a_broken_reactor_ring_spares_the_legs() {
        const REQS: usize = 64;
        const LEN: usize = 1 << 20;
        let dir = TempDir::real();
        let path = dir.file("disk.img", (REQS * LEN) as u64);
        let bufs: Vec<TBuf> = (0..REQS).map(|_| TBuf::new(LEN)).collect();
        let (sink, rx) = thread_sink();
        let leg = open_with(&path, &sink);
        let reactor = Reactor::new().unwrap();
        fua_writes(&reactor, &leg, &bufs, LEN);
        let mut done = poll_until(&reactor, &rx, 1);
        // Replace the ring's descriptor with /dev/null: the next io_uring_enter fails.
        let null = File::open("/dev/null").unwrap();
        // SAFETY: both descriptors are open; dup2 only swaps what the ring's descriptor refers
        // to, and the ring stays alive through its memory mappings.
        assert!(unsafe { libc::dup2(null.as_raw_fd(), reactor.ring_fd()) } >= 0);
        let t = TBuf::new(4096);
        reactor.enter(|| {
            leg.submit(LegRequest {
                tag: 500,
                op: write_op(&t, 0, 4096, 0),
            })
        });
        done.extend(poll_until(&reactor, &rx, REQS + 1 - done.len()));
        let me = thread::current().id();
        for (tag, result, thread) in &done {
            assert_eq!(*thread, me, "tag {tag}");
            if *tag == 500 {
                assert!(matches!(result, Err(LegError::Lost(_))), "{result:?}");
            } else {
                assert_eq!(*result, Ok(()), "tag {tag}: the kernel had taken it");
            }
        }
        assert!(
            leg.is_alive(),
            "a queue's ring failure must not kill the leg"
        );
        reactor.enter(|| {
            leg.submit(LegRequest {
                tag: 501,
                op: write_op(&t, 0, 4096, 0),
            })
        });
        let (tag, result, thread) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!((tag, result), (501, Ok(())));
        assert_ne!(
            thread, me,
            "after the loss the leg's own thread takes requests"
        );
    }

    /// Requests held in a reactor's ring keep a leg from being quiet, as a repair through a new
    /// handle must wait for them.
    #[test]
    fn wait_quiet_waits_for_the_requests_a_reactor_holds() {
        const REQS: usize = 200;
        const LEN: usize = 256 << 10;
        let dir = TempDir::real();
        let path = dir.file("disk.img", (REQS * LEN) as u64);
        let bufs: Vec<TBuf> = (0..REQS).map(|_| TBuf::new(LEN)).collect();
        let (sink, rx) = thread_sink();
        let leg = open_with(&path, &sink);
        assert!(leg.wait_quiet(Duration::ZERO));
        let reactor = Reactor::new().unwrap();
        fua_writes_held(&reactor, &leg, &bufs, LEN, &rx);
        assert!(!leg.wait_quiet(Duration::ZERO));
        poll_until(&reactor, &rx, REQS);
        assert!(leg.wait_quiet(Duration::ZERO));
    }
}
