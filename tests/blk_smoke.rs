//! The daemon over null legs, driven by libblkio: the pipeline without any remote peer.

mod common;
use common::*;

#[test]
fn null_legs_serve_a_libblkio_client() {
    let dir = TempDir::new("smoke");
    let d = Daemon::start(
        &dir,
        &["null:64M".into(), "null:64M".into()],
        &["--no-metadata"],
    );
    let mut c = Client::connect(&d.socket, 4);
    assert_eq!(c.capacity, 64 << 20);
    assert_eq!(c.write(0, &[0xAB; 4096]), 0);
    assert_eq!(
        c.read(4096, 4096).unwrap(),
        vec![0u8; 4096],
        "null legs read zeroes"
    );
    assert_eq!(c.flush(), 0);
    // Past the end: refused, not crashed.
    assert_ne!(c.write(64 << 20, &[1; 512]), 0);
    let st = d.status();
    assert_eq!(st["legs"][0]["state"], "uptodate");
    assert!(st["legs"][0]["ops"].as_u64().unwrap() >= 2);
    // Without metadata there is no resync to tune: a clear refusal, and the daemon serves on.
    for cmd in ["set-resync-rate", "set-resync-busy-rate"] {
        let v = ctl(&d.control, &format!(r#"{{"cmd":"{cmd}","rate":1048576}}"#));
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains("no metadata"), "{cmd}: {v}");
    }
    assert_eq!(c.write(8192, &[0xCD; 4096]), 0);
}

/// Several virtqueues, each with its own worker: requests on every queue complete.
#[test]
fn multiple_queues_all_serve() {
    let dir = TempDir::new("mq");
    let d = Daemon::start(
        &dir,
        &["null:64M".into(), "null:64M".into()],
        &["--no-metadata", "--num-queues", "4"],
    );
    let (mut c, mut extra) = Client::connect_queues(&d.socket, 8, 4);
    assert_eq!(extra.len(), 3);
    for (i, q) in extra.iter_mut().enumerate() {
        q.write(
            (i as u64) << 20,
            c.buf(i + 1),
            4096,
            i,
            blkio::ReqFlags::empty(),
        );
        let mut comps: Vec<_> = (0..4)
            .map(|_| std::mem::MaybeUninit::<blkio::Completion>::uninit())
            .collect();
        let mut t = std::time::Duration::from_secs(10);
        let n = q.do_io(&mut comps, 1, Some(&mut t), None).unwrap();
        assert_eq!(n, 1, "queue {} did not answer", i + 1);
        // SAFETY: do_io initialised the first n completions.
        let done = unsafe { comps[0].assume_init_ref() };
        assert_eq!((done.user_data, done.ret), (i, 0));
    }
    assert_eq!(c.write(0, &[7; 4096]), 0);
    assert!(d.status()["legs"][0]["ops"].as_u64().unwrap() >= 4);
}

/// Two local `file:` legs (io_uring, O_DIRECT where the filesystem allows it) as a mirror.
#[test]
fn file_legs_mirror_and_match() {
    let _serial = exclusive();
    let dir = TempDir::on_disk("filelegs");
    let legs = file_legs(&dir);
    let mut d = Daemon::start(&dir, &legs, &[]);
    let mut c = Client::connect(&d.socket, 16);
    let rep = stamped_workload(&mut c, 4096, 16, std::time::Duration::from_secs(2), |_| {});
    assert_eq!(rep.errors, 0, "{}", d.log_text());
    assert_eq!(verify_acked(&mut c, &rep.acked), 0);
    // Unaligned buffer in guest memory (the leg bounces it for O_DIRECT).
    let data = pattern(3, 4096);
    // SAFETY: one byte into slot 1, well inside the mapped region, and no request uses it.
    let odd = unsafe { c.buf(1).add(1) };
    // SAFETY: 4096 bytes from `odd` stay inside slot 1 and 2 of the region.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), odd, 4096) };
    c.q.write(8192, odd, 4096, 0, blkio::ReqFlags::empty());
    assert_eq!(c.reap(1, std::time::Duration::from_secs(10))[0].1, 0);
    assert_eq!(c.read(8192, 4096).unwrap(), data);
    drop(c);
    d.terminate();
    let end = (DISK - 3 * 4096) as usize;
    let a = std::fs::read(dir.path("leg0.img")).unwrap();
    let b = std::fs::read(dir.path("leg1.img")).unwrap();
    assert!(a[..end] == b[..end], "file legs differ");
}
