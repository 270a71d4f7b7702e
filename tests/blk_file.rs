//! Two local `file:` legs under a libblkio client: the queue worker submits and reaps their I/O
//! in its own io_uring (the default), or hands it to the legs' threads (`--leg-threads`).

mod common;
use common::*;
use std::time::Duration;

const BLOCKS: u64 = 4096;

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
        let dir = TempDir::on_disk(if leg_threads {
            "legthreads"
        } else {
            "queuering"
        });
        let legs = file_legs(&dir);
        let extra: &[&str] = if leg_threads { &["--leg-threads"] } else { &[] };
        let mut d = Daemon::start(&dir, &legs, extra);
        let mut c = Client::connect(&d.socket, 16);
        check_leg_thread_sleeps(&d, &mut c, BLOCKS, "file-leg", leg_threads);
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
    let dir = TempDir::on_disk("filefail");
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
    let dir = TempDir::on_disk("fileleave");
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

/// With two queues, each worker drives its own ring: the worker of an idle queue sleeps while
/// the other queue's file I/O goes on (a shared ring would wake it for every completion).
#[test]
fn each_queue_worker_drives_its_own_ring() {
    let _serial = exclusive();
    let dir = TempDir::on_disk("tworings");
    let legs = file_legs(&dir);
    let mut d = Daemon::start(&dir, &legs, &["--num-queues", "2"]);
    let (mut c, mut extra) = Client::connect_queues(&d.socket, 16, 2);
    let q1 = &mut extra[0];
    let pid = d.child.id();
    let before = sleeps_per_thread(pid, "vring_worker");
    assert_eq!(before.len(), 2, "one worker per queue: {before:?}");
    let mut comps: Vec<_> = (0..16)
        .map(|_| std::mem::MaybeUninit::<blkio::Completion>::uninit())
        .collect();
    let mut writes = 0u64;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(1) {
        for slot in 0..16 {
            c.slice(slot, 4096).fill(slot as u8 + 1);
            let offset = ((writes + slot as u64) % BLOCKS) * 4096;
            q1.write(offset, c.buf(slot), 4096, slot, blkio::ReqFlags::empty());
        }
        let mut t = Duration::from_secs(30);
        let n = q1.do_io(&mut comps, 16, Some(&mut t), None).unwrap();
        assert_eq!(n, 16, "queue 1 did not answer");
        for done in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            assert_eq!(unsafe { done.assume_init_ref() }.ret, 0);
        }
        writes += 16;
    }
    let after = sleeps_per_thread(pid, "vring_worker");
    let deltas: Vec<u64> = after
        .iter()
        .map(|(tid, n)| n - before.get(tid).copied().unwrap_or(0))
        .collect();
    let idle = *deltas.iter().min().unwrap();
    assert!(
        idle < writes / 100,
        "the idle queue's worker slept {idle} times over {writes} writes on the other queue \
         (per worker: {deltas:?})"
    );
    assert_eq!(c.write(0, &pattern(4, 4096)), 0);
    assert_eq!(c.read(0, 4096).unwrap(), pattern(4, 4096));
    drop(extra);
    drop(c);
    d.terminate();
    assert_legs_equal(&dir);
}
