//! Numbered UDP datagrams, to check that a network path cut loses and duplicates nothing.
//!
//! ```text
//! udp_seq send ADDR:PORT COUNT INTERVAL_MS   # datagrams 0..COUNT, one every INTERVAL_MS
//! udp_seq recv PORT COUNT TIMEOUT_S          # counts what arrives, prints a JSON summary
//! udp_seq tcp-recv PORT                      # one TCP connection's bytes to stdout
//! udp_seq tcp-send ADDR:PORT                 # stdin over one TCP connection
//! ```
//!
//! Each datagram carries a magic tag and its 64-bit sequence number (big-endian), padded to 64
//! bytes. The sender paces against a fixed schedule (datagram i leaves at start + i * interval,
//! so a slow moment does not stretch the run) and prints `{"sent":…,"send_errors":…,
//! "elapsed_ms":…}`. The receiver prints `udp_seq: listening on …` on stderr once bound, then
//! waits until every number in 0..COUNT has arrived and one more second has passed (for late
//! duplicates), or until TIMEOUT_S seconds after the first datagram (or after the start, if none
//! came), and prints on stdout:
//!
//! ```text
//! {"received":N,"missing":M,"duplicates":D,"out_of_order":O,"first_missing":[…],"elapsed_ms":T}
//! ```
//!
//! `received` counts distinct numbers, `duplicates` copies beyond the first, `out_of_order` first
//! copies that arrived after a higher number, `first_missing` up to 20 of the missing numbers.
//! Datagrams without the tag or numbered outside 0..COUNT are ignored and counted as `foreign`.
//! `tcp-recv` accepts one TCP connection, copies what it sends to stdout until it closes (pipe it
//! into `sha256sum`) and prints `udp_seq: N bytes in T ms` on stderr; it never writes to the peer,
//! so a sender such as busybox `nc` is not cut short by an early end of stream. `tcp-send`
//! connects (retrying for 20 s, so the receiver may start later), sends stdin, closes, and
//! prints the same line.
//!
//! Built for the guest by tests/guest_net.rs and copied into its initramfs by scripts/guest-image.

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"VHMSEQ01";
const LEN: usize = 64;
/// How long the receiver stays after the last missing number arrived, to catch late copies.
const LINGER: Duration = Duration::from_secs(1);

fn usage() -> ExitCode {
    eprintln!(
        "usage: udp_seq send ADDR:PORT COUNT INTERVAL_MS\n       udp_seq recv PORT COUNT TIMEOUT_S\n       \
         udp_seq tcp-recv PORT\n       udp_seq tcp-send ADDR:PORT"
    );
    ExitCode::from(2)
}

fn send(addr: SocketAddr, count: u64, interval: Duration) -> std::io::Result<()> {
    let sock = UdpSocket::bind(if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    let mut buf = [0u8; LEN];
    buf[..8].copy_from_slice(MAGIC);
    let t0 = Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    for seq in 0..count {
        let due = t0 + interval * u32::try_from(seq).unwrap_or(u32::MAX);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        buf[8..16].copy_from_slice(&seq.to_be_bytes());
        match sock.send_to(&buf, addr) {
            Ok(_) => sent += 1,
            Err(e) => {
                errors += 1;
                if errors <= 5 {
                    eprintln!("udp_seq: datagram {seq}: {e}");
                }
            }
        }
    }
    println!(
        "{{\"sent\":{sent},\"send_errors\":{errors},\"elapsed_ms\":{}}}",
        t0.elapsed().as_millis()
    );
    Ok(())
}

fn recv(port: u16, count: u64, timeout: Duration) -> std::io::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", port))?;
    eprintln!("udp_seq: listening on {}", sock.local_addr()?);
    let mut seen = vec![0u32; count as usize];
    let (mut received, mut duplicates, mut out_of_order, mut foreign) = (0u64, 0u64, 0u64, 0u64);
    let mut highest: Option<u64> = None;
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let mut complete: Option<Instant> = None;
    let mut buf = [0u8; 2048];
    loop {
        let now = Instant::now();
        let deadline = match complete {
            Some(t) => t + LINGER,
            None => first.unwrap_or(start) + timeout,
        };
        if now >= deadline {
            break;
        }
        sock.set_read_timeout(Some(deadline - now))?;
        let n = match sock.recv_from(&mut buf) {
            Ok((n, _)) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        if n < 16 || &buf[..8] != MAGIC {
            foreign += 1;
            continue;
        }
        let seq = u64::from_be_bytes(buf[8..16].try_into().unwrap());
        if seq >= count {
            foreign += 1;
            continue;
        }
        first.get_or_insert(now);
        let s = &mut seen[seq as usize];
        *s += 1;
        if *s > 1 {
            duplicates += 1;
            continue;
        }
        received += 1;
        if highest.is_some_and(|h| seq < h) {
            out_of_order += 1;
        }
        highest = Some(highest.map_or(seq, |h| h.max(seq)));
        if received == count {
            complete = Some(now);
        }
    }
    let missing: Vec<u64> = (0..count).filter(|&i| seen[i as usize] == 0).collect();
    let first_missing: Vec<String> = missing.iter().take(20).map(|m| m.to_string()).collect();
    println!(
        "{{\"received\":{received},\"missing\":{},\"duplicates\":{duplicates},\
         \"out_of_order\":{out_of_order},\"foreign\":{foreign},\"first_missing\":[{}],\
         \"elapsed_ms\":{}}}",
        missing.len(),
        first_missing.join(","),
        start.elapsed().as_millis()
    );
    Ok(())
}

fn tcp_recv(port: u16) -> std::io::Result<()> {
    let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
    eprintln!("udp_seq: listening on {}", l.local_addr()?);
    let (mut c, _) = l.accept()?;
    let t0 = Instant::now();
    let n = std::io::copy(&mut c, &mut std::io::stdout().lock())?;
    eprintln!("udp_seq: {n} bytes in {} ms", t0.elapsed().as_millis());
    Ok(())
}

fn tcp_send(addr: SocketAddr) -> std::io::Result<()> {
    let t0 = Instant::now();
    let mut c = loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(c) => break c,
            Err(_) if t0.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    };
    let t1 = Instant::now();
    let n = std::io::copy(&mut std::io::stdin().lock(), &mut c)?;
    c.shutdown(std::net::Shutdown::Write)?;
    eprintln!("udp_seq: {n} bytes in {} ms", t1.elapsed().as_millis());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |s: &str| s.parse::<u64>().ok();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["send", addr, count, interval] => {
            match (addr.parse::<SocketAddr>(), num(count), num(interval)) {
                (Ok(a), Some(c), Some(i)) => send(a, c, Duration::from_millis(i)),
                _ => return usage(),
            }
        }
        ["recv", port, count, timeout] => match (port.parse::<u16>(), num(count), num(timeout)) {
            (Ok(p), Some(c), Some(t)) if c <= u64::from(u32::MAX) => {
                recv(p, c, Duration::from_secs(t))
            }
            _ => return usage(),
        },
        ["tcp-recv", port] => match port.parse::<u16>() {
            Ok(p) => tcp_recv(p),
            _ => return usage(),
        },
        ["tcp-send", addr] => match addr.parse::<SocketAddr>() {
            Ok(a) => tcp_send(a),
            _ => return usage(),
        },
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp_seq: {e}");
            ExitCode::FAILURE
        }
    }
}
