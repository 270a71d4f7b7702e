//! Frames over two network paths: PRP (every frame on both, duplicates discarded on receipt) or
//! active-backup (one path at a time, moved on failure and announced with gratuitous ARP /
//! unsolicited neighbour advertisements).
//!
//! The caller owns the event loop: it asks for the paths' descriptors, calls [`NetMirror::poll`]
//! when one is readable and [`NetMirror::transmit`] for every outgoing frame. A monitor thread
//! watches carrier, fails over, sends PRP supervision frames and ages duplicate-discard state.
//!
//! Frames go in and come out as virtio-net packets: a 12-byte `virtio_net_hdr_v1`, then the
//! Ethernet frame. With offloads (active-backup over two TAP paths) the header travels to and
//! from the kernel as it is, so the guest's partial checksums and TSO frames reach the TAP
//! unsegmented and large receive frames reach the guest; otherwise the header is all zero on
//! receipt and ignored on transmit. PRP cannot carry offloads: its trailer goes after the
//! payload of every frame on the wire, which neither segmentation nor a checksum the kernel
//! fills in later would keep intact.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::Serialize;
use transport::net::{NetPath, PathError, PathSpec, MAX_FRAME, MAX_GSO_FRAME, VNET_HDR_LEN};

use crate::net::{Lan, PrpNode};

/// Bytes the PRP redundancy control trailer adds to a frame.
pub const PRP_TRAILER: usize = 6;

/// How frames use the two paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NetMode {
    /// Parallel Redundancy Protocol: both paths, zero recovery time.
    #[default]
    Prp,
    /// One path at a time, for peers that do not speak PRP.
    ActiveBackup,
}

impl FromStr for NetMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prp" => Ok(NetMode::Prp),
            "active-backup" => Ok(NetMode::ActiveBackup),
            _ => Err(format!("unknown mode '{s}' (prp, active-backup)")),
        }
    }
}

/// Settings of a [`NetMirror`].
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub mode: NetMode,
    /// The largest IP packet the guest sends (its MTU); frames beyond what a path carries are
    /// counted, never silently dropped.
    pub guest_mtu: u32,
    /// How often carrier is checked (the failover bound in active-backup).
    pub monitor_interval: Duration,
    /// An IPv4 address on the far side that answers ARP: each path then sends it an ARP probe
    /// every `probe_interval` (from a MAC of the path's own, with sender address 0.0.0.0, so
    /// neither the guest's MAC nor anyone's ARP cache moves), and a path whose last
    /// `probe_misses` probes went unanswered counts as down even with carrier up: a cut
    /// beyond the first switch is seen too. Only what was read is judged: frames waiting
    /// unread on a path keep its standing.
    pub probe: Option<Ipv4Addr>,
    pub probe_interval: Duration,
    pub probe_misses: u32,
    /// Carry virtio-net headers to and from the paths (checksum and segmentation offloads):
    /// active-backup over TAP paths only.
    pub offload: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            mode: NetMode::Prp,
            guest_mtu: 1500,
            monitor_interval: Duration::from_millis(50),
            probe: None,
            probe_interval: Duration::from_millis(100),
            probe_misses: 3,
            offload: false,
        }
    }
}

/// Why the paths could not be set up or a command was refused.
#[derive(Debug, thiserror::Error)]
pub enum NetMirrorError {
    #[error("a network mirror needs exactly two paths, got {0}")]
    PathCount(usize),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("no path {0} (paths are 0 and 1)")]
    NoSuchPath(usize),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error(
        "offloads cannot pass through PRP (the trailer goes after every frame's payload); \
         use active-backup, or leave offloads off"
    )]
    OffloadWithPrp,
    #[error("cannot set offloads on path {path}: {source}")]
    Offload {
        path: usize,
        #[source]
        source: std::io::Error,
    },
}

/// `virtio_net_hdr` flag: the receiver completes the checksum from `csum_start`.
const VNET_F_NEEDS_CSUM: u8 = 1;

/// What a virtio-net header asks of whoever handles its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HdrWork {
    csum: bool,
    gso: bool,
}

impl HdrWork {
    fn of(hdr: &[u8]) -> HdrWork {
        HdrWork {
            csum: hdr.first().is_some_and(|f| f & VNET_F_NEEDS_CSUM != 0),
            // The ECN bit (0x80) only qualifies a GSO type.
            gso: hdr.get(1).is_some_and(|t| t & 0x7f != 0),
        }
    }
}

#[derive(Default)]
struct PathCounters {
    sent: AtomicU64,
    send_errors: AtomicU64,
    received: AtomicU64,
    delivered: AtomicU64,
    dropped_inactive: AtomicU64,
    dropped_down: AtomicU64,
    oversize: AtomicU64,
    probe_answers: AtomicU64,
    csum_sent: AtomicU64,
    gso_sent: AtomicU64,
    csum_received: AtomicU64,
    gso_received: AtomicU64,
    runts: AtomicU64,
}

struct Slot {
    path: NetPath,
    /// Carrier seen by the monitor.
    link: AtomicBool,
    /// Failed by an operator (fault drill): behaves as a cut cable.
    forced_down: AtomicBool,
    /// Largest frame the path carries (Ethernet header and one VLAN tag included).
    max_frame: usize,
    /// The path's own MAC for ARP probes.
    probe_mac: [u8; 6],
    /// Probe answers lately (always true without probing).
    probe_ok: AtomicBool,
    /// When the far side last answered a probe on this path (ms since the mirror opened).
    last_answer_ms: AtomicU64,
    /// When a receiver last read this path empty (ms since the mirror opened, 0 for never):
    /// every answer that came before then has been seen.
    drained_ms: AtomicU64,
    c: PathCounters,
}

impl Slot {
    fn usable(&self) -> bool {
        self.link.load(Ordering::Relaxed)
            && !self.forced_down.load(Ordering::Relaxed)
            && self.probe_ok.load(Ordering::Relaxed)
    }
}

/// Addresses the guest uses, learned from what it sends, for announcements after a failover.
#[derive(Default, Clone)]
struct Learned {
    mac: Option<[u8; 6]>,
    ipv4: Vec<Ipv4Addr>,
    ipv6: Vec<Ipv6Addr>,
}

struct Inner {
    slots: Vec<Slot>,
    cfg: NetConfig,
    active: AtomicUsize,
    failovers: AtomicU64,
    prp: Mutex<PrpNode>,
    learned: Mutex<Learned>,
    rxbuf: Mutex<Vec<u8>>,
    opened: Instant,
}

/// One path as the control socket reports it.
#[derive(Debug, Clone, Serialize)]
pub struct PathStatus {
    pub index: usize,
    pub spec: String,
    pub state: &'static str,
    pub active: bool,
    pub sent: u64,
    pub send_errors: u64,
    pub received: u64,
    pub delivered: u64,
    pub dropped_inactive: u64,
    pub dropped_down: u64,
    /// Frames too large for the path (from the guest) or for the receive buffer (from the
    /// path).
    pub oversize: u64,
    /// Answers to ARP probes (with `--probe`).
    pub probe_answers: u64,
    /// Frames sent with their checksum left to the kernel (offloads).
    pub csum_sent: u64,
    /// Segmentation-offload frames sent (one per up to 64 KiB; offloads).
    pub gso_sent: u64,
    /// Frames received with a partial checksum for the guest to trust (offloads).
    pub csum_received: u64,
    /// Segmentation-offload frames received, handed to the guest whole (offloads).
    pub gso_received: u64,
    /// Reads too short to be a frame, dropped.
    pub runts: u64,
}

/// The network mirror as the control socket reports it.
#[derive(Debug, Clone, Serialize)]
pub struct NetStatus {
    pub mode: NetMode,
    /// Whether virtio-net headers pass to and from the paths.
    pub offload: bool,
    pub failovers: u64,
    pub paths: Vec<PathStatus>,
    /// PRP duplicate-discard counters (prp mode).
    pub prp: serde_json::Value,
}

/// The network redundancy engine. Cheap to clone.
#[derive(Clone)]
pub struct NetMirror {
    inner: Arc<Inner>,
}

impl NetMirror {
    /// Opens both paths and starts the monitor.
    pub fn open(specs: &[PathSpec], cfg: NetConfig) -> Result<Self, NetMirrorError> {
        if specs.len() != 2 {
            return Err(NetMirrorError::PathCount(specs.len()));
        }
        if cfg.offload && cfg.mode == NetMode::Prp {
            return Err(NetMirrorError::OffloadWithPrp);
        }
        let mut slots = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let path = NetPath::open_with(spec, cfg.offload)?;
            let mtu = path.mtu().unwrap_or(1500) as usize;
            let need = cfg.guest_mtu as usize
                + if cfg.mode == NetMode::Prp {
                    PRP_TRAILER
                } else {
                    0
                };
            if mtu < need {
                warn!(
                    "path {i} {spec}: MTU {mtu} cannot carry the guest's {}-byte packets{}; raise the \
                     path MTU to {need}, or lower the guest's (QEMU: host_mtu={}); larger frames are \
                     counted as oversize and not sent on it",
                    cfg.guest_mtu,
                    if cfg.mode == NetMode::Prp { " plus the 6-byte PRP trailer" } else { "" },
                    mtu.saturating_sub(need - cfg.guest_mtu as usize)
                );
            }
            info!("path {i} {spec}: interface {}, MTU {mtu}", path.ifname());
            let link = path.link_up();
            slots.push(Slot {
                path,
                link: AtomicBool::new(link),
                forced_down: AtomicBool::new(false),
                max_frame: (mtu + 14 + 4).min(MAX_FRAME),
                probe_mac: probe_mac(i),
                // A path is given the first probe rounds before it can be judged.
                probe_ok: AtomicBool::new(true),
                last_answer_ms: AtomicU64::new(0),
                drained_ms: AtomicU64::new(0),
                c: PathCounters::default(),
            });
        }
        let active = if slots[0].usable() || !slots[1].usable() {
            0
        } else {
            1
        };
        let inner = Arc::new(Inner {
            slots,
            cfg: cfg.clone(),
            active: AtomicUsize::new(active),
            failovers: AtomicU64::new(0),
            prp: Mutex::new(PrpNode::new()),
            learned: Mutex::new(Learned::default()),
            rxbuf: Mutex::new(vec![0u8; max_packet(cfg.offload)]),
            opened: Instant::now(),
        });
        let weak = Arc::downgrade(&inner);
        thread::Builder::new()
            .name("net-monitor".into())
            .spawn(move || monitor(weak))
            .map_err(NetMirrorError::Thread)?;
        Ok(NetMirror { inner })
    }

    /// Largest packet (virtio-net header and frame) taken from the guest or handed to it.
    /// Frames a path cannot carry are counted per path as oversize.
    pub fn max_packet(&self) -> usize {
        max_packet(self.inner.cfg.offload)
    }

    /// Whether virtio-net headers pass to and from the paths, so the guest may be offered
    /// checksum and segmentation offloads.
    pub fn offload(&self) -> bool {
        self.inner.cfg.offload
    }

    /// Lets the paths hand the guest the offloads it accepts (`TUN_F_*` flags, from the
    /// virtio-net features it acknowledged). Without offloads only 0 is accepted.
    pub fn set_guest_offloads(&self, tun_flags: u32) -> Result<(), NetMirrorError> {
        for (i, s) in self.inner.slots.iter().enumerate() {
            s.path
                .set_offloads(tun_flags)
                .map_err(|source| NetMirrorError::Offload { path: i, source })?;
        }
        Ok(())
    }

    /// The paths' descriptors, readable when frames wait (index = path).
    pub fn fds(&self) -> Vec<RawFd> {
        self.inner.slots.iter().map(|s| s.path.fd()).collect()
    }

    /// Sends a packet from the guest: a virtio-net header, then the frame.
    pub fn transmit(&self, packet: &[u8]) {
        let inner = &self.inner;
        let Some(frame) = packet.get(VNET_HDR_LEN..) else {
            return;
        };
        learn(&inner.learned, frame);
        match inner.cfg.mode {
            NetMode::Prp => {
                let (a, b) = match inner.prp.lock() {
                    Ok(mut p) => p.on_send(frame),
                    Err(_) => return,
                };
                inner.send_frame(0, &a);
                inner.send_frame(1, &b);
            }
            NetMode::ActiveBackup => {
                let i = inner.active.load(Ordering::Relaxed);
                inner.send_packet(i, packet);
            }
        }
    }

    /// Reads up to [`POLL_BUDGET`] frames waiting on path `path` and hands those for the
    /// guest to `deliver`, each as a virtio-net packet (header, then frame). Says whether the
    /// budget ran out first: frames may then still wait, the path's descriptor stays
    /// readable, and the caller comes back after its other work (a flood on one path must
    /// not starve the guest's transmissions or the other path).
    pub fn poll(&self, path: usize, deliver: &mut dyn FnMut(&[u8])) -> bool {
        let inner = &self.inner;
        let Some(slot) = inner.slots.get(path) else {
            return false;
        };
        let mut buf = match inner.rxbuf.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        let vnet = slot.path.vnet_hdr();
        for _ in 0..POLL_BUDGET {
            // A path without headers reads behind a zero one, so every packet has the same shape.
            let got = if vnet {
                slot.path.recv(&mut buf)
            } else {
                buf[..VNET_HDR_LEN].fill(0);
                slot.path
                    .recv(&mut buf[VNET_HDR_LEN..])
                    .map(|n| n + VNET_HDR_LEN)
            };
            let n = match got {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let ms = inner.opened.elapsed().as_millis() as u64;
                    // Release: the answers noted in this pass are seen with it.
                    slot.drained_ms.store(ms.max(1), Ordering::Release);
                    return false;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    // A frame too large for the buffer, already off the queue: counted, and
                    // the path read on, so a stream of them cannot keep it from being read
                    // empty.
                    slot.c.oversize.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(e) => {
                    warn!("path {path}: receive failed: {e}");
                    return false;
                }
            };
            slot.c.received.fetch_add(1, Ordering::Relaxed);
            if n < VNET_HDR_LEN + 14 {
                slot.c.runts.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if slot.forced_down.load(Ordering::Relaxed) {
                slot.c.dropped_down.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (hdr, frame) = buf[..n].split_at(VNET_HDR_LEN);
            if vnet {
                let w = HdrWork::of(hdr);
                if w.csum {
                    slot.c.csum_received.fetch_add(1, Ordering::Relaxed);
                }
                if w.gso {
                    slot.c.gso_received.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(target) = inner.cfg.probe {
                if is_probe_answer(frame, slot.probe_mac, target) {
                    slot.c.probe_answers.fetch_add(1, Ordering::Relaxed);
                    let ms = inner.opened.elapsed().as_millis() as u64;
                    slot.last_answer_ms.store(ms.max(1), Ordering::Relaxed);
                    continue;
                }
            }
            match inner.cfg.mode {
                NetMode::Prp => {
                    let lan = if path == 0 { Lan::A } else { Lan::B };
                    let out = match inner.prp.lock() {
                        Ok(mut p) => p.on_receive(lan, frame, Instant::now()),
                        Err(_) => None,
                    };
                    if let Some(f) = out {
                        slot.c.delivered.fetch_add(1, Ordering::Relaxed);
                        // The stripped frame is a prefix of what was read.
                        deliver(&buf[..VNET_HDR_LEN + f.len()]);
                    }
                }
                NetMode::ActiveBackup => {
                    if path == inner.active.load(Ordering::Relaxed) {
                        slot.c.delivered.fetch_add(1, Ordering::Relaxed);
                        deliver(&buf[..n]);
                    } else {
                        slot.c.dropped_inactive.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        true
    }

    fn check(&self, path: usize) -> Result<&Slot, NetMirrorError> {
        self.inner
            .slots
            .get(path)
            .ok_or(NetMirrorError::NoSuchPath(path))
    }

    /// Cuts path `path` as if its cable were pulled (fault drills).
    pub fn fail_path(&self, path: usize) -> Result<(), NetMirrorError> {
        self.check(path)?.forced_down.store(true, Ordering::Relaxed);
        warn!("path {path} failed by operator");
        self.inner.evaluate();
        Ok(())
    }

    /// Undoes [`NetMirror::fail_path`].
    pub fn restore_path(&self, path: usize) -> Result<(), NetMirrorError> {
        self.check(path)?
            .forced_down
            .store(false, Ordering::Relaxed);
        info!("path {path} restored by operator");
        self.inner.evaluate();
        Ok(())
    }

    /// A snapshot for the control socket.
    pub fn status(&self) -> NetStatus {
        let inner = &self.inner;
        let active = inner.active.load(Ordering::Relaxed);
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStatus {
            mode: inner.cfg.mode,
            offload: inner.cfg.offload,
            failovers: g(&inner.failovers),
            prp: inner
                .prp
                .lock()
                .ok()
                .and_then(|p| serde_json::to_value(p.counters()).ok())
                .unwrap_or(serde_json::Value::Null),
            paths: inner
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| PathStatus {
                    index: i,
                    spec: s.path.spec().to_string(),
                    state: if s.forced_down.load(Ordering::Relaxed) {
                        "failed"
                    } else if !s.link.load(Ordering::Relaxed) {
                        "down"
                    } else if !s.probe_ok.load(Ordering::Relaxed) {
                        "no-answer"
                    } else {
                        "up"
                    },
                    active: inner.cfg.mode == NetMode::Prp || i == active,
                    sent: g(&s.c.sent),
                    send_errors: g(&s.c.send_errors),
                    received: g(&s.c.received),
                    delivered: g(&s.c.delivered),
                    dropped_inactive: g(&s.c.dropped_inactive),
                    dropped_down: g(&s.c.dropped_down),
                    oversize: g(&s.c.oversize),
                    probe_answers: g(&s.c.probe_answers),
                    csum_sent: g(&s.c.csum_sent),
                    gso_sent: g(&s.c.gso_sent),
                    csum_received: g(&s.c.csum_received),
                    gso_received: g(&s.c.gso_received),
                    runts: g(&s.c.runts),
                })
                .collect(),
        }
    }
}

impl Inner {
    /// Sends a frame of the mirror's own (probe, announcement, PRP frame) on path `i`.
    fn send_frame(&self, i: usize, frame: &[u8]) {
        let Some(s) = self.slots.get(i) else { return };
        if s.path.vnet_hdr() {
            let mut p = vec![0u8; VNET_HDR_LEN + frame.len()];
            p[VNET_HDR_LEN..].copy_from_slice(frame);
            self.send_raw(s, &p, frame.len(), HdrWork::of(&p));
        } else {
            self.send_raw(s, frame, frame.len(), HdrWork::of(&[]));
        }
    }

    /// Sends a guest's packet (header, then frame) on path `i`.
    fn send_packet(&self, i: usize, packet: &[u8]) {
        let Some(s) = self.slots.get(i) else { return };
        let frame_len = packet.len() - VNET_HDR_LEN;
        if s.path.vnet_hdr() {
            let w = HdrWork::of(packet);
            self.send_raw(s, packet, frame_len, w);
        } else {
            self.send_raw(s, &packet[VNET_HDR_LEN..], frame_len, HdrWork::of(&[]));
        }
    }

    fn send_raw(&self, s: &Slot, bytes: &[u8], frame_len: usize, w: HdrWork) {
        if s.forced_down.load(Ordering::Relaxed) {
            s.c.dropped_down.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // A segmentation-offload frame is cut to the path's MTU by the kernel.
        if frame_len > s.max_frame && !w.gso {
            s.c.oversize.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match s.path.send(bytes) {
            Ok(()) => {
                s.c.sent.fetch_add(1, Ordering::Relaxed);
                if w.csum {
                    s.c.csum_sent.fetch_add(1, Ordering::Relaxed);
                }
                if w.gso {
                    s.c.gso_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                s.c.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Refreshes carrier and, in active-backup, moves traffic off a path that went down.
    fn evaluate(&self) {
        let now_ms = self.opened.elapsed().as_millis() as u64;
        let window = (self.cfg.probe_interval * self.cfg.probe_misses.max(1)).as_millis() as u64
            // One interval more: an answer takes a moment to come back.
            + self.cfg.probe_interval.as_millis() as u64;
        // Paths whose receiver is behind: it has not read them empty for a probe interval.
        let mut behind = [false; 2];
        for (i, s) in self.slots.iter().enumerate() {
            s.link.store(s.path.link_up(), Ordering::Relaxed);
            if self.cfg.probe.is_some() {
                // A path is judged only on what was read. The receiver runs on the frontend's
                // worker, which may be late (a host starved of CPU) or absent (no frontend
                // yet): answers queued behind it are no silence, and judging then would fail
                // over to whichever path happened to be read first. With frames waiting the
                // judgement is made as of the last time the path was read empty, so a path
                // that never goes quiet (a busy segment) is still judged while its receiver
                // keeps up.
                let seen = self.seen_until(s, now_ms);
                behind[i] =
                    now_ms.saturating_sub(seen) > self.cfg.probe_interval.as_millis() as u64;
                let ok = heard(seen, s.last_answer_ms.load(Ordering::Relaxed), window);
                if s.probe_ok.swap(ok, Ordering::Relaxed) != ok {
                    if ok {
                        info!("path {i}: the probe target answers again");
                    } else {
                        warn!(
                            "path {i}: no answer to ARP probes for {window} ms although the link is up"
                        );
                    }
                }
            }
        }
        if self.cfg.mode != NetMode::ActiveBackup {
            return;
        }
        let active = self.active.load(Ordering::Relaxed);
        let other = 1 - active;
        let a = &self.slots[active];
        // Down for silence alone while its receiver is behind: the other path being up may
        // only mean it was read first (both judged while nobody read, then one receiver
        // catching up before the other). Traffic stays until the frames have been read.
        let unread_silence = behind[active]
            && a.link.load(Ordering::Relaxed)
            && !a.forced_down.load(Ordering::Relaxed);
        // Compare-and-swap: an operator's drill evaluates too, on the control thread, and one
        // failover is counted and announced once.
        if !a.usable()
            && self.slots[other].usable()
            && !unread_silence
            && self
                .active
                .compare_exchange(active, other, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.failovers.fetch_add(1, Ordering::Relaxed);
            warn!("path {active} is down: traffic moves to path {other}");
            self.announce(other);
        }
    }

    /// Up to when everything path `s` received has been read (ms since the mirror opened):
    /// now when nothing waits on it, otherwise the last time its receiver read it empty. A
    /// receiver in the middle of a read (it holds the buffer) may have taken an answer it has
    /// not noted yet, so then too only its last empty read counts; the monitor never waits for
    /// it (a receiver under a flood of frames may not let go for long).
    fn seen_until(&self, s: &Slot, now_ms: u64) -> u64 {
        // Acquire: with the time, the answers noted before it.
        let drained = s.drained_ms.load(Ordering::Acquire);
        let idle = match self.rxbuf.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if idle.is_some() && !s.path.has_pending() {
            now_ms
        } else {
            drained
        }
    }

    /// Tells the new path's network where the guest's addresses live now.
    fn announce(&self, path: usize) {
        let learned = match self.learned.lock() {
            Ok(l) => l.clone(),
            Err(_) => return,
        };
        let Some(mac) = learned.mac else { return };
        for ip in &learned.ipv4 {
            self.send_frame(path, &gratuitous_arp(mac, *ip));
        }
        for ip in &learned.ipv6 {
            self.send_frame(path, &unsolicited_na(mac, *ip));
        }
        info!(
            "announced {} IPv4 and {} IPv6 addresses of {} on path {path}",
            learned.ipv4.len(),
            learned.ipv6.len(),
            fmt_mac(mac)
        );
    }
}

/// Whether a path whose last probe answer came at `last` (0 for never) counts as answering at
/// `at` (ms since the mirror opened). Until the first window has passed no path is judged.
fn heard(at: u64, last: u64, window: u64) -> bool {
    at < window || (last > 0 && at.saturating_sub(last) <= window)
}

/// Largest packet (header and frame) the mirror moves.
fn max_packet(offload: bool) -> usize {
    VNET_HDR_LEN + if offload { MAX_GSO_FRAME } else { MAX_FRAME }
}

/// A locally administered MAC for path `i`'s probes, distinct per daemon (pid) and path.
fn probe_mac(i: usize) -> [u8; 6] {
    let pid = std::process::id().to_be_bytes();
    [0x02, 0x76, pid[1], pid[2], pid[3], i as u8]
}

/// An ARP probe (RFC 5227: sender address 0.0.0.0) asking for `target`. Its owner answers to
/// `mac` alone, and nobody's ARP cache learns anything from it.
pub fn arp_probe(mac: [u8; 6], target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet, IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(60, 0);
    f
}

/// Whether `frame` is `target`'s ARP reply to a probe sent from `mac`.
fn is_probe_answer(frame: &[u8], mac: [u8; 6], target: Ipv4Addr) -> bool {
    let Some((ETH_ARP, off)) = ethertype(frame) else {
        return false;
    };
    let Some(arp) = frame.get(off..off + 28) else {
        return false;
    };
    frame[..6] == mac && arp[6..8] == [0, 2] && arp[14..18] == target.octets()
}

fn fmt_mac(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Frames [`NetMirror::poll`] reads from a path per call, as a NIC driver's NAPI budget.
pub const POLL_BUDGET: usize = 64;

/// How often duplicate-discard state is aged.
const SWEEP_INTERVAL: Duration = Duration::from_millis(200);

fn monitor(inner: Weak<Inner>) {
    let mut last_supervision = Instant::now() - Duration::from_secs(10);
    let mut last_probe = Instant::now() - Duration::from_secs(10);
    let mut last_sweep = Instant::now();
    loop {
        let Some(me) = inner.upgrade() else { return };
        if let Some(target) = me.cfg.probe {
            if last_probe.elapsed() >= me.cfg.probe_interval {
                last_probe = Instant::now();
                for (i, s) in me.slots.iter().enumerate() {
                    me.send_frame(i, &arp_probe(s.probe_mac, target));
                }
            }
        }
        me.evaluate();
        // Sweeping well inside the 400 ms forget time keeps the `unique` counters (frames one
        // LAN lost) current for status readers, not up to a supervision period late.
        if me.cfg.mode == NetMode::Prp && last_sweep.elapsed() >= SWEEP_INTERVAL {
            last_sweep = Instant::now();
            if let Ok(mut p) = me.prp.lock() {
                p.sweep(last_sweep);
            }
        }
        if me.cfg.mode == NetMode::Prp && last_supervision.elapsed() >= Duration::from_secs(2) {
            last_supervision = Instant::now();
            let mac = me.learned.lock().ok().and_then(|l| l.mac);
            let frames = match me.prp.lock() {
                Ok(mut p) => mac.map(|m| p.supervision_frames(m)),
                Err(_) => None,
            };
            if let Some((a, b)) = frames {
                me.send_frame(0, &a);
                me.send_frame(1, &b);
            }
        }
        let tick = me.cfg.monitor_interval;
        drop(me);
        thread::sleep(tick);
    }
}

const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;

fn ethertype(frame: &[u8]) -> Option<(u16, usize)> {
    let t = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if t == 0x8100 {
        return Some((u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]), 18));
    }
    Some((t, 14))
}

/// Remembers the guest's MAC and the addresses it speaks from.
fn learn(learned: &Mutex<Learned>, frame: &[u8]) {
    if frame.len() < 14 || frame[6] & 1 != 0 {
        return;
    }
    let Some((t, off)) = ethertype(frame) else {
        return;
    };
    let ip4 = match t {
        ETH_ARP if frame.len() >= off + 28 => Some(Ipv4Addr::new(
            frame[off + 14],
            frame[off + 15],
            frame[off + 16],
            frame[off + 17],
        )),
        ETH_IPV4 if frame.len() >= off + 20 => Some(Ipv4Addr::new(
            frame[off + 12],
            frame[off + 13],
            frame[off + 14],
            frame[off + 15],
        )),
        _ => None,
    };
    let ip6 = if t == ETH_IPV6 && frame.len() >= off + 40 {
        let mut a = [0u8; 16];
        a.copy_from_slice(&frame[off + 8..off + 24]);
        Some(Ipv6Addr::from(a))
    } else {
        None
    };
    let Ok(mut l) = learned.lock() else { return };
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&frame[6..12]);
    if l.mac != Some(mac) {
        l.mac = Some(mac);
    }
    if let Some(ip) = ip4.filter(|ip| !ip.is_unspecified() && !ip.is_broadcast()) {
        if !l.ipv4.contains(&ip) && l.ipv4.len() < 16 {
            l.ipv4.push(ip);
        }
    }
    if let Some(ip) = ip6.filter(|ip| !ip.is_unspecified() && !ip.is_multicast()) {
        if !l.ipv6.contains(&ip) && l.ipv6.len() < 16 {
            l.ipv6.push(ip);
        }
    }
}

/// An ARP request for `ip` from `ip` (RFC 5227 announcement).
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f.resize(60, 0);
    f
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An unsolicited neighbour advertisement of `ip` to all nodes (RFC 4861 7.2.6).
pub fn unsolicited_na(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let mut pseudo = Vec::with_capacity(40 + icmp.len());
    pseudo.extend_from_slice(&ip.octets());
    pseudo.extend_from_slice(&all_nodes.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let sum = checksum(&pseudo, 0);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&all_nodes.octets());
    f.extend_from_slice(&icmp);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_the_guest_addresses() {
        let l = Mutex::new(Learned::default());
        let mac = [2, 0, 0, 0, 0, 9];
        learn(&l, &gratuitous_arp(mac, Ipv4Addr::new(10, 9, 0, 2)));
        learn(&l, &unsolicited_na(mac, "fd00::2".parse().unwrap()));
        let l = l.into_inner().unwrap();
        assert_eq!(l.mac, Some(mac));
        assert_eq!(l.ipv4, vec![Ipv4Addr::new(10, 9, 0, 2)]);
        assert_eq!(l.ipv6, vec!["fd00::2".parse::<Ipv6Addr>().unwrap()]);
    }

    #[test]
    fn probes_and_their_answers() {
        let mac = [0x02, 0x76, 1, 2, 3, 0];
        let target = Ipv4Addr::new(10, 0, 0, 9);
        let p = arp_probe(mac, target);
        assert_eq!(p.len(), 60);
        assert_eq!(&p[..6], &[0xff; 6]);
        assert_eq!(&p[28..32], &[0, 0, 0, 0], "sender address 0.0.0.0");
        assert_eq!(&p[38..42], &target.octets());
        // The target's answer, as Linux sends it: unicast to the probe's MAC.
        let mut a = Vec::new();
        a.extend_from_slice(&mac);
        a.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        a.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
        a.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        a.extend_from_slice(&target.octets());
        a.extend_from_slice(&mac);
        a.extend_from_slice(&[0, 0, 0, 0]);
        assert!(is_probe_answer(&a, mac, target));
        assert!(!is_probe_answer(&a, [0x02, 0x76, 1, 2, 3, 1], target));
        assert!(!is_probe_answer(&a, mac, Ipv4Addr::new(10, 0, 0, 8)));
        assert!(
            !is_probe_answer(&p, mac, target),
            "our own probe is no answer"
        );
        assert!(!is_probe_answer(&a[..30], mac, target));
    }

    #[test]
    fn announcements_are_well_formed() {
        let mac = [2, 0, 0, 0, 0, 9];
        let a = gratuitous_arp(mac, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(a.len(), 60);
        assert_eq!(&a[12..14], &[8, 6]);
        assert_eq!(&a[28..32], &[10, 0, 0, 1]);
        assert_eq!(&a[38..42], &[10, 0, 0, 1]);
        let na = unsolicited_na(mac, "fd00::1".parse().unwrap());
        assert_eq!(na[54], 136);
        // The ICMPv6 checksum verifies: summing with it included gives zero.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&na[22..38]);
        pseudo.extend_from_slice(&na[38..54]);
        pseudo.extend_from_slice(&((na.len() - 54) as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(&na[54..]);
        assert_eq!(checksum(&pseudo, 0), 0);
    }

    #[test]
    fn offloads_are_refused_with_prp_before_any_path_opens() {
        let specs: Vec<PathSpec> = ["tap:nosuch0", "tap:nosuch1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let cfg = NetConfig {
            offload: true,
            ..Default::default()
        };
        let e = NetMirror::open(&specs, cfg).err().unwrap();
        assert!(matches!(e, NetMirrorError::OffloadWithPrp), "{e}");
        assert!(e.to_string().contains("active-backup"), "{e}");
    }

    #[test]
    fn header_work_is_read_from_flags_and_gso_type() {
        assert_eq!(
            HdrWork::of(&[0; 12]),
            HdrWork {
                csum: false,
                gso: false
            }
        );
        assert_eq!(
            HdrWork::of(&[1, 0x81]),
            HdrWork {
                csum: true,
                gso: true
            }
        );
        assert!(!HdrWork::of(&[0, 0x80]).gso, "ECN alone is no GSO type");
        assert_eq!(
            HdrWork::of(&[]),
            HdrWork {
                csum: false,
                gso: false
            }
        );
    }

    #[test]
    fn modes_parse() {
        assert_eq!("prp".parse::<NetMode>().unwrap(), NetMode::Prp);
        assert_eq!(
            "active-backup".parse::<NetMode>().unwrap(),
            NetMode::ActiveBackup
        );
        assert!("bond"
            .parse::<NetMode>()
            .unwrap_err()
            .contains("unknown mode 'bond'"));
    }
}
