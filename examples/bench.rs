//! vhost-mirror against qemu-storage-daemon, side by side, in one run.
//!
//! Every configuration starts its targets on the same legs (null legs, two image files, two
//! nbdkit servers) and drives each with the same single-threaded libblkio client on one queue:
//! random aligned reads or writes over one working set, a fixed number of requests kept in
//! flight, the latency of every request taken from the client's submit to its completion. The
//! targets of a configuration are measured back to back, workload by workload, and a markdown
//! table per configuration gives IOPS, MiB/s, p50 and p99 latency and vhost-mirror's ratio to
//! each peer. The file and NBD configurations run twice: as the issue asks (images on the root
//! file system, nbdkit's file plugin) and with the disk taken out (images on tmpfs, nbdkit's
//! memory plugin), which shows the software path. The file legs run a third time on devices of
//! their own (a loop device each, capped by the kernel's block throttle), the shape of a
//! deployment, where each leg is a disk with its own limit. Then the daemon's resident memory over a
//! sustained run, the client's IOPS while a leg that was killed and brought back is resynced,
//! and the resync's own bandwidth with the client idle against a leg's write bandwidth.
//!
//! Everything is real: the `vhost-mirror` binary (found next to this example's directory, so
//! build it first), `qemu-storage-daemon --export type=vhost-user-blk`, nbdkit, libblkio.
//!
//! ```sh
//! cargo build --release && cargo run --release --example bench -- [--seconds N] [--quick] \
//!     [--out FILE] [--only SECTIONS] [--no-extra] [--keep] [--workloads LIST]
//! ```

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};
use serde_json::Value;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Bytes of client buffer per request slot (the largest request size: the 1 MiB writes that
/// measure a leg's write bandwidth for the resync comparison).
const SLOT: usize = 1024 * 1024;
/// Largest queue depth (number of slots).
const MAX_QD: usize = 32;
/// Room after the working set for vhost-mirror's metadata (bitmap and superblocks).
const META_ROOM: u64 = 8 * MIB;

/// Section names, in the order they run.
const SECTIONS: [&str; 10] = [
    "null",
    "file",
    "file-shm",
    "file-dev",
    "nbd",
    "nbd-mem",
    "memory",
    "resync",
    "resync-greedy",
    "resync-limited",
];

const USAGE: &str = "\
usage: cargo run --release --example bench -- [options]
  --seconds N       measured seconds per round (default 1)
  --warmup N        unmeasured seconds before each round (default 0.5)
  --rounds N        rounds per workload, the targets taking turns (default 3): IOPS is the
                    median of the rounds, p50/p99 are over every request of every round
  --quick           only QD32 randwrite 4K and QD1 randwrite 4K; no memory/resync runs
  --size MIB        working set and leg size in MiB (default 1024)
  --out FILE        also write the report (with the machine's description) to FILE
  --only LIST       sections to run, from null,file,file-shm,file-dev,nbd,nbd-mem,memory,resync,
                    resync-greedy,resync-limited (default: all)
  --extra           with --quick: run the memory and resync sections too
  --no-extra        skip the memory and resync sections
  --rss-seconds N   length of the sustained run for the memory section (default 20)
  --keep            keep the scratch directory (images, daemon logs) at the end
  --mirror-only     measure only vhost-mirror in the sections' rounds (the qsd targets are
                    started but not measured, so no ratios): for profiling the daemon over a
                    whole run, e.g. with perf stat -p
  --daemon PATH     the vhost-mirror binary to run (default: ../vhost-mirror beside this
                    bench, i.e. target/release/vhost-mirror); for A/B runs of two builds
  --io-timeout MS   pass --io-timeout MS to every vhost-mirror daemon (default: its own, 1000)
  --daemon-arg ARG  one more argument for every vhost-mirror daemon, repeatable
                    (e.g. --daemon-arg --poll-us --daemon-arg 0: no polling)
  --dev-iops N      the file-dev section's cap on each device's reads and writes a second
                    (default 16000; 0: the loop devices without any cap)
  --workloads LIST  only these workloads, QD:w|r:BYTES each (e.g. 1:w:65536,32:r:4096)
Build the daemon first: cargo build --release";

struct Opts {
    seconds: f64,
    warmup: f64,
    quick: bool,
    size: u64,
    out: Option<PathBuf>,
    sections: Vec<String>,
    rss_seconds: f64,
    keep: bool,
    /// Leave out the qsd targets.
    mirror_only: bool,
    /// `--io-timeout` for every vhost-mirror daemon (default: the daemon's own).
    io_timeout: Option<u64>,
    /// Rounds per workload; the targets take turns round by round.
    rounds: usize,
    /// `--workloads`: replaces the standard list (development).
    workloads: Option<Vec<Workload>>,
    /// `--daemon-arg`: more arguments for every `vhost-mirror blk` (A/B runs of its options).
    daemon_args: Vec<String>,
    /// `--daemon`: the vhost-mirror binary (A/B runs of two builds).
    daemon: Option<PathBuf>,
    /// `--dev-iops`: the `file-dev` section's cap on each device (0: none).
    dev_iops: u64,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        seconds: 1.0,
        warmup: 0.5,
        quick: false,
        size: 1024 * MIB,
        out: None,
        sections: Vec::new(),
        rss_seconds: 20.0,
        keep: false,
        mirror_only: false,
        io_timeout: None,
        rounds: 3,
        workloads: None,
        daemon_args: Vec::new(),
        daemon: None,
        dev_iops: DEV_IOPS,
    };
    let mut only: Option<Vec<String>> = None;
    let mut extra: Option<bool> = None;
    let mut args = std::env::args().skip(1);
    let usage = |msg: &str| -> ! {
        eprintln!("bench: {msg}\n{USAGE}");
        std::process::exit(2)
    };
    let num = |v: Option<String>, name: &str| -> f64 {
        v.and_then(|v| v.parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .unwrap_or_else(|| usage(&format!("{name} takes a positive number")))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => o.seconds = num(args.next(), "--seconds"),
            "--warmup" => o.warmup = num(args.next(), "--warmup"),
            "--rss-seconds" => o.rss_seconds = num(args.next(), "--rss-seconds"),
            "--size" => o.size = num(args.next(), "--size") as u64 * MIB,
            "--quick" => o.quick = true,
            "--keep" => o.keep = true,
            "--mirror-only" => o.mirror_only = true,
            "--daemon" => {
                let p = PathBuf::from(
                    args.next()
                        .unwrap_or_else(|| usage("--daemon takes a path")),
                );
                if !p.is_file() {
                    usage(&format!("--daemon: {} is not a file", p.display()));
                }
                o.daemon = Some(p);
            }
            "--rounds" => o.rounds = num(args.next(), "--rounds") as usize,
            "--dev-iops" => {
                o.dev_iops = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage("--dev-iops takes a whole number (0: no cap)"))
            }
            "--io-timeout" => o.io_timeout = Some(num(args.next(), "--io-timeout") as u64),
            "--daemon-arg" => o.daemon_args.push(
                args.next()
                    .unwrap_or_else(|| usage("--daemon-arg takes an argument")),
            ),
            "--workloads" => {
                let list = args
                    .next()
                    .unwrap_or_else(|| usage("--workloads takes a list"));
                let parse = |w: &str| -> Option<Workload> {
                    let mut p = w.split(':');
                    let qd: usize = p.next()?.parse().ok()?;
                    let write = match p.next()? {
                        "w" => true,
                        "r" => false,
                        _ => return None,
                    };
                    let bs: usize = p.next()?.parse().ok()?;
                    ((1..=MAX_QD).contains(&qd)
                        && (512..=SLOT).contains(&bs)
                        && bs.is_multiple_of(512))
                    .then_some(Workload { qd, write, bs })
                };
                o.workloads = Some(
                    list.split(',')
                        .map(|w| parse(w).unwrap_or_else(|| usage(&format!("bad workload '{w}'"))))
                        .collect(),
                );
            }
            "--extra" => extra = Some(true),
            "--no-extra" => extra = Some(false),
            "--out" => {
                o.out = Some(
                    args.next()
                        .map(PathBuf::from)
                        .unwrap_or_else(|| usage("--out takes a file name")),
                )
            }
            "--only" => {
                let list = args.next().unwrap_or_else(|| usage("--only takes a list"));
                let v: Vec<String> = list.split(',').map(str::to_string).collect();
                for s in &v {
                    if !SECTIONS.contains(&s.as_str()) {
                        usage(&format!("unknown section '{s}'"));
                    }
                }
                only = Some(v);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            other => usage(&format!("unknown argument '{other}'")),
        }
    }
    if o.size < 64 * MIB {
        usage("--size must be at least 64 (MiB)");
    }
    let extra = extra.unwrap_or(!o.quick);
    o.sections = only.unwrap_or_else(|| {
        let mut v: Vec<String> = ["null", "file", "file-shm", "file-dev", "nbd", "nbd-mem"]
            .map(String::from)
            .to_vec();
        if extra {
            v.extend(["memory", "resync", "resync-greedy", "resync-limited"].map(String::from));
        }
        v
    });
    o
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process killed (SIGKILL) and reaped on drop; it also dies with the bench
/// (PR_SET_PDEATHSIG), so a ^C leaves nothing behind.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let f2 = f.try_clone().expect("dup log file");
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        // SAFETY: the closure runs in the forked child before exec and only makes one system
        // call (prctl), which is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {name} ({}): {e}",
                cmd.get_program().to_string_lossy()
            )
        });
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the process's log if it has exited.
    fn check(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!(
                "{} exited ({st}); its output:\n{}",
                self.name,
                self.log_text()
            );
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_until(what: &str, limit: Duration, proc: &mut Proc, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        proc.check();
        if t0.elapsed() > limit {
            panic!(
                "timed out after {limit:?} waiting for {what}; {} output:\n{}",
                proc.name,
                proc.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The scratch directory (in /var/tmp: a real disk, not tmpfs), the daemon binary, and a
/// counter for unique names. Removed on drop.
struct Env {
    dir: PathBuf,
    bin: PathBuf,
    n: std::sync::atomic::AtomicU32,
    keep: bool,
    /// Extra arguments of every `vhost-mirror blk`.
    daemon_args: Vec<String>,
}

impl Env {
    fn new(keep: bool, daemon_args: Vec<String>, daemon: Option<PathBuf>) -> Env {
        let bin = daemon.unwrap_or_else(mirror_binary);
        let dir = PathBuf::from(format!("/var/tmp/vhm-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Env {
            dir,
            bin,
            n: std::sync::atomic::AtomicU32::new(0),
            keep,
            daemon_args,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn unique(&self, stem: &str) -> String {
        let n = self.n.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{stem}{n}")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("bench: kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `target/<profile>/vhost-mirror`, beside `target/<profile>/examples/bench`.
fn mirror_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot find the bench's own executable");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("vhost-mirror"));
    match bin {
        Some(b) if b.is_file() => b,
        _ => fail(&format!(
            "the vhost-mirror binary is not next to {} (expected ../vhost-mirror): \
             build it first with `cargo build --release`",
            exe.display()
        )),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("bench: {msg}");
    std::process::exit(1)
}

/// First line of `prog --version`, or a loud failure naming the package to install.
fn tool_version(prog: &str, package: &str) -> String {
    match Command::new(prog).arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        Ok(out) => fail(&format!(
            "`{prog} --version` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => fail(&format!(
            "{prog} is missing ({e}): this benchmark needs it as a peer; \
             install it with `apt-get install {package}`"
        )),
    }
}

/// An nbdkit server on a unix socket: the file plugin on an image, or the memory plugin.
struct Nbdkit {
    proc: Proc,
    socket: PathBuf,
    /// Plugin and its parameters.
    plugin: Vec<String>,
}

impl Nbdkit {
    fn start(env: &Env, socket: &Path, image: &Path) -> Nbdkit {
        Nbdkit::with_plugin(
            env,
            socket,
            vec!["file".into(), format!("file={}", image.display())],
        )
    }

    /// The memory plugin: a sparse RAM disk of `size` bytes inside nbdkit.
    fn memory(env: &Env, socket: &Path, size: u64) -> Nbdkit {
        Nbdkit::with_plugin(env, socket, vec!["memory".into(), format!("size={size}")])
    }

    fn with_plugin(env: &Env, socket: &Path, plugin: Vec<String>) -> Nbdkit {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new("nbdkit");
        cmd.args(["--exit-with-parent", "-f", "-U"])
            .arg(socket)
            .args(&plugin);
        let log = env.path(&format!("{}.log", env.unique("nbdkit")));
        let mut proc = Proc::spawn("nbdkit", cmd, log);
        let s = socket.to_path_buf();
        wait_until(
            "nbdkit's socket",
            Duration::from_secs(10),
            &mut proc,
            || UnixStream::connect(&s).is_ok(),
        );
        Nbdkit {
            proc,
            socket: socket.to_path_buf(),
            plugin,
        }
    }

    /// The file plugin behind nbdkit's rate filter: reads and writes each limited to `rate`
    /// bits per second (nbdkit's suffixes: `1G` is 2^30), as a link or a disk would limit them.
    fn limited(env: &Env, socket: &Path, image: &Path, rate: &str) -> Nbdkit {
        Nbdkit::with_plugin(
            env,
            socket,
            vec![
                "--filter=rate".into(),
                "file".into(),
                format!("file={}", image.display()),
                format!("rate={rate}"),
                format!("burstiness={RATE_BURST}"),
            ],
        )
    }

    fn restart(&mut self, env: &Env) {
        self.proc.kill();
        *self = Nbdkit::with_plugin(env, &self.socket.clone(), self.plugin.clone());
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

/// One vhost-user-blk server under test.
struct Target {
    label: String,
    mirror: bool,
    proc: Proc,
    socket: PathBuf,
    control: Option<PathBuf>,
    /// Processes serving this target's legs (nbdkit), whose CPU time counts with it.
    servers: Vec<u32>,
}

impl Target {
    /// The leg servers this target uses, for the CPU accounting.
    fn served_by(mut self, servers: &[&Nbdkit]) -> Target {
        self.servers = servers.iter().map(|n| n.proc.pid()).collect();
        self
    }

    /// Context switches of the daemon's threads so far.
    fn switches(&self) -> u64 {
        proc_switches(self.proc.pid())
    }

    /// CPU time used so far by the target's daemon and by its leg servers.
    fn cpu(&self) -> (Duration, Duration) {
        let servers = self.servers.iter().map(|&p| proc_cpu(p)).sum();
        (proc_cpu(self.proc.pid()), servers)
    }

    /// `vhost-mirror blk` over `legs`; with `metadata`, `vhost-mirror create --assume-clean`
    /// first, else `--no-metadata`.
    fn mirror(env: &Env, label: &str, legs: &[String], metadata: bool) -> Target {
        let name = env.unique("mirror");
        if metadata {
            let mut cmd = Command::new(&env.bin);
            cmd.arg("create").arg("--assume-clean");
            for l in legs {
                cmd.arg("--leg").arg(l);
            }
            let out = cmd.output().expect("cannot run vhost-mirror create");
            if !out.status.success() {
                panic!(
                    "vhost-mirror create failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let socket = env.path(&format!("{name}.sock"));
        let control = env.path(&format!("{name}.ctl"));
        let mut cmd = Command::new(&env.bin);
        cmd.arg("blk")
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control);
        for l in legs {
            cmd.arg("--leg").arg(l);
        }
        if !metadata {
            cmd.arg("--no-metadata");
        }
        cmd.args(&env.daemon_args);
        cmd.env("RUST_LOG", "info");
        let mut proc = Proc::spawn(label, cmd, env.path(&format!("{name}.log")));
        let s = socket.clone();
        wait_until(
            "vhost-mirror's socket",
            Duration::from_secs(30),
            &mut proc,
            || s.exists(),
        );
        Target {
            label: label.to_string(),
            mirror: true,
            proc,
            socket,
            control: Some(control),
            servers: Vec::new(),
        }
    }

    /// qemu-storage-daemon exporting the node named `disk` (the last of `blockdevs`).
    fn qsd(env: &Env, label: &str, blockdevs: &[String]) -> Target {
        let name = env.unique("qsd");
        let socket = env.path(&format!("{name}.sock"));
        let mut cmd = Command::new("qemu-storage-daemon");
        for b in blockdevs {
            cmd.arg("--blockdev").arg(b);
        }
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={},\
             writable=on,num-queues=1",
            socket.display()
        ));
        let mut proc = Proc::spawn(label, cmd, env.path(&format!("{name}.log")));
        let s = socket.clone();
        wait_until(
            "qemu-storage-daemon's socket",
            Duration::from_secs(30),
            &mut proc,
            || s.exists(),
        );
        Target {
            label: label.to_string(),
            mirror: false,
            proc,
            socket,
            control: None,
            servers: Vec::new(),
        }
    }

    fn status(&self) -> Value {
        ctl(
            self.control.as_ref().expect("not a vhost-mirror target"),
            r#"{"cmd":"status"}"#,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", self.label))
    }

    /// For vhost-mirror: a note if a leg is not up to date (it was ejected during the run,
    /// which would make the figures those of a single leg), after trying to bring it back.
    fn health(&mut self) -> String {
        self.proc.check();
        if !self.mirror {
            return String::new();
        }
        let st = self.status();
        let mut bad = Vec::new();
        for l in st["legs"].as_array().cloned().unwrap_or_default() {
            if l["state"] != "uptodate" {
                bad.push(format!(
                    "leg {} {} ({})",
                    l["index"],
                    l["state"].as_str().unwrap_or("?"),
                    l["last_error"].as_str().unwrap_or("")
                ));
            }
        }
        if bad.is_empty() {
            return String::new();
        }
        eprintln!("  !! {}: {}", self.label, bad.join("; "));
        let control = self.control.clone().unwrap();
        for i in 0..st["legs"].as_array().map_or(0, Vec::len) {
            if st["legs"][i]["state"] == "failed" {
                let _ = ctl(&control, &format!(r#"{{"cmd":"re-add","leg":{i}}}"#));
            }
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(120) {
            let st = self.status();
            let all = st["legs"]
                .as_array()
                .is_some_and(|v| v.iter().all(|l| l["state"] == "uptodate"));
            if all {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        format!("during this run: {}", bad.join("; "))
    }
}

/// One request and its answer on a vhost-mirror control socket.
fn ctl(control: &Path, req: &str) -> Result<Value, String> {
    let s = UnixStream::connect(control)
        .map_err(|e| format!("control socket {}: {e}", control.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    writeln!(&s, "{req}").map_err(|e| format!("control socket: {e}"))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("control socket: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("control socket answered {line:?}: {e}"))
}

/// VmRSS of a process, in KiB.
fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The client

/// A libblkio virtio-blk-vhost-user client with one queue and `MAX_QD` 1 MiB buffers.
struct Client {
    _blkio: Blkio,
    q: Blkioq,
    region: MemoryRegion,
    capacity: u64,
}

impl Client {
    fn connect(t: &mut Target) -> Client {
        let path = t
            .socket
            .to_str()
            .expect("socket path is not UTF-8")
            .to_string();
        let t0 = Instant::now();
        let mut blkio = loop {
            let mut b = Blkio::new("virtio-blk-vhost-user").expect("libblkio driver");
            b.set_str("path", &path).expect("libblkio path");
            match b.connect() {
                Ok(()) => break b,
                Err(e) => {
                    t.proc.check();
                    if t0.elapsed() > Duration::from_secs(10) {
                        panic!("libblkio cannot connect to {} ({path}): {e:?}", t.label);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        blkio.set_i32("num-queues", 1).expect("num-queues");
        let mut started = blkio
            .start()
            .unwrap_or_else(|e| panic!("libblkio start on {}: {e:?}", t.label));
        let q = started.queues.remove(0);
        let region = blkio
            .alloc_mem_region(MAX_QD * SLOT)
            .expect("alloc_mem_region");
        blkio.map_mem_region(&region).expect("map_mem_region");
        let capacity = blkio.get_u64("capacity").expect("capacity");
        // SAFETY: the region was just allocated for MAX_QD * SLOT bytes, is mapped and lives as
        // long as the client; no request is in flight yet.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
        let mut x = 0x1234_5678_9abc_def1u64;
        for b in bytes.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        Client {
            _blkio: blkio,
            q,
            region,
            capacity,
        }
    }
}

#[derive(Clone, Copy)]
struct Workload {
    qd: usize,
    write: bool,
    bs: usize,
}

impl Workload {
    fn name(&self) -> String {
        format!(
            "QD{} rand{} {}K",
            self.qd,
            if self.write { "write" } else { "read" },
            self.bs / 1024
        )
    }
}

/// Every completion of a run: (completion time since t0 in µs, latency in ns); failed requests
/// only counted.
struct Trace {
    done: Vec<(u32, u32)>,
    errors: u64,
}

/// User and system CPU time a process (all its threads, live and exited) has used, from
/// `/proc/PID/stat`; zero if it is gone.
fn proc_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name in parentheses may hold spaces; the fields after it are fixed.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12th and 13th after the name.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos((ticks(11) + ticks(12)) * 1_000_000_000 / hz)
}

/// Voluntary and involuntary context switches of a process's live threads, from
/// `/proc/PID/task/*/status`; zero if it is gone. Every wake-up of a sleeping thread is one,
/// and unlike CPU time the count hardly moves with the host's noise. A thread that exits
/// between two samples takes its count with it; the daemon's threads live as long as it.
fn proc_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut n = 0;
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                n += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    n
}

/// CPU time of the calling thread (the client: libblkio submits and reaps in it).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time per completed request, in µs, over a target's rounds.
#[derive(Clone, Copy, Default)]
struct CpuCost {
    daemon: f64,
    servers: f64,
    client: f64,
    /// The daemon's context switches per request.
    switches: f64,
    /// Requests completed over the rounds, warm-up included.
    requests: u64,
}

/// CPU time summed over rounds, and the requests completed in them.
#[derive(Default)]
struct CpuAcc {
    daemon: Duration,
    servers: Duration,
    client: Duration,
    switches: u64,
    requests: u64,
}

impl CpuAcc {
    fn per_request(&self) -> Option<CpuCost> {
        if self.requests == 0 {
            return None;
        }
        let us = |d: Duration| d.as_secs_f64() * 1e6 / self.requests as f64;
        Some(CpuCost {
            daemon: us(self.daemon),
            servers: us(self.servers),
            client: us(self.client),
            switches: self.switches as f64 / self.requests as f64,
            requests: self.requests,
        })
    }
}

/// Keeps `w.qd` requests in flight at random `w.bs`-aligned offsets below `ws` until
/// `going(elapsed since t0)` says stop, then waits for the last ones.
fn drive(
    c: &mut Client,
    w: Workload,
    ws: u64,
    seed: u64,
    t0: Instant,
    mut going: impl FnMut(Duration) -> bool,
) -> Trace {
    assert!(w.qd <= MAX_QD && w.bs <= SLOT);
    let blocks = ws / w.bs as u64;
    let mut rng = seed | 1;
    let mut submitted: Vec<Option<Instant>> = vec![None; w.qd];
    let mut comps: Vec<MaybeUninit<blkio::Completion>> =
        (0..MAX_QD).map(|_| MaybeUninit::uninit()).collect();
    let mut trace = Trace {
        done: Vec::with_capacity(1 << 20),
        errors: 0,
    };
    let mut inflight = 0usize;
    loop {
        let now = Instant::now();
        if going(now - t0) {
            for (slot, sub) in submitted.iter_mut().enumerate() {
                if sub.is_some() {
                    continue;
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let off = (rng % blocks) * w.bs as u64;
                let buf = (c.region.addr + slot * SLOT) as *mut u8;
                if w.write {
                    c.q.write(off, buf, w.bs, slot, ReqFlags::empty());
                } else {
                    c.q.read(off, buf, w.bs, slot, ReqFlags::empty());
                }
                *sub = Some(now);
                inflight += 1;
            }
        } else if inflight == 0 {
            break;
        }
        let mut timeout = Duration::from_secs(60);
        let n = match c.q.do_io(&mut comps, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) => panic!("do_io failed ({inflight} requests in flight): {e:?}"),
        };
        let end = Instant::now();
        let at = (end - t0).as_micros().min(u32::MAX as u128) as u32;
        for comp in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let comp = unsafe { comp.assume_init_ref() };
            let sub = submitted[comp.user_data]
                .take()
                .expect("completion for an idle slot");
            inflight -= 1;
            if comp.ret == 0 {
                let ns = (end - sub).as_nanos().min(u32::MAX as u128) as u32;
                trace.done.push((at, ns));
            } else {
                trace.errors += 1;
            }
        }
    }
    trace
}

/// Writes one 4 KiB block in every MiB of the working set (vhost-mirror's default chunk), 32
/// at a time.
fn touch_chunks(c: &mut Client, ws: u64) {
    let n = ws / MIB;
    let mut comps: Vec<MaybeUninit<blkio::Completion>> =
        (0..MAX_QD).map(|_| MaybeUninit::uninit()).collect();
    let (mut next, mut inflight) = (0u64, 0usize);
    while next < n || inflight > 0 {
        while next < n && inflight < MAX_QD {
            let buf = (c.region.addr + inflight * SLOT) as *mut u8;
            c.q.write(next * MIB, buf, 4096, 0, ReqFlags::empty());
            next += 1;
            inflight += 1;
        }
        let mut timeout = Duration::from_secs(60);
        match c.q.do_io(&mut comps, 1, Some(&mut timeout), None) {
            Ok(k) => inflight -= k,
            Err(e) => panic!("do_io failed while touching the chunks: {e:?}"),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Stats {
    /// With rounds: the median of the rounds' IOPS.
    iops: f64,
    /// Lowest and highest IOPS of the rounds.
    iops_min: f64,
    iops_max: f64,
    mibs: f64,
    p50: f64,
    p99: f64,
    n: usize,
}

/// Figures for completions between `from` and `to` (since t0).
fn window(trace: &Trace, from: Duration, to: Duration, bs: usize) -> Stats {
    let lat = window_lat(trace, from, to);
    let secs = (to - from).as_secs_f64();
    if secs <= 0.0 {
        return Stats::default();
    }
    let iops = lat.len() as f64 / secs;
    stats_of(lat, &[iops], bs)
}

/// Latencies (ns) of the completions between `from` and `to`.
fn window_lat(trace: &Trace, from: Duration, to: Duration) -> Vec<u32> {
    let (a, b) = (from.as_micros() as u32, to.as_micros() as u32);
    trace
        .done
        .iter()
        .filter(|(at, _)| *at >= a && *at < b)
        .map(|(_, ns)| *ns)
        .collect()
}

/// Figures over the latencies of every round and the rounds' IOPS (median, min, max).
fn stats_of(mut lat: Vec<u32>, rounds_iops: &[f64], bs: usize) -> Stats {
    if lat.is_empty() || rounds_iops.is_empty() {
        return Stats::default();
    }
    lat.sort_unstable();
    let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)] as f64 / 1000.0;
    let mut v = rounds_iops.to_vec();
    v.sort_by(f64::total_cmp);
    let iops = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    Stats {
        iops,
        iops_min: v[0],
        iops_max: v[v.len() - 1],
        mibs: iops * bs as f64 / MIB as f64,
        p50: pct(50),
        p99: pct(99),
        n: lat.len(),
    }
}

// ---------------------------------------------------------------------------------------------
// Configurations

struct Row {
    workload: Workload,
    target: String,
    mirror: bool,
    stats: Stats,
    /// CPU per request of the daemon, its leg servers and the client.
    cpu: Option<CpuCost>,
    note: String,
}

fn workloads(quick: bool) -> Vec<Workload> {
    if quick {
        return vec![
            Workload {
                qd: 32,
                write: true,
                bs: 4096,
            },
            Workload {
                qd: 1,
                write: true,
                bs: 4096,
            },
        ];
    }
    let mut v = Vec::new();
    for qd in [1, 32] {
        for write in [true, false] {
            for bs in [4096, 65536] {
                v.push(Workload { qd, write, bs });
            }
        }
    }
    v
}

/// Runs every workload on every target, back to back; prints each row as it comes.
fn measure(opts: &Opts, targets: &mut Vec<Target>, ws_limit: u64) -> Vec<Row> {
    if opts.mirror_only {
        targets.retain(|t| t.mirror);
    }
    let mut clients: Vec<Client> = targets.iter_mut().map(Client::connect).collect();
    let cap = clients.iter().map(|c| c.capacity).min().unwrap_or(0);
    let ws = cap.min(ws_limit) / SLOT as u64 * SLOT as u64;
    println!("  working set {} MiB (capacities: {})", ws / MIB, {
        let v: Vec<String> = clients
            .iter()
            .zip(targets.iter())
            .map(|(c, t)| format!("{} {} MiB", t.label, c.capacity / MIB))
            .collect();
        v.join(", ")
    });
    let warm = Duration::from_secs_f64(opts.warmup);
    let dur = Duration::from_secs_f64(opts.seconds);
    let mut rows = Vec::new();
    let list = opts
        .workloads
        .clone()
        .unwrap_or_else(|| workloads(opts.quick));
    for (wi, w) in list.into_iter().enumerate() {
        // Per target: latencies of every round, each round's IOPS, errors, notes.
        let mut acc: Vec<(Vec<u32>, Vec<f64>, u64, String)> =
            targets.iter().map(|_| Default::default()).collect();
        let mut cpu: Vec<CpuAcc> = targets.iter().map(|_| CpuAcc::default()).collect();
        // The targets take turns round by round, so a burst of load from elsewhere hits one
        // round of each rather than all rounds of one.
        for round in 0..opts.rounds {
            for (ti, (t, c)) in targets.iter_mut().zip(clients.iter_mut()).enumerate() {
                if w.write {
                    // Steady state for vhost-mirror's write-intent bitmap: every chunk of the
                    // working set written recently, as a guest's hot data is. The bits are
                    // cleared two sweeps (2 s apart) after the last write to a chunk, which
                    // happens while the other targets take their turn. Done for every target
                    // alike, before every round.
                    touch_chunks(c, ws);
                }
                let t0 = Instant::now();
                let seed = 0x9e37_79b9 + (wi * 16 + round) as u64;
                let (d0, s0, c0, x0) = {
                    let (d, s) = t.cpu();
                    (d, s, thread_cpu(), t.switches())
                };
                let trace = drive(c, w, ws, seed, t0, |e| e < warm + dur);
                let (d1, s1) = t.cpu();
                let k = &mut cpu[ti];
                k.daemon += d1.saturating_sub(d0);
                k.servers += s1.saturating_sub(s0);
                k.client += thread_cpu().saturating_sub(c0);
                k.switches += t.switches().saturating_sub(x0);
                k.requests += trace.done.len() as u64;
                let lat = window_lat(&trace, warm, warm + dur);
                let a = &mut acc[ti];
                a.1.push(lat.len() as f64 / dur.as_secs_f64());
                a.0.extend(lat);
                a.2 += trace.errors;
                let note = t.health();
                if !note.is_empty() && a.3.is_empty() {
                    a.3 = note;
                }
            }
        }
        for (((t, _), (lat, iops, errors, mut note)), cpu) in
            targets.iter_mut().zip(clients.iter()).zip(acc).zip(cpu)
        {
            let stats = stats_of(lat, &iops, w.bs);
            let cpu = cpu.per_request();
            let cpu_note = cpu.map_or(String::new(), |c| {
                format!(
                    "  cpu/req {:.2}+{:.2}+{:.2} µs, daemon {:.2} switches/req over {} requests",
                    c.daemon, c.servers, c.client, c.switches, c.requests
                )
            });
            if errors > 0 {
                note = format!("{errors} I/O errors. {note}");
            }
            println!(
                "  {:<18} {:<44} {:>9.0} IOPS ({:.0}–{:.0}) {:>8.1} MiB/s  p50 {:>8.1} µs  p99 {:>8.1} µs{cpu_note} {note}",
                w.name(),
                t.label,
                stats.iops,
                stats.iops_min,
                stats.iops_max,
                stats.mibs,
                stats.p50,
                stats.p99
            );
            rows.push(Row {
                workload: w,
                target: t.label.clone(),
                mirror: t.mirror,
                stats,
                cpu,
                note,
            });
        }
    }
    rows
}

/// The markdown table: per workload, vhost-mirror's row and each peer with the ratios.
fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(
        "| workload | target | IOPS (median) | rounds' range | MiB/s | p50 µs | p99 µs | \
         vhost-mirror IOPS ÷ this | vhost-mirror p50 ÷ this (QD1) | CPU µs per request: \
         daemon + leg servers + client |\n",
    );
    s.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    let mut i = 0;
    while i < rows.len() {
        let w = rows[i].workload.name();
        let group: Vec<&Row> = rows[i..]
            .iter()
            .take_while(|r| r.workload.name() == w)
            .collect();
        i += group.len();
        let mirror = group.iter().find(|r| r.mirror).map(|r| r.stats);
        for r in &group {
            let (ri, rp) = match (mirror, r.mirror) {
                (Some(m), false) => {
                    let ri = if r.stats.iops > 0.0 {
                        format!("{:.2}×", m.iops / r.stats.iops)
                    } else {
                        "–".into()
                    };
                    let rp = if r.workload.qd == 1 && r.stats.p50 > 0.0 {
                        format!("{:.2}×", m.p50 / r.stats.p50)
                    } else {
                        String::new()
                    };
                    (ri, rp)
                }
                _ => (String::new(), String::new()),
            };
            let target = if r.note.is_empty() {
                r.target.clone()
            } else {
                format!("{} ⚠ {}", r.target, r.note)
            };
            let cpu = match r.cpu {
                Some(c) if c.servers > 0.0 => format!(
                    "{:.2} + {:.2} + {:.2} = {:.2}",
                    c.daemon,
                    c.servers,
                    c.client,
                    c.daemon + c.servers + c.client
                ),
                Some(c) => format!(
                    "{:.2} + – + {:.2} = {:.2}",
                    c.daemon,
                    c.client,
                    c.daemon + c.client
                ),
                None => String::new(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0}–{:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
                w,
                target,
                r.stats.iops,
                r.stats.iops_min,
                r.stats.iops_max,
                r.stats.mibs,
                r.stats.p50,
                r.stats.p99,
                ri,
                rp,
                cpu
            );
        }
    }
    s
}

/// Warnings the vhost-mirror daemons logged (e.g. a file leg falling back to buffered I/O).
fn mirror_warnings(targets: &[Target]) -> String {
    let mut s = String::new();
    for t in targets.iter().filter(|t| t.mirror) {
        for l in t.proc.log_text().lines() {
            // The bench's own client leaving at the end of the section is expected.
            let expected = l.contains("frontend connection ended");
            if (l.contains("WARN") || l.contains("ERROR")) && !expected {
                let _ = writeln!(s, "- {} logged: `{}`", t.label, l.trim());
            }
        }
    }
    s
}

/// A leg image of `size` bytes with every block written, so reads hit allocated blocks.
fn image(path: &Path, size: u64) {
    let mut f = std::fs::File::create(path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    let chunk = vec![0u8; 4 * MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        left -= n as u64;
    }
    f.sync_all().expect("fsync image");
}

fn section(title: &str, setup: &str, rows: &[Row], warnings: &str) -> String {
    let mut s = format!("### {title}\n\n{setup}\n\n{}", table(rows));
    if !warnings.is_empty() {
        s.push('\n');
        s.push_str(warnings);
    }
    s.push('\n');
    s
}

fn null_section(env: &Env, opts: &Opts) -> String {
    println!("\n== null legs ==");
    let size = opts.size;
    let mut targets = vec![
        Target::mirror(
            env,
            "vhost-mirror (2 null legs)",
            &[format!("null:{size}"), format!("null:{size}")],
            false,
        ),
        Target::qsd(
            env,
            "qsd null-co",
            &[format!(
                "driver=null-co,node-name=disk,size={size},read-zeroes=on"
            )],
        ),
    ];
    let rows = measure(opts, &mut targets, size);
    let warn = mirror_warnings(&targets);
    section(
        "a. Null legs: the pipeline alone",
        &format!(
            "vhost-mirror `blk --no-metadata --leg null:{size} --leg null:{size}` vs \
             qsd `--blockdev driver=null-co,size={size},read-zeroes=on` (one null device)."
        ),
        &rows,
        &warn,
    )
}

/// qsd's node for `img` with `driver` (`file`, or `host_device` for a block device) and `aio`.
fn file_node(name: &str, driver: &str, img: &Path, aio: &str) -> String {
    format!(
        "driver={driver},node-name={name},filename={},cache.direct=on,aio={aio},locking=off",
        img.display()
    )
}

fn file_section(env: &Env, opts: &Opts, imgs: &[PathBuf; 3]) -> String {
    file_legs(
        env,
        opts,
        imgs,
        "file",
        "b. Two file legs (O_DIRECT, fully written images on the root ext4)",
        "Both images sit on the same virtual disk, so a mirrored write costs that disk two \
         writes.",
    )
}

/// Three fully written images in a directory of /dev/shm that goes with them.
struct ShmImages {
    dir: PathBuf,
    imgs: [PathBuf; 3],
}

impl ShmImages {
    fn new(tag: &str, size: u64) -> ShmImages {
        let dir = PathBuf::from(format!("/dev/shm/vhm-bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        // Removed on drop from here on, even if writing them fails: RAM, not disk.
        let imgs = ShmImages {
            imgs: [0, 1, 2].map(|i| dir.join(format!("leg{i}.img"))),
            dir,
        };
        for p in &imgs.imgs {
            image(p, size);
        }
        imgs
    }
}

impl Drop for ShmImages {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The same with both images in /dev/shm (tmpfs, which takes O_DIRECT since Linux 6.6): no
/// disk under the legs, so what is left is the software path.
fn file_shm_section(env: &Env, opts: &Opts, _imgs: &[PathBuf; 3]) -> String {
    let shm = ShmImages::new("shm", opts.size + META_ROOM);
    file_legs(
        env,
        opts,
        &shm.imgs,
        "file",
        "b2. Two file legs on tmpfs (O_DIRECT, images in /dev/shm)",
        "The images live in RAM (tmpfs honours O_DIRECT since Linux 6.6): no disk behind the \
         legs, so this shows the cost of the software path itself.",
    )
}

/// What the `file-dev` section caps each leg's device at, each way: the order of a provisioned
/// cloud block volume, and well under what the two vCPUs can drive (the same devices uncapped
/// take 95 k mirrored 4K writes a second), so the device rather than the shared CPUs is the
/// limit, as it is when every leg is a disk of its own.
const DEV_IOPS: u64 = 16_000;
const DEV_BPS: u64 = 1_000_000_000;

/// The same legs as `file-shm`, each behind a loop device of its own (direct I/O to its tmpfs
/// image, served by the device's own kernel worker) that the kernel's block throttle caps at
/// [`DEV_IOPS`] and [`DEV_BPS`] for reads and writes each: every leg its own device with its
/// own limit, as in a deployment, where the two file sections share one disk (b) or the CPUs
/// (b2).
fn file_dev_section(env: &Env, opts: &Opts, _imgs: &[PathBuf; 3]) -> String {
    const TITLE: &str = "b3. Two file legs on devices of their own, IOPS- and bandwidth-capped";
    let shm = ShmImages::new("dev", opts.size + META_ROOM);
    let iops = opts.dev_iops;
    let devs = match CappedDevices::new(&shm.imgs, iops, DEV_BPS) {
        Ok(devs) => devs,
        Err(e) => {
            println!("\n== {TITLE}: skipped: {e} ==");
            return format!("### {TITLE}\n\nSkipped: {e}.\n\n");
        }
    };
    let cap = match &devs.throttle {
        Some(t) => format!(
            "and the kernel's block throttle ({}) caps every device at {iops} reads and {iops} \
             writes a second and {} MB/s each way, the order of a provisioned cloud block \
             volume. Every leg is a device with its own limit, as in a deployment; the bench \
             and every daemon run in that cgroup, one target at a time.",
            t.how,
            DEV_BPS / 1_000_000
        ),
        None => "with no cap (`--dev-iops 0`): the devices' kernel workers share the two vCPUs \
                 with everything else."
            .into(),
    };
    let paths: [PathBuf; 3] = std::array::from_fn(|i| devs.devs[i].clone());
    file_legs(
        env,
        opts,
        &paths,
        "host_device",
        TITLE,
        &format!(
            "Each image (in /dev/shm) is behind a loop device of its own (`losetup \
             --direct-io=on`: the device's kernel worker does the image's I/O; its CPU time is \
             not in the table's CPU per request), {cap}"
        ),
    )
}

/// Loop devices over images, capped by a block-throttle cgroup that this process (and so every
/// daemon it starts meanwhile) is in until drop: cgroup v1's blkio controller, or v2's io
/// controller. Drop detaches whatever was set up, also after a failure half-way.
struct CappedDevices {
    devs: Vec<PathBuf>,
    /// None for no cap.
    throttle: Option<Throttle>,
}

/// A block-throttle cgroup this process is in.
struct Throttle {
    group: PathBuf,
    /// The cgroup this process left for it, to go back to.
    was_in: PathBuf,
    /// Which controller does it, for the report.
    how: &'static str,
}

impl CappedDevices {
    fn new(imgs: &[PathBuf; 3], iops: u64, bps: u64) -> Result<CappedDevices, String> {
        let mut capped = CappedDevices {
            devs: Vec::new(),
            throttle: None,
        };
        for img in imgs {
            capped.devs.push(loop_device(img)?);
        }
        if iops > 0 {
            capped.throttle = Some(throttle_group(&capped.devs, iops, bps)?);
        }
        Ok(capped)
    }
}

impl Drop for CappedDevices {
    fn drop(&mut self) {
        if let Some(t) = &self.throttle {
            let me = std::process::id().to_string();
            if let Err(e) = std::fs::write(t.was_in.join("cgroup.procs"), &me) {
                eprintln!("cannot leave {}: {e}", t.group.display());
            }
            // The daemons of the section are gone by now; a cgroup still busy is left behind.
            if let Err(e) = std::fs::remove_dir(&t.group) {
                eprintln!("cannot remove {}: {e}", t.group.display());
            }
        }
        for d in &self.devs {
            if let Err(e) = Command::new("losetup").arg("-d").arg(d).status() {
                eprintln!("cannot detach {}: {e}", d.display());
            }
        }
    }
}

/// A new loop device over `img` with direct I/O, so the device's worker reads and writes the
/// image itself rather than through a second page cache; an error if the kernel fell back to
/// buffered I/O (the section would then measure the page cache).
fn loop_device(img: &Path) -> Result<PathBuf, String> {
    let out = Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(img)
        .output()
        .map_err(|e| format!("cannot run losetup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup {} failed: {}",
            img.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let name = dev.file_name().map(|n| n.to_string_lossy().into_owned());
    let dio = name.and_then(|n| std::fs::read_to_string(format!("/sys/block/{n}/loop/dio")).ok());
    if dio.as_deref().map(str::trim) != Some("1") {
        let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        return Err(format!(
            "{} took no direct I/O over {}",
            dev.display(),
            img.display()
        ));
    }
    Ok(dev)
}

/// A new cgroup capping every device in `devs` at `iops` and `bps` each way, with this process
/// moved into it.
fn throttle_group(devs: &[PathBuf], iops: u64, bps: u64) -> Result<Throttle, String> {
    use std::os::unix::fs::MetadataExt;
    let mut numbers = Vec::new();
    for d in devs {
        let rdev = std::fs::metadata(d)
            .map_err(|e| format!("{}: {e}", d.display()))?
            .rdev();
        numbers.push(format!("{}:{}", libc::major(rdev), libc::minor(rdev)));
    }
    let name = format!("vhm-bench-{}", std::process::id());
    let write = |f: PathBuf, v: &str| {
        std::fs::write(&f, v).map_err(|e| format!("cannot write {v:?} to {}: {e}", f.display()))
    };
    let v1 = PathBuf::from("/sys/fs/cgroup/blkio");
    let v2 = PathBuf::from("/sys/fs/cgroup");
    let (root, how) = if v1.join("blkio.throttle.write_iops_device").exists() {
        (v1, "cgroup v1 `blkio.throttle.*_device`")
    } else if std::fs::read_to_string(v2.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "io"))
    {
        write(v2.join("cgroup.subtree_control"), "+io")?;
        (v2, "cgroup v2 `io.max`")
    } else {
        return Err("no block throttle: neither cgroup v1 blkio nor v2 io is available".into());
    };
    // Where this process is now, to go back to: "N:blkio:/PATH" (v1) or "0::/PATH" (v2).
    let v1 = root.ends_with("blkio");
    let mine = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let now = mine
        .lines()
        .filter_map(|l| l.split_once(':').and_then(|(_, rest)| rest.split_once(':')))
        .find(|(c, _)| {
            if v1 {
                c.split(',').any(|x| x == "blkio")
            } else {
                c.is_empty()
            }
        })
        .map(|(_, p)| root.join(p.trim_start_matches('/')))
        .unwrap_or_else(|| root.clone());
    let group = root.join(&name);
    std::fs::create_dir_all(&group)
        .map_err(|e| format!("cannot create {}: {e}", group.display()))?;
    let limits = || -> Result<(), String> {
        for n in &numbers {
            if v1 {
                for (file, v) in [
                    ("blkio.throttle.read_iops_device", iops),
                    ("blkio.throttle.write_iops_device", iops),
                    ("blkio.throttle.read_bps_device", bps),
                    ("blkio.throttle.write_bps_device", bps),
                ] {
                    write(group.join(file), &format!("{n} {v}"))?;
                }
            } else {
                let line = format!("{n} rbps={bps} wbps={bps} riops={iops} wiops={iops}");
                write(group.join("io.max"), &line)?;
            }
        }
        write(group.join("cgroup.procs"), &std::process::id().to_string())
    };
    match limits() {
        Ok(()) => Ok(Throttle {
            group,
            was_in: now,
            how,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir(&group);
            Err(e)
        }
    }
}

/// The file-leg configuration over `imgs` (files, or block devices with `driver` `host_device`).
fn file_legs(
    env: &Env,
    opts: &Opts,
    imgs: &[PathBuf; 3],
    driver: &str,
    title: &str,
    place: &str,
) -> String {
    println!("\n== {title} ==");
    // The mirror gets the first two images; the third is qsd's single file.
    let legs: Vec<String> = imgs[..2]
        .iter()
        .map(|p| format!("file:{}", p.display()))
        .collect();
    let mut targets = vec![
        Target::mirror(env, "vhost-mirror (2 file legs)", &legs, true),
        Target::qsd(
            env,
            "qsd file (aio=native)",
            &[file_node("disk", driver, &imgs[2], "native")],
        ),
        Target::qsd(
            env,
            "qsd file (aio=io_uring)",
            &[file_node("disk", driver, &imgs[2], "io_uring")],
        ),
        Target::qsd(
            env,
            "qsd quorum over both files (native)",
            &[
                file_node("f0", driver, &imgs[0], "native"),
                file_node("f1", driver, &imgs[1], "native"),
                "driver=quorum,node-name=disk,vote-threshold=2,children.0=f0,children.1=f1,\
                 read-pattern=fifo"
                    .to_string(),
            ],
        ),
    ];
    let rows = measure(opts, &mut targets, opts.size);
    let warn = mirror_warnings(&targets);
    // Images by their names (the scratch directory's path says nothing), devices in full.
    let shown = |p: &Path| match (driver, p.file_name()) {
        ("file", Some(n)) => n.to_string_lossy().into_owned(),
        _ => p.display().to_string(),
    };
    section(
        title,
        &format!(
            "vhost-mirror `blk --leg file:{} --leg file:{}` after `create --assume-clean` \
             (metadata on), both legs io_uring + O_DIRECT, reads `least-outstanding` over both \
             legs; vs qsd exporting a third {} of the same kind alone (so the mirrored pair \
             stays identical) with `driver={driver},cache.direct=on` and `aio=native` or \
             `aio=io_uring`, and vs qsd `driver=quorum,vote-threshold=2,read-pattern=fifo` over \
             both (`aio=native`): the same two writes per guest write as vhost-mirror. {place} \
             Images: {} MiB each, every block written beforehand.",
            shown(&imgs[0]),
            shown(&imgs[1]),
            if driver == "file" { "image" } else { "device" },
            (opts.size + META_ROOM) / MIB
        ),
        &rows,
        &warn,
    )
}

fn nbd_section(env: &Env, opts: &Opts, imgs: &[PathBuf; 3]) -> String {
    // The single-leg peer writes a third image of its own, so the two mirrored images stay
    // identical and quorum's comparing reads find no mismatch.
    let nbd = [
        Nbdkit::start(env, &env.path("nbd0.sock"), &imgs[0]),
        Nbdkit::start(env, &env.path("nbd1.sock"), &imgs[1]),
        Nbdkit::start(env, &env.path("nbd2.sock"), &imgs[2]),
    ];
    nbd_legs(
        env,
        opts,
        nbd,
        true,
        "c. Two NBD legs (nbdkit file plugin on unix sockets)",
        "Two `nbdkit -U SOCK file file=legN.img` servers (default options: page cache, 16 \
         threads) over the same two images as (b).",
    )
}

/// The same with nbdkit's memory plugin: servers that cost little, so the clients show.
fn nbd_mem_section(env: &Env, opts: &Opts, _imgs: &[PathBuf; 3]) -> String {
    let size = opts.size + META_ROOM;
    let nbd = [
        Nbdkit::memory(env, &env.path("nbdm0.sock"), size),
        Nbdkit::memory(env, &env.path("nbdm1.sock"), size),
        Nbdkit::memory(env, &env.path("nbdm2.sock"), size),
    ];
    nbd_legs(
        env,
        opts,
        nbd,
        false,
        "c2. Two NBD legs (nbdkit memory plugin on unix sockets)",
        &format!(
            "Two `nbdkit -U SOCK memory size={size}` servers: a RAM disk inside each server, no \
             file system, so the servers cost far less CPU than in (c) and the NBD clients' own \
             cost shows."
        ),
    )
}

fn nbd_legs(
    env: &Env,
    opts: &Opts,
    nbd: [Nbdkit; 3],
    all_quorum: bool,
    title: &str,
    servers: &str,
) -> String {
    println!("\n== {title} ==");
    let uris: Vec<String> = nbd[..2].iter().map(Nbdkit::uri).collect();
    let node = |name: &str, n: &Nbdkit| {
        format!(
            "driver=nbd,node-name={name},server.type=unix,server.path={}",
            n.socket.display()
        )
    };
    let quorum = |pattern: &str| {
        vec![
            node("q0", &nbd[0]),
            node("q1", &nbd[1]),
            format!(
                "driver=quorum,node-name=disk,vote-threshold=2,children.0=q0,children.1=q1,\
                 read-pattern={pattern}"
            ),
        ]
    };
    let pair = [&nbd[0], &nbd[1]];
    let mut targets = vec![
        Target::mirror(env, "vhost-mirror (2 NBD legs)", &uris, true).served_by(&pair),
        Target::qsd(env, "qsd nbd (1 leg, no mirror)", &[node("disk", &nbd[2])])
            .served_by(&[&nbd[2]]),
        Target::qsd(env, "qsd quorum vt=2 read-pattern=fifo", &quorum("fifo")).served_by(&pair),
    ];
    if all_quorum {
        targets.push(
            Target::qsd(
                env,
                "qsd quorum vt=2 read-pattern=quorum",
                &quorum("quorum"),
            )
            .served_by(&pair),
        );
    }
    let rows = measure(opts, &mut targets, opts.size);
    let warn = mirror_warnings(&targets);
    drop(targets);
    drop(nbd);
    section(
        title,
        &format!(
            "{servers} vhost-mirror `blk --leg nbd+unix:///?socket=nbd0.sock --leg \
             nbd+unix:///?socket=nbd1.sock` after `create --assume-clean`; qsd \
             `driver=nbd,server.type=unix` on one leg alone (a third server of the same kind, \
             so the mirrored pair stays identical; no redundancy: the floor); qsd \
             `driver=quorum,vote-threshold=2,children.0=q0,children.1=q1` over both legs with \
             `read-pattern=fifo` (reads from child 0){}.",
            if all_quorum {
                " and with the default `read-pattern=quorum` (every read goes to both children \
                 and is compared)"
            } else {
                ""
            }
        ),
        &rows,
        &warn,
    )
}

/// Samples `pid`'s VmRSS every second while a sustained QD32 4K random write runs.
fn rss_run(opts: &Opts, t: &mut Target) -> (String, String) {
    let mut c = Client::connect(t);
    let ws = c.capacity.min(opts.size) / SLOT as u64 * SLOT as u64;
    let pid = t.proc.pid();
    let idle = vm_rss_kib(pid).unwrap_or(0);
    let w = Workload {
        qd: 32,
        write: true,
        bs: 4096,
    };
    let total = Duration::from_secs_f64(opts.rss_seconds);
    let samples = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let trace = std::thread::scope(|s| {
        s.spawn(|| {
            let mut next = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                if t0.elapsed() >= next {
                    if let Some(kib) = vm_rss_kib(pid) {
                        samples.lock().unwrap().push((t0.elapsed(), kib));
                    }
                    next += Duration::from_secs(1);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let trace = drive(&mut c, w, ws, 7, t0, |e| e < total);
        stop.store(true, Ordering::Relaxed);
        trace
    });
    let note = t.health();
    std::thread::sleep(Duration::from_secs(2));
    let after = vm_rss_kib(pid).unwrap_or(0);
    let samples = samples.into_inner().unwrap();
    let st = window(&trace, Duration::ZERO, total, w.bs);
    let mib = |k: u64| k as f64 / 1024.0;
    let first = samples.first().map_or(0, |s| s.1);
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let at = |secs: f64| {
        samples
            .iter()
            .min_by_key(|(t, _)| ((t.as_secs_f64() - secs).abs() * 1000.0) as u64)
            .map_or(0, |s| s.1)
    };
    let mid = at(opts.rss_seconds / 2.0);
    let last = samples.last().map_or(0, |s| s.1);
    println!(
        "  {:<40} idle {:.1} MiB, 1st s {:.1}, mid-run {:.1}, end {:.1}, max {:.1}, 2 s after {:.1} MiB \
         ({} writes, {:.0} IOPS, {} errors) {note}",
        t.label,
        mib(idle),
        mib(first),
        mib(mid),
        mib(last),
        mib(max),
        mib(after),
        st.n,
        st.iops,
        trace.errors
    );
    let timeline: Vec<String> = samples.iter().map(|s| format!("{:.1}", mib(s.1))).collect();
    let timeline = format!(
        "- {}: VmRSS in MiB, one sample per second: {}\n",
        t.label,
        timeline.join(" ")
    );
    let row = format!(
        "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.0} |{}\n",
        t.label,
        mib(idle),
        mib(first),
        mib(mid),
        mib(last),
        mib(max),
        mib(after),
        st.n,
        st.iops,
        if note.is_empty() {
            String::new()
        } else {
            format!(" ⚠ {note}")
        }
    );
    (row, timeline)
}

fn memory_section(env: &Env, opts: &Opts, imgs: &[PathBuf; 3]) -> String {
    println!("\n== resident memory over a sustained run ==");
    let nbd = [
        Nbdkit::start(env, &env.path("nbd0.sock"), &imgs[0]),
        Nbdkit::start(env, &env.path("nbd1.sock"), &imgs[1]),
    ];
    let uris: Vec<String> = nbd.iter().map(Nbdkit::uri).collect();
    let mut rows = String::new();
    let mut timelines = String::new();
    {
        let mut t = Target::mirror(env, "vhost-mirror (2 NBD legs)", &uris, true);
        let (r, tl) = rss_run(opts, &mut t);
        rows.push_str(&r);
        timelines.push_str(&tl);
    }
    {
        let node = |name: &str, n: &Nbdkit| {
            format!(
                "driver=nbd,node-name={name},server.type=unix,server.path={}",
                n.socket.display()
            )
        };
        let mut t = Target::qsd(
            env,
            "qsd quorum vt=2 (same legs)",
            &[
                node("q0", &nbd[0]),
                node("q1", &nbd[1]),
                "driver=quorum,node-name=disk,vote-threshold=2,children.0=q0,children.1=q1,\
                 read-pattern=fifo"
                    .to_string(),
            ],
        );
        let (r, tl) = rss_run(opts, &mut t);
        rows.push_str(&r);
        timelines.push_str(&tl);
    }
    format!(
        "### Resident memory (VmRSS) over a sustained run\n\n\
         Each daemon fresh on the two NBD legs; VmRSS from /proc/PID/status sampled every \
         second through {:.0} s of QD32 4K random writes over {} MiB, then 2 s after the run.\n\n\
         | daemon | idle MiB | after 1 s | mid-run | end of run | max | 2 s after | writes | IOPS |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n{rows}\n{timelines}\n",
        opts.rss_seconds,
        opts.size / MIB
    )
}

/// What the controller thread saw during the resync run.
#[derive(Default)]
struct ResyncLog {
    events: Vec<(Duration, String)>,
    killed: Option<Duration>,
    failed: Option<Duration>,
    restarted: Option<Duration>,
    resync_first: Option<Duration>,
    resync_last: Option<Duration>,
    done: Option<Duration>,
    total_bytes: u64,
    last_rate: u64,
    dirty_at_readd: u64,
    /// Status polls during the resync, and how many of them said it was yielding to the guest.
    polls: u32,
    yielding: u32,
}

fn resync_section(env: &Env, opts: &Opts, imgs: &[PathBuf; 3]) -> String {
    resync_run(env, opts, imgs, true)
}

/// The same with `--resync-busy-rate 0`: a resync that does not slow down for the guest, which
/// shows what yielding buys it.
fn resync_greedy_section(env: &Env, opts: &Opts, imgs: &[PathBuf; 3]) -> String {
    resync_run(env, opts, imgs, false)
}

/// Resync under load, no rate cap; `yields`: at the daemon's default busy rate (and then also
/// the resync with the client idle and a leg's own bandwidth), else never slowing down.
fn resync_run(env: &Env, opts: &Opts, imgs: &[PathBuf; 3], yields: bool) -> String {
    println!("\n== resync under load ({}) ==", resync_mode(yields));
    let mut nbd = [
        Nbdkit::start(env, &env.path("nbd0.sock"), &imgs[0]),
        Nbdkit::start(env, &env.path("nbd1.sock"), &imgs[1]),
    ];
    let uris: Vec<String> = nbd.iter().map(Nbdkit::uri).collect();
    let mut t = Target::mirror(env, "vhost-mirror (2 NBD legs)", &uris, true);
    let mut c = Client::connect(&mut t);
    let ws = c.capacity.min(opts.size) / SLOT as u64 * SLOT as u64;
    let control = t.control.clone().unwrap();
    if !yields {
        ctl(&control, r#"{"cmd":"set-resync-busy-rate","rate":0}"#)
            .unwrap_or_else(|e| panic!("set-resync-busy-rate: {e}"));
    }
    let w = Workload {
        qd: 32,
        write: true,
        bs: 4096,
    };
    let warm = Duration::from_secs_f64(opts.warmup);
    let steady = Duration::from_secs(5);
    let degraded = Duration::from_secs(3);
    let after = Duration::from_secs(2);
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let (trace, log) = std::thread::scope(|s| {
        let nbd1 = &mut nbd[1];
        let stop = &stop;
        let control = &control;
        let client = &mut c;
        // The client runs on its own thread and the controller on this one: a process started
        // with PR_SET_PDEATHSIG dies with the *thread* that started it, so the restarted
        // nbdkit must come from a thread that outlives the run.
        let driver =
            s.spawn(move || drive(client, w, ws, 11, t0, |_| !stop.load(Ordering::Relaxed)));
        // Stops the client even if the controller panics, so the scope can end.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop_guard = StopOnDrop(stop);
        let log = {
            let mut log = ResyncLog::default();
            let log = &mut log;
            let status = || ctl(control, r#"{"cmd":"status"}"#).unwrap_or(Value::Null);
            let ev = |log: &mut ResyncLog, m: String| {
                println!("  {:6.2}s  {m}", t0.elapsed().as_secs_f64());
                log.events.push((t0.elapsed(), m));
            };
            std::thread::sleep((warm + steady).saturating_sub(t0.elapsed()));
            nbd1.proc.kill();
            log.killed = Some(t0.elapsed());
            ev(log, "SIGKILL to leg 1's nbdkit".into());
            let lim = Instant::now();
            while status()["legs"][1]["state"] != "failed"
                && lim.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            log.failed = Some(t0.elapsed());
            ev(
                log,
                format!(
                    "leg 1 is {}",
                    status()["legs"][1]["state"].as_str().unwrap_or("?")
                ),
            );
            std::thread::sleep(degraded);
            nbd1.restart(env);
            log.restarted = Some(t0.elapsed());
            let st = status();
            log.dirty_at_readd = st["dirty_chunks"].as_u64().unwrap_or(0);
            let answer = ctl(control, r#"{"cmd":"re-add","leg":1}"#)
                .map(|v| v.to_string())
                .unwrap_or_else(|e| e);
            ev(
                log,
                format!(
                    "leg 1's nbdkit restarted; {} dirty chunks; re-add answered {answer}",
                    log.dirty_at_readd
                ),
            );
            let lim = Instant::now();
            loop {
                let st = status();
                let now = t0.elapsed();
                if !st["resync"].is_null() {
                    if log.resync_first.is_none() {
                        log.resync_first = Some(now);
                        ev(log, format!("resync running: {}", st["resync"]));
                    }
                    log.resync_last = Some(now);
                    log.total_bytes = st["resync"]["total_bytes"].as_u64().unwrap_or(0);
                    log.last_rate = st["resync"]["rate"].as_u64().unwrap_or(0);
                    log.polls += 1;
                    if st["resync"]["yielding"] == true {
                        log.yielding += 1;
                    }
                } else if st["legs"][1]["state"] == "uptodate" && log.resync_first.is_some() {
                    log.done = Some(now);
                    ev(log, "resync done, leg 1 up to date".into());
                    break;
                }
                if lim.elapsed() > Duration::from_secs(120) {
                    ev(log, format!("resync not done after 120 s: {st}"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(after);
            stop.store(true, Ordering::Relaxed);
            std::mem::take(log)
        };
        (driver.join().expect("client thread panicked"), log)
    });
    let daemon_log = t.proc.log_text();
    let note = t.health();
    let idle = yields.then(|| idle_resync(env, &mut t, &mut c, &mut nbd, ws));
    drop(c);
    drop(t);
    let leg_bw = if yields {
        leg_write_bandwidth(env, opts, &nbd[1], true)
    } else {
        Vec::new()
    };
    let bs = w.bs;
    let ms = |d: Option<Duration>| d.unwrap_or_default();
    let st_steady = window(&trace, warm, warm + steady, bs);
    let st_degraded = window(
        &trace,
        ms(log.failed) + Duration::from_millis(200),
        ms(log.restarted),
        bs,
    );
    let (r0, r1) = (ms(log.resync_first), ms(log.done).max(ms(log.resync_last)));
    let st_resync = window(&trace, r0, r1, bs);
    let st_after = window(&trace, r1, r1 + after, bs);
    // The slowest 250 ms slice of the resync.
    let mut worst = f64::INFINITY;
    let mut at = r0;
    while at + Duration::from_millis(250) <= r1 {
        worst = worst.min(window(&trace, at, at + Duration::from_millis(250), bs).iops);
        at += Duration::from_millis(250);
    }
    let secs = (r1 - r0).as_secs_f64();
    let mut s = format!(
        "### Client IOPS during a resync ({})\n\n",
        resync_mode(yields)
    );
    let _ = writeln!(
        s,
        "A fresh daemon on the two NBD legs (metadata, 1 MiB chunks), QD32 4K random writes \
         over {} MiB throughout. After {:.0} s of steady state leg 1's nbdkit gets SIGKILL; \
         {:.0} s later it is restarted and `{{\"cmd\":\"re-add\",\"leg\":1}}` is sent; the \
         client keeps writing while the dirty chunks are copied, and {:.0} s after. Resync rate \
         {}.\n",
        ws / MIB,
        steady.as_secs_f64(),
        degraded.as_secs_f64(),
        after.as_secs_f64(),
        if yields {
            "not capped, slowed to the default `--resync-busy-rate` while the client writes \
             (the defaults)"
        } else {
            "not capped and never slowed (`set-resync-busy-rate 0` on the control socket)"
        }
    );
    s.push_str("| phase | seconds | IOPS | vs steady | p50 µs | p99 µs |\n");
    s.push_str("| --- | ---: | ---: | ---: | ---: | ---: |\n");
    let mut phase = |name: &str, st: Stats, secs: f64| {
        let _ = writeln!(
            s,
            "| {name} | {secs:.1} | {:.0} | {:.2}× | {:.1} | {:.1} |",
            st.iops,
            if st_steady.iops > 0.0 {
                st.iops / st_steady.iops
            } else {
                0.0
            },
            st.p50,
            st.p99
        );
    };
    phase("steady, both legs", st_steady, steady.as_secs_f64());
    phase(
        "degraded, leg 1 down",
        st_degraded,
        (ms(log.restarted).saturating_sub(ms(log.failed))).as_secs_f64(),
    );
    phase("during resync", st_resync, secs);
    phase("after resync", st_after, after.as_secs_f64());
    s.push('\n');
    let resync_lines: Vec<&str> = daemon_log
        .lines()
        .filter(|l| l.contains("resyncing") || l.contains("up to date again"))
        .collect();
    let _ = writeln!(
        s,
        "- resync: {} dirty chunks at re-add, {:.1} MiB to copy, seen running for {:.2} s \
         (status polled every 50 ms) → about {:.0} MiB/s; last `resync.rate` in status {:.0} MiB/s",
        log.dirty_at_readd,
        log.total_bytes as f64 / MIB as f64,
        secs,
        if secs > 0.0 {
            log.total_bytes as f64 / MIB as f64 / secs
        } else {
            0.0
        },
        log.last_rate as f64 / MIB as f64
    );
    let _ = writeln!(
        s,
        "- the status said the resync was yielding to the client in {} of {} polls",
        log.yielding, log.polls
    );
    if worst.is_finite() {
        let _ = writeln!(
            s,
            "- slowest 250 ms slice during the resync: {:.0} IOPS ({:.2}× steady)",
            worst,
            worst / st_steady.iops.max(1.0)
        );
    }
    let _ = writeln!(
        s,
        "- guest-visible errors over the whole run: {}{}",
        trace.errors,
        if note.is_empty() {
            String::new()
        } else {
            format!(" ⚠ {note}")
        }
    );
    for l in resync_lines {
        let _ = writeln!(s, "- daemon log: `{}`", l.trim());
    }
    if let (Some(k), Some(f)) = (log.killed, log.failed) {
        let _ = writeln!(
            s,
            "- leg 1 seen failed in status {:.0} ms after its server was killed",
            (f - k).as_secs_f64() * 1000.0
        );
    }
    for (at, e) in &log.events {
        let _ = writeln!(s, "- at {:.2} s: {e}", at.as_secs_f64());
    }
    let Some(idle) = idle else {
        print!("{s}");
        drop(nbd);
        s.push('\n');
        return s;
    };
    let _ = writeln!(
        s,
        "\n#### Resync bandwidth with the guest idle, against a leg's write bandwidth\n\n\
         The same daemon, leg 1's nbdkit killed again; the client writes QD32 4K at random for \
         {:.0} s (every chunk of the working set gets dirty), then stops. With the client idle, \
         leg 1's nbdkit is restarted and re-added; the resync (unlimited rate) is timed from the \
         daemon's own log lines (\"resyncing\" … \"up to date again\"). A leg's write bandwidth: \
         qemu-storage-daemon exporting leg 1's NBD server alone (`driver=nbd`), 1 MiB random \
         writes from the same client, {:.0} s each at QD1 and QD4; its read bandwidth likewise \
         (a resync reads every chunk from leg 0 and writes it to leg 1).\n",
        IDLE_DIRTY_SECS, opts.seconds
    );
    s.push_str(&idle_table(&idle, &leg_bw));
    print!("{s}");
    drop(nbd);
    s.push('\n');
    s
}

/// The idle resync against a leg's own bandwidth (`leg_write_bandwidth`), as a table.
fn idle_table(idle: &IdleResync, leg_bw: &[(String, f64, String)]) -> String {
    let mut s = String::new();
    s.push_str(
        "| measurement | MiB/s | resync ÷ this | CPU s per GiB: daemon + leg servers |\n\
         | --- | ---: | ---: | ---: |\n",
    );
    let resync_mibs = idle.mibs();
    let _ = writeln!(
        s,
        "| resync, guest idle: {:.1} MiB in {:.2} s | {:.1} | | {} (source {:.2}, target {:.2}) |",
        idle.bytes as f64 / MIB as f64,
        idle.secs,
        resync_mibs,
        cpu_per_gib(idle.cpu[0], idle.cpu[1] + idle.cpu[2], idle.bytes as f64),
        per_gib(idle.cpu[1], idle.bytes as f64),
        per_gib(idle.cpu[2], idle.bytes as f64),
    );
    for (name, mibs, cpu) in leg_bw {
        let _ = writeln!(
            s,
            "| {name} | {mibs:.1} | {} | {cpu} |",
            if *mibs > 0.0 {
                format!("{:.2}×", resync_mibs / mibs)
            } else {
                "–".into()
            }
        );
    }
    if !idle.note.is_empty() {
        let _ = writeln!(s, "\n- ⚠ {}", idle.note);
    }
    s
}

fn resync_mode(yields: bool) -> String {
    if yields {
        format!(
            "defaults: yields to the guest at {} MiB/s",
            mirror::DEFAULT_RESYNC_BUSY_RATE / MIB
        )
    } else {
        "never yielding: `--resync-busy-rate 0`".into()
    }
}

/// Seconds of client writes with leg 1 down before the idle resync.
const IDLE_DIRTY_SECS: f64 = 2.0;

/// An uncapped resync timed with no guest I/O.
struct IdleResync {
    bytes: u64,
    secs: f64,
    note: String,
    /// CPU time over the resync: the daemon, the source's server, the target's server.
    cpu: [Duration; 3],
}

/// CPU seconds per GiB moved.
fn per_gib(cpu: Duration, bytes: f64) -> f64 {
    cpu.as_secs_f64() / (bytes.max(1.0) / (1u64 << 30) as f64)
}

/// "daemon + servers = total" CPU seconds per GiB moved.
fn cpu_per_gib(daemon: Duration, servers: Duration, bytes: f64) -> String {
    if bytes <= 0.0 {
        return "–".into();
    }
    let (d, s) = (per_gib(daemon, bytes), per_gib(servers, bytes));
    format!("{d:.2} + {s:.2} = {:.2}", d + s)
}

impl IdleResync {
    fn mibs(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / MIB as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// Seconds since midnight of a log line's `[2026-01-01T12:34:56.789Z ...` timestamp.
fn log_time(line: &str) -> Option<f64> {
    let t = line.split('T').nth(1)?.split('Z').next()?;
    let mut p = t.split(':');
    let h: f64 = p.next()?.parse().ok()?;
    let m: f64 = p.next()?.parse().ok()?;
    let s: f64 = p.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Kills leg 1's server, dirties the working set, stops the client, brings the leg back and
/// times the resync from the daemon's log.
fn idle_resync(
    env: &Env,
    t: &mut Target,
    c: &mut Client,
    nbd: &mut [Nbdkit; 2],
    ws: u64,
) -> IdleResync {
    println!("  -- resync with the guest idle --");
    let control = t.control.clone().unwrap();
    let status = || ctl(&control, r#"{"cmd":"status"}"#).unwrap_or(Value::Null);
    let wait = |what: &str, limit: Duration, ok: &dyn Fn(&Value) -> bool| -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if ok(&status()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("  !! timed out waiting for {what}: {}", status());
        false
    };
    let log_before = t.proc.log_text().lines().count();
    nbd[1].proc.kill();
    let w = Workload {
        qd: 32,
        write: true,
        bs: 4096,
    };
    let t0 = Instant::now();
    let dirty = Duration::from_secs_f64(IDLE_DIRTY_SECS);
    let trace = drive(c, w, ws, 13, t0, |e| e < dirty);
    wait("leg 1 failed", Duration::from_secs(10), &|st| {
        st["legs"][1]["state"] == "failed"
    });
    let dirty_chunks = status()["dirty_chunks"].as_u64().unwrap_or(0);
    println!(
        "  leg 1 down, {} writes ({} errors); {dirty_chunks} dirty chunks; client idle",
        trace.done.len(),
        trace.errors
    );
    // Let the daemon settle (the bitmap sweeps) before the clock starts.
    std::thread::sleep(Duration::from_millis(500));
    nbd[1].restart(env);
    let pids = [t.proc.pid(), nbd[0].proc.pid(), nbd[1].proc.pid()];
    let cpu0 = pids.map(proc_cpu);
    let _ = ctl(&control, r#"{"cmd":"re-add","leg":1}"#);
    let done = wait("leg 1 up to date", Duration::from_secs(180), &|st| {
        st["legs"][1]["state"] == "uptodate" && st["resync"].is_null()
    });
    let cpu1 = pids.map(proc_cpu);
    let cpu = [0, 1, 2].map(|i| cpu1[i].saturating_sub(cpu0[i]));
    let log = t.proc.log_text();
    let lines: Vec<&str> = log.lines().skip(log_before).collect();
    let start = lines
        .iter()
        .find(|l| l.contains("resyncing") && l.contains("dirty chunks"));
    let end = lines.iter().find(|l| l.contains("up to date again"));
    let bytes = start
        .and_then(|l| l.split('(').nth(1))
        .and_then(|x| x.split_whitespace().next())
        .and_then(|x| x.parse::<u64>().ok())
        .unwrap_or(0);
    let secs = match (
        start.and_then(|l| log_time(l)),
        end.and_then(|l| log_time(l)),
    ) {
        (Some(a), Some(b)) if b >= a => b - a,
        _ => 0.0,
    };
    let mut note = String::new();
    if !done || secs == 0.0 {
        note = format!(
            "the idle resync was not seen to finish (log lines: {:?} / {:?})",
            start, end
        );
    }
    let r = IdleResync {
        bytes,
        secs,
        note,
        cpu,
    };
    println!(
        "  resync with the guest idle: {:.1} MiB in {:.2} s = {:.1} MiB/s",
        bytes as f64 / MIB as f64,
        secs,
        r.mibs()
    );
    r
}

/// Leg bandwidths (nbdkit rate filter, bits per second) for the resync on limited legs: 128, 256
/// and 512 MiB/s, below what the copy reaches on this machine's CPUs, so the leg is the limit
/// as it is when the legs are other machines.
const LIMITED_RATES: [&str; 3] = ["1G", "2G", "4G"];
/// The rate filter's bucket, in seconds at the rate. Small, so neither the resync nor the leg's
/// own measurement starts on saved-up tokens (the default 2 s would be a quarter of a 1 GiB copy
/// at 1 Gbit/s, and all of a 1 s measurement).
const RATE_BURST: &str = "0.1";

/// The idle resync when each leg's bandwidth, not the shared CPUs, is what limits it: both
/// leg servers behind nbdkit's rate filter, the resync against leg 1's write bandwidth
/// measured through the same filter.
fn resync_limited_section(env: &Env, opts: &Opts, imgs: &[PathBuf; 3]) -> String {
    println!("\n== idle resync on bandwidth-limited legs ==");
    let mut s = String::from("### Idle resync on bandwidth-limited legs (nbdkit rate filter)\n\n");
    let _ = writeln!(
        s,
        "The two NBD legs of the resync sections, each nbdkit behind `--filter=rate rate=R \
         burstiness={RATE_BURST}` (reads and writes each limited to R bits per second; nbdkit's \
         `1G` is 2^30): the leg's bandwidth is the limit, as a link or a disk is when the legs \
         are other machines, rather than the two vCPUs that the daemon, both servers and the \
         client share. Then as above: a fresh daemon, leg 1's nbdkit killed, the client writes \
         QD32 4K at random for {IDLE_DIRTY_SECS:.0} s and stops, leg 1 restarted and re-added, \
         the resync (unlimited rate) timed from the daemon's log; leg 1's write bandwidth \
         through qemu-storage-daemon's NBD client, 1 MiB random writes, {:.0} s each at QD1 and \
         QD4.\n",
        opts.seconds
    );
    for rate in LIMITED_RATES {
        println!("  -- legs limited to {rate}bit/s --");
        let mut nbd = [0, 1]
            .map(|i| Nbdkit::limited(env, &env.path(&format!("nbdr{i}.sock")), &imgs[i], rate));
        let uris: Vec<String> = nbd.iter().map(Nbdkit::uri).collect();
        let mut t = Target::mirror(
            env,
            &format!("vhost-mirror (2 NBD legs at {rate}bit/s)"),
            &uris,
            true,
        );
        let mut c = Client::connect(&mut t);
        let ws = c.capacity.min(opts.size) / SLOT as u64 * SLOT as u64;
        let idle = idle_resync(env, &mut t, &mut c, &mut nbd, ws);
        let health = t.health();
        drop(c);
        drop(t);
        let leg_bw = leg_write_bandwidth(env, opts, &nbd[1], false);
        let _ = writeln!(s, "#### Legs limited to {rate}bit/s\n");
        s.push_str(&idle_table(&idle, &leg_bw));
        if !health.is_empty() {
            let _ = writeln!(s, "\n- ⚠ {health}");
        }
        s.push('\n');
    }
    print!("{s}");
    s
}

/// Write (and, if `reads`, read) bandwidth of one NBD leg with 1 MiB requests, through qsd's
/// NBD client.
fn leg_write_bandwidth(
    env: &Env,
    opts: &Opts,
    leg: &Nbdkit,
    reads: bool,
) -> Vec<(String, f64, String)> {
    let mut t = Target::qsd(
        env,
        "qsd nbd on leg 1",
        &[format!(
            "driver=nbd,node-name=disk,server.type=unix,server.path={}",
            leg.socket.display()
        )],
    );
    let mut c = Client::connect(&mut t);
    let ws = c.capacity.min(opts.size) / SLOT as u64 * SLOT as u64;
    let warm = Duration::from_secs_f64(opts.warmup);
    let dur = Duration::from_secs_f64(opts.seconds);
    let mut out = Vec::new();
    for (write, qd) in [(true, 1), (true, 4), (false, 1), (false, 4)] {
        if !write && !reads {
            continue;
        }
        let w = Workload {
            qd,
            write,
            bs: SLOT,
        };
        let t0 = Instant::now();
        let (d0, s0) = (proc_cpu(t.proc.pid()), proc_cpu(leg.proc.pid()));
        let trace = drive(&mut c, w, ws, 17, t0, |e| e < warm + dur);
        let (d1, s1) = (proc_cpu(t.proc.pid()), proc_cpu(leg.proc.pid()));
        let st = window(&trace, warm, warm + dur, w.bs);
        let name = format!(
            "leg 1 alone (qsd nbd), 1 MiB random {}s, QD{qd}",
            if write { "write" } else { "read" }
        );
        println!("  {name}: {:.1} MiB/s", st.mibs);
        let moved = (trace.done.len() * w.bs) as f64;
        let cpu = cpu_per_gib(d1.saturating_sub(d0), s1.saturating_sub(s0), moved);
        out.push((name, st.mibs, cpu));
    }
    out
}

// ---------------------------------------------------------------------------------------------

fn first_line_of(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// CPU time of the whole machine and of this process with its reaped children, to tell how
/// much other work ran beside the bench.
struct CpuMark {
    at: Instant,
    /// Busy CPU seconds of the machine since boot.
    busy: f64,
    /// CPU seconds of this process and of the children it has waited for.
    own: f64,
}

impl CpuMark {
    fn now() -> CpuMark {
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let busy = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let l = s.lines().next()?.to_string();
                let v: Vec<f64> = l
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal
                (v.len() >= 8).then(|| (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / hz)
            })
            .unwrap_or(0.0);
        let mut own = 0.0;
        for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
            let mut ru = MaybeUninit::<libc::rusage>::zeroed();
            // SAFETY: getrusage fills the rusage it is given, which lives on this stack frame.
            if unsafe { libc::getrusage(who, ru.as_mut_ptr()) } == 0 {
                // SAFETY: getrusage succeeded, so it initialised the struct (and it was zeroed).
                let ru = unsafe { ru.assume_init() };
                let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
                own += tv(ru.ru_utime) + tv(ru.ru_stime);
            }
        }
        CpuMark {
            at: Instant::now(),
            busy,
            own,
        }
    }

    /// Other processes' CPU use between `self` and `later`.
    fn foreign(&self, later: &CpuMark) -> String {
        let secs = (later.at - self.at).as_secs_f64().max(1e-3);
        let other = ((later.busy - self.busy) - (later.own - self.own)).max(0.0);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        format!(
            "{:.2} CPU on average over {:.0} s ({:.0}% of the {cpus} CPUs)",
            other / secs,
            secs,
            100.0 * other / secs / cpus as f64
        )
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let opts = parse_args();
    let qsd = tool_version("qemu-storage-daemon", "qemu-system-common");
    let nbdkit = tool_version("nbdkit", "nbdkit");
    let help = Command::new("qemu-storage-daemon")
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !help.contains("vhost-user-blk") {
        fail("this qemu-storage-daemon has no vhost-user-blk export");
    }
    let mut daemon_args: Vec<String> = opts
        .io_timeout
        .map(|ms| vec!["--io-timeout".into(), ms.to_string()])
        .unwrap_or_default();
    daemon_args.extend(opts.daemon_args.iter().cloned());
    let env = Env::new(opts.keep, daemon_args, opts.daemon.clone());
    let exe = std::env::current_exe().unwrap_or_default();
    if !exe.to_string_lossy().contains("/release/") {
        eprintln!("bench: warning: not a release build; the figures mean little (use --release)");
    }
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load_start = loadavg();
    let cmdline: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "vhost-mirror {} vs {qsd}; nbdkit {nbdkit}\nscratch {}; load average {load_start}",
        env.bin.display(),
        env.dir.display()
    );

    let mut body = String::new();
    let has = |s: &str| opts.sections.iter().any(|x| x == s);
    let need_images = [
        "file",
        "nbd",
        "memory",
        "resync",
        "resync-greedy",
        "resync-limited",
    ]
    .iter()
    .any(|s| has(s));
    // The third image is the single-leg peers' own, so the mirrored pair stays identical.
    let imgs = [
        env.path("leg0.img"),
        env.path("leg1.img"),
        env.path("leg2.img"),
    ];
    if need_images {
        let t = Instant::now();
        for p in &imgs {
            image(p, opts.size + META_ROOM);
        }
        // On disk before any section starts: otherwise the first sections run while the kernel
        // writes 3 GiB back (over its background threshold), and a flush then has that to wait
        // for too.
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        println!(
            "wrote (and synced) three {} MiB leg images in {:.1} s",
            (opts.size + META_ROOM) / MIB,
            t.elapsed().as_secs_f64()
        );
    }
    type SectionFn = fn(&Env, &Opts, &[PathBuf; 3]) -> String;
    let sections: [(&str, SectionFn); 10] = [
        ("null", |e, o, _| null_section(e, o)),
        ("file", file_section),
        ("file-shm", file_shm_section),
        ("file-dev", file_dev_section),
        ("nbd", nbd_section),
        ("nbd-mem", nbd_mem_section),
        ("memory", memory_section),
        ("resync", resync_section),
        ("resync-greedy", resync_greedy_section),
        ("resync-limited", resync_limited_section),
    ];
    for (name, f) in sections {
        if !has(name) {
            continue;
        }
        let (load, m0) = (loadavg(), CpuMark::now());
        let text = f(&env, &opts, &imgs);
        let m1 = CpuMark::now();
        // After the heading: how busy the rest of the machine was meanwhile.
        let note = format!(
            "_Machine during this section: load average {load} at its start; processes other \
             than the bench and its children used {}._\n\n",
            m0.foreign(&m1)
        );
        println!("  ({})", note.trim().trim_matches('_'));
        match text.split_once("\n\n") {
            Some((head, rest)) => {
                let _ = write!(body, "{head}\n\n{note}{rest}");
            }
            None => body.push_str(&text),
        }
        if let Some(out) = &opts.out {
            // What is done so far, in case a later section hangs or is interrupted.
            let _ = std::fs::write(
                out,
                format!("# vhost-mirror benchmark run (incomplete)\n\n## Results\n\n{body}"),
            );
        }
    }
    let load_end = loadavg();

    let machine = format!(
        "- date: {date}\n\
         - CPUs (nproc): {}; CPU: {}\n\
         - memory: {}\n\
         - kernel: {}\n\
         - qemu-storage-daemon: {qsd}\n\
         - nbdkit: {nbdkit}\n\
         - client: libblkio (blkio crate 0.5, virtio-blk-vhost-user), one queue, one thread\n\
         - load average (1/5/15 min) at start: {load_start}; at end: {load_end}\n\
         - command: `cargo run --release --example bench -- {}`\n\
         - per workload and target: {} rounds of {:.1} s warm-up (not counted) and {:.1} s \
           measured, the targets taking turns; working set {} MiB\n\
         - CPU per request: user + system time of the target's daemon and of the nbdkit servers \
           it uses (`/proc/PID/stat`, 10 ms ticks) and of the client thread, over its rounds \
           (warm-up included), divided by the requests completed in them. Client, daemon and \
           servers share the CPUs, so where they are busy the IOPS ratio follows the ratio of \
           these totals\n\
         - vhost-mirror `--io-timeout`: {}\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        first_line_of("/proc/cpuinfo", "model name"),
        first_line_of("/proc/meminfo", "MemTotal"),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        cmdline.join(" "),
        opts.rounds,
        opts.warmup,
        opts.seconds,
        opts.size / MIB,
        opts.io_timeout
            .map_or("the default (1000 ms)".to_string(), |ms| format!("{ms} ms"))
    );
    let report = format!("## Machine\n\n{machine}\n## Results\n\n{body}");
    println!("\n\n{report}");
    if let Some(out) = &opts.out {
        std::fs::write(out, format!("# vhost-mirror benchmark run\n\n{report}"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
        println!("written to {}", out.display());
    }
}
