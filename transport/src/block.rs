//! The block-leg contract shared by every leg type.
//!
//! A leg is one path to one device. It accepts requests without blocking the caller, keeps many in
//! flight, and reports each request's outcome exactly once through the [`CompletionSink`] it was
//! opened with. Payload buffers are raw iovecs that usually point straight into guest memory: the
//! leg reads from them (writes) or fills them (reads) without copying.

use std::fmt;
use std::sync::Arc;

use smallvec::SmallVec;

/// Caller-chosen identifier of one request, echoed back on completion.
pub type Tag = u64;

/// One scatter-gather element.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct IoVec(libc::iovec);

// SAFETY: an IoVec is a plain (pointer, length) pair; whoever builds `Buffers` from it promised (see
// `Buffers::push`) that the memory stays valid until the request completes, on whichever thread
// the leg touches it.
unsafe impl Send for IoVec {}
// SAFETY: as above; sharing the pair itself hands out no access to the memory.
unsafe impl Sync for IoVec {}

impl IoVec {
    /// Start of the buffer.
    pub fn ptr(&self) -> *mut u8 {
        self.0.iov_base.cast()
    }
    /// Length of the buffer in bytes.
    pub fn len(&self) -> usize {
        self.0.iov_len
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iov_len == 0
    }
    /// The `libc::iovec` for system calls.
    pub fn as_iovec(&self) -> libc::iovec {
        self.0
    }
}

impl fmt::Debug for IoVec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:p}+{}", self.0.iov_base, self.0.iov_len)
    }
}

/// The scatter-gather list of one request. Most requests have a handful of segments, so they live
/// inline and a request costs no allocation.
#[derive(Default, Debug)]
pub struct Buffers {
    iov: SmallVec<[IoVec; 8]>,
    total: usize,
}

impl Clone for Buffers {
    /// One copy of the segments in use; the derived clone goes element by element through
    /// `extend` (a request is cloned for every leg but one).
    fn clone(&self) -> Self {
        Buffers {
            iov: SmallVec::from_slice(&self.iov),
            total: self.total,
        }
    }
}

impl Buffers {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a segment.
    ///
    /// # Safety
    ///
    /// `ptr..ptr+len` must be valid for reads (when the request is a write) or for writes (when it
    /// is a read) until the request carrying these buffers has been completed through the
    /// [`CompletionSink`], and nothing else may write it concurrently. For guest memory this means
    /// the caller keeps the guest memory mapping alive until the completion arrives.
    pub unsafe fn push(&mut self, ptr: *mut u8, len: usize) {
        self.iov.push(IoVec(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        }));
        self.total += len;
    }

    /// The segments.
    pub fn iovecs(&self) -> &[IoVec] {
        &self.iov
    }

    /// Sum of the segment lengths.
    pub fn total_len(&self) -> usize {
        self.total
    }

    /// The segments as `libc::iovec`s, for `readv`/`writev`-style calls.
    pub fn as_raw(&self) -> &[libc::iovec] {
        // SAFETY: IoVec is repr(transparent) over libc::iovec, so the slices have the same layout.
        unsafe { std::slice::from_raw_parts(self.iov.as_ptr().cast(), self.iov.len()) }
    }
}

/// What a request does.
#[derive(Debug, Clone)]
pub enum LegOp {
    /// Fill `bufs` from `offset`.
    Read { offset: u64, bufs: Buffers },
    /// Write `bufs` at `offset`; `fua` forces the data to stable storage before completion.
    Write {
        offset: u64,
        bufs: Buffers,
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Drop the range (the contents become unspecified).
    Discard { offset: u64, len: u64 },
    /// Zero the range, deallocating it when `may_unmap` and the leg can.
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
}

impl LegOp {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            LegOp::Read { .. } => "read",
            LegOp::Write { .. } => "write",
            LegOp::Flush => "flush",
            LegOp::Discard { .. } => "discard",
            LegOp::WriteZeroes { .. } => "write-zeroes",
        }
    }
}

/// One request to a leg.
#[derive(Debug, Clone)]
pub struct LegRequest {
    pub tag: Tag,
    pub op: LegOp,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegError {
    /// The device answered with an error for this request; the leg itself still works.
    #[error("I/O error (errno {0})")]
    Io(i32),
    /// The leg cannot do this operation at all.
    #[error("operation not supported by this leg")]
    Unsupported,
    /// The leg is gone (connection lost, protocol violation, device vanished). Every outstanding
    /// and later request fails the same way.
    #[error("leg lost: {0}")]
    Lost(String),
    /// The request was cancelled by [`BlockLeg::abort`].
    #[error("aborted: {0}")]
    Aborted(String),
}

impl LegError {
    /// Whether the leg as a whole is unusable after this error.
    pub fn is_fatal(&self) -> bool {
        matches!(self, LegError::Lost(_) | LegError::Aborted(_))
    }
}

/// Receives request outcomes. Called from the leg's own threads, or from inside `submit` when a
/// request fails (or completes) at once, so implementations must not hold locks across
/// [`BlockLeg::submit`] that `complete` also takes.
pub trait CompletionSink: Send + Sync {
    /// The request `tag` finished.
    fn complete(&self, tag: Tag, result: Result<(), LegError>);
}

/// What a leg can do, learned when it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegInfo {
    /// Size in bytes.
    pub capacity: u64,
    /// Smallest unit of I/O the leg prefers (512 or 4096).
    pub block_size: u32,
    /// The leg understands flush (otherwise writes are durable on completion).
    pub flush: bool,
    /// The leg honours FUA on writes.
    pub fua: bool,
    /// The leg can discard.
    pub discard: bool,
    /// The leg can write zeroes efficiently.
    pub write_zeroes: bool,
    /// The leg refuses writes.
    pub read_only: bool,
}

/// A path to one block device.
pub trait BlockLeg: Send + Sync {
    /// The URI the leg was opened from, for logs and status.
    fn uri(&self) -> &str;

    /// Capabilities and size.
    fn info(&self) -> &LegInfo;

    /// Queues a request. Never blocks on I/O. The outcome arrives exactly once through the sink,
    /// possibly before `submit` returns.
    fn submit(&self, req: LegRequest);

    /// Gives up on the leg: fails every outstanding request with [`LegError::Aborted`] as soon as
    /// the leg can guarantee it will no longer touch their buffers, and fails every later request.
    /// Returns at once; the failures arrive through the sink.
    fn abort(&self, reason: &str);

    /// False once the leg has been lost or aborted.
    fn is_alive(&self) -> bool;

    /// After the leg was lost or aborted: waits up to `timeout` until nothing sent through it
    /// can still change the device, and says whether that point was reached. Whoever repairs
    /// the device through a new connection must wait for it, or an old write that a paused
    /// server executes late would land on top of the repair.
    ///
    /// The default suits legs whose abort fails a request only once the device let go of it
    /// (null, file): they are quiet when their last failure has arrived.
    fn wait_quiet(&self, _timeout: std::time::Duration) -> bool {
        true
    }
}

/// Shared handle to a leg.
pub type LegHandle = Arc<dyn BlockLeg>;
