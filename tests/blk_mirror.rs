//! The mirrored disk end to end: the real `vhost-mirror` binary, two nbdkit servers as legs, and
//! libblkio as the vhost-user-blk client. Each test injects a real fault on a real leg.

mod common;
use common::*;

use std::time::Duration;

#[test]
fn data_reads_back_and_both_legs_are_identical() {
    let mut r = Rig::plain("identical", &[]);
    let mut c = Client::connect(&r.daemon.socket, 8);
    // The guest sees the legs less their metadata (bitmap and two superblocks).
    assert_eq!(c.capacity, DISK - 3 * 4096);
    let end = c.capacity;
    let writes: Vec<(u64, usize)> = vec![
        (0, 4096),
        (8192, 65536),
        (1 << 20, 512),
        (end - 4096, 4096),
        (12345 * 512, 3072),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        assert_eq!(c.write(off, &pattern(i as u64, len)), 0, "write at {off}");
    }
    assert_eq!(c.flush(), 0);
    for (i, &(off, len)) in writes.iter().enumerate() {
        assert_eq!(
            c.read(off, len).unwrap(),
            pattern(i as u64, len),
            "read-back at {off}"
        );
    }
    // Discard and write-zeroes reach both legs too.
    assert_eq!(c.write_zeroes(8192, 65536), 0);
    assert_eq!(c.read(8192, 65536).unwrap(), vec![0; 65536]);
    assert_eq!(c.discard(0, 4096), 0);
    let st = r.daemon.status();
    for leg in 0..2 {
        assert_eq!(st["legs"][leg]["state"], "uptodate");
        assert_eq!(st["legs"][leg]["errors"], 0);
    }
    assert!(st["legs"][0]["bytes_written"].as_u64().unwrap() >= 4096 + 65536 + 512 + 4096 + 3072);
    drop(c);
    r.daemon.terminate();
    let (a, b) = (r.image(0), r.image(1));
    assert_eq!(a.len(), DISK as usize);
    assert!(
        a[..end as usize] == b[..end as usize],
        "leg data differs after a clean run"
    );
    assert_eq!(&a[(1 << 20)..(1 << 20) + 512], &pattern(2, 512)[..]);
}

/// The issue's acceptance run: stamped 4 KiB writes at QD16 for 10 s, one leg's server killed 3 s
/// in: no error, no stall over 1 s, every acknowledged block reads back.
#[test]
fn leg_server_killed_during_random_writes() {
    let mut r = Rig::plain("kill", &[]);
    let mut c = Client::connect(&r.daemon.socket, 16);
    let mut killed = false;
    let legs = &mut r.legs;
    let rep = stamped_workload(&mut c, 4096, 16, Duration::from_secs(10), |t| {
        if !killed && t >= Duration::from_secs(3) {
            killed = true;
            signal(&legs[1].child, libc::SIGKILL);
        }
    });
    assert!(killed);
    eprintln!(
        "kill: {} writes acknowledged, {} errors, longest gap {:?}",
        rep.writes_ok, rep.errors, rep.max_gap
    );
    assert_eq!(rep.errors, 0, "the client saw errors");
    assert!(
        rep.max_gap < Duration::from_secs(1),
        "completions stalled for {:?}",
        rep.max_gap
    );
    assert!(
        rep.writes_ok > 1000,
        "too little I/O to mean anything: {}",
        rep.writes_ok
    );
    assert_eq!(
        verify_acked(&mut c, &rep.acked),
        0,
        "acknowledged blocks lost"
    );
    let st = r.daemon.status();
    assert_eq!(st["legs"][1]["state"], "failed");
    assert_eq!(st["legs"][0]["state"], "uptodate");
    assert!(r.daemon.last_error(1).contains("ejected"));
    assert!(
        r.daemon.log_text().contains("ejected"),
        "ejection not logged"
    );
}

/// nbdkit's error filter switched on mid-run through its trigger file.
#[test]
fn erroring_leg_is_ejected_without_client_errors() {
    let dir_probe = TempDir::new("errors-trigger");
    let trigger = dir_probe.path("fail-now");
    let trig_param = format!("error-file={}", trigger.display());
    let r = Rig::start(
        "errors",
        [&[], &["error"]],
        [&[], &["error-rate=100%", &trig_param]],
        &[],
    );
    let mut c = Client::connect(&r.daemon.socket, 16);
    let mut on = false;
    let rep = stamped_workload(&mut c, 2048, 16, Duration::from_secs(4), |t| {
        if !on && t >= Duration::from_secs(1) {
            on = true;
            std::fs::write(&trigger, b"").unwrap();
        }
    });
    eprintln!(
        "errors: {} writes, {} errors, gap {:?}",
        rep.writes_ok, rep.errors, rep.max_gap
    );
    assert_eq!(rep.errors, 0);
    assert_eq!(verify_acked(&mut c, &rep.acked), 0);
    let st = r.daemon.status();
    assert_eq!(st["legs"][1]["state"], "failed");
    assert!(st["legs"][1]["errors"].as_u64().unwrap() >= 1);
    assert!(r.daemon.last_error(1).contains("errno"), "{st}");
}

/// A leg whose server stops answering (SIGSTOP) is ejected after --io-timeout.
#[test]
fn hung_leg_is_ejected_after_io_timeout() {
    let r = Rig::plain("hang", &["--io-timeout", "500"]);
    let mut c = Client::connect(&r.daemon.socket, 16);
    let mut stopped = false;
    let legs = &r.legs;
    let rep = stamped_workload(&mut c, 2048, 16, Duration::from_secs(4), |t| {
        if !stopped && t >= Duration::from_secs(1) {
            stopped = true;
            signal(&legs[0].child, libc::SIGSTOP);
        }
    });
    eprintln!(
        "hang: {} writes, {} errors, gap {:?}",
        rep.writes_ok, rep.errors, rep.max_gap
    );
    assert_eq!(rep.errors, 0);
    assert!(
        rep.max_gap >= Duration::from_millis(400),
        "no stall at all? {:?}",
        rep.max_gap
    );
    assert!(
        rep.max_gap < Duration::from_millis(1500),
        "stall {:?} far beyond the timeout",
        rep.max_gap
    );
    assert_eq!(verify_acked(&mut c, &rep.acked), 0);
    let st = r.daemon.status();
    assert_eq!(st["legs"][0]["state"], "failed");
    assert!(r.daemon.last_error(0).contains("I/O timeout"), "{st}");
}

/// Both leg servers stall together (SIGSTOP) well past the I/O timeout: a shared stall, which
/// ejecting one leg would not cure, so both stay; the write completes once they resume and the
/// mirror is still whole. (One stalled alone is ejected: the test above.)
#[test]
fn legs_stalled_together_are_both_kept() {
    let r = Rig::plain("stallboth", &["--io-timeout", "300"]);
    let mut c = Client::connect(&r.daemon.socket, 4);
    assert_eq!(c.write(0, &pattern(1, 4096)), 0);
    for l in &r.legs {
        signal(&l.child, libc::SIGSTOP);
    }
    c.slice(0, 4096).copy_from_slice(&pattern(2, 4096));
    c.q.write(0, c.buf(0), 4096, 0, blkio::ReqFlags::empty());
    // libblkio submits on do_io: submit now, without waiting for the answer.
    assert!(c.reap(0, Duration::ZERO).is_empty());
    std::thread::sleep(Duration::from_millis(1200));
    let during = r.daemon.status();
    for l in &r.legs {
        signal(&l.child, libc::SIGCONT);
    }
    assert_eq!(during["legs"][0]["state"], "uptodate", "{during}");
    assert_eq!(during["legs"][1]["state"], "uptodate", "{during}");
    let done = c.reap(1, Duration::from_secs(10));
    assert_eq!(
        done,
        vec![(0, 0)],
        "the stalled write completes once the legs resume"
    );
    let st = r.daemon.status();
    assert_eq!(st["legs"][0]["state"], "uptodate", "{st}");
    assert_eq!(st["legs"][1]["state"], "uptodate", "{st}");
    let log = r.daemon.log_text();
    assert!(!log.contains("ejected"), "{log}");
    assert!(
        log.contains("no other up-to-date leg answers in time"),
        "{log}"
    );
    assert_eq!(c.read(0, 4096).unwrap(), pattern(2, 4096));
}

/// A superblock write stuck on a slow leg (nbdkit delay filter: 3 s per write on leg 0) does not
/// hold up `status`: an operator asking during an incident gets an answer at once.
#[test]
fn status_answers_while_a_superblock_write_is_slow() {
    let r = Rig::start(
        "slowsb",
        [&["delay"], &[]],
        [&["delay-write=3"], &[]],
        &["--io-timeout", "20000"],
    );
    // Leg 1 leaves: the generation bump is written to leg 0, which takes 3 s.
    assert_eq!(
        ctl(&r.daemon.control, r#"{"cmd":"fail-leg","leg":1}"#)["ok"],
        true
    );
    std::thread::sleep(Duration::from_millis(500));
    let t0 = std::time::Instant::now();
    let st = r.daemon.status();
    let took = t0.elapsed();
    assert_eq!(st["legs"][1]["state"], "failed", "{st}");
    assert!(
        took < Duration::from_millis(1000),
        "status took {took:?} while a superblock write was in flight"
    );
}

/// With both legs gone the client gets errors, and the daemon stays up and answers.
#[test]
fn both_legs_dead_fails_io_but_not_the_daemon() {
    let mut r = Rig::plain("both", &[]);
    let mut c = Client::connect(&r.daemon.socket, 4);
    assert_eq!(c.write(0, &[1; 4096]), 0);
    r.legs[0].kill();
    r.legs[1].kill();
    r.wait_leg(0, "failed", Duration::from_secs(5));
    r.wait_leg(1, "failed", Duration::from_secs(5));
    assert_ne!(
        c.write(0, &[2; 4096]),
        0,
        "a write with no leg left must fail"
    );
    assert!(
        c.read(0, 4096).is_err(),
        "a read with no leg left must fail"
    );
    assert_ne!(c.flush(), 0);
    assert!(r.daemon.is_running());
    let st = r.daemon.status();
    assert_eq!(st["legs"][0]["state"], "failed");
    assert_eq!(st["legs"][1]["state"], "failed");
}

/// A read served by a leg that errors moves to the other leg; the guest sees good data, and the
/// bad block is rewritten on the failing leg from the good one.
#[test]
fn read_error_on_one_leg_is_served_by_the_other() {
    let trig = TempDir::new("readerr-trigger");
    let trigger = trig.path("fail-reads");
    let param = format!("error-file={}", trigger.display());
    let r = Rig::start(
        "readerr",
        [&["error"], &[]],
        [&["error-pread-rate=100%", &param], &[]],
        &["--read-policy", "primary"],
    );
    let mut c = Client::connect(&r.daemon.socket, 4);
    assert_eq!(c.write(4096, &pattern(9, 4096)), 0);
    // Reads fail on leg 0 from now on (metadata was read at start, before this).
    std::fs::write(&trigger, b"").unwrap();
    for _ in 0..5 {
        assert_eq!(c.read(4096, 4096).unwrap(), pattern(9, 4096));
    }
    let st = r.daemon.status();
    assert_eq!(
        st["legs"][0]["state"], "uptodate",
        "a bad read is not a dead leg"
    );
    assert!(
        st["legs"][0]["errors"].as_u64().unwrap() >= 5,
        "{st}\n{}",
        r.daemon.log_text()
    );
    assert!(r.daemon.log_text().contains("moves from leg 0 to leg 1"));
}

/// The frontend goes away and comes back (a restarting VMM): the daemon serves it again.
#[test]
fn frontend_reconnects() {
    let r = Rig::plain("reconnect", &[]);
    let mut c = Client::connect(&r.daemon.socket, 4);
    assert_eq!(c.write(0, &pattern(1, 4096)), 0);
    drop(c);
    let mut c = Client::connect(&r.daemon.socket, 4);
    assert_eq!(c.read(0, 4096).unwrap(), pattern(1, 4096));
    drop(c);
    let mut c = Client::connect(&r.daemon.socket, 4);
    assert_eq!(c.write(4096, &pattern(2, 4096)), 0);
    assert_eq!(c.read(0, 8192).unwrap()[4096..], pattern(2, 4096)[..]);
}

/// By default the legs' reader threads sleep through a mirrored workload: the queue's worker
/// reads the NBD replies itself. With `--leg-threads` they wake for them, which shows the count
/// below can tell the two apart.
#[test]
fn nbd_replies_are_read_by_the_queue_worker() {
    for leg_threads in [false, true] {
        let extra: &[&str] = if leg_threads { &["--leg-threads"] } else { &[] };
        let name = if leg_threads {
            "nbdthreads"
        } else {
            "nbdreaper"
        };
        let mut r = Rig::plain(name, extra);
        let mut c = Client::connect(&r.daemon.socket, 16);
        check_leg_thread_sleeps(&r.daemon, &mut c, 4096, "nbd-recv", leg_threads);
        let end = c.capacity as usize;
        drop(c);
        r.daemon.terminate();
        assert!(r.image(0)[..end] == r.image(1)[..end], "legs differ");
    }
}

/// The worker that read a leg's replies stops when its frontend leaves; the leg's reader thread
/// takes over, so a resync started afterwards (which reads that leg) still completes.
#[test]
fn a_resync_after_the_frontend_left_reads_the_legs() {
    let mut r = Rig::plain("reaperleft", &[]);
    let mut c = Client::connect(&r.daemon.socket, 8);
    assert_eq!(c.write(0, &pattern(1, 4096)), 0);
    assert_eq!(
        ctl(&r.daemon.control, r#"{"cmd":"fail-leg","leg":1}"#)["ok"],
        true
    );
    for i in 0..64u64 {
        assert_eq!(c.write(i << 20, &pattern(i, 4096)), 0);
    }
    drop(c);
    wait_for("the frontend's departure", Duration::from_secs(10), || {
        let log = r.daemon.log_text();
        log.contains("frontend disconnected") || log.contains("frontend connection ended")
    });
    // Past the drain and the workers' exit.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ctl(&r.daemon.control, r#"{"cmd":"re-add","leg":1}"#)["ok"],
        true,
        "{}",
        r.daemon.log_text()
    );
    r.wait_leg(1, "uptodate", Duration::from_secs(20));
    r.daemon.terminate();
    for i in 0..64usize {
        let at = i << 20;
        assert_eq!(&r.image(1)[at..at + 4096], &pattern(i as u64, 4096)[..]);
    }
}

/// Operator drill over the control socket: fail-leg ejects, I/O goes on.
#[test]
fn fail_leg_from_the_control_socket() {
    let r = Rig::plain("drill", &[]);
    let mut c = Client::connect(&r.daemon.socket, 4);
    let ok = ctl(&r.daemon.control, r#"{"cmd":"fail-leg","leg":0}"#);
    assert_eq!(ok["ok"], true);
    assert_eq!(r.daemon.leg_state(0), "failed");
    assert_eq!(c.write(0, &pattern(3, 4096)), 0);
    assert_eq!(c.read(0, 4096).unwrap(), pattern(3, 4096));
    let bad = ctl(&r.daemon.control, r#"{"cmd":"fail-leg","leg":7}"#);
    assert!(bad["error"].as_str().unwrap().contains("no leg 7"), "{bad}");
    let junk = ctl(&r.daemon.control, "not json");
    assert!(
        junk["error"].as_str().unwrap().contains("bad request"),
        "{junk}"
    );
    // The image of the failed leg did not get the write.
    assert_ne!(&r.image(0)[..4096], &pattern(3, 4096)[..]);
    assert_eq!(&r.image(1)[..4096], &pattern(3, 4096)[..]);
}

/// Start-up errors name the leg and the cause.
#[test]
fn unusable_legs_are_clear_errors() {
    let dir = TempDir::new("badlegs");
    let img = dir.path("a.img");
    let img2 = dir.path("b.img");
    image(&img, 4 << 20);
    image(&img2, 4 << 20);
    let a = Nbdkit::start(&dir.path("a.sock"), &img, &[], &[]);
    let b = Nbdkit::start(&dir.path("b.sock"), &img2, &[], &[]);
    let run = |legs: &[String], extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-mirror"));
        cmd.arg("blk").arg("--socket").arg(dir.path("x.sock"));
        for l in legs {
            cmd.arg("--leg").arg(l);
        }
        let out = cmd.args(extra).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&[a.uri(), b.uri()], &[]);
    assert!(
        e.contains("no vhost-mirror metadata") && e.contains("vhost-mirror create"),
        "{e}"
    );
    let missing = format!("nbd+unix:///?socket={}", dir.path("nobody.sock").display());
    let e = run(&[a.uri(), missing.clone()], &[]);
    assert!(e.contains(&missing), "error does not name the leg: {e}");
    let e = run(&["nbd://127.0.0.1:1/x".into(), a.uri()], &[]);
    assert!(e.contains("nbd://127.0.0.1:1/x"), "{e}");
    // Without metadata, legs of different sizes are refused unless allowed.
    let small = dir.path("small.img");
    image(&small, 1 << 20);
    let c = Nbdkit::start(&dir.path("c.sock"), &small, &[], &[]);
    let e = run(&[a.uri(), c.uri()], &["--no-metadata"]);
    assert!(
        e.contains("legs differ in size") && e.contains("--allow-size-mismatch"),
        "{e}"
    );
    // Legs of two different mirrors.
    create(&[a.uri(), b.uri()], &["--assume-clean"]);
    let img3 = dir.path("d.img");
    image(&img3, 4 << 20);
    let d = Nbdkit::start(&dir.path("d.sock"), &img3, &[], &[]);
    create(
        &[d.uri(), c.uri()],
        &["--assume-clean", "--chunk-size", "64K"],
    );
    let e = run(&[a.uri(), d.uri()], &[]);
    assert!(e.contains("belongs to mirror"), "{e}");
}

/// An nbdkit server whose flush takes 1.5 s (the eval plugin over a file, `sleep` for flush): a
/// leg writing back a large cache. Its reads and writes are prompt.
fn slow_flush_server(dir: &TempDir) -> Nbdkit {
    let img = dir.path("slow.img");
    image(&img, 16 << 20);
    let img = img.display();
    let args = [
        "eval".to_string(),
        "get_size=echo 16777216".into(),
        format!("pread=dd if={img} iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none"),
        format!("pwrite=dd of={img} oflag=seek_bytes conv=notrunc seek=$4 status=none"),
        "flush=sleep 1.5".into(),
        "can_flush=exit 0".into(),
        "can_write=exit 0".into(),
    ];
    Nbdkit::plugin(&dir.path("slow.sock"), args.to_vec())
}

/// A flush waits for the leg's write-back, which on a healthy disk can take seconds after a
/// burst of writes (or at the end of a resync): past `--io-timeout` the leg is kept, and only
/// `--flush-timeout` ejects it. Before, such a leg was ejected, resynced, and ejected again at
/// the resync's own final flush.
#[test]
fn slow_flush_is_not_a_dead_leg() {
    let dir = TempDir::new("slowflush");
    let img0 = dir.path("leg0.img");
    image(&img0, 16 << 20);
    let leg0 = Nbdkit::start(&dir.path("leg0.sock"), &img0, &[], &[]);
    let slow = slow_flush_server(&dir);
    let legs = [leg0.uri(), slow.uri()];
    let data = pattern(7, 4096);

    // The two runs differ only in --flush-timeout; --io-timeout is 300 ms in both.
    let start = |flush_ms: &str| {
        Daemon::start(
            &dir,
            &legs,
            &[
                "--no-metadata",
                "--io-timeout",
                "300",
                "--flush-timeout",
                flush_ms,
            ],
        )
    };

    // Flushes get 5 s: the 1.5 s flush is on time although --io-timeout is 300 ms.
    let mut d = start("5000");
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.write(0, &data), 0);
    let t0 = std::time::Instant::now();
    assert_eq!(c.flush(), 0);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1200),
        "the flush did not wait for leg 1: {took:?}"
    );
    let st = d.status();
    assert_eq!(st["legs"][1]["state"], "uptodate", "{st}");
    assert_eq!(c.read(0, 4096).unwrap(), data);
    drop(c);
    d.stop();

    // With --flush-timeout below the server's 1.5 s, the same flush ejects leg 1; the guest's
    // flush still succeeds from leg 0.
    let d = start("600");
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.write(4096, &data), 0);
    assert_eq!(c.flush(), 0);
    let st = d.status();
    assert_eq!(st["legs"][1]["state"], "failed", "{st}");
    assert!(d.last_error(1).contains("flush timeout of 600 ms"), "{st}");
}
