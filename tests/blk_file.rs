//! Two local `file:` legs under a libblkio client: the queue worker submits and reaps their I/O
//! in its own io_uring (the default), or hands it to the legs' threads (`--leg-threads`).

mod common;
use common::*;
use std::time::Duration;

const DISK: u64 = 64 << 20;
const BLOCKS: u64 = 4096;

/// Two images on a real file system (O_DIRECT works there; /tmp may be tmpfs), created clean.
fn file_legs(dir: &TempDir) -> Vec<String> {
    let legs: Vec<String> = (0..2)
        .map(|i| {
            let p = dir.path(&format!("leg{i}.img"));
            image(&p, DISK);
            format!("file:{}", p.display())
        })
        .collect();
    create(&legs, &["--assume-clean"]);
    legs
}

fn var_tmp(name: &str) -> TempDir {
    let dir = TempDir(
        std::path::PathBuf::from("/var/tmp").join(format!("vhm-{name}-{}", std::process::id())),
    );
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    dir
}

/// Voluntary context switches (sleeps) of the daemon's threads called `name`, so far.
fn sleeps_of(pid: u32, name: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn assert_legs_equal(dir: &TempDir) {
    let a = std::fs::read(dir.path("leg0.img")).unwrap();
    let b = std::fs::read(dir.path("leg1.img")).unwrap();
    // The end of each image holds the leg's metadata.
    let end = (BLOCKS * 4096) as usize;
    assert!(a[..end] == b[..end], "file legs differ");
}

/// By default the legs' own threads sleep through a mirrored workload: the queue's worker
/// submits and reaps both legs' I/O itself. With `--leg-threads` they wake for it, which shows
/// the count below can tell the two apart.
#[test]
fn file_leg_io_stays_on_the_queue_worker() {
    let _serial = exclusive();
    for leg_threads in [false, true] {
        let dir = var_tmp(if leg_threads {
            "legthreads"
        } else {
            "queuering"
        });
        let legs = file_legs(&dir);
        let extra: &[&str] = if leg_threads { &["--leg-threads"] } else { &[] };
        let mut d = Daemon::start(&dir, &legs, extra);
        let mut c = Client::connect(&d.socket, 16);
        let before = sleeps_of(d.child.id(), "file-leg");
        let rep = stamped_workload(&mut c, BLOCKS, 16, Duration::from_secs(1), |_| {});
        let sleeps = sleeps_of(d.child.id(), "file-leg") - before;
        assert_eq!(rep.errors, 0, "{}", d.log_text());
        assert!(rep.writes_ok > 1000, "only {} writes", rep.writes_ok);
        if leg_threads {
            assert!(
                sleeps > rep.writes_ok / 20,
                "leg threads slept {sleeps} times over {} writes",
                rep.writes_ok
            );
        } else {
            assert!(
                sleeps < rep.writes_ok / 100,
                "leg threads slept {sleeps} times over {} writes: the queue's io_uring is not \
                 taking the I/O",
                rep.writes_ok
            );
        }
        assert_eq!(verify_acked(&mut c, &rep.acked), 0);
        drop(c);
        d.terminate();
        assert_legs_equal(&dir);
    }
}

/// An operator fails a leg while the worker's ring holds its writes: the abort reaches the
/// ring, the guest sees no error, and the leg comes back in sync.
#[test]
fn a_file_leg_failed_under_load_comes_back_in_sync() {
    let _serial = exclusive();
    let dir = var_tmp("filefail");
    let legs = file_legs(&dir);
    let mut d = Daemon::start(&dir, &legs, &[]);
    let mut c = Client::connect(&d.socket, 32);
    let control = d.control.clone();
    let mut failed = false;
    let rep = stamped_workload(&mut c, BLOCKS, 32, Duration::from_secs(2), |t| {
        if !failed && t > Duration::from_millis(700) {
            failed = true;
            assert_eq!(ctl(&control, r#"{"cmd":"fail-leg","leg":1}"#)["ok"], true);
        }
    });
    assert!(failed);
    assert_eq!(rep.errors, 0, "{}", d.log_text());
    assert_eq!(d.leg_state(1), "failed");
    assert_eq!(verify_acked(&mut c, &rep.acked), 0);
    assert_eq!(
        ctl(&d.control, r#"{"cmd":"re-add","leg":1}"#)["ok"],
        true,
        "{}",
        d.log_text()
    );
    d.wait_leg(1, "uptodate", Duration::from_secs(30));
    // More writes with both legs up, then both must hold the same data.
    let rep = stamped_workload(&mut c, BLOCKS, 32, Duration::from_millis(500), |_| {});
    assert_eq!(rep.errors, 0, "{}", d.log_text());
    drop(c);
    d.terminate();
    assert_legs_equal(&dir);
}

/// The frontend goes away with writes in the worker's ring: they finish before the next
/// frontend is served, and the legs stay equal.
#[test]
fn a_frontend_that_leaves_with_file_io_in_flight() {
    let _serial = exclusive();
    let dir = var_tmp("fileleave");
    let legs = file_legs(&dir);
    let mut d = Daemon::start(&dir, &legs, &[]);
    for round in 0..3u8 {
        let mut c = Client::connect(&d.socket, 32);
        for slot in 0..32 {
            c.slice(slot, 4096).fill(round + 1);
            let offset = (slot as u64 * 64 + u64::from(round)) * 4096;
            c.q.write(offset, c.buf(slot), 4096, slot, blkio::ReqFlags::empty());
        }
        // Submitted, not reaped: the frontend disconnects with them outstanding.
        let mut comps: Vec<_> = (0..32)
            .map(|_| std::mem::MaybeUninit::<blkio::Completion>::uninit())
            .collect();
        c.q.do_io(&mut comps, 0, None, None).unwrap();
        drop(c);
    }
    let mut c = Client::connect(&d.socket, 4);
    assert_eq!(c.write(0, &pattern(5, 4096)), 0);
    assert_eq!(c.read(0, 4096).unwrap(), pattern(5, 4096));
    assert_eq!(c.flush(), 0);
    drop(c);
    assert!(
        !d.log_text().contains("still in flight"),
        "{}",
        d.log_text()
    );
    assert_eq!(d.leg_state(0), "uptodate");
    assert_eq!(d.leg_state(1), "uptodate");
    d.terminate();
    assert_legs_equal(&dir);
}
