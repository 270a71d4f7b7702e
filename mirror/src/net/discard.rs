//! PRP duplicate discard that never discards a legitimate frame.
//!
//! Every sequence number seen from a source is remembered, in a sparse bitmap: the 16-bit
//! sequence space is cut into 512 blocks of 128 numbers, and a block exists only while frames in
//! its range are arriving. A block is forgotten once no new number has entered it for the entry
//! forget time (400 ms, IEC 62439-3 EntryForgetTime), after which its numbers count as unseen
//! again. A frame is discarded only when its own number is marked in a live block, so
//! loss, delay or reordering on one LAN cannot make the other LAN's frames look like duplicates —
//! the failure of the "highest sequence number seen" window that Linux used before it moved to the
//! same block scheme.
//!
//! Linux stamps a block once, when it is created. Here each first copy moves the stamp forward.
//! With a creation stamp, a source slow enough that its 128 numbers span a good part of the
//! forget time loses its late frames' duplicates to the block's expiry (a copy arriving 300 ms
//! after the first finds the block gone): duplicates leak. Moving the stamp costs nothing in
//! safety: a number is still forgotten at most the forget time after the last new number of its
//! 128, and a monotonic source only comes back to a range after the other 65 408 numbers.
//!
//! Memory is bounded: at most `max_nodes` sources and `max_blocks_per_node` blocks each, the
//! oldest evicted first. Eviction only forgets, and forgetting can only turn a would-be duplicate
//! into an accepted frame, never the reverse: at worst a duplicate reaches the host, which upper
//! layers tolerate, where a wrongly discarded frame would be a loss.
//!
//! The one way to discard a legitimate frame is a source reusing a sequence number while it is
//! remembered: wrapping its 16-bit counter within about 400 ms (some 164 000 frames/s from one
//! source), or restarting into the range it used in the last 400 ms. That is the protocol's own
//! assumption, not this implementation's.
//!
//! Each block keeps one bitmap per LAN, so a block that is forgotten tells how many of its frames
//! came over one LAN only (IEC 62439-3 lreCntUnique): the other LAN lost them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::prp::Lan;

/// IEC 62439-3 EntryForgetTime.
pub const ENTRY_FORGET_TIME: Duration = Duration::from_millis(400);
/// IEC 62439-3 NodeForgetTime: a source silent this long is dropped from the table.
pub const NODE_FORGET_TIME: Duration = Duration::from_secs(60);

const BLOCK_SHIFT: u32 = 7;
const BLOCK_MASK: u16 = (1 << BLOCK_SHIFT) - 1;
/// Blocks covering the whole 16-bit sequence space.
const BLOCKS: usize = 1 << (16 - BLOCK_SHIFT);

/// Limits of a [`Discard`].
#[derive(Debug, Clone)]
pub struct DiscardConfig {
    /// How long a block of sequence numbers is remembered after the last new number in it.
    pub forget_time: Duration,
    /// How long a source with nothing remembered stays in the table.
    pub node_forget_time: Duration,
    /// Sources tracked at once (at least 1).
    pub max_nodes: usize,
    /// Blocks of 128 sequence numbers kept per source (1 to 512). The default 128 covers 16384
    /// frames: a source at that many frames per forget time, or a LAN lagging by that many frames,
    /// starts evicting, which lets duplicates through but loses nothing.
    pub max_blocks_per_node: usize,
}

impl Default for DiscardConfig {
    fn default() -> Self {
        DiscardConfig {
            forget_time: ENTRY_FORGET_TIME,
            node_forget_time: NODE_FORGET_TIME,
            max_nodes: 512,
            max_blocks_per_node: 128,
        }
    }
}

/// What to do with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The first copy: pass it up.
    Accept,
    /// A copy of a frame already passed up.
    Duplicate,
}

/// Duplicate-discard counters of one LAN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiscardLanStats {
    /// Frames checked.
    pub received: u64,
    /// First copies, passed up.
    pub accepted: u64,
    /// Copies of frames already passed up, discarded.
    pub duplicates: u64,
    /// Frames that came over this LAN only, within the forget time: the other LAN lost them.
    /// Counted when their block is forgotten.
    pub unique: u64,
}

/// Counters and table size of a [`Discard`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DiscardStats {
    pub lan_a: DiscardLanStats,
    pub lan_b: DiscardLanStats,
    /// Sources in the table.
    pub nodes: usize,
    /// Live blocks over all sources.
    pub blocks: usize,
    /// Sources pushed out by `max_nodes`.
    pub evicted_nodes: u64,
    /// Blocks pushed out, before their forget time, by `max_blocks_per_node` or a node eviction.
    pub evicted_blocks: u64,
}

struct Block {
    /// When a number last entered the block.
    stamp: Instant,
    idx: u16,
    /// Sequence numbers delivered, per LAN.
    seen: [u128; 2],
    live: bool,
}

struct Node {
    /// Block index -> ring slot + 1, 0 for none: a direct table is 1 KiB and needs no hashing.
    table: Box<[u16; BLOCKS]>,
    /// Blocks in creation order from `next`, so the slot at `next` is always the oldest created.
    ring: Vec<Block>,
    next: usize,
    live: usize,
    last_seen: Instant,
}

/// Where retired blocks are counted.
struct Tally<'a> {
    lan: &'a mut [DiscardLanStats; 2],
    evicted_blocks: &'a mut u64,
}

impl Tally<'_> {
    fn retire(&mut self, b: &Block, expired: bool) {
        if expired {
            let [a, bb] = b.seen;
            self.lan[0].unique += u64::from((a & !bb).count_ones());
            self.lan[1].unique += u64::from((bb & !a).count_ones());
        } else {
            // Its copies may still be on their way: which LAN lost what is unknown.
            *self.evicted_blocks += 1;
        }
    }
}

fn expired(stamp: Instant, now: Instant, forget: Duration) -> bool {
    now.saturating_duration_since(stamp) > forget
}

impl Node {
    fn new(now: Instant) -> Node {
        Node {
            table: Box::new([0; BLOCKS]),
            ring: Vec::new(),
            next: 0,
            live: 0,
            last_seen: now,
        }
    }

    fn retire_slot(&mut self, slot: usize, expired: bool, tally: &mut Tally) {
        let Some(b) = self.ring.get_mut(slot) else {
            return;
        };
        if !b.live {
            return;
        }
        b.live = false;
        self.live -= 1;
        if let Some(t) = self.table.get_mut(usize::from(b.idx)) {
            if usize::from(*t) == slot + 1 {
                *t = 0;
            }
        }
        tally.retire(b, expired);
    }

    /// The live block for `idx`, created if there is none or it is too old.
    fn slot_for(
        &mut self,
        idx: u16,
        now: Instant,
        cfg: &DiscardConfig,
        tally: &mut Tally,
    ) -> usize {
        let cur = usize::from(self.table[usize::from(idx)]);
        if cur != 0 {
            let slot = cur - 1;
            if !expired(self.ring[slot].stamp, now, cfg.forget_time) {
                return slot;
            }
            self.retire_slot(slot, true, tally);
        }
        let fresh = Block {
            stamp: now,
            idx,
            seen: [0; 2],
            live: true,
        };
        let slot = if self.ring.len() < cfg.max_blocks_per_node {
            self.ring.push(fresh);
            self.ring.len() - 1
        } else {
            let slot = self.next;
            let old = expired(self.ring[slot].stamp, now, cfg.forget_time);
            self.retire_slot(slot, old, tally);
            self.ring[slot] = fresh;
            slot
        };
        self.next = (slot + 1) % cfg.max_blocks_per_node;
        self.table[usize::from(idx)] = (slot + 1) as u16;
        self.live += 1;
        slot
    }

    fn retire_all(&mut self, now: Instant, forget: Duration, tally: &mut Tally) {
        for slot in 0..self.ring.len() {
            let old = expired(self.ring[slot].stamp, now, forget);
            self.retire_slot(slot, old, tally);
        }
    }
}

/// Duplicate discard for all sources of one receiver.
pub struct Discard {
    cfg: DiscardConfig,
    nodes: HashMap<[u8; 6], Node>,
    lan: [DiscardLanStats; 2],
    evicted_nodes: u64,
    evicted_blocks: u64,
}

impl Default for Discard {
    fn default() -> Self {
        Discard::new(DiscardConfig::default())
    }
}

impl Discard {
    /// Limits out of range are brought into it.
    pub fn new(mut cfg: DiscardConfig) -> Discard {
        cfg.max_nodes = cfg.max_nodes.max(1);
        cfg.max_blocks_per_node = cfg.max_blocks_per_node.clamp(1, BLOCKS);
        Discard {
            cfg,
            nodes: HashMap::new(),
            lan: Default::default(),
            evicted_nodes: 0,
            evicted_blocks: 0,
        }
    }

    pub fn config(&self) -> &DiscardConfig {
        &self.cfg
    }

    /// Judges the frame `seq` from `src` that arrived on `lan` at `now`.
    pub fn accept(&mut self, src: [u8; 6], seq: u16, lan: Lan, now: Instant) -> Verdict {
        let li = lan.index();
        self.lan[li].received += 1;
        if !self.nodes.contains_key(&src) {
            self.make_room(now);
            self.nodes.insert(src, Node::new(now));
        }
        let mut tally = Tally {
            lan: &mut self.lan,
            evicted_blocks: &mut self.evicted_blocks,
        };
        let Some(node) = self.nodes.get_mut(&src) else {
            // Cannot happen; if it did, passing the frame up is the safe side.
            tally.lan[li].accepted += 1;
            return Verdict::Accept;
        };
        if now > node.last_seen {
            node.last_seen = now;
        }
        let slot = node.slot_for(seq >> BLOCK_SHIFT, now, &self.cfg, &mut tally);
        let bit = 1u128 << (seq & BLOCK_MASK);
        let block = &mut node.ring[slot];
        let seen = (block.seen[0] | block.seen[1]) & bit != 0;
        block.seen[li] |= bit;
        if !seen && now > block.stamp {
            // Only first copies move it: a stream of duplicates must not keep old numbers alive.
            block.stamp = now;
        }
        if seen {
            tally.lan[li].duplicates += 1;
            Verdict::Duplicate
        } else {
            tally.lan[li].accepted += 1;
            Verdict::Accept
        }
    }

    /// Pushes out the least recently heard source if the table is full.
    fn make_room(&mut self, now: Instant) {
        if self.nodes.len() < self.cfg.max_nodes {
            return;
        }
        let Some(oldest) = self
            .nodes
            .iter()
            .min_by_key(|(_, n)| n.last_seen)
            .map(|(k, _)| *k)
        else {
            return;
        };
        if let Some(mut node) = self.nodes.remove(&oldest) {
            let mut tally = Tally {
                lan: &mut self.lan,
                evicted_blocks: &mut self.evicted_blocks,
            };
            node.retire_all(now, self.cfg.forget_time, &mut tally);
            self.evicted_nodes += 1;
        }
    }

    /// Forgets blocks past the forget time (counting frames only one LAN delivered) and sources
    /// silent past the node forget time. Call it every few hundred milliseconds to a few seconds:
    /// discard is right without it, but the `unique` counts and the memory of idle sources wait
    /// for it.
    pub fn sweep(&mut self, now: Instant) {
        let cfg = &self.cfg;
        let mut tally = Tally {
            lan: &mut self.lan,
            evicted_blocks: &mut self.evicted_blocks,
        };
        self.nodes.retain(|_, node| {
            for slot in 0..node.ring.len() {
                if node.ring[slot].live && expired(node.ring[slot].stamp, now, cfg.forget_time) {
                    node.retire_slot(slot, true, &mut tally);
                }
            }
            if node.live == 0 {
                // Nothing remembered: the ring's memory can go now, the node after its silence.
                node.ring = Vec::new();
                node.next = 0;
            }
            node.live > 0 || now.saturating_duration_since(node.last_seen) <= cfg.node_forget_time
        });
    }

    /// Counters for `lan`.
    pub fn lan_stats(&self, lan: Lan) -> DiscardLanStats {
        self.lan[lan.index()]
    }

    pub fn stats(&self) -> DiscardStats {
        DiscardStats {
            lan_a: self.lan[0],
            lan_b: self.lan[1],
            nodes: self.nodes.len(),
            blocks: self.nodes.values().map(|n| n.live).sum(),
            evicted_nodes: self.evicted_nodes,
            evicted_blocks: self.evicted_blocks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: [u8; 6] = [2, 0, 0, 0, 0, 1];

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn first_copy_accepted_second_discarded() {
        let mut d = Discard::default();
        let t = Instant::now();
        assert_eq!(d.accept(S, 5, Lan::A, t), Verdict::Accept);
        assert_eq!(d.accept(S, 5, Lan::B, t), Verdict::Duplicate);
        assert_eq!(d.accept(S, 6, Lan::B, t), Verdict::Accept);
        assert_eq!(d.accept(S, 6, Lan::A, t), Verdict::Duplicate);
        // A third copy (a loop on one LAN) is a duplicate too.
        assert_eq!(d.accept(S, 6, Lan::A, t), Verdict::Duplicate);
        // Another source's 5 is its own frame.
        assert_eq!(d.accept([2, 0, 0, 0, 0, 2], 5, Lan::A, t), Verdict::Accept);
        let s = d.stats();
        assert_eq!(
            s.lan_a,
            DiscardLanStats {
                received: 4,
                accepted: 2,
                duplicates: 2,
                unique: 0
            }
        );
        assert_eq!(
            s.lan_b,
            DiscardLanStats {
                received: 2,
                accepted: 1,
                duplicates: 1,
                unique: 0
            }
        );
        assert_eq!((s.nodes, s.blocks), (2, 2));
    }

    #[test]
    fn one_lan_only_is_accepted_and_counted_unique() {
        let mut d = Discard::default();
        let t = Instant::now();
        for seq in 0..10u16 {
            assert_eq!(d.accept(S, seq, Lan::A, t), Verdict::Accept);
            if seq % 2 == 0 {
                assert_eq!(d.accept(S, seq, Lan::B, t), Verdict::Duplicate);
            }
        }
        d.sweep(t + ms(399));
        assert_eq!(d.lan_stats(Lan::A).unique, 0, "not forgotten yet");
        d.sweep(t + ms(401));
        assert_eq!(d.lan_stats(Lan::A).unique, 5);
        assert_eq!(d.lan_stats(Lan::B).unique, 0);
        assert_eq!(d.stats().blocks, 0);
    }

    #[test]
    fn forgotten_after_the_forget_time() {
        let mut d = Discard::default();
        let t = Instant::now();
        assert_eq!(d.accept(S, 100, Lan::A, t), Verdict::Accept);
        assert_eq!(d.accept(S, 100, Lan::A, t + ms(400)), Verdict::Duplicate);
        assert_eq!(d.accept(S, 100, Lan::B, t + ms(401)), Verdict::Accept);
        // The forgotten block's frame came on A only; the new block's 100 came on B.
        assert_eq!(d.lan_stats(Lan::A).unique, 1);
        // A clock that goes backwards changes nothing.
        assert_eq!(d.accept(S, 100, Lan::A, t), Verdict::Duplicate);
    }

    #[test]
    fn first_copies_keep_a_block_alive_duplicates_do_not() {
        let mut d = Discard::default();
        let t = Instant::now();
        // A slow source: 0 at t, 1 at t+300 ms; the copy of 1 comes 300 ms later still. With a
        // stamp set only at creation the block would be gone by then and the copy let through.
        assert_eq!(d.accept(S, 0, Lan::A, t), Verdict::Accept);
        assert_eq!(d.accept(S, 1, Lan::A, t + ms(300)), Verdict::Accept);
        assert_eq!(d.accept(S, 0, Lan::B, t + ms(350)), Verdict::Duplicate);
        assert_eq!(d.accept(S, 1, Lan::B, t + ms(600)), Verdict::Duplicate);
        // Duplicates alone do not extend it: 400 ms after the last new number it is forgotten.
        assert_eq!(d.accept(S, 1, Lan::B, t + ms(699)), Verdict::Duplicate);
        assert_eq!(d.accept(S, 0, Lan::A, t + ms(701)), Verdict::Accept);
    }

    #[test]
    fn wraparound_is_just_another_block() {
        let mut d = Discard::default();
        let t = Instant::now();
        let seqs: Vec<u16> = (0xFFF0..=0xFFFF).chain(0..16).collect();
        for &s in &seqs {
            assert_eq!(d.accept(S, s, Lan::A, t), Verdict::Accept);
        }
        for &s in seqs.iter().rev() {
            assert_eq!(d.accept(S, s, Lan::B, t + ms(300)), Verdict::Duplicate);
        }
        assert_eq!(d.stats().blocks, 2);
    }

    #[test]
    fn block_cap_evicts_oldest_and_only_lets_duplicates_through() {
        let mut d = Discard::new(DiscardConfig {
            max_blocks_per_node: 2,
            ..Default::default()
        });
        let t = Instant::now();
        assert_eq!(d.accept(S, 0, Lan::A, t), Verdict::Accept);
        assert_eq!(d.accept(S, 128, Lan::A, t), Verdict::Accept);
        assert_eq!(d.accept(S, 256, Lan::A, t), Verdict::Accept); // evicts block 0
        assert_eq!(d.stats().evicted_blocks, 1);
        assert_eq!(
            d.accept(S, 0, Lan::B, t),
            Verdict::Accept,
            "duplicate let through"
        );
        assert_eq!(d.accept(S, 256, Lan::B, t), Verdict::Duplicate);
        assert_eq!(d.stats().blocks, 2);
    }

    #[test]
    fn node_cap_evicts_least_recently_heard() {
        let mut d = Discard::new(DiscardConfig {
            max_nodes: 2,
            ..Default::default()
        });
        let t = Instant::now();
        let n = |i: u8| [2, 0, 0, 0, 0, i];
        assert_eq!(d.accept(n(1), 1, Lan::A, t), Verdict::Accept);
        assert_eq!(d.accept(n(2), 1, Lan::A, t + ms(1)), Verdict::Accept);
        assert_eq!(d.accept(n(1), 2, Lan::A, t + ms(2)), Verdict::Accept);
        assert_eq!(d.accept(n(3), 1, Lan::A, t + ms(3)), Verdict::Accept); // evicts 2
        let s = d.stats();
        assert_eq!((s.nodes, s.evicted_nodes, s.evicted_blocks), (2, 1, 1));
        assert_eq!(d.accept(n(1), 1, Lan::B, t + ms(4)), Verdict::Duplicate);
        assert_eq!(
            d.accept(n(2), 1, Lan::B, t + ms(4)),
            Verdict::Accept,
            "duplicate let through"
        );
    }

    #[test]
    fn sweep_drops_silent_nodes() {
        let mut d = Discard::default();
        let t = Instant::now();
        d.accept(S, 1, Lan::A, t);
        d.sweep(t + ms(500));
        assert_eq!((d.stats().nodes, d.stats().blocks), (1, 0));
        d.sweep(t + NODE_FORGET_TIME + ms(1));
        assert_eq!(d.stats().nodes, 0);
    }

    #[test]
    fn limits_are_clamped() {
        let d = Discard::new(DiscardConfig {
            max_nodes: 0,
            max_blocks_per_node: 100_000,
            ..Default::default()
        });
        assert_eq!(
            (d.config().max_nodes, d.config().max_blocks_per_node),
            (1, 512)
        );
        let mut d = Discard::new(DiscardConfig {
            max_blocks_per_node: 0,
            ..Default::default()
        });
        let t = Instant::now();
        for seq in 0..=u16::MAX {
            assert_eq!(d.accept(S, seq, Lan::A, t), Verdict::Accept);
        }
    }
}
