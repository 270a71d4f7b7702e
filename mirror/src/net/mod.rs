//! The network redundancy engine's per-frame logic (PRP, IEC 62439-3), free of I/O and threads:
//! the vhost-user-net backend and the PRP gateway call it for every frame and own the sockets,
//! the clock and the locking.
//!
//! - [`prp`]: the Redundancy Control Trailer and supervision frames on the wire.
//! - [`discard`]: duplicate discard by source and sequence number.
//! - [`PrpNode`]: one endpoint: a sequence counter for what it sends, duplicate discard for what
//!   it receives, the peers it has heard from, and counters.

pub mod discard;
pub mod prp;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use discard::{Discard, DiscardConfig, DiscardLanStats, DiscardStats, Verdict};
pub use prp::{
    add_trailer, build_supervision, parse_supervision, parse_trailer, strip, write_trailed, Lan,
    NodeKind, PrpError, Rct, Supervision, RCT_LEN,
};

/// Settings of a [`PrpNode`].
#[derive(Debug, Clone)]
pub struct PrpConfig {
    pub discard: DiscardConfig,
    /// Largest frame, trailer included, to send with a trailer. Frames beyond it (or beyond the
    /// trailer's 12-bit size field, whatever this says) go out as they are; see
    /// [`PrpNode::on_send`].
    pub max_frame: usize,
    /// First sequence number to send; None picks one from the clock, so a quick restart is
    /// unlikely to reuse numbers peers still remember and discard.
    pub seq_start: Option<u16>,
    /// Peers whose supervision frames are remembered; the least recently heard goes first.
    pub max_peers: usize,
}

impl Default for PrpConfig {
    fn default() -> Self {
        PrpConfig {
            discard: DiscardConfig::default(),
            max_frame: usize::MAX,
            seq_start: None,
            max_peers: 256,
        }
    }
}

/// Receive counters of one LAN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LanCounters {
    /// Frames handed to [`PrpNode::on_receive`] from this LAN; always
    /// `no_trailer + accepted + duplicates + supervision + own`.
    pub received: u64,
    /// Frames without a valid trailer, passed up untouched (peers that do not speak PRP).
    pub no_trailer: u64,
    /// Frames with a trailer, passed up as first copies.
    pub accepted: u64,
    /// Frames with a trailer discarded as copies of frames already passed up.
    pub duplicates: u64,
    /// Frames that came over this LAN only: the other LAN lost them (counted once their
    /// sequence numbers are forgotten, 400 ms on).
    pub unique: u64,
    /// Frames whose trailer names the other LAN: the two networks are cross-connected.
    pub wrong_lan: u64,
    /// Supervision frames consumed.
    pub supervision: u64,
    /// This node's own frames come back (a loop between the LANs), discarded.
    pub own: u64,
}

/// What one peer's supervision frames said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerCounters {
    pub mac: String,
    pub kind: NodeKind,
    pub redbox: Option<String>,
    pub supervision_a: u64,
    pub supervision_b: u64,
}

/// A snapshot of a [`PrpNode`]'s counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrpCounters {
    pub lan_a: LanCounters,
    pub lan_b: LanCounters,
    /// Frames sent (each on both LANs).
    pub sent: u64,
    /// Frames sent without a trailer because they were too large for one: the peer gets both
    /// copies.
    pub sent_oversize: u64,
    /// Frames sent without a trailer because they were shorter than an Ethernet header.
    pub sent_runt: u64,
    pub supervision_sent: u64,
    /// Sources in the duplicate-discard table.
    pub nodes: usize,
    pub blocks: usize,
    pub evicted_nodes: u64,
    pub evicted_blocks: u64,
    pub peers: Vec<PeerCounters>,
}

struct Peer {
    kind: NodeKind,
    redbox: Option<[u8; 6]>,
    sup_seq: Option<u16>,
    frames: [u64; 2],
    last: [Option<Instant>; 2],
}

impl Peer {
    fn last_heard(&self) -> Option<Instant> {
        self.last[0].max(self.last[1])
    }
}

#[derive(Default, Clone, Copy)]
struct RxCounters {
    received: u64,
    no_trailer: u64,
    accepted: u64,
    duplicates: u64,
    wrong_lan: u64,
    supervision: u64,
    own: u64,
}

/// One PRP endpoint (a doubly attached node, or a RedBox for the hosts behind it).
pub struct PrpNode {
    cfg: PrpConfig,
    seq: u16,
    sup_seq: u16,
    local_mac: Option<[u8; 6]>,
    discard: Discard,
    peers: HashMap<[u8; 6], Peer>,
    rx: [RxCounters; 2],
    sent: u64,
    sent_oversize: u64,
    sent_runt: u64,
    supervision_sent: u64,
}

impl Default for PrpNode {
    fn default() -> Self {
        PrpNode::new()
    }
}

fn clock_seq() -> u16 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let x = (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32);
    // Fold so every bit of the clock and pid moves the result.
    (x ^ (x >> 16) ^ (x >> 32) ^ (x >> 48)) as u16
}

fn fmt_mac(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

impl PrpNode {
    pub fn new() -> PrpNode {
        PrpNode::with_config(PrpConfig::default())
    }

    pub fn with_config(cfg: PrpConfig) -> PrpNode {
        let seq = cfg.seq_start.unwrap_or_else(clock_seq);
        PrpNode {
            discard: Discard::new(cfg.discard.clone()),
            cfg,
            seq,
            sup_seq: 0,
            local_mac: None,
            peers: HashMap::new(),
            rx: [RxCounters::default(); 2],
            sent: 0,
            sent_oversize: 0,
            sent_runt: 0,
            supervision_sent: 0,
        }
    }

    /// The MAC this node sends from, once known: trailed frames arriving from it are our own
    /// coming back over a loop, and are discarded and counted rather than passed up.
    pub fn set_local_mac(&mut self, mac: Option<[u8; 6]>) {
        self.local_mac = mac;
    }

    fn next_seq(&mut self) -> u16 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1);
        s
    }

    /// Both copies of `frame` with the same sequence number, LanId A and B.
    ///
    /// A frame that cannot take a trailer goes out on both LANs as it is, counted in
    /// `sent_oversize` or `sent_runt`: the peer then passes both copies up (duplicates it can
    /// live with) rather than this node dropping it. Keep the guest MTU within 4089 bytes
    /// (LSDU size limit 4095) and the path MTU 6 bytes above it so that never happens; use
    /// [`PrpNode::try_on_send`] to decide otherwise.
    pub fn on_send(&mut self, frame: &[u8]) -> (Vec<u8>, Vec<u8>) {
        match self.try_on_send(frame) {
            Ok(pair) => pair,
            Err(e) => {
                match e {
                    PrpError::Runt { .. } => self.sent_runt += 1,
                    PrpError::TooLarge { .. } | PrpError::LsduTooLarge { .. } => {
                        self.sent_oversize += 1
                    }
                }
                self.sent += 1;
                (frame.to_vec(), frame.to_vec())
            }
        }
    }

    /// Like [`PrpNode::on_send`], but a frame that cannot take a trailer is an error, counted
    /// nowhere and using no sequence number.
    pub fn try_on_send(&mut self, frame: &[u8]) -> Result<(Vec<u8>, Vec<u8>), PrpError> {
        let mut a = Vec::with_capacity(prp::trailed_len(frame)?);
        a.extend_from_slice(frame);
        add_trailer(&mut a, self.seq, Lan::A, self.cfg.max_frame)?;
        self.next_seq();
        let mut b = a.clone();
        prp::set_lan(&mut b, Lan::B);
        self.sent += 1;
        Ok((a, b))
    }

    /// Both copies of a supervision frame announcing `mac` (IEC 62439-3 sends one every
    /// LifeCheckInterval, 2 s).
    pub fn supervision_frames(&mut self, mac: [u8; 6]) -> (Vec<u8>, Vec<u8>) {
        let sup_seq = self.sup_seq;
        self.sup_seq = self.sup_seq.wrapping_add(1);
        let seq = self.next_seq();
        self.supervision_sent += 1;
        (
            build_supervision(mac, sup_seq, seq, Lan::A),
            build_supervision(mac, sup_seq, seq, Lan::B),
        )
    }

    /// A frame that arrived on `lan`: what to pass up, if anything. Frames without a valid trailer
    /// pass unchanged; first copies pass without their trailer (padding kept); duplicates,
    /// supervision frames and our own frames are consumed.
    pub fn on_receive<'a>(&mut self, lan: Lan, frame: &'a [u8], now: Instant) -> Option<&'a [u8]> {
        let li = lan.index();
        self.rx[li].received += 1;
        let Some(rct) = parse_trailer(frame) else {
            if prp::is_supervision_addressed(frame) {
                self.rx[li].supervision += 1;
                self.note_supervision(lan, frame, now);
                return None;
            }
            self.rx[li].no_trailer += 1;
            return Some(frame);
        };
        if rct.lan != lan {
            // Still a valid frame: deduplicate it like any other.
            self.rx[li].wrong_lan += 1;
        }
        // parse_trailer guarantees at least an Ethernet header and the trailer.
        let src: [u8; 6] = frame.get(6..12)?.try_into().ok()?;
        if Some(src) == self.local_mac {
            self.rx[li].own += 1;
            return None;
        }
        let verdict = self.discard.accept(src, rct.seq, lan, now);
        if prp::is_supervision_addressed(frame) {
            self.rx[li].supervision += 1;
            self.note_supervision(lan, frame, now);
            return None;
        }
        match verdict {
            Verdict::Accept => {
                self.rx[li].accepted += 1;
                strip(frame)
            }
            Verdict::Duplicate => {
                self.rx[li].duplicates += 1;
                None
            }
        }
    }

    fn note_supervision(&mut self, lan: Lan, frame: &[u8], now: Instant) {
        let Some(s) = parse_supervision(frame) else {
            return;
        };
        if Some(s.node_mac) == self.local_mac {
            return;
        }
        if !self.peers.contains_key(&s.node_mac) && self.peers.len() >= self.cfg.max_peers.max(1) {
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(_, p)| p.last_heard())
                .map(|(m, _)| *m);
            if let Some(m) = oldest {
                self.peers.remove(&m);
            }
        }
        let p = self.peers.entry(s.node_mac).or_insert(Peer {
            kind: s.kind,
            redbox: None,
            sup_seq: None,
            frames: [0; 2],
            last: [None; 2],
        });
        p.kind = s.kind;
        p.redbox = s.redbox_mac;
        p.sup_seq = s.sup_seq;
        p.frames[lan.index()] += 1;
        p.last[lan.index()] = Some(now);
    }

    /// When each LAN last carried a supervision frame from `mac`: a LAN that stopped is broken
    /// between here and that peer.
    pub fn peer_last_heard(&self, mac: [u8; 6]) -> Option<[Option<Instant>; 2]> {
        self.peers.get(&mac).map(|p| p.last)
    }

    /// The last SupSequenceNumber heard from `mac`.
    pub fn peer_sup_seq(&self, mac: [u8; 6]) -> Option<u16> {
        self.peers.get(&mac).and_then(|p| p.sup_seq)
    }

    /// Ages duplicate-discard state; see [`Discard::sweep`].
    pub fn sweep(&mut self, now: Instant) {
        self.discard.sweep(now);
    }

    /// The sequence number the next frame will carry.
    pub fn next_seq_nr(&self) -> u16 {
        self.seq
    }

    pub fn counters(&self) -> PrpCounters {
        let d = self.discard.stats();
        let lan = |i: usize, s: DiscardLanStats| {
            let r = self.rx[i];
            LanCounters {
                received: r.received,
                no_trailer: r.no_trailer,
                accepted: r.accepted,
                duplicates: r.duplicates,
                // Supervision frames count here too: their loss is a LAN's loss all the same.
                unique: s.unique,
                wrong_lan: r.wrong_lan,
                supervision: r.supervision,
                own: r.own,
            }
        };
        let mut peers: Vec<PeerCounters> = self
            .peers
            .iter()
            .map(|(m, p)| PeerCounters {
                mac: fmt_mac(*m),
                kind: p.kind,
                redbox: p.redbox.map(fmt_mac),
                supervision_a: p.frames[0],
                supervision_b: p.frames[1],
            })
            .collect();
        peers.sort_by(|a, b| a.mac.cmp(&b.mac));
        PrpCounters {
            lan_a: lan(0, d.lan_a),
            lan_b: lan(1, d.lan_b),
            sent: self.sent,
            sent_oversize: self.sent_oversize,
            sent_runt: self.sent_runt,
            supervision_sent: self.supervision_sent,
            nodes: d.nodes,
            blocks: d.blocks,
            evicted_nodes: d.evicted_nodes,
            evicted_blocks: d.evicted_blocks,
            peers,
        }
    }
}
