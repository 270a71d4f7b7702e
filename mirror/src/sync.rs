//! Keeping the legs consistent: metadata at start, the write-intent bitmap, generation bumps on
//! ejection, resync of a returning leg, read-error repair, and reconnection.
//!
//! One worker thread ("mirror-meta") owns every metadata write, so bitmap flushes, sweeps and
//! superblock rounds never interleave. Resync runs on its own thread and copies chunks under the
//! chunk locks (`Inner::copying`): guest writes to a chunk under copy wait until its copy has
//! landed, so an older copy can never land over a newer guest write. Two chunks are under copy at
//! a time, one being read from the source while the one before is written to the target.

use std::alloc::{alloc_zeroed, dealloc, Layout as AllocLayout};
use std::collections::BTreeSet;
use std::ops::Range;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, error, info, warn};
use serde::Serialize;
use transport::{Buffers, CompletionSink, LegError, LegOp, LegSpec, OpenOptions, Tag};

use crate::bitmap::{AtomicBits, ChunkMap};
use crate::block::{
    bit, coarse_now, Inner, InternalResult, LegState, Mask, MirrorError, RESYNC_WINDOW,
};
use crate::meta::{
    self, assemble, Layout, MetaError, PeerRecord, PeerState, Superblock, ALIGN, SB_SIZE,
};

/// Work for the metadata worker.
pub(crate) enum Cmd {
    /// Writers wait for bitmap bits.
    Flush,
    /// A leg left the set: bump the generation, then release held writes.
    Ejected(usize),
    /// A read failed on `leg`: copy these chunks to it from a current leg.
    Repair { leg: usize, chunks: Range<u64> },
    /// Try to bring a failed leg back now.
    ReAdd(usize),
    /// Keep a failed leg out until an operator re-adds it (it was failed on purpose).
    Hold(usize),
    /// Flush, mark clean if in sync, and answer.
    Shutdown(Sender<()>),
}

/// Resync progress, as the control socket reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ResyncStatus {
    pub leg: usize,
    pub done_bytes: u64,
    /// Of `done_bytes`, chunks of zeros sent to the target as write-zeroes.
    pub zeroed_bytes: u64,
    pub total_bytes: u64,
    /// Bytes per second over the resync so far.
    pub rate: u64,
    pub paused: bool,
    /// Slowed down to the busy rate because the guest does I/O (`--resync-busy-rate`).
    pub yielding: bool,
}

/// The mirror's idea of the metadata; every leg's superblock is written from it.
pub(crate) struct Meta {
    pub(crate) uuid: [u8; 16],
    pub(crate) generation: u64,
    pub(crate) view: Vec<PeerRecord>,
    seq: Vec<u64>,
}

struct Retry {
    next: Instant,
    backoff: Duration,
    /// Set when the leg came back diverged: only an operator's re-add tries again.
    refused: bool,
    /// An operator asked for a try (also when automatic reconnection is off).
    manual: bool,
    /// A reconnection attempt is running (on its own thread: it can take a connect timeout).
    busy: Arc<AtomicBool>,
}

/// Metadata state of a running mirror.
pub(crate) struct MetaRuntime {
    /// The data area (chunk arithmetic).
    pub(crate) layout: Layout,
    /// Where each leg keeps its metadata.
    leg_layouts: Vec<Layout>,
    pub(crate) chunks: ChunkMap,
    meta: Mutex<Meta>,
    pub(crate) resync_paused: AtomicBool,
    pub(crate) resync_rate: AtomicU64,
    pub(crate) resync_busy_rate: AtomicU64,
    resync: Mutex<Option<ResyncStatus>>,
    resync_running: AtomicBool,
    /// Serialises superblock rounds, so the slot each writes (by `Meta::seq`) is the one after
    /// the last. The meta lock itself is not held across the I/O: `status` must answer while a
    /// superblock write waits on a slow leg.
    sb_round: Mutex<()>,
    retry: Mutex<Vec<Retry>>,
    state_file: Option<PathBuf>,
}

impl MetaRuntime {
    pub(crate) fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn resync_status(&self) -> Option<ResyncStatus> {
        self.resync.lock().ok().and_then(|r| r.clone())
    }
}

/// A page-aligned buffer for the mirror's own I/O (O_DIRECT legs need the alignment).
pub(crate) struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: IoBuf owns its allocation; the raw pointer is only handed to legs through `bufs`, whose
// contract keeps the IoBuf alive (as the request's keep-alive) until they are done.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only read through `as_slice`, which callers use once no leg writes.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    pub(crate) fn new(len: usize) -> Arc<IoBuf> {
        let len = len.max(ALIGN as usize);
        let layout = AllocLayout::from_size_align(len, ALIGN as usize).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Arc::new(IoBuf { ptr, len })
    }

    /// The first `len` bytes as request buffers.
    fn bufs(&self, len: usize) -> Buffers {
        let mut b = Buffers::new();
        // SAFETY: the range lies inside the allocation, which the request's keep-alive (an Arc of
        // this IoBuf) holds until every leg is done with it.
        unsafe { b.push(self.ptr.as_ptr(), len.min(self.len)) };
        b
    }

    /// Contents; only meaningful while no request on the buffer is in flight.
    fn as_slice(&self, len: usize) -> &[u8] {
        // SAFETY: the allocation is `self.len` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len.min(self.len)) }
    }

    /// Fills the buffer; only while no request on it is in flight.
    fn fill(&self, data: &[u8]) {
        let n = data.len().min(self.len);
        // SAFETY: n bytes fit in the allocation, and no leg holds the buffer (caller's promise).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr(), n) };
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let layout = AllocLayout::from_size_align(self.len, ALIGN as usize).expect("valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// Reads both superblock slots of a leg through `io` and returns the newer valid one.
fn read_superblock(
    capacity: u64,
    mut io: impl FnMut(LegOp, Arc<IoBuf>) -> InternalResult,
) -> Result<Result<Superblock, MetaError>, LegError> {
    let mut slots = Vec::new();
    for slot in 0..2 {
        let buf = IoBuf::new(SB_SIZE as usize);
        io(
            LegOp::Read {
                offset: meta::sb_offset(capacity, slot),
                bufs: buf.bufs(SB_SIZE as usize),
            },
            buf.clone(),
        )?;
        slots.push(Superblock::decode(buf.as_slice(SB_SIZE as usize)));
    }
    let b = slots.pop().unwrap_or(Err(MetaError::NoMetadata));
    let a = slots.pop().unwrap_or(Err(MetaError::NoMetadata));
    Ok(Superblock::pick(a, b))
}

/// What `load` decided.
pub(crate) struct Plan {
    current: Vec<usize>,
    stale: Vec<usize>,
}

pub(crate) struct Startup {
    pub(crate) runtime: MetaRuntime,
    pub(crate) plan: Plan,
}

fn data_layout(leg_capacity: u64, chunk: u64, data_size: u64) -> Result<Layout, MetaError> {
    let l = Layout::new(leg_capacity, chunk)?;
    if data_size > l.data_size || !data_size.is_multiple_of(ALIGN) {
        return Err(MetaError::Mismatch(format!(
            "the mirror's data area ({data_size} bytes) does not fit this leg ({leg_capacity} bytes)"
        )));
    }
    Ok(Layout {
        data_size,
        chunks: data_size.div_ceil(chunk),
        ..l
    })
}

/// Reads every leg's metadata and decides which legs are current.
pub(crate) fn load<C: Send + 'static>(inner: &Inner<C>) -> Result<Startup, MirrorError> {
    let mut sbs = Vec::new();
    for (i, l) in inner.legs.iter().enumerate() {
        let sb = read_superblock(l.capacity, |op, keep| inner.leg_io(i, op, keep))
            .map_err(|err| MirrorError::MetaIo {
                leg: i,
                uri: l.uri.clone(),
                err,
            })?
            .map_err(|source| MirrorError::Meta {
                leg: i,
                uri: l.uri.clone(),
                source,
            })?;
        sbs.push(sb);
    }
    let asm = assemble(&sbs, inner.cfg.force_current).map_err(MirrorError::Assemble)?;
    let src = &sbs[asm.source];
    let chunk = src.chunk_size;
    let mut leg_layouts = Vec::new();
    for (i, l) in inner.legs.iter().enumerate() {
        leg_layouts.push(
            data_layout(l.capacity, chunk, src.data_size).map_err(|source| MirrorError::Meta {
                leg: i,
                uri: l.uri.clone(),
                source,
            })?,
        );
    }
    let layout = leg_layouts[asm.source];
    let chunks = ChunkMap::new(layout.chunks);
    // Bits of every leg still counted as current: after a crash they may differ, and the union
    // covers every write that might have reached one leg and not another.
    let bm_len = layout.chunks.div_ceil(8) as usize;
    for &i in &asm.current {
        let l = &leg_layouts[i];
        let buf = IoBuf::new(l.bitmap_len as usize);
        inner
            .leg_io(
                i,
                LegOp::Read {
                    offset: l.bitmap_offset(),
                    bufs: buf.bufs(l.bitmap_len as usize),
                },
                buf.clone(),
            )
            .map_err(|err| MirrorError::MetaIo {
                leg: i,
                uri: inner.legs[i].uri.clone(),
                err,
            })?;
        chunks.persisted.or_bytes(buf.as_slice(bm_len));
    }
    let clean = src.clean;
    let (current, mut stale) = if clean {
        (asm.current.clone(), asm.stale.clone())
    } else {
        // An unclean stop may have left writes on some current legs only: the source's copy of
        // every dirty chunk wins, so the others are brought level with it.
        let mut stale = asm.stale.clone();
        stale.extend(asm.current.iter().filter(|&&i| i != asm.source));
        (vec![asm.source], stale)
    };
    stale.sort_unstable();
    let mut view = src.legs.clone();
    for &i in &current {
        view[i] = PeerRecord {
            state: PeerState::UpToDate,
            good_gen: asm.generation,
        };
    }
    info!(
        "mirror {} generation {}: current legs {:?}, to resync {:?}, {} dirty chunks of {} bytes{}",
        src.uuid_string(),
        asm.generation,
        current,
        stale,
        chunks.persisted.count(),
        chunk,
        if clean { "" } else { " (unclean stop)" }
    );
    let state_file = inner
        .cfg
        .state_dir
        .as_ref()
        .map(|d| d.join(format!("mirror-{}.json", src.uuid_string())));
    if let Some(f) = &state_file {
        check_state_file(f, asm.generation);
    }
    let runtime = MetaRuntime {
        layout,
        leg_layouts,
        chunks,
        meta: Mutex::new(Meta {
            uuid: src.uuid,
            generation: asm.generation,
            view,
            seq: sbs.iter().map(|s| s.seq).collect(),
        }),
        resync_paused: AtomicBool::new(false),
        resync_rate: AtomicU64::new(inner.cfg.resync_rate),
        resync_busy_rate: AtomicU64::new(inner.cfg.resync_busy_rate),
        resync: Mutex::new(None),
        resync_running: AtomicBool::new(false),
        sb_round: Mutex::new(()),
        retry: Mutex::new(
            (0..inner.legs.len())
                .map(|_| Retry {
                    next: Instant::now(),
                    backoff: Duration::from_secs(1),
                    refused: false,
                    manual: false,
                    busy: Arc::new(AtomicBool::new(false)),
                })
                .collect(),
        ),
        state_file,
    };
    Ok(Startup {
        runtime,
        plan: Plan { current, stale },
    })
}

fn check_state_file(path: &PathBuf, generation: u64) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        warn!(
            "state file {} is not JSON; it will be rewritten",
            path.display()
        );
        return;
    };
    if let Some(g) = v.get("generation").and_then(|g| g.as_u64()) {
        if g > generation {
            warn!(
                "state file {} recorded generation {g}, but the legs hold only {generation}: a leg \
                 with newer data may be missing",
                path.display()
            );
        }
    }
}

/// Puts the plan into effect: current legs serve, stale legs start resyncing.
pub(crate) fn start<C: Send + 'static>(inner: &Inner<C>, plan: Plan) -> Result<(), MirrorError> {
    let Some(md) = inner.md() else { return Ok(()) };
    for &i in &plan.current {
        inner.legs[i].set_state(LegState::UpToDate);
    }
    for &i in &plan.stale {
        inner.legs[i].set_state(LegState::Outdated);
    }
    let mask = plan.current.iter().fold(0, |m, &i| m | bit(i));
    write_superblocks(inner, md, mask, false);
    if inner.up_to_date() == 0 {
        return Err(MirrorError::Refused(
            "no current leg could be written".into(),
        ));
    }
    for &i in &plan.stale {
        begin_resync(inner, md, i);
    }
    Ok(())
}

/// Runs the mirror's own requests on several legs at once and waits for all of them.
fn parallel_io<C: Send + 'static>(
    inner: &Inner<C>,
    reqs: Vec<(usize, LegOp, Arc<IoBuf>)>,
) -> Vec<(usize, InternalResult)> {
    let pending: Vec<_> = reqs
        .into_iter()
        .map(|(leg, op, buf)| (leg, inner.leg_io_start(leg, op, buf)))
        .collect();
    pending
        .into_iter()
        .map(|(leg, rx)| (leg, inner.leg_io_wait(&rx)))
        .collect()
}

fn legs_of(mask: Mask, n: usize) -> impl Iterator<Item = usize> {
    (0..n).filter(move |&i| mask & bit(i) != 0)
}

/// Writes every leg in `mask` its superblock from the current view (each to the slot after the
/// one it last wrote). A leg that fails the write is ejected.
fn write_superblocks<C: Send + 'static>(
    inner: &Inner<C>,
    md: &MetaRuntime,
    mask: Mask,
    clean: bool,
) {
    let _round = md.sb_round.lock().unwrap_or_else(|p| p.into_inner());
    let mut m = md.meta();
    let mut reqs = Vec::new();
    for i in legs_of(mask, inner.legs.len()) {
        m.seq[i] += 1;
        let sb = Superblock {
            uuid: m.uuid,
            seq: m.seq[i],
            generation: m.generation,
            leg_index: i as u32,
            chunk_size: md.layout.chunk_size,
            data_size: md.layout.data_size,
            clean,
            legs: m.view.clone(),
        };
        let buf = IoBuf::new(SB_SIZE as usize);
        buf.fill(&sb.encode());
        let op = LegOp::Write {
            offset: md.leg_layouts[i].sb_offset(m.seq[i] % 2),
            bufs: buf.bufs(SB_SIZE as usize),
            fua: true,
        };
        reqs.push((i, op, buf));
    }
    let generation = m.generation;
    let views = m.view.clone();
    let uuid = m.uuid;
    drop(m);
    let results = parallel_io(inner, reqs);
    for (i, r) in results {
        if let Err(e) = r {
            inner.eject(i, &format!("superblock write failed: {e}"));
        }
    }
    if let Some(path) = &md.state_file {
        let legs: Vec<_> = inner
            .legs
            .iter()
            .zip(&views)
            .map(|(l, v)| serde_json::json!({ "uri": l.uri, "state": l.state(), "good_gen": v.good_gen }))
            .collect();
        let doc = serde_json::json!({
            "uuid": uuid::Uuid::from_bytes(uuid).to_string(),
            "generation": generation,
            "legs": legs,
        });
        let tmp = path.with_extension("tmp");
        let res = std::fs::write(&tmp, doc.to_string()).and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = res {
            warn!("cannot write state file {}: {e}", path.display());
        }
    }
    debug!("superblocks written: generation {generation}, clean {clean}");
}

/// Writes the bitmap pages `pages` (4 KiB each) from `image` to every leg that takes writes.
fn write_bitmap_pages<C: Send + 'static>(
    inner: &Inner<C>,
    md: &MetaRuntime,
    pages: &BTreeSet<u64>,
    image: &[u8],
) {
    let mut reqs = Vec::new();
    for i in legs_of(inner_write_set(inner), inner.legs.len()) {
        for &p in pages {
            let start = (p * ALIGN) as usize;
            let end = (start + ALIGN as usize).min(image.len());
            if start >= end {
                continue;
            }
            let buf = IoBuf::new(ALIGN as usize);
            buf.fill(&image[start..end]);
            let op = LegOp::Write {
                offset: md.leg_layouts[i].bitmap_offset() + p * ALIGN,
                bufs: buf.bufs(ALIGN as usize),
                fua: true,
            };
            reqs.push((i, op, buf));
        }
    }
    let mut failed: Mask = 0;
    for (i, r) in parallel_io(inner, reqs) {
        if let Err(e) = r {
            if failed & bit(i) == 0 {
                failed |= bit(i);
                inner.eject(i, &format!("bitmap write failed: {e}"));
            }
        }
    }
}

fn inner_write_set<C: Send + 'static>(inner: &Inner<C>) -> Mask {
    inner
        .legs
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l.state(), LegState::UpToDate | LegState::Resyncing))
        .fold(0, |m, (i, _)| m | bit(i))
}

fn page_of(chunk: u64) -> u64 {
    chunk / (ALIGN * 8)
}

/// Puts wanted bits on disk, then lets the writes waiting for them go.
fn flush_bitmap<C: Send + 'static>(inner: &Inner<C>, md: &MetaRuntime) {
    let new: Vec<u64> = md
        .chunks
        .wanted
        .ones()
        .into_iter()
        .filter(|&c| !md.chunks.persisted.get(c))
        .collect();
    for c in md.chunks.wanted.ones() {
        md.chunks.wanted.clear(c);
    }
    if !new.is_empty() {
        let mut image = md.chunks.persisted.to_bytes(md.layout.bitmap_len as usize);
        let mut pages = BTreeSet::new();
        for &c in &new {
            image[(c / 8) as usize] |= 1 << (c % 8);
            pages.insert(page_of(c));
        }
        write_bitmap_pages(inner, md, &pages, &image);
        for &c in &new {
            md.chunks.persisted.set(c);
        }
    }
    inner.kick_parked();
}

/// Clears the bits of chunks every leg holds and nobody writes, and puts that on disk.
fn sweep<C: Send + 'static>(inner: &Inner<C>, md: &MetaRuntime, force: bool) {
    let all_current =
        |inner: &Inner<C>| inner.up_to_date().count_ones() as usize == inner.legs.len();
    if !all_current(inner) || md.resync_running.load(Ordering::SeqCst) {
        return;
    }
    let mut cleared = Vec::new();
    for c in md.chunks.persisted.ones() {
        if force {
            md.chunks.touched.clear(c);
        }
        if md.chunks.try_clean(c) {
            cleared.push(c);
        }
    }
    if cleared.is_empty() {
        return;
    }
    if !all_current(inner) {
        // A leg fell out while we looked: it missed whatever was written meanwhile.
        for c in cleared {
            md.chunks.persisted.set(c);
        }
        return;
    }
    let image = md.chunks.persisted.to_bytes(md.layout.bitmap_len as usize);
    let pages: BTreeSet<u64> = cleared.iter().map(|&c| page_of(c)).collect();
    write_bitmap_pages(inner, md, &pages, &image);
    debug!("cleared {} bitmap bits", cleared.len());
}

/// A leg left the set: the ones that remain record it and move to a new generation.
fn on_ejected<C: Send + 'static>(inner: &Inner<C>, md: &MetaRuntime, leg: usize) {
    {
        let mut m = md.meta();
        let old = m.generation;
        m.generation += 1;
        let new = m.generation;
        for (i, l) in inner.legs.iter().enumerate() {
            let v = &mut m.view[i];
            match l.state() {
                LegState::UpToDate => {
                    *v = PeerRecord {
                        state: PeerState::UpToDate,
                        good_gen: new,
                    }
                }
                LegState::Resyncing => v.state = PeerState::Resyncing,
                LegState::Failed | LegState::Outdated => {
                    // A leg being resynced took every write and every superblock (at `old`)
                    // like an up-to-date one, only not yet every old chunk, which the bitmap
                    // still holds. Recording `old` lets it come back with the superblock we
                    // wrote it; left at its earlier value, that superblock would look written
                    // elsewhere, a split brain that never happened.
                    if matches!(v.state, PeerState::UpToDate | PeerState::Resyncing) {
                        *v = PeerRecord {
                            state: PeerState::Outdated,
                            good_gen: old,
                        };
                    } else {
                        v.state = PeerState::Outdated;
                    }
                }
            }
        }
        info!(
            "generation {old} -> {new}: leg {leg} {} recorded as outdated",
            inner.legs[leg].uri
        );
    }
    write_superblocks(inner, md, inner_write_set(inner), false);
    inner.release_held();
    if let Ok(mut r) = md.retry.lock() {
        if let Some(r) = r.get_mut(leg) {
            r.next = Instant::now() + Duration::from_secs(1);
            r.backoff = Duration::from_secs(1);
        }
    }
}

/// Makes `leg` take writes and starts copying the chunks it missed.
fn begin_resync<C: Send + 'static>(inner: &Inner<C>, md: &MetaRuntime, leg: usize) {
    let l = &inner.legs[leg];
    let synced = Arc::new(AtomicBits::new(md.layout.chunks));
    if let Ok(mut s) = l.synced.write() {
        *s = Some(synced.clone());
    }
    // Join the write set first, then look at the bitmap: every write sent without this leg had
    // its bit on disk before it went out, and no bit is cleared while a leg is behind.
    l.set_state(LegState::Resyncing);
    let dirty = md.chunks.persisted.ones();
    let dirty_set: BTreeSet<u64> = dirty.iter().copied().collect();
    for c in 0..md.layout.chunks {
        if !dirty_set.contains(&c) {
            synced.set(c);
        }
    }
    {
        let mut m = md.meta();
        m.view[leg].state = PeerState::Resyncing;
    }
    write_superblocks(inner, md, inner_write_set(inner), false);
    let total: u64 = dirty.iter().map(|&c| chunk_len(md, c)).sum();
    info!(
        "leg {leg} {}: resyncing {} dirty chunks ({total} bytes)",
        l.uri,
        dirty.len()
    );
    let conn = l.epoch.load(Ordering::SeqCst);
    let Some(me) = inner.arc() else { return };
    let spawned = thread::Builder::new()
        .name("mirror-resync".into())
        .spawn(move || resync(&me, leg, conn, dirty, total));
    if let Err(e) = spawned {
        error!("cannot start resync thread: {e}");
    }
}

fn chunk_len(md: &MetaRuntime, c: u64) -> u64 {
    let off = c * md.layout.chunk_size;
    md.layout
        .chunk_size
        .min(md.layout.data_size.saturating_sub(off))
}

/// The slot of `Inner::copying` repair uses; the resync has the ones below it.
const REPAIR_SLOT: usize = RESYNC_WINDOW;

/// Guest writes to this chunk were still in flight long after it was locked.
struct Busy;

/// A chunk locked for copying: guest writes to it wait (parked) until this is dropped, which
/// must not happen before the copy's write has landed.
struct Hold<'a, C: Send + 'static> {
    inner: &'a Inner<C>,
    slot: usize,
}

impl<C: Send + 'static> Drop for Hold<'_, C> {
    fn drop(&mut self) {
        self.inner.copying[self.slot].store(u64::MAX, Ordering::SeqCst);
        self.inner.kick_parked();
    }
}

/// Locks chunk `c` in `slot` and waits until the guest writes already sent to it are done.
fn hold_chunk<'a, C: Send + 'static>(
    inner: &'a Inner<C>,
    md: &MetaRuntime,
    slot: usize,
    c: u64,
) -> Result<Hold<'a, C>, Busy> {
    inner.copying[slot].store(c, Ordering::SeqCst);
    let hold = Hold { inner, slot };
    let t0 = Instant::now();
    while md.chunks.inflight(c) != 0 {
        if t0.elapsed()
            > inner
                .cfg
                .io_timeout
                .saturating_mul(4)
                .saturating_add(Duration::from_secs(5))
        {
            return Err(Busy);
        }
        thread::sleep(Duration::from_micros(50));
    }
    Ok(hold)
}

/// Starts reading chunk `c` of leg `src` into `buf`.
fn start_read_chunk<C: Send + 'static>(
    inner: &Inner<C>,
    md: &MetaRuntime,
    c: u64,
    src: usize,
    buf: &Arc<IoBuf>,
) -> Receiver<InternalResult> {
    let op = LegOp::Read {
        offset: c * md.layout.chunk_size,
        bufs: buf.bufs(chunk_len(md, c) as usize),
    };
    inner.leg_io_start(src, op, buf.clone())
}

/// Reads chunk `c` of leg `src` into `buf`; returns its length.
fn read_chunk<C: Send + 'static>(
    inner: &Inner<C>,
    md: &MetaRuntime,
    c: u64,
    src: usize,
    buf: &Arc<IoBuf>,
) -> Result<u64, LegError> {
    let rx = start_read_chunk(inner, md, c, src, buf);
    inner.leg_io_wait(&rx).map(|()| chunk_len(md, c))
}

/// The outcome of a request sent with `Inner::leg_io_start`, if it has arrived.
fn io_done(rx: &Receiver<InternalResult>) -> Option<InternalResult> {
    match rx.try_recv() {
        Ok(r) => Some(r),
        Err(crossbeam_channel::TryRecvError::Empty) => None,
        Err(crossbeam_channel::TryRecvError::Disconnected) => Some(Err(LegError::Lost(
            "request dropped without an answer".into(),
        ))),
    }
}

/// Starts writing the first `len` bytes of `buf` (whose read has completed) as chunk `c` of
/// leg `dst`; true if it went as write-zeroes, which only `may_zero` allows.
///
/// A chunk of zeros (unwritten space of a thin disk; most of a new disk's first full sync)
/// goes out as write-zeroes where the target offers it, as DRBD turns zero resync blocks into
/// zeroing: no payload crosses to the target, and a file or NBD leg zeroes the range without
/// writing data. Not `may_unmap`: a preallocated target stays allocated.
fn start_write_chunk<C: Send + 'static>(
    inner: &Inner<C>,
    md: &MetaRuntime,
    c: u64,
    len: u64,
    dst: usize,
    buf: &Arc<IoBuf>,
    may_zero: bool,
) -> (Receiver<InternalResult>, bool) {
    let offset = c * md.layout.chunk_size;
    let zeroes = may_zero
        && inner.legs[dst].handle().info().write_zeroes
        && is_zero(buf.as_slice(len as usize));
    let op = if zeroes {
        LegOp::WriteZeroes {
            offset,
            len,
            may_unmap: false,
        }
    } else {
        LegOp::Write {
            offset,
            bufs: buf.bufs(len as usize),
            fua: false,
        }
    };
    (inner.leg_io_start(dst, op, buf.clone()), zeroes)
}

/// Whether every byte is zero. Stops at the first 64-byte block holding data (random data: at
/// once); the OR over a block compiles to vector instructions.
fn is_zero(data: &[u8]) -> bool {
    let blocks = data.chunks_exact(64);
    let rest = blocks.remainder();
    blocks
        .into_iter()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && rest.iter().all(|&x| x == 0)
}

enum CopyError {
    Source(LegError),
    Target(LegError),
    Busy,
}

/// Copies chunk `c` from `src` to `dst` with guest writes to it held off (repair).
fn copy_chunk<C: Send + 'static>(
    inner: &Inner<C>,
    md: &MetaRuntime,
    c: u64,
    src: usize,
    dst: usize,
    buf: &Arc<IoBuf>,
) -> Result<u64, CopyError> {
    let _hold = hold_chunk(inner, md, REPAIR_SLOT, c).map_err(|Busy| CopyError::Busy)?;
    let len = read_chunk(inner, md, c, src, buf).map_err(CopyError::Source)?;
    let (rx, _) = start_write_chunk(inner, md, c, len, dst, buf, true);
    inner.leg_io_wait(&rx).map_err(CopyError::Target)?;
    Ok(len)
}

/// Where one chunk of a resync is.
enum Step {
    /// Being read from the source leg.
    Reading { src: usize },
    /// Being written to the target; `len` bytes, as write-zeroes if `zeroes`.
    Writing { len: u64, zeroes: bool },
}

/// One chunk of a resync in flight, in slot (and buffer) `slot`; the chunk stays locked until
/// its write has landed.
struct Copy<'a, C: Send + 'static> {
    c: u64,
    slot: usize,
    step: Step,
    rx: Receiver<InternalResult>,
    _hold: Hold<'a, C>,
}

fn pick_source<C: Send + 'static>(inner: &Inner<C>, not: usize) -> Option<usize> {
    (0..inner.legs.len()).find(|&i| i != not && inner.legs[i].state() == LegState::UpToDate)
}

fn set_resync(md: &MetaRuntime, s: Option<ResyncStatus>) {
    if let Ok(mut r) = md.resync.lock() {
        *r = s;
    }
}

/// How long after the last guest request the resync still counts the guest as busy: short
/// pauses between a guest's bursts do not hand the legs back to a full-speed copy.
const GUEST_BUSY_HOLD: Duration = Duration::from_millis(200);

/// A running resync's account: what has landed, what the control socket shows, the pace.
struct Progress<'a> {
    md: &'a MetaRuntime,
    /// Chunks current on the target.
    synced: Option<Arc<AtomicBits>>,
    t0: Instant,
    status: ResyncStatus,
    pacer: Pacer,
    /// The target failed a write-zeroes: zero chunks go as data for the rest of the resync.
    no_zeroes: bool,
}

impl Progress<'_> {
    fn publish(&self) {
        set_resync(self.md, Some(self.status.clone()));
    }

    /// Chunk `c` (`len` bytes, zeros sent as write-zeroes if `zeroes`) has landed on the
    /// target: it is current there.
    fn landed(&mut self, c: u64, len: u64, zeroes: bool) {
        if let Some(s) = &self.synced {
            s.set(c);
        }
        self.status.done_bytes += len;
        if zeroes {
            self.status.zeroed_bytes += len;
        }
        let secs = self.t0.elapsed().as_secs_f64().max(1e-6);
        self.status.rate = (self.status.done_bytes as f64 / secs) as u64;
        self.publish();
    }

    /// [`Progress::rate`] with the guest's activity as of now.
    fn rate_now<C: Send + 'static>(&mut self, inner: &Inner<C>) -> u64 {
        self.rate(guest_busy(
            inner.last_guest_io.load(Ordering::Relaxed),
            coarse_now(),
        ))
    }

    /// The rate in force (bytes per second, 0 for none): `--resync-rate`, lowered to
    /// `--resync-busy-rate` while the guest is `busy`.
    fn rate(&mut self, busy: bool) -> u64 {
        let cap = self.md.resync_rate.load(Ordering::SeqCst);
        let busy_rate = self.md.resync_busy_rate.load(Ordering::SeqCst);
        let yielding = busy && busy_rate != 0 && (cap == 0 || busy_rate < cap);
        if yielding != self.status.yielding {
            self.status.yielding = yielding;
            self.publish();
        }
        if yielding {
            busy_rate
        } else {
            cap
        }
    }
}

/// Whether the guest did I/O within [`GUEST_BUSY_HOLD`] of `now`, given when it last did
/// (`Inner::last_guest_io`: nanoseconds on the coarse clock, 0 for never).
fn guest_busy(last_guest_io: u64, now: Duration) -> bool {
    last_guest_io != 0 && now.saturating_sub(Duration::from_nanos(last_guest_io)) < GUEST_BUSY_HOLD
}

/// Spaces chunk starts to keep a copy to a rate.
struct Pacer {
    /// Earliest start of the next chunk under the rate in force.
    next: Instant,
}

impl Pacer {
    /// How long to wait before a chunk of `len` bytes may start at `rate` (bytes per second, 0
    /// for no limit); when it may, the start is booked. Time the copy spent below the rate is
    /// made up by one chunk at most, so a rate that drops (the guest wakes up) holds from the
    /// next chunk on rather than after a burst.
    fn pace(&mut self, rate: u64, len: u64, now: Instant) -> Duration {
        if rate == 0 {
            self.next = now;
            return Duration::ZERO;
        }
        if self.next > now {
            return self.next - now;
        }
        let step = Duration::from_secs_f64(len as f64 / rate as f64);
        let earliest = now.checked_sub(step).unwrap_or(now);
        self.next = self.next.max(earliest) + step;
        Duration::ZERO
    }
}

/// Bytes of chunks a resync keeps in flight at most: [`RESYNC_WINDOW`] chunks of the default 1 MiB,
/// fewer of larger ones.
const RESYNC_BYTES_IN_FLIGHT: u64 = 8 << 20;

/// Bytes a resync lets land on its target between two of its flushes.
const RESYNC_FLUSH_EVERY: u64 = 32 << 20;

/// Flushes a resync's target while the copy runs, one flush at a time, each once
/// [`RESYNC_FLUSH_EVERY`] bytes have landed since the last one started. A target that writes
/// through a page cache (nbdkit's file plugin, a file leg on a host without O_DIRECT) then writes
/// back during the copy, and the flush that must end the resync before the leg counts as up to
/// date waits for the last few chunks, not for the whole copy: on a 1 GiB copy here that final
/// flush had taken 0.3-0.4 s, a fixed cost on top of the copy's time with a single good copy.
/// While the resync yields to the guest it does not flush either: a flush makes the target write
/// back the guest's writes too, and the guest's own I/O would wait behind it (client IOPS during
/// a resync under load 0.82-0.85x of steady with these flushes, 0.94-0.95x without; the resync
/// is slow then, and its last flush waits for what is left).
struct Flusher {
    in_flight: Option<Receiver<InternalResult>>,
    /// Bytes landed when the last flush started.
    at: u64,
    /// The target does not flush: nothing to wait for, and no more tries.
    off: bool,
}

impl Flusher {
    /// Books the flush in flight if it is done, then starts one if it is due with `landed`
    /// bytes on the target and the resync not `yielding` to the guest. A failed flush is the
    /// target's failure.
    fn step<C: Send + 'static>(
        &mut self,
        inner: &Inner<C>,
        leg: usize,
        landed: u64,
        yielding: bool,
    ) -> Result<(), LegError> {
        if let Some(rx) = &self.in_flight {
            let Some(r) = io_done(rx) else { return Ok(()) };
            self.in_flight = None;
            self.book(r)?;
        }
        if !self.off && !yielding && landed.saturating_sub(self.at) >= RESYNC_FLUSH_EVERY {
            self.at = landed;
            self.in_flight = Some(inner.leg_io_start(leg, LegOp::Flush, IoBuf::new(0)));
        }
        Ok(())
    }

    /// The flush that ends the resync: waits for the one in flight, then flushes what landed
    /// since (nothing to do on a target that does not flush).
    fn last<C: Send + 'static>(&mut self, inner: &Inner<C>, leg: usize) -> Result<(), LegError> {
        if let Some(rx) = self.in_flight.take() {
            self.book(inner.leg_io_wait(&rx))?;
        }
        if self.off {
            return Ok(());
        }
        self.book(inner.leg_io(leg, LegOp::Flush, IoBuf::new(0)))
    }

    fn book(&mut self, r: InternalResult) -> Result<(), LegError> {
        match r {
            Err(LegError::Unsupported) => {
                self.off = true;
                Ok(())
            }
            r => r,
        }
    }
}

/// What became of a copy whose step had an outcome.
enum Advanced<'a, C: Send + 'static> {
    /// Read: now being written.
    Writing(Copy<'a, C>),
    /// Written: current on the target.
    Landed,
    /// The source failed (and was ejected): chunk `0` must be copied again.
    Retry(u64),
    /// The target failed: the resync cannot go on.
    TargetFailed(LegError),
    /// Chunk `0` could not be read from leg `1`, the last up-to-date leg, with a device error
    /// (`2`): it stays, and the resync cannot go on.
    SourceUnreadable(u64, usize, LegError),
}

/// Books what became of the copy in `slot`: its slot is freed once it has landed or must be
/// retried (the chunk queued in `retry`). Returns the copy if it is still in flight, and why the
/// resync cannot go on if it cannot (the reason its target leaves with).
fn settle<'a, C: Send + 'static>(
    a: Advanced<'a, C>,
    slot: usize,
    free: &mut Vec<usize>,
    retry: &mut Vec<u64>,
) -> Result<Option<Copy<'a, C>>, String> {
    match a {
        Advanced::Writing(w) => return Ok(Some(w)),
        Advanced::Landed => {}
        Advanced::Retry(c) => retry.push(c),
        Advanced::TargetFailed(e) => return Err(format!("resync write failed: {e}")),
        Advanced::SourceUnreadable(c, src, e) => {
            return Err(format!(
                "chunk {c} could not be read from leg {src}, the last up-to-date leg ({e}); \
                 that leg stays, and this one is resynced when it returns"
            ))
        }
    }
    free.push(slot);
    Ok(None)
}

/// Moves copy `w` on once its current step has `outcome`.
fn advance<'a, C: Send + 'static>(
    inner: &'a Inner<C>,
    md: &MetaRuntime,
    leg: usize,
    bufs: &mut [Arc<IoBuf>],
    p: &mut Progress<'_>,
    mut w: Copy<'a, C>,
    outcome: InternalResult,
) -> Advanced<'a, C> {
    match (&w.step, outcome) {
        (&Step::Reading { src }, Ok(())) if inner.legs[src].state() != LegState::UpToDate => {
            // The source left while this read was out, maybe for failing a guest write that
            // the target took (the write's chunk count ended just before the source was marked
            // failed, which let this copy hold the chunk): what it read may be older than what
            // the target holds. Its completion came after that mark (both under the request
            // table's lock), so looking now is enough. Read again, from a leg still current.
            bufs[w.slot] = IoBuf::new(md.layout.chunk_size as usize);
            Advanced::Retry(w.c)
        }
        (Step::Reading { .. }, Ok(())) => {
            let len = chunk_len(md, w.c);
            let may_zero = !p.no_zeroes;
            let (rx, zeroes) = start_write_chunk(inner, md, w.c, len, leg, &bufs[w.slot], may_zero);
            w.rx = rx;
            w.step = Step::Writing { len, zeroes };
            Advanced::Writing(w)
        }
        (
            &Step::Writing { len, zeroes: true },
            Err(e @ (LegError::Io(_) | LegError::Unsupported)),
        ) => {
            // A server that offers write-zeroes and then fails it would otherwise fail every
            // resync at the same chunk; the zeros go as data instead, from now on.
            if !p.no_zeroes {
                warn!(
                    "resync of leg {leg}: write-zeroes of chunk {} failed ({e}); zeros go as \
                     data for the rest of this resync",
                    w.c
                );
                p.no_zeroes = true;
            }
            let (rx, _) = start_write_chunk(inner, md, w.c, len, leg, &bufs[w.slot], false);
            w.rx = rx;
            w.step = Step::Writing { len, zeroes: false };
            Advanced::Writing(w)
        }
        (&Step::Reading { src }, Err(e)) if !e.is_fatal() && inner.up_to_date() == bit(src) => {
            // A bad block on the only complete copy: ejecting that leg would leave none (the
            // guest's reads of chunks not yet copied would fail, the next start would see a
            // split brain). It stays, as a guest read's bad block keeps a leg; the target
            // leaves and tries again when it returns, after its backoff.
            bufs[w.slot] = IoBuf::new(md.layout.chunk_size as usize);
            Advanced::SourceUnreadable(w.c, src, e)
        }
        (Step::Reading { src }, Err(e)) => {
            // A late answer could still land in this buffer: the slot gets a fresh one.
            bufs[w.slot] = IoBuf::new(md.layout.chunk_size as usize);
            warn!(
                "resync of leg {leg}: chunk {} could not be read from leg {src} ({e}); it is \
                 copied again from another leg",
                w.c
            );
            inner.eject(*src, &format!("resync read failed: {e}"));
            Advanced::Retry(w.c)
        }
        (Step::Writing { len, zeroes }, Ok(())) => {
            p.landed(w.c, *len, *zeroes);
            Advanced::Landed
        }
        (Step::Writing { .. }, Err(e)) => Advanced::TargetFailed(e),
    }
}

/// Copies `dirty` to `leg`, then marks it up to date. Up to [`RESYNC_WINDOW`] chunks are in
/// flight, each read from the source and then written to the target under its chunk lock, so
/// reads and writes overlap and the copy runs at the legs' bandwidth rather than at one
/// chunk's round trip.
///
/// `conn` is the leg's connection (epoch) the copy is for. A connection that replaces it (the
/// leg lost and back again before this resync noticed) gets a resync of its own: this one then
/// stops, and nothing it learns, a failure or the end of its copy, acts on the new connection.
fn resync<C: Send + 'static>(
    inner: &Arc<Inner<C>>,
    leg: usize,
    conn: u64,
    dirty: Vec<u64>,
    total: u64,
) {
    let Some(md) = inner.md() else { return };
    if md.resync_running.swap(true, Ordering::SeqCst) {
        // One resync at a time; this leg waits its turn.
        while md.resync_running.swap(true, Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(20));
        }
    }
    let l = &inner.legs[leg];
    let replaced = || l.epoch.load(Ordering::SeqCst) != conn;
    let fail = |why: String| {
        if !replaced() {
            inner.eject(leg, &why);
        }
    };
    let chunk = md.layout.chunk_size;
    // Up to RESYNC_BYTES_IN_FLIGHT: with large chunks (up to 1 GiB) a full window of buffers
    // would be gigabytes.
    let slots = (RESYNC_BYTES_IN_FLIGHT / chunk).clamp(1, RESYNC_WINDOW as u64) as usize;
    let mut bufs: Vec<Arc<IoBuf>> = (0..slots).map(|_| IoBuf::new(chunk as usize)).collect();
    let mut free: Vec<usize> = (0..slots).rev().collect();
    let mut window: std::collections::VecDeque<Copy<C>> = std::collections::VecDeque::new();
    let mut p = Progress {
        md,
        synced: l.synced.read().ok().and_then(|s| s.clone()),
        t0: Instant::now(),
        status: ResyncStatus {
            leg,
            done_bytes: 0,
            zeroed_bytes: 0,
            total_bytes: total,
            rate: 0,
            paused: false,
            yielding: false,
        },
        pacer: Pacer {
            next: Instant::now(),
        },
        no_zeroes: false,
    };
    p.publish();
    let mut flusher = Flusher {
        in_flight: None,
        at: 0,
        off: false,
    };
    let mut k = 0;
    // Chunks whose read failed, to copy again from another source.
    let mut retry: Vec<u64> = Vec::new();
    let mut finished = true;
    loop {
        if inner.stopping.load(Ordering::SeqCst) || l.state() != LegState::Resyncing || replaced() {
            finished = false;
            break;
        }
        // Start chunks while the window has room, unless paused, ahead of the rate cap or
        // without a source: then the copies in flight land first, and no chunk stays locked
        // meanwhile (guest writes to it would wait as long).
        let paused = md.resync_paused.load(Ordering::SeqCst);
        let mut wait = Duration::ZERO;
        let mut no_source = false;
        while (k < dirty.len() || !retry.is_empty()) && !paused {
            let Some(&slot) = free.last() else { break };
            let now = Instant::now();
            let rate = p.rate_now(inner);
            wait = p.pacer.pace(rate, chunk, now);
            if !wait.is_zero() {
                break;
            }
            let Some(src) = pick_source(inner, leg) else {
                no_source = true;
                break;
            };
            // Lazily: a chunk to retry can come after the last dirty chunk has started.
            let c = retry.last().copied().unwrap_or_else(|| dirty[k]);
            match hold_chunk(inner, md, slot, c) {
                Ok(hold) => {
                    free.pop();
                    if retry.pop().is_none() {
                        k += 1;
                    }
                    window.push_back(Copy {
                        c,
                        slot,
                        step: Step::Reading { src },
                        rx: start_read_chunk(inner, md, c, src, &bufs[slot]),
                        _hold: hold,
                    });
                }
                Err(Busy) => {
                    warn!("chunk {c} stayed busy; trying again");
                    break;
                }
            }
        }
        if window.is_empty() {
            if k >= dirty.len() && retry.is_empty() {
                break;
            }
            if !wait.is_zero() {
                // In short steps, so a stop, a pause or a new rate is seen soon.
                thread::sleep(wait.min(Duration::from_millis(50)));
                continue;
            }
            if paused {
                p.status.paused = true;
                p.publish();
                thread::sleep(Duration::from_millis(50));
                continue;
            }
            if no_source {
                warn!("leg {leg}: no up-to-date leg left to resync from; chunks not yet copied stay unreadable on it");
                finished = false;
                break;
            }
            continue;
        }
        p.status.paused = false;
        // Every copy whose step is done moves on without waiting, so the writes of reads that
        // finished together go out together; then the oldest copy is waited for.
        let mut failed = None;
        for _ in 0..window.len() {
            let Some(w) = window.pop_front() else { break };
            let outcome = if failed.is_none() {
                io_done(&w.rx)
            } else {
                None
            };
            let Some(outcome) = outcome else {
                window.push_back(w);
                continue;
            };
            let slot = w.slot;
            let a = advance(inner, md, leg, &mut bufs, &mut p, w, outcome);
            match settle(a, slot, &mut free, &mut retry) {
                Ok(Some(w)) => window.push_back(w),
                Ok(None) => {}
                Err(e) => failed = Some(e),
            }
        }
        if failed.is_none() && !window.is_empty() {
            // Whichever copy is answered first moves on. Waiting for the oldest instead held a
            // copy whose read had come back behind the oldest one's write: with writes slower
            // than reads (a distant or loaded target) one write was in flight at a time.
            let rxs: smallvec::SmallVec<[&Receiver<InternalResult>; RESYNC_WINDOW]> =
                window.iter().map(|w| &w.rx).collect();
            let (i, outcome) = inner.leg_io_wait_any(&rxs);
            drop(rxs);
            if let Some(w) = window.remove(i) {
                let slot = w.slot;
                let a = advance(inner, md, leg, &mut bufs, &mut p, w, outcome);
                match settle(a, slot, &mut free, &mut retry) {
                    // Back in its place: the copies stay oldest first.
                    Ok(Some(w)) => window.insert(i, w),
                    Ok(None) => {}
                    Err(e) => failed = Some(e),
                }
            }
        }
        if let Some(why) = failed {
            fail(why);
            finished = false;
            break;
        }
        // Looked at afresh: the guest may have woken up or gone quiet since a chunk last started.
        p.rate_now(inner);
        if let Err(e) = flusher.step(inner, leg, p.status.done_bytes, p.status.yielding) {
            fail(format!("flush during resync failed: {e}"));
            finished = false;
            break;
        }
    }
    // Writes still in flight land (or fail) before their chunks are unlocked.
    for w in window.drain(..) {
        if let Step::Writing { len, zeroes } = w.step {
            match inner.leg_io_wait(&w.rx) {
                Ok(()) => p.landed(w.c, len, zeroes),
                Err(e) => {
                    if finished {
                        fail(format!("resync write failed: {e}"));
                    }
                    finished = false;
                }
            }
        }
    }
    // A flush in flight holds no chunk: a resync that stops early leaves it to land alone.
    if finished && l.state() == LegState::Resyncing && !replaced() {
        match flusher.last(inner, leg) {
            Err(e) => fail(format!("flush after resync failed: {e}")),
            Ok(()) => complete_resync(inner, md, leg, conn, &p.status, p.t0.elapsed()),
        }
    }
    set_resync(md, None);
    md.resync_running.store(false, Ordering::SeqCst);
}

fn complete_resync<C: Send + 'static>(
    inner: &Inner<C>,
    md: &MetaRuntime,
    leg: usize,
    conn: u64,
    done: &ResyncStatus,
    took: Duration,
) {
    let l = &inner.legs[leg];
    // Still the connection this copy went to, and still resyncing: a leg lost (and perhaps back
    // on a new connection, with a resync of its own) since must not be recorded up to date.
    let current = || l.epoch.load(Ordering::SeqCst) == conn && l.state() == LegState::Resyncing;
    if !current() {
        return;
    }
    let generation = {
        let mut m = md.meta();
        let g = m.generation;
        m.view[leg] = PeerRecord {
            state: PeerState::UpToDate,
            good_gen: g,
        };
        g
    };
    // The legs that were current learn it first: if we crash between the two writes, the
    // resynced leg still calls itself resyncing and is merely copied again.
    let others = inner_write_set(inner) & !bit(leg);
    write_superblocks(inner, md, others, false);
    if !current() {
        return;
    }
    write_superblocks(inner, md, bit(leg), false);
    // Looked at again after the superblock writes (milliseconds), and set only from resyncing.
    if l.epoch.load(Ordering::SeqCst) != conn
        || l.state
            .compare_exchange(
                LegState::Resyncing as u8,
                LegState::UpToDate as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_err()
    {
        return;
    }
    if let Ok(mut s) = l.synced.write() {
        *s = None;
    }
    let zeros = match done.zeroed_bytes {
        0 => String::new(),
        z => format!(" ({z} of them zeros, sent as write-zeroes)"),
    };
    info!(
        "leg {leg} {} is up to date again (generation {generation}): {} bytes copied in {:.1} s{zeros}",
        l.uri,
        done.done_bytes,
        took.as_secs_f64()
    );
}

/// A read failed on `leg` and succeeded elsewhere: copy the chunks back to it.
fn repair<C: Send + 'static>(inner: &Inner<C>, md: &MetaRuntime, leg: usize, chunks: Range<u64>) {
    let mut buf = IoBuf::new(md.layout.chunk_size as usize);
    for c in chunks {
        if inner.legs[leg].state() != LegState::UpToDate {
            return;
        }
        let Some(src) = pick_source(inner, leg) else {
            return;
        };
        match copy_chunk(inner, md, c, src, leg, &buf) {
            Ok(_) => info!(
                "leg {leg} {}: chunk {c} repaired from leg {src}",
                inner.legs[leg].uri
            ),
            Err(CopyError::Target(e)) => {
                inner.eject(leg, &format!("repair write failed: {e}"));
                return;
            }
            Err(CopyError::Source(e)) => {
                // A read given up on can still land later: the next chunk gets a fresh buffer.
                buf = IoBuf::new(md.layout.chunk_size as usize);
                warn!("repair of chunk {c}: source leg {src} failed: {e}")
            }
            Err(CopyError::Busy) => warn!("repair of chunk {c}: chunk stayed busy"),
        }
    }
}

/// Tries to reconnect a failed leg; on success, resyncs it.
fn try_return<C: Send + 'static>(inner: &Inner<C>, md: &MetaRuntime, leg: usize) {
    let l = &inner.legs[leg];
    let Some(spec) = l.spec.clone() else { return };
    let backoff = |refused: bool| {
        if let Ok(mut r) = md.retry.lock() {
            let r = &mut r[leg];
            r.backoff = (r.backoff * 2).min(Duration::from_secs(30));
            r.next = Instant::now() + r.backoff;
            r.refused |= refused;
        }
    };
    let (sink, epoch) = inner.new_sink(leg);
    let handle = match transport::open(&spec, sink, &inner.cfg.open) {
        Ok(h) => h,
        Err(e) => {
            info!("leg {leg} still unreachable: {e}");
            backoff(false);
            return;
        }
    };
    // A server that was only paused may still hold requests of the connection we gave up on;
    // until it is done with them, one of their writes could land on top of the resync.
    let old = l.handle();
    if old.is_alive() {
        // A connection a previous attempt installed and then gave up on (its superblock could
        // not be read, say): it carries nothing of value.
        old.abort("replaced by a new connection");
    }
    if !old.wait_quiet(inner.cfg.open.connect_timeout) {
        info!(
            "leg {leg} {} answers again, but the server has not finished the requests of the old connection yet; retrying later",
            l.uri
        );
        backoff(false);
        return;
    }
    if handle.info().capacity != l.capacity {
        warn!(
            "leg {leg} {} came back with {} bytes instead of {}; not re-adding",
            l.uri,
            handle.info().capacity,
            l.capacity
        );
        backoff(true);
        return;
    }
    inner.install(leg, handle, epoch);
    let sb = match read_superblock(l.capacity, |op, keep| inner.leg_io(leg, op, keep)) {
        Ok(Ok(sb)) => sb,
        Ok(Err(e)) => {
            error!(
                "leg {leg} {} answers again but its metadata is unusable ({e}); not re-adding",
                l.uri
            );
            l.handle().abort("not re-added: unusable metadata");
            backoff(true);
            return;
        }
        Err(e) => {
            warn!("leg {leg}: reading its superblock failed: {e}");
            l.handle()
                .abort("not re-added: its superblock could not be read");
            backoff(false);
            return;
        }
    };
    let (ok, why) = {
        let m = md.meta();
        let v = m.view[leg];
        if sb.uuid != m.uuid || sb.leg_index as usize != leg {
            (
                false,
                format!(
                    "it now belongs to mirror {} as leg {}",
                    sb.uuid_string(),
                    sb.leg_index
                ),
            )
        } else if sb.generation <= v.good_gen
            || (v.state != PeerState::Outdated && sb.generation <= m.generation)
        {
            (true, String::new())
        } else {
            (
                false,
                format!(
                    "it was written elsewhere while apart (generation {}, last good here {}): split brain",
                    sb.generation, v.good_gen
                ),
            )
        }
    };
    if !ok {
        error!(
            "leg {leg} {} is back, but {why}; not re-adding (fix it, then `ctl re-add {leg}`)",
            l.uri
        );
        l.handle().abort("not re-added");
        backoff(true);
        return;
    }
    if let Ok(mut r) = md.retry.lock() {
        r[leg].backoff = Duration::from_secs(1);
    }
    info!(
        "leg {leg} {} answers again (generation {})",
        l.uri, sb.generation
    );
    begin_resync(inner, md, leg);
}

/// Final flush; if every leg is in sync, an empty bitmap and clean superblocks.
fn shutdown<C: Send + 'static>(inner: &Inner<C>, md: &MetaRuntime) {
    flush_bitmap(inner, md);
    let all = inner.up_to_date().count_ones() as usize == inner.legs.len();
    if all {
        sweep(inner, md, true);
    }
    write_superblocks(
        inner,
        md,
        inner_write_set(inner),
        all && md.chunks.persisted.count() == 0,
    );
    info!(
        "metadata flushed{}",
        if all { "; legs marked clean" } else { "" }
    );
}

/// The metadata worker's loop.
pub(crate) fn worker<C: Send + 'static>(mirror: Weak<Inner<C>>, rx: Receiver<Cmd>) {
    let mut last_sweep = Instant::now();
    loop {
        let cmd = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(c) => Some(c),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(inner) = mirror.upgrade() else {
            return;
        };
        let Some(md) = inner.md() else {
            if let Some(Cmd::Shutdown(tx)) = cmd {
                let _ = tx.send(());
            }
            continue;
        };
        match cmd {
            Some(Cmd::Flush) => flush_bitmap(&inner, md),
            Some(Cmd::Ejected(leg)) => on_ejected(&inner, md, leg),
            Some(Cmd::Repair { leg, chunks }) => repair(&inner, md, leg, chunks),
            Some(Cmd::ReAdd(leg)) => {
                if let Ok(mut r) = md.retry.lock() {
                    r[leg].next = Instant::now();
                    r[leg].refused = false;
                    r[leg].manual = true;
                }
            }
            Some(Cmd::Hold(leg)) => {
                if let Ok(mut r) = md.retry.lock() {
                    r[leg].refused = true;
                }
            }
            Some(Cmd::Shutdown(tx)) => {
                shutdown(&inner, md);
                let _ = tx.send(());
                continue;
            }
            None => {}
        }
        if inner.stopping.load(Ordering::SeqCst) {
            continue;
        }
        if md.chunks.wanted.count() > 0 {
            flush_bitmap(&inner, md);
        }
        if last_sweep.elapsed() >= Duration::from_secs(2) {
            last_sweep = Instant::now();
            sweep(&inner, md, false);
        }
        let due: Vec<(usize, Arc<AtomicBool>)> = match md.retry.lock() {
            Ok(mut r) => (0..inner.legs.len())
                .filter_map(|i| {
                    let due = inner.legs[i].state() == LegState::Failed
                        && (inner.cfg.reconnect || r[i].manual)
                        && !r[i].refused
                        && r[i].next <= Instant::now()
                        && !r[i].busy.load(Ordering::SeqCst);
                    if due {
                        r[i].manual = false;
                        r[i].busy.store(true, Ordering::SeqCst);
                        Some((i, r[i].busy.clone()))
                    } else {
                        None
                    }
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        for (leg, busy) in due {
            // Off the worker: a connect can take its timeout, and ejections must not wait on it.
            let me = inner.clone();
            let spawned = thread::Builder::new()
                .name("mirror-return".into())
                .spawn(move || {
                    if let Some(md) = me.md() {
                        try_return(&me, md, leg);
                    }
                    busy.store(false, Ordering::SeqCst);
                });
            if spawned.is_err() {
                warn!("cannot start a reconnection thread for leg {leg}");
            }
        }
    }
}

/// What `create` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub uuid: String,
    pub data_size: u64,
    pub chunk_size: u64,
    pub chunks: u64,
    /// Whether the legs are marked in sync already (otherwise leg 0 is copied to the others when
    /// the daemon starts).
    pub assume_clean: bool,
}

struct ChanSink(Sender<(Tag, Result<(), LegError>)>);

impl CompletionSink for ChanSink {
    fn complete(&self, tag: Tag, result: Result<(), LegError>) {
        let _ = self.0.send((tag, result));
    }
}

/// Writes fresh metadata on `specs`: a new mirror whose leg 0 is the source. Unless
/// `assume_clean`, every chunk is marked dirty and the other legs are outdated, so the daemon
/// copies leg 0 to them in the background when it starts.
pub fn create(
    specs: &[LegSpec],
    opts: &OpenOptions,
    chunk: u64,
    assume_clean: bool,
) -> Result<Created, MirrorError> {
    if specs.len() < 2 || specs.len() > crate::MAX_LEGS {
        return Err(MirrorError::LegCount(specs.len()));
    }
    let mut legs = Vec::new();
    let mut chans = Vec::new();
    for spec in specs {
        let (tx, rx) = crossbeam_channel::unbounded();
        let h = transport::open(spec, Arc::new(ChanSink(tx)), opts)?;
        if h.info().read_only {
            return Err(MirrorError::Refused(format!(
                "leg {} is read-only",
                h.uri()
            )));
        }
        legs.push(h);
        chans.push(rx);
    }
    let io = |i: usize, op: LegOp, keep: &Arc<IoBuf>| -> Result<(), MirrorError> {
        let _keep = keep.clone();
        legs[i].submit(transport::LegRequest { tag: 0, op });
        let r = chans[i]
            .recv_timeout(opts.connect_timeout.max(Duration::from_secs(30)))
            .map(|(_, r)| r)
            .unwrap_or(Err(LegError::Lost("no answer".into())));
        r.map_err(|err| MirrorError::MetaIo {
            leg: i,
            uri: legs[i].uri().to_string(),
            err,
        })
    };
    let mut layouts = Vec::new();
    for (i, l) in legs.iter().enumerate() {
        layouts.push(Layout::new(l.info().capacity, chunk).map_err(|source| {
            MirrorError::Meta {
                leg: i,
                uri: l.uri().to_string(),
                source,
            }
        })?);
    }
    let data_size = layouts.iter().map(|l| l.data_size).min().unwrap_or(0);
    let uuid = *uuid::Uuid::new_v4().as_bytes();
    let chunks = data_size.div_ceil(chunk);
    let mut view = vec![
        PeerRecord {
            state: PeerState::UpToDate,
            good_gen: 1
        };
        legs.len()
    ];
    if !assume_clean {
        for v in view.iter_mut().skip(1) {
            *v = PeerRecord {
                state: PeerState::Outdated,
                good_gen: 0,
            };
        }
    }
    let bits = AtomicBits::new(chunks);
    if !assume_clean {
        for c in 0..chunks {
            bits.set(c);
        }
    }
    for (i, layout) in layouts.iter().enumerate() {
        let image = bits.to_bytes(layout.bitmap_len as usize);
        let buf = IoBuf::new(layout.bitmap_len as usize);
        buf.fill(&image);
        io(
            i,
            LegOp::Write {
                offset: layout.bitmap_offset(),
                bufs: buf.bufs(layout.bitmap_len as usize),
                fua: true,
            },
            &buf,
        )?;
        for slot in 0..2u64 {
            let sb = Superblock {
                uuid,
                seq: slot + 1,
                // An outdated leg sits at generation 0: behind leg 0, not apart from it.
                generation: if i == 0 || assume_clean { 1 } else { 0 },
                leg_index: i as u32,
                chunk_size: chunk,
                data_size,
                clean: true,
                legs: view.clone(),
            };
            let buf = IoBuf::new(SB_SIZE as usize);
            buf.fill(&sb.encode());
            io(
                i,
                LegOp::Write {
                    offset: layout.sb_offset(slot),
                    bufs: buf.bufs(SB_SIZE as usize),
                    fua: true,
                },
                &buf,
            )?;
        }
        match io(i, LegOp::Flush, &IoBuf::new(0)) {
            Err(MirrorError::MetaIo {
                err: LegError::Unsupported,
                ..
            })
            | Ok(()) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Created {
        uuid: uuid::Uuid::from_bytes(uuid).to_string(),
        data_size,
        chunk_size: chunk,
        chunks,
        assume_clean,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_finds_a_single_set_byte_anywhere() {
        for len in [0usize, 1, 63, 64, 65, 4096, 4099] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v), "len {len}");
            for i in 0..len {
                v[i] = 1 << (i % 8);
                assert!(!is_zero(&v), "len {len}, byte {i}");
                v[i] = 0;
            }
        }
    }

    #[test]
    fn pacer_keeps_to_the_rate_and_bursts_one_chunk_at_most() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Pacer { next: t0 };
        // Unlimited: never waits.
        assert_eq!(p.pace(0, 1 << 20, t0), Duration::ZERO);
        assert_eq!(p.pace(0, 1 << 20, t0), Duration::ZERO);
        // 4 MiB/s, 1 MiB chunks: one start per 250 ms.
        let rate = 4 << 20;
        assert_eq!(p.pace(rate, 1 << 20, t0), Duration::ZERO);
        assert_eq!(p.pace(rate, 1 << 20, t0), ms(250));
        assert_eq!(p.pace(rate, 1 << 20, t0 + ms(100)), ms(150));
        assert_eq!(p.pace(rate, 1 << 20, t0 + ms(250)), Duration::ZERO);
        // A copy that fell 2 s behind the rate makes up one chunk, not eight.
        let late = t0 + ms(2500);
        assert_eq!(p.pace(rate, 1 << 20, late), Duration::ZERO);
        assert_eq!(p.pace(rate, 1 << 20, late), Duration::ZERO);
        assert_eq!(p.pace(rate, 1 << 20, late), ms(250));
        // Unlimited again: the booking is dropped.
        assert_eq!(p.pace(0, 1 << 20, late), Duration::ZERO);
        assert_eq!(p.pace(rate, 1 << 20, late), Duration::ZERO);
    }

    #[test]
    fn guest_counts_as_busy_until_it_has_been_quiet_for_the_hold() {
        let t = Duration::from_secs(100);
        let stamp = t.as_nanos() as u64;
        assert!(!guest_busy(0, t), "no guest request yet");
        assert!(guest_busy(stamp, t));
        assert!(guest_busy(stamp, t + GUEST_BUSY_HOLD / 2));
        assert!(!guest_busy(stamp, t + GUEST_BUSY_HOLD));
        // A stamp a tick ahead of a reader's clock is recent, not a wrap-around.
        assert!(guest_busy(stamp, t - Duration::from_millis(4)));
    }
}
