//! The replication engine, independent of any VMM: write fan-out to every up-to-date leg, leg
//! health and ejection, read routing and retry. It knows legs only through
//! [`transport::BlockLeg`] and answers requests through a handler the embedder supplies, so it runs
//! the same under the vhost-user backend, inside another VMM, or in a test.

pub mod bitmap;
pub mod block;
pub mod meta;
pub mod net;
pub mod net_mirror;
pub mod sync;

pub use block::{
    BlockMirror, IoStatus, KeepAlive, LegState, LegStatus, MirrorConfig, MirrorError, MirrorInfo,
    MirrorStatus, ReadPolicy, DEFAULT_FLUSH_TIMEOUT, DEFAULT_RESYNC_BUSY_RATE, MAX_LEGS,
};
pub use net_mirror::{
    NetConfig, NetMirror, NetMirrorError, NetMode, NetStatus, PathStatus, POLL_BUDGET,
};
pub use sync::{create, Created, ResyncStatus};
