//! active-backup's ARP probes against a real kernel, without a VM: the engine's two paths are
//! AF_PACKET sockets on veths whose peers sit on a bridge in a server namespace; the bridge's
//! address is the probe target. The test plays the frontend's receiver itself, so it decides
//! when the paths are read.

mod common;
use common::{sh, sh_ok};

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mirror::{NetConfig, NetMirror, NetMode, NetStatus, POLL_BUDGET};
use transport::net::{NetPath, PathSpec};

const TARGET: &str = "10.77.0.1";

/// Two veths from this namespace to bridge `fab` in namespace `{tag}s`, removed on drop.
struct Server {
    tag: String,
}

impl Server {
    fn build(name: &str) -> Server {
        let t = format!("{name}{}", std::process::id() % 10_000);
        let s = Server { tag: t.clone() };
        sh_ok(&format!(
            "ip netns del {t}s; ip link del {t}a; ip link del {t}b"
        ));
        sh(&format!(
            "ip netns add {t}s && ip -n {t}s link add fab type bridge && \
             ip -n {t}s link set fab up && ip -n {t}s addr add {TARGET}/24 dev fab"
        ));
        for p in ["a", "b"] {
            // No address and no IPv6 on this side: the only frames are the probes and answers.
            sh(&format!(
                "ip link add {t}{p} type veth peer name {t}{p}p netns {t}s && \
                 sysctl -qw net.ipv6.conf.{t}{p}.disable_ipv6=1 && ip link set {t}{p} up && \
                 ip -n {t}s link set {t}{p}p master fab up"
            ));
        }
        s
    }

    fn spec(&self, p: &str) -> PathSpec {
        format!("packet:{}{p}", self.tag).parse().unwrap()
    }

    /// Stops the bridge forwarding on path `p`'s port: the path keeps its carrier, and only
    /// the probes can tell that nothing comes back.
    fn silence(&self, p: &str) {
        self.port_state(p, 0);
    }

    /// Undoes [`Server::silence`].
    fn speak(&self, p: &str) {
        self.port_state(p, 3);
    }

    /// Sends a frame of `len` bytes (an unknown EtherType, broadcast) to path `p` every 200 µs
    /// from its peer port, past the bridge, until dropped: a segment that never goes quiet.
    /// The frames carry no probe answer.
    fn flood(&self, p: &str, len: usize) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, port) = (
            format!("/run/netns/{}s", self.tag),
            format!("{}{p}p", self.tag),
        );
        let halt = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).unwrap();
            // SAFETY: setns(2) moves only this thread, which exits when the flood ends, into
            // the network namespace of a descriptor it holds open.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let out = NetPath::open(&format!("packet:{port}").parse().unwrap()).unwrap();
            let mut frame = vec![0u8; len];
            frame[..6].fill(0xff);
            frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
            frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
            let mut sent = 0u64;
            while !halt.load(Ordering::Relaxed) {
                if out.send(&frame).is_ok() {
                    sent += 1;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            sent
        });
        Flood {
            stop,
            thread: Some(thread),
        }
    }

    /// Sets the MTU of path `p`'s veth, both ends.
    fn mtu(&self, p: &str, mtu: u32) {
        let t = &self.tag;
        sh(&format!(
            "ip link set {t}{p} mtu {mtu} && ip -n {t}s link set {t}{p}p mtu {mtu}"
        ));
    }

    fn port_state(&self, p: &str, state: u8) {
        let t = &self.tag;
        sh(&format!(
            "ip netns exec {t}s bridge link set dev {t}{p}p state {state}"
        ));
    }
}

/// A running [`Server::flood`].
struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Flood {
    /// Stops the flood; says how many frames it sent.
    fn end(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let t = &self.tag;
        sh_ok(&format!(
            "ip netns del {t}s; ip link del {t}a; ip link del {t}b"
        ));
    }
}

fn open(server: &Server) -> NetMirror {
    let cfg = NetConfig {
        mode: NetMode::ActiveBackup,
        probe: Some(TARGET.parse().unwrap()),
        ..NetConfig::default()
    };
    NetMirror::open(&[server.spec("a"), server.spec("b")], cfg).unwrap()
}

fn states(st: &NetStatus) -> Vec<(&'static str, bool, u64)> {
    st.paths
        .iter()
        .map(|p| (p.state, p.active, p.probe_answers))
        .collect()
}

/// Reads both paths as a frontend's worker would, for `d`.
fn receive_for(m: &NetMirror, d: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        read_empty(m, 0);
        read_empty(m, 1);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads path `p` until it is empty, a turn at a time, as a level-triggered worker does.
fn read_empty(m: &NetMirror, p: usize) {
    while m.poll(p, &mut |_| {}) {}
}

/// Reads path B alone for 400 ms (several monitor ticks), as a receiver that caught up on it
/// before A; then traffic must still be on A.
fn read_b_alone(m: &NetMirror) -> NetStatus {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(400) {
        read_empty(m, 1);
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = m.status();
    assert_eq!(
        (st.failovers, st.paths[0].active),
        (0, true),
        "traffic moved to the path that happened to be read first: {:?}",
        states(&st)
    );
    st
}

/// Asserts that both paths are up and have answers.
fn assert_both_answer(m: &NetMirror) -> NetStatus {
    let st = m.status();
    assert!(
        st.paths
            .iter()
            .all(|p| p.state == "up" && p.probe_answers > 0),
        "{:?}",
        states(&st)
    );
    st
}

/// Reads both paths every 20 ms, a receiver that keeps up, until traffic leaves path A for
/// its silence, within `limit`; how long that took.
fn wait_for_failover(m: &NetMirror, limit: Duration, what: &str) -> Duration {
    let t0 = Instant::now();
    while m.status().failovers == 0 {
        assert!(
            t0.elapsed() < limit,
            "silence on path A not seen{what}: {:?}",
            states(&m.status())
        );
        read_empty(m, 0);
        read_empty(m, 1);
        std::thread::sleep(Duration::from_millis(20));
    }
    let judged = t0.elapsed();
    let st = m.status();
    assert_eq!(
        (st.paths[0].state, st.paths[0].active, st.paths[1].active),
        ("no-answer", false, true),
        "{:?}",
        states(&st)
    );
    eprintln!(
        "silence on A judged after {judged:?}{what}: {:?}",
        states(&st)
    );
    judged
}

/// Answers that wait unread are no silence: while nobody reads the paths (no frontend yet, or
/// its worker starved of CPU) neither is judged, and reading one before the other moves no
/// traffic. Real silence is still seen once everything received has been read.
#[test]
fn unread_answers_are_no_silence() {
    let server = Server::build("pr");
    let m = open(&server);
    // Three windows (100 ms probes, 3 misses, one interval's grace) with nobody reading.
    std::thread::sleep(Duration::from_millis(1200));
    let st = m.status();
    assert_eq!(st.failovers, 0, "{:?}", states(&st));
    assert!(
        st.paths
            .iter()
            .all(|p| p.state == "up" && p.probe_answers == 0),
        "paths judged while their answers waited unread: {:?}",
        states(&st)
    );
    // Path B's receiver catches up first; A's answers still wait.
    let st = read_b_alone(&m);
    assert!(st.paths[1].probe_answers > 0, "{:?}", states(&st));
    receive_for(&m, Duration::from_millis(300));
    assert_both_answer(&m);

    // A real cut beyond the first hop, with the receiver keeping up: A is judged within a few
    // windows and traffic moves to B.
    server.silence("a");
    wait_for_failover(&m, Duration::from_secs(5), "");
}

/// Both paths judged silent (the server was not there yet), then the server answers while
/// nobody reads: the receiver that catches up first must not take the traffic with it, since
/// the other path's answers only wait unread.
#[test]
fn a_path_read_first_takes_no_traffic_from_one_read_later() {
    let server = Server::build("pl");
    server.silence("a");
    server.silence("b");
    let m = open(&server);
    receive_for(&m, Duration::from_millis(800));
    let st = m.status();
    assert!(
        st.paths.iter().all(|p| p.state == "no-answer"),
        "{:?}",
        states(&st)
    );
    server.speak("a");
    server.speak("b");
    // Answers queue on both paths with nobody reading; then only B's receiver catches up.
    std::thread::sleep(Duration::from_millis(500));
    let st = read_b_alone(&m);
    assert_eq!(st.paths[1].state, "up", "{:?}", states(&st));
    receive_for(&m, Duration::from_millis(300));
    let st = m.status();
    assert_eq!(
        (st.failovers, states(&st)[0].0, states(&st)[1].0),
        (0, "up", "up"),
        "{:?}",
        states(&st)
    );
}

/// A busy segment never goes quiet: frames keep arriving on path A while its probes go
/// unanswered. The path is judged as of the last time its receiver read it empty, so the
/// silence is seen while the receiver keeps up, though frames nearly always wait.
#[test]
fn a_silent_path_is_judged_while_other_frames_keep_coming() {
    let server = Server::build("pb");
    let m = open(&server);
    receive_for(&m, Duration::from_millis(600));
    let st = assert_both_answer(&m);
    let before = st.paths[0].received;
    let flood = server.flood("a", 60);
    server.silence("a");
    // About 470 ms here; the check that waited for an empty queue took seconds or never came.
    wait_for_failover(&m, Duration::from_secs(3), " under a flood");
    let sent = flood.end();
    let received = m.status().paths[0].received - before;
    eprintln!("flood: {sent} frames sent, {received} received on A");
    assert!(
        received > 200,
        "the flood did not reach path A: {received} frames"
    );
}

/// A flooded path is read in turns: one `poll` takes at most `POLL_BUDGET` frames and says
/// more may wait, so a frontend's worker gets back to the guest's transmissions and the other
/// path between turns; the frames left are read in the next turns.
#[test]
fn a_flooded_path_is_read_in_turns() {
    let server = Server::build("pf");
    let m = open(&server);
    receive_for(&m, Duration::from_millis(300));
    // Frames pile up on path A with nobody reading.
    let flood = server.flood("a", 60);
    std::thread::sleep(Duration::from_millis(300));
    let sent = flood.end();
    let before = m.status().paths[0].received;
    let more = m.poll(0, &mut |_| {});
    let first = m.status().paths[0].received - before;
    assert!(more, "one turn read path A empty: {first} of {sent} frames");
    assert_eq!(first, POLL_BUDGET as u64, "frames read in one turn");
    let mut turns = 1;
    while m.poll(0, &mut |_| {}) {
        turns += 1;
        assert!(turns < 1000, "path A never read empty");
    }
    let total = m.status().paths[0].received - before;
    eprintln!("{sent} frames flooded, {total} read in {} turns", turns + 1);
    assert!(total > POLL_BUDGET as u64, "{total} frames read");
    assert!(!m.poll(0, &mut |_| {}), "path A is empty");
}

/// A frame too large for the receive buffer is already off the queue when that is known: it
/// is counted and reading goes on, so a stream of them cannot keep a path from being read
/// empty (and judged).
#[test]
fn frames_too_large_to_read_are_counted_and_reading_goes_on() {
    let server = Server::build("po");
    server.mtu("a", 16000);
    let m = open(&server);
    receive_for(&m, Duration::from_millis(300));
    let before = m.status().paths[0].oversize;
    // 12000-byte frames: past the largest frame a path moves, within the veth's MTU.
    let flood = server.flood("a", 12000);
    std::thread::sleep(Duration::from_millis(100));
    let sent = flood.end();
    let more = m.poll(0, &mut |_| {});
    let over = m.status().paths[0].oversize - before;
    eprintln!("{sent} oversize frames sent, {over} counted in one turn");
    assert!(
        over >= 2,
        "{over} of {sent} oversize frames counted in one turn"
    );
    assert!(
        !more,
        "one turn did not read path A empty ({over} oversize frames)"
    );
}
