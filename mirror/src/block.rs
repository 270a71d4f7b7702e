//! The block mirror: one logical disk over N legs.
//!
//! Every write-class request (write, flush, discard, write-zeroes) goes to every up-to-date leg and
//! completes when all of them have answered. A leg that fails a write, loses its connection or does
//! not answer within the I/O timeout is ejected: it leaves the up-to-date set, its outstanding
//! requests stop holding up the guest, and the request completes from the legs that remain. A read
//! goes to one up-to-date leg and moves to another on error or timeout. The guest sees an error only
//! when no up-to-date leg can serve the request.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::Serialize;
use slab::Slab;
use smallvec::SmallVec;
use transport::{
    CompletionSink, LegError, LegHandle, LegOp, LegRequest, LegSpec, OpenError, OpenOptions, Tag,
};

/// Upper bound on legs: the per-request leg sets are bit masks.
pub const MAX_LEGS: usize = 8;

/// How the guest sees a request end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    Ok,
    IoError,
    Unsupported,
}

/// Which up-to-date leg serves a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadPolicy {
    /// The first up-to-date leg in command-line order.
    Primary,
    /// Alternate between up-to-date legs.
    RoundRobin,
    /// The up-to-date leg with the fewest requests in flight.
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
    /// Where reads go.
    pub read_policy: ReadPolicy,
    /// Accept legs of different sizes and expose the smallest.
    pub allow_size_mismatch: bool,
    /// How legs are opened.
    pub open: OpenOptions,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            io_timeout: Duration::from_millis(1000),
            read_policy: ReadPolicy::default(),
            allow_size_mismatch: false,
            open: OpenOptions::default(),
        }
    }
}

/// Why a mirror could not be assembled.
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
}

/// Replication state of one leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LegState {
    /// Holds every acknowledged write; serves reads.
    UpToDate,
    /// Ejected: missed writes, serves nothing until brought back.
    Failed,
}

impl LegState {
    fn from_u8(v: u8) -> Self {
        if v == 0 {
            LegState::UpToDate
        } else {
            LegState::Failed
        }
    }
}

impl fmt::Display for LegState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LegState::UpToDate => "uptodate",
            LegState::Failed => "failed",
        })
    }
}

/// One leg as the control socket reports it.
#[derive(Debug, Clone, Serialize)]
pub struct LegStatus {
    pub index: usize,
    pub uri: String,
    pub state: LegState,
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
    pub legs: Vec<LegStatus>,
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
type Mask = u8;

fn bit(leg: usize) -> Mask {
    1 << leg
}

struct Leg {
    uri: String,
    handle: LegHandle,
    state: AtomicU8,
    inflight: AtomicUsize,
    ops: AtomicU64,
    errors: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Leg {
    fn state(&self) -> LegState {
        LegState::from_u8(self.state.load(Ordering::Acquire))
    }
    fn record_error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(what);
        }
    }
}

struct Entry<C> {
    /// Handed back to the completion handler once the guest's answer is known.
    ctx: Option<C>,
    op: LegOp,
    /// Keeps the buffers valid while any leg may still touch them, which can outlast the guest's
    /// completion when an ejected leg is slow to let go.
    _keep: Option<Arc<dyn KeepAlive>>,
    /// Legs that have the request and have not completed it.
    outstanding: Mask,
    /// Legs whose answer the guest's completion still waits for.
    waiting: Mask,
    ok: Mask,
    unsupported: Mask,
    /// Legs a read has been tried on.
    tried: Mask,
    sent_at: Instant,
}

impl<C> Entry<C> {
    fn is_read(&self) -> bool {
        matches!(self.op, LegOp::Read { .. })
    }
}

struct Inner<C> {
    legs: Vec<Leg>,
    info: MirrorInfo,
    cfg: MirrorConfig,
    reqs: Mutex<Slab<Entry<C>>>,
    rr: AtomicUsize,
    handler: Handler<C>,
}

/// A finished guest request, answered after the request table's lock is released so the handler
/// may take its own locks.
type Done<C> = SmallVec<[(C, IoStatus); 2]>;
/// Reads to send to another leg, sent after the lock is released.
type Resend = SmallVec<[(usize, LegRequest); 2]>;

/// Routes one leg's completions into the mirror. The mirror is created after its legs, so the
/// back-reference is filled in once it exists.
struct LegSink<C> {
    leg: usize,
    mirror: OnceLock<Weak<Inner<C>>>,
}

impl<C: Send + 'static> CompletionSink for LegSink<C> {
    fn complete(&self, tag: Tag, result: Result<(), LegError>) {
        if let Some(inner) = self.mirror.get().and_then(Weak::upgrade) {
            inner.leg_done(self.leg, tag, result);
        }
    }
}

/// The mirroring engine. Cheap to clone; all clones drive the same legs.
pub struct BlockMirror<C> {
    inner: Arc<Inner<C>>,
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
        Self::with_legs(specs.len(), cfg, handler, |i, sink| {
            transport::open(&specs[i], sink, &open)
        })
    }

    /// Assembles a mirror over `count` legs built by `make_leg(index, sink)`, for embedders with
    /// leg types of their own. Each leg must report its completions to the sink it was given.
    pub fn with_legs(
        count: usize,
        cfg: MirrorConfig,
        handler: impl Fn(C, IoStatus) + Send + Sync + 'static,
        mut make_leg: impl FnMut(usize, Arc<dyn CompletionSink>) -> Result<LegHandle, OpenError>,
    ) -> Result<Self, MirrorError> {
        if count == 0 || count > MAX_LEGS {
            return Err(MirrorError::LegCount(count));
        }
        let mut sinks = Vec::new();
        let mut legs = Vec::new();
        for i in 0..count {
            let sink = Arc::new(LegSink::<C> {
                leg: i,
                mirror: OnceLock::new(),
            });
            let handle = make_leg(i, sink.clone())?;
            let uri = handle.uri().to_string();
            info!(
                "leg {i} {uri}: {} bytes, block size {}, flush {}, discard {}, write-zeroes {}{}",
                handle.info().capacity,
                handle.info().block_size,
                handle.info().flush,
                handle.info().discard,
                handle.info().write_zeroes,
                if handle.info().read_only {
                    ", read-only"
                } else {
                    ""
                }
            );
            sinks.push(sink);
            legs.push(Leg {
                uri,
                handle,
                state: AtomicU8::new(0),
                inflight: AtomicUsize::new(0),
                ops: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                bytes_read: AtomicU64::new(0),
                bytes_written: AtomicU64::new(0),
                last_error: Mutex::new(None),
            });
        }
        let info = Self::combine(&legs, &cfg)?;
        let inner = Arc::new(Inner {
            legs,
            info,
            cfg,
            reqs: Mutex::new(Slab::with_capacity(1024)),
            rr: AtomicUsize::new(0),
            handler: Box::new(handler),
        });
        for sink in sinks {
            // The sinks were created just above and never set elsewhere.
            let _ = sink.mirror.set(Arc::downgrade(&inner));
        }
        let weak = Arc::downgrade(&inner);
        let tick =
            (inner.cfg.io_timeout / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
        thread::Builder::new()
            .name("mirror-watchdog".into())
            .spawn(move || watchdog(weak, tick))
            .map_err(MirrorError::Thread)?;
        Ok(BlockMirror { inner })
    }

    fn combine(legs: &[Leg], cfg: &MirrorConfig) -> Result<MirrorInfo, MirrorError> {
        let infos: Vec<_> = legs.iter().map(|l| l.handle.info()).collect();
        for (leg, i) in legs.iter().zip(&infos) {
            if i.capacity == 0 {
                return Err(MirrorError::Empty(leg.uri.clone()));
            }
        }
        let min = infos.iter().map(|i| i.capacity).min().unwrap_or(0);
        let max = infos.iter().map(|i| i.capacity).max().unwrap_or(0);
        if min != max && !cfg.allow_size_mismatch {
            let sizes = legs
                .iter()
                .zip(&infos)
                .map(|(l, i)| format!("{} is {} bytes", l.uri, i.capacity))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(MirrorError::SizeMismatch(sizes));
        }
        if min != max {
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

    /// Size and capabilities of the mirrored disk.
    pub fn info(&self) -> MirrorInfo {
        self.inner.info
    }

    /// Starts a request. `keep` must keep the buffers in `op` valid (see [`transport::Buffers::push`])
    /// for as long as it lives; the mirror holds it until no leg can touch them any more. The
    /// outcome reaches the handler with `ctx`, possibly before `submit` returns.
    pub fn submit(&self, op: LegOp, keep: Option<Arc<dyn KeepAlive>>, ctx: C) {
        self.inner.submit(op, keep, ctx)
    }

    /// A snapshot for the control socket.
    pub fn status(&self) -> MirrorStatus {
        let inflight = self.inner.reqs.lock().map(|r| r.len()).unwrap_or(0);
        MirrorStatus {
            capacity: self.inner.info.capacity,
            inflight,
            legs: self
                .inner
                .legs
                .iter()
                .enumerate()
                .map(|(index, l)| LegStatus {
                    index,
                    uri: l.uri.clone(),
                    state: l.state(),
                    inflight: l.inflight.load(Ordering::Relaxed),
                    ops: l.ops.load(Ordering::Relaxed),
                    errors: l.errors.load(Ordering::Relaxed),
                    bytes_read: l.bytes_read.load(Ordering::Relaxed),
                    bytes_written: l.bytes_written.load(Ordering::Relaxed),
                    last_error: l.last_error.lock().ok().and_then(|e| e.clone()),
                })
                .collect(),
        }
    }

    /// Ejects leg `index` by operator request (fault drills).
    pub fn fail_leg(&self, index: usize) -> Result<(), MirrorError> {
        if index >= self.inner.legs.len() {
            return Err(MirrorError::NoSuchLeg(index, self.inner.legs.len() - 1));
        }
        self.inner.eject(index, "failed by operator");
        Ok(())
    }

    /// Number of requests not yet fully finished by every leg.
    pub fn inflight(&self) -> usize {
        self.inner.reqs.lock().map(|r| r.len()).unwrap_or(0)
    }
}

impl<C: Send + 'static> Inner<C> {
    fn up_to_date(&self) -> Mask {
        self.legs
            .iter()
            .enumerate()
            .filter(|(_, l)| l.state() == LegState::UpToDate)
            .fold(0, |m, (i, _)| m | bit(i))
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

    fn submit(&self, op: LegOp, keep: Option<Arc<dyn KeepAlive>>, ctx: C) {
        let up = self.up_to_date();
        let targets = if matches!(op, LegOp::Read { .. }) {
            self.pick_read_leg(up).map_or(0, bit)
        } else {
            up
        };
        if targets == 0 {
            (self.handler)(ctx, IoStatus::IoError);
            return;
        }
        let tag = {
            let Ok(mut reqs) = self.reqs.lock() else {
                (self.handler)(ctx, IoStatus::IoError);
                return;
            };
            reqs.insert(Entry {
                ctx: Some(ctx),
                op: op.clone(),
                _keep: keep,
                outstanding: targets,
                waiting: targets,
                ok: 0,
                unsupported: 0,
                tried: targets,
                sent_at: Instant::now(),
            }) as Tag
        };
        // The lock is released: a leg may complete inline, and its completion takes the lock.
        let mut remaining = targets;
        while remaining != 0 {
            let i = remaining.trailing_zeros() as usize;
            remaining &= !bit(i);
            self.send(i, tag, op.clone());
        }
    }

    fn send(&self, leg: usize, tag: Tag, op: LegOp) {
        let l = &self.legs[leg];
        l.inflight.fetch_add(1, Ordering::Relaxed);
        l.handle.submit(LegRequest { tag, op });
    }

    fn leg_done(&self, leg: usize, tag: Tag, result: Result<(), LegError>) {
        let l = &self.legs[leg];
        l.inflight.fetch_sub(1, Ordering::Relaxed);
        l.ops.fetch_add(1, Ordering::Relaxed);
        let mut done: Done<C> = SmallVec::new();
        let mut resend: Resend = SmallVec::new();
        let mut eject: Option<String> = None;
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
                    l.record_error(format!("{} failed: {err}", e.op.name()));
                    // A read error on a working leg is a bad block, not a dead leg: the read moves
                    // on and the leg stays. A failed write leaves the leg behind the others, and a
                    // lost connection leaves it unusable: both eject it, unless it is the last
                    // up-to-date leg and the error is the device's answer, where ejecting would
                    // only turn one failed request into a dead disk.
                    let last = self.up_to_date() == bit(leg);
                    if err.is_fatal() || (!e.is_read() && !last) {
                        eject = Some(format!("{} failed: {err}", e.op.name()));
                    }
                }
            }
            if e.is_read() && e.ok == 0 && e.waiting == 0 {
                let left = self.up_to_date() & !e.tried & !eject.as_ref().map_or(0, |_| bit(leg));
                if let Some(next) = self.pick_read_leg(left) {
                    e.tried |= bit(next);
                    e.outstanding |= bit(next);
                    e.waiting |= bit(next);
                    e.sent_at = Instant::now();
                    resend.push((
                        next,
                        LegRequest {
                            tag,
                            op: e.op.clone(),
                        },
                    ));
                }
            }
            Self::settle(&mut reqs, tag as usize, &mut done);
            if let Some(reason) = &eject {
                if !self.mark_failed(leg, reason, &mut reqs, &mut done) {
                    eject = None;
                }
            }
        }
        if let Some(reason) = eject {
            self.legs[leg].handle.abort(&reason);
        }
        for (next, req) in resend {
            info!(
                "read of request {tag} moves from leg {leg} to leg {next} {}",
                self.legs[next].uri
            );
            self.send(next, req.tag, req.op);
        }
        for (ctx, status) in done {
            (self.handler)(ctx, status);
        }
    }

    /// Answers the guest once no leg it waits for is left, and forgets the request once no leg
    /// holds its buffers.
    fn settle(reqs: &mut Slab<Entry<C>>, key: usize, done: &mut Done<C>) {
        let Some(e) = reqs.get_mut(key) else { return };
        if e.waiting == 0 {
            if let Some(ctx) = e.ctx.take() {
                let status = if e.ok != 0 {
                    IoStatus::Ok
                } else if e.unsupported != 0 {
                    IoStatus::Unsupported
                } else {
                    IoStatus::IoError
                };
                done.push((ctx, status));
            }
        }
        if e.outstanding == 0 && e.ctx.is_none() {
            reqs.remove(key);
        }
    }

    /// Takes `leg` out of the up-to-date set. Write-class requests stop waiting for it; reads wait
    /// until it has released their buffers (the abort that follows makes it do so) and then move
    /// to another leg.
    fn mark_failed(
        &self,
        leg: usize,
        reason: &str,
        reqs: &mut Slab<Entry<C>>,
        done: &mut Done<C>,
    ) -> bool {
        let l = &self.legs[leg];
        if l.state
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        warn!("leg {leg} {} ejected: {reason}", l.uri);
        l.record_error(format!("ejected: {reason}"));
        let keys: SmallVec<[usize; 64]> = reqs
            .iter()
            .filter(|(_, e)| !e.is_read() && e.waiting & bit(leg) != 0)
            .map(|(k, _)| k)
            .collect();
        for k in keys {
            if let Some(e) = reqs.get_mut(k) {
                e.waiting &= !bit(leg);
            }
            Self::settle(reqs, k, done);
        }
        if self.up_to_date() == 0 {
            warn!("no up-to-date leg left: guest I/O fails until a leg returns");
        }
        true
    }

    fn eject(&self, leg: usize, reason: &str) {
        let mut done: Done<C> = SmallVec::new();
        let ejected = match self.reqs.lock() {
            Ok(mut reqs) => self.mark_failed(leg, reason, &mut reqs, &mut done),
            Err(_) => false,
        };
        if ejected {
            self.legs[leg].handle.abort(reason);
        }
        for (ctx, status) in done {
            (self.handler)(ctx, status);
        }
    }

    /// Ejects up-to-date legs that died on their own or sit on a request past the timeout.
    fn check_legs(&self) {
        let timeout = self.cfg.io_timeout;
        let mut late: Mask = 0;
        if let Ok(reqs) = self.reqs.lock() {
            let now = Instant::now();
            for (_, e) in reqs.iter() {
                if e.outstanding != 0 && now.duration_since(e.sent_at) > timeout {
                    late |= e.outstanding;
                }
            }
        }
        for (i, l) in self.legs.iter().enumerate() {
            if l.state() != LegState::UpToDate {
                continue;
            }
            if !l.handle.is_alive() {
                self.eject(i, "connection lost");
            } else if late & bit(i) != 0 {
                self.eject(
                    i,
                    &format!(
                        "no answer within the I/O timeout of {} ms",
                        timeout.as_millis()
                    ),
                );
            }
        }
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
