//! vhost-user-net device over a [`NetMirror`]: one RX/TX queue pair, virtio_net_hdr v1,
//! MRG_RXBUF, EVENT_IDX, and checksum/TSO offloads when the mirror's paths carry virtio-net
//! headers (active-backup over TAP paths).
//!
//! Module split as for the block device: [`tx`] turns TX chains into frames, [`rx`] puts frames
//! into RX chains, and this file is the device. One worker thread serves both queues and the
//! paths' descriptors, so RX delivery needs no lock beyond the vring's.
//!
//! The VMM (QEMU, cloud-hypervisor) owns the virtio-net config space (MAC, link status, MTU) and
//! reports the link up while this socket is connected: a path failure is invisible to the guest
//! by design, and the device never tries to change it.

pub mod rx;
mod shim;
#[cfg(test)]
mod tests;
pub mod tx;

use std::collections::VecDeque;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use log::{info, warn};
use mirror::NetMirror;
use serde::Serialize;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const NUM_QUEUES: usize = 2;
/// Frames kept for the guest while it has no receive buffers; more are dropped and counted.
const PENDING_MAX: usize = 256;

/// Errors of the net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot listen on {path}: {source}")]
    Listen { path: String, source: io::Error },
    #[error("vhost-user connection: {0}")]
    Accept(io::Error),
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

/// Device counters, for the control socket.
#[derive(Debug, Default)]
struct Counters {
    tx_frames: AtomicU64,
    tx_malformed: AtomicU64,
    rx_frames: AtomicU64,
    rx_dropped_no_buffer: AtomicU64,
    rx_too_big: AtomicU64,
    rx_bad_chains: AtomicU64,
    rx_dropped_not_ready: AtomicU64,
}

/// Device counters as reported.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatus {
    pub tx_frames: u64,
    pub tx_malformed: u64,
    pub rx_frames: u64,
    pub rx_dropped_no_buffer: u64,
    pub rx_too_big: u64,
    pub rx_bad_chains: u64,
    /// Frames that arrived while the guest's receive queue was not set up.
    pub rx_dropped_not_ready: u64,
    pub connected: bool,
}

/// Counters shared by every connection of one daemon.
#[derive(Default)]
pub struct NetStats {
    c: Counters,
    connected: AtomicBool,
}

impl NetStats {
    /// A snapshot.
    pub fn status(&self) -> DeviceStatus {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DeviceStatus {
            tx_frames: g(&self.c.tx_frames),
            tx_malformed: g(&self.c.tx_malformed),
            rx_frames: g(&self.c.rx_frames),
            rx_dropped_no_buffer: g(&self.c.rx_dropped_no_buffer),
            rx_too_big: g(&self.c.rx_too_big),
            rx_bad_chains: g(&self.c.rx_bad_chains),
            rx_dropped_not_ready: g(&self.c.rx_dropped_not_ready),
            connected: self.connected.load(Ordering::Relaxed),
        }
    }
}

/// The vhost-user-net device of one frontend connection.
pub struct VhostUserNet {
    engine: NetMirror,
    stats: Arc<NetStats>,
    event_idx: AtomicBool,
    mergeable: AtomicBool,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    /// Worker-thread state: the TX scratch frame and frames waiting for RX buffers.
    work: Mutex<Work>,
}

struct Work {
    packet: Vec<u8>,
    pending: VecDeque<Vec<u8>>,
}

/// Offloads offered when the paths carry virtio-net headers: the guest's partial checksums and
/// TSO frames go to the TAP as they are (the kernel finishes or segments them), and the TAP
/// may hand the guest the same kinds of frame where the guest accepts them.
const OFFLOAD_FEATURES: u64 = 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN;

/// The TAP receive offloads (`TUN_F_*`) matching what the guest acknowledged it takes, as
/// QEMU's TAP backend sets them.
pub fn tun_offloads(features: u64) -> u32 {
    let has = |bit: u32| features & (1 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        // Without checksum offload the kernel would refuse segmentation offloads anyway.
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        f |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        f |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) {
        f |= libc::TUN_F_TSO_ECN;
    }
    f
}

impl VhostUserNet {
    /// A device switching frames through `engine`.
    pub fn new(engine: NetMirror, stats: Arc<NetStats>) -> Self {
        VhostUserNet {
            stats,
            event_idx: AtomicBool::new(false),
            mergeable: AtomicBool::new(false),
            mem: RwLock::new(None),
            work: Mutex::new(Work {
                packet: Vec::with_capacity(engine.max_packet()),
                pending: VecDeque::new(),
            }),
            engine,
        }
    }

    fn memory(&self) -> Option<Arc<GuestMemoryMmap>> {
        self.mem
            .read()
            .ok()
            .and_then(|m| m.as_ref().map(|m| m.memory().into_inner()))
    }

    fn process_tx(&self, vring: &VringRwLock, mem: &GuestMemoryMmap, work: &mut Work) {
        let mut any = false;
        loop {
            let chain = {
                let mut g = vring.get_mut();
                g.get_queue_mut().pop_descriptor_chain(mem)
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match tx::read_packet(chain, mem, self.engine.max_packet(), &mut work.packet) {
                Ok(()) => {
                    self.stats.c.tx_frames.fetch_add(1, Ordering::Relaxed);
                    self.engine.transmit(&work.packet);
                }
                Err(e) => {
                    if self.stats.c.tx_malformed.fetch_add(1, Ordering::Relaxed) < 10 {
                        warn!("dropping TX chain {head}: {e}");
                    }
                }
            }
            if let Err(e) = vring.add_used(head, 0) {
                warn!("TX used ring: {e}");
            }
            any = true;
        }
        if any {
            notify(vring);
        }
    }

    /// Puts `packet` into the guest's RX queue, or keeps it for later; returns whether the
    /// queue ran out of buffers.
    fn deliver(
        &self,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        packet: &[u8],
        work: &mut Work,
    ) -> bool {
        if !work.pending.is_empty() {
            self.keep(packet, work);
            return true;
        }
        match self.write_one(vring, mem, packet) {
            Ok(()) => false,
            Err(rx::RxError::NoBuffers) => {
                self.keep(packet, work);
                true
            }
            Err(rx::RxError::TooBig) => {
                self.stats.c.rx_too_big.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    fn keep(&self, packet: &[u8], work: &mut Work) {
        if work.pending.len() < PENDING_MAX {
            work.pending.push_back(packet.to_vec());
        } else {
            self.stats
                .c
                .rx_dropped_no_buffer
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn write_one(
        &self,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        packet: &[u8],
    ) -> Result<(), rx::RxError> {
        let mut used = rx::Used::new();
        let mut bad = 0;
        let res = {
            let mut g = vring.get_mut();
            let q = g.get_queue_mut();
            let r = rx::write_packet(
                q,
                mem,
                packet,
                self.mergeable.load(Ordering::Relaxed),
                &mut used,
                &mut bad,
            );
            if r.is_ok() {
                for &(head, len) in &used {
                    if let Err(e) = q.add_used(mem, head, len) {
                        warn!("RX used ring: {e}");
                    }
                }
            }
            r
        };
        if bad > 0 {
            self.stats.c.rx_bad_chains.fetch_add(bad, Ordering::Relaxed);
        }
        if res.is_ok() {
            self.stats.c.rx_frames.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    fn flush_pending(&self, vring: &VringRwLock, mem: &GuestMemoryMmap, work: &mut Work) -> bool {
        let mut any = false;
        while let Some(f) = work.pending.pop_front() {
            match self.write_one(vring, mem, &f) {
                Ok(()) => any = true,
                Err(rx::RxError::NoBuffers) => {
                    work.pending.push_front(f);
                    break;
                }
                Err(rx::RxError::TooBig) => {
                    self.stats.c.rx_too_big.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        any
    }
}

fn notify(vring: &VringRwLock) {
    match vring.needs_notification() {
        Ok(false) => {}
        _ => {
            if let Err(e) = vring.signal_used_queue() {
                warn!("cannot signal used queue: {e}");
            }
        }
    }
}

impl VhostUserBackend for VhostUserNet {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    /// VHOST_USER_F_PROTOCOL_FEATURES is offered (QEMU's vhost-user-net needs it to start the
    /// device); the [`shim`] relay deals with QEMU's early SET_VRING_ENABLE. VIRTIO_NET_F_MTU is
    /// offered so that the VMM's `host_mtu` reaches the guest (QEMU masks the feature off unless
    /// the backend has it): one remedy for the PRP trailer's 6 bytes.
    fn features(&self) -> u64 {
        let offloads = if self.engine.offload() {
            OFFLOAD_FEATURES
        } else {
            0
        };
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_MTU
            | offloads
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.mergeable.store(
            features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            Ordering::Relaxed,
        );
        if self.engine.offload() {
            let tun = tun_offloads(features);
            match self.engine.set_guest_offloads(tun) {
                Ok(()) => info!("guest takes offloads {tun:#x} (TUN_F_*)"),
                Err(e) => {
                    warn!("{e}: the guest gets no receive offloads");
                    let _ = self.engine.set_guest_offloads(0);
                }
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        if let Ok(mut m) = self.mem.write() {
            *m = Some(mem);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![0b11]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        let ev = device_event as usize;
        let (Some(rxq), Some(txq)) = (vrings.get(RX_QUEUE), vrings.get(TX_QUEUE)) else {
            return Ok(());
        };
        let mem = self.memory();
        let rx_ready = {
            let q = rxq.get_ref();
            q.get_queue().ready() && q.is_enabled()
        };
        let (Some(mem), true) = (mem, rx_ready) else {
            // Path descriptors are level-triggered: frames nobody can take yet must still be
            // read, or the worker would spin on them.
            if let Some(path) = ev.checked_sub(NUM_QUEUES + 1) {
                self.engine.poll(path, &mut |_| {
                    self.stats
                        .c
                        .rx_dropped_not_ready
                        .fetch_add(1, Ordering::Relaxed);
                });
            }
            return Ok(());
        };
        let mut work = self.work.lock().unwrap_or_else(|p| p.into_inner());
        if ev == TX_QUEUE {
            if self.event_idx.load(Ordering::Acquire) {
                loop {
                    txq.disable_notification().map_err(io::Error::other)?;
                    self.process_tx(txq, &mem, &mut work);
                    if !txq.enable_notification().map_err(io::Error::other)? {
                        break;
                    }
                }
            } else {
                self.process_tx(txq, &mem, &mut work);
            }
            return Ok(());
        }
        let mut delivered = false;
        if ev == RX_QUEUE {
            delivered = self.flush_pending(rxq, &mem, &mut work);
        } else if let Some(path) = ev.checked_sub(NUM_QUEUES + 1) {
            delivered |= self.flush_pending(rxq, &mem, &mut work);
            let before = self.stats.c.rx_frames.load(Ordering::Relaxed);
            self.engine.poll(path, &mut |frame| {
                self.deliver(rxq, &mem, frame, &mut work);
            });
            delivered |= self.stats.c.rx_frames.load(Ordering::Relaxed) != before;
        }
        if delivered {
            notify(rxq);
        }
        Ok(())
    }
}

/// Serves `engine` on the vhost-user socket `socket`, one frontend at a time, until `stop`.
pub fn serve(
    socket: &Path,
    engine: NetMirror,
    stats: Arc<NetStats>,
    stop: Arc<AtomicBool>,
) -> Result<(), NetError> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|source| NetError::Listen {
        path: socket.display().to_string(),
        source,
    })?;
    info!("vhost-user-net listening on {}", socket.display());
    let mut serial = 0u64;
    while !stop.load(Ordering::Acquire) {
        let (vmm, _) = listener.accept().map_err(NetError::Accept)?;
        // The vhost crate's handler gets its end through a private (abstract) socket; the
        // relay in between holds back QEMU's early SET_VRING_ENABLE (see `shim`).
        serial += 1;
        let name = format!("vhost-mirror-net.{}.{serial}", std::process::id());
        let inner = SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| Ok((UnixListener::bind_addr(&a)?, a)))
            .and_then(|(l, a)| Ok((l, UnixStream::connect_addr(&a)?)));
        let (inner, handler_end) = inner.map_err(NetError::Accept)?;
        let mut inner = Listener::from(inner);
        let backend = Arc::new(VhostUserNet::new(engine.clone(), stats.clone()));
        let mut daemon = VhostUserDaemon::new(
            "vhost-mirror-net".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| NetError::Daemon(e.to_string()))?;
        let handlers = daemon.get_epoll_handlers();
        for (i, fd) in engine.fds().into_iter().enumerate() {
            let id = (NUM_QUEUES + 1 + i) as u64;
            if let Some(h) = handlers.first() {
                h.register_listener(fd, EventSet::IN, id)
                    .map_err(|e| NetError::Daemon(format!("cannot watch path {i}: {e}")))?;
            }
        }
        daemon
            .start(&mut inner)
            .map_err(|e| NetError::Daemon(e.to_string()))?;
        drop(inner);
        shim::relay(vmm, handler_end).map_err(NetError::Accept)?;
        stats.connected.store(true, Ordering::Relaxed);
        info!("frontend connected");
        match daemon.wait() {
            Ok(()) => info!("frontend disconnected"),
            Err(e) => warn!("frontend connection ended: {e}"),
        }
        stats.connected.store(false, Ordering::Relaxed);
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
    }
    Ok(())
}
