//! Network paths: one way out of the host for a guest's frames.
//!
//! `tap:NAME` is a TAP device (created, or attached if it exists), `packet:IFNAME` a raw AF_PACKET
//! socket bound to a NIC. Both are non-blocking and expose a file descriptor that is readable when
//! frames wait, so the caller's event loop decides when to read. Plain non-blocking I/O rather than
//! io_uring: a frame is one system call either way, and the event loop is already epoll.
//!
//! For drills a path can hurt itself on send (`?drop=PERCENT&reorder=PERCENT&delay=MS`): the host
//! kernel here has no netem. A delayed path hands its frames to a thread of its own, which sends
//! each one MS milliseconds after it was given, in order.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

/// Longest `delay` a path accepts: a drill, not a store.
pub const MAX_DELAY_MS: u64 = 60_000;

/// Largest frame a path moves (jumbo frames plus a PRP trailer and a VLAN tag).
pub const MAX_FRAME: usize = 9216 + 64;

/// Bytes of the virtio-net header (`struct virtio_net_hdr_v1`) a path with offloads puts before
/// every frame: the kernel's TAP reads and writes the guest's header as it is.
pub const VNET_HDR_LEN: usize = 12;

/// Largest segmentation-offload frame (a 64 KiB IP packet behind an Ethernet and a VLAN header),
/// what a path with offloads moves besides its header.
pub const MAX_GSO_FRAME: usize = 65535 + 14 + 4;

/// Why a path could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("invalid path '{spec}': {reason} (expected tap:NAME or packet:IFNAME, options ?drop=PCT&reorder=PCT&delay=MS)")]
    Spec { spec: String, reason: String },
    #[error("path {spec}: offloads (a virtio-net header per frame) need a TAP path")]
    NoOffload { spec: String },
    #[error("path {spec}: {source}")]
    Io {
        spec: String,
        #[source]
        source: io::Error,
    },
}

/// Faults a path injects on send, for drills.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Percentage of frames silently dropped.
    pub drop_pct: f64,
    /// Percentage of frames held back and sent after the next one.
    pub reorder_pct: f64,
    /// Milliseconds every frame waits before it is sent.
    pub delay_ms: u64,
}

/// What kind of path.
#[derive(Debug, Clone, PartialEq)]
pub enum PathKind {
    Tap(String),
    Packet(String),
}

/// A parsed path spec.
#[derive(Debug, Clone, PartialEq)]
pub struct PathSpec {
    pub kind: PathKind,
    pub faults: Faults,
}

impl fmt::Display for PathSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            PathKind::Tap(n) => write!(f, "tap:{n}")?,
            PathKind::Packet(n) => write!(f, "packet:{n}")?,
        }
        let mut sep = '?';
        if self.faults.drop_pct > 0.0 {
            write!(f, "{sep}drop={}", self.faults.drop_pct)?;
            sep = '&';
        }
        if self.faults.reorder_pct > 0.0 {
            write!(f, "{sep}reorder={}", self.faults.reorder_pct)?;
            sep = '&';
        }
        if self.faults.delay_ms > 0 {
            write!(f, "{sep}delay={}", self.faults.delay_ms)?;
        }
        Ok(())
    }
}

impl FromStr for PathSpec {
    type Err = PathError;
    fn from_str(spec: &str) -> Result<Self, PathError> {
        let err = |reason: &str| PathError::Spec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let (head, query) = spec.split_once('?').unwrap_or((spec, ""));
        let (scheme, name) = head.split_once(':').ok_or_else(|| err("no scheme"))?;
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            return Err(err(
                "interface names are 1 to 15 characters, no '/' or spaces",
            ));
        }
        let kind = match scheme {
            "tap" => PathKind::Tap(name.to_string()),
            "packet" => PathKind::Packet(name.to_string()),
            _ => return Err(err("unknown scheme")),
        };
        let mut faults = Faults::default();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| err("option without '='"))?;
            if k == "delay" {
                faults.delay_ms =
                    v.parse()
                        .ok()
                        .filter(|ms| *ms <= MAX_DELAY_MS)
                        .ok_or_else(|| {
                            err(&format!(
                                "delay takes milliseconds from 0 to {MAX_DELAY_MS}"
                            ))
                        })?;
                continue;
            }
            let pct: f64 = v
                .parse()
                .ok()
                .filter(|p: &f64| (0.0..=100.0).contains(p))
                .ok_or_else(|| err(&format!("{k} takes a percentage from 0 to 100")))?;
            match k {
                "drop" => faults.drop_pct = pct,
                "reorder" => faults.reorder_pct = pct,
                _ => return Err(err(&format!("unknown option '{k}'"))),
            }
        }
        Ok(PathSpec { kind, faults })
    }
}

/// One network path.
pub struct NetPath {
    spec: PathSpec,
    ifname: String,
    io: PathIo,
    rng: AtomicU64,
    held: Mutex<Option<Vec<u8>>>,
    /// With a `delay`: frames and when they are due, for the path's delay thread.
    delayed: Option<Sender<(Instant, Vec<u8>)>>,
    /// Every frame read or written carries a [`VNET_HDR_LEN`]-byte virtio-net header.
    vnet_hdr: bool,
}

enum PathIo {
    Tap(tun_rs::SyncDevice),
    Packet(OwnedFd),
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn ifindex(name: &str) -> io::Result<u32> {
    let c =
        std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {name}"),
        ));
    }
    Ok(idx)
}

fn open_packet(name: &str) -> io::Result<OwnedFd> {
    let idx = ifindex(name)?;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid starting value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = idx as i32;
    // SAFETY: sll is a valid sockaddr_ll and its size is passed.
    let rc = unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(errno());
    }
    // Frames we send ourselves must not come back as received ones.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a c_int option value and its size. PACKET_IGNORE_OUTGOING = 23.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            23,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    Ok(owned)
}

/// Starts the thread that sends a delayed path's frames when they are due, on a descriptor of
/// its own for the same device. It ends when the path is dropped (the channel closes).
fn spawn_delay(io: &PathIo, ifname: &str) -> io::Result<Sender<(Instant, Vec<u8>)>> {
    let fd = match io {
        PathIo::Tap(d) => d.as_raw_fd(),
        PathIo::Packet(fd) => fd.as_raw_fd(),
    };
    // SAFETY: dup(2) of a descriptor we own; a non-negative result is a new descriptor nobody
    // else owns.
    let dup = unsafe { libc::dup(fd) };
    if dup < 0 {
        return Err(errno());
    }
    // SAFETY: `dup` was just created and is ours alone.
    let out = unsafe { OwnedFd::from_raw_fd(dup) };
    let (tx, rx) = crossbeam_channel::unbounded::<(Instant, Vec<u8>)>();
    thread::Builder::new()
        .name(format!("delay-{ifname}"))
        .spawn(move || {
            for (due, frame) in rx {
                let wait = due.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    thread::sleep(wait);
                }
                // A TAP takes one frame per write(2), a bound packet socket likewise; the
                // descriptor is non-blocking, so a congested device loses the frame, as a
                // congested link would.
                // SAFETY: `frame` is a live readable buffer of `frame.len()` bytes; `out` is
                // our own descriptor.
                unsafe { libc::write(out.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            }
        })?;
    Ok(tx)
}

/// TUNSETVNETHDRSZ: the size of the header before every frame (read through a pointer).
fn set_vnet_hdr_len(fd: RawFd, len: usize) -> io::Result<()> {
    let value = len as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at a live local
    // for the duration of the call; `fd` is an open TAP descriptor.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &value as *const libc::c_int) };
    if rc < 0 {
        return Err(errno());
    }
    Ok(())
}

/// TUNSETOFFLOAD: which offloads the kernel may leave in frames it hands the TAP (the flags
/// are the argument itself, not a pointer).
fn set_tun_offloads(fd: RawFd, tun_flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its flags by value and touches no memory of ours; `fd` is an
    // open TAP descriptor.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(tun_flags)) };
    if rc < 0 {
        return Err(errno());
    }
    Ok(())
}

impl NetPath {
    /// Opens the path `spec`, frames only.
    pub fn open(spec: &PathSpec) -> Result<NetPath, PathError> {
        Self::open_with(spec, false)
    }

    /// Opens the path `spec`; with `vnet_hdr` (TAP paths only) every frame read or written
    /// carries a virtio-net header, so checksum and segmentation offloads pass through. The
    /// path starts with no receive offloads: [`NetPath::set_offloads`] turns on what the
    /// guest can take.
    pub fn open_with(spec: &PathSpec, vnet_hdr: bool) -> Result<NetPath, PathError> {
        let wrap = |source| PathError::Io {
            spec: spec.to_string(),
            source,
        };
        let (io, ifname) = match &spec.kind {
            PathKind::Tap(name) => {
                let dev = tun_rs::DeviceBuilder::new()
                    .name(name.clone())
                    .layer(tun_rs::Layer::L2)
                    .packet_information(false)
                    .offload(vnet_hdr)
                    .enable(true)
                    .build_sync()
                    .map_err(wrap)?;
                dev.set_nonblocking(true).map_err(wrap)?;
                if vnet_hdr {
                    // tun-rs leaves the kernel's 10-byte header; the guest's v1 header has
                    // `num_buffers` too, and with 12 the guest's TX header goes out unchanged.
                    // tun-rs also turns on every receive offload, which the guest may not take.
                    set_vnet_hdr_len(dev.as_raw_fd(), VNET_HDR_LEN).map_err(wrap)?;
                    set_tun_offloads(dev.as_raw_fd(), 0).map_err(wrap)?;
                }
                (PathIo::Tap(dev), name.clone())
            }
            PathKind::Packet(_) if vnet_hdr => {
                return Err(PathError::NoOffload {
                    spec: spec.to_string(),
                })
            }
            PathKind::Packet(name) => (
                PathIo::Packet(open_packet(name).map_err(wrap)?),
                name.clone(),
            ),
        };
        let delayed = match spec.faults.delay_ms {
            0 => None,
            _ => Some(spawn_delay(&io, &ifname).map_err(wrap)?),
        };
        Ok(NetPath {
            spec: spec.clone(),
            ifname,
            io,
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            held: Mutex::new(None),
            delayed,
            vnet_hdr,
        })
    }

    /// Whether frames on this path carry a virtio-net header.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Which offloads the kernel may use in frames it hands to this path (`TUN_F_*` flags:
    /// partial checksums, TSO, ...): exactly what the receiver of those frames accepts.
    pub fn set_offloads(&self, tun_flags: u32) -> io::Result<()> {
        match &self.io {
            PathIo::Tap(d) if self.vnet_hdr => set_tun_offloads(d.as_raw_fd(), tun_flags),
            _ if tun_flags == 0 => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "offloads need a TAP path opened with a virtio-net header",
            )),
        }
    }

    /// The spec the path was opened from.
    pub fn spec(&self) -> &PathSpec {
        &self.spec
    }

    /// The interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Readable when frames wait.
    pub fn fd(&self) -> RawFd {
        match &self.io {
            PathIo::Tap(d) => d.as_raw_fd(),
            PathIo::Packet(fd) => fd.as_raw_fd(),
        }
    }

    fn roll(&self, pct: f64) -> bool {
        if pct <= 0.0 {
            return false;
        }
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        (x % 10_000) as f64 / 100.0 < pct
    }

    fn raw_send(&self, frame: &[u8]) -> io::Result<()> {
        let n = match &self.io {
            PathIo::Tap(d) => d.send(frame)?,
            PathIo::Packet(fd) => {
                // SAFETY: frame is a valid readable slice; fd is our bound packet socket.
                let n =
                    unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                if n < 0 {
                    return Err(errno());
                }
                n as usize
            }
        };
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short frame write",
            ));
        }
        Ok(())
    }

    /// Sends a frame now, or hands it to the delay thread.
    fn emit(&self, frame: &[u8]) -> io::Result<()> {
        match &self.delayed {
            None => self.raw_send(frame),
            Some(tx) => {
                let due = Instant::now() + Duration::from_millis(self.spec.faults.delay_ms);
                tx.send((due, frame.to_vec()))
                    .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "delay thread gone"))
            }
        }
    }

    /// Sends one frame without blocking; `WouldBlock` means the path is congested.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let f = self.spec.faults;
        if self.roll(f.drop_pct) {
            return Ok(());
        }
        if f.reorder_pct > 0.0 {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if held.is_none() && self.roll(f.reorder_pct) {
                *held = Some(frame.to_vec());
                return Ok(());
            }
            let late = held.take();
            drop(held);
            self.emit(frame)?;
            if let Some(late) = late {
                self.emit(&late)?;
            }
            return Ok(());
        }
        self.emit(frame)
    }

    /// Receives one frame without blocking.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.io {
            PathIo::Tap(d) => d.recv(buf),
            PathIo::Packet(fd) => {
                // SAFETY: buf is a valid writable slice; fd is our bound packet socket.
                let n = unsafe {
                    libc::recv(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_TRUNC,
                    )
                };
                if n < 0 {
                    return Err(errno());
                }
                if n as usize > buf.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "frame larger than the buffer",
                    ));
                }
                Ok(n as usize)
            }
        }
    }

    /// Whether a frame waits to be read. A receiver that fell behind (its thread not scheduled,
    /// or no frontend connected yet) leaves frames queued; what it has not read it cannot judge.
    pub fn has_pending(&self) -> bool {
        crate::readable(self.fd(), 0)
    }

    /// Whether the interface has carrier (the cable, the peer, the switch port are there).
    pub fn link_up(&self) -> bool {
        link_up(&self.ifname)
    }

    /// The interface's MTU.
    pub fn mtu(&self) -> io::Result<u32> {
        let s = std::fs::read_to_string(format!("/sys/class/net/{}/mtu", self.ifname))?;
        s.trim()
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad mtu"))
    }
}

/// Carrier of interface `name`, from sysfs (an administratively down interface has none).
pub fn link_up(name: &str) -> bool {
    let oper =
        std::fs::read_to_string(format!("/sys/class/net/{name}/operstate")).unwrap_or_default();
    let carrier =
        std::fs::read_to_string(format!("/sys/class/net/{name}/carrier")).unwrap_or_default();
    carrier.trim() == "1" && oper.trim() != "down"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        let s: PathSpec = "tap:vm1a?drop=20&reorder=5".parse().unwrap();
        assert_eq!(s.kind, PathKind::Tap("vm1a".into()));
        assert_eq!(
            s.faults,
            Faults {
                drop_pct: 20.0,
                reorder_pct: 5.0,
                delay_ms: 0,
            }
        );
        let d: PathSpec = "packet:eth1?delay=40".parse().unwrap();
        assert_eq!(d.faults.delay_ms, 40);
        assert_eq!(d.to_string().parse::<PathSpec>().unwrap(), d);
        assert_eq!(s.to_string().parse::<PathSpec>().unwrap(), s);
        assert_eq!(
            "packet:eth1".parse::<PathSpec>().unwrap().kind,
            PathKind::Packet("eth1".into())
        );
        for bad in [
            "eth0",
            "tap:",
            "udp:x",
            "tap:a?drop=200",
            "tap:a?jitter=1",
            "tap:a?delay=-1",
            "tap:a?delay=600000",
            "tap:0123456789abcdef",
        ] {
            let e = bad.parse::<PathSpec>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        let mut f = vec![tag; len];
        f[..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, tag]);
        f[12..14].copy_from_slice(&[0x88, 0xb5]);
        f
    }

    fn recv_wait(p: &NetPath, buf: &mut [u8]) -> usize {
        let t0 = std::time::Instant::now();
        loop {
            match p.recv(buf) {
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(t0.elapsed() < std::time::Duration::from_secs(5), "no frame");
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    /// A TAP path and a packet path on the same interface see each other's frames: what the
    /// TAP side writes the kernel receives on the interface, and what the packet socket sends
    /// the kernel transmits to the TAP reader.
    #[test]
    fn tap_and_packet_paths_exchange_frames() {
        let name = format!("vhmt{}", std::process::id() % 100_000);
        let tap = NetPath::open(&format!("tap:{name}").parse().unwrap()).expect("TAP (needs root)");
        assert!(tap.mtu().unwrap() >= 1500);
        let pkt = NetPath::open(&format!("packet:{name}").parse().unwrap()).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        // Drain whatever the kernel sends on a fresh interface (IPv6 router solicitations...).
        std::thread::sleep(std::time::Duration::from_millis(50));
        while pkt.recv(&mut buf).is_ok() {}
        while tap.recv(&mut buf).is_ok() {}
        tap.send(&frame(1, 100)).unwrap();
        let n = loop {
            let n = recv_wait(&pkt, &mut buf);
            if buf[12..14] == [0x88, 0xb5] {
                break n;
            }
        };
        assert_eq!(&buf[..n], &frame(1, 100)[..]);
        pkt.send(&frame(2, 300)).unwrap();
        let n = loop {
            let n = recv_wait(&tap, &mut buf);
            if buf[12..14] == [0x88, 0xb5] {
                break n;
            }
        };
        assert_eq!(&buf[..n], &frame(2, 300)[..]);
        assert!(tap.link_up(), "an open TAP has carrier");
        let e = NetPath::open(&"packet:nosuchif0".parse().unwrap())
            .err()
            .unwrap();
        assert!(e.to_string().contains("nosuchif0"), "{e}");
    }

    /// A TAP path with `faults`, and a packet path on the same interface that sees what it
    /// sends, drained of what the kernel sends on a fresh interface.
    fn faulty_tap_and_watcher(prefix: &str, faults: &str) -> (NetPath, NetPath) {
        let name = format!("{prefix}{}", std::process::id() % 100_000);
        let tap = NetPath::open(&format!("tap:{name}?{faults}").parse().unwrap()).unwrap();
        let pkt = NetPath::open(&format!("packet:{name}").parse().unwrap()).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        std::thread::sleep(std::time::Duration::from_millis(50));
        while pkt.recv(&mut buf).is_ok() {}
        (tap, pkt)
    }

    /// A TCP/IPv4 frame of `payload` bytes (checksums left out: only the shape matters here).
    fn tcp4_frame(payload: usize) -> Vec<u8> {
        let mut f = frame(9, 14 + 20 + 20 + payload);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..34];
        ip.fill(0);
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let tcp = &mut f[34..54];
        tcp.fill(0);
        tcp[12] = 5 << 4;
        tcp[13] = 0x18;
        f
    }

    /// A TAP path with offloads reads and writes a 12-byte virtio-net header before each
    /// frame, takes a guest's TSO frame whole, and receive offloads can be switched; a packet
    /// path refuses both.
    #[test]
    fn offload_tap_carries_virtio_net_headers() {
        let name = format!("vhmo{}", std::process::id() % 100_000);
        let spec: PathSpec = format!("tap:{name}").parse().unwrap();
        let tap = NetPath::open_with(&spec, true).expect("TAP (needs root)");
        assert!(tap.vnet_hdr());
        let pkt = NetPath::open(&format!("packet:{name}").parse().unwrap()).unwrap();
        let mut buf = vec![0u8; VNET_HDR_LEN + MAX_GSO_FRAME];
        std::thread::sleep(std::time::Duration::from_millis(50));
        while pkt.recv(&mut buf).is_ok() {}
        while tap.recv(&mut buf).is_ok() {}

        // A plain frame behind a zero header goes out as the frame alone.
        let mut p = vec![0u8; VNET_HDR_LEN];
        p.extend(frame(4, 200));
        tap.send(&p).unwrap();
        let n = loop {
            let n = recv_wait(&pkt, &mut buf);
            if buf[12..14] == [0x88, 0xb5] {
                break n;
            }
        };
        assert_eq!(&buf[..n], &frame(4, 200)[..]);

        // A TSO frame (3 segments of 1000 bytes, checksum left to the kernel) is accepted as
        // one write and enters the interface whole.
        let mut gso = vec![0u8; VNET_HDR_LEN];
        gso[0] = 1; // NEEDS_CSUM
        gso[1] = 1; // TCPV4
        gso[2..4].copy_from_slice(&54u16.to_le_bytes());
        gso[4..6].copy_from_slice(&1000u16.to_le_bytes());
        gso[6..8].copy_from_slice(&34u16.to_le_bytes());
        gso[8..10].copy_from_slice(&16u16.to_le_bytes());
        gso.extend(tcp4_frame(3000));
        tap.send(&gso).unwrap();
        let n = loop {
            let n = recv_wait(&pkt, &mut buf);
            if buf[12..14] == [0x08, 0x00] {
                break n;
            }
        };
        assert_eq!(n, 3054, "the TSO frame arrived whole");
        // The TAP refuses a header that lies about the frame.
        let mut bad = gso.clone();
        bad[6..8].copy_from_slice(&60_000u16.to_le_bytes());
        assert!(tap.send(&bad).is_err(), "checksum start beyond the frame");

        // What the interface sends reaches the TAP reader behind a header.
        pkt.send(&frame(5, 300)).unwrap();
        let n = loop {
            let n = recv_wait(&tap, &mut buf);
            if buf[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == [0x88, 0xb5] {
                break n;
            }
        };
        assert_eq!(&buf[VNET_HDR_LEN..n], &frame(5, 300)[..]);
        assert_eq!(
            &buf[..2],
            &[0, 0],
            "no offload flags without offloads turned on"
        );

        tap.set_offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .unwrap();
        tap.set_offloads(0).unwrap();
        assert!(pkt.set_offloads(libc::TUN_F_CSUM).is_err());
        pkt.set_offloads(0).unwrap();
        let e = NetPath::open_with(&format!("packet:{name}").parse().unwrap(), true)
            .err()
            .unwrap();
        assert!(e.to_string().contains("need a TAP"), "{e}");
    }

    #[test]
    fn drop_faults_drop_about_that_share() {
        let (tap, pkt) = faulty_tap_and_watcher("vhmf", "drop=50");
        let mut buf = vec![0u8; MAX_FRAME];
        for _ in 0..400 {
            tap.send(&frame(3, 64)).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut got = 0;
        while let Ok(n) = pkt.recv(&mut buf) {
            if n == 64 && buf[12..14] == [0x88, 0xb5] {
                got += 1;
            }
        }
        assert!(
            (120..=280).contains(&got),
            "{got} of 400 arrived with 50% drop"
        );
    }

    /// A delayed path sends every frame about that much later, in order.
    #[test]
    fn delay_faults_hold_frames_back_in_order() {
        let (tap, pkt) = faulty_tap_and_watcher("vhmd", "delay=150");
        let mut buf = vec![0u8; MAX_FRAME];
        let t0 = std::time::Instant::now();
        for tag in 10..15 {
            tap.send(&frame(tag, 80)).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert!(
            !std::iter::from_fn(|| pkt.recv(&mut buf).ok()).any(|n| n == 80),
            "a frame came through before its delay"
        );
        let mut tags = Vec::new();
        while tags.len() < 5 {
            let n = recv_wait(&pkt, &mut buf);
            if n == 80 && buf[12..14] == [0x88, 0xb5] {
                tags.push(buf[20]);
            }
        }
        let took = t0.elapsed();
        assert_eq!(
            tags,
            vec![10, 11, 12, 13, 14],
            "delayed frames keep their order"
        );
        assert!(
            took >= std::time::Duration::from_millis(150),
            "arrived after {took:?}"
        );
    }
}
