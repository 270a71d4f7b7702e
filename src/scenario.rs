//! `vhost-mirror scenario FILE`: a fault drill described in JSON, run end to end, with a report.
//!
//! The runner starts the legs (nbdkit over image files, with any filters), writes mirror
//! metadata, starts this binary's `blk` daemon on them, drives the disk with a libblkio workload
//! (stamped 4 KiB writes at a queue depth), fires the scenario's events at their times, waits for
//! every leg to be up to date again, reads back every acknowledged block, and reports: guest I/O
//! errors, the longest stall between completions, data verified, time to detect each fault, and
//! resync time and bytes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, ReqFlags};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Why a scenario could not run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("scenario {path} is not valid: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("scenario: {0}")]
    Invalid(String),
    #[error("scenario setup: {0}")]
    Setup(String),
    #[error("libblkio client: {0}")]
    Client(String),
}

fn default_size() -> String {
    "256M".into()
}
fn default_seconds() -> f64 {
    10.0
}
fn default_qd() -> usize {
    16
}
fn default_blocks() -> u64 {
    8192
}
fn default_wait() -> f64 {
    60.0
}

/// One leg of the scenario.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LegDesc {
    /// nbdkit filters, e.g. ["error"], ["delay"].
    #[serde(default)]
    pub filters: Vec<String>,
    /// Filter parameters, e.g. ["error-rate=100%"]. `{trigger}` becomes this leg's trigger file,
    /// which the `error-on` / `error-off` events create and remove.
    #[serde(default)]
    pub params: Vec<String>,
}

/// The workload.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    #[serde(default = "default_seconds")]
    pub seconds: f64,
    #[serde(default = "default_qd")]
    pub queue_depth: usize,
    /// Blocks of 4 KiB written at random (the working set).
    #[serde(default = "default_blocks")]
    pub blocks: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            seconds: default_seconds(),
            queue_depth: default_qd(),
            blocks: default_blocks(),
        }
    }
}

/// Something done to a leg at a point of the run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Seconds from the start of the workload.
    pub at: f64,
    /// kill (SIGKILL the server), restart, stop (SIGSTOP: hang), cont, error-on, error-off,
    /// fail-leg, re-add.
    pub action: String,
    pub leg: usize,
}

/// A scenario file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Size of each leg (K/M/G suffixes).
    #[serde(default = "default_size")]
    pub disk_size: String,
    pub legs: Vec<LegDesc>,
    /// Extra `vhost-mirror blk` options, e.g. ["--io-timeout", "500"].
    #[serde(default)]
    pub daemon_args: Vec<String>,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub events: Vec<Event>,
    /// How long to wait, after the workload, for every leg to be up to date again.
    #[serde(default = "default_wait")]
    pub wait_resync_seconds: f64,
}

const ACTIONS: [&str; 8] = [
    "kill",
    "restart",
    "stop",
    "cont",
    "error-on",
    "error-off",
    "fail-leg",
    "re-add",
];

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let s: Scenario = serde_json::from_str(&text).map_err(|source| ScenarioError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), ScenarioError> {
        if self.legs.len() != 2 {
            return Err(ScenarioError::Invalid(format!(
                "give two legs, not {}",
                self.legs.len()
            )));
        }
        let size = transport::parse_size(&self.disk_size).map_err(ScenarioError::Invalid)?;
        let w = &self.workload;
        if w.queue_depth == 0 || w.queue_depth > 256 {
            return Err(ScenarioError::Invalid(
                "queue_depth must be 1 to 256".into(),
            ));
        }
        if w.blocks < w.queue_depth as u64 * 2 || w.blocks * 4096 > size / 2 {
            return Err(ScenarioError::Invalid(format!(
                "blocks must be at least twice the queue depth and cover at most half the disk ({} blocks)",
                size / 2 / 4096
            )));
        }
        for e in &self.events {
            if !ACTIONS.contains(&e.action.as_str()) {
                return Err(ScenarioError::Invalid(format!(
                    "unknown action '{}' (known: {})",
                    e.action,
                    ACTIONS.join(", ")
                )));
            }
            if e.leg >= self.legs.len() || !(0.0..=3600.0).contains(&e.at) {
                return Err(ScenarioError::Invalid(format!(
                    "event {:?}: bad leg or time",
                    e
                )));
            }
        }
        Ok(())
    }
}

/// What happened to one event.
#[derive(Debug, Clone, Serialize)]
pub struct EventReport {
    pub at: f64,
    pub action: String,
    pub leg: usize,
    /// For faults: seconds until the daemon reported the leg out of the up-to-date set.
    pub detected_after: Option<f64>,
}

/// The scenario's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub name: String,
    pub writes_acknowledged: u64,
    pub guest_io_errors: u64,
    /// Longest wait for a completion while requests were in flight, less the time the runner
    /// spent firing an event while completions waited for it to look.
    pub longest_stall_ms: f64,
    pub blocks_verified: u64,
    pub blocks_wrong: u64,
    pub events: Vec<EventReport>,
    pub resync_bytes: u64,
    pub resync_seconds: Option<f64>,
    pub legs_up_to_date_at_end: bool,
    pub final_status: Value,
    pub passed: bool,
}

struct Leg {
    child: Option<Child>,
    socket: PathBuf,
    image: PathBuf,
    trigger: PathBuf,
    /// nbdkit's stderr (appended across restarts), kept with the daemon log.
    log: PathBuf,
    desc: LegDesc,
}

impl Leg {
    fn start(&mut self) -> Result<(), ScenarioError> {
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = Command::new("nbdkit");
        cmd.args(["--exit-with-parent", "-f", "-U"])
            .arg(&self.socket);
        for f in &self.desc.filters {
            cmd.arg(format!("--filter={f}"));
        }
        cmd.arg("file")
            .arg(format!("file={}", self.image.display()));
        for p in &self.desc.params {
            cmd.arg(p.replace("{trigger}", &self.trigger.display().to_string()));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| ScenarioError::Setup(format!("{}: {e}", self.log.display())))?;
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().map_err(|e| {
            ScenarioError::Setup(format!(
                "cannot start nbdkit (install it: apt-get install nbdkit): {e}"
            ))
        })?;
        self.child = Some(child);
        let t0 = Instant::now();
        while UnixStream::connect(&self.socket).is_err() {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(ScenarioError::Setup("nbdkit did not start".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.signal(libc::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Leg {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our child: SIGTERM for a clean shutdown.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn control(path: &Path, req: Value) -> Option<Value> {
    let s = UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut w = s.try_clone().ok()?;
    writeln!(w, "{req}").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

fn stamp(block: u64, seq: u64) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    for chunk in b.chunks_mut(16) {
        chunk[..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..].copy_from_slice(&seq.to_le_bytes());
    }
    b
}

fn leg_state(status: &Value, leg: usize) -> String {
    status["legs"][leg]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Runs `sc` in the scratch directory `dir`, narrating progress on stdout.
pub fn run(sc: &Scenario, dir: &Path) -> Result<Report, ScenarioError> {
    let size = transport::parse_size(&sc.disk_size).map_err(ScenarioError::Invalid)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| ScenarioError::Setup(format!("{}: {e}", dir.display())))?;
    let mut legs: Vec<Leg> = sc
        .legs
        .iter()
        .enumerate()
        .map(|(i, d)| Leg {
            child: None,
            socket: dir.join(format!("leg{i}.sock")),
            image: dir.join(format!("leg{i}.img")),
            trigger: dir.join(format!("leg{i}.trigger")),
            log: dir.join(format!("leg{i}.nbdkit.log")),
            desc: d.clone(),
        })
        .collect();
    for l in &mut legs {
        let f = std::fs::File::create(&l.image).map_err(|e| ScenarioError::Setup(e.to_string()))?;
        f.set_len(size)
            .map_err(|e| ScenarioError::Setup(e.to_string()))?;
        l.start()?;
    }
    let exe = std::env::current_exe().map_err(|e| ScenarioError::Setup(e.to_string()))?;
    let uris: Vec<String> = legs.iter().map(Leg::uri).collect();
    let mut create = Command::new(&exe);
    create.arg("create").arg("--assume-clean");
    for u in &uris {
        create.arg("--leg").arg(u);
    }
    let out = create
        .output()
        .map_err(|e| ScenarioError::Setup(e.to_string()))?;
    if !out.status.success() {
        return Err(ScenarioError::Setup(
            String::from_utf8_lossy(&out.stderr).to_string(),
        ));
    }
    let socket = dir.join("vhost.sock");
    let ctl = dir.join("control.sock");
    let _ = std::fs::remove_file(&socket);
    let log = std::fs::File::create(dir.join("daemon.log"))
        .map_err(|e| ScenarioError::Setup(e.to_string()))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("blk")
        .arg("--socket")
        .arg(&socket)
        .arg("--control")
        .arg(&ctl);
    for u in &uris {
        cmd.arg("--leg").arg(u);
    }
    cmd.args(&sc.daemon_args).stdout(Stdio::null()).stderr(log);
    let daemon = Daemon(
        cmd.spawn()
            .map_err(|e| ScenarioError::Setup(e.to_string()))?,
    );
    let t0 = Instant::now();
    while !socket.exists() {
        if t0.elapsed() > Duration::from_secs(20) {
            return Err(ScenarioError::Setup(format!(
                "the daemon did not start; see {}",
                dir.join("daemon.log").display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    let client_err = |e: blkio::Error| ScenarioError::Client(e.to_string());
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(client_err)?;
    b.set_str("path", &socket.display().to_string())
        .map_err(client_err)?;
    b.connect().map_err(client_err)?;
    let mut q = b.start().map_err(client_err)?.queues.remove(0);
    let qd = sc.workload.queue_depth;
    let region = b.alloc_mem_region(qd * 4096).map_err(client_err)?;
    b.map_mem_region(&region).map_err(client_err)?;
    let buf = |slot: usize| (region.addr + slot * 4096) as *mut u8;

    let blocks = sc.workload.blocks;
    let mut acked = vec![0u64; blocks as usize];
    let mut busy = vec![false; blocks as usize];
    let mut slots: Vec<Option<(u64, u64)>> = vec![None; qd];
    let (mut seq, mut ok, mut errors, mut rng) = (0u64, 0u64, 0u64, 0x2545_f491_4f6c_dd1du64);
    let mut comps: Vec<_> = (0..qd)
        .map(|_| std::mem::MaybeUninit::<blkio::Completion>::uninit())
        .collect();
    let mut events: Vec<(Event, bool)> = sc.events.iter().cloned().map(|e| (e, false)).collect();
    events.sort_by(|a, b| a.0.at.total_cmp(&b.0.at));
    let mut reports: Vec<EventReport> = Vec::new();
    // Faults whose detection we are still watching: (report index, leg, fired at).
    let mut watching: Vec<(usize, usize, Instant)> = Vec::new();
    let mut max_gap = Duration::ZERO;
    let mut last = Instant::now();
    // The runner's own time since the last completion (see the loop).
    let mut own_work = Duration::ZERO;
    let start = Instant::now();
    let mut last_poll = Instant::now();
    println!("scenario '{}': {}", sc.name, sc.description);
    loop {
        let t = start.elapsed();
        // Firing an event (a restart waits for the new server's socket) keeps the runner from
        // reaping. When completions wait once it is done, that time was the runner's, not a
        // stall of the daemon's, and it does not count in the gap before them; when none
        // wait, I/O was stalled anyway and it counts.
        for (e, done) in events
            .iter_mut()
            .filter(|(e, d)| !*d && t.as_secs_f64() >= e.at)
        {
            *done = true;
            let fired_at = Instant::now();
            let leg = &mut legs[e.leg];
            let fault = matches!(e.action.as_str(), "kill" | "stop" | "error-on" | "fail-leg");
            match e.action.as_str() {
                "kill" => leg.kill(),
                "restart" => leg.start()?,
                "stop" => leg.signal(libc::SIGSTOP),
                "cont" => leg.signal(libc::SIGCONT),
                "error-on" => std::fs::write(&leg.trigger, b"")
                    .map_err(|e| ScenarioError::Setup(e.to_string()))?,
                "error-off" => {
                    let _ = std::fs::remove_file(&leg.trigger);
                }
                "fail-leg" => {
                    control(&ctl, json!({"cmd": "fail-leg", "leg": e.leg}));
                }
                "re-add" => {
                    control(&ctl, json!({"cmd": "re-add", "leg": e.leg}));
                }
                _ => {}
            }
            own_work += fired_at.elapsed();
            println!("{:6.2}s  {} leg {}", t.as_secs_f64(), e.action, e.leg);
            if fault {
                watching.push((reports.len(), e.leg, Instant::now()));
            }
            reports.push(EventReport {
                at: t.as_secs_f64(),
                action: e.action.clone(),
                leg: e.leg,
                detected_after: None,
            });
        }
        if !watching.is_empty() && last_poll.elapsed() >= Duration::from_millis(10) {
            last_poll = Instant::now();
            if let Some(st) = control(&ctl, json!({"cmd": "status"})) {
                watching.retain(|&(r, leg, fired)| {
                    if leg_state(&st, leg) != "uptodate" {
                        reports[r].detected_after = Some(fired.elapsed().as_secs_f64());
                        println!(
                            "{:6.2}s  leg {leg} out of the up-to-date set after {:.0} ms",
                            start.elapsed().as_secs_f64(),
                            fired.elapsed().as_secs_f64() * 1000.0
                        );
                        false
                    } else {
                        true
                    }
                });
            }
        }
        let running = t < Duration::from_secs_f64(sc.workload.seconds);
        let mut inflight = slots.iter().filter(|s| s.is_some()).count();
        if running {
            for (slot, s) in slots.iter_mut().enumerate() {
                if s.is_some() {
                    continue;
                }
                let block = loop {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if !busy[(rng % blocks) as usize] {
                        break rng % blocks;
                    }
                };
                seq += 1;
                busy[block as usize] = true;
                *s = Some((block, seq));
                // SAFETY: the slot's 4 KiB lie inside the mapped region and no request uses them.
                unsafe {
                    std::ptr::copy_nonoverlapping(stamp(block, seq).as_ptr(), buf(slot), 4096)
                };
                q.write(block * 4096, buf(slot), 4096, slot, ReqFlags::empty());
                inflight += 1;
            }
        } else if inflight == 0 {
            // Events timed after the workload (a server resumed once the writes stopped) still
            // fire; only then does the wait for the resync begin.
            if events.iter().all(|(_, done)| *done) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        // Wake at least every 20 ms to fire events and poll the daemon, but never spin. Right
        // after an event only what already waits counts as having waited on the runner.
        let mut timeout = if own_work.is_zero() {
            Duration::from_millis(20)
        } else {
            Duration::ZERO
        };
        let n = match q.do_io(&mut comps, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) if e.errno() == blkio::Errno::TIME => 0,
            Err(e) => return Err(client_err(e)),
        };
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            let now = Instant::now();
            max_gap = max_gap.max((now - last).saturating_sub(own_work));
            own_work = Duration::ZERO;
            last = now;
            let Some((block, s)) = slots.get_mut(c.user_data).and_then(Option::take) else {
                continue;
            };
            busy[block as usize] = false;
            if c.ret == 0 {
                ok += 1;
                acked[block as usize] = s;
            } else {
                errors += 1;
            }
        }
        if n == 0 && inflight > 0 {
            max_gap = max_gap.max(last.elapsed());
        }
        if n == 0 {
            own_work = Duration::ZERO;
        }
    }
    println!(
        "{:6.2}s  workload done: {ok} writes acknowledged, {errors} errors",
        start.elapsed().as_secs_f64()
    );

    // Wait for every leg to be current again, measuring the resync.
    let wait_from = Instant::now();
    let mut resync_seen = Instant::now();
    let mut resync_seconds = None;
    let mut resync_bytes = 0u64;
    let mut saw_resync = false;
    let all_up = loop {
        let st = control(&ctl, json!({"cmd": "status"})).unwrap_or(Value::Null);
        if let Some(r) = st.get("resync").filter(|r| !r.is_null()) {
            if !saw_resync {
                saw_resync = true;
                resync_seen = Instant::now();
            }
            resync_bytes = resync_bytes.max(r["total_bytes"].as_u64().unwrap_or(0));
        }
        let up = (0..legs.len()).all(|i| leg_state(&st, i) == "uptodate");
        if up {
            if saw_resync {
                resync_seconds = Some(resync_seen.elapsed().as_secs_f64());
            }
            break true;
        }
        if wait_from.elapsed() > Duration::from_secs_f64(sc.wait_resync_seconds) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The daemon's own account of copied bytes, when the status poll missed a short resync.
    if let Ok(text) = std::fs::read_to_string(dir.join("daemon.log")) {
        // "...: 33554432 bytes copied in 0.3 s"
        for line in text.lines().filter(|l| l.contains("bytes copied in")) {
            let tail = line.rsplit(": ").next().unwrap_or("");
            let words: Vec<&str> = tail.split(' ').collect();
            if let Some(n) = words.first().and_then(|s| s.parse::<u64>().ok()) {
                resync_bytes = resync_bytes.max(n);
            }
            if let Some(secs) = words.get(4).and_then(|s| s.parse::<f64>().ok()) {
                resync_seconds = Some(resync_seconds.map_or(secs, |r: f64| r.max(secs)));
            }
        }
    }

    let mut wrong = 0u64;
    let mut verified = 0u64;
    for (block, &s) in acked.iter().enumerate() {
        if s == 0 {
            continue;
        }
        q.read(block as u64 * 4096, buf(0), 4096, 0, ReqFlags::empty());
        let mut timeout = Duration::from_secs(30);
        let n = q
            .do_io(&mut comps, 1, Some(&mut timeout), None)
            .map_err(client_err)?;
        // SAFETY: slot 0 is idle and inside the region; do_io filled comps[0] when n == 1.
        let good = n == 1
            && unsafe { comps[0].assume_init_ref() }.ret == 0
            && unsafe { std::slice::from_raw_parts(buf(0), 4096) } == stamp(block as u64, s);
        verified += 1;
        if !good {
            wrong += 1;
        }
    }
    let final_status = control(&ctl, json!({"cmd": "status"})).unwrap_or(Value::Null);
    drop(daemon);
    let passed = errors == 0 && wrong == 0 && all_up;
    Ok(Report {
        name: sc.name.clone(),
        writes_acknowledged: ok,
        guest_io_errors: errors,
        longest_stall_ms: max_gap.as_secs_f64() * 1000.0,
        blocks_verified: verified,
        blocks_wrong: wrong,
        events: reports,
        resync_bytes,
        resync_seconds,
        legs_up_to_date_at_end: all_up,
        final_status,
        passed,
    })
}

/// The report for people.
pub fn render(r: &Report) -> String {
    let mut s = format!("\n== {} ==\n", r.name);
    s += &format!(
        "writes acknowledged {}, guest I/O errors {}, longest stall {:.0} ms\n",
        r.writes_acknowledged, r.guest_io_errors, r.longest_stall_ms
    );
    s += &format!(
        "data verified: {} blocks read back, {} wrong\n",
        r.blocks_verified, r.blocks_wrong
    );
    for e in &r.events {
        s += &format!("  {:6.2}s {} leg {}", e.at, e.action, e.leg);
        if let Some(d) = e.detected_after {
            s += &format!(": detected after {:.0} ms", d * 1000.0);
        }
        s += "\n";
    }
    match r.resync_seconds {
        Some(t) => s += &format!("resync: {} bytes, {:.2} s\n", r.resync_bytes, t),
        None => s += &format!("resync: {} bytes\n", r.resync_bytes),
    }
    s += &format!(
        "legs up to date at the end: {}\n{}\n",
        if r.legs_up_to_date_at_end {
            "yes"
        } else {
            "NO"
        },
        if r.passed { "PASS" } else { "FAIL" }
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_scenarios_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "json") {
                Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(
            n >= 4,
            "expected the shipped scenarios in {}",
            dir.display()
        );
    }

    #[test]
    fn bad_scenarios_say_what_is_wrong() {
        let bad = |j: &str| {
            let s: Result<Scenario, _> = serde_json::from_str(j);
            match s {
                Ok(s) => s.check().unwrap_err().to_string(),
                Err(e) => e.to_string(),
            }
        };
        assert!(bad(r#"{"name":"x","legs":[{}]}"#).contains("two legs"));
        assert!(bad(
            r#"{"name":"x","legs":[{},{}],"events":[{"at":1,"action":"explode","leg":0}]}"#
        )
        .contains("unknown action 'explode'"));
        assert!(
            bad(r#"{"name":"x","legs":[{},{}],"events":[{"at":1,"action":"kill","leg":5}]}"#)
                .contains("bad leg")
        );
        assert!(bad(r#"{"name":"x","legs":[{},{}],"colour":"red"}"#).contains("colour"));
        assert!(bad(r#"{"name":"x","legs":[{},{}],"disk_size":"lots"}"#).contains("lots"));
    }
}
