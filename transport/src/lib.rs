//! One path to one device, knowing nothing of mirroring or virtio.
//!
//! Block legs: [`file`] (a local file or block device through io_uring), [`nbd`] (an NBD client
//! over TCP or a unix socket) and [`null`] (completes at once, for measuring the pipeline). Each
//! implements [`BlockLeg`]: asynchronous, many requests in flight, buffers passed as iovecs that
//! point straight into guest memory.

pub mod batch;
pub mod block;
pub mod file;
pub mod nbd;
pub mod net;
pub mod null;
pub mod spec;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

pub use block::{
    BlockLeg, Buffers, CompletionSink, IoVec, LegError, LegHandle, LegInfo, LegOp, LegRequest, Tag,
};
pub use spec::{parse_size, LegSpec, NbdAddress, SpecError};

/// How to open a leg.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Give up connecting to a remote leg after this long.
    pub connect_timeout: Duration,
    /// Open without write access.
    pub read_only: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            connect_timeout: Duration::from_secs(5),
            read_only: false,
        }
    }
}

/// Why a leg could not be opened. Always names the leg.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("leg {uri}: {source}")]
    Io {
        uri: String,
        #[source]
        source: std::io::Error,
    },
    #[error("leg {uri}: NBD handshake failed: {reason}")]
    Handshake { uri: String, reason: String },
    #[error("leg {uri}: {reason}")]
    Unusable { uri: String, reason: String },
}

/// Opens the leg `spec`; its completions go to `sink`.
pub fn open(
    spec: &LegSpec,
    sink: Arc<dyn CompletionSink>,
    opts: &OpenOptions,
) -> Result<LegHandle, OpenError> {
    match spec {
        LegSpec::File { path, direct } => Ok(Arc::new(file::FileLeg::open(
            spec.to_string(),
            path,
            *direct,
            opts,
            sink,
        )?)),
        LegSpec::Nbd { address, export } => Ok(Arc::new(nbd::NbdLeg::connect(
            spec.to_string(),
            address,
            export,
            opts,
            sink,
        )?)),
        LegSpec::Null { size } => Ok(Arc::new(null::NullLeg::new(
            spec.to_string(),
            *size,
            opts.read_only,
            sink,
        ))),
    }
}

/// Whether `fd` becomes readable within `ms` milliseconds (0: whether it is now).
pub(crate) fn readable(fd: RawFd, ms: libc::c_int) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, as the count says.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}
