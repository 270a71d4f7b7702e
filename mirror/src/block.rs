//! The block mirror: one logical disk over N legs.
//!
//! Every write-class request (write, flush, discard, write-zeroes) goes to every leg that takes
//! writes (up to date, or being resynced) and completes when all of them have answered. A leg that
//! fails a write, loses its connection or does not answer within the I/O timeout is ejected: it
//! leaves the set, its outstanding requests stop holding up the guest, and the request completes
//! from the legs that remain. A read goes to one leg that is current for the chunks it touches and
//! moves to another on error or timeout. The guest sees an error only when no current leg can
//! serve the request.
//!
//! With metadata (the default), the write path also keeps the write-intent bitmap and the
//! generation on the legs; see [`crate::sync`].

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{info, warn};
use serde::Serialize;
use slab::Slab;
use smallvec::SmallVec;
use transport::{
    CompletionSink, LegError, LegHandle, LegOp, LegRequest, LegSpec, OpenError, OpenOptions, Tag,
};

use crate::bitmap::AtomicBits;
use crate::meta::MetaError;
use crate::sync::{self, Cmd, MetaRuntime, ResyncStatus};

/// Upper bound on legs: the per-request leg sets are bit masks.
pub const MAX_LEGS: usize = 8;

/// Default of [`MirrorConfig::resync_busy_rate`]: 64 MiB/s. Capped at 100 MiB/s the guest kept
/// three quarters of its IOPS in the benchmark (BENCHMARKS.md), uncapped less than half; this
/// leaves a margin and still copies a fully dirty 100 GiB leg in under half an hour of
/// continuous guest load.
pub const DEFAULT_RESYNC_BUSY_RATE: u64 = 64 << 20;

/// How the guest sees a request end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    Ok,
    IoError,
    Unsupported,
}

/// Which current leg serves a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadPolicy {
    /// The first current leg in command-line order.
    Primary,
    /// Alternate between current legs.
    RoundRobin,
    /// The current leg with the fewest requests in flight.
    #[default]
    LeastOutstanding,
}

impl std::str::FromStr for ReadPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "primary" => Ok(ReadPolicy::Primary),
            "round-robin" => Ok(ReadPolicy::RoundRobin),
            "least-outstanding" => Ok(ReadPolicy::LeastOutstanding),
            _ => Err(format!(
                "unknown read policy '{s}' (primary, round-robin, least-outstanding)"
            )),
        }
    }
}

/// Tunables of a [`BlockMirror`].
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// A leg that holds a request longer than this is ejected.
    pub io_timeout: Duration,
    /// The same for flush, discard and write-zeroes (never below `io_timeout`). A flush waits
    /// for the leg's write-back, which after a resync or a burst of writes can be a gigabyte
    /// and seconds on a healthy disk; ejecting the leg for it would only start a resync that
    /// ends in another such flush.
    pub flush_timeout: Duration,
    /// Where reads go.
    pub read_policy: ReadPolicy,
    /// Accept legs of different sizes and expose the smallest (legs without metadata only).
    pub allow_size_mismatch: bool,
    /// How legs are opened.
    pub open: OpenOptions,
    /// Keep metadata (generation, leg states, write-intent bitmap) on the legs. Without it there
    /// is no resync and no safe restart: for scratch disks and benchmarks.
    pub metadata: bool,
    /// Take this leg as current whatever the metadata says (split brain recovery).
    pub force_current: Option<usize>,
    /// Resync bandwidth cap in bytes per second; 0 is unlimited.
    pub resync_rate: u64,
    /// Resync bandwidth while the guest does I/O (bytes per second; 0: no slowing down). The
    /// resync yields to the guest as DRBD's does to its application: it runs at full speed on an
    /// idle disk and at this rate while guest requests arrive.
    pub resync_busy_rate: u64,
    /// Retry failed legs in the background and resync them when they answer.
    pub reconnect: bool,
    /// Where to mirror the metadata in a local JSON file.
    pub state_dir: Option<PathBuf>,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            io_timeout: Duration::from_millis(1000),
            flush_timeout: DEFAULT_FLUSH_TIMEOUT,
            read_policy: ReadPolicy::default(),
            allow_size_mismatch: false,
            open: OpenOptions::default(),
            metadata: true,
            force_current: None,
            resync_rate: 0,
            resync_busy_rate: DEFAULT_RESYNC_BUSY_RATE,
            reconnect: true,
            state_dir: None,
        }
    }
}

/// Why a mirror could not be assembled or a command was refused.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("a mirror needs at least one leg and at most {MAX_LEGS}, got {0}")]
    LegCount(usize),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("legs differ in size: {0}; make them equal, or pass --allow-size-mismatch to use the smallest")]
    SizeMismatch(String),
    #[error("leg {0} has size 0")]
    Empty(String),
    #[error("no leg {0} (legs are numbered from 0 to {1})")]
    NoSuchLeg(usize, usize),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error("leg {leg} {uri}: {source}")]
    Meta {
        leg: usize,
        uri: String,
        #[source]
        source: MetaError,
    },
    #[error(transparent)]
    Assemble(MetaError),
    #[error("leg {leg} {uri}: metadata I/O failed: {err}")]
    MetaIo {
        leg: usize,
        uri: String,
        err: LegError,
    },
    #[error("{0}")]
    Refused(String),
}

/// Replication state of one leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum LegState {
    /// Holds every acknowledged write; serves reads.
    UpToDate = 0,
    /// Ejected or unreachable: missed writes, serves nothing until brought back.
    Failed = 1,
    /// Reachable but behind; waiting for its resync to start.
    Outdated = 2,
    /// Being brought back: takes every write, serves reads of chunks already copied.
    Resyncing = 3,
}

impl LegState {
    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            0 => LegState::UpToDate,
            2 => LegState::Outdated,
            3 => LegState::Resyncing,
            _ => LegState::Failed,
        }
    }
}

impl fmt::Display for LegState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LegState::UpToDate => "uptodate",
            LegState::Failed => "failed",
            LegState::Outdated => "outdated",
            LegState::Resyncing => "resyncing",
        })
    }
}

/// One leg as the control socket reports it.
#[derive(Debug, Clone, Serialize)]
pub struct LegStatus {
    pub index: usize,
    pub uri: String,
    pub state: LegState,
    /// The generation the leg holds everything up to.
    pub generation: u64,
    pub inflight: usize,
    pub ops: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub last_error: Option<String>,
}

/// The mirror as the control socket reports it.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorStatus {
    pub capacity: u64,
    pub inflight: usize,
    pub generation: u64,
    pub uuid: Option<String>,
    pub dirty_chunks: u64,
    pub chunk_size: u64,
    pub legs: Vec<LegStatus>,
    pub resync: Option<ResyncStatus>,
}

/// What the mirror offers above its legs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorInfo {
    pub capacity: u64,
    pub block_size: u32,
    pub flush: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    pub read_only: bool,
}

/// Something that keeps a request's buffers mapped until every leg has let go of them.
pub trait KeepAlive: Send + Sync {}
impl<T: Send + Sync + ?Sized> KeepAlive for T {}

type Handler<C> = Box<dyn Fn(C, IoStatus) + Send + Sync>;
pub(crate) type Mask = u8;

/// Default [`MirrorConfig::flush_timeout`].
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Chunks a resync keeps in flight (read from the source, then written to the target). Eight
/// rather than four: 1 GiB idle over nbdkit file legs in 0.76-0.77 s instead of 0.83-0.84, once
/// the final flush no longer hid the difference; a chunk's buffer each, during a resync only.
pub(crate) const RESYNC_WINDOW: usize = 8;

/// Chunks that can be under copy at once: the resync's window, and one for repair.
pub(crate) const COPY_SLOTS: usize = RESYNC_WINDOW + 1;

/// The monotonic clock at tick resolution (a few milliseconds), for the watchdog's request ages:
/// every request is stamped, and the precise clock cost a measurable share of the null-leg
/// pipeline (`clock_gettime` was 2.5 % of the vring thread at queue depth 32), while the I/O
/// timeout it serves is a second by default.
pub(crate) fn coarse_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec; CLOCK_MONOTONIC_COARSE exists on every Linux
    // this runs on, and on failure `ts` stays zero, which only makes requests look younger.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

pub(crate) fn bit(leg: usize) -> Mask {
    1 << leg
}

pub(crate) struct Leg {
    pub(crate) spec: Option<LegSpec>,
    pub(crate) uri: String,
    pub(crate) handle: RwLock<LegHandle>,
    /// Bumped with every new connection, so late completions of an old one are recognised.
    pub(crate) epoch: AtomicU64,
    pub(crate) state: AtomicU8,
    pub(crate) capacity: u64,
    /// Chunks already copied while resyncing.
    pub(crate) synced: RwLock<Option<Arc<AtomicBits>>>,
    pub(crate) inflight: AtomicUsize,
    pub(crate) ops: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) last_error: Mutex<Option<String>>,
}

impl Leg {
    pub(crate) fn state(&self) -> LegState {
        LegState::from_u8(self.state.load(Ordering::SeqCst))
    }
    pub(crate) fn set_state(&self, s: LegState) {
        self.state.store(s as u8, Ordering::SeqCst);
    }
    pub(crate) fn record_error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(what);
        }
    }
    pub(crate) fn handle(&self) -> LegHandle {
        match self.handle.read() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
    fn takes_writes(&self) -> bool {
        matches!(self.state(), LegState::UpToDate | LegState::Resyncing)
    }
}

/// Result of an internal (metadata or resync) request.
pub(crate) type InternalResult = Result<(), LegError>;

pub(crate) enum Origin<C> {
    /// A guest request; the context is handed back once answered.
    Guest(Option<C>),
    /// The mirror's own I/O; the outcome goes to whoever waits on the channel.
    Internal(Option<Sender<InternalResult>>),
}

pub(crate) struct Entry<C> {
    origin: Origin<C>,
    op: LegOp,
    /// Keeps the buffers valid while any leg may still touch them, which can outlast the guest's
    /// completion when an ejected leg is slow to let go.
    _keep: Option<Arc<dyn KeepAlive>>,
    /// Chunks this write counted itself in (see [`crate::bitmap::ChunkMap::begin`]).
    chunks: Range<u64>,
    /// Legs that have the request and have not completed it.
    outstanding: Mask,
    /// Legs whose answer the guest's completion still waits for.
    waiting: Mask,
    ok: Mask,
    unsupported: Mask,
    /// Legs a read has been tried on.
    tried: Mask,
    /// Legs whose read failed with a device error: their chunk gets repaired.
    bad_read: Mask,
    /// Legs whose write failed with a device error: ejected when the request settles, if
    /// another leg took the write.
    write_failed: Mask,
    error: Option<LegError>,
    /// When the request went to its legs, on [`coarse_now`]'s clock; moved to a late first
    /// answer (see [`Inner::leg_done`]).
    sent_at: Duration,
}

impl<C> Entry<C> {
    fn is_read(&self) -> bool {
        matches!(self.op, LegOp::Read { .. })
    }

    /// Whether the request gets `flush_timeout` rather than `io_timeout`: its duration grows
    /// with what the leg has buffered or with a range, not with a payload. A flush waits for
    /// write-back; a guest's discard or write-zeroes may cover the whole disk. The mirror's own
    /// write-zeroes is one resync chunk of zeros standing for that chunk's write, which guest
    /// writes to the chunk wait for: it is timed as the write.
    fn waits_for_write_back(&self) -> bool {
        matches!(
            (&self.op, &self.origin),
            (LegOp::Flush, _)
                | (
                    LegOp::Discard { .. } | LegOp::WriteZeroes { .. },
                    Origin::Guest(_)
                )
        )
    }
}

/// Guest completions of writes held back until a superblock update is on disk.
pub(crate) struct Held<C> {
    pub(crate) pending: u32,
    pub(crate) list: Vec<(C, IoStatus)>,
}

/// A write waiting for its bitmap bits or for a chunk being copied.
pub(crate) struct Parked<C> {
    pub(crate) op: LegOp,
    pub(crate) keep: Option<Arc<dyn KeepAlive>>,
    pub(crate) ctx: C,
}

pub(crate) struct Inner<C> {
    pub(crate) legs: Vec<Leg>,
    info: Mutex<MirrorInfo>,
    pub(crate) cfg: MirrorConfig,
    reqs: Mutex<Slab<Entry<C>>>,
    rr: AtomicUsize,
    handler: Handler<C>,
    md: std::sync::OnceLock<MetaRuntime>,
    pub(crate) held: Mutex<Held<C>>,
    pub(crate) parked: Mutex<Vec<Parked<C>>>,
    /// Chunks being copied (see [`COPY_SLOTS`]); writes to them wait. `u64::MAX` in a free slot.
    pub(crate) copying: [AtomicU64; COPY_SLOTS],
    pub(crate) worker: Sender<Cmd>,
    pub(crate) stopping: AtomicBool,
    /// Legs kept past the I/O timeout because no other up-to-date leg answered in time (warned
    /// once).
    late_kept: AtomicU8,
    /// When a guest request last went to the legs ([`coarse_now`] in nanoseconds, 0 for never):
    /// the resync watches it to yield to guest I/O. Written at most once per clock tick, so
    /// queues on several threads do not bounce its cache line on every request.
    pub(crate) last_guest_io: AtomicU64,
    self_ref: Weak<Inner<C>>,
}

/// A finished guest request, answered after the request table's lock is released so the handler
/// may take its own locks.
type Done<C> = SmallVec<[(C, IoStatus); 2]>;

/// What to do once the request table's lock is released: legs to abort (an abort may complete
/// requests inline, which takes the lock) and answers to hand out.
struct After<C> {
    aborts: SmallVec<[(usize, String); 2]>,
    done: Done<C>,
}

impl<C> After<C> {
    fn new() -> Self {
        After {
            aborts: SmallVec::new(),
            done: SmallVec::new(),
        }
    }
}
/// Requests to send (a read moving to another leg), sent after the lock is released.
type Resend = SmallVec<[(usize, LegRequest); 2]>;

/// Routes one connection's completions into the mirror.
pub(crate) struct LegSink<C> {
    pub(crate) leg: usize,
    pub(crate) epoch: u64,
    pub(crate) mirror: std::sync::OnceLock<Weak<Inner<C>>>,
}

impl<C: Send + 'static> CompletionSink for LegSink<C> {
    fn complete(&self, tag: Tag, result: Result<(), LegError>) {
        if let Some(inner) = self.mirror.get().and_then(Weak::upgrade) {
            inner.leg_done(self.leg, self.epoch, tag, result);
        }
    }
}

/// The mirroring engine. Cheap to clone; all clones drive the same legs.
pub struct BlockMirror<C> {
    pub(crate) inner: Arc<Inner<C>>,
}

impl<C> Clone for BlockMirror<C> {
    fn clone(&self) -> Self {
        BlockMirror {
            inner: self.inner.clone(),
        }
    }
}

impl<C: Send + 'static> BlockMirror<C> {
    /// Opens every leg in `specs` and assembles the mirror. `handler` receives each request's
    /// context and outcome, on whichever thread finished it.
    pub fn open(
        specs: &[LegSpec],
        cfg: MirrorConfig,
        handler: impl Fn(C, IoStatus) + Send + Sync + 'static,
    ) -> Result<Self, MirrorError> {
        let open = cfg.open.clone();
        Self::build(specs.len(), cfg, handler, |i, sink| {
            let h = transport::open(&specs[i], sink, &open)?;
            Ok((h, Some(specs[i].clone())))
        })
    }

    /// Assembles a mirror over `count` legs built by `make_leg(index, sink)`, for embedders with
    /// leg types of their own. Each leg must report its completions to the sink it was given.
    /// Such legs are not reconnected automatically.
    pub fn with_legs(
        count: usize,
        cfg: MirrorConfig,
        handler: impl Fn(C, IoStatus) + Send + Sync + 'static,
        mut make_leg: impl FnMut(usize, Arc<dyn CompletionSink>) -> Result<LegHandle, OpenError>,
    ) -> Result<Self, MirrorError> {
        Self::build(count, cfg, handler, |i, sink| {
            Ok((make_leg(i, sink)?, None))
        })
    }

    fn build(
        count: usize,
        cfg: MirrorConfig,
        handler: impl Fn(C, IoStatus) + Send + Sync + 'static,
        mut make_leg: impl FnMut(
            usize,
            Arc<dyn CompletionSink>,
        ) -> Result<(LegHandle, Option<LegSpec>), OpenError>,
    ) -> Result<Self, MirrorError> {
        if count == 0 || count > MAX_LEGS {
            return Err(MirrorError::LegCount(count));
        }
        let mut sinks = Vec::new();
        let mut legs = Vec::new();
        for i in 0..count {
            let sink = Arc::new(LegSink::<C> {
                leg: i,
                epoch: 0,
                mirror: std::sync::OnceLock::new(),
            });
            let (handle, spec) = make_leg(i, sink.clone())?;
            let uri = handle.uri().to_string();
            let li = handle.info().clone();
            info!(
                "leg {i} {uri}: {} bytes, block size {}, flush {}, discard {}, write-zeroes {}{}",
                li.capacity,
                li.block_size,
                li.flush,
                li.discard,
                li.write_zeroes,
                if li.read_only { ", read-only" } else { "" }
            );
            sinks.push(sink);
            legs.push(Leg {
                spec,
                uri,
                capacity: li.capacity,
                handle: RwLock::new(handle),
                epoch: AtomicU64::new(0),
                // No leg serves anything until the metadata says which are current.
                state: AtomicU8::new(LegState::Failed as u8),
                synced: RwLock::new(None),
                inflight: AtomicUsize::new(0),
                ops: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                bytes_read: AtomicU64::new(0),
                bytes_written: AtomicU64::new(0),
                last_error: Mutex::new(None),
            });
        }
        let info = combine(&legs, &cfg)?;
        let (worker_tx, worker_rx) = crossbeam_channel::unbounded();
        let inner = Arc::new_cyclic(|me| Inner {
            legs,
            info: Mutex::new(info),
            cfg,
            reqs: Mutex::new(Slab::with_capacity(1024)),
            rr: AtomicUsize::new(0),
            handler: Box::new(handler),
            md: std::sync::OnceLock::new(),
            held: Mutex::new(Held {
                pending: 0,
                list: Vec::new(),
            }),
            parked: Mutex::new(Vec::new()),
            copying: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            worker: worker_tx,
            stopping: AtomicBool::new(false),
            late_kept: AtomicU8::new(0),
            last_guest_io: AtomicU64::new(0),
            self_ref: me.clone(),
        });
        for sink in &sinks {
            let _ = sink.mirror.set(Arc::downgrade(&inner));
        }
        let tick =
            (inner.cfg.io_timeout / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
        let weak = Arc::downgrade(&inner);
        thread::Builder::new()
            .name("mirror-watchdog".into())
            .spawn(move || watchdog(weak, tick))
            .map_err(MirrorError::Thread)?;

        if !inner.cfg.metadata {
            for l in &inner.legs {
                l.set_state(LegState::UpToDate);
            }
            spawn_worker(&inner, worker_rx)?;
            return Ok(BlockMirror { inner });
        }
        // The metadata is read through the mirror's own request path, timeouts included.
        let startup = sync::load(&inner)?;
        if let Ok(mut i) = inner.info.lock() {
            i.capacity = startup.runtime.layout.data_size;
        }
        let _ = inner.md.set(startup.runtime);
        sync::start(&inner, startup.plan)?;
        spawn_worker(&inner, worker_rx)?;
        Ok(BlockMirror { inner })
    }

    /// Size and capabilities of the mirrored disk.
    pub fn info(&self) -> MirrorInfo {
        self.inner.info()
    }

    /// Each leg's URI as parsed when it was opened; `None` for a leg handed in as an object
    /// ([`BlockMirror::with_legs`]), whose kind the mirror does not know.
    pub fn leg_specs(&self) -> Vec<Option<LegSpec>> {
        self.inner.legs.iter().map(|l| l.spec.clone()).collect()
    }

    /// Starts a request. `keep` must keep the buffers in `op` valid (see [`transport::Buffers::push`])
    /// for as long as it lives; the mirror holds it until no leg can touch them any more. The
    /// outcome reaches the handler with `ctx`, possibly before `submit` returns.
    pub fn submit(&self, op: LegOp, keep: Option<Arc<dyn KeepAlive>>, ctx: C) {
        self.inner.submit(op, keep, ctx)
    }

    /// A snapshot for the control socket.
    pub fn status(&self) -> MirrorStatus {
        let inner = &self.inner;
        let inflight = inner.reqs.lock().map(|r| r.len()).unwrap_or(0);
        let (generation, uuid, views, dirty, chunk) = match inner.md() {
            Some(md) => {
                let m = md.meta();
                (
                    m.generation,
                    Some(uuid::Uuid::from_bytes(m.uuid).to_string()),
                    Some(m.view.clone()),
                    md.chunks.persisted.count(),
                    md.layout.chunk_size,
                )
            }
            None => (0, None, None, 0, 0),
        };
        MirrorStatus {
            capacity: inner.info().capacity,
            inflight,
            generation,
            uuid,
            dirty_chunks: dirty,
            chunk_size: chunk,
            resync: inner.md().and_then(|md| md.resync_status()),
            legs: inner
                .legs
                .iter()
                .enumerate()
                .map(|(index, l)| {
                    let state = l.state();
                    LegStatus {
                        index,
                        uri: l.uri.clone(),
                        state,
                        generation: match (&views, state) {
                            (Some(_), LegState::UpToDate) => generation,
                            (Some(v), _) => v.get(index).map_or(0, |r| r.good_gen),
                            (None, _) => 0,
                        },
                        inflight: l.inflight.load(Ordering::Relaxed),
                        ops: l.ops.load(Ordering::Relaxed),
                        errors: l.errors.load(Ordering::Relaxed),
                        bytes_read: l.bytes_read.load(Ordering::Relaxed),
                        bytes_written: l.bytes_written.load(Ordering::Relaxed),
                        last_error: l.last_error.lock().ok().and_then(|e| e.clone()),
                    }
                })
                .collect(),
        }
    }

    fn check_leg(&self, index: usize) -> Result<(), MirrorError> {
        if index >= self.inner.legs.len() {
            return Err(MirrorError::NoSuchLeg(index, self.inner.legs.len() - 1));
        }
        Ok(())
    }

    /// Ejects leg `index` by operator request (fault drills). It stays out until [`Self::re_add`].
    pub fn fail_leg(&self, index: usize) -> Result<(), MirrorError> {
        self.check_leg(index)?;
        self.inner.eject(index, "failed by operator");
        if self.inner.md().is_some() {
            let _ = self.inner.worker.send(Cmd::Hold(index));
        }
        Ok(())
    }

    /// Tries to bring a failed leg back now (it is also retried on its own with backoff).
    pub fn re_add(&self, index: usize) -> Result<(), MirrorError> {
        self.check_leg(index)?;
        if self.inner.md().is_none() {
            return Err(MirrorError::Refused(
                "this mirror keeps no metadata (--no-metadata): a failed leg cannot be resynced"
                    .into(),
            ));
        }
        match self.inner.legs[index].state() {
            LegState::Failed => {
                let _ = self.inner.worker.send(Cmd::ReAdd(index));
                Ok(())
            }
            s => Err(MirrorError::Refused(format!(
                "leg {index} is {s}, not failed"
            ))),
        }
    }

    /// The resync's settings, which only a mirror with metadata has.
    fn resync_settings(&self) -> Result<&MetaRuntime, MirrorError> {
        self.inner
            .md()
            .ok_or_else(|| MirrorError::Refused("no metadata, no resync".into()))
    }

    /// Pauses or resumes a running resync.
    pub fn set_resync_paused(&self, paused: bool) -> Result<(), MirrorError> {
        let md = self.resync_settings()?;
        md.resync_paused.store(paused, Ordering::SeqCst);
        Ok(())
    }

    /// Caps resync bandwidth (bytes per second, 0 for none).
    pub fn set_resync_rate(&self, rate: u64) -> Result<(), MirrorError> {
        let md = self.resync_settings()?;
        md.resync_rate.store(rate, Ordering::SeqCst);
        Ok(())
    }

    /// Sets the resync bandwidth while the guest does I/O (bytes per second, 0 for no slowing
    /// down; see [`MirrorConfig::resync_busy_rate`]).
    pub fn set_resync_busy_rate(&self, rate: u64) -> Result<(), MirrorError> {
        let md = self.resync_settings()?;
        md.resync_busy_rate.store(rate, Ordering::SeqCst);
        Ok(())
    }

    /// Number of requests not yet fully finished by every leg.
    pub fn inflight(&self) -> usize {
        self.inner.reqs.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Stops cleanly: waits for requests in flight (up to `limit`), stops resync, and when every
    /// leg is in sync clears the bitmap and marks the legs clean, so the next start needs no
    /// resync at all.
    pub fn shutdown(&self, limit: Duration) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        while self.inflight() > 0 && t0.elapsed() < limit {
            thread::sleep(Duration::from_millis(2));
        }
        if self.inner.md().is_some() {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if self.inner.worker.send(Cmd::Shutdown(tx)).is_ok() {
                let _ = rx.recv_timeout(limit);
            }
        }
    }
}

fn spawn_worker<C: Send + 'static>(
    inner: &Arc<Inner<C>>,
    rx: Receiver<Cmd>,
) -> Result<(), MirrorError> {
    let weak = Arc::downgrade(inner);
    thread::Builder::new()
        .name("mirror-meta".into())
        .spawn(move || sync::worker(weak, rx))
        .map_err(MirrorError::Thread)?;
    Ok(())
}

fn combine(legs: &[Leg], cfg: &MirrorConfig) -> Result<MirrorInfo, MirrorError> {
    let infos: Vec<_> = legs.iter().map(|l| l.handle().info().clone()).collect();
    for (leg, i) in legs.iter().zip(&infos) {
        if i.capacity == 0 {
            return Err(MirrorError::Empty(leg.uri.clone()));
        }
    }
    let min = infos.iter().map(|i| i.capacity).min().unwrap_or(0);
    let max = infos.iter().map(|i| i.capacity).max().unwrap_or(0);
    // With metadata each leg's data area is fixed by `create`; the legs themselves may differ.
    if min != max && !cfg.allow_size_mismatch && !cfg.metadata {
        let sizes = legs
            .iter()
            .zip(&infos)
            .map(|(l, i)| format!("{} is {} bytes", l.uri, i.capacity))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(MirrorError::SizeMismatch(sizes));
    }
    if min != max && !cfg.metadata {
        warn!("legs differ in size; using the smallest, {min} bytes");
    }
    Ok(MirrorInfo {
        capacity: min,
        block_size: infos.iter().map(|i| i.block_size).max().unwrap_or(512),
        flush: infos.iter().any(|i| i.flush),
        discard: infos.iter().all(|i| i.discard),
        write_zeroes: infos.iter().all(|i| i.write_zeroes),
        read_only: cfg.open.read_only || infos.iter().any(|i| i.read_only),
    })
}

/// Byte range a request touches on disk.
fn op_range(op: &LegOp) -> Option<(u64, u64)> {
    match op {
        LegOp::Read { offset, bufs } | LegOp::Write { offset, bufs, .. } => {
            Some((*offset, bufs.total_len() as u64))
        }
        LegOp::Discard { offset, len } | LegOp::WriteZeroes { offset, len, .. } => {
            Some((*offset, *len))
        }
        LegOp::Flush => None,
    }
}

impl<C: Send + 'static> Inner<C> {
    pub(crate) fn arc(&self) -> Option<Arc<Inner<C>>> {
        self.self_ref.upgrade()
    }

    pub(crate) fn md(&self) -> Option<&MetaRuntime> {
        self.md.get()
    }

    pub(crate) fn info(&self) -> MirrorInfo {
        match self.info.lock() {
            Ok(i) => *i,
            Err(p) => *p.into_inner(),
        }
    }

    fn mask_where(&self, f: impl Fn(&Leg) -> bool) -> Mask {
        self.legs
            .iter()
            .enumerate()
            .filter(|(_, l)| f(l))
            .fold(0, |m, (i, _)| m | bit(i))
    }

    pub(crate) fn up_to_date(&self) -> Mask {
        self.mask_where(|l| l.state() == LegState::UpToDate)
    }

    fn write_set(&self) -> Mask {
        self.mask_where(Leg::takes_writes)
    }

    /// Legs current for every chunk of `range`: up to date, or resyncing with those chunks copied.
    fn current_for(&self, range: Option<Range<u64>>) -> Mask {
        let mut m = self.up_to_date();
        for (i, l) in self.legs.iter().enumerate() {
            if l.state() != LegState::Resyncing {
                continue;
            }
            let (Some(range), Ok(synced)) = (range.clone(), l.synced.read()) else {
                continue;
            };
            if let Some(s) = synced.as_ref() {
                if range.clone().all(|c| s.get(c)) {
                    m |= bit(i);
                }
            }
        }
        m
    }

    fn chunk_range(&self, op: &LegOp) -> Option<Range<u64>> {
        let md = self.md()?;
        let (off, len) = op_range(op)?;
        Some(md.layout.chunks_of(off, len))
    }

    fn pick_read_leg(&self, candidates: Mask) -> Option<usize> {
        if candidates == 0 {
            return None;
        }
        let n = self.legs.len();
        let in_set = |i: usize| candidates & bit(i) != 0;
        match self.cfg.read_policy {
            ReadPolicy::Primary => (0..n).find(|&i| in_set(i)),
            ReadPolicy::RoundRobin => {
                let start = self.rr.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| (start + k) % n).find(|&i| in_set(i))
            }
            ReadPolicy::LeastOutstanding => (0..n)
                .filter(|&i| in_set(i))
                .min_by_key(|&i| self.legs[i].inflight.load(Ordering::Relaxed)),
        }
    }

    /// Whether a chunk of `range` is being copied.
    fn is_copying(&self, range: &Range<u64>) -> bool {
        self.copying
            .iter()
            .any(|s| range.contains(&s.load(Ordering::SeqCst)))
    }

    pub(crate) fn submit(&self, op: LegOp, keep: Option<Arc<dyn KeepAlive>>, ctx: C) {
        if matches!(op, LegOp::Read { .. }) {
            let range = self.chunk_range(&op);
            let targets = self.pick_read_leg(self.current_for(range)).map_or(0, bit);
            self.dispatch(op, keep, Origin::Guest(Some(ctx)), targets, 0..0);
            return;
        }
        self.submit_write(Parked { op, keep, ctx });
    }

    /// A write-class request: once its bitmap bits are on disk and its chunks are not being
    /// copied, it goes to every leg that takes writes.
    pub(crate) fn submit_write(&self, p: Parked<C>) {
        let chunks = match (self.md(), self.chunk_range(&p.op)) {
            (Some(md), Some(range)) => {
                let ready = md.chunks.begin(range.clone());
                if !ready || self.is_copying(&range) {
                    md.chunks.end(range.clone());
                    self.park(p, range, !ready);
                    return;
                }
                range
            }
            _ => 0..0,
        };
        let targets = self.write_set();
        self.dispatch(p.op, p.keep, Origin::Guest(Some(p.ctx)), targets, chunks);
    }

    fn park(&self, p: Parked<C>, range: Range<u64>, need_flush: bool) {
        let Some(md) = self.md() else { return };
        {
            let Ok(mut parked) = self.parked.lock() else {
                return;
            };
            // Look again under the lock: whoever releases parked writes changes the condition
            // first and takes this lock after, so a write is either let through here or seen there.
            let ready = range.clone().all(|c| md.chunks.persisted.get(c));
            if !ready || self.is_copying(&range) {
                if !ready {
                    for c in range {
                        md.chunks.wanted.set(c);
                    }
                }
                parked.push(p);
                if need_flush || !ready {
                    let _ = self.worker.send(Cmd::Flush);
                }
                return;
            }
        }
        self.submit_write(p);
    }

    /// Lets parked writes try again (their bits are on disk, or a copied chunk was released).
    pub(crate) fn kick_parked(&self) {
        let list = match self.parked.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return,
        };
        for p in list {
            self.submit_write(p);
        }
    }

    fn dispatch(
        &self,
        op: LegOp,
        keep: Option<Arc<dyn KeepAlive>>,
        origin: Origin<C>,
        targets: Mask,
        chunks: Range<u64>,
    ) {
        if targets == 0 {
            if let Some(md) = self.md() {
                md.chunks.end(chunks);
            }
            match origin {
                Origin::Guest(Some(ctx)) => (self.handler)(ctx, IoStatus::IoError),
                Origin::Internal(Some(tx)) => {
                    let _ = tx.send(Err(LegError::Lost("no leg to send to".into())));
                }
                _ => {}
            }
            return;
        }
        let now = coarse_now();
        if matches!(origin, Origin::Guest(_)) {
            let stamp = now.as_nanos() as u64;
            if self.last_guest_io.load(Ordering::Relaxed) != stamp {
                self.last_guest_io.store(stamp, Ordering::Relaxed);
            }
        }
        let tag = {
            let Ok(mut reqs) = self.reqs.lock() else {
                if let Origin::Guest(Some(ctx)) = origin {
                    (self.handler)(ctx, IoStatus::IoError);
                }
                return;
            };
            reqs.insert(Entry {
                origin,
                op: op.clone(),
                _keep: keep,
                chunks,
                outstanding: targets,
                waiting: targets,
                ok: 0,
                unsupported: 0,
                tried: targets,
                bad_read: 0,
                write_failed: 0,
                error: None,
                sent_at: now,
            }) as Tag
        };
        // The lock is released: a leg may complete inline, and its completion takes the lock.
        // Every leg but the last gets a copy; the last takes the op itself.
        let last = (Mask::BITS - 1 - targets.leading_zeros()) as usize;
        let mut others = targets & !bit(last);
        while others != 0 {
            let i = others.trailing_zeros() as usize;
            others &= !bit(i);
            self.send(i, tag, op.clone());
        }
        self.send(last, tag, op);
    }

    fn send(&self, leg: usize, tag: Tag, op: LegOp) {
        let l = &self.legs[leg];
        l.inflight.fetch_add(1, Ordering::Relaxed);
        l.handle().submit(LegRequest { tag, op });
    }

    /// Sends the mirror's own request to one leg, bypassing the leg's state, and waits for it.
    /// Timeouts are the watchdog's: a leg that sits on it is ejected, which fails it.
    pub(crate) fn leg_io(&self, leg: usize, op: LegOp, keep: Arc<dyn KeepAlive>) -> InternalResult {
        let rx = self.leg_io_start(leg, op, keep);
        self.leg_io_wait(&rx)
    }

    /// Sends the mirror's own request; [`Inner::leg_io_wait`] collects the outcome.
    pub(crate) fn leg_io_start(
        &self,
        leg: usize,
        op: LegOp,
        keep: Arc<dyn KeepAlive>,
    ) -> Receiver<InternalResult> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.dispatch(op, Some(keep), Origin::Internal(Some(tx)), bit(leg), 0..0);
        rx
    }

    /// Waits for a request sent with [`Inner::leg_io_start`].
    pub(crate) fn leg_io_wait(&self, rx: &Receiver<InternalResult>) -> InternalResult {
        let limit = self.wait_limit();
        match rx.recv_timeout(limit) {
            Ok(r) => r,
            Err(_) => Err(LegError::Lost(format!("no answer within {limit:?}"))),
        }
    }

    /// Waits for the first of `rxs` to be answered: its index and the outcome. If none is
    /// within the limit, the first (the oldest) is given up on.
    pub(crate) fn leg_io_wait_any(
        &self,
        rxs: &[&Receiver<InternalResult>],
    ) -> (usize, InternalResult) {
        let limit = self.wait_limit();
        let mut sel = crossbeam_channel::Select::new();
        for rx in rxs {
            sel.recv(rx);
        }
        match sel.select_timeout(limit) {
            Ok(op) => {
                let i = op.index();
                let r = op.recv(rxs[i]).unwrap_or_else(|_| {
                    Err(LegError::Lost("request dropped without an answer".into()))
                });
                (i, r)
            }
            Err(_) => (
                0,
                Err(LegError::Lost(format!("no answer within {limit:?}"))),
            ),
        }
    }

    /// Past the watchdog's limit for any request, which ejects a leg that holds one.
    fn wait_limit(&self) -> Duration {
        self.cfg
            .io_timeout
            .max(self.cfg.flush_timeout)
            .saturating_mul(4)
            .saturating_add(Duration::from_secs(10))
    }

    fn leg_done(&self, leg: usize, epoch: u64, tag: Tag, result: Result<(), LegError>) {
        let l = &self.legs[leg];
        l.inflight.fetch_sub(1, Ordering::Relaxed);
        l.ops.fetch_add(1, Ordering::Relaxed);
        // A connection that has been replaced can still report its aborted requests; they count
        // for the request's bookkeeping but say nothing about the new connection.
        let stale_conn = epoch != l.epoch.load(Ordering::SeqCst);
        let mut after = After::new();
        let mut resend: Resend = SmallVec::new();
        let mut eject: Option<String> = None;
        let mut repair: Option<(usize, Range<u64>)> = None;
        {
            let Ok(mut reqs) = self.reqs.lock() else {
                return;
            };
            let Some(e) = reqs.get_mut(tag as usize) else {
                warn!("leg {leg} {}: completion for unknown request {tag}", l.uri);
                return;
            };
            e.outstanding &= !bit(leg);
            e.waiting &= !bit(leg);
            // A first answer that is itself past the timeout (a success: an abort or an
            // error says nothing of the stall) ends a stall all the legs shared
            // (a paused host, a congested fabric). The others get their timeout from here:
            // judged from when the request went out, whichever leg resumed a moment later
            // would count as late against one that answered just before, and be ejected for
            // the common stall. The watchdog has marked legs kept late by then (it looks four
            // times per timeout); only then is the clock read, which would cost every mirrored
            // write 1.5 % more instructions (null legs).
            if result.is_ok()
                && !stale_conn
                && e.outstanding != 0
                && self.late_kept.load(Ordering::Relaxed) != 0
            {
                let now = coarse_now();
                if now.saturating_sub(e.sent_at) > self.timeout_of(e) {
                    e.sent_at = now;
                }
            }
            let internal = matches!(e.origin, Origin::Internal(_));
            match &result {
                Ok(()) => {
                    e.ok |= bit(leg);
                    match &e.op {
                        LegOp::Read { bufs, .. } => {
                            l.bytes_read
                                .fetch_add(bufs.total_len() as u64, Ordering::Relaxed);
                        }
                        LegOp::Write { bufs, .. } => {
                            l.bytes_written
                                .fetch_add(bufs.total_len() as u64, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
                Err(LegError::Unsupported) => e.unsupported |= bit(leg),
                Err(err) => {
                    e.error = Some(err.clone());
                    if stale_conn || l.state() == LegState::Failed {
                        // The aftermath of an ejection: count it, but keep the reason on record.
                        l.errors.fetch_add(1, Ordering::Relaxed);
                    } else {
                        l.record_error(format!("{} failed: {err}", e.op.name()));
                        // A lost connection leaves the leg unusable: out at once. A read error on
                        // a working leg is a bad block, not a dead leg: the read moves on, the leg
                        // stays and the block is repaired. A failed write is judged when the
                        // request settles (see `settle`).
                        if err.is_fatal() {
                            eject = Some(format!("{} failed: {err}", e.op.name()));
                        } else if e.is_read() && !internal {
                            e.bad_read |= bit(leg);
                        } else if !internal {
                            e.write_failed |= bit(leg);
                        }
                    }
                }
            }
            if e.is_read() && !internal && e.ok == 0 && e.waiting == 0 {
                let range = self.chunk_range(&e.op);
                let not_this = if eject.is_some() { !bit(leg) } else { !0 };
                let left = self.current_for(range) & !e.tried & not_this;
                if let Some(next) = self.pick_read_leg(left) {
                    e.tried |= bit(next);
                    e.outstanding |= bit(next);
                    e.waiting |= bit(next);
                    e.sent_at = coarse_now();
                    resend.push((
                        next,
                        LegRequest {
                            tag,
                            op: e.op.clone(),
                        },
                    ));
                }
            }
            if e.is_read() && !internal && e.ok != 0 && e.bad_read != 0 {
                if let Some(range) = self.chunk_range(&e.op) {
                    repair = Some((e.bad_read.trailing_zeros() as usize, range));
                }
            }
            if let Some(reason) = eject.take() {
                self.mark_failed(leg, &reason, &mut reqs, &mut after);
            }
            self.settle(&mut reqs, tag as usize, &mut after);
        }
        if let Some((bad, range)) = repair {
            let _ = self.worker.send(Cmd::Repair {
                leg: bad,
                chunks: range,
            });
        }
        // Drained in place: moving these inline vectors into an iterator (or `After` into a call)
        // is a 300-byte copy per leg completion even when they are empty.
        for (next, req) in resend.drain(..) {
            info!(
                "read of request {tag} moves from leg {leg} to leg {next} {}",
                self.legs[next].uri
            );
            self.send(next, req.tag, req.op);
        }
        self.run_after(&mut after);
    }

    fn run_after(&self, after: &mut After<C>) {
        for (leg, reason) in after.aborts.drain(..) {
            self.legs[leg].handle().abort(&reason);
        }
        for (ctx, status) in after.done.drain(..) {
            (self.handler)(ctx, status);
        }
    }

    /// Answers the request once no leg it waits for is left, and forgets it once no leg holds
    /// its buffers. A write that some leg took and others failed ejects the ones that failed
    /// (they are now behind) before it is answered, so the answer waits for the generation bump;
    /// a write no leg took is an error for the guest and ejects nobody, since ejecting would
    /// only turn one failed request into a dead disk. So is a write that only legs being
    /// resynced took: they go instead.
    fn settle(&self, reqs: &mut Slab<Entry<C>>, key: usize, after: &mut After<C>) {
        let Some(e) = reqs.get_mut(key) else { return };
        let mut answer = None;
        let mut behind: Mask = 0;
        let mut only_behind_took = false;
        if e.waiting == 0 {
            // Legs still being resynced took it, and every up-to-date leg failed it with a device
            // error: answering it as done would leave it only on legs that do not hold the whole
            // disk, and ejecting the up-to-date legs would leave no complete copy (no source to
            // finish the resync from, split brain at the next start). As when no leg takes a
            // write, the guest gets the error and the up-to-date legs stay; the resyncing legs
            // that took it now differ from them and go, to copy the chunk again when they return.
            only_behind_took = e.ok != 0 && e.write_failed != 0 && e.ok & self.up_to_date() == 0;
            let status = if only_behind_took {
                IoStatus::IoError
            } else if e.ok != 0 {
                IoStatus::Ok
            } else if e.unsupported != 0 {
                IoStatus::Unsupported
            } else {
                IoStatus::IoError
            };
            match &mut e.origin {
                Origin::Guest(ctx) => {
                    if let Some(ctx) = ctx.take() {
                        if let Some(md) = self.md() {
                            md.chunks.end(std::mem::replace(&mut e.chunks, 0..0));
                        }
                        if only_behind_took {
                            behind = e.ok;
                        } else if e.ok != 0 {
                            behind = e.write_failed;
                        }
                        answer = Some((ctx, status, !e.is_read()));
                    }
                }
                Origin::Internal(tx) => {
                    if let Some(tx) = tx.take() {
                        let r = if e.ok != 0 {
                            Ok(())
                        } else if e.unsupported != 0 {
                            Err(LegError::Unsupported)
                        } else {
                            Err(e.error.clone().unwrap_or(LegError::Io(libc::EIO)))
                        };
                        let _ = tx.send(r);
                    }
                }
            }
        }
        let mut reason = e
            .error
            .as_ref()
            .map(|err| format!("{} failed: {err}", e.op.name()))
            .unwrap_or_default();
        if only_behind_took {
            reason = format!("took a write every up-to-date leg failed ({reason})");
        }
        if e.outstanding == 0
            && match &e.origin {
                Origin::Guest(c) => c.is_none(),
                Origin::Internal(t) => t.is_none(),
            }
        {
            reqs.remove(key);
        }
        let mut left = behind;
        while left != 0 {
            let leg = left.trailing_zeros() as usize;
            left &= !bit(leg);
            self.mark_failed(leg, &reason, reqs, after);
        }
        if let Some((ctx, status, write)) = answer {
            self.answer(ctx, status, write, &mut after.done);
        }
    }

    /// Hands a guest answer out, or holds a write's while a superblock update that it depends on
    /// (a leg left the set) is not yet on disk.
    fn answer(&self, ctx: C, status: IoStatus, write: bool, done: &mut Done<C>) {
        if write && self.md().is_some() {
            if let Ok(mut held) = self.held.lock() {
                if held.pending > 0 {
                    held.list.push((ctx, status));
                    return;
                }
            }
        }
        done.push((ctx, status));
    }

    /// Releases the writes held for a superblock update that is now on disk.
    pub(crate) fn release_held(&self) {
        let list = match self.held.lock() {
            Ok(mut h) => {
                h.pending = h.pending.saturating_sub(1);
                if h.pending == 0 {
                    std::mem::take(&mut h.list)
                } else {
                    Vec::new()
                }
            }
            Err(_) => return,
        };
        for (ctx, status) in list {
            (self.handler)(ctx, status);
        }
    }

    /// Takes `leg` out of every set. Write-class requests stop waiting for it; reads wait until
    /// it has released their buffers (the abort that follows makes it do so) and then move to
    /// another leg. With metadata, writes answered from here on are held until the survivors'
    /// superblocks record the ejection: a crash must not let the stale leg pass for current.
    fn mark_failed(
        &self,
        leg: usize,
        reason: &str,
        reqs: &mut Slab<Entry<C>>,
        after: &mut After<C>,
    ) -> bool {
        let l = &self.legs[leg];
        let before = l.state();
        if before == LegState::Failed {
            return false;
        }
        if self.md().is_some() {
            if let Ok(mut held) = self.held.lock() {
                held.pending += 1;
            }
        }
        l.set_state(LegState::Failed);
        if let Ok(mut s) = l.synced.write() {
            *s = None;
        }
        warn!("leg {leg} {} ejected ({before} before): {reason}", l.uri);
        l.record_error(format!("ejected: {reason}"));
        after.aborts.push((leg, reason.to_string()));
        let keys: SmallVec<[usize; 64]> = reqs
            .iter()
            .filter(|(_, e)| {
                !e.is_read() && matches!(e.origin, Origin::Guest(_)) && e.waiting & bit(leg) != 0
            })
            .map(|(k, _)| k)
            .collect();
        for k in keys {
            if let Some(e) = reqs.get_mut(k) {
                e.waiting &= !bit(leg);
            }
            self.settle(reqs, k, after);
        }
        if self.up_to_date() == 0 {
            warn!("no up-to-date leg left: guest I/O to unsynced data fails until a leg returns");
        }
        if self.md().is_some() {
            let _ = self.worker.send(Cmd::Ejected(leg));
        }
        true
    }

    pub(crate) fn eject(&self, leg: usize, reason: &str) {
        let mut after = After::new();
        if let Ok(mut reqs) = self.reqs.lock() {
            self.mark_failed(leg, reason, &mut reqs, &mut after);
        }
        self.run_after(&mut after);
    }

    /// How long a leg may hold `e` before it is late.
    fn timeout_of(&self, e: &Entry<C>) -> Duration {
        if e.waits_for_write_back() {
            self.cfg.flush_timeout.max(self.cfg.io_timeout)
        } else {
            self.cfg.io_timeout
        }
    }

    /// Ejects legs that died on their own or sit on a request past the timeout.
    fn check_legs(&self) {
        let timeout = self.cfg.io_timeout;
        let slow_timeout = self.cfg.flush_timeout.max(timeout);
        // Legs late with an ordinary request, and legs late with a flush-like one.
        let (mut late_io, mut late_slow): (Mask, Mask) = (0, 0);
        if let Ok(reqs) = self.reqs.lock() {
            let now = coarse_now();
            for (_, e) in reqs.iter() {
                if e.outstanding == 0 {
                    continue;
                }
                if now.saturating_sub(e.sent_at) <= self.timeout_of(e) {
                    continue;
                }
                if e.waits_for_write_back() {
                    late_slow |= e.outstanding;
                } else {
                    late_io |= e.outstanding;
                }
            }
        }
        let late = late_io | late_slow;
        for (i, l) in self.legs.iter().enumerate() {
            if l.state() == LegState::Failed {
                continue;
            }
            if !l.handle().is_alive() {
                self.eject(i, "connection lost");
            } else if late & bit(i) == 0 {
                self.late_kept.fetch_and(!bit(i), Ordering::Relaxed);
            } else if self.up_to_date() & !late & !bit(i) == 0 {
                // No other up-to-date leg answers in time either. Either this is the last
                // up-to-date leg, whose ejection would turn a stall into I/O errors for the guest
                // and a mirror with no current leg, or every leg is slow at once (an overloaded
                // host or fabric), which ejecting one of them does not cure: it would only cost
                // a resync. The leg stays and its requests wait, as on a plain disk; once another
                // leg keeps up again, a leg still late is ejected. A leg that is gone (its
                // connection lost) is ejected above whatever the others do.
                if self.late_kept.fetch_or(bit(i), Ordering::Relaxed) & bit(i) == 0 {
                    warn!(
                        "leg {i} {} holds requests past their timeout (I/O {} ms, flush {} ms), \
                         but no other up-to-date leg answers in time: kept, its requests wait",
                        l.uri,
                        timeout.as_millis(),
                        slow_timeout.as_millis()
                    );
                }
            } else if late_io & bit(i) != 0 {
                self.eject(
                    i,
                    &format!(
                        "no answer within the I/O timeout of {} ms",
                        timeout.as_millis()
                    ),
                );
            } else {
                self.eject(
                    i,
                    &format!(
                        "no answer to a flush, discard or write-zeroes within the flush \
                         timeout of {} ms",
                        slow_timeout.as_millis()
                    ),
                );
            }
        }
    }

    /// Replaces leg `leg`'s connection; completions of the old one no longer count against it.
    pub(crate) fn install(&self, leg: usize, handle: LegHandle, epoch: u64) {
        let l = &self.legs[leg];
        l.epoch.store(epoch, Ordering::SeqCst);
        if let Ok(mut h) = l.handle.write() {
            *h = handle;
        }
    }

    /// A fresh sink for a new connection of `leg`.
    pub(crate) fn new_sink(&self, leg: usize) -> (Arc<LegSink<C>>, u64) {
        let epoch = self.legs[leg].epoch.load(Ordering::SeqCst) + 1;
        let sink = Arc::new(LegSink {
            leg,
            epoch,
            mirror: std::sync::OnceLock::new(),
        });
        let _ = sink.mirror.set(self.self_ref.clone());
        (sink, epoch)
    }
}

fn watchdog<C: Send + 'static>(mirror: Weak<Inner<C>>, tick: Duration) {
    loop {
        thread::sleep(tick);
        let Some(inner) = mirror.upgrade() else {
            return;
        };
        inner.check_legs();
    }
}

#[cfg(test)]
mod tests;
