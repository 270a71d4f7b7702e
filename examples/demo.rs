//! The README's first command: a mirrored disk surviving the death of one leg's server.
//!
//! Starts two nbdkit servers over image files in a scratch directory, writes mirror metadata on
//! them and serves them as one mirrored vhost-user-blk disk (the engine embedded as a library, as
//! a VMM would). The disk's user is a real QEMU guest where QEMU is installed, libblkio
//! otherwise (`--client guest|libblkio|auto`, default auto):
//!
//! * **guest**: a tiny Linux guest (built by `scripts/guest-image` from Debian packages, booted
//!   under TCG) runs fio with crc32c verification on the disk. A few seconds into fio, leg 1's
//!   server is killed; later it is started again and resynced while fio goes on. Pass: fio exits
//!   0 with every block verified, the guest kernel logs no I/O error, and afterwards both legs
//!   hold identical data.
//! * **libblkio**: stamped 4 KiB writes at queue depth 16, with the same kill and return. At the
//!   end leg 0's server is killed too, and every acknowledged block is read back from leg 1
//!   alone: proof that the resync brought it fully up to date.
//!
//! The legs' state and the resync progress are shown every second.
//!
//! `scripts/demo [--client guest|libblkio|auto] [--seconds N] [--kill-at N] [--return-at N]`

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backends::blk::{self, BlkConfig, BlkMirror, Completion};
use blkio::{Blkio, ReqFlags};
use mirror::{BlockMirror, IoStatus, MirrorConfig};
use transport::LegSpec;

const DISK: u64 = 256 << 20;
const BLOCKS: u64 = 8192;
const QD: usize = 16;

/// fio in the guest: 40 MiB of 4 KiB random writes at 1000 IOPS (about 10 s), each block then
/// read back and checked against its crc32c.
const FIO_SIZE: u64 = 40 << 20;

fn value(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .map(|i| match args.get(i + 1) {
            Some(v) => v.clone(),
            None => usage(&format!("{name} needs a value")),
        })
}

fn usage(why: &str) -> ! {
    eprintln!(
        "demo: {why}\nusage: scripts/demo [--client guest|libblkio|auto] [--seconds N] \
         [--kill-at N] [--return-at N]"
    );
    std::process::exit(2)
}

fn arg(name: &str, default: u64) -> u64 {
    value(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| usage(&format!("{name} takes a number of seconds, not {v:?}")))
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Client {
    Guest,
    Libblkio,
}

fn client() -> Client {
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match value("--client").as_deref() {
        None | Some("auto") if qemu => Client::Guest,
        None | Some("auto") => {
            println!("(QEMU is not installed: libblkio plays the guest; `--client guest` installs QEMU)\n");
            Client::Libblkio
        }
        Some("guest") => Client::Guest,
        Some("libblkio") => Client::Libblkio,
        Some(other) => usage(&format!(
            "--client is guest, libblkio or auto, not {other:?}"
        )),
    }
}

/// Kernel and initramfs from `scripts/guest-image` (which installs QEMU, the kernel, busybox and
/// fio if they are missing).
fn guest_image() -> (PathBuf, PathBuf) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest-image");
    println!("building the guest (scripts/guest-image)...");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} failed: {stdout}",
        script.display()
    );
    let get = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("guest-image printed no {key}: {stdout}"))
    };
    (get("KERNEL="), get("INITRD="))
}

/// QEMU with the mirrored disk as its vhost-user-blk device; the console is collected.
struct Guest {
    child: Child,
    console: Arc<Mutex<String>>,
}

impl Guest {
    fn boot(kernel: &Path, initrd: &Path, socket: &Path, dir: &Path) -> Guest {
        let fio = [
            "--name=demo",
            "--filename=/dev/vda",
            "--ioengine=libaio",
            "--direct=1",
            "--thread",
            "--rw=randwrite",
            "--bs=4k",
            &format!("--size={FIO_SIZE}"),
            "--iodepth=16",
            "--rate_iops=,1000",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--eta=never",
        ];
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1"])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=vhm,path={}", socket.display()))
            .args(["-device", "vhost-user-blk-pci,chardev=vhm,num-queues=1"])
            .args(["-nic", "none", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet loglevel=4 -- {}",
                fio.join(" ")
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("qemu.err")).unwrap())
            .spawn()
            .expect("cannot start qemu-system-x86_64");
        let mut out = child.stdout.take().unwrap();
        let console = Arc::new(Mutex::new(String::new()));
        let c = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                c.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]).replace('\r', ""));
            }
        });
        Guest { child, console }
    }

    fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills leg 1's server at `kill_at` and starts it again at `return_at`.
struct Drill<'a> {
    kill_at: Duration,
    return_at: Duration,
    killed: bool,
    returned: bool,
    socks: &'a [PathBuf],
    images: &'a [PathBuf],
}

impl<'a> Drill<'a> {
    fn new(kill_at: u64, return_at: u64, socks: &'a [PathBuf], images: &'a [PathBuf]) -> Self {
        Drill {
            kill_at: Duration::from_secs(kill_at),
            return_at: Duration::from_secs(return_at),
            killed: false,
            returned: false,
            socks,
            images,
        }
    }

    /// Does what is due at `t`.
    fn step(&mut self, t: Duration, mirror: &BlkMirror, servers: &mut [Child]) {
        if !self.killed && t >= self.kill_at {
            self.killed = true;
            let _ = servers[1].kill();
            let _ = servers[1].wait();
            println!(
                "\n{:5.1}s  *** killed leg 1's nbdkit server (kill -9) ***\n",
                t.as_secs_f64()
            );
        }
        if self.killed && !self.returned && t >= self.return_at {
            self.returned = true;
            servers[1] = nbdkit(&self.socks[1], &self.images[1]);
            // The mirror retries failed legs on its own with backoff; re-add skips the wait.
            let _ = mirror.re_add(1);
            println!(
                "\n{:5.1}s  *** leg 1's server is back: resync of the chunks it missed ***\n",
                t.as_secs_f64()
            );
        }
    }
}

/// Waits (at most a minute) until every leg is up to date again.
fn wait_up_to_date(mirror: &BlkMirror) -> bool {
    let waited = Instant::now();
    while mirror
        .status()
        .legs
        .iter()
        .any(|l| l.state != mirror::LegState::UpToDate)
    {
        if waited.elapsed() > Duration::from_secs(60) {
            println!("leg 1 did not come back up to date");
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    true
}

/// The text between `begin` and `end` on the console.
fn section<'a>(text: &'a str, begin: &str, end: &str) -> Option<&'a str> {
    let a = text.find(begin)? + begin.len();
    let b = text[a..].find(end)? + a;
    Some(&text[a..b])
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

fn show(mirror: &BlkMirror, t: f64, done: &str, errors: u64) {
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
        "{t:5.1}s  {done}  guest errors {errors}  generation {}  dirty chunks {:>3}  |  {}{resync}",
        st.generation,
        st.dirty_chunks,
        legs.join("  ")
    );
}

fn main() {
    let seconds = arg("--seconds", 10);
    let kill_at = arg("--kill-at", 3);
    let return_at = arg("--return-at", 6);
    if return_at <= kill_at {
        usage("--return-at must come after --kill-at");
    }
    let client = client();
    let guest = (client == Client::Guest).then(guest_image);
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
    let socks: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("nbd{i}.sock"))).collect();
    if let Some((kernel, initrd)) = guest {
        let g = Guest::boot(&kernel, &initrd, &socket, &dir);
        let verdict = run_guest(
            g,
            &mirror,
            &mut servers,
            &images,
            &socks,
            (kill_at, return_at),
        );
        for mut s in servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        if verdict {
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            println!("(the legs' images, qemu.err are kept in {})", dir.display());
        }
        std::process::exit(if verdict { 0 } else { 1 });
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
    let mut drill = Drill::new(kill_at, return_at, &socks, &images);
    loop {
        let t = t0.elapsed();
        drill.step(t, &mirror, &mut servers);
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
            show(&mirror, t.as_secs_f64(), &format!("acked {ok:>7}"), errors);
            next_report += 1.0;
        }
    }
    show(
        &mirror,
        t0.elapsed().as_secs_f64(),
        &format!("acked {ok:>7}"),
        errors,
    );
    wait_up_to_date(&mirror);
    show(
        &mirror,
        t0.elapsed().as_secs_f64(),
        &format!("acked {ok:>7}"),
        errors,
    );
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

/// The guest run: fio with crc32c verify while leg 1's server is killed at `kill_at` s into fio
/// and back at `return_at` s. True if the guest saw nothing and the legs end identical.
fn run_guest(
    mut g: Guest,
    mirror: &BlkMirror,
    servers: &mut [Child],
    images: &[PathBuf],
    socks: &[PathBuf],
    (kill_at, return_at): (u64, u64),
) -> bool {
    println!("QEMU guest booting (TCG, about 10 s); it runs fio with crc32c verify on the mirrored disk\n");
    let t_boot = Instant::now();
    while !g.console().contains("VHM-FIO-START") {
        if let Ok(Some(st)) = g.child.try_wait() {
            println!(
                "the guest stopped before fio started ({st}):\n{}",
                g.console()
            );
            return false;
        }
        if t_boot.elapsed() > Duration::from_secs(120) {
            println!("the guest did not start fio within 120 s:\n{}", g.console());
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "{:5.1}s  guest booted; fio starts (40 MiB of 4 KiB random writes, then verify)\n",
        t_boot.elapsed().as_secs_f64()
    );
    let t0 = Instant::now();
    let mut next_report = 1.0;
    let ops = |m: &BlkMirror| m.status().legs.iter().map(|l| l.ops).max().unwrap_or(0);
    let mut drill = Drill::new(kill_at, return_at, socks, images);
    while g.child.try_wait().ok().flatten().is_none() {
        let t = t0.elapsed();
        drill.step(t, mirror, servers);
        if t.as_secs_f64() >= next_report {
            show(
                mirror,
                t.as_secs_f64(),
                &format!("leg ops {:>7}", ops(mirror)),
                0,
            );
            next_report += 1.0;
        }
        if t > Duration::from_secs(300) {
            println!("the guest is still running after 300 s:\n{}", g.console());
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The console reader may still hold the last lines.
    std::thread::sleep(Duration::from_millis(200));
    let console = g.console();
    let code = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("VHM-FIO-EXIT="))
        .and_then(|c| c.trim().parse::<i32>().ok());
    let kernel_errors: Vec<&str> = section(&console, "VHM-DMESG-BEGIN\n", "VHM-DMESG-END")
        .unwrap_or("(no kernel log on the console)")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let fio_summary: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("IOPS=") || l.contains("verify"))
        .collect();
    println!(
        "\nguest finished: fio exit {}, guest kernel I/O errors: {}",
        code.map_or("none reported".to_string(), |c| c.to_string()),
        kernel_errors.len()
    );
    for l in fio_summary {
        println!("  fio: {}", l.trim());
    }
    for l in &kernel_errors {
        println!("  kernel: {l}");
    }

    if !wait_up_to_date(mirror) {
        return false;
    }
    show(
        mirror,
        t0.elapsed().as_secs_f64(),
        &format!("leg ops {:>7}", ops(mirror)),
        0,
    );
    let capacity = mirror.status().capacity as usize;
    let (a, b) = (
        std::fs::read(&images[0]).unwrap(),
        std::fs::read(&images[1]).unwrap(),
    );
    let differ = a[..capacity]
        .chunks(4096)
        .zip(b[..capacity].chunks(4096))
        .filter(|(x, y)| x != y)
        .count();
    println!(
        "legs compared over the guest's {} MiB: {differ} blocks differ",
        capacity >> 20
    );
    let pass = code == Some(0) && kernel_errors.is_empty() && differ == 0;
    println!(
        "{}",
        if pass {
            "PASS: the guest's fio verified every block and saw no error while leg 1 died, came back and was resynced; both legs hold the same data"
        } else {
            "FAIL"
        }
    );
    pass
}
