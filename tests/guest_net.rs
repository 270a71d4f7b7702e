//! The network half's proof in a real guest: QEMU (TCG) boots the busybox initramfs of
//! `scripts/guest-image` in `vhm.mode=net` with a virtio-net NIC served by `vhost-mirror net`
//! over two TAP paths. Each TAP sits in its own bridge ("fabric A", "fabric B") in a fabric
//! namespace (br_netfilter off there: it would trim PRP trailers). The server namespace is
//! reached through `vhost-mirror prp-gateway` (prp) or a plain bridge joining both fabrics
//! (active-backup). The guest takes commands on its console (one boot per scenario).
//!
//! - prp: `ping -i 0.01 -c 400` while the daemon's path A is cut 2 s in and restored; a numbered
//!   UDP stream (`examples/udp_seq.rs`) while fabric A's link to the server is cut; a TCP transfer
//!   checked with sha256 while bridge B goes down; PRP trailers captured on both fabrics decode in
//!   tshark: nothing lost, no duplicate at either end.
//! - prp with the daemon's path A dropping 20 % and reordering 10 %: the same ping and stream.
//! - active-backup: the active TAP goes down mid-stream; loss stays within the failover window,
//!   a gratuitous ARP shows up on the new path, and the server reaches the guest there.
//!
//! Under TCG QEMU 7.2 crashes when vhost-user-net uses MSI-X (its irqfd path assumes KVM), so
//! the NIC has `vectors=0` here (INTx). `VHM_SKIP_GUEST=1` skips these tests (loudly); without
//! /dev/net/tun or network namespaces they skip with the reason. QEMU, the kernel and busybox
//! come from `scripts/guest-image`, tshark from `scripts/install-deps`.

mod common;
use common::*;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

const GUEST_IP: &str = "10.78.0.2";
const SERVER_IP: &str = "10.78.0.1";
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// Why this machine cannot run the tests, if it cannot.
fn unavailable() -> Option<String> {
    if std::env::var("VHM_SKIP_GUEST").as_deref() == Ok("1") {
        return Some("VHM_SKIP_GUEST=1: the QEMU network guest tests are SKIPPED".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    let probe = format!("vhmprobe{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .status()
        .is_ok_and(|s| s.success());
    sh_ok(&format!("ip netns del {probe}"));
    if !ok {
        return Some("cannot create network namespaces (ip netns add; needs root)".into());
    }
    None
}

fn skip(name: &str) -> bool {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    if let Some(why) = WHY.get_or_init(unavailable) {
        eprintln!("\n!!! {name} SKIPPED: {why} !!!\n");
        return true;
    }
    false
}

/// target dir of this build (the test binary is in <target>/<profile>/deps).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// The udp_seq example for the host and the guest, built if `cargo test` did not build it.
fn udp_seq() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = profile_dir().join("examples/udp_seq");
        if !p.exists() {
            let profile = profile_dir();
            let target = profile.parent().unwrap();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let st = Command::new(cargo)
                .args(["build", "--example", "udp_seq"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .env("CARGO_TARGET_DIR", target)
                .status()
                .unwrap();
            assert!(st.success() && p.exists(), "cannot build examples/udp_seq");
        }
        p
    })
}

struct Image {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// The guest kernel and initramfs (with udp_seq), in a directory of this target dir so that the
/// block guest tests' image is left alone.
fn image() -> &'static Image {
    static IMG: OnceLock<Image> = OnceLock::new();
    IMG.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest-image");
        let out = Command::new(&script)
            .env("VHM_GUEST_DIR", profile_dir().join("guest-net"))
            .env("VHM_GUEST_EXTRA", udp_seq())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "guest-image failed: {stdout}");
        let get = |k: &str| {
            PathBuf::from(
                stdout
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .unwrap_or_else(|| panic!("no {k} from guest-image: {stdout}")),
            )
        };
        Image {
            kernel: get("KERNEL="),
            initrd: get("INITRD="),
        }
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Prp,
    ActiveBackup,
}

/// Namespaces, bridges, daemons and the guest of one scenario; all removed on drop.
struct Rig {
    guest: Option<Guest>,
    procs: Vec<Child>,
    /// Fabric namespace (bridges A and B, the TAPs, the daemons) and server namespace.
    f: String,
    s: String,
    control: PathBuf,
    dir: TempDir,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.guest.take();
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        for ns in [&self.f, &self.s] {
            // Whatever still runs in the namespaces (receivers, captures) goes with them.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill(2) on a process in a namespace this test created.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            sh_ok(&format!("ip netns del {ns}"));
        }
    }
}

impl Rig {
    /// `path_opts[i]`: fault options of the daemon's path i (e.g. "?drop=20").
    fn build(name: &str, mode: Mode, path_opts: [&str; 2]) -> Rig {
        let serial = exclusive();
        let img = image();
        let tag = format!("{name}{}", std::process::id() % 10_000);
        let dir = TempDir::new(&format!("gnet-{tag}"));
        let (f, s) = (format!("{tag}f"), format!("{tag}s"));
        sh_ok(&format!("ip netns del {f}; ip netns del {s}"));
        let mut rig = Rig {
            guest: None,
            procs: Vec::new(),
            control: dir.path("net.ctl"),
            f: f.clone(),
            s: s.clone(),
            dir,
            _serial: serial,
        };
        sh(&format!(
            "ip netns add {f} && ip netns add {s} && ip -n {f} link set lo up && \
             ip -n {s} link set lo up && \
             ip netns exec {f} sh -c 'for k in iptables ip6tables arptables; do \
               p=/proc/sys/net/bridge/bridge-nf-call-$k; [ -e $p ] && echo 0 > $p; done; true'"
        ));
        // The daemon's TAPs exist before it starts, with room for the PRP trailer.
        for br in ["A", "B"] {
            sh(&format!(
                "ip -n {f} link add {br} type bridge && ip -n {f} link set {br} up && \
                 ip -n {f} tuntap add mode tap name vm{br} && \
                 ip -n {f} link set vm{br} mtu 1506 master {br} up"
            ));
        }
        let bin = env!("CARGO_BIN_EXE_vhost-mirror");
        let socket = rig.dir.path("net.sock");
        let mode_arg = if mode == Mode::Prp {
            "prp"
        } else {
            "active-backup"
        };
        // active-backup also probes the server (ARP), to see cuts beyond the first switch.
        let probe: &[&str] = if mode == Mode::ActiveBackup {
            &["--probe", SERVER_IP]
        } else {
            &[]
        };
        let net = Command::new("ip")
            .args(["netns", "exec", &f, bin, "net", "--socket"])
            .arg(&socket)
            .args(["--path", &format!("tap:vmA{}", path_opts[0])])
            .args(["--path", &format!("tap:vmB{}", path_opts[1])])
            .args(probe)
            .args(["--mode", mode_arg, "--control"])
            .arg(&rig.control)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(rig.dir.path("net.log")).unwrap())
            .spawn()
            .unwrap();
        rig.procs.push(net);
        match mode {
            Mode::Prp => {
                for br in ["A", "B"] {
                    sh(&format!(
                        "ip -n {f} link add g{br} type veth peer name g{br}p && \
                         ip -n {f} link set g{br}p mtu 1506 master {br} up && \
                         ip -n {f} link set g{br} mtu 1506 up"
                    ));
                }
                let gw_control = rig.dir.path("gw.ctl");
                let gw = Command::new("ip")
                    .args(["netns", "exec", &f, bin, "prp-gateway"])
                    .args(["--path", "packet:gA", "--path", "packet:gB"])
                    .args(["--tap", "srv", "--control"])
                    .arg(&gw_control)
                    .env("RUST_LOG", "info")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(rig.dir.path("gw.log")).unwrap())
                    .spawn()
                    .unwrap();
                rig.procs.push(gw);
                wait_for("gateway", Duration::from_secs(20), || gw_control.exists());
                sh(&format!(
                    "ip -n {f} link set srv netns {s} && ip -n {s} link set srv up && \
                     ip -n {s} addr add {SERVER_IP}/24 dev srv"
                ));
            }
            Mode::ActiveBackup => {
                // Both fabrics reach the server's switch S; the server has one plain NIC.
                sh(&format!(
                    "ip -n {f} link add S type bridge && ip -n {f} link set S up && \
                     ip -n {f} link add upA type veth peer name upAs && \
                     ip -n {f} link add upB type veth peer name upBs && \
                     ip -n {f} link set upA master A up && ip -n {f} link set upB master B up && \
                     ip -n {f} link set upAs master S up && ip -n {f} link set upBs master S up && \
                     ip -n {f} link add srvp type veth peer name srv netns {s} && \
                     ip -n {f} link set srvp master S up && ip -n {s} link set srv up && \
                     ip -n {s} addr add {SERVER_IP}/24 dev srv"
                ));
            }
        }
        let c = rig.control.clone();
        wait_for("net daemon", Duration::from_secs(20), || {
            c.exists() && socket.exists()
        });
        rig.guest = Some(Guest::boot(img, &socket, &rig.dir));
        rig
    }

    fn guest(&mut self) -> &mut Guest {
        self.guest.as_mut().unwrap()
    }

    fn status(&self) -> Value {
        ctl(&self.control, r#"{"cmd":"status"}"#)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path(name)).unwrap_or_default()
    }

    /// Pings from the guest until the server answers (ARP, bridges' learning).
    fn warm_up(&mut self) {
        let t0 = Instant::now();
        loop {
            let (code, out) = self.guest().run(&format!("ping -c 2 -W 2 {SERVER_IP}"), 30);
            if code == 0 && out.contains("2 packets received") {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(40),
                "no connectivity from the guest: {out}\n{}\n{}",
                self.status(),
                self.log("net.log")
            );
        }
    }

    /// `udp_seq tcp-recv PORT | sha256sum` in the server namespace, listening when this returns.
    fn tcp_sink(&self, port: u16) -> Child {
        let mut c = Command::new("ip")
            .args(["netns", "exec", &self.s, "sh", "-c"])
            .arg(format!(
                "{} tcp-recv {port} | sha256sum",
                udp_seq().display()
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_listening(&mut c);
        c
    }

    /// 32 MiB of random bytes at `path` in the guest; their sha256.
    fn guest_blob(&mut self, path: &str) -> String {
        let (code, out) = self.guest().run(
            &format!(
                "dd if=/dev/urandom of={path} bs=64k count=512 2>/dev/null && sha256sum {path}"
            ),
            60,
        );
        assert_eq!(code, 0, "{out}");
        out.split_whitespace().next().unwrap().to_string()
    }

    /// `udp_seq recv` in the server namespace.
    fn udp_receiver(&self, port: u16, count: u32, timeout_s: u32) -> Child {
        let mut c = Command::new("ip")
            .args(["netns", "exec", &self.s])
            .arg(udp_seq())
            .args(["recv", &port.to_string(), &count.to_string()])
            .arg(timeout_s.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_listening(&mut c);
        c
    }
}

/// Waits for a udp_seq receiver's "listening" line on stderr.
fn wait_listening(c: &mut Child) {
    let mut err = c.stderr.take().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !String::from_utf8_lossy(&line).contains("listening") {
        match err.read(&mut b) {
            Ok(1) => line.push(b[0]),
            _ => panic!("receiver did not start: {}", String::from_utf8_lossy(&line)),
        }
    }
    c.stderr = Some(err);
}

fn finish_json(c: Child) -> Value {
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("receiver output {text:?}: {e}"))
}

/// A QEMU guest whose console takes commands (the initramfs's vhm.mode=net loop).
struct Guest {
    child: Child,
    stdin: ChildStdin,
    console: Arc<Mutex<String>>,
    log: PathBuf,
    n: u32,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    fn boot(img: &Image, socket: &Path, dir: &TempDir) -> Guest {
        let log = dir.path("console.log");
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1"])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=n0,path={}", socket.display()))
            .args(["-netdev", "vhost-user,id=net0,chardev=n0"])
            .args([
                "-device",
                "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,vectors=0",
            ])
            .args(["-nographic", "-no-reboot", "-kernel"])
            .arg(&img.kernel)
            .arg("-initrd")
            .arg(&img.initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet loglevel=4 vhm.mode=net vhm.ip={GUEST_IP}/24"
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path("qemu.err")).unwrap())
            .spawn()
            .expect("qemu-system-x86_64 (scripts/guest-image installs it)");
        let stdin = child.stdin.take().unwrap();
        let mut out = child.stdout.take().unwrap();
        let console = Arc::new(Mutex::new(String::new()));
        let c = console.clone();
        let mut file = std::fs::File::create(&log).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = file.write_all(&buf[..n]);
                c.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]).replace('\r', ""));
            }
        });
        let mut g = Guest {
            child,
            stdin,
            console,
            log,
            n: 0,
        };
        g.wait_marker("VHM-READY", BOOT_LIMIT);
        assert!(g.text().contains("VHM-NET-UP=eth0"), "{}", g.text());
        g
    }

    fn text(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    fn wait_marker(&mut self, marker: &str, limit: Duration) {
        let t0 = Instant::now();
        while !self.text().contains(marker) {
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                if self.text().contains(marker) {
                    return;
                }
                panic!(
                    "QEMU exited ({st}) before {marker}; console {}:\n{}",
                    self.log.display(),
                    self.text()
                );
            }
            assert!(
                t0.elapsed() < limit,
                "no {marker} within {limit:?}; console:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a shell command in the guest; `wait` collects it.
    fn start(&mut self, cmd: &str) -> u32 {
        self.n += 1;
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.n
    }

    /// Waits for command `n`; returns its exit code and output.
    fn wait(&mut self, n: u32, limit_s: u64) -> (i32, String) {
        let end = format!("VHM-CMD-EXIT={n}:");
        self.wait_marker(&end, Duration::from_secs(limit_s));
        let text = self.text();
        let start = format!("VHM-CMD-START={n}\n");
        let from = text.find(&start).map(|i| i + start.len()).unwrap_or(0);
        let at = text.find(&end).unwrap();
        let code = text[at + end.len()..]
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(-1);
        (code, text[from..at].to_string())
    }

    fn run(&mut self, cmd: &str, limit_s: u64) -> (i32, String) {
        let n = self.start(cmd);
        self.wait(n, limit_s)
    }
}

/// (transmitted, received, duplicates) from busybox ping's summary.
fn ping_summary(out: &str) -> (u32, u32, u32) {
    // "400 packets transmitted, 400 packets received, 2 duplicates, 0% packet loss"
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in {out:?}"));
    let num = |word: &str| {
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
    (num("transmitted"), num("received"), num("duplicate"))
}

/// Runs `action` in `f` after `after`, on a thread.
fn later(after: Duration, action: String) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(after);
        sh(&action);
    })
}

/// 400 pings at 10 ms from the guest while `cut` runs 2 s in and `restore` 1.5 s later.
fn ping_through(rig: &mut Rig, cut: &str, restore: &str) -> (u32, u32, u32) {
    let n = rig
        .guest()
        .start(&format!("ping -q -i 0.01 -c 400 -W 2 {SERVER_IP}"));
    let cutter = later(
        Duration::from_secs(2),
        format!("{cut} && sleep 1.5 && {restore}"),
    );
    let (_, out) = rig.guest().wait(n, 90);
    cutter.join().unwrap();
    ping_summary(&out)
}

/// A numbered UDP stream of `count` datagrams at 10 ms from the guest to the server while `cut`
/// runs 2 s in and `restore` 1.5 s later; returns the receiver's summary.
fn stream_through(rig: &mut Rig, port: u16, count: u32, cut: &str, restore: &str) -> Value {
    // The stream lasts count * 10 ms; a receiver missing datagrams gives up 8 s after that.
    let rx = rig.udp_receiver(port, count, count / 100 + 8);
    let n = rig
        .guest()
        .start(&format!("udp_seq send {SERVER_IP}:{port} {count} 10"));
    let cutter = later(
        Duration::from_secs(2),
        format!("{cut} && sleep 1.5 && {restore}"),
    );
    let (code, out) = rig.guest().wait(n, 120);
    cutter.join().unwrap();
    assert_eq!(code, 0, "udp_seq send: {out}");
    let sum = finish_json(rx);
    eprintln!("udp stream: guest {} / server {sum}", out.trim());
    sum
}

/// PRP with a real guest: three different cuts (the daemon's path, fabric A's link to the
/// server, all of bridge B) under ping, a numbered UDP stream and a TCP transfer; then the
/// trailers as tshark decodes them.
#[test]
fn prp_guest_loses_nothing_when_a_fabric_is_cut() {
    if skip("prp_guest_loses_nothing_when_a_fabric_is_cut") {
        return;
    }
    let t0 = Instant::now();
    let mut rig = Rig::build("gp", Mode::Prp, ["", ""]);
    eprintln!("prp: guest up after {:?}", t0.elapsed());
    rig.warm_up();
    let f = rig.f.clone();

    // 1. ping at 10 ms; the daemon's TAP for path A goes down 2 s in.
    let (tx, rx, dup) = ping_through(
        &mut rig,
        &format!("ip -n {f} link set vmA down"),
        &format!("ip -n {f} link set vmA up"),
    );
    eprintln!("prp ping, path A cut: {tx} sent, {rx} received, {dup} duplicates");
    assert_eq!((tx, rx, dup), (400, 400, 0), "{}", rig.status());

    // 2. numbered UDP stream; fabric A's link to the server (the gateway's port) goes down.
    let sum = stream_through(
        &mut rig,
        7001,
        500,
        &format!("ip -n {f} link set gAp down"),
        &format!("ip -n {f} link set gAp up"),
    );
    assert_eq!(sum["received"], 500, "{sum}");
    assert_eq!(sum["missing"], 0, "{sum}");
    assert_eq!(sum["duplicates"], 0, "{sum}");

    // 3. TCP: 32 MiB of random bytes, sha256 on both ends; bridge B goes down mid-transfer.
    let server = rig.tcp_sink(7002);
    let sent_sum = rig.guest_blob("/tmp/blob");
    let t = Instant::now();
    let n = rig
        .guest()
        .start(&format!("nc {SERVER_IP} 7002 < /tmp/blob"));
    let cutter = later(
        Duration::from_millis(300),
        format!("ip -n {f} link set B down && sleep 1.5 && ip -n {f} link set B up"),
    );
    let (code, out) = rig.guest().wait(n, 120);
    let took = t.elapsed();
    cutter.join().unwrap();
    assert_eq!(code, 0, "nc: {out}");
    let srv = server.wait_with_output().unwrap();
    let got_sum = String::from_utf8_lossy(&srv.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    eprintln!(
        "prp tcp, bridge B cut: 32 MiB in {took:?}, {}",
        String::from_utf8_lossy(&srv.stderr).trim()
    );
    assert_eq!(got_sum, sent_sum, "byte stream differs");
    assert!(
        String::from_utf8_lossy(&srv.stderr).contains("33554432 bytes"),
        "{}",
        String::from_utf8_lossy(&srv.stderr)
    );

    // The daemon saw both copies of most frames and discarded one of each. Frames one LAN lost
    // are counted `unique` when their sequence block is forgotten (400 ms after its last frame,
    // swept every 200 ms), so the status is read once that has had time to happen.
    std::thread::sleep(Duration::from_millis(1000));
    let st = rig.status();
    let n = |lan: &str, k: &str| st["prp"][lan][k].as_u64().unwrap_or(0);
    assert!(
        n("lan_a", "duplicates") + n("lan_b", "duplicates") > 300,
        "{st}"
    );
    assert!(n("lan_b", "unique") > 0 && n("lan_a", "unique") > 0, "{st}");
    assert_eq!(n("lan_a", "wrong_lan") + n("lan_b", "wrong_lan"), 0, "{st}");
    assert_eq!(st["device"]["tx_malformed"], 0, "{st}");
    for p in 0..2 {
        assert_eq!(st["paths"][p]["oversize"], 0, "{st}");
    }

    // 4. Frame format: what the guest sends, captured on both fabrics, decodes as PRP.
    frame_format(&mut rig);
    eprintln!("prp scenario took {:?}", t0.elapsed());
}

/// Captures the guest's pings on both gateway ports and has tshark decode the trailers.
fn frame_format(rig: &mut Rig) {
    if Command::new("tshark").arg("--version").output().is_err() {
        panic!("tshark missing: run scripts/install-deps");
    }
    let pcap = rig.dir.path("prp.pcapng");
    let f = rig.f.clone();
    let mut cap = Command::new("ip")
        .args(["netns", "exec", &f, "tshark", "-i", "gA", "-i", "gB"])
        .args(["-f", "icmp", "-c", "40", "-a", "duration:60", "-w"])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // tshark says "Capturing on ..." once it captures.
    let mut err = cap.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("Capturing on") {
        match err.read(&mut b) {
            Ok(1) => seen.push(b[0]),
            _ => panic!("tshark: {}", String::from_utf8_lossy(&seen)),
        }
    }
    let (code, out) = rig
        .guest()
        .run(&format!("ping -c 10 -i 0.1 {SERVER_IP}"), 60);
    assert_eq!(code, 0, "{out}");
    let st = cap.wait().unwrap();
    assert!(st.success(), "tshark capture failed");
    let fields = sh(&format!(
        "tshark -r {} -o prp.enable:TRUE -Y 'icmp.type == 8 && prp' -T fields \
         -e prp.trailer.prp_sequence_nr -e prp.trailer.prp_lan -e prp.trailer.prp_size \
         -e prp.trailer.prp1_suffix",
        pcap.display()
    ));
    let rows: Vec<Vec<&str>> = fields
        .lines()
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .collect();
    assert!(rows.len() >= 10, "PRP echo requests decoded: {fields}");
    let verbose = sh(&format!(
        "tshark -r {} -o prp.enable:TRUE -Y 'icmp.type == 8' -V | grep -i 'size'",
        pcap.display()
    ));
    assert!(verbose.contains("[correct]"), "{verbose}");
    let mut by_lan: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
    for r in &rows {
        let lan = r[1].to_string();
        by_lan.entry(lan).or_default().push(r[0].parse().unwrap());
    }
    eprintln!(
        "tshark: {} PRP echo requests, LANs {:?}",
        rows.len(),
        by_lan.keys().collect::<Vec<_>>()
    );
    // LAN identifiers 0xA and 0xB.
    assert_eq!(
        by_lan.keys().map(String::as_str).collect::<Vec<_>>(),
        ["10", "11"],
        "LAN ids A and B: {fields}"
    );
    assert!(by_lan.values().all(|v| v.len() >= 8), "{fields}");
    for (lan, seqs) in &by_lan {
        assert!(
            seqs.windows(2).all(|w| w[1] > w[0] || w[0] - w[1] > 30000),
            "sequence numbers on LAN {lan} not increasing: {seqs:?}"
        );
    }
    // The same frame carries the same sequence number on both LANs.
    let a: std::collections::BTreeSet<_> = by_lan.values().next().unwrap().iter().collect();
    let b: std::collections::BTreeSet<_> = by_lan.values().nth(1).unwrap().iter().collect();
    assert!(a.intersection(&b).count() >= 8, "{fields}");
}

/// PRP while the daemon's path A drops 20 % of what it sends and reorders 10 %: B covers every
/// loss and duplicate discard never drops a legitimate frame.
#[test]
fn prp_guest_loses_nothing_over_a_lossy_reordering_path() {
    if skip("prp_guest_loses_nothing_over_a_lossy_reordering_path") {
        return;
    }
    let t0 = Instant::now();
    let mut rig = Rig::build("gl", Mode::Prp, ["?drop=20&reorder=10", ""]);
    rig.warm_up();
    let (tx, rx, dup) = ping_through(&mut rig, "true", "true");
    eprintln!("prp ping, lossy path A: {tx} sent, {rx} received, {dup} duplicates");
    assert_eq!((tx, rx, dup), (400, 400, 0), "{}", rig.status());
    let sum = stream_through(&mut rig, 7003, 500, "true", "true");
    assert_eq!(
        (&sum["received"], &sum["missing"], &sum["duplicates"]),
        (&Value::from(500), &Value::from(0), &Value::from(0)),
        "{sum}"
    );
    // Path A really lost frames: the gateway got about 80 % of what the daemon sent on it.
    let st = rig.status();
    let gw = ctl(&rig.dir.path("gw.ctl"), r#"{"cmd":"status"}"#);
    let (sent, got) = (
        st["paths"][0]["sent"].as_u64().unwrap(),
        gw["paths"][0]["received"].as_u64().unwrap(),
    );
    eprintln!("lossy path A: daemon sent {sent}, gateway received {got}");
    assert!(sent > 800 && got * 10 < sent * 9, "{st}\n{gw}");
    eprintln!("lossy scenario took {:?}", t0.elapsed());
}

/// active-backup: the active TAP goes down mid-stream; traffic moves to B within the failover
/// window, a gratuitous ARP for the guest's address goes out on B, and the server reaches the
/// guest there.
#[test]
fn active_backup_guest_fails_over_and_announces() {
    if skip("active_backup_guest_fails_over_and_announces") {
        return;
    }
    let t0 = Instant::now();
    let mut rig = Rig::build("ga", Mode::ActiveBackup, ["", ""]);
    rig.warm_up();
    let f = rig.f.clone();
    let st = rig.status();
    assert_eq!(
        st["paths"][0]["active"],
        true,
        "path A is not the active one after the warm-up: {st}\n{}",
        rig.log("net.log")
    );
    // Watch for ARP on the backup TAP.
    let arp = rig.dir.path("arp.txt");
    let mut cap = Command::new("ip")
        .args([
            "netns", "exec", &f, "tshark", "-i", "vmB", "-f", "arp", "-l",
        ])
        .args(["-a", "duration:40", "-T", "fields"])
        .args([
            "-e",
            "eth.src",
            "-e",
            "arp.src.proto_ipv4",
            "-e",
            "arp.dst.proto_ipv4",
        ])
        .stdout(std::fs::File::create(&arp).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = cap.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("Capturing on") {
        match err.read(&mut b) {
            Ok(1) => seen.push(b[0]),
            _ => panic!("tshark: {}", String::from_utf8_lossy(&seen)),
        }
    }
    let count = 500;
    let sum = stream_through(
        &mut rig,
        7004,
        count,
        &format!("ip -n {f} link set vmA down"),
        &format!("ip -n {f} link set vmA up"),
    );
    let missing = sum["missing"].as_u64().unwrap();
    let st = rig.status();
    eprintln!(
        "active-backup: {missing} of {count} datagrams lost at the failover (window ~{} ms), \
         {} duplicates",
        missing * 10,
        sum["duplicates"]
    );
    eprintln!(
        "active-backup paths: {}\n{}",
        st["paths"],
        rig.log("net.log")
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("announced"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(st["failovers"], 1, "{st}");
    assert_eq!(st["paths"][1]["active"], true, "{st}");
    // Carrier is polled every 50 ms; allow for TCG's jitter, not for a stuck failover.
    assert!(
        missing <= 30,
        "lost {missing} datagrams (> 300 ms at 10 ms): {sum}"
    );
    assert_eq!(sum["duplicates"], 0, "{sum}");
    // The server reaches the guest on the new path.
    let out = sh(&format!(
        "ip netns exec {} ping -c 3 -i 0.2 -W 2 {GUEST_IP}",
        rig.s
    ));
    assert!(out.contains("3 received"), "{out}");

    // A cut beyond the first switch: B's uplink to the server's switch goes down while vmB
    // keeps its carrier. Only the ARP probes can tell; traffic moves back to A.
    let sum = stream_through(
        &mut rig,
        7005,
        count,
        &format!("ip -n {f} link set upB down"),
        &format!("ip -n {f} link set upB up"),
    );
    let missing = sum["missing"].as_u64().unwrap();
    let st = rig.status();
    eprintln!(
        "active-backup, uplink cut (probes): {missing} of {count} datagrams lost (window ~{} ms), \
         {} duplicates; paths {}",
        missing * 10,
        sum["duplicates"],
        st["paths"]
    );
    assert_eq!(st["failovers"], 2, "{st}\n{}", rig.log("net.log"));
    assert_eq!(st["paths"][0]["active"], true, "{st}");
    assert!(
        st["paths"][0]["probe_answers"].as_u64().unwrap() > 0,
        "{st}"
    );
    // Three unanswered probes 100 ms apart, one interval's grace, the 50 ms monitor tick.
    assert!(
        missing <= 80,
        "lost {missing} datagrams (> 800 ms at 10 ms): {sum}"
    );
    assert_eq!(sum["duplicates"], 0, "{sum}");
    std::thread::sleep(Duration::from_millis(500));
    signal(&cap, libc::SIGINT);
    let _ = cap.wait();
    let text = std::fs::read_to_string(&arp).unwrap_or_default();
    assert!(
        text.lines().any(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            c.len() == 3 && c[0] == "52:54:00:12:34:56" && c[1] == GUEST_IP && c[2] == GUEST_IP
        }),
        "no gratuitous ARP for {GUEST_IP} on path B: {text:?}\n{}",
        rig.log("net.log")
    );

    offloads_pass_through(&mut rig);
    eprintln!("active-backup scenario took {:?}", t0.elapsed());
}

/// The sha256 a `sha256sum` printed first.
fn first_word(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// active-backup over two TAPs turns offloads on (`--offload auto`): the guest's TSO frames
/// and partial checksums reach the TAP whole, the server's large frames reach the guest whole,
/// and a TCP stream each way stays intact, the first one across a failover.
fn offloads_pass_through(rig: &mut Rig) {
    let f = rig.f.clone();
    let s = rig.s.clone();
    let st = rig.status();
    assert_eq!(st["offload"], true, "{st}");
    let before = st["paths"].clone();
    let log = rig.log("net.log");
    assert!(log.contains("guest takes offloads 0xf"), "{log}");

    // Guest -> server, the active path (A) cut 300 ms in: failover mid-stream with TSO frames.
    let server = rig.tcp_sink(7010);
    let sent_sum = rig.guest_blob("/tmp/up");
    let n = rig.guest().start(&format!("nc {SERVER_IP} 7010 < /tmp/up"));
    let cutter = later(
        Duration::from_millis(300),
        format!("ip -n {f} link set vmA down && sleep 1.5 && ip -n {f} link set vmA up"),
    );
    let (code, out) = rig.guest().wait(n, 120);
    cutter.join().unwrap();
    assert_eq!(code, 0, "nc: {out}");
    let srv = server.wait_with_output().unwrap();
    let up_took = String::from_utf8_lossy(&srv.stderr)
        .lines()
        .last()
        .unwrap_or("")
        .to_string();
    assert_eq!(
        first_word(&srv.stdout),
        sent_sum,
        "guest -> server stream differs"
    );
    assert!(up_took.contains("33554432 bytes"), "{up_took}");

    // Server -> guest on the path now active.
    let blob = rig.dir.path("down.bin");
    sh_ok(&format!(
        "head -c 33554432 /dev/urandom > {}",
        blob.display()
    ));
    let want = first_word(sh(&format!("sha256sum {}", blob.display())).as_bytes());
    let n = rig.guest().start("udp_seq tcp-recv 7011 | sha256sum");
    let sender = Command::new("ip")
        .args(["netns", "exec", &s, "sh", "-c"])
        .arg(format!(
            "{} tcp-send {GUEST_IP}:7011 < {}",
            udp_seq().display(),
            blob.display()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let down_took = String::from_utf8_lossy(&sender.stderr).trim().to_string();
    assert!(sender.status.success(), "{down_took}");
    let (code, out) = rig.guest().wait(n, 120);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&want),
        "server -> guest stream differs: {out} (want {want})"
    );

    let st = rig.status();
    let delta = |k: &str| -> u64 {
        (0..2)
            .map(|p| st["paths"][p][k].as_u64().unwrap() - before[p][k].as_u64().unwrap())
            .sum()
    };
    eprintln!(
        "offloads: guest -> server 32 MiB ({up_took}), server -> guest 32 MiB ({down_took}); \
         TSO frames sent {}, received {}; partial checksums sent {}, received {}; paths {}",
        delta("gso_sent"),
        delta("gso_received"),
        delta("csum_sent"),
        delta("csum_received"),
        st["paths"]
    );
    assert!(delta("gso_sent") > 0, "the guest sent no TSO frame: {st}");
    assert!(delta("csum_sent") > 0, "{st}");
    assert!(
        delta("gso_received") > 0,
        "no TSO frame reached the guest: {st}"
    );
    assert!(delta("csum_received") > 0, "{st}");
    assert_eq!(st["failovers"], 3, "{st}");
    assert_eq!(st["device"]["tx_malformed"], 0, "{st}");
    assert_eq!(st["device"]["rx_too_big"], 0, "{st}");
    for p in 0..2 {
        assert_eq!(st["paths"][p]["oversize"], 0, "{st}");
    }
}
