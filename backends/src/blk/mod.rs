//! vhost-user-blk device over a [`BlockMirror`].
//!
//! Module split after Firecracker's block device: [`request`] parses and checks descriptor chains,
//! [`queue`] moves requests between the virtqueue and the mirror and answers them, and this file
//! is the device: features, config space, and the vhost-user plumbing.

pub mod queue;
pub mod request;

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use log::{info, warn};
use mirror::{BlockMirror, MirrorInfo};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

pub use queue::Completion;
use queue::QueueState;
use request::{Limits, MAX_DATA_SEGMENTS, MAX_DISCARD_SEGMENTS, SECTOR_SIZE};
use transport::file::Reactor;
use transport::nbd::Reaper;
use transport::LegSpec;

/// The mirror type the block device drives.
pub type BlkMirror = BlockMirror<Completion>;

/// Default for [`BlkConfig::poll_max`]: QEMU's default `poll-max-ns` for the same job.
pub const DEFAULT_POLL_MAX: Duration = Duration::from_micros(32);
/// Largest queue the device offers.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Largest single data segment the device advertises.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard/write-zeroes range in sectors (1 GiB), so one request stays bounded.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error("--num-queues must be between 1 and {max}, got {got}")]
    NumQueues { got: usize, max: usize },
    #[error("--serial may be at most {VIRTIO_BLK_ID_BYTES} bytes, got {0}")]
    SerialTooLong(usize),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        source: vhost::vhost_user::Error,
    },
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("unsupported queue event {0}")]
    UnknownEvent(u16),
    #[error("cannot add queue {queue}'s io_uring or NBD reaper to its worker's epoll: {source}")]
    WatchRing { queue: usize, source: io::Error },
    #[error("queue {0}: guest memory not set up yet")]
    NoMemory(usize),
}

impl From<BlkError> for io::Error {
    fn from(e: BlkError) -> Self {
        io::Error::other(e)
    }
}

/// Settings of the block device (from the command line, or chosen by an embedder).
#[derive(Debug, Clone)]
pub struct BlkConfig {
    pub num_queues: usize,
    pub queue_size: usize,
    pub read_only: bool,
    pub serial: String,
    /// Longest time a queue's worker keeps looking for new requests (notifications off) before
    /// it goes back to sleep; zero never polls. See [`queue::Poller`].
    pub poll_max: Duration,
    /// Each queue's worker submits and reaps its file-leg I/O in an io_uring of its own
    /// ([`transport::file::Reactor`]) and reads its NBD legs' replies itself
    /// ([`transport::nbd::Reaper`]) instead of leaving both to the legs' threads.
    pub queue_rings: bool,
}

impl Default for BlkConfig {
    fn default() -> Self {
        BlkConfig {
            num_queues: 1,
            queue_size: MAX_QUEUE_SIZE,
            read_only: false,
            serial: "vhost-mirror".into(),
            poll_max: DEFAULT_POLL_MAX,
            queue_rings: true,
        }
    }
}

impl BlkConfig {
    /// Checks the settings and returns the serial as the 20 bytes GET_ID answers with.
    pub fn validate(&self) -> Result<[u8; VIRTIO_BLK_ID_BYTES as usize], BlkError> {
        if self.num_queues == 0 || self.num_queues > 64 {
            return Err(BlkError::NumQueues {
                got: self.num_queues,
                max: 64,
            });
        }
        let bytes = self.serial.as_bytes();
        if bytes.len() > VIRTIO_BLK_ID_BYTES as usize {
            return Err(BlkError::SerialTooLong(bytes.len()));
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        id[..bytes.len()].copy_from_slice(bytes);
        Ok(id)
    }
}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ConfigSpace(virtio_blk_config);
// SAFETY: virtio_blk_config is a repr(C) struct of integers laid out by the virtio spec; every
// byte pattern is a valid value.
unsafe impl ByteValued for ConfigSpace {}

fn config_space(info: &MirrorInfo, cfg: &BlkConfig) -> ConfigSpace {
    let mut c = virtio_blk_config {
        capacity: (info.capacity / SECTOR_SIZE).to_le(),
        size_max: SIZE_MAX.to_le(),
        seg_max: (MAX_DATA_SEGMENTS as u32).to_le(),
        blk_size: info.block_size.to_le(),
        min_io_size: ((info.block_size as u64 / SECTOR_SIZE) as u16).to_le(),
        opt_io_size: 0,
        num_queues: (cfg.num_queues as u16).to_le(),
        ..Default::default()
    };
    let align = (info.block_size as u64 / SECTOR_SIZE) as u32;
    if info.discard {
        c.max_discard_sectors = MAX_DISCARD_SECTORS.to_le();
        c.max_discard_seg = MAX_DISCARD_SEGMENTS.to_le();
        c.discard_sector_alignment = align.to_le();
    }
    if info.write_zeroes {
        c.max_write_zeroes_sectors = MAX_DISCARD_SECTORS.to_le();
        c.max_write_zeroes_seg = MAX_DISCARD_SEGMENTS.to_le();
        c.write_zeroes_may_unmap = 1;
    }
    ConfigSpace(c)
}

/// The vhost-user-blk device of one frontend connection.
pub struct VhostUserBlk {
    mirror: BlkMirror,
    limits: Limits,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    cfg: BlkConfig,
    features: u64,
    config: ConfigSpace,
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    queues: Vec<Arc<QueueState>>,
}

impl VhostUserBlk {
    /// A device serving `mirror` with the settings in `cfg`.
    pub fn new(mirror: BlkMirror, cfg: BlkConfig) -> Result<Self, BlkError> {
        let serial = cfg.validate()?;
        let info = mirror.info();
        let read_only = cfg.read_only || info.read_only;
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            if info.discard {
                features |= 1 << VIRTIO_BLK_F_DISCARD;
            }
            if info.write_zeroes {
                features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            }
        }
        let limits = Limits {
            capacity: info.capacity - info.capacity % SECTOR_SIZE,
            read_only,
            // Advertised always: with legs that lack flush, writes are durable when complete and
            // a flush costs nothing.
            flush: true,
            discard: info.discard && !read_only,
            write_zeroes: info.write_zeroes && !read_only,
        };
        // A worker only pays for what its legs use (each is entered on every pass); a leg of
        // unknown kind (an embedder's own) gets both.
        let specs = mirror.leg_specs();
        let has = |kind: fn(&LegSpec) -> bool| specs.iter().any(|s| s.as_ref().is_none_or(kind));
        let file_legs = has(|s| matches!(s, LegSpec::File { .. }));
        let nbd_legs = has(|s| matches!(s, LegSpec::Nbd { .. }));
        let queue = || {
            let reactor = optional(cfg.queue_rings && file_legs, Reactor::new, || {
                "no io_uring for a queue; file legs use their own threads"
            });
            let reaper = optional(cfg.queue_rings && nbd_legs, Reaper::new, || {
                "no epoll for a queue; NBD replies are read by the legs' threads"
            });
            Arc::new(QueueState::new(cfg.poll_max, reactor, reaper))
        };
        Ok(VhostUserBlk {
            config: config_space(&info, &cfg),
            queues: (0..cfg.num_queues).map(|_| queue()).collect(),
            mirror,
            limits,
            serial,
            cfg,
            features,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
        })
    }

    /// Requests accepted from the guest and not yet answered, over all queues.
    pub fn inflight(&self) -> usize {
        self.queues.iter().map(|q| q.inflight()).sum()
    }

    /// Waits until every accepted request has been answered, or `limit` passes.
    fn drain(&self, queues: impl Iterator<Item = usize>, limit: Duration) -> bool {
        let start = Instant::now();
        let queues: Vec<usize> = queues.collect();
        loop {
            // A queue's ring may still hold requests the guest no longer waits for (those of
            // a leg that was late or ejected): they belong to the worker too, which must not
            // exit (its ring's pending work would be cancelled) before they finish.
            let left: usize = queues
                .iter()
                .map(|&q| {
                    let s = &self.queues[q];
                    s.inflight() + s.reactor.as_ref().map_or(0, Reactor::in_flight)
                })
                .sum();
            if left == 0 {
                return true;
            }
            if start.elapsed() > limit {
                warn!("{left} requests still in flight after {limit:?}; giving up waiting");
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn drain_limit(&self) -> Duration {
        // Long enough for the mirror to eject a hung leg and retry elsewhere.
        Duration::from_secs(30)
    }

    /// After the workers were told to exit: a queue ring that still holds requests (a hung
    /// leg outlasted the drain) gets a thread of its own that reaps it until it is empty, so
    /// its requests still complete and the old connection's memory is let go in the end.
    fn hand_over_rings(&self) {
        for (q, state) in self.queues.iter().enumerate() {
            if state.reactor.as_ref().is_none_or(|r| r.in_flight() == 0) {
                continue;
            }
            let state = Arc::clone(state);
            let spawned = std::thread::Builder::new()
                .name("queue-ring-drain".into())
                .spawn(move || {
                    if let Some(reactor) = &state.reactor {
                        warn!(
                            "queue {q}: {} requests still in its io_uring; reaping them",
                            reactor.in_flight()
                        );
                        while !reactor.settle(Duration::from_secs(60)) {
                            warn!("queue {q}: {} requests still pending", reactor.in_flight());
                        }
                    }
                });
            if let Err(e) = spawned {
                warn!("queue {q}: cannot start a thread to reap its io_uring: {e}");
            }
        }
    }

    /// The event id of queue `q`'s reactor in its worker's epoll (ids up to `num_queues` are
    /// the queues' and the exit event's).
    fn reactor_event(&self, q: usize) -> u16 {
        (self.cfg.num_queues + 1 + q) as u16
    }

    /// The event id of queue `q`'s reaper, after the reactors'.
    fn reaper_event(&self, q: usize) -> u16 {
        (2 * self.cfg.num_queues + 1 + q) as u16
    }

    /// Adds each queue's reactor and reaper to the epoll of the worker that serves the queue
    /// (worker `q` serves queue `q`, see `queues_per_thread`).
    fn register_reactors(
        &self,
        daemon: &VhostUserDaemon<Arc<VhostUserBlk>>,
    ) -> Result<(), BlkError> {
        for (q, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            let Some(state) = self.queues.get(q) else {
                continue;
            };
            let fds = [
                (
                    state.reactor.as_ref().map(Reactor::fd),
                    self.reactor_event(q),
                ),
                (state.reaper.as_ref().map(Reaper::fd), self.reaper_event(q)),
            ];
            for (fd, event) in fds {
                let Some(fd) = fd else { continue };
                handler
                    .register_listener(fd, EventSet::IN, u64::from(event))
                    .map_err(|source| BlkError::WatchRing { queue: q, source })?;
            }
        }
        Ok(())
    }

    /// Gives the NBD legs the queues' reapers read back to the legs' reader threads: for when
    /// the workers stop polling.
    fn close_reapers(&self) {
        for state in &self.queues {
            if let Some(reaper) = &state.reaper {
                reaper.close();
            }
        }
    }
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.cfg.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.cfg.queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.config.as_slice();
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        let mut out = bytes[start..end].to_vec();
        // A frontend that asks past the end gets zeroes rather than a short answer.
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        if let Ok(mut m) = self.mem.write() {
            *m = Some(mem);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker per queue, so queues scale over cores.
        (0..self.cfg.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend reads the ring indexes after this returns, so every
        // request accepted from this queue must have been answered first.
        let q = queue_index as usize;
        if q < self.queues.len() {
            self.drain(std::iter::once(q), self.drain_limit());
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // Worker `thread_id` serves queue `thread_id` alone (`queues_per_thread`), and its
        // events number the queues it serves from 0: its queue is `vrings[0]`.
        let q = thread_id;
        let Some(state) = self.queues.get(q) else {
            return Err(BlkError::UnknownEvent(device_event).into());
        };
        // vhost-user-backend ends a worker whose handler fails (and a panic ends it too): the NBD
        // legs its reaper reads must go back to their reader threads then, or nobody would read
        // their replies, other queues' and the resync's included.
        let mut guard = CloseReaperUnlessOk {
            reaper: state.reaper.as_ref(),
            queue: q,
            ok: false,
        };
        let result = self.handle_queue_event(state, device_event, vrings, q);
        guard.ok = result.is_ok();
        result
    }
}

/// Closes a queue's reaper when its worker's handler did not return `Ok` (see `handle_event`).
struct CloseReaperUnlessOk<'a> {
    reaper: Option<&'a Reaper>,
    queue: usize,
    ok: bool,
}

impl Drop for CloseReaperUnlessOk<'_> {
    fn drop(&mut self) {
        if let (false, Some(reaper)) = (self.ok, self.reaper) {
            warn!(
                "queue {}: its worker is ending; its NBD legs' replies go back to their threads",
                self.queue
            );
            reaper.close();
        }
    }
}

impl VhostUserBlk {
    /// One event of queue `q`'s worker: its ring, its reactor or its reaper.
    fn handle_queue_event(
        &self,
        state: &Arc<QueueState>,
        device_event: u16,
        vrings: &[VringRwLock],
        q: usize,
    ) -> io::Result<()> {
        if usize::from(device_event) == usize::from(self.reactor_event(q)) {
            if let Some(reactor) = &state.reactor {
                reactor.poll();
                return Ok(());
            }
        }
        if usize::from(device_event) == usize::from(self.reaper_event(q)) {
            if let Some(reaper) = &state.reaper {
                // A reply's completion may resend a failed read to a file leg: that goes into
                // the reactor.
                match &state.reactor {
                    Some(reactor) => reactor.enter(|| reaper.poll()),
                    None => reaper.poll(),
                }
                return Ok(());
            }
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(BlkError::UnknownEvent(device_event).into());
        };
        // The memory map is read afresh for every pass: the frontend may add or remove regions
        // (VHOST_USER_ADD_MEM_REG) while this worker polls, and a stale map would refuse
        // requests in the new regions.
        let pass = || -> io::Result<Arc<GuestMemoryMmap>> {
            let mem = self
                .mem
                .read()
                .ok()
                .and_then(|m| m.as_ref().map(|m| m.memory().into_inner()))
                .ok_or(BlkError::NoMemory(q))?;
            state.run_pass(|| {
                queue::QueueContext::new(
                    &self.mirror,
                    &self.limits,
                    &self.serial,
                    state,
                    vring,
                    &mem,
                )
                .process()
            });
            Ok(mem)
        };
        if self.event_idx.load(Ordering::Acquire) {
            // Keep notifications off while draining, and look again after re-enabling them, so a
            // request that arrives in between is not left waiting for a kick that never comes.
            loop {
                vring.disable_notification().map_err(io::Error::other)?;
                let mem = pass()?;
                // A driver that keeps its queue busy sends the next requests within microseconds:
                // looking for them with notifications still off saves its kick and our wake-up.
                if state
                    .poller
                    .wait_for_requests(vring, &mem, || state.has_completions())
                {
                    continue;
                }
                if !vring.enable_notification().map_err(io::Error::other)? {
                    break;
                }
            }
        } else {
            pass()?;
        }
        Ok(())
    }
}

/// `make()` if `wanted`; a failure is logged (`fallback` says what happens instead) and leaves
/// the work to the legs' own threads.
fn optional<T>(
    wanted: bool,
    make: fn() -> io::Result<T>,
    fallback: impl FnOnce() -> &'static str,
) -> Option<T> {
    if !wanted {
        return None;
    }
    make().inspect_err(|e| warn!("{} ({e})", fallback())).ok()
}

/// Serves `mirror` on the vhost-user socket `socket`, one frontend at a time, until `stop` is
/// set. A frontend that disconnects (a restarting VMM) is waited for again.
pub fn serve(
    socket: &Path,
    mirror: BlkMirror,
    cfg: BlkConfig,
    stop: Arc<AtomicBool>,
) -> Result<(), BlkError> {
    cfg.validate()?;
    let mut listener = Listener::new(socket, true).map_err(|source| BlkError::Listen {
        path: socket.display().to_string(),
        source,
    })?;
    info!("vhost-user-blk listening on {}", socket.display());
    while !stop.load(Ordering::Acquire) {
        let backend = Arc::new(VhostUserBlk::new(mirror.clone(), cfg.clone())?);
        let mut daemon = VhostUserDaemon::new(
            "vhost-mirror-blk".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| BlkError::Daemon(e.to_string()))?;
        backend.register_reactors(&daemon)?;
        daemon
            .start(&mut listener)
            .map_err(|e| BlkError::Daemon(e.to_string()))?;
        info!("frontend connected");
        match daemon.wait() {
            Ok(()) => info!("frontend disconnected"),
            Err(e) => warn!("frontend connection ended: {e}"),
        }
        // Requests of the old connection still complete into its (still mapped) memory; let
        // them finish before a new frontend sets up the rings again, and before the workers
        // that reap the queues' rings exit.
        backend.drain(0..cfg.num_queues, backend.drain_limit());
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        backend.close_reapers();
        backend.hand_over_rings();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirror::{IoStatus, MirrorConfig};

    fn device(legs: &[String]) -> VhostUserBlk {
        let specs: Vec<LegSpec> = legs.iter().map(|l| l.parse().unwrap()).collect();
        let cfg = MirrorConfig {
            metadata: false,
            ..MirrorConfig::default()
        };
        let mirror: BlkMirror =
            BlockMirror::open(&specs, cfg, |c: Completion, s: IoStatus| c.finish(s)).unwrap();
        let cfg = BlkConfig {
            num_queues: 2,
            ..BlkConfig::default()
        };
        VhostUserBlk::new(mirror, cfg).unwrap()
    }

    /// Each is entered on every pass: a queue has a file reactor only with file legs, and an
    /// NBD reaper only with NBD legs (the latter's presence is tested against nbdkit in
    /// tests/blk_mirror.rs).
    #[test]
    fn queues_carry_only_what_their_legs_use() {
        let null = device(&["null:1M".into(), "null:1M".into()]);
        assert!(null
            .queues
            .iter()
            .all(|q| q.reactor.is_none() && q.reaper.is_none()));
        let dir = std::env::temp_dir().join(format!("blk-queues-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let legs: Vec<String> = (0..2)
            .map(|i| {
                let path = dir.join(format!("leg{i}.img"));
                std::fs::File::create(&path)
                    .unwrap()
                    .set_len(1 << 20)
                    .unwrap();
                format!("file:{}", path.display())
            })
            .collect();
        let files = device(&legs);
        assert!(files
            .queues
            .iter()
            .all(|q| q.reactor.is_some() && q.reaper.is_none()));
        drop(files);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
