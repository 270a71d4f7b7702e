//! Property tests: simulated senders over two LANs with delay, loss and reordering, checking that
//! duplicate discard passes every frame that arrives exactly once (or, under memory pressure, at
//! least once), and end-to-end tests of [`PrpNode`].

use std::time::{Duration, Instant};

use super::*;

/// xorshift64*: deterministic, good enough to shuffle test traffic.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[derive(Clone, Copy)]
struct LanModel {
    /// Delay range in microseconds.
    delay: (u64, u64),
    loss_pct: u64,
    /// Arrivals are shuffled within windows of this many frames (0: none).
    reorder: usize,
}

const CLEAN: LanModel = LanModel {
    delay: (0, 0),
    loss_pct: 0,
    reorder: 0,
};

struct Scenario {
    sources: usize,
    frames_per_source: usize,
    /// Between frames of one source, microseconds.
    interval_us: u64,
    lans: [LanModel; 2],
    cfg: DiscardConfig,
}

#[derive(Clone, Copy)]
struct Event {
    at_us: u64,
    tie: u64,
    source: usize,
    index: usize,
    lan: Lan,
}

struct Outcome {
    /// Per source, per frame: arrived on A, arrived on B, times accepted.
    frames: Vec<Vec<(bool, bool, u32)>>,
    stats: DiscardStats,
}

fn mac(i: usize) -> [u8; 6] {
    let b = (i as u32).to_be_bytes();
    [0x02, 0x42, b[0], b[1], b[2], b[3]]
}

fn simulate(sc: &Scenario, rng: &mut Rng) -> Outcome {
    let starts: Vec<u16> = (0..sc.sources).map(|_| rng.next() as u16).collect();
    let mut frames = vec![vec![(false, false, 0u32); sc.frames_per_source]; sc.sources];
    let mut events = Vec::new();
    for (s, per) in frames.iter_mut().enumerate() {
        // Sources are staggered within one interval.
        let offset = rng.below(sc.interval_us.max(1));
        for lan in [Lan::A, Lan::B] {
            let m = sc.lans[lan.index()];
            let mut times: Vec<(usize, u64)> = Vec::new();
            for (i, f) in per.iter_mut().enumerate() {
                if rng.percent(m.loss_pct) {
                    continue;
                }
                let sent = offset + i as u64 * sc.interval_us;
                times.push((i, sent + m.delay.0 + rng.below(m.delay.1 - m.delay.0 + 1)));
                match lan {
                    Lan::A => f.0 = true,
                    Lan::B => f.1 = true,
                }
            }
            if m.reorder > 1 {
                // Permute arrival times among the frames of each window.
                for w in times.chunks_mut(m.reorder) {
                    let mut ts: Vec<u64> = w.iter().map(|x| x.1).collect();
                    rng.shuffle(&mut ts);
                    for (x, t) in w.iter_mut().zip(ts) {
                        x.1 = t;
                    }
                }
            }
            for (index, at_us) in times {
                events.push(Event {
                    at_us,
                    tie: rng.next(),
                    source: s,
                    index,
                    lan,
                });
            }
        }
    }
    events.sort_by_key(|e| (e.at_us, e.tie));

    let mut d = Discard::new(sc.cfg.clone());
    let t0 = Instant::now();
    let mut next_sweep = 100_000;
    for e in &events {
        while e.at_us >= next_sweep {
            d.sweep(t0 + Duration::from_micros(next_sweep));
            next_sweep += 100_000;
        }
        let seq = starts[e.source].wrapping_add(e.index as u16);
        if d.accept(
            mac(e.source),
            seq,
            e.lan,
            t0 + Duration::from_micros(e.at_us),
        ) == Verdict::Accept
        {
            frames[e.source][e.index].2 += 1;
        }
    }
    let end = events.last().map_or(0, |e| e.at_us);
    d.sweep(t0 + Duration::from_micros(end) + Duration::from_secs(1));
    Outcome {
        frames,
        stats: d.stats(),
    }
}

/// Every frame that arrived passed exactly once, and the counters say what happened.
fn check_exact(sc: &Scenario, o: &Outcome) {
    let (mut arr, mut only, mut both, mut distinct) = ([0u64; 2], [0u64; 2], 0u64, 0u64);
    for (s, per) in o.frames.iter().enumerate() {
        for (i, &(a, b, n)) in per.iter().enumerate() {
            let expect = u32::from(a || b);
            assert_eq!(
                n, expect,
                "source {s} frame {i} (arrived A {a}, B {b}) accepted {n} times"
            );
            arr[0] += u64::from(a);
            arr[1] += u64::from(b);
            distinct += u64::from(a || b);
            both += u64::from(a && b);
            only[0] += u64::from(a && !b);
            only[1] += u64::from(b && !a);
        }
    }
    let st = &o.stats;
    assert_eq!((st.lan_a.received, st.lan_b.received), (arr[0], arr[1]));
    assert_eq!(st.lan_a.accepted + st.lan_b.accepted, distinct);
    assert_eq!(st.lan_a.duplicates + st.lan_b.duplicates, both);
    assert_eq!((st.lan_a.unique, st.lan_b.unique), (only[0], only[1]));
    assert_eq!(
        (st.evicted_blocks, st.evicted_nodes),
        (0, 0),
        "limits too small for an exact test"
    );
    assert_eq!(st.blocks, 0, "all forgotten after the final sweep");
    assert!(
        sc.frames_per_source < 65536 || distinct > 65536,
        "the run wraps the sequence space"
    );
}

/// Under eviction: nothing that arrived is lost; at worst it passes once per arrival.
fn check_never_dropped(o: &Outcome) -> u64 {
    let mut let_through = 0;
    for (s, per) in o.frames.iter().enumerate() {
        for (i, &(a, b, n)) in per.iter().enumerate() {
            let arrivals = u32::from(a) + u32::from(b);
            assert!(
                n >= u32::from(a || b),
                "source {s} frame {i} arrived but was dropped"
            );
            assert!(
                n <= arrivals,
                "source {s} frame {i} passed more often than it arrived"
            );
            let_through += u64::from(n.saturating_sub(1));
        }
    }
    let_through
}

fn one_source(frames: usize, interval_us: u64, a: LanModel, b: LanModel) -> Scenario {
    Scenario {
        sources: 1,
        frames_per_source: frames,
        interval_us,
        lans: [a, b],
        cfg: DiscardConfig::default(),
    }
}

const MS: u64 = 1000;

#[test]
fn exactly_once_under_delay_loss_and_reordering() {
    // 10 000 frames/s for 7 s: the 16-bit sequence wraps once, blocks of 128 span 12.8 ms, so
    // both copies of a block's frames land within 400 ms of its first one even with a 300 ms lag.
    let n = 70_000;
    let cases: Vec<(&str, LanModel, LanModel)> = vec![
        ("interleaved", CLEAN, CLEAN),
        (
            "B 300 ms late",
            CLEAN,
            LanModel {
                delay: (300 * MS, 300 * MS),
                ..CLEAN
            },
        ),
        (
            "A 300 ms late",
            LanModel {
                delay: (300 * MS, 300 * MS),
                ..CLEAN
            },
            CLEAN,
        ),
        (
            "B jitter 0-300 ms",
            CLEAN,
            LanModel {
                delay: (0, 300 * MS),
                ..CLEAN
            },
        ),
        (
            "B 20% loss, jitter",
            CLEAN,
            LanModel {
                delay: (0, 300 * MS),
                loss_pct: 20,
                reorder: 0,
            },
        ),
        (
            "A 20% loss, B late",
            LanModel {
                loss_pct: 20,
                ..CLEAN
            },
            LanModel {
                delay: (250 * MS, 300 * MS),
                ..CLEAN
            },
        ),
        (
            "reorder windows of 50",
            LanModel {
                delay: (0, 2 * MS),
                loss_pct: 0,
                reorder: 50,
            },
            LanModel {
                delay: (0, 2 * MS),
                loss_pct: 0,
                reorder: 50,
            },
        ),
        (
            "everything",
            LanModel {
                delay: (0, 50 * MS),
                loss_pct: 20,
                reorder: 50,
            },
            LanModel {
                delay: (100 * MS, 300 * MS),
                loss_pct: 20,
                reorder: 50,
            },
        ),
        (
            "A dead",
            LanModel {
                loss_pct: 100,
                ..CLEAN
            },
            LanModel {
                delay: (0, 300 * MS),
                ..CLEAN
            },
        ),
    ];
    for (name, a, b) in cases {
        for seed in 1..=3 {
            let sc = one_source(n, 100, a, b);
            let o = simulate(&sc, &mut Rng::new(seed * 7919));
            eprintln!("{name} seed {seed}: {:?}", o.stats);
            check_exact(&sc, &o);
        }
    }
}

#[test]
fn lagging_lan_is_not_judged_by_a_highest_seen_window() {
    // LAN A runs 1000 frames ahead and lost frames 0..1000; LAN B's late copies of those are the
    // only ones and must all pass, though they are far below anything A delivered.
    let mut d = Discard::default();
    let t = Instant::now();
    let src = mac(1);
    for seq in 1000..2000u16 {
        assert_eq!(d.accept(src, seq, Lan::A, t), Verdict::Accept);
    }
    for seq in 0..2000u16 {
        let want = if seq < 1000 {
            Verdict::Accept
        } else {
            Verdict::Duplicate
        };
        assert_eq!(
            d.accept(src, seq, Lan::B, t + Duration::from_millis(200)),
            want,
            "seq {seq}"
        );
    }
    assert_eq!(d.lan_stats(Lan::B).accepted, 1000);
}

#[test]
fn fast_sender_wraps_and_evicts_without_loss_or_duplicates() {
    // 100 000 frames/s: the sequence wraps every 655 ms and 128 blocks hold only 164 ms of
    // traffic, so blocks are evicted, but long after their copies (at most 5 ms apart) arrived.
    let sc = one_source(
        200_000,
        10,
        LanModel {
            delay: (0, 5 * MS),
            loss_pct: 5,
            reorder: 50,
        },
        LanModel {
            delay: (0, 5 * MS),
            loss_pct: 5,
            reorder: 50,
        },
    );
    let o = simulate(&sc, &mut Rng::new(42));
    assert_eq!(check_never_dropped(&o), 0, "no duplicate let through");
    assert!(o.stats.evicted_blocks > 0);
    for per in &o.frames {
        for &(a, b, n) in per {
            assert_eq!(n, u32::from(a || b));
        }
    }
}

#[test]
fn resent_sequence_number_passes_again_after_the_forget_time() {
    let mut d = Discard::default();
    let t = Instant::now();
    let src = mac(3);
    // 100 000 frames/s: a full wrap takes 655 ms, so the second pass over every number is new.
    let n = 65_536 + 200;
    for i in 0..n {
        let at = t + Duration::from_micros(i * 10);
        assert_eq!(
            d.accept(src, i as u16, Lan::A, at),
            Verdict::Accept,
            "frame {i}"
        );
    }
    let end = t + Duration::from_micros(n * 10);
    // Number 16 was last sent 1.8 ms before `end`: a copy within the forget time is a duplicate,
    // the same number later on is a new frame.
    assert_eq!(
        d.accept(src, 16, Lan::B, end + Duration::from_millis(100)),
        Verdict::Duplicate
    );
    assert_eq!(
        d.accept(src, 16, Lan::B, end + Duration::from_millis(500)),
        Verdict::Accept
    );
}

#[test]
fn slow_sources_with_a_lagging_lan_exactly_once() {
    // 500 and 20 frames/s: a block of 128 numbers spans 256 ms or 6.4 s, longer than or close
    // to the forget time, with one LAN 300 ms behind.
    for (interval_us, frames) in [(2 * MS, 5_000), (50 * MS, 500)] {
        let sc = one_source(
            frames,
            interval_us,
            LanModel {
                delay: (0, 5 * MS),
                loss_pct: 10,
                reorder: 0,
            },
            LanModel {
                delay: (290 * MS, 300 * MS),
                loss_pct: 10,
                reorder: 0,
            },
        );
        let o = simulate(&sc, &mut Rng::new(interval_us));
        check_exact(&sc, &o);
    }
}

#[test]
fn many_sources_exactly_once() {
    let sc = Scenario {
        sources: 1000,
        frames_per_source: 300,
        interval_us: 2 * MS,
        lans: [
            LanModel {
                delay: (0, 10 * MS),
                loss_pct: 10,
                reorder: 20,
            },
            LanModel {
                delay: (0, 300 * MS),
                loss_pct: 10,
                reorder: 0,
            },
        ],
        cfg: DiscardConfig {
            max_nodes: 1000,
            ..Default::default()
        },
    };
    let o = simulate(&sc, &mut Rng::new(5));
    check_exact(&sc, &o);
    assert_eq!(o.stats.nodes, 1000);
}

#[test]
fn memory_caps_only_ever_let_duplicates_through() {
    for (max_nodes, max_blocks) in [(3, 2), (1000, 1), (2, 512), (1, 1)] {
        let sc = Scenario {
            sources: 10,
            frames_per_source: 20_000,
            interval_us: 50,
            lans: [
                LanModel {
                    delay: (0, 50 * MS),
                    loss_pct: 20,
                    reorder: 50,
                },
                LanModel {
                    delay: (0, 300 * MS),
                    loss_pct: 20,
                    reorder: 50,
                },
            ],
            cfg: DiscardConfig {
                max_nodes,
                max_blocks_per_node: max_blocks,
                ..Default::default()
            },
        };
        let o = simulate(
            &sc,
            &mut Rng::new(max_nodes as u64 * 31 + max_blocks as u64),
        );
        let through = check_never_dropped(&o);
        assert!(through > 0, "caps {max_nodes}/{max_blocks} were never hit");
        assert!(o.stats.nodes <= max_nodes);
        assert!(o.stats.evicted_blocks + o.stats.evicted_nodes > 0);
        let st = &o.stats;
        let accepted: u64 = o.frames.iter().flatten().map(|f| u64::from(f.2)).sum();
        assert_eq!(st.lan_a.accepted + st.lan_b.accepted, accepted);
        assert_eq!(st.lan_a.received, st.lan_a.accepted + st.lan_a.duplicates);
        assert_eq!(st.lan_b.received, st.lan_b.accepted + st.lan_b.duplicates);
    }
}

// ---- PrpNode ----

const MAC1: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const MAC2: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

fn node(seq: u16) -> PrpNode {
    PrpNode::with_config(PrpConfig {
        seq_start: Some(seq),
        ..Default::default()
    })
}

fn data_frame(src: [u8; 6], len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![fill; len];
    f[..6].copy_from_slice(&MAC2);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

fn check_invariant(c: &LanCounters) {
    assert_eq!(
        c.received,
        c.no_trailer + c.accepted + c.duplicates + c.supervision + c.own,
        "{c:?}"
    );
}

#[test]
fn on_send_tags_both_copies_with_one_sequence_number() {
    let mut n = node(0xFFFE);
    let f = data_frame(MAC1, 100, 1);
    let mut seqs = Vec::new();
    for _ in 0..3 {
        let (a, b) = n.on_send(&f);
        let (ra, rb) = (parse_trailer(&a).unwrap(), parse_trailer(&b).unwrap());
        assert_eq!((ra.lan, rb.lan), (Lan::A, Lan::B));
        assert_eq!(ra.seq, rb.seq);
        assert_eq!(&a[..100], &f[..]);
        assert_eq!(a[..a.len() - 4], b[..b.len() - 4]);
        seqs.push(ra.seq);
    }
    assert_eq!(seqs, vec![0xFFFE, 0xFFFF, 0]);
    let (a, _) = n.supervision_frames(MAC1);
    assert_eq!(
        parse_trailer(&a).unwrap().seq,
        1,
        "supervision shares the counter"
    );
    assert_eq!(n.next_seq_nr(), 2);
    assert_eq!((n.counters().sent, n.counters().supervision_sent), (3, 1));
}

#[test]
fn two_nodes_deliver_each_frame_once_in_any_order() {
    let mut tx = node(100);
    let mut rx = node(0);
    let t = Instant::now();
    let mut rng = Rng::new(9);
    for i in 0..500usize {
        let len = 14 + (rng.below(1500) as usize);
        let f = data_frame(MAC1, len, i as u8);
        let (a, b) = tx.on_send(&f);
        let (first, second) = if rng.below(2) == 0 {
            ((Lan::A, &a), (Lan::B, &b))
        } else {
            ((Lan::B, &b), (Lan::A, &a))
        };
        let got = rx
            .on_receive(first.0, first.1, t)
            .expect("first copy passes")
            .to_vec();
        assert_eq!(&got[..len], &f[..]);
        assert_eq!(
            got.len(),
            len.max(prp::ETH_ZLEN),
            "padding kept, trailer gone"
        );
        assert_eq!(rx.on_receive(second.0, second.1, t), None);
    }
    let c = rx.counters();
    assert_eq!(c.lan_a.accepted + c.lan_b.accepted, 500);
    assert_eq!(c.lan_a.duplicates + c.lan_b.duplicates, 500);
    check_invariant(&c.lan_a);
    check_invariant(&c.lan_b);
}

#[test]
fn frames_without_a_valid_trailer_pass_untouched() {
    let mut rx = node(0);
    let t = Instant::now();
    let mut f = data_frame(MAC1, 100, 0);
    // Ends in the PRP suffix, but its size field is wrong: not PRP, so both copies pass.
    f[94..].copy_from_slice(&[0, 1, 0xA0, 10, 0x88, 0xFB]);
    for lan in [Lan::A, Lan::B] {
        let out = rx.on_receive(lan, &f, t).unwrap();
        assert!(std::ptr::eq(out, &f[..]), "the very same bytes");
    }
    for len in 0..20 {
        let tiny = vec![0xFBu8; len];
        assert_eq!(rx.on_receive(Lan::A, &tiny, t), Some(&tiny[..]));
    }
    let c = rx.counters();
    assert_eq!(
        (c.lan_a.no_trailer, c.lan_b.no_trailer, c.nodes),
        (21, 1, 0)
    );
    check_invariant(&c.lan_a);
}

#[test]
fn wrong_lan_is_counted_and_still_deduplicated() {
    let mut tx = node(5);
    let mut rx = node(0);
    let t = Instant::now();
    let (a, b) = tx.on_send(&data_frame(MAC1, 80, 3));
    assert!(rx.on_receive(Lan::B, &a, t).is_some());
    assert_eq!(rx.on_receive(Lan::A, &b, t), None);
    let c = rx.counters();
    assert_eq!((c.lan_a.wrong_lan, c.lan_b.wrong_lan), (1, 1));
}

#[test]
fn supervision_frames_are_consumed_and_peers_recorded() {
    let mut tx = node(0);
    let mut rx = node(0);
    let t = Instant::now();
    let (a, b) = tx.supervision_frames(MAC1);
    assert_eq!(rx.on_receive(Lan::A, &a, t), None);
    assert_eq!(
        rx.on_receive(Lan::B, &b, t + Duration::from_millis(1)),
        None
    );
    let (a2, _) = tx.supervision_frames(MAC1);
    assert_eq!(
        rx.on_receive(Lan::A, &a2, t + Duration::from_millis(2)),
        None
    );
    let c = rx.counters();
    assert_eq!((c.lan_a.supervision, c.lan_b.supervision), (2, 1));
    assert_eq!(
        c.peers,
        vec![PeerCounters {
            mac: "02:00:00:00:00:01".into(),
            kind: NodeKind::DuplicateDiscard,
            redbox: None,
            supervision_a: 2,
            supervision_b: 1,
        }]
    );
    let last = rx.peer_last_heard(MAC1).unwrap();
    assert_eq!(
        last,
        [
            Some(t + Duration::from_millis(2)),
            Some(t + Duration::from_millis(1))
        ]
    );
    assert_eq!(rx.peer_sup_seq(MAC1), Some(1));
    // Its data frames still pass: the supervision frames used their own sequence numbers.
    let (d, _) = tx.on_send(&data_frame(MAC1, 60, 0));
    assert!(rx.on_receive(Lan::A, &d, t).is_some());
    // A supervision frame without a trailer is consumed too.
    assert_eq!(rx.on_receive(Lan::B, prp::strip(&a).unwrap(), t), None);
    check_invariant(&rx.counters().lan_a);
    check_invariant(&rx.counters().lan_b);
}

#[test]
fn peer_table_is_bounded() {
    let mut rx = PrpNode::with_config(PrpConfig {
        max_peers: 4,
        seq_start: Some(0),
        ..Default::default()
    });
    let t = Instant::now();
    for i in 0..10u8 {
        let m = [0x02, 0, 0, 0, 1, i];
        let f = build_supervision(m, 0, 0, Lan::A);
        rx.on_receive(Lan::A, &f, t + Duration::from_millis(u64::from(i)));
    }
    let peers = rx.counters().peers;
    assert_eq!(peers.len(), 4);
    assert_eq!(
        peers[0].mac, "02:00:00:00:01:06",
        "the most recently heard stay"
    );
}

#[test]
fn own_frames_coming_back_are_discarded() {
    let mut n = node(0);
    n.set_local_mac(Some(MAC1));
    let t = Instant::now();
    let (a, b) = n.on_send(&data_frame(MAC1, 64, 0));
    assert_eq!(n.on_receive(Lan::A, &a, t), None);
    assert_eq!(n.on_receive(Lan::B, &b, t), None);
    let (sa, _) = n.supervision_frames(MAC1);
    assert_eq!(n.on_receive(Lan::A, &sa, t), None);
    let c = n.counters();
    assert_eq!((c.lan_a.own, c.lan_b.own, c.nodes), (2, 1, 0));
    assert!(c.peers.is_empty());
}

#[test]
fn frames_that_cannot_take_a_trailer_still_go_out() {
    let mut n = PrpNode::with_config(PrpConfig {
        max_frame: 1518,
        seq_start: Some(9),
        ..Default::default()
    });
    let big = data_frame(MAC1, 1514, 0);
    assert_eq!(
        n.try_on_send(&big),
        Err(PrpError::TooLarge {
            len: 1520,
            max: 1518
        })
    );
    let (a, b) = n.on_send(&big);
    assert_eq!((a.as_slice(), b.as_slice()), (&big[..], &big[..]));
    let jumbo = data_frame(MAC1, 9000, 0);
    let (a, _) = n.on_send(&jumbo);
    assert_eq!(a, jumbo);
    for len in 0..14 {
        let (a, b) = n.on_send(&vec![1u8; len]);
        assert_eq!((a.len(), b.len()), (len, len));
    }
    let c = n.counters();
    assert_eq!((c.sent, c.sent_oversize, c.sent_runt), (16, 2, 14));
    assert_eq!(n.next_seq_nr(), 9, "no sequence number spent");
    let (a, _) = n.on_send(&data_frame(MAC1, 1512, 0));
    assert_eq!(a.len(), 1518);
}

#[test]
fn random_input_never_panics_and_counts_add_up() {
    let mut rx = node(0);
    let mut tx = node(0);
    let t = Instant::now();
    let mut rng = Rng::new(77);
    for i in 0..20_000u64 {
        let len = rng.below(200) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        match rng.below(4) {
            0 if len >= 14 => f = tx.on_send(&f).0,
            1 if len >= 6 => f[len - 2..].copy_from_slice(&[0x88, 0xFB]),
            2 if len >= 14 => f[..5].copy_from_slice(&prp::SUPERVISION_DEST[..5]),
            _ => {}
        }
        let lan = if rng.below(2) == 0 { Lan::A } else { Lan::B };
        let _ = rx.on_receive(lan, &f, t + Duration::from_micros(i * 100));
        if i % 1000 == 0 {
            rx.sweep(t + Duration::from_micros(i * 100));
        }
    }
    let c = rx.counters();
    check_invariant(&c.lan_a);
    check_invariant(&c.lan_b);
    let json = serde_json::to_value(&c).unwrap();
    assert!(json["lan_a"]["received"].as_u64().unwrap() > 0);
    assert!(json["peers"].is_array());
}
