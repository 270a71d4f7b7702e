//! A leg that completes every request at once: reads return zeroes, writes are dropped. It
//! measures the cost of the pipeline above the legs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::block::{BlockLeg, CompletionSink, LegError, LegInfo, LegOp, LegRequest};

/// See the module documentation.
pub struct NullLeg {
    uri: String,
    info: LegInfo,
    sink: Arc<dyn CompletionSink>,
    aborted: AtomicBool,
}

impl NullLeg {
    /// A null device of `size` bytes.
    pub fn new(uri: String, size: u64, read_only: bool, sink: Arc<dyn CompletionSink>) -> Self {
        NullLeg {
            uri,
            info: LegInfo {
                capacity: size,
                block_size: 512,
                flush: true,
                fua: true,
                discard: true,
                write_zeroes: true,
                read_only,
            },
            sink,
            aborted: AtomicBool::new(false),
        }
    }
}

impl BlockLeg for NullLeg {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn info(&self) -> &LegInfo {
        &self.info
    }

    fn submit(&self, req: LegRequest) {
        if self.aborted.load(Ordering::Acquire) {
            self.sink
                .complete(req.tag, Err(LegError::Aborted("null leg aborted".into())));
            return;
        }
        if let LegOp::Read { bufs, .. } = &req.op {
            for iov in bufs.iovecs() {
                // SAFETY: `Buffers::push` obliges the submitter to keep each read buffer valid
                // for writes of its length until this request completes, which is below.
                unsafe { std::ptr::write_bytes(iov.ptr(), 0, iov.len()) };
            }
        }
        self.sink.complete(req.tag, Ok(()));
    }

    fn abort(&self, _reason: &str) {
        self.aborted.store(true, Ordering::Release);
    }

    fn is_alive(&self) -> bool {
        !self.aborted.load(Ordering::Acquire)
    }
}
