//! Coming back from a failure without losing data: the write-intent bitmap, resync of a returning
//! leg, generations on the legs, and never a stale read. Real peers throughout: the binary,
//! nbdkit legs (killed, restarted, erroring), libblkio as the client.

mod common;
use common::*;

use std::process::Command;
use std::time::{Duration, Instant};

const BLOCKS: u64 = 2048;

fn write_pattern(c: &mut Client, seed: u64) {
    for b in 0..BLOCKS {
        assert_eq!(c.write(b * 4096, &stamp(b, seed)), 0, "write of block {b}");
    }
}

fn count_not(c: &mut Client, seed: u64) -> usize {
    (0..BLOCKS)
        .filter(|&b| {
            c.read(b * 4096, 4096)
                .map_or(true, |d| d[..] != stamp(b, seed)[..])
        })
        .count()
}

fn ctl_json(control: &std::path::Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-mirror"))
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .arg("--json")
        .arg("status")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The issue's acceptance sequence: pattern 1; kill leg 1; pattern 2 while degraded; leg 1's
/// server returns and is resynced on its own; kill leg 0; every block must read pattern 2.
#[test]
fn fail_return_fail_reads_no_stale_block() {
    let mut r = Rig::plain("frf", &[]);
    let mut c = Client::connect(&r.daemon.socket, 4);
    write_pattern(&mut c, 1);
    r.legs[1].kill();
    r.wait_leg(1, "failed", Duration::from_secs(5));
    let gen_degraded = r.daemon.status()["generation"].as_u64().unwrap();
    write_pattern(&mut c, 2);
    assert!(r.daemon.status()["dirty_chunks"].as_u64().unwrap() >= 8);
    // The server comes back; the daemon finds it by itself (backoff retry) and resyncs.
    r.legs[1].restart();
    r.wait_leg(1, "uptodate", Duration::from_secs(30));
    let st = ctl_json(&r.daemon.control);
    assert_eq!(st["legs"][0]["state"], "uptodate", "{st}");
    assert_eq!(st["legs"][1]["state"], "uptodate", "{st}");
    assert!(st["resync"].is_null());
    assert!(st["generation"].as_u64().unwrap() >= gen_degraded);
    r.legs[0].kill();
    r.wait_leg(0, "failed", Duration::from_secs(5));
    let stale = count_not(&mut c, 2);
    eprintln!("fail-return-fail: {stale} stale blocks of {BLOCKS}");
    assert_eq!(stale, 0, "blocks read back stale after fail-return-fail");
}

/// Only the chunks written while degraded are copied, and the legs match afterwards.
#[test]
fn resync_copies_only_dirty_chunks() {
    let mut r = Rig::plain("dirty", &[]);
    let mut c = Client::connect(&r.daemon.socket, 4);
    write_pattern(&mut c, 1);
    // Bits of chunks every leg holds are cleared lazily; wait for a clean bitmap.
    let t0 = Instant::now();
    while r.daemon.status()["dirty_chunks"].as_u64().unwrap() != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "bitmap never cleared"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    r.legs[1].kill();
    r.wait_leg(1, "failed", Duration::from_secs(5));
    // Three chunks of 1 MiB: 5, 6 and 7 (a block in each).
    for chunk in [5u64, 6, 7] {
        assert_eq!(c.write(chunk << 20, &pattern(chunk, 4096)), 0);
    }
    assert_eq!(r.daemon.status()["dirty_chunks"], 3);
    r.legs[1].restart();
    re_add(&r, 1);
    r.wait_leg(1, "uptodate", Duration::from_secs(20));
    let log = r.daemon.log_text();
    assert!(
        log.contains("resyncing 3 dirty chunks (3145728 bytes)"),
        "{log}"
    );
    assert!(log.contains("3145728 bytes copied"), "{log}");
    drop(c);
    r.daemon.terminate();
    let (a, b) = (r.image(0), r.image(1));
    let end = (DISK - 3 * 4096) as usize;
    assert!(a[..end] == b[..end], "legs differ after resync");
    assert_eq!(&b[5 << 20..(5 << 20) + 4096], &pattern(5, 4096)[..]);
}

/// Leg 1 (its nbdkit with `filters`/`params` besides a log) is away while the guest zeroes
/// chunk 3 with ordinary writes and rewrites a block of chunk 4; it returns and is resynced.
/// Checks that the legs match and chunk 3 holds no stale data on leg 1, and returns leg 1's
/// command log of the resync and the daemon's log.
fn resync_a_zeroed_chunk(name: &str, filters: &[&str], params: &[&str]) -> (String, String) {
    let (mut r, _logs, log) = rig_logging_leg1(name, filters, params, &[], &[]);
    let mut c = Client::connect(&r.daemon.socket, 4);
    // Chunks 2, 3 and 4 (1 MiB each) hold data on both legs.
    for chunk in [2u64, 3, 4] {
        for b in 0..256u64 {
            let off = (chunk << 20) + b * 4096;
            assert_eq!(c.write(off, &pattern(chunk * 1000 + b, 4096)), 0);
        }
    }
    r.legs[1].kill();
    r.wait_leg(1, "failed", Duration::from_secs(5));
    for b in 0..256u64 {
        assert_eq!(c.write((3 << 20) + b * 4096, &[0u8; 4096]), 0);
    }
    assert_eq!(c.write(4 << 20, &pattern(77, 4096)), 0);
    // The restarted server starts a new log (the filter truncates it): the resync's commands.
    r.legs[1].restart();
    re_add(&r, 1);
    r.wait_leg(1, "uptodate", Duration::from_secs(20));
    let resync_log = std::fs::read_to_string(&log).unwrap();
    let daemon_log = r.daemon.log_text();
    drop(c);
    r.daemon.terminate();
    let (a, b) = (r.image(0), r.image(1));
    assert!(
        b[3 << 20..4 << 20].iter().all(|&x| x == 0),
        "leg 1 kept stale data in the zeroed chunk"
    );
    let end = (DISK - 3 * 4096) as usize;
    assert!(a[..end] == b[..end], "legs differ after resync");
    (resync_log, daemon_log)
}

/// A rig whose leg 1 has nbdkit's log filter in front of `filters`, created with
/// `--assume-clean` and `create` (e.g. a chunk size); with the directory that holds the log (the
/// log lives as long as it) and the log's path.
fn rig_logging_leg1(
    name: &str,
    filters: &[&str],
    params: &[&str],
    create: &[&str],
    extra: &[&str],
) -> (Rig, TempDir, std::path::PathBuf) {
    let logs = TempDir::new(&format!("{name}-log"));
    let log = logs.path("leg1.log");
    let logfile = format!("logfile={}", log.display());
    let filters: Vec<&str> = ["log"].iter().chain(filters).copied().collect();
    let params: Vec<&str> = [logfile.as_str()].iter().chain(params).copied().collect();
    let create: Vec<&str> = ["--assume-clean"].iter().chain(create).copied().collect();
    let r = Rig::build(
        name,
        [&[], &filters],
        [&[], &params],
        Some(&create),
        extra,
        |_| {},
    );
    (r, logs, log)
}

/// A request line of nbdkit's log filter ("<date> <time> connection=N Kind id=I offset=0x…
/// count=0x… …"): its kind ("Write", "Zero", "Flush"), offset and count (0 where it has none).
/// None for the lines that report a request's return ("...Write id=I return=0") and the rest.
fn command(line: &str) -> Option<(&str, u64, u64)> {
    let kind = line.split_whitespace().nth(3)?;
    if !line.contains(" connection=") || kind.starts_with("...") {
        return None;
    }
    let hex = |key: &str| {
        line.split(&format!(" {key}=0x"))
            .nth(1)
            .and_then(|x| x.split(' ').next())
            .and_then(|x| u64::from_str_radix(x, 16).ok())
            .unwrap_or(0)
    };
    Some((kind, hex("offset"), hex("count")))
}

/// The most commands of `kind` whose count is `count` that leg 1's `log` shows in flight at
/// once: each from its request line to the line with its return ("...Write id=I return=…").
fn most_in_flight(log: &str, kind: &str, count: u64) -> usize {
    // Ids are numbered per connection.
    let field = |line: &str, key: &str| {
        line.split(&format!(" {key}="))
            .nth(1)
            .and_then(|x| x.split(' ').next())
            .map(str::to_string)
    };
    let id = |line: &str| field(line, "connection").zip(field(line, "id"));
    let mut open = std::collections::HashSet::new();
    let mut most = 0;
    for line in log.lines() {
        match command(line) {
            Some((k, _, n)) if k == kind && n == count => {
                open.extend(id(line));
                most = most.max(open.len());
            }
            Some(_) => {}
            None => {
                if line.contains(&format!(" ...{kind} ")) {
                    if let Some(i) = id(line) {
                        open.remove(&i);
                    }
                }
            }
        }
    }
    most
}

/// Leg 1's logged commands of `kind` ("Write", "Zero") at `offset`.
fn logged(log: &str, kind: &str, offset: u64) -> Vec<String> {
    log.lines()
        .filter(|l| command(l).is_some_and(|(k, o, _)| k == kind && o == offset))
        .map(str::to_string)
        .collect()
}

/// A chunk that reads back all zeros on the source reaches the returning leg as write-zeroes,
/// not as a megabyte of payload, and still overwrites the stale data the leg held there.
#[test]
fn zero_chunks_resync_as_write_zeroes() {
    let (log, daemon_log) = resync_a_zeroed_chunk("zero", &[], &[]);
    let zeroes = logged(&log, "Zero", 3 << 20);
    assert!(!zeroes.is_empty(), "{log}");
    // Not may_unmap: a preallocated leg stays allocated.
    assert!(zeroes.iter().all(|l| l.contains(" trim=0 ")), "{zeroes:?}");
    assert!(logged(&log, "Write", 3 << 20).is_empty(), "{log}");
    assert!(
        !logged(&log, "Write", 4 << 20).is_empty(),
        "chunk 4 holds data and is written: {log}"
    );
    assert!(
        daemon_log.contains("(1048576 of them zeros, sent as write-zeroes)"),
        "{daemon_log}"
    );
}

/// A leg that offers write-zeroes and fails it still gets resynced: the zeros go as data.
#[test]
fn failing_write_zeroes_falls_back_to_data() {
    let (log, daemon_log) = resync_a_zeroed_chunk("zero-fails", &["error"], &["error-zero-rate=1"]);
    assert!(!logged(&log, "Zero", 3 << 20).is_empty(), "{log}");
    assert!(!logged(&log, "Write", 3 << 20).is_empty(), "{log}");
    assert!(
        daemon_log.contains("write-zeroes of chunk 3 failed") && daemon_log.contains("as data"),
        "{daemon_log}"
    );
    assert!(!daemon_log.contains("of them zeros"), "{daemon_log}");
}

/// Leg 1 (its nbdkit logging every command) misses a block in each of 48 chunks of 1 MiB,
/// returns and is resynced while the guest is idle or, if `busy`, keeps writing other chunks
/// until the resync is done. Checks that the legs match; returns where leg 1's log has the
/// resync's chunk writes and the flushes, and the log.
fn resync_48_chunks(name: &str, busy: bool) -> (Vec<usize>, Vec<usize>, String) {
    // Busy, the copy starts held at 1 MiB/s and is let go once the guest's writes are coming:
    // at full speed the first 32 MiB could land before the first of them.
    let extra: &[&str] = if busy { &["--resync-rate", "1M"] } else { &[] };
    let (mut r, _logs, log) = rig_logging_leg1(name, &[], &[], &[], extra);
    let mut c = Client::connect(&r.daemon.socket, 4);
    lose_leg1_missing_chunks(&mut r, &mut c, 48, 1 << 20);
    // The restarted server starts a new log: the resync's commands.
    r.legs[1].restart();
    re_add(&r, 1);
    if busy {
        // Writes sent before leg 1 rejoins would dirty their chunk and add it to the copy.
        r.wait_leg(1, "resyncing", Duration::from_secs(10));
        let t0 = Instant::now();
        let mut n = 0u64;
        let mut lifted = false;
        while r.daemon.status()["legs"][1]["state"] != "uptodate" {
            assert!(t0.elapsed() < Duration::from_secs(30), "resync not done");
            for _ in 0..20 {
                let off = (56 << 20) + (n % 1024) * 4096;
                assert_eq!(c.write(off, &pattern(n, 4096)), 0);
                n += 1;
            }
            if !lifted {
                let ok = ctl(&r.daemon.control, r#"{"cmd":"set-resync-rate","rate":0}"#);
                assert_eq!(ok["ok"], true, "{ok}");
                lifted = true;
            }
        }
    }
    r.wait_leg(1, "uptodate", Duration::from_secs(30));
    let resync_log = std::fs::read_to_string(&log).unwrap();
    drop(c);
    assert_legs_match(r);
    let commands: Vec<_> = resync_log.lines().map(command).collect();
    let at = |want: &dyn Fn(&str, u64, u64) -> bool| -> Vec<usize> {
        (0..commands.len())
            .filter(|&i| commands[i].is_some_and(|(k, o, n)| want(k, o, n)))
            .collect()
    };
    // The copies of chunks 0..48 (a chunk the busy guest dirtied as the resync began may be
    // copied too).
    let chunk_writes = at(&|k, o, n| k == "Write" && n == 1 << 20 && o < 48 << 20);
    assert_eq!(chunk_writes.len(), 48, "{resync_log}");
    let flushes = at(&|k, _, _| k == "Flush");
    let last = chunk_writes[47];
    assert!(
        flushes.iter().any(|&f| f > last),
        "no flush after the last chunk: {resync_log}"
    );
    (chunk_writes, flushes, resync_log)
}

/// A long resync with the guest idle flushes its target on the way (every 32 MiB landed), so a
/// target that writes through its page cache writes the copy back while it runs, and the flush
/// that ends the resync has only the tail of it left.
#[test]
fn a_long_resync_flushes_its_target_as_it_copies() {
    let (writes, flushes, log) = resync_48_chunks("flushes", false);
    assert!(
        flushes.iter().any(|&f| f < writes[47]),
        "no flush while the copy ran: {log}"
    );
}

/// While the guest writes, the resync yields to it and flushes only at its end: a flush on the
/// way would make the target write back the guest's writes too, and hold them up.
#[test]
fn a_resync_yielding_to_the_guest_flushes_only_at_its_end() {
    let (writes, flushes, log) = resync_48_chunks("flushes-busy", true);
    assert!(
        flushes.iter().all(|&f| f > writes[47]),
        "flushed while yielding to the guest: {log}"
    );
}

/// Leg `i`'s server as nbdkit's eval plugin serving `leg{i}.img` in `dir` through `dd`: a real
/// NBD server whose flush fails with EIO while the file `fail-flush` exists in `dir`, or
/// (`flush` false) that offers no flush at all, and whose writes to the first MiB (chunk 0)
/// fail with EIO while `fail-chunk0` exists, its reads there while `fail-read-chunk0` does. It
/// does FUA itself (a write with `fdatasync`), so
/// writes that ask for it do not turn into flushes.
fn scripted_leg(dir: &TempDir, i: usize, flush: bool) -> Vec<String> {
    let img = dir.path(&format!("leg{i}.img")).display().to_string();
    let flag = dir.path("fail-flush").display().to_string();
    let chunk0 = dir.path("fail-chunk0").display().to_string();
    let read0 = dir.path("fail-read-chunk0").display().to_string();
    let mut args = vec![
        "eval".to_string(),
        format!("get_size=echo {DISK}"),
        format!(
            "pread=if [ -e '{read0}' ] && [ $4 -lt 1048576 ]; then \
             echo 'EIO read refused' >&2; exit 1; fi; \
             exec dd if='{img}' skip=$4 count=$3 iflag=skip_bytes,count_bytes bs=1M status=none"
        ),
        // $5 holds the request's flags, "fua" among them when it asks for stable storage.
        format!(
            "pwrite=if [ -e '{chunk0}' ] && [ $4 -lt 1048576 ]; then cat >/dev/null; \
             echo 'EIO write refused' >&2; exit 1; fi; \
             case \"$5\" in *fua*) c=conv=notrunc,fdatasync;; *) c=conv=notrunc;; esac; \
             exec dd of='{img}' seek=$4 oflag=seek_bytes $c bs=1M status=none"
        ),
        "can_write=exit 0".into(),
        "can_fua=echo native".into(),
    ];
    if flush {
        args.push("can_flush=exit 0".into());
        args.push(format!(
            "flush=if [ -e '{flag}' ]; then echo 'EIO flush refused' >&2; exit 1; fi; \
             exec sync '{img}'"
        ));
    } else {
        args.push("can_flush=exit 3".into());
    }
    args
}

/// Leg 1 is lost while the guest writes a block into each of the first `chunks` chunks of
/// `chunk_size` bytes; then the guest goes quiet, so a resync would not yield to it. Leg 1 is
/// left down.
fn lose_leg1_missing_chunks(r: &mut Rig, c: &mut Client, chunks: u64, chunk_size: u64) {
    r.legs[1].kill();
    r.wait_leg(1, "failed", Duration::from_secs(5));
    for chunk in 0..chunks {
        assert_eq!(c.write(chunk * chunk_size, &pattern(chunk, 4096)), 0);
    }
    // Past the 200 ms after which the resync no longer counts the guest as busy.
    std::thread::sleep(Duration::from_millis(300));
}

/// A rig whose leg 1 is [`scripted_leg`], after [`lose_leg1_missing_chunks`]; with the client.
fn scripted_rig_missing_chunks(name: &str, flush: bool, chunks: u64) -> (Rig, Client) {
    let file = |dir: &TempDir| Nbdkit::file_args(&dir.path("leg0.img"), &[], &[]);
    let mut r = Rig::build_servers(
        name,
        Some(&["--assume-clean"]),
        &[],
        |_| {},
        |dir, i| match i {
            0 => file(dir),
            _ => scripted_leg(dir, 1, flush),
        },
    );
    let mut c = Client::connect(&r.daemon.socket, 4);
    lose_leg1_missing_chunks(&mut r, &mut c, chunks, 1 << 20);
    (r, c)
}

/// The bytes the last completed resync reports copied in the daemon's log, once it has logged
/// one (the leg shows up to date in the status just before the line is written).
fn last_copied(d: &Daemon) -> u64 {
    wait_for("the resync's report", Duration::from_secs(5), || {
        d.log_text().contains("is up to date again")
    });
    let log = d.log_text();
    let line = log
        .lines()
        .rfind(|l| l.contains("is up to date again"))
        .unwrap_or_else(|| panic!("no resync completed: {log}"));
    line.split(": ")
        .last()
        .and_then(|x| x.split(' ').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {line}"))
}

/// Once the legs' images match, the daemon stopped first.
fn assert_legs_match(mut r: Rig) {
    r.daemon.terminate();
    let (a, b) = (r.image(0), r.image(1));
    let end = (DISK - 3 * 4096) as usize;
    assert!(a[..end] == b[..end], "legs differ after resync");
}

/// A flush that fails while a resync copies (its target's server cannot keep what it was sent)
/// ejects the target: the leg does not count as up to date on the strength of those writes, the
/// guest sees nothing, and once the server flushes again the leg is resynced in full.
#[test]
fn a_flush_failing_during_a_resync_ejects_its_target() {
    let (mut r, mut c) = scripted_rig_missing_chunks("flush-fails", true, 60);
    let flag = r.dir.path("fail-flush");
    std::fs::write(&flag, b"").unwrap();
    r.legs[1].restart();
    re_add(&r, 1);
    // The first flush goes out once 32 MiB have landed, with 28 chunks still to copy. The eval
    // plugin serializes requests: it answers the flush after the writes already sent to it, at
    // most the eight of the resync's window, long before the last chunk.
    wait_for(
        "a flush of the resync to fail",
        Duration::from_secs(30),
        || r.daemon.log_text().contains("flush during resync failed"),
    );
    // The leg comes back on its own and fails the same way meanwhile; the guest writes on.
    for b in 0..16u64 {
        assert_eq!(c.write((61 << 20) + b * 4096, &pattern(610 + b, 4096)), 0);
    }
    let log = r.daemon.log_text();
    assert!(!log.contains("is up to date again"), "{log}");
    assert_ne!(r.daemon.leg_state(1), "uptodate");
    std::fs::remove_file(&flag).unwrap();
    r.wait_leg(1, "uptodate", Duration::from_secs(60));
    // Every chunk written while it was away, again: none counted as copied by the failed runs.
    assert!(
        last_copied(&r.daemon) >= 60 << 20,
        "{}",
        r.daemon.log_text()
    );
    drop(c);
    assert_legs_match(r);
}

/// A server that offers no flush at all: the resync cannot flush it and does not try, and the
/// leg still comes back up to date.
#[test]
fn a_target_without_flush_is_resynced() {
    let (mut r, c) = scripted_rig_missing_chunks("no-flush", false, 40);
    r.legs[1].restart();
    re_add(&r, 1);
    r.wait_leg(1, "uptodate", Duration::from_secs(30));
    assert!(last_copied(&r.daemon) >= 40 << 20);
    let log = r.daemon.log_text();
    assert!(log.contains("flush false"), "leg 1 offered flush: {log}");
    // One resync, and no ejection but the kill's: a flush sent to this server would have
    // failed (nbdkit refuses a command it did not offer) and ejected the leg.
    assert_eq!(log.matches("is up to date again").count(), 1, "{log}");
    assert_eq!(log.matches(" ejected (").count(), 1, "{log}");
    drop(c);
    assert_legs_match(r);
}

/// The up-to-date leg fails a write (a device error) that the leg being resynced takes. The
/// guest gets the error and the up-to-date leg stays, as it would if no leg had taken the write:
/// answering "done" would leave the write only on a leg without the whole disk, and ejecting the
/// up-to-date leg would leave no complete copy. The resyncing leg goes (it now differs), comes
/// back and is resynced from the up-to-date leg.
#[test]
fn a_write_only_a_resyncing_leg_took_fails_and_the_current_leg_stays() {
    let mut r = Rig::build_servers(
        "behind-took",
        Some(&["--assume-clean"]),
        &["--resync-rate", "1M"],
        |_| {},
        |dir, i| match i {
            0 => scripted_leg(dir, 0, true),
            _ => Nbdkit::file_args(&dir.path("leg1.img"), &[], &[]),
        },
    );
    let mut c = Client::connect(&r.daemon.socket, 4);
    // Chunks 0 to 7 dirty (their bits on disk: the write below needs no metadata write).
    lose_leg1_missing_chunks(&mut r, &mut c, 8, 1 << 20);
    r.legs[1].restart();
    re_add(&r, 1);
    r.wait_leg(1, "resyncing", Duration::from_secs(10));
    let flag = r.dir.path("fail-chunk0");
    std::fs::write(&flag, b"").unwrap();
    let rc = c.write(4096, &pattern(99, 4096));
    std::fs::remove_file(&flag).unwrap();
    let log = r.daemon.log_text();
    assert_ne!(
        rc, 0,
        "a write only the resyncing leg took was answered as done: {log}"
    );
    assert_eq!(r.daemon.leg_state(0), "uptodate", "{log}");
    assert!(
        log.contains("took a write every up-to-date leg failed"),
        "the resyncing leg stayed: {log}"
    );
    let ok = ctl(&r.daemon.control, r#"{"cmd":"set-resync-rate","rate":0}"#);
    assert_eq!(ok["ok"], true, "{ok}");
    r.wait_leg(1, "uptodate", Duration::from_secs(30));
    assert_eq!(r.daemon.leg_state(0), "uptodate");
    drop(c);
    assert_legs_match(r);
}

/// The resync meets a bad block on the only up-to-date leg (a device error reading chunk 0).
/// That leg stays, as it does for a guest read's bad block: ejecting it would leave no complete
/// copy. The leg being resynced leaves instead, the guest carries on, and once the block reads
/// again the leg comes back and is resynced.
#[test]
fn a_bad_block_on_the_only_current_leg_sends_the_resyncing_leg_away() {
    let mut r = Rig::build_servers(
        "bad-source",
        Some(&["--assume-clean"]),
        &[],
        |_| {},
        |dir, i| match i {
            0 => scripted_leg(dir, 0, true),
            _ => Nbdkit::file_args(&dir.path("leg1.img"), &[], &[]),
        },
    );
    let mut c = Client::connect(&r.daemon.socket, 4);
    lose_leg1_missing_chunks(&mut r, &mut c, 8, 1 << 20);
    let flag = r.dir.path("fail-read-chunk0");
    std::fs::write(&flag, b"").unwrap();
    r.legs[1].restart();
    re_add(&r, 1);
    wait_for(
        "the resync to meet the bad block",
        Duration::from_secs(30),
        || {
            r.daemon
                .log_text()
                .contains("could not be read from leg 0, the last up-to-date leg")
        },
    );
    assert_eq!(r.daemon.leg_state(0), "uptodate", "{}", r.daemon.log_text());
    assert_eq!(c.write(2 << 20, &pattern(200, 4096)), 0);
    std::fs::remove_file(&flag).unwrap();
    r.wait_leg(1, "uptodate", Duration::from_secs(30));
    assert_eq!(r.daemon.leg_state(0), "uptodate");
    drop(c);
    assert_legs_match(r);
}

/// With chunks of 4 MiB the resync keeps two in flight, not its window of eight: the buffers
/// it holds stay within 8 MiB however large the chunks (up to 1 GiB).
#[test]
fn a_resync_of_large_chunks_keeps_8_mib_in_flight() {
    // Each write held 200 ms on leg 1, so copies in flight together overlap in its log.
    let (mut r, _logs, log) = rig_logging_leg1(
        "big-chunks",
        &["delay"],
        &["delay-write=200ms"],
        &["--chunk-size", "4M"],
        &[],
    );
    let mut c = Client::connect(&r.daemon.socket, 4);
    // A block in each of the 15 chunks the data has room for (64 MiB less the metadata).
    lose_leg1_missing_chunks(&mut r, &mut c, 15, 4 << 20);
    r.legs[1].restart();
    re_add(&r, 1);
    r.wait_leg(1, "uptodate", Duration::from_secs(30));
    let resync_log = std::fs::read_to_string(&log).unwrap();
    let writes = resync_log
        .lines()
        .filter(|l| command(l).is_some_and(|(k, _, n)| k == "Write" && n == 4 << 20))
        .count();
    assert_eq!(writes, 15, "{resync_log}");
    let most = most_in_flight(&resync_log, "Write", 4 << 20);
    assert_eq!(most, 2, "chunks of 4 MiB in flight at once: {resync_log}");
    drop(c);
    assert_legs_match(r);
}

/// Guest writes while a slow resync copies chunks survive it: nothing older lands over them.
#[test]
fn guest_writes_during_resync_survive() {
    // A fresh mirror (not assumed clean): leg 0 is copied to leg 1 at start, slowly.
    let mut r = Rig::build(
        "during",
        [&[], &[]],
        [&[], &[]],
        Some(&[]),
        &["--resync-rate", "16M"],
        |dir| std::fs::write(dir.path("leg0.img"), pattern(77, DISK as usize)).unwrap(),
    );
    let mut c = Client::connect(&r.daemon.socket, 16);
    let st = r.daemon.status();
    assert_eq!(st["legs"][1]["state"], "resyncing", "{st}");
    // `ctl status` shows the resync with a progress bar.
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-mirror"))
        .args(["ctl", "--control"])
        .arg(&r.daemon.control)
        .arg("status")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("resyncing") && text.contains("resync leg 1"),
        "{text}"
    );
    // The copy must still run as the workload ends: looked at inside it, not after, where the
    // test's own delays would be counted against the copy's 4 s.
    let mut late = None;
    let rep = stamped_workload(&mut c, 8192, 16, Duration::from_secs(3), |t| {
        if late.is_none() && t > Duration::from_millis(2500) {
            late = Some(r.daemon.status());
        }
    });
    assert_eq!(rep.errors, 0);
    let late = late.unwrap();
    assert!(
        late["resync"].is_object(),
        "the resync should still run late in the workload: {late}"
    );
    r.wait_leg(1, "uptodate", Duration::from_secs(30));
    assert_eq!(
        verify_acked(&mut c, &rep.acked),
        0,
        "guest writes lost to the resync"
    );
    drop(c);
    r.daemon.terminate();
    let (a, b) = (r.image(0), r.image(1));
    let end = (DISK - 3 * 4096) as usize;
    let differ = (0..end / 4096)
        .filter(|&k| a[k * 4096..(k + 1) * 4096] != b[k * 4096..(k + 1) * 4096])
        .count();
    assert_eq!(
        differ, 0,
        "{differ} blocks differ between the legs after the resync"
    );
    // Blocks the workload did not touch hold leg 0's original data on both legs.
    let untouched = (0..end / 4096)
        .find(|&k| k >= rep.acked.len() || rep.acked[k] == 0)
        .unwrap();
    assert_eq!(
        &b[untouched * 4096..(untouched + 1) * 4096],
        &pattern(77, DISK as usize)[untouched * 4096..(untouched + 1) * 4096]
    );
}

/// The resync yields to the guest: while guest requests arrive it copies at
/// `--resync-busy-rate` and says so in its status; once the guest is quiet it runs at full speed
/// again. Guest writes during the slow part land on both legs.
#[test]
fn resync_yields_to_guest_io() {
    const BUSY_RATE: u64 = 4 << 20;
    // A fresh mirror: leg 0's 64 MiB are copied to leg 1 at start, held at 1 MiB/s until the
    // client is connected.
    let r = Rig::build(
        "yield",
        [&[], &[]],
        [&[], &[]],
        Some(&[]),
        &["--resync-rate", "1M", "--resync-busy-rate", "4M"],
        |dir| std::fs::write(dir.path("leg0.img"), pattern(78, DISK as usize)).unwrap(),
    );
    let mut c = Client::connect(&r.daemon.socket, 16);
    assert_eq!(r.daemon.status()["legs"][1]["state"], "resyncing");
    let done = |st: &serde_json::Value| st["resync"]["done_bytes"].as_u64().unwrap_or(0);
    // The cap is lifted once the guest is writing, so from then on only the busy rate holds the
    // copy back (lifted before, the copy would run at full speed until the first request).
    let mut lifted: Option<(Instant, u64)> = None;
    let mut sampled = None;
    let rep = stamped_workload(&mut c, 8192, 16, Duration::from_secs(3), |t| {
        if lifted.is_none() && t > Duration::from_millis(200) {
            let ok = ctl(&r.daemon.control, r#"{"cmd":"set-resync-rate","rate":0}"#);
            assert_eq!(ok["ok"], true, "{ok}");
            lifted = Some((Instant::now(), done(&r.daemon.status())));
        }
        if sampled.is_none() && t > Duration::from_millis(1500) {
            sampled = Some(r.daemon.status());
        }
    });
    let (t0, before) = lifted.unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let st = r.daemon.status();
    assert_eq!(rep.errors, 0);
    let sampled = sampled.unwrap();
    assert_eq!(sampled["resync"]["yielding"], true, "{sampled}");
    let copied = done(&st) - before;
    eprintln!(
        "resync while the guest wrote: {copied} bytes in {secs:.2} s ({} writes acknowledged)",
        rep.writes_ok
    );
    // The pace lets one chunk catch up, and the chunks started at 1 MiB/s before the lift may
    // still land: 5 MiB of slack over the rate is more than both.
    let allowed = (BUSY_RATE as f64 * secs) as u64 + (5 << 20);
    assert!(
        copied <= allowed,
        "copied {copied} bytes in {secs:.2} s with the guest busy; the busy rate allows {allowed}"
    );
    assert!(
        copied >= 1 << 20,
        "the resync stalled while the guest wrote"
    );
    // Quiet now: the rest (over 40 MiB, more than 10 s at the busy rate) goes at full speed.
    let left = DISK - done(&st);
    assert!(left > 40 << 20, "only {left} bytes left to copy");
    let t1 = Instant::now();
    r.wait_leg(1, "uptodate", Duration::from_secs(30));
    let idle = t1.elapsed();
    eprintln!("the last {left} bytes copied in {idle:?} with the guest quiet");
    // Held to the busy rate, the rest would take over 10 s; the bound leaves room for the
    // final flush of an image on a slow disk.
    assert!(
        idle < Duration::from_secs(8),
        "{left} bytes took {idle:?} with the guest quiet"
    );
    assert_eq!(verify_acked(&mut c, &rep.acked), 0, "guest writes lost");
    drop(c);
    let mut r = r;
    r.daemon.terminate();
    let (a, b) = (r.image(0), r.image(1));
    let end = (DISK - 3 * 4096) as usize;
    assert!(a[..end] == b[..end], "legs differ after the resync");
}

/// The daemon dies (SIGKILL) while degraded; on restart it picks the current leg by generation
/// and resyncs the other.
#[test]
fn restart_while_degraded_picks_the_current_leg() {
    let mut r = Rig::plain("restart", &[]);
    let mut c = Client::connect(&r.daemon.socket, 4);
    write_pattern(&mut c, 1);
    r.legs[0].kill();
    r.wait_leg(0, "failed", Duration::from_secs(5));
    write_pattern(&mut c, 2);
    drop(c);
    r.daemon.stop();
    r.legs[0].restart();
    r.restart_daemon(&[]);
    // Leg 1 is current: leg 0 (stale, pattern 1) is resynced from it.
    r.wait_leg(0, "uptodate", Duration::from_secs(30));
    let log = r.daemon.log_text();
    assert!(log.contains("current legs [1], to resync [0]"), "{log}");
    r.legs[1].kill();
    r.wait_leg(1, "failed", Duration::from_secs(5));
    let mut c = Client::connect(&r.daemon.socket, 4);
    assert_eq!(count_not(&mut c, 2), 0, "stale blocks after restart");
}

/// Each leg advanced alone: the daemon refuses to start until told which leg wins.
#[test]
fn split_brain_is_refused() {
    let mut r = Rig::plain("split", &[]);
    let mut c = Client::connect(&r.daemon.socket, 4);
    assert_eq!(c.write(0, &pattern(1, 4096)), 0);
    drop(c);
    r.daemon.terminate();
    // Both legs in step; keep their images.
    let snap: Vec<Vec<u8>> = (0..2).map(|i| r.image(i)).collect();
    let imgs: Vec<_> = (0..2).map(|i| r.dir.path(&format!("leg{i}.img"))).collect();
    let img = |i: usize| imgs[i].clone();
    // Run 1: leg 1 dies, leg 0 is written alone.
    r.restart_daemon(&[]);
    r.legs[1].kill();
    r.wait_leg(1, "failed", Duration::from_secs(5));
    let mut c = Client::connect(&r.daemon.socket, 4);
    assert_eq!(c.write(0, &pattern(2, 4096)), 0);
    drop(c);
    r.daemon.terminate();
    let leg0_run1 = r.image(0);
    // Run 2, from the same starting point: leg 0 dies, leg 1 is written alone.
    r.legs[0].kill();
    std::fs::write(img(0), &snap[0]).unwrap();
    std::fs::write(img(1), &snap[1]).unwrap();
    r.legs[0].restart();
    r.legs[1].restart();
    r.restart_daemon(&["--no-reconnect"]);
    r.legs[0].kill();
    r.wait_leg(0, "failed", Duration::from_secs(5));
    let mut c = Client::connect(&r.daemon.socket, 4);
    assert_eq!(c.write(0, &pattern(3, 4096)), 0);
    drop(c);
    r.daemon.terminate();
    // Now put run 1's leg 0 beside run 2's leg 1.
    std::fs::write(img(0), &leg0_run1).unwrap();
    r.legs[0].restart();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-mirror"));
    cmd.arg("blk").arg("--socket").arg(r.dir.path("split.sock"));
    for u in r.uris() {
        cmd.arg("--leg").arg(u);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("split brain") && err.contains("--force-current"),
        "{err}"
    );
    assert!(err.contains("generation"), "{err}");
    // The operator picks leg 1: its data wins and leg 0 is resynced from it.
    r.restart_daemon(&["--force-current", "1"]);
    r.wait_leg(0, "uptodate", Duration::from_secs(30));
    let mut c = Client::connect(&r.daemon.socket, 4);
    assert_eq!(c.read(0, 4096).unwrap(), pattern(3, 4096));
}

/// A leg lost again while it is being resynced is still this mirror's: when it comes back, to
/// the running daemon or to one restarted meanwhile, it is resynced again (the superblock the
/// mirror wrote it while resyncing is no sign of a split brain) and ends up holding every
/// acknowledged write.
#[test]
fn leg_lost_mid_resync_comes_back_and_is_resynced() {
    // 8 dirty chunks at 2 MiB/s: a resync takes 4 s, time enough to cut it.
    let mut r = Rig::plain("lostresync", &["--resync-rate", "2M"]);
    let mut c = Client::connect(&r.daemon.socket, 4);
    write_pattern(&mut c, 1);
    r.legs[1].kill();
    r.wait_leg(1, "failed", Duration::from_secs(5));
    write_pattern(&mut c, 2);
    r.legs[1].restart();
    r.wait_leg(1, "resyncing", Duration::from_secs(10));

    // Lost mid-resync, back to the running daemon.
    r.legs[1].kill();
    r.wait_leg(1, "failed", Duration::from_secs(5));
    write_pattern(&mut c, 3);
    r.legs[1].restart();
    r.wait_leg(1, "resyncing", Duration::from_secs(10));
    let log = r.daemon.log_text();
    assert!(!log.contains("split brain"), "{log}");

    // Lost mid-resync again; this time the daemon is restarted while the leg is away.
    r.legs[1].kill();
    r.wait_leg(1, "failed", Duration::from_secs(5));
    write_pattern(&mut c, 4);
    drop(c);
    r.daemon.terminate();
    r.legs[1].restart();
    r.restart_daemon(&[]);
    r.wait_leg(1, "uptodate", Duration::from_secs(30));
    let log = r.daemon.log_text();
    assert!(!log.contains("split brain"), "{log}");

    // Leg 1 alone must hold pattern 4.
    let mut c = Client::connect(&r.daemon.socket, 4);
    r.legs[0].kill();
    r.wait_leg(0, "failed", Duration::from_secs(5));
    let stale = count_not(&mut c, 4);
    assert_eq!(stale, 0, "blocks stale on the twice-resynced leg");
}

/// Three legs; the one a resync reads from is lost with reads in flight. The copy carries on
/// from the other current leg (the chunks whose read failed are copied again, none is skipped),
/// and the resynced leg ends up holding every acknowledged write on its own.
#[test]
fn resync_source_lost_mid_copy_carries_on_from_another_leg() {
    let _serial = exclusive();
    let dir = TempDir::new("srclost");
    let mut legs = Vec::new();
    for i in 0..3 {
        let img = dir.path(&format!("leg{i}.img"));
        image(&img, DISK);
        // Leg 0, the source (the first current leg), answers reads 300 ms late, so the
        // resync's reads are still in flight when it goes.
        let (filters, params): (&[&str], &[&str]) = if i == 0 {
            (&["delay"], &["delay-read=300ms"])
        } else {
            (&[], &[])
        };
        legs.push(Nbdkit::start(
            &dir.path(&format!("nbd{i}.sock")),
            &img,
            filters,
            params,
        ));
    }
    let uris: Vec<String> = legs.iter().map(|l| l.uri()).collect();
    create(&uris, &["--assume-clean"]);
    let daemon = Daemon::start(&dir, &uris, &[]);
    let mut c = Client::connect(&daemon.socket, 4);
    write_pattern(&mut c, 1);
    legs[2].kill();
    daemon.wait_leg(2, "failed", Duration::from_secs(5));
    write_pattern(&mut c, 2);
    legs[2].restart();
    daemon.wait_leg(2, "resyncing", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(100));
    legs[0].kill();
    daemon.wait_leg(0, "failed", Duration::from_secs(5));
    daemon.wait_leg(2, "uptodate", Duration::from_secs(30));
    let log = daemon.log_text();
    assert!(
        log.contains("copied again from another leg"),
        "no read was in flight when the source went: {log}"
    );
    // Leg 2 alone must hold pattern 2.
    legs[1].kill();
    daemon.wait_leg(1, "failed", Duration::from_secs(5));
    let stale = count_not(&mut c, 2);
    assert_eq!(
        stale, 0,
        "blocks stale on the leg resynced from two sources\n{log}"
    );
}

/// The last current leg dies while the other is still resyncing: chunks already copied read
/// fine, the rest fail with an I/O error rather than stale data.
#[test]
fn last_current_leg_lost_mid_resync() {
    let r = Rig::build(
        "midresync",
        [&[], &[]],
        [&[], &[]],
        Some(&[]),
        &["--resync-rate", "8M"],
        |dir| std::fs::write(dir.path("leg0.img"), pattern(5, DISK as usize)).unwrap(),
    );
    let mut r = r;
    let t0 = Instant::now();
    loop {
        let st = r.daemon.status();
        if st["resync"]["done_bytes"].as_u64().unwrap_or(0) >= 8 << 20 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "resync did not progress: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    r.legs[0].kill();
    r.wait_leg(0, "failed", Duration::from_secs(5));
    assert_eq!(r.daemon.status()["legs"][1]["state"], "resyncing");
    let mut c = Client::connect(&r.daemon.socket, 4);
    let want = pattern(5, DISK as usize);
    // Chunk 0 was copied: correct data. Chunk 60 was not: an error, never leg 1's blank data.
    assert_eq!(c.read(4096, 4096).unwrap(), want[4096..8192]);
    assert!(
        c.read(60 << 20, 4096).is_err(),
        "unsynced chunk must not be served"
    );
    // Writes still work on the leg that is left.
    assert_eq!(c.write(4096, &pattern(6, 4096)), 0);
    assert_eq!(c.read(4096, 4096).unwrap(), pattern(6, 4096));
}

/// A read that fails on one leg is served from the other, and the good data is written back to
/// the failing leg.
#[test]
fn read_error_is_repaired_from_the_other_leg() {
    let trig = TempDir::new("repair-trigger");
    let trigger = trig.path("fail-reads");
    let param = format!("error-file={}", trigger.display());
    let r = Rig::start(
        "repair",
        [&["error"], &[]],
        [&["error-pread-rate=100%", &param], &[]],
        &["--read-policy", "primary"],
    );
    let mut c = Client::connect(&r.daemon.socket, 4);
    let off = 3u64 << 20;
    assert_eq!(c.write(off, &pattern(4, 4096)), 0);
    // Rot the block on leg 0 behind the daemon's back, then make leg 0's reads fail.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(r.dir.path("leg0.img"))
            .unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&[0xEE; 4096]).unwrap();
        f.sync_all().unwrap();
    }
    std::fs::write(&trigger, b"").unwrap();
    assert_eq!(c.read(off, 4096).unwrap(), pattern(4, 4096));
    let t0 = Instant::now();
    while !r.daemon.log_text().contains("chunk 3 repaired from leg 1") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no repair: {}",
            r.daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let a = r.image(0);
    assert_eq!(
        &a[off as usize..off as usize + 4096],
        &pattern(4, 4096)[..],
        "leg 0 not repaired"
    );
    assert_eq!(r.daemon.status()["legs"][0]["state"], "uptodate");
}
