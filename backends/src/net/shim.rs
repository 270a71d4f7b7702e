//! A relay between the VMM's vhost-user connection and the `vhost` crate's request handler,
//! which holds back the SET_VRING_ENABLE messages a VMM sends before SET_FEATURES.
//!
//! QEMU's vhost-user-net sends SET_VRING_ENABLE as soon as the backend *offers*
//! VHOST_USER_F_PROTOCOL_FEATURES (it checks the offered features, not the acked ones): at start-up
//! and again when the guest negotiates its features, both long before SET_FEATURES, which comes
//! with DRIVER_OK. The `vhost` crate (0.18) answers a SET_VRING_ENABLE while the feature is not
//! acked with an error that ends the connection. Not offering the feature is no way out either:
//! QEMU 7.2 then cannot start vhost-user-net at all (`vhost_net_start` fails with EINVAL and the
//! error path crashes QEMU with MSI-X). So the feature is offered and this relay drops the early
//! messages and replays the last state it held for each ring right after SET_FEATURES has acked
//! the feature (QEMU 7.2 does not send it again when it starts the device, so without the replay
//! the rings would stay disabled). The rings are not started before SET_FEATURES anyway.
//!
//! Messages are relayed whole (header, body and the descriptors passed with them); replies and
//! everything after SET_FEATURES pass unchanged. Only the control messages take this detour: the
//! rings and their eventfds are shared with the VMM directly.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use log::{debug, warn};

const HEADER: usize = 12;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Largest message body accepted (the biggest vhost-user messages are a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;
/// Most descriptors one message carries (SET_MEM_TABLE: 8; the spec allows no more than 8).
const MAX_FDS: usize = 32;

/// What the relay decides for one message from the VMM.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Forward,
    /// Drop it; if `reply` the VMM waits for an acknowledgement, which the relay sends.
    Hold {
        reply: bool,
    },
}

/// Tracks SET_FEATURES and judges messages from the VMM.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    protocol_features_acked: bool,
    /// Bodies (ring index, state) of the held messages, the last per ring, in ring order.
    pending: std::collections::BTreeMap<u32, [u8; 8]>,
    pub(crate) held: u64,
}

impl Gate {
    pub(crate) fn judge(&mut self, request: u32, flags: u32, body: &[u8]) -> Verdict {
        match request {
            SET_FEATURES if body.len() >= 8 => {
                let mut v = [0u8; 8];
                v.copy_from_slice(&body[..8]);
                self.protocol_features_acked = u64::from_le_bytes(v) & PROTOCOL_FEATURES != 0;
                Verdict::Forward
            }
            SET_VRING_ENABLE if !self.protocol_features_acked => {
                self.held += 1;
                if let Ok(b) = <[u8; 8]>::try_from(body) {
                    self.pending
                        .insert(u32::from_le_bytes([b[0], b[1], b[2], b[3]]), b);
                }
                Verdict::Hold {
                    reply: flags & FLAG_NEED_REPLY != 0,
                }
            }
            _ => Verdict::Forward,
        }
    }

    /// The held SET_VRING_ENABLE messages to replay now (after a SET_FEATURES that acked
    /// the feature), without NEED_REPLY: nobody waits for their answer.
    pub(crate) fn replay(&mut self) -> Vec<Vec<u8>> {
        if !self.protocol_features_acked {
            return Vec::new();
        }
        std::mem::take(&mut self.pending)
            .into_values()
            .map(|body| {
                let mut m = Vec::with_capacity(HEADER + 8);
                m.extend_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                m.extend_from_slice(&FLAG_VERSION.to_le_bytes());
                m.extend_from_slice(&8u32.to_le_bytes());
                m.extend_from_slice(&body);
                m
            })
            .collect()
    }
}

fn header(bytes: &[u8]) -> (u32, u32, u32) {
    let w = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    (w(0), w(4), w(8))
}

/// Receives up to `buf.len()` bytes and the descriptors sent with them.
fn recv_fds(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut cbuf = [0u64; (MAX_FDS * 4 + 64) / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid starting value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    let n = loop {
        // SAFETY: msg points at iov (over buf) and cbuf, all valid and writable for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: msg was filled by recvmsg; the CMSG_* macros walk the control buffer it describes.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many descriptors in one message",
        ));
    }
    Ok(n)
}

/// Fills `buf`, collecting descriptors; `Ok(false)` on a clean end of stream before any byte.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let n = recv_fds(sock, &mut buf[got..], fds)?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

/// Sends all of `data`, the descriptors with the first bytes.
fn send_fds(sock: &UnixStream, data: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let mut sent = 0;
    let mut with_fds = !fds.is_empty();
    while sent < data.len() {
        let mut cbuf = [0u64; (MAX_FDS * 4 + 64) / 8];
        let mut iov = libc::iovec {
            iov_base: data[sent..].as_ptr() as *mut libc::c_void,
            iov_len: data.len() - sent,
        };
        // SAFETY: msghdr is plain old data; all-zero is a valid starting value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if with_fds {
            let bytes = std::mem::size_of_val(fds);
            msg.msg_control = cbuf.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE is a pure size computation.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
            // SAFETY: the control buffer holds CMSG_SPACE(bytes) (fds.len() <= MAX_FDS); the
            // header and data are written inside it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    data.add(i).write_unaligned(fd.as_raw_fd());
                }
            }
        }
        // SAFETY: msg points at iov (over data) and cbuf, valid for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        with_fds = false;
        sent += n as usize;
    }
    Ok(())
}

/// VMM to handler: whole messages, judged by the gate.
fn forward_requests(
    vmm: &UnixStream,
    vmm_tx: &Mutex<()>,
    handler: &UnixStream,
    gate: &mut Gate,
) -> io::Result<()> {
    let mut msg = vec![0u8; HEADER];
    loop {
        let mut fds = Vec::new();
        msg.resize(HEADER, 0);
        if !recv_exact(vmm, &mut msg[..HEADER], &mut fds)? {
            return Ok(());
        }
        let (request, flags, size) = header(&msg);
        let size = size as usize;
        if size > MAX_BODY || fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "request {request}: {size}-byte body, {} descriptors",
                    fds.len()
                ),
            ));
        }
        msg.resize(HEADER + size, 0);
        if size > 0 && !recv_exact(vmm, &mut msg[HEADER..], &mut fds)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match gate.judge(request, flags, &msg[HEADER..]) {
            Verdict::Forward => {
                send_fds(handler, &msg, &fds)?;
                if request == SET_FEATURES {
                    for m in gate.replay() {
                        debug!("replayed SET_VRING_ENABLE {:?}", &m[HEADER..]);
                        send_fds(handler, &m, &[])?;
                    }
                }
            }
            Verdict::Hold { reply } => {
                debug!(
                    "held back SET_VRING_ENABLE {:?} sent before SET_FEATURES",
                    &msg[HEADER..]
                );
                if reply {
                    let mut ack = Vec::with_capacity(HEADER + 8);
                    ack.extend_from_slice(&request.to_le_bytes());
                    ack.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
                    ack.extend_from_slice(&8u32.to_le_bytes());
                    ack.extend_from_slice(&0u64.to_le_bytes());
                    let _g = vmm_tx.lock().unwrap_or_else(|p| p.into_inner());
                    send_fds(vmm, &ack, &[])?;
                }
            }
        }
    }
}

/// Handler to VMM: bytes and descriptors as they come.
fn forward_replies(handler: &UnixStream, vmm: &UnixStream, vmm_tx: &Mutex<()>) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_BODY + HEADER];
    loop {
        let mut fds = Vec::new();
        let n = recv_fds(handler, &mut buf, &mut fds)?;
        if n == 0 {
            return Ok(());
        }
        let _g = vmm_tx.lock().unwrap_or_else(|p| p.into_inner());
        send_fds(vmm, &buf[..n], &fds)?;
    }
}

/// Relays between `vmm` (the VMM's connection) and `handler` (the vhost crate's end) on two
/// threads until either side closes; closing one side closes the other.
pub(crate) fn relay(vmm: UnixStream, handler: UnixStream) -> io::Result<()> {
    let vmm = Arc::new(vmm);
    let handler = Arc::new(handler);
    let vmm_tx = Arc::new(Mutex::new(()));
    let (v, h, t) = (vmm.clone(), handler.clone(), vmm_tx.clone());
    std::thread::Builder::new()
        .name("vhost-user-relay-req".into())
        .spawn(move || {
            let mut gate = Gate::default();
            if let Err(e) = forward_requests(&v, &t, &h, &mut gate) {
                warn!("vhost-user relay (requests): {e}");
            }
            if gate.held > 0 {
                debug!("held back {} early SET_VRING_ENABLE messages", gate.held);
            }
            let _ = h.shutdown(std::net::Shutdown::Both);
            let _ = v.shutdown(std::net::Shutdown::Both);
        })?;
    std::thread::Builder::new()
        .name("vhost-user-relay-rep".into())
        .spawn(move || {
            if let Err(e) = forward_replies(&handler, &vmm, &vmm_tx) {
                warn!("vhost-user relay (replies): {e}");
            }
            let _ = vmm.shutdown(std::net::Shutdown::Both);
            let _ = handler.shutdown(std::net::Shutdown::Both);
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn early_ring_enables_are_held_until_protocol_features_are_acked() {
        let mut g = Gate::default();
        let enable = 1u64.to_le_bytes();
        assert_eq!(
            g.judge(SET_VRING_ENABLE, FLAG_VERSION, &enable),
            Verdict::Hold { reply: false }
        );
        assert_eq!(
            g.judge(SET_VRING_ENABLE, FLAG_VERSION | FLAG_NEED_REPLY, &enable),
            Verdict::Hold { reply: true }
        );
        // SET_FEATURES without the bit: still held (the backend would refuse them).
        assert_eq!(
            g.judge(SET_FEATURES, FLAG_VERSION, &(1u64 << 32).to_le_bytes()),
            Verdict::Forward
        );
        assert!(matches!(
            g.judge(SET_VRING_ENABLE, FLAG_VERSION, &enable),
            Verdict::Hold { .. }
        ));
        let f = (1u64 << 32 | PROTOCOL_FEATURES).to_le_bytes();
        assert_eq!(g.judge(SET_FEATURES, FLAG_VERSION, &f), Verdict::Forward);
        assert_eq!(
            g.judge(SET_VRING_ENABLE, FLAG_VERSION, &enable),
            Verdict::Forward
        );
        assert_eq!(g.judge(1, FLAG_VERSION, &[]), Verdict::Forward);
        assert_eq!(g.held, 3);
    }

    #[test]
    fn the_last_held_state_of_each_ring_is_replayed_once_after_set_features() {
        let mut g = Gate::default();
        let body = |ring: u32, on: u32| {
            let mut b = ring.to_le_bytes().to_vec();
            b.extend_from_slice(&on.to_le_bytes());
            b
        };
        for (ring, on) in [(0, 1), (1, 1), (0, 0), (0, 1), (1, 0)] {
            g.judge(SET_VRING_ENABLE, FLAG_VERSION, &body(ring, on));
        }
        assert!(g.replay().is_empty(), "nothing before the feature is acked");
        let f = PROTOCOL_FEATURES.to_le_bytes();
        assert_eq!(g.judge(SET_FEATURES, FLAG_VERSION, &f), Verdict::Forward);
        let r = g.replay();
        assert_eq!(
            r,
            vec![
                msg(SET_VRING_ENABLE, FLAG_VERSION, &body(0, 1)),
                msg(SET_VRING_ENABLE, FLAG_VERSION, &body(1, 0))
            ]
        );
        assert!(g.replay().is_empty(), "replayed once");
    }

    /// Through a real relay: an early SET_VRING_ENABLE with NEED_REPLY is answered by the relay
    /// and never reaches the handler; other messages arrive whole, with their descriptors.
    #[test]
    fn relays_messages_and_descriptors() {
        let (vmm, vmm_far) = UnixStream::pair().unwrap();
        let (handler_far, handler) = UnixStream::pair().unwrap();
        relay(vmm_far, handler_far).unwrap();
        let early = msg(SET_VRING_ENABLE, FLAG_VERSION | FLAG_NEED_REPLY, &[0; 8]);
        send_fds(&vmm, &early, &[]).unwrap();
        let mut ack = [0u8; HEADER + 8];
        let mut fds = Vec::new();
        assert!(recv_exact(&vmm, &mut ack, &mut fds).unwrap());
        assert_eq!(
            header(&ack),
            (SET_VRING_ENABLE, FLAG_VERSION | FLAG_REPLY, 8)
        );
        assert_eq!(&ack[HEADER..], &[0; 8]);
        // A message with a descriptor (as SET_VRING_KICK) arrives whole with it.
        let file = std::fs::File::open("/dev/null").unwrap();
        let kick = msg(12, FLAG_VERSION, &0u64.to_le_bytes());
        send_fds(&vmm, &kick, &[OwnedFd::from(file)]).unwrap();
        let mut got = vec![0u8; kick.len()];
        let mut fds = Vec::new();
        assert!(recv_exact(&handler, &mut got, &mut fds).unwrap());
        assert_eq!(got, kick);
        assert_eq!(fds.len(), 1);
        // A reply goes back unchanged.
        let reply = msg(1, FLAG_VERSION | FLAG_REPLY, &7u64.to_le_bytes());
        send_fds(&handler, &reply, &[]).unwrap();
        let mut got = vec![0u8; reply.len()];
        assert!(recv_exact(&vmm, &mut got, &mut Vec::new()).unwrap());
        assert_eq!(got, reply);
        // The VMM hanging up closes the handler's side.
        drop(vmm);
        let mut b = [0u8; 1];
        assert!(!recv_exact(&handler, &mut b, &mut Vec::new()).unwrap());
    }
}
