//! The README's first command: a mirrored disk surviving the death of one leg's server.
//!
//! Starts two nbdkit servers over image files in a scratch directory, writes mirror metadata on
//! them, serves them as one mirrored vhost-user-blk disk (the engine embedded as a library, as a
//! VMM would) and drives it with libblkio at queue depth 16. A few seconds in, leg 1's server is
//! killed; later it is started again, and the mirror resyncs the chunks it missed while the
//! workload goes on. The legs' state and the resync progress are shown every second. At the end
//! leg 0's server is killed too, and every acknowledged block is read back from leg 1 alone:
//! proof that the resync brought it fully up to date.
//!
//! `scripts/demo [--seconds N] [--kill-at N] [--return-at N]`

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::blk::{self, BlkConfig, BlkMirror, Completion};
use blkio::{Blkio, ReqFlags};
use mirror::{BlockMirror, IoStatus, MirrorConfig};
use transport::LegSpec;

const DISK: u64 = 256 << 20;
const BLOCKS: u64 = 8192;
const QD: usize = 16;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number of seconds"))
        })
        .unwrap_or(default)
}

fn nbdkit(socket: &Path, image: &Path) -> Child {
    let _ = std::fs::remove_file(socket);
    let child = Command::new("nbdkit")
        .args(["--exit-with-parent", "-f", "-U"])
        .arg(socket)
        .arg("file")
        .arg(format!("file={}", image.display()))
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit is missing: run scripts/demo, which installs it");
    let t0 = Instant::now();
    while UnixStream::connect(socket).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "nbdkit did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn stamp(block: u64, seq: u64) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    for chunk in b.chunks_mut(16) {
        chunk[..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..].copy_from_slice(&seq.to_le_bytes());
    }
    b
}

fn show(mirror: &BlkMirror, t: f64, acked: u64, errors: u64) {
    let st = mirror.status();
    let legs: Vec<String> = st
        .legs
        .iter()
        .map(|l| format!("leg {} {:<9}", l.index, l.state.to_string()))
        .collect();
    let resync = st
        .resync
        .map(|r| {
            format!(
                "  resync {:.1}/{:.1} MiB",
                r.done_bytes as f64 / 1048576.0,
                r.total_bytes as f64 / 1048576.0
            )
        })
        .unwrap_or_default();
    println!(
        "{t:5.1}s  acked {acked:>7}  guest errors {errors}  generation {}  dirty chunks {:>3}  |  {}{resync}",
        st.generation,
        st.dirty_chunks,
        legs.join("  ")
    );
}

fn main() {
    let seconds = arg("--seconds", 10);
    let kill_at = arg("--kill-at", 3);
    let return_at = arg("--return-at", 6);
    let dir = std::env::temp_dir().join(format!("vhost-mirror-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let images: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("leg{i}.img"))).collect();
    let mut servers = Vec::new();
    let mut specs = Vec::new();
    for (i, img) in images.iter().enumerate() {
        std::fs::File::create(img).unwrap().set_len(DISK).unwrap();
        let sock = dir.join(format!("nbd{i}.sock"));
        servers.push(nbdkit(&sock, img));
        specs.push(
            format!("nbd+unix:///?socket={}", sock.display())
                .parse::<LegSpec>()
                .unwrap(),
        );
    }
    println!(
        "two legs: nbdkit servers over {} and {}",
        images[0].display(),
        images[1].display()
    );

    let created = mirror::create(&specs, &Default::default(), 1 << 20, true)
        .expect("cannot write mirror metadata");
    println!(
        "mirror {}: {} MiB of data, write-intent chunks of 1 MiB\n",
        created.uuid,
        created.data_size >> 20
    );

    let mirror: BlkMirror = BlockMirror::open(
        &specs,
        MirrorConfig::default(),
        |c: Completion, s: IoStatus| c.finish(s),
    )
    .expect("cannot assemble the mirror");
    let socket = dir.join("vhost.sock");
    {
        let (m, s) = (mirror.clone(), socket.clone());
        std::thread::spawn(move || {
            blk::serve(
                &s,
                m,
                BlkConfig::default(),
                Arc::new(AtomicBool::new(false)),
            )
        });
    }
    while !socket.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "vhost-user-blk socket: {} (libblkio is the guest here)\n",
        socket.display()
    );

    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", socket.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    let mut q = b.start().unwrap().queues.remove(0);
    let region = b.alloc_mem_region(QD * 4096).unwrap();
    b.map_mem_region(&region).unwrap();
    let buf = |slot: usize| (region.addr + slot * 4096) as *mut u8;

    let mut acked = vec![0u64; BLOCKS as usize];
    let mut busy = vec![false; BLOCKS as usize];
    let mut slots: Vec<Option<(u64, u64)>> = vec![None; QD];
    let (mut seq, mut ok, mut errors, mut rng) = (0u64, 0u64, 0u64, 0x2545_f491u64);
    let mut comps: Vec<_> = (0..QD)
        .map(|_| std::mem::MaybeUninit::<blkio::Completion>::uninit())
        .collect();
    let t0 = Instant::now();
    let mut next_report = 1.0;
    let mut killed = false;
    let mut returned = false;
    let socks: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("nbd{i}.sock"))).collect();
    loop {
        let t = t0.elapsed();
        if !killed && t >= Duration::from_secs(kill_at) {
            killed = true;
            let _ = servers[1].kill();
            let _ = servers[1].wait();
            println!(
                "\n{:5.1}s  *** killed leg 1's nbdkit server (kill -9) ***\n",
                t.as_secs_f64()
            );
        }
        if killed && !returned && t >= Duration::from_secs(return_at) {
            returned = true;
            servers[1] = nbdkit(&socks[1], &images[1]);
            // The mirror retries failed legs on its own with backoff; re-add skips the wait.
            let _ = mirror.re_add(1);
            println!(
                "\n{:5.1}s  *** leg 1's server is back: resync of the chunks it missed ***\n",
                t.as_secs_f64()
            );
        }
        let running = t < Duration::from_secs(seconds);
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
                    if !busy[(rng % BLOCKS) as usize] {
                        break rng % BLOCKS;
                    }
                };
                seq += 1;
                busy[block as usize] = true;
                *s = Some((block, seq));
                // SAFETY: the slot's 4 KiB lie inside the mapped region and no request uses them now.
                unsafe {
                    std::ptr::copy_nonoverlapping(stamp(block, seq).as_ptr(), buf(slot), 4096)
                };
                q.write(block * 4096, buf(slot), 4096, slot, ReqFlags::empty());
                inflight += 1;
            }
        } else if inflight == 0 {
            break;
        }
        let mut timeout = Duration::from_secs(30);
        let n = q.do_io(&mut comps, 1, Some(&mut timeout), None).unwrap();
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            let (block, s) = slots[c.user_data].take().unwrap();
            busy[block as usize] = false;
            if c.ret == 0 {
                ok += 1;
                acked[block as usize] = s;
            } else {
                errors += 1;
            }
        }
        if t.as_secs_f64() >= next_report {
            show(&mirror, t.as_secs_f64(), ok, errors);
            next_report += 1.0;
        }
    }
    show(&mirror, t0.elapsed().as_secs_f64(), ok, errors);
    let waited = Instant::now();
    while mirror
        .status()
        .legs
        .iter()
        .any(|l| l.state != mirror::LegState::UpToDate)
    {
        if waited.elapsed() > Duration::from_secs(60) {
            println!("leg 1 did not come back up to date");
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    show(&mirror, t0.elapsed().as_secs_f64(), ok, errors);
    let _ = servers[0].kill();
    let _ = servers[0].wait();
    println!("\n*** killed leg 0's server too: everything is now read from leg 1 alone ***\n");
    while mirror.status().legs[0].state != mirror::LegState::Failed {
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut bad = 0;
    for (block, &s) in acked.iter().enumerate() {
        if s == 0 {
            continue;
        }
        q.read(block as u64 * 4096, buf(0), 4096, 0, ReqFlags::empty());
        let mut timeout = Duration::from_secs(30);
        q.do_io(&mut comps, 1, Some(&mut timeout), None).unwrap();
        // SAFETY: slot 0 is idle again and lies inside the mapped region.
        let got = unsafe { std::slice::from_raw_parts(buf(0), 4096) };
        if got != stamp(block as u64, s) {
            bad += 1;
        }
    }
    let written = acked.iter().filter(|&&s| s != 0).count();
    println!("read back {written} acknowledged blocks from leg 1 (resynced): {bad} wrong");
    if let Some(l) = mirror.status().legs.iter().find(|l| l.last_error.is_some()) {
        println!(
            "leg {} last error: {}",
            l.index,
            l.last_error.as_deref().unwrap_or("")
        );
    }
    let verdict = errors == 0 && bad == 0;
    println!(
        "{}",
        if verdict {
            "PASS: no guest error, no acknowledged write lost: leg 1 died, came back, was resynced, and alone holds every write"
        } else {
            "FAIL"
        }
    );
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::process::exit(if verdict { 0 } else { 1 });
}
