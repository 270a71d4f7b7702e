//! The end-to-end proof in a real guest: QEMU (TCG) boots a Debian kernel with a busybox + fio
//! initramfs (`scripts/guest-image`), attached to the `vhost-mirror` daemon as a
//! vhost-user-blk-pci device over two nbdkit legs. Inside the guest fio writes /dev/vda with
//! crc32c verify headers and reads everything back. Three seconds after fio starts one leg's
//! server is killed, hung, made to fail every request, or (slow leg) delays every write; the guest
//! must see nothing: fio exits 0 with no verify error and the guest kernel logs no I/O error.
//! When the leg is back and resynced, both legs must hold the same data, byte for byte. One test
//! runs the same over two `file:` legs, failing one from the control socket.
//!
//! `VHM_SKIP_GUEST=1` skips these tests (loudly); otherwise a missing QEMU, kernel, busybox or fio
//! is installed by `scripts/guest-image`, and a failure to do so fails the tests.

mod common;
use common::*;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What fio writes in the guest: 40 MiB of 4 KiB random writes (each block once), throttled to
/// 1000 writes/s so the write phase lasts about 10 s under TCG and a fault lands mid-run.
const FIO_SIZE: u64 = 40 << 20;
const FIO_WRITE_IOPS: u64 = 1000;
/// When the fault is injected, after fio starts.
const FAULT_AT: Duration = Duration::from_secs(3);
/// From `VHM-FIO-START` on, the guest must be done within this.
const RUN_LIMIT: Duration = Duration::from_secs(240);
/// From QEMU's start, fio must start within this.
const BOOT_LIMIT: Duration = Duration::from_secs(120);
const IO_TIMEOUT_MS: &str = "1000";

struct GuestImage {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Builds (or finds cached) the guest kernel and initramfs once per test process; None when
/// `VHM_SKIP_GUEST=1`.
fn guest_image() -> Option<&'static GuestImage> {
    if std::env::var("VHM_SKIP_GUEST").as_deref() == Ok("1") {
        eprintln!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !!! VHM_SKIP_GUEST=1: the QEMU guest test is SKIPPED, nothing was proven !!!\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
        return None;
    }
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    Some(IMAGE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest-image");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} failed ({}): {stdout}",
            script.display(),
            out.status
        );
        let get = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("guest-image printed no {key}: {stdout}"))
        };
        let img = GuestImage {
            kernel: get("KERNEL="),
            initrd: get("INITRD="),
        };
        assert!(img.kernel.exists() && img.initrd.exists());
        img
    }))
}

/// fio's command line in the guest (everything after `--` on the kernel command line is handed
/// to the initramfs's /init, which passes it to fio).
fn fio_args() -> Vec<String> {
    [
        "--name=vhm",
        "--filename=/dev/vda",
        "--ioengine=libaio",
        "--direct=1",
        "--thread",
        "--rw=randwrite",
        "--bs=4k",
        &format!("--size={FIO_SIZE}"),
        "--iodepth=16",
        &format!("--rate_iops=,{FIO_WRITE_IOPS}"),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--eta=never",
        "--output-format=normal,json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A QEMU guest whose serial console is captured to a log file; killed on drop.
struct Guest {
    child: Child,
    console: Arc<Mutex<String>>,
    log: PathBuf,
    qemu_err: PathBuf,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Guest {
    fn boot(img: &GuestImage, vhost_socket: &Path, dir: &TempDir, fio: &[String]) -> Guest {
        let log = dir.path("console.log");
        let qemu_err = dir.path("qemu.err");
        let append = format!(
            "console=ttyS0 panic=-1 quiet loglevel=4 -- {}",
            fio.join(" ")
        );
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1"])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=vhm,path={}", vhost_socket.display()))
            .args(["-device", "vhost-user-blk-pci,chardev=vhm,num-queues=1"])
            .args(["-nic", "none", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&img.kernel)
            .arg("-initrd")
            .arg(&img.initrd)
            .arg("-append")
            .arg(append)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&qemu_err).unwrap());
        let mut child = cmd
            .spawn()
            .expect("qemu-system-x86_64 missing although scripts/guest-image ran");
        let mut out = child.stdout.take().unwrap();
        let console = Arc::new(Mutex::new(String::new()));
        let c = console.clone();
        let mut file = std::fs::File::create(&log).unwrap();
        let reader = std::thread::spawn(move || {
            use std::io::Write;
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
        Guest {
            child,
            console,
            log,
            qemu_err,
            reader: Some(reader),
        }
    }

    fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    fn has(&self, marker: &str) -> bool {
        self.console.lock().unwrap().contains(marker)
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// The console and QEMU's stderr, for failure messages.
    fn dump(&self) -> String {
        format!(
            "--- guest console ({}) ---\n{}\n--- qemu stderr ---\n{}",
            self.log.display(),
            self.console(),
            std::fs::read_to_string(&self.qemu_err).unwrap_or_default()
        )
    }

    /// Waits for `marker` on the console; panics if QEMU exits first or after `limit`.
    fn wait_marker(&mut self, marker: &str, limit: Duration) {
        let t0 = Instant::now();
        while !self.has(marker) {
            if let Some(st) = self.exited() {
                // The last bytes may still be in the pipe.
                std::thread::sleep(Duration::from_millis(200));
                if self.has(marker) {
                    return;
                }
                panic!("QEMU exited ({st}) before {marker}\n{}", self.dump());
            }
            assert!(
                t0.elapsed() < limit,
                "no {marker} on the guest console after {limit:?}\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for QEMU to exit and its console output to drain.
    fn finish(&mut self) -> String {
        let st = self.child.wait().unwrap();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        assert!(st.success(), "QEMU exited with {st}\n{}", self.dump());
        self.console()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the guest reported.
struct Outcome {
    console: String,
    fio: Value,
    /// When fio started, and when it exited, after `Instant`s seen by the harness.
    fio_start: Instant,
    fio_end: Instant,
}

impl Outcome {
    fn write_lat_ms(&self) -> f64 {
        self.fio["jobs"][0]["write"]["clat_ns"]["mean"]
            .as_f64()
            .unwrap()
            / 1e6
    }

    /// fio's summary lines ("write: IOPS=...", "read: IOPS=...").
    fn summary(&self) -> String {
        self.console
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                t.starts_with("write: IOPS") || t.starts_with("read: IOPS")
            })
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

/// The text between two markers on their own lines.
fn section<'a>(console: &'a str, begin: &str, end: &str) -> Option<&'a str> {
    let b = console.find(begin)? + begin.len();
    let e = b + console[b..].find(end)?;
    Some(&console[b..e])
}

/// Boots the guest on the rig's daemon and runs fio to the end, calling `during` every ~20 ms
/// from the moment fio starts with the time since then. Asserts what the guest must show: fio
/// exited 0, wrote and verified every block, no verify error, no kernel error line.
fn run_guest(
    rig: &mut Rig,
    img: &GuestImage,
    mut during: impl FnMut(&mut Rig, Duration),
) -> Outcome {
    let t_boot = Instant::now();
    let mut guest = Guest::boot(img, &rig.daemon.socket, &rig.dir, &fio_args());
    guest.wait_marker("VHM-FIO-START", BOOT_LIMIT);
    let fio_start = Instant::now();
    let sectors: u64 = guest
        .console()
        .lines()
        .find_map(|l| l.trim().strip_prefix("VHM-DISK="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VHM-DISK line\n{}", guest.dump()));
    let capacity = rig.daemon.status()["capacity"].as_u64().unwrap();
    assert_eq!(
        sectors * 512,
        capacity,
        "guest disk size vs the daemon's capacity"
    );
    eprintln!(
        "guest: fio started {:.1}s after QEMU's start",
        (fio_start - t_boot).as_secs_f64()
    );
    let mut fio_end = None;
    loop {
        let el = fio_start.elapsed();
        if fio_end.is_none() && guest.has("VHM-FIO-EXIT=") {
            fio_end = Some(Instant::now());
        }
        if guest.exited().is_some() {
            break;
        }
        assert!(
            el < RUN_LIMIT,
            "guest still running {RUN_LIMIT:?} after fio started\n{}\n--- daemon ---\n{}",
            guest.dump(),
            rig.daemon.log_text()
        );
        during(rig, el);
        std::thread::sleep(Duration::from_millis(20));
    }
    let console = guest.finish();
    let fio_end = fio_end.unwrap_or_else(Instant::now);
    let ctx = || {
        format!(
            "{}\n--- daemon log ---\n{}",
            guest.dump(),
            rig.daemon.log_text()
        )
    };

    let code: i32 = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("VHM-FIO-EXIT="))
        .unwrap_or_else(|| panic!("fio never exited in the guest\n{}", ctx()))
        .trim()
        .parse()
        .unwrap();
    let kernel_errors: Vec<&str> = section(&console, "VHM-DMESG-BEGIN\n", "VHM-DMESG-END")
        .unwrap_or_else(|| panic!("no kernel log section on the console\n{}", ctx()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let verify_errors: Vec<&str> = console
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("verify failed") || l.contains("bad magic") || l.contains("verify: bad")
        })
        .collect();
    assert!(
        code == 0 && kernel_errors.is_empty() && verify_errors.is_empty(),
        "guest saw the fault: fio exit {code}, kernel errors {kernel_errors:?}, \
         verify errors {verify_errors:?}\n{}",
        ctx()
    );

    // fio's JSON report: every block written once and read back verified, no job error.
    let json = section(&console, "\n{\n", "\n}\n")
        .map(|s| format!("{{\n{s}\n}}"))
        .unwrap_or_else(|| panic!("no fio JSON report on the console\n{}", ctx()));
    let fio: Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("fio JSON report unreadable ({e})\n{}", ctx()));
    let job = &fio["jobs"][0];
    assert_eq!(job["error"], 0, "fio job error: {job}");
    assert_eq!(
        job["write"]["io_bytes"].as_u64(),
        Some(FIO_SIZE),
        "fio did not write everything: {}",
        job["write"]
    );
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(FIO_SIZE),
        "fio did not read everything back for verify: {}",
        job["read"]
    );
    let out = Outcome {
        console,
        fio,
        fio_start,
        fio_end,
    };
    eprintln!(
        "guest: fio exit 0 after {:.1}s, {}",
        (out.fio_end - out.fio_start).as_secs_f64(),
        out.summary()
    );
    out
}

/// After the daemon's clean stop both legs must hold the same data over the guest-visible area,
/// and that data must be fio's (every block fio wrote is non-zero).
fn assert_legs_identical(rig: &mut Rig) {
    let st = rig.daemon.status();
    assert!(st["resync"].is_null(), "resync still running: {st}");
    for i in 0..2 {
        assert_eq!(st["legs"][i]["state"], "uptodate", "{st}");
    }
    let capacity = st["capacity"].as_u64().unwrap() as usize;
    assert!(capacity >= FIO_SIZE as usize && capacity < DISK as usize);
    rig.daemon.terminate();
    let (a, b) = (rig.image(0), rig.image(1));
    let blocks = capacity / 4096;
    let differ: Vec<usize> = (0..blocks)
        .filter(|&k| a[k * 4096..(k + 1) * 4096] != b[k * 4096..(k + 1) * 4096])
        .collect();
    assert!(
        differ.is_empty(),
        "{} of {blocks} 4 KiB blocks differ between the legs, first at byte {}",
        differ.len(),
        differ[0] * 4096
    );
    assert_eq!(a[..capacity], b[..capacity]);
    let zero = (0..(FIO_SIZE / 4096) as usize)
        .filter(|&k| a[k * 4096..(k + 1) * 4096].iter().all(|&x| x == 0))
        .count();
    assert_eq!(zero, 0, "{zero} blocks fio wrote are zero on the legs");
    eprintln!(
        "legs identical over {capacity} bytes ({blocks} blocks); all {} fio blocks present",
        FIO_SIZE / 4096
    );
}

/// Watches leg 1 after a fault: when the daemon first reports it failed.
struct Detect {
    injected: Option<Instant>,
    failed_after: Option<Duration>,
}

impl Detect {
    fn new() -> Detect {
        Detect {
            injected: None,
            failed_after: None,
        }
    }

    fn inject(&mut self) {
        self.injected = Some(Instant::now());
    }

    fn poll(&mut self, rig: &Rig) {
        if let (Some(t), None) = (self.injected, self.failed_after) {
            if rig.daemon.leg_state(1) == "failed" {
                self.failed_after = Some(t.elapsed());
            }
        }
    }

    fn report(&self, rig: &Rig, what: &str) -> Duration {
        let d = self.failed_after.unwrap_or_else(|| {
            panic!(
                "leg 1 was never reported failed after {what}\n{}",
                rig.daemon.log_text()
            )
        });
        let ejected = rig
            .daemon
            .log_text()
            .lines()
            .find(|l| l.contains("ejected"))
            .unwrap_or("(no ejection line)")
            .to_string();
        eprintln!(
            "{what}: daemon status showed leg 1 failed {} ms after the fault; log: {ejected}",
            d.as_millis()
        );
        d
    }
}

fn rig(name: &str, filters: [&[&str]; 2], params: [&[&str]; 2]) -> Rig {
    Rig::start(name, filters, params, &["--io-timeout", IO_TIMEOUT_MS])
}

/// (a) Leg 1's server is killed (SIGKILL) 3 s into fio; it comes back after the run and is
/// resynced.
#[test]
fn guest_survives_leg_server_killed() {
    let Some(img) = guest_image() else { return };
    let mut r = rig("g-kill", [&[], &[]], [&[], &[]]);
    let t0 = Instant::now(); // after the rig: not counting the wait for the lock
    let mut det = Detect::new();
    run_guest(&mut r, img, |r, el| {
        if el >= FAULT_AT && det.injected.is_none() {
            r.legs[1].kill();
            det.inject();
        }
        det.poll(r);
    });
    let d = det.report(&r, "kill -9 of leg 1's server");
    assert!(d < Duration::from_secs(2), "ejection took {d:?}");
    r.legs[1].restart();
    re_add(&r, 1);
    r.wait_leg(1, "uptodate", Duration::from_secs(60));
    assert_legs_identical(&mut r);
    eprintln!(
        "guest_survives_leg_server_killed: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

/// (b) Leg 1's server hangs (SIGSTOP) 3 s into fio: the daemon ejects it after the I/O timeout;
/// after the run it resumes and is re-added and resynced.
#[test]
fn guest_survives_leg_server_hung() {
    let Some(img) = guest_image() else { return };
    let mut r = rig("g-hang", [&[], &[]], [&[], &[]]);
    let t0 = Instant::now(); // after the rig: not counting the wait for the lock
    let mut det = Detect::new();
    let out = run_guest(&mut r, img, |r, el| {
        if el >= FAULT_AT && det.injected.is_none() {
            signal(&r.legs[1].child, libc::SIGSTOP);
            det.inject();
        }
        det.poll(r);
    });
    let d = det.report(&r, "SIGSTOP of leg 1's server");
    let timeout = Duration::from_millis(IO_TIMEOUT_MS.parse().unwrap());
    assert!(
        d >= timeout / 2 && d < timeout * 3,
        "hung leg ejected after {d:?}, I/O timeout {timeout:?}"
    );
    let max_ms = out.fio["jobs"][0]["write"]["clat_ns"]["max"]
        .as_f64()
        .unwrap()
        / 1e6;
    eprintln!("hung leg: fio's longest write took {max_ms:.0} ms");
    signal(&r.legs[1].child, libc::SIGCONT);
    re_add(&r, 1);
    r.wait_leg(1, "uptodate", Duration::from_secs(60));
    assert_legs_identical(&mut r);
    eprintln!(
        "guest_survives_leg_server_hung: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

/// (c) Leg 1 starts failing every request (nbdkit's error filter, EIO) 3 s into fio; after the
/// run the errors stop, and the leg is re-added and resynced.
#[test]
fn guest_survives_erroring_leg() {
    let Some(img) = guest_image() else { return };
    let trig_dir = TempDir::new("g-err-trigger");
    let trigger = trig_dir.path("fail-now");
    let err_file = format!("error-file={}", trigger.display());
    let mut r = rig(
        "g-err",
        [&[], &["error"]],
        [&[], &["error=EIO", "error-rate=100%", &err_file]],
    );
    let t0 = Instant::now(); // after the rig: not counting the wait for the lock
    let mut det = Detect::new();
    run_guest(&mut r, img, |r, el| {
        if el >= FAULT_AT && det.injected.is_none() {
            std::fs::write(&trigger, b"").unwrap();
            det.inject();
        }
        det.poll(r);
    });
    det.report(&r, "error filter on leg 1 (every request EIO)");
    let st = r.daemon.status();
    assert!(
        st["legs"][1]["last_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{st}"
    );
    std::fs::remove_file(&trigger).unwrap();
    re_add(&r, 1);
    r.wait_leg(1, "uptodate", Duration::from_secs(60));
    assert_legs_identical(&mut r);
    eprintln!(
        "guest_survives_erroring_leg: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

/// (d) Leg 1 is slow (every write delayed 20 ms, well under the 1 s I/O timeout): it must stay
/// in the mirror the whole run, and the guest must still pass.
#[test]
fn guest_runs_on_slow_leg_without_ejecting_it() {
    let Some(img) = guest_image() else { return };
    let mut r = rig("g-slow", [&[], &["delay"]], [&[], &["delay-write=20ms"]]);
    let t0 = Instant::now(); // after the rig: not counting the wait for the lock
    let mut left = Vec::new();
    let out = run_guest(&mut r, img, |r, el| {
        let s = r.daemon.leg_state(1);
        if s != "uptodate" {
            left.push(format!("{s} at {el:?}"));
        }
    });
    assert!(left.is_empty(), "slow leg left the mirror: {left:?}");
    let st = r.daemon.status();
    assert_eq!(st["legs"][1]["errors"], 0, "{st}");
    assert!(
        !r.daemon.log_text().contains("ejected"),
        "{}",
        r.daemon.log_text()
    );
    let lat = out.write_lat_ms();
    eprintln!("slow leg: fio mean write latency {lat:.1} ms");
    assert!(
        lat >= 20.0,
        "writes did not wait for the slow leg: {lat} ms"
    );
    assert_legs_identical(&mut r);
    eprintln!(
        "guest_runs_on_slow_leg_without_ejecting_it: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

/// (e) Leg 1's server is killed 3 s into fio and back 3 s later while fio still writes: the
/// resync runs under guest I/O and finishes before fio does.
#[test]
fn guest_survives_leg_lost_and_resynced_mid_run() {
    let Some(img) = guest_image() else { return };
    let mut r = rig("g-return", [&[], &[]], [&[], &[]]);
    let t0 = Instant::now(); // after the rig: not counting the wait for the lock
    let mut det = Detect::new();
    let mut back: Option<Instant> = None;
    let mut states = Vec::<String>::new();
    let mut uptodate_at: Option<Instant> = None;
    let out = run_guest(&mut r, img, |r, el| {
        if el >= FAULT_AT && det.injected.is_none() {
            r.legs[1].kill();
            det.inject();
        }
        det.poll(r);
        if el >= FAULT_AT * 2 && back.is_none() && det.failed_after.is_some() {
            r.legs[1].restart();
            re_add(r, 1);
            back = Some(Instant::now());
        }
        if back.is_some() && uptodate_at.is_none() {
            let s = r.daemon.status();
            let state = s["legs"][1]["state"].as_str().unwrap().to_string();
            if states.last() != Some(&state) {
                states.push(state.clone());
            }
            if state == "uptodate" && s["resync"].is_null() {
                uptodate_at = Some(Instant::now());
            }
        }
    });
    det.report(&r, "kill -9 of leg 1's server (mid-run return)");
    let back = back.expect("leg 1 never restarted during the run");
    let up = uptodate_at.unwrap_or_else(|| {
        panic!(
            "leg 1 not resynced before the guest finished (states {states:?})\n{}",
            r.daemon.log_text()
        )
    });
    eprintln!(
        "mid-run return: server back at {:.1}s of fio, leg 1 states {states:?}, up to date \
         {} ms later; fio ended at {:.1}s",
        (back - out.fio_start).as_secs_f64(),
        (up - back).as_millis(),
        (out.fio_end - out.fio_start).as_secs_f64()
    );
    assert!(
        up < out.fio_end,
        "resync finished only after fio ({:?} after fio's end)",
        up - out.fio_end
    );
    assert_legs_identical(&mut r);
    eprintln!(
        "guest_survives_leg_lost_and_resynced_mid_run: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

/// (f) Two `file:` legs, which the queue's worker drives through its own io_uring: an operator
/// fails leg 1 (`ctl fail-leg`) 3 s into fio, while the worker's ring holds its writes; the
/// guest sees nothing, and after the run leg 1 is re-added and resynced.
#[test]
fn guest_on_file_legs_survives_a_failed_leg() {
    let Some(img) = guest_image() else { return };
    let mut r = Rig::files("g-files", &["--io-timeout", IO_TIMEOUT_MS]);
    let t0 = Instant::now(); // after the rig: not counting the wait for the lock
    let mut failed = false;
    run_guest(&mut r, img, |r, el| {
        if el >= FAULT_AT && !failed {
            let ok = ctl(&r.daemon.control, r#"{"cmd":"fail-leg","leg":1}"#);
            assert_eq!(ok["ok"], true, "{ok}");
            failed = true;
        }
    });
    assert!(failed, "the guest finished before the fault");
    assert_eq!(r.daemon.leg_state(1), "failed");
    re_add(&r, 1);
    r.wait_leg(1, "uptodate", Duration::from_secs(60));
    assert_legs_identical(&mut r);
    eprintln!(
        "guest_on_file_legs_survives_a_failed_leg: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
