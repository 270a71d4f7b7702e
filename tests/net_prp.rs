//! PRP over two real fabrics, without a VM: two `vhost-mirror prp-gateway`s, each with two
//! AF_PACKET paths on veths plugged into bridge A and bridge B, and a TAP toward a network
//! namespace ("client" and "server"). ping between the namespaces while a fabric is cut, or while
//! one path drops and reorders, must lose nothing and see no duplicate.

mod common;
use common::*;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bridges, veths and namespaces, removed on drop.
struct Fabric {
    tag: String,
    gateways: Vec<Child>,
    controls: Vec<std::path::PathBuf>,
    _dir: TempDir,
}

impl Fabric {
    /// `opts[g][p]`: path options (e.g. "?drop=20") for gateway g's path p.
    fn build(name: &str, opts: [[&str; 2]; 2]) -> Fabric {
        let tag = format!("{}{}", name, std::process::id() % 10_000);
        let dir = TempDir::new(&format!("prp-{tag}"));
        let t = &tag;
        sh_ok(&format!(
            "ip netns del {t}c; ip netns del {t}s; ip netns del {t}f"
        ));
        // The fabrics' bridges live in their own namespace with br_netfilter's hooks off: with
        // them on (common on hosts that run containers) the bridge trims IPv4 frames to the IP
        // length, which strips the PRP trailer. The setting is per namespace; the host's stays.
        sh(&format!(
            "ip netns add {t}c && ip netns add {t}s && ip netns add {t}f && \
             ip netns exec {t}f sh -c 'for k in iptables ip6tables arptables; do \
               f=/proc/sys/net/bridge/bridge-nf-call-$k; [ -e $f ] && echo 0 > $f; done; true'"
        ));
        for br in ["A", "B"] {
            sh(&format!(
                "ip -n {t}f link add {br} type bridge && ip -n {t}f link set {br} up"
            ));
        }
        let mut gateways = Vec::new();
        let mut controls = Vec::new();
        for (g, ns) in ["c", "s"].iter().enumerate() {
            for (p, br) in ["A", "B"].iter().enumerate() {
                let v = format!("{t}{g}{br}");
                sh(&format!(
                    "ip link add {v} type veth peer name {v}p && ip link set {v}p netns {t}f && \
                     ip -n {t}f link set {v}p master {br} && ip -n {t}f link set {v}p mtu 1506 up && \
                     ip link set {v} mtu 1506 up"
                ));
                let _ = p;
            }
            let tap = format!("{t}{g}t");
            let control = dir.path(&format!("gw{g}.sock"));
            let log = std::fs::File::create(dir.path(&format!("gw{g}.log"))).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_vhost-mirror"))
                .arg("prp-gateway")
                .arg("--path")
                .arg(format!("packet:{t}{g}A{}", opts[g][0]))
                .arg("--path")
                .arg(format!("packet:{t}{g}B{}", opts[g][1]))
                .arg("--tap")
                .arg(&tap)
                .arg("--control")
                .arg(&control)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let c = control.clone();
            wait_for("gateway control socket", Duration::from_secs(10), || {
                c.exists()
            });
            // The gateway holds the TAP open; move the interface into the host's namespace.
            let ip = if g == 0 { "10.77.0.2" } else { "10.77.0.1" };
            sh(&format!(
                "ip link set {tap} netns {t}{ns} && ip -n {t}{ns} link set {tap} up && \
                 ip -n {t}{ns} addr add {ip}/24 dev {tap} && ip -n {t}{ns} link set lo up"
            ));
            gateways.push(child);
            controls.push(control);
        }
        Fabric {
            tag,
            gateways,
            controls,
            _dir: dir,
        }
    }

    /// ping from the client namespace; returns (transmitted, received, duplicates).
    fn ping(&self, count: u32, during: impl FnOnce(&str) + Send + 'static) -> (u32, u32, u32) {
        let t = self.tag.clone();
        let tt = t.clone();
        let cutter = std::thread::spawn(move || during(&tt));
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("{t}c"),
                "ping",
                "-q",
                "-i",
                "0.01",
                "-W",
                "1",
            ])
            .args(["-c", &count.to_string(), "10.77.0.1"])
            .output()
            .unwrap();
        cutter.join().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // "400 packets transmitted, 400 received, +3 duplicates, 0% packet loss, time 4100ms"
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no ping summary: {text}"));
        let num = |word: &str| -> u32 {
            line.split(',')
                .find(|p| p.contains(word))
                .and_then(|p| {
                    p.trim()
                        .trim_start_matches('+')
                        .split(' ')
                        .next()?
                        .parse()
                        .ok()
                })
                .unwrap_or(0)
        };
        (num("transmitted"), num("received"), num("duplicates"))
    }

    fn status(&self, g: usize) -> serde_json::Value {
        ctl(&self.controls[g], r#"{"cmd":"status"}"#)
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for g in &mut self.gateways {
            let _ = g.kill();
            let _ = g.wait();
        }
        let t = &self.tag;
        sh_ok(&format!(
            "ip netns del {t}c; ip netns del {t}s; ip netns del {t}f"
        ));
        for g in 0..2 {
            for br in ["A", "B"] {
                sh_ok(&format!("ip link del {t}{g}{br}"));
            }
        }
    }
}

fn warm_up(f: &Fabric) {
    // ARP and the bridges' learning settle before the measured run.
    let t0 = Instant::now();
    loop {
        let (tx, rx, _) = f.ping(3, |_| {});
        if tx == 3 && rx == 3 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no connectivity over the gateways"
        );
    }
}

/// Fabric A is cut (the client gateway's port on bridge A goes down) 2 s into a 400-ping run at
/// 10 ms and restored 1 s later: nothing is lost, no duplicate reaches either end.
#[test]
fn fabric_cut_loses_nothing() {
    let _serial = exclusive();
    let f = Fabric::build("pc", [["", ""], ["", ""]]);
    warm_up(&f);
    let (tx, rx, dup) = f.ping(400, |t| {
        std::thread::sleep(Duration::from_secs(2));
        sh(&format!("ip -n {t}f link set {t}0Ap down"));
        std::thread::sleep(Duration::from_secs(1));
        sh(&format!("ip -n {t}f link set {t}0Ap up"));
    });
    eprintln!("fabric cut: {tx} sent, {rx} received, {dup} duplicates");
    assert_eq!((tx, rx, dup), (400, 400, 0));
    for g in 0..2 {
        let st = f.status(g);
        let n = |lan: &str, k: &str| st["prp"][lan][k].as_u64().unwrap();
        // Both copies of most frames arrived and one was discarded (about 300 of 400: the
        // cut takes a second and however long `ip` takes to undo it) ...
        assert!(
            n("lan_b", "duplicates") + n("lan_a", "duplicates") >= 250,
            "{st}"
        );
        // ... except while fabric A was cut, when frames came on B only.
        assert!(n("lan_b", "unique") > 0, "{st}");
        assert_eq!(n("lan_a", "wrong_lan") + n("lan_b", "wrong_lan"), 0, "{st}");
    }
}

/// One path drops 20 % of its frames and reorders 10 %, in both directions: PRP's other path
/// covers every loss and duplicate discard never drops a legitimate frame.
#[test]
fn lossy_reordering_path_loses_nothing() {
    let _serial = exclusive();
    let lossy = "?drop=20&reorder=10";
    let f = Fabric::build("pl", [[lossy, ""], [lossy, ""]]);
    warm_up(&f);
    let (tx, rx, dup) = f.ping(400, |_| {});
    eprintln!("lossy path: {tx} sent, {rx} received, {dup} duplicates");
    assert_eq!((tx, rx, dup), (400, 400, 0));
}

/// One path is 80 ms slower than the other in both directions: every frame arrives first on B
/// and its copy on A well after it, yet within the 400 ms forget time, so the late copy is
/// discarded; nothing is lost and no duplicate reaches either end.
#[test]
fn slow_path_loses_nothing_and_passes_no_duplicate() {
    let _serial = exclusive();
    let slow = "?delay=80";
    let f = Fabric::build("ps", [[slow, ""], [slow, ""]]);
    warm_up(&f);
    let (tx, rx, dup) = f.ping(200, |_| {});
    eprintln!("slow path: {tx} sent, {rx} received, {dup} duplicates");
    assert_eq!((tx, rx, dup), (200, 200, 0));
    for g in 0..2 {
        let st = f.status(g);
        let late = st["prp"]["lan_a"]["duplicates"].as_u64().unwrap();
        assert!(late >= 150, "the slow path's copies are discarded: {st}");
    }
}
