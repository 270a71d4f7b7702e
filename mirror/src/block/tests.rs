//! Engine logic against scripted legs. The real-peer tests (nbdkit legs, libblkio client) live in
//! the workspace's `tests/`.

use super::*;
use crossbeam_channel::{unbounded, Receiver};
use transport::{BlockLeg, Buffers, LegInfo};

/// What a scripted leg does with a request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Succeed,
    Fail,
    Hold,
    Lose,
}

struct ScriptedLeg {
    uri: String,
    info: LegInfo,
    sink: Arc<dyn CompletionSink>,
    mode: Mutex<Mode>,
    held: Mutex<Vec<Tag>>,
    seen: Mutex<Vec<&'static str>>,
    alive: std::sync::atomic::AtomicBool,
}

impl ScriptedLeg {
    fn set(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }
}

impl BlockLeg for ScriptedLeg {
    fn uri(&self) -> &str {
        &self.uri
    }
    fn info(&self) -> &LegInfo {
        &self.info
    }
    fn submit(&self, req: LegRequest) {
        self.seen.lock().unwrap().push(req.op.name());
        if !self.is_alive() {
            self.sink
                .complete(req.tag, Err(LegError::Aborted("dead".into())));
            return;
        }
        let mode = *self.mode.lock().unwrap();
        match mode {
            Mode::Succeed => self.sink.complete(req.tag, Ok(())),
            Mode::Fail => self.sink.complete(req.tag, Err(LegError::Io(libc::EIO))),
            Mode::Hold => self.held.lock().unwrap().push(req.tag),
            Mode::Lose => {
                self.alive.store(false, Ordering::Release);
                self.sink
                    .complete(req.tag, Err(LegError::Lost("reset".into())));
            }
        }
    }
    fn abort(&self, reason: &str) {
        self.alive.store(false, Ordering::Release);
        let held: Vec<Tag> = std::mem::take(&mut *self.held.lock().unwrap());
        for t in held {
            self.sink.complete(t, Err(LegError::Aborted(reason.into())));
        }
    }
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
}

struct Rig {
    mirror: BlockMirror<u32>,
    legs: Vec<Arc<ScriptedLeg>>,
    done: Receiver<(u32, IoStatus)>,
}

fn rig_sized(sizes: &[u64], timeout_ms: u64) -> Result<Rig, MirrorError> {
    rig_timeouts(sizes, timeout_ms, DEFAULT_FLUSH_TIMEOUT)
}

fn rig_timeouts(sizes: &[u64], timeout_ms: u64, flush: Duration) -> Result<Rig, MirrorError> {
    let (tx, done) = unbounded();
    let legs = Arc::new(Mutex::new(Vec::new()));
    let made = legs.clone();
    let cfg = MirrorConfig {
        io_timeout: Duration::from_millis(timeout_ms),
        flush_timeout: flush,
        read_policy: ReadPolicy::Primary,
        metadata: false,
        ..Default::default()
    };
    let mirror = BlockMirror::with_legs(
        sizes.len(),
        cfg,
        move |ctx, st| {
            let _ = tx.send((ctx, st));
        },
        |i, sink| {
            let leg = Arc::new(ScriptedLeg {
                uri: format!("mock:{i}"),
                info: LegInfo {
                    capacity: sizes[i],
                    block_size: 512,
                    flush: true,
                    fua: true,
                    discard: true,
                    write_zeroes: true,
                    read_only: false,
                },
                sink,
                mode: Mutex::new(Mode::Succeed),
                held: Mutex::new(Vec::new()),
                seen: Mutex::new(Vec::new()),
                alive: true.into(),
            });
            made.lock().unwrap().push(leg.clone());
            Ok(leg as LegHandle)
        },
    )?;
    let legs = std::mem::take(&mut *legs.lock().unwrap());
    Ok(Rig { mirror, legs, done })
}

/// Leg `leg` answers the request it holds, successfully.
fn answer_held(r: &Rig, leg: usize) {
    let tag = r.legs[leg].held.lock().unwrap().pop().unwrap();
    r.legs[leg].sink.complete(tag, Ok(()));
}

/// Both legs hold a write (context `ctx`) for `ms`.
fn stall_both(r: &Rig, buf: &mut [u8], ctx: u32, ms: u64) {
    r.legs[0].set(Mode::Hold);
    r.legs[1].set(Mode::Hold);
    r.mirror.submit(write_op(buf), None, ctx);
    std::thread::sleep(Duration::from_millis(ms));
}

fn rig(timeout_ms: u64) -> Rig {
    rig_sized(&[1 << 20, 1 << 20], timeout_ms).unwrap()
}

fn write_op(buf: &mut [u8]) -> LegOp {
    let mut bufs = Buffers::new();
    // SAFETY: the test keeps `buf` alive and untouched until the request's completion is received.
    unsafe { bufs.push(buf.as_mut_ptr(), buf.len()) };
    LegOp::Write {
        offset: 0,
        bufs,
        fua: false,
    }
}

fn read_op(buf: &mut [u8]) -> LegOp {
    let mut bufs = Buffers::new();
    // SAFETY: as in `write_op`.
    unsafe { bufs.push(buf.as_mut_ptr(), buf.len()) };
    LegOp::Read { offset: 0, bufs }
}

fn wait(r: &Rig) -> (u32, IoStatus) {
    r.done
        .recv_timeout(Duration::from_secs(5))
        .expect("request never completed")
}

#[test]
fn write_completes_only_when_every_leg_has_it() {
    let r = rig(10_000);
    let mut buf = vec![7u8; 4096];
    r.legs[1].set(Mode::Hold);
    r.mirror.submit(write_op(&mut buf), None, 1);
    assert!(r.done.recv_timeout(Duration::from_millis(100)).is_err());
    answer_held(&r, 1);
    assert_eq!(wait(&r), (1, IoStatus::Ok));
    assert_eq!(*r.legs[0].seen.lock().unwrap(), ["write"]);
    assert_eq!(*r.legs[1].seen.lock().unwrap(), ["write"]);
    assert_eq!(r.mirror.inflight(), 0);
}

#[test]
fn failed_write_ejects_the_leg_and_succeeds_from_the_other() {
    let r = rig(10_000);
    let mut buf = vec![1u8; 512];
    r.legs[0].set(Mode::Fail);
    r.mirror.submit(write_op(&mut buf), None, 5);
    assert_eq!(wait(&r), (5, IoStatus::Ok));
    let st = r.mirror.status();
    assert_eq!(st.legs[0].state, LegState::Failed);
    assert_eq!(st.legs[1].state, LegState::UpToDate);
    assert!(st.legs[0]
        .last_error
        .as_deref()
        .unwrap()
        .contains("ejected"));
    assert!(!r.legs[0].is_alive(), "an ejected leg is aborted");
    // Later writes no longer go to the ejected leg.
    r.mirror.submit(write_op(&mut buf), None, 6);
    assert_eq!(wait(&r), (6, IoStatus::Ok));
    assert_eq!(r.legs[0].seen.lock().unwrap().len(), 1);
}

#[test]
fn hung_leg_is_ejected_after_the_timeout() {
    let r = rig(100);
    let mut buf = vec![1u8; 512];
    r.legs[1].set(Mode::Hold);
    let t0 = Instant::now();
    r.mirror.submit(write_op(&mut buf), None, 9);
    assert_eq!(wait(&r), (9, IoStatus::Ok));
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(100),
        "ejected too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(1000),
        "ejected too late: {waited:?}"
    );
    assert_eq!(r.mirror.status().legs[1].state, LegState::Failed);
    assert_eq!(
        r.mirror.inflight(),
        0,
        "the abort released the held request"
    );
}

/// A flush waits for the leg's write-back: past `io_timeout` it is still on time, and only
/// `flush_timeout` ejects the leg. Discard and write-zeroes likewise.
/// The resync's write-zeroes stands for a chunk's write, and guest writes to the chunk wait for
/// it: a leg holding it is ejected after `io_timeout`, not `flush_timeout`.
#[test]
fn the_mirrors_own_write_zeroes_gets_the_io_timeout() {
    let r = rig_timeouts(&[1 << 20, 1 << 20], 100, Duration::from_millis(5000)).unwrap();
    r.legs[1].set(Mode::Hold);
    let t0 = Instant::now();
    let op = LegOp::WriteZeroes {
        offset: 0,
        len: 4096,
        may_unmap: false,
    };
    let rx = r.mirror.inner.leg_io_start(1, op, Arc::new(()));
    assert!(r.mirror.inner.leg_io_wait(&rx).is_err());
    let waited = t0.elapsed();
    assert!(
        waited < Duration::from_millis(2000),
        "ejected after {waited:?}"
    );
    let st = r.mirror.status();
    assert_eq!(st.legs[1].state, LegState::Failed);
    let err = st.legs[1].last_error.clone().unwrap_or_default();
    assert!(!err.contains("flush timeout"), "{err}");
}

#[test]
fn flush_discard_and_write_zeroes_get_the_flush_timeout() {
    let ops = [
        LegOp::Flush,
        LegOp::Discard {
            offset: 0,
            len: 4096,
        },
        LegOp::WriteZeroes {
            offset: 0,
            len: 4096,
            may_unmap: false,
        },
    ];
    for (ctx, op) in ops.into_iter().enumerate() {
        let name = op.name();
        let r = rig_timeouts(&[1 << 20, 1 << 20], 100, Duration::from_millis(900)).unwrap();
        r.legs[1].set(Mode::Hold);
        let t0 = Instant::now();
        r.mirror.submit(op, None, ctx as u32);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            r.mirror.status().legs[1].state,
            LegState::UpToDate,
            "{name}: kept past io_timeout"
        );
        assert!(r.done.try_recv().is_err(), "{name}: waits for leg 1");
        // Past flush_timeout leg 1 is ejected and the request completes from leg 0.
        assert_eq!(wait(&r), (ctx as u32, IoStatus::Ok));
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(900),
            "{name}: ejected after {waited:?}"
        );
        let st = r.mirror.status();
        assert_eq!(st.legs[1].state, LegState::Failed, "{name}");
        let err = st.legs[1].last_error.clone().unwrap_or_default();
        assert!(err.contains("flush timeout of 900 ms"), "{name}: {err}");
    }
    // A write on the same rig still gets io_timeout.
    let r = rig_timeouts(&[1 << 20, 1 << 20], 100, Duration::from_millis(900)).unwrap();
    let mut buf = vec![1u8; 512];
    r.legs[1].set(Mode::Hold);
    let t0 = Instant::now();
    r.mirror.submit(write_op(&mut buf), None, 9);
    assert_eq!(wait(&r), (9, IoStatus::Ok));
    assert!(
        t0.elapsed() < Duration::from_millis(800),
        "write ejected after {:?}",
        t0.elapsed()
    );
}

/// Every leg sits on a write past the timeout (an overloaded host, say): ejecting one would
/// cure nothing, so both stay. Once one answers, the one still late is ejected and the write
/// completes from the other.
#[test]
fn legs_late_together_are_kept_until_one_keeps_up() {
    let r = rig(100);
    let mut buf = vec![1u8; 512];
    stall_both(&r, &mut buf, 4, 600);
    let st = r.mirror.status();
    assert_eq!(
        [st.legs[0].state, st.legs[1].state],
        [LegState::UpToDate, LegState::UpToDate],
        "both kept while both are late"
    );
    assert!(r.done.try_recv().is_err(), "the write waits for its legs");
    answer_held(&r, 0);
    // Leg 0 answered; leg 1 alone is late a timeout after that answer and goes.
    assert_eq!(wait(&r), (4, IoStatus::Ok));
    let st = r.mirror.status();
    assert_eq!(st.legs[0].state, LegState::UpToDate);
    assert_eq!(st.legs[1].state, LegState::Failed);
}

/// Legs stalled together resume a moment apart: the one that answers second is judged from the
/// first one's answer, not from when the write went out, so the shared stall ejects nobody.
#[test]
fn the_leg_that_resumes_second_from_a_shared_stall_is_kept() {
    // Watchdog looks every 250 ms.
    let r = rig(1000);
    let mut buf = vec![1u8; 512];
    // Two watchdog looks past the timeout (1250 and 1500 ms) see both legs late and keep them.
    stall_both(&r, &mut buf, 6, 1600);
    answer_held(&r, 0);
    // Longer than a watchdog look, well inside the timeout counted from leg 0's answer.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        r.mirror.status().legs[1].state,
        LegState::UpToDate,
        "leg 1 ejected {:?} after leg 0 resumed from the same stall",
        Duration::from_millis(400)
    );
    answer_held(&r, 1);
    assert_eq!(wait(&r), (6, IoStatus::Ok));
    let st = r.mirror.status();
    assert_eq!(
        [st.legs[0].state, st.legs[1].state],
        [LegState::UpToDate, LegState::UpToDate]
    );
}

/// The last up-to-date leg is kept however late it is: ejecting it would fail the guest.
#[test]
fn the_last_up_to_date_leg_is_not_ejected_for_a_timeout() {
    let r = rig(100);
    let mut buf = vec![1u8; 512];
    r.mirror.fail_leg(1).unwrap();
    r.legs[0].set(Mode::Hold);
    r.mirror.submit(write_op(&mut buf), None, 5);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(r.mirror.status().legs[0].state, LegState::UpToDate);
    assert!(
        r.done.try_recv().is_err(),
        "the write waits for the kept leg"
    );
    answer_held(&r, 0);
    assert_eq!(wait(&r), (5, IoStatus::Ok));
    assert_eq!(r.mirror.status().legs[0].state, LegState::UpToDate);
}

#[test]
fn read_error_moves_to_the_other_leg_and_keeps_the_leg() {
    let r = rig(10_000);
    let mut buf = vec![0u8; 512];
    r.legs[0].set(Mode::Fail);
    r.mirror.submit(read_op(&mut buf), None, 3);
    assert_eq!(wait(&r), (3, IoStatus::Ok));
    assert_eq!(*r.legs[1].seen.lock().unwrap(), ["read"]);
    let st = r.mirror.status();
    assert_eq!(st.legs[0].state, LegState::UpToDate);
    assert_eq!(st.legs[0].errors, 1);
}

#[test]
fn hung_read_moves_after_the_timeout() {
    let r = rig(100);
    let mut buf = vec![0u8; 512];
    r.legs[0].set(Mode::Hold);
    r.mirror.submit(read_op(&mut buf), None, 4);
    assert_eq!(wait(&r), (4, IoStatus::Ok));
    assert_eq!(*r.legs[1].seen.lock().unwrap(), ["read"]);
    assert_eq!(r.mirror.status().legs[0].state, LegState::Failed);
}

#[test]
fn lost_connection_ejects_even_on_read() {
    let r = rig(10_000);
    let mut buf = vec![0u8; 512];
    r.legs[0].set(Mode::Lose);
    r.mirror.submit(read_op(&mut buf), None, 8);
    assert_eq!(wait(&r), (8, IoStatus::Ok));
    assert_eq!(r.mirror.status().legs[0].state, LegState::Failed);
}

#[test]
fn guest_sees_an_error_only_when_no_leg_is_left() {
    let r = rig(10_000);
    let mut buf = vec![0u8; 512];
    r.legs[0].set(Mode::Lose);
    r.legs[1].set(Mode::Lose);
    r.mirror.submit(write_op(&mut buf), None, 1);
    assert_eq!(wait(&r), (1, IoStatus::IoError));
    r.mirror.submit(read_op(&mut buf), None, 2);
    assert_eq!(wait(&r), (2, IoStatus::IoError));
    r.mirror.submit(LegOp::Flush, None, 3);
    assert_eq!(wait(&r), (3, IoStatus::IoError));
    assert_eq!(r.mirror.inflight(), 0);
}

#[test]
fn device_error_on_the_last_leg_fails_the_request_but_keeps_the_leg() {
    let r = rig(10_000);
    let mut buf = vec![0u8; 512];
    r.mirror.fail_leg(0).unwrap();
    r.legs[1].set(Mode::Fail);
    r.mirror.submit(write_op(&mut buf), None, 1);
    assert_eq!(wait(&r), (1, IoStatus::IoError));
    assert_eq!(r.mirror.status().legs[1].state, LegState::UpToDate);
    r.legs[1].set(Mode::Succeed);
    r.mirror.submit(write_op(&mut buf), None, 2);
    assert_eq!(wait(&r), (2, IoStatus::Ok));
}

#[test]
fn dead_idle_leg_is_noticed_without_traffic() {
    let r = rig(40);
    r.legs[1].alive.store(false, Ordering::Release);
    let t0 = Instant::now();
    while r.mirror.status().legs[1].state != LegState::Failed {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "dead leg never ejected"
        );
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        r.mirror.status().legs[1].last_error.as_deref(),
        Some("ejected: connection lost")
    );
}

#[test]
fn legs_of_different_sizes_are_refused_unless_allowed() {
    let e = rig_sized(&[1 << 20, 2 << 20], 1000).err().unwrap();
    let msg = e.to_string();
    assert!(msg.contains("mock:0 is 1048576 bytes"), "{msg}");
    assert!(msg.contains("--allow-size-mismatch"), "{msg}");
    assert!(matches!(
        rig_sized(&[], 1000),
        Err(MirrorError::LegCount(0))
    ));
}

#[test]
fn fail_leg_checks_the_index() {
    let r = rig(1000);
    assert!(matches!(
        r.mirror.fail_leg(2),
        Err(MirrorError::NoSuchLeg(2, 1))
    ));
}

#[test]
fn a_write_no_leg_took_fails_and_ejects_nobody() {
    let r = rig(10_000);
    let mut buf = vec![0u8; 512];
    r.legs[0].set(Mode::Fail);
    r.legs[1].set(Mode::Fail);
    r.mirror.submit(write_op(&mut buf), None, 1);
    assert_eq!(wait(&r), (1, IoStatus::IoError));
    let st = r.mirror.status();
    assert_eq!(st.legs[0].state, LegState::UpToDate);
    assert_eq!(st.legs[1].state, LegState::UpToDate);
}

#[test]
fn a_write_one_leg_took_ejects_the_leg_that_failed_it_even_when_it_answered_first() {
    let r = rig(10_000);
    let mut buf = vec![0u8; 512];
    r.legs[0].set(Mode::Fail);
    r.legs[1].set(Mode::Hold);
    r.mirror.submit(write_op(&mut buf), None, 1);
    // Leg 0 failed; the verdict waits for leg 1.
    assert!(r.done.recv_timeout(Duration::from_millis(50)).is_err());
    assert_eq!(r.mirror.status().legs[0].state, LegState::UpToDate);
    answer_held(&r, 1);
    assert_eq!(wait(&r), (1, IoStatus::Ok));
    assert_eq!(r.mirror.status().legs[0].state, LegState::Failed);
}
