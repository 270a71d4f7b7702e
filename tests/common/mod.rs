//! Real peers for the end-to-end tests: the `vhost-mirror` binary, nbdkit servers as legs, and
//! libblkio's virtio-blk-vhost-user driver as the client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};
use serde_json::Value;

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        TempDir::under(&std::env::temp_dir(), name)
    }

    /// On a real file system, where O_DIRECT reaches a disk (/tmp may be tmpfs).
    pub fn on_disk(name: &str) -> TempDir {
        TempDir::under(Path::new("/var/tmp"), name)
    }

    fn under(base: &Path, name: &str) -> TempDir {
        let p = base.join(format!("vhm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `sig` to `child`. SIGSTOP returns only once every thread of the child has stopped:
/// kill(2) only queues it, and a server thread finishing a system call could still answer a
/// request the test sends right after (seen as a flaky "both legs stalled" test).
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned and have not reaped; no memory is involved.
    unsafe { libc::kill(child.id() as i32, sig) };
    if sig == libc::SIGSTOP {
        wait_for("the process to stop", Duration::from_secs(5), || {
            all_threads_stopped(child.id())
        });
    }
}

fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).map_or(true, |st| {
            // The state follows the command name, which is in parentheses.
            st.rfind(')')
                .and_then(|i| st[i + 1..].split_whitespace().next())
                .is_some_and(|state| state == "T" || state == "t")
        })
    })
}

/// Runs `cmd` with `sh -c`, which must succeed; its standard output.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` with `sh -c`, whatever comes of it (clean-ups).
pub fn sh_ok(cmd: &str) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A sparse image file of `size` bytes.
pub fn image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// An nbdkit server exporting a file over a unix socket.
pub struct Nbdkit {
    pub child: Child,
    pub socket: PathBuf,
    /// Everything after `-U SOCKET`: filters, plugin and parameters.
    args: Vec<String>,
}

impl Nbdkit {
    /// `nbdkit [filters] file FILE [params]` on `socket`.
    pub fn start(socket: &Path, file: &Path, filters: &[&str], params: &[&str]) -> Nbdkit {
        Nbdkit::plugin(socket, Nbdkit::file_args(file, filters, params))
    }

    /// The arguments of `nbdkit [filters] file FILE [params]` after the socket.
    pub fn file_args(file: &Path, filters: &[&str], params: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = filters.iter().map(|f| format!("--filter={f}")).collect();
        args.push("file".into());
        args.push(format!("file={}", file.display()));
        args.extend(params.iter().map(|p| p.to_string()));
        args
    }

    /// `nbdkit ARGS` on `socket`: any plugin (`eval`, `memory`...) with its filters and
    /// parameters.
    pub fn plugin(socket: &Path, args: Vec<String>) -> Nbdkit {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new("nbdkit");
        cmd.args(["--exit-with-parent", "-f", "-U"])
            .arg(socket)
            .args(&args);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd
            .spawn()
            .expect("nbdkit not installed: run scripts/test (it installs nbdkit)");
        let s = socket.to_path_buf();
        wait_for("nbdkit socket", Duration::from_secs(10), || {
            UnixStream::connect(&s).is_ok()
        });
        Nbdkit {
            child,
            socket: socket.to_path_buf(),
            args,
        }
    }

    /// Starts the server again on the same socket with the same arguments (after `kill`).
    pub fn restart(&mut self) {
        self.kill();
        let fresh = Nbdkit::plugin(&self.socket, std::mem::take(&mut self.args));
        *self = fresh;
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        signal(&self.child, libc::SIGCONT);
        self.kill();
    }
}

/// `vhost-mirror create` on `legs`; panics with its output if it fails.
pub fn create(legs: &[String], extra: &[&str]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-mirror"));
    cmd.arg("create");
    for l in legs {
        cmd.arg("--leg").arg(l);
    }
    let out = cmd.args(extra).output().unwrap();
    assert!(
        out.status.success(),
        "create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `vhost-mirror blk` daemon.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(dir: &TempDir, legs: &[String], extra: &[&str]) -> Daemon {
        let socket = dir.path("vhost.sock");
        let control = dir.path("control.sock");
        let log = dir.path("daemon.log");
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-mirror"));
        cmd.arg("blk")
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control);
        for l in legs {
            cmd.arg("--leg").arg(l);
        }
        cmd.args(extra)
            // VHM_DAEMON_LOG=debug to see more of the daemon when a test fails.
            .env(
                "RUST_LOG",
                std::env::var("VHM_DAEMON_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().unwrap();
        let s = socket.clone();
        let t0 = Instant::now();
        while !s.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "daemon exited with {st}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "daemon socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            child,
            socket,
            control,
            log,
        }
    }

    pub fn status(&self) -> Value {
        ctl(&self.control, r#"{"cmd":"status"}"#)
    }

    /// Leg `i`'s last error as the status reports it ("" for none).
    pub fn last_error(&self, i: usize) -> String {
        self.status()["legs"][i]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn leg_state(&self, i: usize) -> String {
        self.status()["legs"][i]["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits until leg `i` is in `state`.
    pub fn wait_leg(&self, i: usize, state: &str, limit: Duration) {
        let t0 = Instant::now();
        loop {
            let st = self.status();
            if st["legs"][i]["state"] == state {
                return;
            }
            assert!(
                t0.elapsed() < limit,
                "leg {i} not {state} after {limit:?}: {st}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as an operator or init system would: a clean shutdown.
    pub fn terminate(&mut self) {
        signal(&self.child, libc::SIGTERM);
        let t0 = Instant::now();
        while self.is_running() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "daemon ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One request/answer on a control socket.
pub fn ctl(control: &Path, req: &str) -> Value {
    let s = UnixStream::connect(control).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    writeln!(w, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// Bytes of buffer per request slot in the client's shared memory.
pub const SLOT: usize = 64 * 1024;

/// A libblkio virtio-blk-vhost-user client with `slots` request buffers.
pub struct Client {
    pub blkio: Blkio,
    pub q: Blkioq,
    pub region: MemoryRegion,
    pub capacity: u64,
    pub slots: usize,
}

impl Client {
    pub fn connect(socket: &Path, slots: usize) -> Client {
        Client::connect_queues(socket, slots, 1).0
    }

    /// A client using `queues` virtqueues; the extra queues come back beside it.
    pub fn connect_queues(socket: &Path, slots: usize, queues: i32) -> (Client, Vec<Blkioq>) {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
        blkio.set_str("path", socket.to_str().unwrap()).unwrap();
        blkio.connect().expect("libblkio connect");
        blkio.set_i32("num-queues", queues).unwrap();
        let mut started = blkio.start().expect("libblkio start");
        let q = started.queues.remove(0);
        let extra = started.queues;
        let region = blkio.alloc_mem_region(slots * SLOT).unwrap();
        blkio.map_mem_region(&region).unwrap();
        let capacity = blkio.get_u64("capacity").unwrap();
        (
            Client {
                blkio,
                q,
                region,
                capacity,
                slots,
            },
            extra,
        )
    }

    pub fn buf(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.slots);
        (self.region.addr + slot * SLOT) as *mut u8
    }

    pub fn slice(&mut self, slot: usize, len: usize) -> &mut [u8] {
        assert!(len <= SLOT);
        // SAFETY: slot buffers lie inside the mapped region, which lives as long as the client;
        // callers use a slot only while no request on it is in flight.
        unsafe { std::slice::from_raw_parts_mut(self.buf(slot), len) }
    }

    /// Waits for at least `min` completions; returns (user_data, ret) pairs.
    pub fn reap(&mut self, min: usize, limit: Duration) -> Vec<(usize, i32)> {
        let mut comps: Vec<_> = (0..64)
            .map(|_| std::mem::MaybeUninit::<blkio::Completion>::uninit())
            .collect();
        let mut t = limit;
        let n = self
            .q
            .do_io(&mut comps, min, Some(&mut t), None)
            .expect("do_io");
        comps[..n]
            .iter()
            .map(|c| {
                // SAFETY: do_io initialised the first n entries.
                let c = unsafe { c.assume_init_ref() };
                (c.user_data, c.ret)
            })
            .collect()
    }

    fn wait_one(&mut self) -> i32 {
        let r = self.reap(1, Duration::from_secs(30));
        assert_eq!(r.len(), 1, "request did not complete within 30 s");
        r[0].1
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> i32 {
        self.slice(0, data.len()).copy_from_slice(data);
        self.q
            .write(offset, self.buf(0), data.len(), 0, ReqFlags::empty());
        self.wait_one()
    }

    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        self.q.read(offset, self.buf(0), len, 0, ReqFlags::empty());
        match self.wait_one() {
            0 => Ok(self.slice(0, len).to_vec()),
            e => Err(e),
        }
    }

    pub fn flush(&mut self) -> i32 {
        self.q.flush(0, ReqFlags::empty());
        self.wait_one()
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> i32 {
        self.q.discard(offset, len, 0, ReqFlags::empty());
        self.wait_one()
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> i32 {
        self.q.write_zeroes(offset, len, 0, ReqFlags::empty());
        self.wait_one()
    }
}

/// A 4 KiB block stamped with its index and a sequence number, so a stale or torn block is
/// recognisable on read-back.
pub fn stamp(block: u64, seq: u64) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    for (i, chunk) in b.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..].copy_from_slice(&(seq ^ (i as u64) << 48).to_le_bytes());
    }
    b
}

/// What a stamped random-write workload saw.
pub struct WorkloadReport {
    pub writes_ok: u64,
    pub errors: u64,
    pub max_gap: Duration,
    /// Last acknowledged sequence number per block (0 = never written).
    pub acked: Vec<u64>,
}

/// Writes stamped 4 KiB blocks at random over the first `blocks` blocks at queue depth `qd` for
/// `dur`, never two writes to one block at once. `during` runs once per loop with the elapsed time.
pub fn stamped_workload(
    c: &mut Client,
    blocks: u64,
    qd: usize,
    dur: Duration,
    mut during: impl FnMut(Duration),
) -> WorkloadReport {
    assert!(qd <= c.slots);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut acked = vec![0u64; blocks as usize];
    let mut busy = vec![false; blocks as usize];
    let mut slot_req: Vec<Option<(u64, u64)>> = vec![None; qd];
    let mut seq = 0u64;
    let mut rep = WorkloadReport {
        writes_ok: 0,
        errors: 0,
        max_gap: Duration::ZERO,
        acked: Vec::new(),
    };
    let t0 = Instant::now();
    let mut last = Instant::now();
    let mut inflight = 0usize;
    loop {
        let elapsed = t0.elapsed();
        during(elapsed);
        let submitting = elapsed < dur;
        if submitting {
            for (slot, req) in slot_req.iter_mut().enumerate() {
                if req.is_some() {
                    continue;
                }
                let block = loop {
                    let b = next() % blocks;
                    if !busy[b as usize] {
                        break b;
                    }
                };
                seq += 1;
                busy[block as usize] = true;
                *req = Some((block, seq));
                let data = stamp(block, seq);
                c.slice(slot, 4096).copy_from_slice(&data);
                c.q.write(block * 4096, c.buf(slot), 4096, slot, ReqFlags::empty());
                inflight += 1;
            }
        } else if inflight == 0 {
            break;
        }
        for (slot, ret) in c.reap(1, Duration::from_secs(30)) {
            let now = Instant::now();
            rep.max_gap = rep.max_gap.max(now - last);
            last = now;
            let (block, s) = slot_req[slot].take().expect("completion for idle slot");
            busy[block as usize] = false;
            inflight -= 1;
            if ret == 0 {
                rep.writes_ok += 1;
                acked[block as usize] = s;
            } else {
                rep.errors += 1;
            }
        }
    }
    rep.acked = acked;
    rep
}

/// Reads back every acknowledged block; returns how many differ from their last acknowledged stamp.
pub fn verify_acked(c: &mut Client, acked: &[u64]) -> usize {
    let mut bad = 0;
    for (block, &seq) in acked.iter().enumerate() {
        if seq == 0 {
            continue;
        }
        let got = c.read(block as u64 * 4096, 4096).expect("read-back failed");
        if got[..] != stamp(block as u64, seq)[..] {
            bad += 1;
        }
    }
    bad
}

/// Serialises tests whose timing assertions (stall bounds) would suffer from sharing two cores
/// with other heavy tests.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Asks the daemon to take leg `i` back now; it may already be on its way back on its own.
pub fn re_add(rig: &Rig, i: usize) {
    let r = ctl(
        &rig.daemon.control,
        &format!(r#"{{"cmd":"re-add","leg":{i}}}"#),
    );
    if r["ok"] != true {
        let state = rig.daemon.leg_state(i);
        assert_ne!(state, "failed", "re-add {i} refused: {r}");
        eprintln!("re-add {i}: {r} (leg already {state})");
    }
}

/// Size of the test legs.
pub const DISK: u64 = 64 << 20;

/// Two nbdkit legs over image files in a scratch directory, and the daemon over them (or, from
/// [`Rig::files`], the daemon straight over the files as `file:` legs).
pub struct Rig {
    // Fields drop in order: the daemon before its legs, the lock last.
    pub daemon: Daemon,
    pub legs: Vec<Nbdkit>,
    pub dir: TempDir,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Rig {
    /// Leg `i` gets `filters[i]` and `params[i]`; `create_args` go to `vhost-mirror create`
    /// (None: no create, e.g. to test its absence); `prepare` may fill the images first.
    pub fn build(
        name: &str,
        filters: [&[&str]; 2],
        params: [&[&str]; 2],
        create_args: Option<&[&str]>,
        extra: &[&str],
        prepare: impl FnOnce(&TempDir),
    ) -> Rig {
        Rig::build_servers(name, create_args, extra, prepare, |dir, i| {
            let img = dir.path(&format!("leg{i}.img"));
            Nbdkit::file_args(&img, filters[i], params[i])
        })
    }

    /// As [`Rig::build`], with leg `i`'s server started as `nbdkit -U SOCK ARGS` where
    /// `server(dir, i)` gives ARGS (any plugin; the images `leg0.img` and `leg1.img` are in
    /// `dir`).
    pub fn build_servers(
        name: &str,
        create_args: Option<&[&str]>,
        extra: &[&str],
        prepare: impl FnOnce(&TempDir),
        server: impl Fn(&TempDir, usize) -> Vec<String>,
    ) -> Rig {
        let serial = exclusive();
        let dir = TempDir::new(name);
        for i in 0..2 {
            image(&dir.path(&format!("leg{i}.img")), DISK);
        }
        prepare(&dir);
        let mut legs = Vec::new();
        for i in 0..2 {
            let sock = dir.path(&format!("nbd{i}.sock"));
            legs.push(Nbdkit::plugin(&sock, server(&dir, i)));
        }
        let uris: Vec<String> = legs.iter().map(|l| l.uri()).collect();
        if let Some(args) = create_args {
            create(&uris, args);
        }
        let daemon = Daemon::start(&dir, &uris, extra);
        Rig {
            daemon,
            legs,
            dir,
            _serial: serial,
        }
    }

    pub fn start(name: &str, filters: [&[&str]; 2], params: [&[&str]; 2], extra: &[&str]) -> Rig {
        Rig::build(
            name,
            filters,
            params,
            Some(&["--assume-clean"]),
            extra,
            |_| {},
        )
    }

    pub fn plain(name: &str, extra: &[&str]) -> Rig {
        Rig::start(name, [&[], &[]], [&[], &[]], extra)
    }

    /// Two `file:` legs over the images, no servers.
    pub fn files(name: &str, extra: &[&str]) -> Rig {
        let serial = exclusive();
        let dir = TempDir::new(name);
        let uris = file_legs(&dir);
        let daemon = Daemon::start(&dir, &uris, extra);
        Rig {
            daemon,
            legs: Vec::new(),
            dir,
            _serial: serial,
        }
    }

    pub fn uris(&self) -> Vec<String> {
        if self.legs.is_empty() {
            return file_uris(&self.dir);
        }
        self.legs.iter().map(|l| l.uri()).collect()
    }

    pub fn image(&self, i: usize) -> Vec<u8> {
        std::fs::read(self.dir.path(&format!("leg{i}.img"))).unwrap()
    }

    pub fn wait_leg(&self, i: usize, state: &str, limit: Duration) {
        self.daemon.wait_leg(i, state, limit)
    }

    /// Replaces the daemon with a fresh one over the same legs.
    pub fn restart_daemon(&mut self, extra: &[&str]) {
        self.daemon.stop();
        let uris = self.uris();
        self.daemon = Daemon::start(&self.dir, &uris, extra);
    }
}

/// Two `DISK`-sized images in `dir` (`leg0.img`, `leg1.img`) as `file:` legs, created clean
/// (`vhost-mirror create --assume-clean`).
pub fn file_legs(dir: &TempDir) -> Vec<String> {
    for i in 0..2 {
        image(&dir.path(&format!("leg{i}.img")), DISK);
    }
    let uris = file_uris(dir);
    create(&uris, &["--assume-clean"]);
    uris
}

fn file_uris(dir: &TempDir) -> Vec<String> {
    (0..2)
        .map(|i| format!("file:{}", dir.path(&format!("leg{i}.img")).display()))
        .collect()
}

/// Deterministic test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect()
}

/// Voluntary context switches (sleeps) of the daemon's threads called `name`, so far.
pub fn sleeps_of(pid: u32, name: &str) -> u64 {
    sleeps_per_thread(pid, name).values().sum()
}

/// Voluntary context switches so far of each of the daemon's threads called `name`, by id.
pub fn sleeps_per_thread(pid: u32, name: &str) -> std::collections::HashMap<String, u64> {
    let mut per = std::collections::HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let n = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        per.insert(task.file_name().unwrap().to_string_lossy().into_owned(), n);
    }
    per
}

/// One second of stamped QD16 writes over `blocks` blocks through `c`, counting the sleeps of
/// the daemon's threads called `thread` (the legs' own: `file-leg`, `nbd-recv`) meanwhile. By
/// default the queue's worker does their work and they sleep through it (fewer than one sleep
/// per 100 writes); with `--leg-threads` (`leg_threads`) they wake for it (more than one per
/// 20), which shows the count tells the two apart. No write fails and every acknowledged block
/// reads back.
pub fn check_leg_thread_sleeps(
    d: &Daemon,
    c: &mut Client,
    blocks: u64,
    thread: &str,
    leg_threads: bool,
) {
    let pid = d.child.id();
    let before = sleeps_of(pid, thread);
    let rep = stamped_workload(c, blocks, 16, Duration::from_secs(1), |_| {});
    let sleeps = sleeps_of(pid, thread) - before;
    assert_eq!(rep.errors, 0, "{}", d.log_text());
    assert!(rep.writes_ok > 1000, "only {} writes", rep.writes_ok);
    if leg_threads {
        assert!(
            sleeps > rep.writes_ok / 20,
            "{thread} threads slept {sleeps} times over {} writes",
            rep.writes_ok
        );
    } else {
        assert!(
            sleeps < rep.writes_ok / 100,
            "{thread} threads slept {sleeps} times over {} writes: the queue's worker is not \
             doing their work",
            rep.writes_ok
        );
    }
    assert_eq!(verify_acked(c, &rep.acked), 0);
}
