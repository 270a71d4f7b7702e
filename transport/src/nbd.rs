//! NBD client leg over TCP or a unix socket.
//!
//! The connection is negotiated with the fixed-newstyle handshake (`NBD_OPT_GO`, falling back to
//! `NBD_OPT_EXPORT_NAME`) and then carries pipelined requests with simple replies only.
//!
//! Commands reach the socket in one of two ways, and two threads serve the connection:
//!
//! * **inline**: when nobody else is writing to the socket, the thread that submitted the
//!   request writes it itself with a non-blocking, vectored `sendmsg` whose iovecs point straight
//!   at the caller's write buffers. Inside a [`crate::batch`] (a device's pass over its queue)
//!   the commands of the whole pass wait for its end and leave in one call. This saves the
//!   hand-off to the sender thread, a wake-up of a sleeping thread per request, which is most of
//!   the difference at queue depth 1. What does not fit into the socket is handed to the sender
//!   (the "carry"), so `submit` never waits for the socket;
//! * the **sender** takes the commands submitted while the socket was busy, and the carry, from
//!   a channel and writes them the same way, waiting for socket space when it must;
//! * the **reader** takes whatever replies have arrived in one `recv` into a small buffer,
//!   reads read payloads straight into the caller's buffers (copying only what of a payload
//!   arrived with the headers) and completes each burst of replies as one [`crate::batch`], so
//!   their answers reach the guest together. It is also the only thread that fails the
//!   outstanding requests once the leg is dead. A virtqueue's worker that submits to the leg
//!   inside a [`Reaper`] takes the reading over while the leg is alive (see [`reaper`]): the
//!   worker then reads the replies itself when its epoll says the socket is readable, and the
//!   reader thread sleeps until the worker gives the connection back or the leg dies.
//!
//! All bookkeeping lives in one mutex ([`State`]): the in-flight map from NBD handle to request,
//! the commands not yet handed to a writer, the dead flag and the writers' progress. The
//! invariants that make completion exactly-once and buffer access safe are:
//!
//! 1. A request is inserted into the in-flight map, and its command appended to `pending`, under
//!    the lock and only while the leg is alive. So once the dead flag is set no entry can appear
//!    any more. Commands leave `pending` in handle order, all at once and under the lock, either
//!    to the channel or to one inline writer, and an inline writer starts only when the channel,
//!    the sender and the carry are empty; so commands reach the socket in handle order.
//! 2. An entry is completed only by whoever removed it from the map: the reader on a reply, or
//!    the reader's final drain after the leg died. Nobody else removes entries. "The reader" is
//!    whoever holds the reading side ([`Shared::reading`]): the reader thread or, while a
//!    reaper has adopted the leg, the reaper's thread; the drain is always the reader thread's.
//! 3. The reader removes a read's entry before filling its buffers and completes it only after
//!    the payload arrived (or the connection failed), so a completed read's buffers are never
//!    written again.
//! 4. Writers touch write buffers only while they have announced it under the lock (`sending`
//!    for the sender thread, `inline` for a submitter) and never start once the leg is dead. A
//!    write is completed only after a writer has published that it is completely sent, or after
//!    the leg died and no writer is left in the socket; so a completed write's buffers are never
//!    read again. Only one writer is in the socket at a time.
//!
//! ## Giving up on a connection
//!
//! When the leg dies (an abort from the layer above, say because the server stopped answering)
//! only our sending half is shut down, and only on a request boundary: a command the sender was
//! in the middle of is completed first, its payload's rest as zeros from our own memory (the
//! caller's buffers are released at once; the zeros cannot matter, since the layer above treats
//! the whole write as failed on this leg, and the mirror resyncs such a chunk before trusting the
//! leg again). The server sees end-of-file, finishes what it already received, replies and
//! closes; the reader fails every outstanding request at once and then
//! reads and discards those late replies until the server closes ("lingering"). Cutting both
//! halves instead would have two bad effects: a server that was only paused (SIGSTOP, a long
//! stall) gets EPIPE on its replies when it resumes, which crashes some servers (nbdkit 1.32
//! asserts in `raw_send_socket`); and nobody could tell when the server is done with the old
//! requests, whose writes would then race with the resync of the returning leg.
//! [`BlockLeg::wait_quiet`] reports that moment: the server closed the connection, so it
//! executes nothing it received on it any more.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use vmm_sys_util::eventfd::EventFd;

use crate::block::{BlockLeg, Buffers, CompletionSink, LegError, LegInfo, LegOp, LegRequest, Tag};
use crate::spec::NbdAddress;
use crate::{OpenError, OpenOptions};

pub mod reaper;

pub use reaper::Reaper;

/// Wire constants from the NBD protocol specification (doc/proto.md).
mod proto {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

    pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const FLAG_NO_ZEROES: u16 = 1 << 1;
    pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_GO: u32 = 7;

    pub const REP_ACK: u32 = 1;
    pub const REP_INFO: u32 = 3;
    pub const REP_FLAG_ERROR: u32 = 1 << 31;
    pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;

    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
    pub const FLAG_READ_ONLY: u16 = 1 << 1;
    pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
    pub const FLAG_SEND_FUA: u16 = 1 << 3;
    pub const FLAG_SEND_TRIM: u16 = 1 << 5;
    pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_WRITE_ZEROES: u16 = 6;

    pub const CMD_FLAG_FUA: u16 = 1 << 0;
    pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

    pub const REQUEST_LEN: usize = 28;
    pub const REPLY_LEN: usize = 16;
}

/// Longest option reply accepted during the handshake; real replies are a few dozen bytes.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Option replies accepted for one `NBD_OPT_GO` before the server is deemed to be stalling.
const MAX_OPTION_REPLIES: usize = 1024;
/// The NBD spec's limit on export names.
const MAX_EXPORT_NAME: usize = 4096;
/// Largest payload per NBD command when the server states no maximum: the spec tells clients
/// not to exceed 32 MiB then, and bigger commands would only delay other replies.
const MAX_PAYLOAD: u32 = 32 << 20;
/// Most NBD commands one request may be split into. Bounds the memory a single request can
/// pin when a server advertises a tiny maximum block size (512 GiB at the default 32 MiB).
const MAX_PIECES: u64 = 16384;
/// The kernel refuses more iovecs than this in one call.
const IOV_MAX: usize = 1024;
/// Messages the sender coalesces into one batch; bounds the scratch vectors.
const MAX_BATCH: usize = 256;
/// How often a sender waiting for socket space rechecks whether the leg died, in case the
/// shutdown wake-up is missed.
const SEND_POLL_MS: libc::c_int = 500;
/// How long an orderly close waits for `NBD_CMD_DISC` to leave before cutting the connection.
const DISC_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a dead connection keeps reading (and discarding) the server's late replies after
/// its leg was dropped. While the leg exists it lingers until the server closes.
const DROP_LINGER: Duration = Duration::from_secs(60);

/// See the module documentation.
pub struct NbdLeg {
    info: LegInfo,
    /// Largest length of one READ/WRITE/WRITE_ZEROES command; longer requests are split.
    payload_max: u64,
    /// Largest length of one TRIM command.
    trim_max: u64,
    shared: Arc<Shared>,
    sender: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
}

/// State shared by the leg and its two threads.
struct Shared {
    uri: String,
    fd: OwnedFd,
    /// An eventfd that wakes the reader out of `poll` when the leg dies or is dropped.
    wake: EventFd,
    /// The same for the sender.
    wake_send: EventFd,
    sink: Arc<dyn CompletionSink>,
    /// Requests for the sender. Only sent to while `state` is locked (see the module docs).
    tx: Sender<Msg>,
    /// Mirrors `state.dead.is_none()` for lock-free `is_alive` and the sender's quick checks.
    alive: AtomicBool,
    state: Mutex<State>,
    /// Signalled when `sent_upto`, `sending`, `inline`, `dead`, `sender_exited` or `quiet`
    /// change.
    cv: Condvar,
    /// The receiving side of the connection. Whoever holds this lock reads the socket: the
    /// reader thread, or the worker of the [`Reaper`] that adopted the leg. Never held while
    /// waiting for the socket.
    reading: Mutex<Reading>,
    /// A reaper reads the replies (`State::reaper`); the reader thread sleeps meanwhile.
    adopted: AtomicBool,
}

struct State {
    /// Why the leg died (`Lost` or `Aborted`); every later request fails with this.
    dead: Option<LegError>,
    /// Threads waiting on the condition variable.
    waiters: u32,
    /// The leg is being dropped: the disconnect that follows is expected, not a loss.
    closing: bool,
    next_handle: u64,
    inflight: HashMap<u64, Entry>,
    /// Requests made of several NBD commands, keyed by their first command's handle.
    groups: HashMap<u64, Group>,
    /// Every command with a smaller handle has been completely written to the socket.
    sent_upto: u64,
    /// The sender is inside a batch and may be reading write buffers.
    sending: bool,
    /// A submitting thread is writing commands to the socket itself (see the module docs).
    inline: bool,
    /// Commands registered in the map and not yet given to a writer, in handle order.
    pending: Vec<Msg>,
    /// Messages put into the channel that the sender has not finished with.
    queued: usize,
    /// What an inline writer could not send at once; the sender sends it before anything else.
    carry: Option<Carry>,
    sender_exited: bool,
    /// The reader is gone: the server closed the connection (or it broke, or the linger after a
    /// drop ran out), and every request was completed.
    quiet: bool,
    /// Set by a drop: until when the reader lingers on a dead connection.
    linger_until: Option<Instant>,
    /// The reaper that reads the replies, while one does.
    reaper: Option<Weak<reaper::Core>>,
}

/// Where the reading of the reply stream stands; see [`Shared::reading`].
struct Reading {
    replies: ReplyBuffer,
    /// The iovecs of the payload being received.
    scratch: Vec<libc::iovec>,
    /// A read reply whose payload has not all arrived yet.
    partial: Option<PartialRead>,
    /// Why the connection is over, found by a reaper that then gave it back to the reader
    /// thread, which fails what is outstanding.
    ended: Option<(String, End)>,
}

// SAFETY: the raw pointers in `scratch` point into the reply buffer (owned by `replies`, a
// heap allocation that does not move with `Reading`) and into the read buffers of the request
// `partial` holds, whose submitter keeps them valid until that request completes, whichever
// thread completes it (`Buffers` is `Send` for the same reason). While `partial` is `None`,
// `scratch` may still hold pointers of a finished request: they are never dereferenced, since
// `start_payload` rebuilds `scratch` before anything is received into it. `Reading` is only
// used under its mutex, by one thread at a time.
unsafe impl Send for Reading {}

/// A read whose payload is partly received. Its entry is out of the map (module invariant 3):
/// nobody else completes it or touches its buffers.
struct PartialRead {
    entry: Entry,
    /// The payload's rest is `scratch[start..payload_iovs]`; `scratch[payload_iovs]` is the
    /// reply buffer, so replies that follow the payload arrive in the same call.
    start: usize,
    payload_iovs: usize,
    left: usize,
}

/// One NBD command in flight.
struct Entry {
    tag: Tag,
    cmd: u16,
    /// The group this command is part of, or 0.
    group: u64,
    /// Destination of a read's payload; empty for other commands.
    bufs: Buffers,
}

/// A request that was split into several NBD commands, or a FUA write that needs a flush after
/// it: completed once all of its commands are.
struct Group {
    tag: Tag,
    remaining: u32,
    first_error: Option<LegError>,
    /// Emulated FUA: once every piece is written, send a flush and complete on its reply.
    flush_after: bool,
}

enum Msg {
    Req {
        handle: u64,
        header: [u8; proto::REQUEST_LEN],
        /// The write payload; empty for other commands.
        payload: Buffers,
    },
    /// There is a carry to send.
    Carry,
    /// Finish what was queued before, then exit.
    Stop,
}

/// Commands an inline writer left to the sender: `skip` bytes of them are on the wire.
struct Carry {
    msgs: Vec<Msg>,
    skip: usize,
}

/// What a validated request turns into on the wire.
struct Prepared {
    cmd: u16,
    flags: u16,
    offset: u64,
    len: u64,
    bufs: Buffers,
    flush_after: bool,
}

impl NbdLeg {
    /// Connects to `address`, negotiates `export` and starts the connection's threads.
    pub fn connect(
        uri: String,
        address: &NbdAddress,
        export: &str,
        opts: &OpenOptions,
        sink: Arc<dyn CompletionSink>,
    ) -> Result<NbdLeg, OpenError> {
        // Zero would mean "no timeout" to some of the calls below and "invalid" to others.
        let timeout = opts.connect_timeout.max(Duration::from_millis(1));
        let io_err = |source| OpenError::Io {
            uri: uri.clone(),
            source,
        };
        let fd = match address {
            NbdAddress::Tcp { host, port } => connect_tcp(host, *port, timeout),
            NbdAddress::Unix(path) => connect_unix(path),
        }
        .map_err(io_err)?;
        // A server that accepts but never answers must not hang the caller; once negotiated, a
        // slow reply is the business of the layer above, so the timeouts go away again.
        set_io_timeouts(fd.as_raw_fd(), Some(timeout)).map_err(io_err)?;
        let neg = handshake(&mut FdIo(fd.as_raw_fd()), export)
            .map_err(|e| e.into_open_error(&uri, timeout))?;
        set_io_timeouts(fd.as_raw_fd(), None).map_err(io_err)?;

        // HAS_FLAGS must always be set; without it the other bits mean nothing.
        let flags = if neg.flags & proto::FLAG_HAS_FLAGS != 0 {
            neg.flags
        } else {
            0
        };
        let block_size = neg
            .block_sizes
            .map_or(512, |b| preferred_block_size(b.preferred));
        let payload_max = payload_limit(neg.block_sizes.map(|b| b.maximum), block_size);
        let info = LegInfo {
            capacity: neg.size,
            block_size,
            flush: flags & proto::FLAG_SEND_FLUSH != 0,
            fua: flags & proto::FLAG_SEND_FUA != 0,
            discard: flags & proto::FLAG_SEND_TRIM != 0,
            write_zeroes: flags & proto::FLAG_SEND_WRITE_ZEROES != 0,
            read_only: opts.read_only || flags & proto::FLAG_READ_ONLY != 0,
        };
        log::info!(
            "NBD leg {uri}: connected, {} bytes, block size {block_size}, flags {flags:#06x}",
            neg.size
        );
        Self::start(uri, fd, info, payload_max, sink)
    }

    fn start(
        uri: String,
        fd: OwnedFd,
        info: LegInfo,
        payload_max: u32,
        sink: Arc<dyn CompletionSink>,
    ) -> Result<NbdLeg, OpenError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (wake, wake_send) = match (nonblocking_eventfd(), nonblocking_eventfd()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(source), _) | (_, Err(source)) => return Err(OpenError::Io { uri, source }),
        };
        let shared = Arc::new(Shared {
            uri: uri.clone(),
            fd,
            wake,
            wake_send,
            sink,
            tx,
            alive: AtomicBool::new(true),
            state: Mutex::new(State {
                dead: None,
                waiters: 0,
                closing: false,
                next_handle: 1,
                inflight: HashMap::with_capacity(256),
                groups: HashMap::new(),
                sent_upto: 1,
                sending: false,
                inline: false,
                pending: Vec::with_capacity(MAX_BATCH),
                queued: 0,
                carry: None,
                sender_exited: false,
                quiet: false,
                linger_until: None,
                reaper: None,
            }),
            cv: Condvar::new(),
            reading: Mutex::new(Reading {
                replies: ReplyBuffer::new(),
                scratch: Vec::new(),
                partial: None,
                ended: None,
            }),
            adopted: AtomicBool::new(false),
        });
        let block = u64::from(info.block_size);
        let mut leg = NbdLeg {
            info,
            payload_max: u64::from(payload_max),
            // Like qemu: TRIM carries no payload, so only the 32-bit length field limits it.
            trim_max: (i32::MAX as u64) / block * block,
            shared: Arc::clone(&shared),
            sender: None,
            reader: None,
        };
        let spawn_err = |source| OpenError::Io {
            uri: uri.clone(),
            source,
        };
        let s = Arc::clone(&shared);
        leg.sender = Some(
            thread::Builder::new()
                .name("nbd-send".into())
                .spawn(move || sender_main(s, rx))
                .map_err(spawn_err)?,
        );
        let s = Arc::clone(&shared);
        // On failure `leg` is dropped here, which stops and joins the sender.
        leg.reader = Some(
            thread::Builder::new()
                .name("nbd-recv".into())
                .spawn(move || reader_main(s))
                .map_err(spawn_err)?,
        );
        Ok(leg)
    }

    /// Checks `op` against the export and turns it into a command. `Ok(None)`: nothing to send,
    /// the request succeeds at once.
    fn prepare(&self, op: LegOp) -> Result<Option<Prepared>, LegError> {
        let info = &self.info;
        let (cmd, flags, offset, len, bufs, flush_after) = match op {
            LegOp::Read { offset, bufs } => {
                let len = bufs.total_len() as u64;
                (proto::CMD_READ, 0, offset, len, bufs, false)
            }
            LegOp::Write { offset, bufs, fua } => {
                if info.read_only {
                    return Err(LegError::Io(libc::EROFS));
                }
                let len = bufs.total_len() as u64;
                let native = fua && info.fua;
                let flags = if native { proto::CMD_FLAG_FUA } else { 0 };
                // A server without flush makes no durability promise we could strengthen.
                let flush_after = fua && !info.fua && info.flush;
                (proto::CMD_WRITE, flags, offset, len, bufs, flush_after)
            }
            LegOp::Flush => {
                if !info.flush {
                    return Ok(None);
                }
                return Ok(Some(Prepared {
                    cmd: proto::CMD_FLUSH,
                    flags: 0,
                    offset: 0,
                    len: 0,
                    bufs: Buffers::new(),
                    flush_after: false,
                }));
            }
            LegOp::Discard { offset, len } => {
                if info.read_only {
                    return Err(LegError::Io(libc::EROFS));
                }
                if !info.discard {
                    return Err(LegError::Unsupported);
                }
                (proto::CMD_TRIM, 0, offset, len, Buffers::new(), false)
            }
            LegOp::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => {
                if info.read_only {
                    return Err(LegError::Io(libc::EROFS));
                }
                if !info.write_zeroes {
                    return Err(LegError::Unsupported);
                }
                let flags = if may_unmap {
                    0
                } else {
                    proto::CMD_FLAG_NO_HOLE
                };
                (
                    proto::CMD_WRITE_ZEROES,
                    flags,
                    offset,
                    len,
                    Buffers::new(),
                    false,
                )
            }
        };
        // The spec forbids requests past the end of the export; refuse them here so the server's
        // choice of errno (or its tolerance) does not matter.
        if !matches!(offset.checked_add(len), Some(end) if end <= info.capacity) {
            return Err(LegError::Io(libc::EINVAL));
        }
        if len == 0 {
            // Zero-length commands have unspecified meaning in NBD; there is nothing to do.
            return Ok(None);
        }
        Ok(Some(Prepared {
            cmd,
            flags,
            offset,
            len,
            bufs,
            flush_after,
        }))
    }

    /// Registers `p` in the in-flight map and queues it for the sender, split into commands of
    /// at most the server's maximum size.
    fn enqueue(&self, tag: Tag, p: Prepared) {
        let piece_max = if p.cmd == proto::CMD_TRIM {
            self.trim_max
        } else {
            self.payload_max
        };
        let pieces = p.len.div_ceil(piece_max).max(1);
        if pieces > MAX_PIECES {
            self.shared
                .sink
                .complete(tag, Err(LegError::Io(libc::EINVAL)));
            return;
        }
        let pieces = pieces as u32;
        let sh = &*self.shared;
        let mut st = sh.lock();
        if let Some(err) = st.dead.clone() {
            drop(st);
            sh.sink.complete(tag, Err(err));
            return;
        }
        let group = if pieces > 1 || p.flush_after {
            let g = st.next_handle;
            st.groups.insert(
                g,
                Group {
                    tag,
                    remaining: pieces,
                    first_error: None,
                    flush_after: p.flush_after,
                },
            );
            g
        } else {
            0
        };
        if pieces == 1 {
            let len = p.len as u32; // <= piece_max, which fits in u32
            sh.queue_locked(&mut st, tag, p.cmd, p.flags, p.offset, len, group, p.bufs);
            drop(st);
            schedule_flush(&self.shared);
            return;
        }
        let mut cursor = BufCursor::default();
        let mut done = 0u64;
        while done < p.len && st.dead.is_none() {
            let len = piece_max.min(p.len - done);
            let bufs = if p.bufs.total_len() > 0 {
                cursor.take(&p.bufs, len as usize)
            } else {
                Buffers::new()
            };
            sh.queue_locked(
                &mut st,
                tag,
                p.cmd,
                p.flags,
                p.offset + done,
                len as u32,
                group,
                bufs,
            );
            done += len;
        }
        drop(st);
        schedule_flush(&self.shared);
        // If the leg died halfway, the pieces queued so far are in the map and the group too, so
        // the reader's drain completes the request exactly once.
    }
}

impl BlockLeg for NbdLeg {
    fn uri(&self) -> &str {
        &self.shared.uri
    }

    fn info(&self) -> &LegInfo {
        &self.info
    }

    fn submit(&self, req: LegRequest) {
        let sh = &*self.shared;
        if !sh.alive.load(Ordering::Acquire) {
            // Bound first: the guard must be gone before the sink runs (it may call submit).
            let dead = sh.lock().dead.clone();
            if let Some(err) = dead {
                sh.sink.complete(req.tag, Err(err));
                return;
            }
        }
        match self.prepare(req.op) {
            Err(e) => sh.sink.complete(req.tag, Err(e)),
            Ok(None) => {
                // Even a no-op must report the leg's death, so a lost leg fails uniformly.
                let dead = sh.lock().dead.clone();
                sh.sink.complete(req.tag, dead.map_or(Ok(()), Err));
            }
            Ok(Some(p)) => {
                if !sh.adopted.load(Ordering::Relaxed) {
                    reaper::adopt_here(&self.shared);
                }
                self.enqueue(req.tag, p)
            }
        }
    }

    fn abort(&self, reason: &str) {
        self.shared.die(LegError::Aborted(reason.to_string()));
    }

    fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    fn wait_quiet(&self, timeout: Duration) -> bool {
        let sh = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut st = sh.lock();
        while !st.quiet {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = sh.wait_timeout(st, left);
        }
        true
    }
}

impl Drop for NbdLeg {
    fn drop(&mut self) {
        let sh = &*self.shared;
        let disc_queued = {
            let mut st = sh.lock();
            st.closing = true;
            // NBD_CMD_DISC must not overtake outstanding requests; with some still in flight we
            // just cut the connection and fail them.
            if st.dead.is_none() && st.inflight.is_empty() && st.groups.is_empty() {
                let handle = st.next_handle;
                st.next_handle += 1;
                let header = request_header(0, proto::CMD_DISC, handle, 0, 0);
                let disc = Msg::Req {
                    handle,
                    header,
                    payload: Buffers::new(),
                };
                sh.send_locked(&mut st, disc) && sh.send_locked(&mut st, Msg::Stop)
            } else {
                false
            }
        };
        if disc_queued {
            sh.wait_sender_exit(DISC_TIMEOUT);
        }
        sh.die(LegError::Aborted("leg closed".into()));
        sh.lock().linger_until = Some(Instant::now() + DROP_LINGER);
        sh.kick();
        // The sink may own the last reference and drop us from the reader thread; a thread
        // cannot join itself, and that one exits on its own once it returns to its loop.
        let me = thread::current().id();
        if let Some(handle) = self.sender.take() {
            // It may still be completing a command cut short, against a paused server; it then
            // ends on its own (DROP_LINGER at the latest).
            sh.wait_sender_exit(DISC_TIMEOUT);
            if handle.thread().id() != me && sh.lock().sender_exited {
                let _ = handle.join();
            }
        }
        if let Some(handle) = self.reader.take() {
            if handle.thread().id() == me {
                return;
            }
            // A healthy server closes promptly after our end-of-file; one that is paused keeps
            // the reader lingering, which then ends on its own (DROP_LINGER at the latest).
            if self.wait_quiet(DISC_TIMEOUT) {
                let _ = handle.join();
            } else {
                log::debug!(
                    "NBD leg {}: server still holds the old connection; leaving it to close",
                    sh.uri
                );
            }
        }
    }
}

impl Shared {
    /// Locks the state. A panic elsewhere must not wedge the leg, so poisoning is ignored: every
    /// critical section leaves the state consistent between statements that can panic.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        st.waiters += 1;
        let mut st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        st.waiters -= 1;
        st
    }

    fn wait_timeout<'a>(
        &self,
        mut st: MutexGuard<'a, State>,
        t: Duration,
    ) -> MutexGuard<'a, State> {
        st.waiters += 1;
        let mut st = match self.cv.wait_timeout(st, t) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        };
        st.waiters -= 1;
        st
    }

    /// Wakes whoever waits on the condition variable. Called with the state locked, so a waiter
    /// is either counted or has not checked its condition yet. std's condition variable makes a
    /// system call on every notification, which the writers would otherwise pay per `sendmsg`
    /// (they were three quarters of the daemon's futex calls at queue depth 32).
    fn notify(&self, st: &State) {
        if st.waiters > 0 {
            self.cv.notify_all();
        }
    }

    /// Marks the leg dead with `err` unless it already is, and returns the error every
    /// outstanding request fails with.
    fn die(&self, err: LegError) -> LegError {
        let mut st = self.lock();
        self.die_locked(&mut st, err)
    }

    fn die_locked(&self, st: &mut State, err: LegError) -> LegError {
        if let Some(dead) = &st.dead {
            return dead.clone();
        }
        let err = if st.closing {
            log::debug!("NBD leg {}: closed", self.uri);
            LegError::Aborted("leg closed".into())
        } else {
            match &err {
                LegError::Lost(why) => log::warn!("NBD leg {}: connection lost: {why}", self.uri),
                other => log::info!("NBD leg {}: {other}", self.uri),
            }
            err
        };
        st.dead = Some(err.clone());
        self.alive.store(false, Ordering::Release);
        // Only our sending half, and only on a request boundary: the sender does it when it
        // leaves (see "Giving up on a connection" above), or we do if it already left.
        if st.sender_exited {
            self.shut_write();
        }
        self.kick();
        // Nothing waiting for a writer will be sent any more; the entries stay for the drain.
        st.pending.clear();
        // The sender may be idle in the channel; this gets it out. If it already left, fine.
        st.queued += 1;
        let _ = self.tx.send(Msg::Stop);
        self.notify(st);
        err
    }

    /// Wakes the reader and the sender if they wait in `poll`.
    fn kick(&self) {
        wake_up(&self.wake);
        wake_up(&self.wake_send);
    }

    /// Wakes the reader thread alone: to stop reading (a reaper adopted the leg) or to start
    /// again (the reaper gave it back).
    fn wake_reader(&self) {
        wake_up(&self.wake);
    }

    /// Locks the reading side; poisoning is ignored as for [`Shared::lock`].
    fn reading(&self) -> MutexGuard<'_, Reading> {
        self.reading.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reading side, unless someone else holds it now.
    fn try_reading(&self) -> Option<MutexGuard<'_, Reading>> {
        match self.reading.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Takes the reading back from the reaper that adopted the leg, if any: the reaper stops
    /// watching the socket and forgets the leg, and the reader thread is woken to read.
    /// Whoever holds [`Shared::reading`] meanwhile finishes what it is doing first.
    fn release(&self) {
        let core = self.lock().reaper.take();
        self.let_go(core.and_then(|w| w.upgrade()));
    }

    /// The rest of giving the leg back, once `State::reaper` no longer names `core`.
    fn let_go(&self, core: Option<Arc<reaper::Core>>) {
        if let Some(core) = core {
            core.forget(self.fd.as_raw_fd());
        }
        self.adopted.store(false, Ordering::Release);
        self.wake_reader();
    }

    /// Our end-of-file to the server.
    fn shut_write(&self) {
        // SAFETY: shutdown on a descriptor we own (it lives as long as `self`) has no memory
        // effects; its failure (e.g. ENOTCONN after the peer left) needs no handling.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
    }

    /// Waits until the socket is readable or the eventfd fires, at most `timeout` (forever with
    /// `None`). Clears the eventfd.
    fn wait_readable(&self, timeout: Option<Duration>) -> io::Result<()> {
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
        poll_woken(self.fd.as_raw_fd(), libc::POLLIN, &self.wake, ms).map(|_| ())
    }

    /// Puts `msg` into the sender's channel. False (and the leg dead) if the sender is gone.
    fn send_locked(&self, st: &mut State, msg: Msg) -> bool {
        st.queued += 1;
        if self.tx.send(msg).is_err() {
            // Whatever it was, the entries stay in the map; the reader's drain completes them.
            self.die_locked(st, LegError::Lost("sender thread has exited".into()));
            return false;
        }
        true
    }

    /// Inserts one command into the in-flight map and appends it to `pending`, with the state
    /// locked so handles reach the socket in order. The caller then calls [`schedule_flush`] or
    /// [`Shared::flush_pending`].
    #[allow(clippy::too_many_arguments)]
    fn queue_locked(
        &self,
        st: &mut State,
        tag: Tag,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        group: u64,
        bufs: Buffers,
    ) {
        let handle = st.next_handle;
        st.next_handle += 1;
        let (read_bufs, payload) = if cmd == proto::CMD_READ {
            (bufs, Buffers::new())
        } else {
            (Buffers::new(), bufs)
        };
        st.inflight.insert(
            handle,
            Entry {
                tag,
                cmd,
                group,
                bufs: read_bufs,
            },
        );
        let header = request_header(flags, cmd, handle, offset, len);
        st.pending.push(Msg::Req {
            handle,
            header,
            payload,
        });
    }

    /// Gives the pending commands to a writer: this thread, when nobody else is writing to the
    /// socket and no command handed to the sender is unsent (module invariant 1), else the
    /// sender. Never waits for the socket.
    fn flush_pending(&self) {
        let mut st = self.lock();
        if st.pending.is_empty() || st.dead.is_some() {
            return;
        }
        let mut msgs = std::mem::take(&mut st.pending);
        if st.sending || st.inline || st.queued > 0 || st.carry.is_some() {
            for m in msgs.drain(..) {
                if !self.send_locked(&mut st, m) {
                    return;
                }
            }
            recycle(&mut st, msgs);
            return;
        }
        st.inline = true;
        drop(st);
        let res = INLINE_SCRATCH.with(|scratch| {
            let Scratch { iov, ends } = &mut *scratch.borrow_mut();
            let res = send_batch(self, &msgs, 0, iov, ends, Wait::Never);
            // The iovecs point into `msgs` and the callers' buffers; forget them before anyone
            // may complete those requests.
            iov.clear();
            res
        });
        let mut st = self.lock();
        st.inline = false;
        match res {
            Ok(()) => {
                msgs.clear();
                recycle(&mut st, msgs);
            }
            Err(SendStop::Handoff(skip)) => {
                st.carry = Some(Carry { msgs, skip });
                self.send_locked(&mut st, Msg::Carry);
            }
            Err(SendStop::Failed(e)) => {
                self.die_locked(&mut st, LegError::Lost(describe_send_error(&e)));
            }
            // Only a sender that may wait for the socket stops this way.
            Err(SendStop::Dead(_)) => {}
        }
        self.notify(&st);
    }

    /// Takes the entry for a reply's handle out of the map; from now on only the reader owns it.
    /// The flag tells whether the command has completely left the sender.
    fn take_entry(&self, handle: u64) -> Option<(Entry, bool)> {
        let mut st = self.lock();
        let sent = st.sent_upto > handle;
        st.inflight.remove(&handle).map(|e| (e, sent))
    }

    /// Waits until the write with `handle` has left the sender completely. False if the leg died
    /// first; the sender is then out of its batch and will not touch the buffers again.
    fn wait_sent(&self, handle: u64) -> bool {
        // About to wait inside the reader's batch: what it finished so far goes out first,
        // including commands it queued (a server answering a command before it was sent
        // would otherwise wait for our own batch's end).
        crate::batch::run_pending();
        let mut st = self.lock();
        loop {
            if st.sent_upto > handle {
                return true;
            }
            if st.dead.is_some() && !st.sending && !st.inline {
                return false;
            }
            st = self.wait(st);
        }
    }

    /// Reports the outcome of one command the reader owns.
    fn finish(&self, entry: Entry, result: Result<(), LegError>) {
        if entry.group == 0 {
            self.sink.complete(entry.tag, result);
            return;
        }
        let mut st = self.lock();
        let Some(g) = st.groups.get_mut(&entry.group) else {
            // Unreachable: a group leaves the map only with its last piece or in the final drain.
            // The drain runs on the reader thread after the leg died and that thread took the
            // reading side (from any reaper, which cannot adopt a dead leg again), so after
            // every entry a reader owned was finished.
            return;
        };
        g.remaining = g.remaining.saturating_sub(1);
        if let Err(e) = result {
            g.first_error.get_or_insert(e);
        }
        if g.remaining > 0 {
            return;
        }
        let Some(g) = st.groups.remove(&entry.group) else {
            return;
        };
        let outcome = match g.first_error {
            Some(e) => Err(e),
            None if g.flush_after => match st.dead.clone() {
                Some(e) => Err(e),
                None => {
                    // The flush goes out only now that the server acknowledged the write: it
                    // only covers writes completed before it was received.
                    self.queue_locked(&mut st, g.tag, proto::CMD_FLUSH, 0, 0, 0, 0, Buffers::new());
                    drop(st);
                    self.flush_pending();
                    return;
                }
            },
            None => Ok(()),
        };
        drop(st);
        self.sink.complete(g.tag, outcome);
    }

    /// Fails everything still outstanding once the leg is dead. Called by the reader only, after
    /// it finished any entry it owned.
    fn drain(&self) {
        let mut st = self.lock();
        let err = match st.dead.clone() {
            Some(e) => e,
            None => self.die_locked(&mut st, LegError::Lost("reader stopped".into())),
        };
        // A writer may still be inside sendmsg on some write's buffers; those requests may only
        // be failed once it let go.
        while st.sending || st.inline {
            st = self.wait(st);
        }
        let inflight = std::mem::take(&mut st.inflight);
        let groups = std::mem::take(&mut st.groups);
        drop(st);
        for (_, e) in inflight {
            if e.group == 0 {
                self.sink.complete(e.tag, Err(err.clone()));
            }
        }
        for (_, g) in groups {
            self.sink.complete(g.tag, Err(err.clone()));
        }
    }

    /// The sender is about to read write buffers, once no inline writer is in the socket. The
    /// carry, if any, goes first. None: the leg is dead and nothing is cut short, drop the batch.
    /// With a carry on a dead leg the batch stops before its first `sendmsg` and the command
    /// the carry cut short is completed with zeros.
    fn begin_send(&self) -> Option<Option<Carry>> {
        let mut st = self.lock();
        while st.inline {
            st = self.wait(st);
        }
        let carry = st.carry.take();
        if st.dead.is_some() && carry.is_none() {
            return None;
        }
        st.sending = true;
        Some(carry)
    }

    /// The sender is out of the socket; it took `taken` messages from the channel.
    fn end_send(&self, taken: usize) {
        let mut st = self.lock();
        st.sending = false;
        st.queued = st.queued.saturating_sub(taken);
        self.notify(&st);
    }

    fn publish_sent(&self, upto: u64) {
        let mut st = self.lock();
        if upto > st.sent_upto {
            st.sent_upto = upto;
            self.notify(&st);
        }
    }

    fn wait_sender_exit(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while !st.sender_exited {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            st = self.wait_timeout(st, left);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sender thread

/// Marks the sender gone even if it unwinds, so nobody waits for it forever.
struct SenderExit<'a>(&'a Shared);

impl Drop for SenderExit<'_> {
    fn drop(&mut self) {
        let sh = self.0;
        let mut st = sh.lock();
        if thread::panicking() {
            // Queued requests would never leave; the reader's drain fails them.
            sh.die_locked(&mut st, LegError::Lost("sender thread panicked".into()));
        }
        st.sending = false;
        // An inline writer may still be in the socket, and may leave a carry behind.
        while st.inline {
            st = sh.wait(st);
        }
        if let Some(carry) = st.carry.take() {
            drop(st);
            if let Some(partial) = partial_at(&carry.msgs, carry.skip) {
                complete_cut_short(sh, partial);
            }
            st = sh.lock();
        }
        st.sender_exited = true;
        // Every command left whole (or the connection is broken): the server may see the end.
        sh.shut_write();
        sh.notify(&st);
    }
}

/// Marks the leg dead if the reader unwinds (a panicking sink), so later requests fail at once
/// instead of waiting for replies nobody reads.
struct ReaderExit<'a>(&'a Shared);

impl Drop for ReaderExit<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.die(LegError::Lost("reader thread panicked".into()));
        }
        let mut st = self.0.lock();
        st.quiet = true;
        self.0.notify(&st);
    }
}

thread_local! {
    /// Legs with commands pending until this thread's batch ends.
    static TO_FLUSH: RefCell<Vec<Arc<Shared>>> = const { RefCell::new(Vec::new()) };
    /// Scratch vectors of this thread's inline writes.
    static INLINE_SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            iov: Vec::new(),
            ends: Vec::new(),
        })
    };
}

/// A writer's iovecs, and where each command of its batch ends (handle, byte count).
struct Scratch {
    iov: Vec<libc::iovec>,
    ends: Vec<(u64, usize)>,
}

/// Gives an emptied command list back as `pending`, so its allocation serves the next batch
/// instead of one being made per flush.
fn recycle(st: &mut State, msgs: Vec<Msg>) {
    if st.pending.is_empty() {
        st.pending = msgs;
    }
}

/// Completes a command the leg's death cut short in the middle, so the server sees whole
/// requests before our end-of-file (see "Giving up on a connection").
fn complete_cut_short(shared: &Shared, partial: Partial) {
    if let Err(why) = finish_partial(shared, partial) {
        log::warn!(
            "NBD leg {}: could not complete the request cut short by the leg's end ({why}); the server sees a truncated request",
            shared.uri
        );
    }
}

/// Flushes the leg's pending commands at the end of this thread's batch (so a device's pass over
/// its queue sends each leg's share in one `sendmsg`), or now outside a batch.
fn schedule_flush(shared: &Arc<Shared>) {
    if !crate::batch::active() {
        shared.flush_pending();
        return;
    }
    TO_FLUSH.with(|l| {
        let mut l = l.borrow_mut();
        if !l.iter().any(|s| Arc::ptr_eq(s, shared)) {
            l.push(Arc::clone(shared));
        }
    });
    crate::batch::at_end(flush_batch);
}

fn flush_batch() {
    let legs = TO_FLUSH.with(|l| std::mem::take(&mut *l.borrow_mut()));
    for sh in legs {
        sh.flush_pending();
    }
}

fn sender_main(shared: Arc<Shared>, rx: Receiver<Msg>) {
    let _exit = SenderExit(&shared);
    let mut batch: Vec<Msg> = Vec::with_capacity(MAX_BATCH);
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(MAX_BATCH * 2);
    let mut ends: Vec<(u64, usize)> = Vec::with_capacity(MAX_BATCH);
    loop {
        let mut stop = false;
        let mut taken = 0usize;
        match rx.recv() {
            Ok(Msg::Stop) | Err(_) => stop = true,
            Ok(m) => batch.push(m),
        }
        taken += 1;
        while !stop && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Stop) => stop = true,
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
            taken += 1;
        }
        if !batch.is_empty() {
            let Some(carry) = shared.begin_send() else {
                return;
            };
            let mut skip = 0;
            if let Some(c) = carry {
                // The carry's commands precede everything in the channel (module invariant 1).
                let mut msgs = c.msgs;
                msgs.append(&mut batch);
                batch = msgs;
                skip = c.skip;
            }
            let res = send_batch(&shared, &batch, skip, &mut iov, &mut ends, Wait::Poll);
            // The iovecs point into the batch and the caller's buffers; forget them before
            // anyone may complete those requests.
            iov.clear();
            shared.end_send(taken);
            batch.clear();
            match res {
                Ok(()) => {}
                Err(SendStop::Failed(e)) => {
                    shared.die(LegError::Lost(describe_send_error(&e)));
                    return;
                }
                Err(SendStop::Dead(Some(partial))) => {
                    complete_cut_short(&shared, partial);
                    return;
                }
                Err(SendStop::Dead(None)) => return,
                // A waiting sender does not hand off.
                Err(SendStop::Handoff(_)) => return,
            }
        }
        if stop {
            return;
        }
    }
}

/// Whether a writer may wait for socket space.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The sender thread: wait, and finish or cut short the batch.
    Poll,
    /// An inline writer: hand what is left to the sender instead.
    Never,
}

/// Bytes of a command on the wire: its header and its payload.
fn wire_len(m: &Msg) -> usize {
    match m {
        Msg::Req { payload, .. } => proto::REQUEST_LEN + payload.total_len(),
        _ => 0,
    }
}

/// The command of `msgs` that the first `sent` of their bytes end in the middle of, if any.
fn partial_at(msgs: &[Msg], sent: usize) -> Option<Partial> {
    let mut begin = 0usize;
    for m in msgs {
        let len = wire_len(m);
        if let Msg::Req { header, .. } = m {
            if sent > begin && sent < begin + len {
                return Some(Partial {
                    header: *header,
                    done: sent - begin,
                    len,
                });
            }
        }
        begin += len;
    }
    None
}

/// Writes every message of `batch` but the first `skip` bytes (sent before), publishing
/// progress as commands leave completely so the reader can complete writes before the whole
/// batch is out.
fn send_batch(
    shared: &Shared,
    batch: &[Msg],
    skip: usize,
    iov: &mut Vec<libc::iovec>,
    ends: &mut Vec<(u64, usize)>,
    wait: Wait,
) -> Result<(), SendStop> {
    let fd = shared.fd.as_raw_fd();
    iov.clear();
    ends.clear();
    let mut total = 0usize;
    for m in batch {
        let Msg::Req {
            handle,
            header,
            payload,
        } = m
        else {
            continue;
        };
        iov.push(libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        });
        total += header.len();
        for seg in payload.as_raw().iter().filter(|s| s.iov_len > 0) {
            iov.push(*seg);
            total += seg.iov_len;
        }
        ends.push((*handle, total));
    }
    let mut start = 0usize;
    let mut sent = skip.min(total);
    advance(iov, &mut start, sent);
    let mut next = ends.iter().take_while(|e| e.1 <= sent).count();
    while start < iov.len() {
        if !shared.alive.load(Ordering::Acquire) {
            return Err(match wait {
                Wait::Poll => SendStop::Dead(partial_at(batch, sent)),
                Wait::Never => SendStop::Handoff(sent),
            });
        }
        let cnt = (iov.len() - start).min(IOV_MAX);
        // SAFETY: all-zero is a valid msghdr (null name and control, no flags).
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = iov[start..].as_mut_ptr();
        mh.msg_iovlen = cnt as _;
        // Non-blocking, so a full socket returns what fitted and the progress can be published
        // while waiting for space; MSG_NOSIGNAL, so a vanished peer is an error, not SIGPIPE.
        // SAFETY: the iovecs describe our own headers (alive in `batch`) and write payloads the
        // submitter keeps valid for reads until completion, which cannot happen while this
        // writer is announced (module invariant 4); `mh` points at `cnt` of them.
        let n = unsafe { libc::sendmsg(fd, &mh, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock if wait == Wait::Never => {
                    return Err(SendStop::Handoff(sent));
                }
                io::ErrorKind::WouldBlock => {
                    if let Err(e) = wait_writable(shared, fd) {
                        if !shared.alive.load(Ordering::Acquire) {
                            return Err(SendStop::Dead(partial_at(batch, sent)));
                        }
                        return Err(SendStop::Failed(e));
                    }
                    continue;
                }
                _ => return Err(SendStop::Failed(e)),
            }
        }
        let n = n as usize;
        sent += n;
        advance(iov, &mut start, n);
        let before = next;
        while next < ends.len() && ends[next].1 <= sent {
            next += 1;
        }
        if next > before {
            shared.publish_sent(ends[next - 1].0 + 1);
        }
    }
    Ok(())
}

fn wait_writable(shared: &Shared, fd: RawFd) -> io::Result<()> {
    loop {
        if !shared.alive.load(Ordering::Acquire) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "leg shut down"));
        }
        // Writable, hung up or failed (or woken): the next sendmsg tells which.
        if poll_woken(fd, libc::POLLOUT, &shared.wake_send, SEND_POLL_MS)? {
            return Ok(());
        }
    }
}

/// Waits until `fd` has one of `events` or `wake` fires (whose counter is then reset), at most
/// `timeout_ms` (-1: no limit). True if either happened; an interrupted wait counts as a wake-up.
fn poll_woken(
    fd: RawFd,
    events: libc::c_short,
    wake: &EventFd,
    timeout_ms: libc::c_int,
) -> io::Result<bool> {
    let mut pfd = [
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `pfd` is an array of two valid pollfds for the duration of the call.
    let r = unsafe { libc::poll(pfd.as_mut_ptr(), 2, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(true)
        } else {
            Err(e)
        };
    }
    if pfd[1].revents != 0 {
        // Empty (EAGAIN) is as good as cleared.
        let _ = wake.read();
    }
    Ok(r > 0)
}

/// Why a writer stopped in the middle of a batch.
enum SendStop {
    /// The socket failed: the connection is broken.
    Failed(io::Error),
    /// The leg died; the command that was partly on the wire, if any.
    Dead(Option<Partial>),
    /// An inline writer found the socket full, or the leg dead: the sender takes over after the
    /// first this many bytes.
    Handoff(usize),
}

/// A command cut short by the leg's death.
struct Partial {
    header: [u8; proto::REQUEST_LEN],
    /// Bytes of it (header and payload) already sent.
    done: usize,
    len: usize,
}

/// Sends the rest of a command cut short by the leg's death: the rest of its header, then
/// zeros for the rest of its payload, so the server sees whole requests and then end-of-file
/// instead of a torn one. Gives up (Err) when the socket fails or the drop's linger runs out.
fn finish_partial(shared: &Shared, p: Partial) -> Result<(), String> {
    let fd = shared.fd.as_raw_fd();
    let zeros = [0u8; 64 << 10];
    let mut done = p.done;
    while done < p.len {
        let chunk: &[u8] = if done < proto::REQUEST_LEN {
            &p.header[done..]
        } else {
            &zeros[..(p.len - done).min(zeros.len())]
        };
        // SAFETY: `chunk` is a live buffer of `chunk.len()` bytes, ours alone.
        let n = unsafe {
            libc::send(
                fd,
                chunk.as_ptr().cast(),
                chunk.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            done += n as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                let timeout = match shared.lock().linger_until {
                    None => -1,
                    Some(t) => {
                        let left = t.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err("the leg was closed and the server did not read".into());
                        }
                        left.as_millis().min(i32::MAX as u128) as libc::c_int
                    }
                };
                poll_woken(fd, libc::POLLOUT, &shared.wake_send, timeout)
                    .map_err(|e| format!("poll failed: {e}"))?;
            }
            _ => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// A non-blocking eventfd, closed on exec.
fn nonblocking_eventfd() -> io::Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

/// Adds one to a non-blocking eventfd's counter. A full counter (EAGAIN) means a wake-up is
/// pending anyway.
fn wake_up(fd: &EventFd) {
    let _ = fd.write(1);
}

/// Drops `n` written or read bytes from the front of `iov[*start..]`.
fn advance(iov: &mut [libc::iovec], start: &mut usize, mut n: usize) {
    while *start < iov.len() {
        let cur = &mut iov[*start];
        if n < cur.iov_len {
            cur.iov_base = cur.iov_base.cast::<u8>().wrapping_add(n).cast();
            cur.iov_len -= n;
            return;
        }
        n -= cur.iov_len;
        *start += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Reader thread

fn reader_main(shared: Arc<Shared>) {
    let _exit = ReaderExit(&shared);
    let (why, end) = loop {
        if shared.adopted.load(Ordering::Acquire) {
            if shared.alive.load(Ordering::Acquire) {
                // A reaper reads the replies; sleep until it gives them back or the leg dies.
                if let Err(e) = poll_woken(-1, 0, &shared.wake, -1) {
                    break (format!("poll failed: {e}"), End::Closed);
                }
                continue;
            }
            // The leg died: failing what is outstanding and lingering are this thread's.
            shared.release();
        }
        let mut rd = shared.reading();
        if let Some(end) = rd.ended.take() {
            break end;
        }
        // A reaper that adopts the leg meanwhile waits for this lock; let it have the socket.
        if let Err(end) = pump(&shared, &mut rd, || !shared.adopted.load(Ordering::Acquire)) {
            break end;
        }
        drop(rd);
        if let Err(e) = shared.wait_readable(None) {
            break (describe_recv_error(&e, ""), End::Closed);
        }
    };
    let err = shared.die(LegError::Lost(why));
    // A read whose payload was cut off by a failed wait is still owned here.
    let partial = shared.reading().partial.take();
    if let Some(p) = partial {
        shared.finish(p.entry, Err(err));
    }
    shared.drain();
    match end {
        End::Closed => {}
        End::Violation => {
            // Nothing this server sends can be trusted; no point in waiting for it.
            // SAFETY: shutdown on our own descriptor has no memory effects.
            unsafe { libc::shutdown(shared.fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
        End::GaveUp => match linger(&shared) {
            Ok(()) => log::debug!(
                "NBD leg {}: the server closed the old connection",
                shared.uri
            ),
            Err(why) => {
                log::warn!(
                    "NBD leg {}: stopped waiting for the server to close the old connection: {why}",
                    shared.uri
                );
                // SAFETY: shutdown on our own descriptor has no memory effects.
                unsafe { libc::shutdown(shared.fd.as_raw_fd(), libc::SHUT_RDWR) };
            }
        },
    }
}

/// Receives and completes replies until the socket has nothing more for now, or `go_on` says
/// stop after a burst (`Ok`), or the connection is over (`Err`: why, and how). Never waits for
/// the socket, so the reader thread and a reaper's worker share it: whoever holds
/// [`Shared::reading`] calls it when the socket is readable.
fn pump(
    shared: &Shared,
    rd: &mut Reading,
    mut go_on: impl FnMut() -> bool,
) -> Result<(), (String, End)> {
    loop {
        // The replies that arrived together are completed as one batch: their answers reach
        // the guest under one lock of its queue and with one notification. A long stream of
        // replies is cut into bursts, so a completed request never waits for the socket.
        let more = crate::batch::run(|| {
            for _ in 0..MAX_BURST {
                if let Step::Empty = step(shared, rd)? {
                    return Ok(false);
                }
                if !rd.replies.has_header() {
                    break;
                }
            }
            Ok(true)
        })?;
        if !more || !go_on() {
            return Ok(());
        }
    }
}

/// What one [`step`] did.
enum Step {
    /// Completed a reply.
    Reply,
    /// The socket has nothing more for now (what a partial payload needs is kept for later).
    Empty,
}

/// Receives and completes one reply, or goes on with a payload that was cut off. Err says why
/// the connection is over; every entry this step owned is completed then.
fn step(shared: &Shared, rd: &mut Reading) -> Result<Step, (String, End)> {
    if let Some(p) = rd.partial.take() {
        return go_on_with_payload(shared, rd, p);
    }
    let hdr = match rd.replies.header(shared) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(Step::Empty),
        Err(Recv::Dead) => return Err((String::new(), End::GaveUp)),
        Err(Recv::Io(e)) => return Err((describe_recv_error(&e, ""), End::Closed)),
    };
    let magic = be_u32(&hdr[0..4]);
    let error = be_u32(&hdr[4..8]);
    let handle = be_u64(&hdr[8..16]);
    if magic != proto::SIMPLE_REPLY_MAGIC {
        return Err((
            format!("bad reply magic {magic:#010x} (protocol violation)"),
            End::Violation,
        ));
    }
    let Some((entry, sent)) = shared.take_entry(handle) else {
        if !shared.alive.load(Ordering::Acquire) {
            // The leg died between the header and the lookup; the entry was never ours.
            return Err((String::new(), End::GaveUp));
        }
        return Err((
            format!("reply with unknown handle {handle:#018x} (protocol violation)"),
            End::Violation,
        ));
    };
    if entry.cmd == proto::CMD_WRITE && !sent && !shared.wait_sent(handle) {
        // The server answered a write we had not finished sending and then the leg died.
        let err = shared.die(LegError::Lost("connection closed".into()));
        shared.finish(entry, Err(err));
        return Err((String::new(), End::GaveUp));
    }
    if error == 0 && entry.cmd == proto::CMD_READ {
        let Reading {
            replies, scratch, ..
        } = rd;
        let (start, payload_iovs, left) = replies.start_payload(scratch, &entry.bufs);
        if left > 0 {
            let p = PartialRead {
                entry,
                start,
                payload_iovs,
                left,
            };
            return go_on_with_payload(shared, rd, p);
        }
    }
    let result = if error == 0 {
        Ok(())
    } else {
        Err(LegError::Io(nbd_errno(error)))
    };
    shared.finish(entry, result);
    Ok(Step::Reply)
}

/// Receives what the socket has of a read's payload; completes the read once all is there.
fn go_on_with_payload(
    shared: &Shared,
    rd: &mut Reading,
    mut p: PartialRead,
) -> Result<Step, (String, End)> {
    match rd.replies.payload(shared, &mut rd.scratch, &mut p) {
        Ok(true) => {
            shared.finish(p.entry, Ok(()));
            Ok(Step::Reply)
        }
        Ok(false) => {
            rd.partial = Some(p);
            Ok(Step::Empty)
        }
        Err(Recv::Dead) => {
            // Given up on in the middle of the payload: the rest of it is discarded while
            // lingering, never written to the buffers of a failed request.
            let err = shared.die(LegError::Lost("connection closed".into()));
            shared.finish(p.entry, Err(err));
            Err((String::new(), End::GaveUp))
        }
        Err(Recv::Io(e)) => {
            let why = describe_recv_error(&e, " in the middle of a read payload");
            let err = shared.die(LegError::Lost(why));
            shared.finish(p.entry, Err(err));
            Err((String::new(), End::Closed))
        }
    }
}

/// Why the reader's loop ended.
enum End {
    /// The server closed the connection or it broke: nothing is left to wait for.
    Closed,
    /// The leg died on our side (abort, drop, a failed send): the server may still be working.
    GaveUp,
    /// The server broke the protocol.
    Violation,
}

/// Why a receive did not complete.
enum Recv {
    Io(io::Error),
    /// The leg died while waiting; the caller must not touch request buffers any more.
    Dead,
}

/// Most bytes a lingering reader discards before it stops trusting the server: late replies
/// are bounded by what was in flight, so a server that keeps talking is misbehaving.
const LINGER_MAX_BYTES: u64 = 4 << 30;

/// Reads and discards the late replies of a dead connection until the server closes it. Err
/// once the leg was dropped and its linger deadline passed, or the server sent too much.
fn linger(shared: &Shared) -> Result<(), String> {
    let fd = shared.fd.as_raw_fd();
    let mut buf = vec![0u8; 64 << 10];
    let mut discarded = 0u64;
    loop {
        // SAFETY: `buf` is a live, exclusively borrowed buffer of `buf.len()` bytes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n == 0 {
            return Ok(());
        }
        if n > 0 {
            discarded += n as u64;
            if discarded > LINGER_MAX_BYTES {
                return Err(format!("it sent more than {LINGER_MAX_BYTES} bytes"));
            }
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                let timeout = match shared.lock().linger_until {
                    None => None,
                    Some(t) => {
                        let left = t.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err("the leg was closed and it did not answer".into());
                        }
                        Some(left)
                    }
                };
                if let Err(e) = shared.wait_readable(timeout) {
                    return Err(format!("poll failed: {e}"));
                }
            }
            // Reset or otherwise broken: the server's end is gone.
            _ => return Ok(()),
        }
    }
}

fn describe_send_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::BrokenPipe => format!("connection closed by server (send failed: {e})"),
        io::ErrorKind::ConnectionReset => format!("connection reset by server (send failed: {e})"),
        _ => format!("send failed: {e}"),
    }
}

fn describe_recv_error(e: &io::Error, context: &str) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => format!("connection closed by server{context}"),
        io::ErrorKind::ConnectionReset => format!("connection reset by server{context}"),
        _ => format!("receive failed{context}: {e}"),
    }
}

/// Most replies the reader completes in one batch.
const MAX_BURST: usize = 64;

/// Bytes the reader takes from the socket per `recv` while it waits for a reply header: room for
/// the replies to a queue depth of writes (16 bytes each) and for part of a read's payload.
const REPLY_BUFFER_LEN: usize = 4096;

/// The reader's receive buffer. Replies to writes are 16 bytes each and arrive in bursts at
/// queue depth; one `recv` per reply header made a system call per request on the leg. The
/// buffer takes whatever has arrived in one call. A read's payload still goes straight to the
/// caller's buffers: what the buffer already holds of it is copied, the rest is received by a
/// `recvmsg` whose last iovec is the buffer again, so what follows the payload arrives in the
/// same call.
struct ReplyBuffer {
    buf: Box<[u8]>,
    /// The unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl ReplyBuffer {
    fn new() -> Self {
        ReplyBuffer {
            buf: vec![0; REPLY_BUFFER_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Whether a whole reply header has arrived already.
    fn has_header(&self) -> bool {
        self.end - self.start >= proto::REPLY_LEN
    }

    /// The next reply header, `None` if it has not arrived yet, unless the leg died. Replies
    /// already received but not yet consumed are not handed out once the leg is dead: the
    /// reader's drain fails them.
    fn header(&mut self, shared: &Shared) -> Result<Option<[u8; proto::REPLY_LEN]>, Recv> {
        let fd = shared.fd.as_raw_fd();
        loop {
            if !shared.alive.load(Ordering::Acquire) {
                return Err(Recv::Dead);
            }
            if self.has_header() {
                break;
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let rest = &mut self.buf[self.end..];
            // SAFETY: `rest` is a live, exclusively borrowed buffer of `rest.len()` bytes.
            let n =
                unsafe { libc::recv(fd, rest.as_mut_ptr().cast(), rest.len(), libc::MSG_DONTWAIT) };
            match received(n)? {
                Some(n) => self.end += n,
                None => return Ok(None),
            }
        }
        let mut hdr = [0u8; proto::REPLY_LEN];
        hdr.copy_from_slice(&self.buf[self.start..self.start + proto::REPLY_LEN]);
        self.start += proto::REPLY_LEN;
        Ok(Some(hdr))
    }

    /// Starts a read's payload of `bufs.total_len()` bytes: copies what the buffer already
    /// holds into `bufs` and sets `scratch` up for the rest. Returns where the rest starts, the
    /// number of payload iovecs and how many bytes are left.
    fn start_payload(
        &mut self,
        scratch: &mut Vec<libc::iovec>,
        bufs: &Buffers,
    ) -> (usize, usize, usize) {
        scratch.clear();
        scratch.extend(bufs.as_raw().iter().filter(|s| s.iov_len > 0));
        let mut start = 0;
        while start < scratch.len() && self.start < self.end {
            let iov = scratch[start];
            let n = iov.iov_len.min(self.end - self.start);
            // SAFETY: the destination is a read buffer of a request whose entry the reader
            // removed from the map and has not completed yet; `Buffers::push` obliges the
            // submitter to keep it valid for writes of `iov_len` bytes until then, and nothing
            // else writes it meanwhile. The source, `buf[start..start + n]`, lies inside our
            // own buffer (`n <= end - start`, `end <= buf.len()`), which the destination
            // cannot overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.buf.as_ptr().add(self.start),
                    iov.iov_base.cast::<u8>(),
                    n,
                )
            };
            self.start += n;
            advance(scratch, &mut start, n);
        }
        let left: usize = scratch[start..].iter().map(|v| v.iov_len).sum();
        let payload_iovs = scratch.len();
        if left > 0 {
            // The buffer is empty: the payload took all of it.
            self.start = 0;
            self.end = 0;
            scratch.push(libc::iovec {
                iov_base: self.buf.as_mut_ptr().cast(),
                iov_len: self.buf.len(),
            });
        }
        (start, payload_iovs, left)
    }

    /// Receives what the socket has of the rest of `p`'s payload into its buffers (and what
    /// follows it into this buffer). True once the payload is complete, false if the socket
    /// has nothing more for now; `Err` if the leg died or the connection failed.
    fn payload(
        &mut self,
        shared: &Shared,
        scratch: &mut [libc::iovec],
        p: &mut PartialRead,
    ) -> Result<bool, Recv> {
        let fd = shared.fd.as_raw_fd();
        while p.left > 0 {
            if !shared.alive.load(Ordering::Acquire) {
                return Err(Recv::Dead);
            }
            // With more payload iovecs than IOV_MAX the buffer joins only the last call, so a
            // call never receives more than the payload's rest before it.
            let cnt = (scratch.len() - p.start).min(IOV_MAX);
            // SAFETY: all-zero is a valid msghdr (null name and control, no flags).
            let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
            mh.msg_iov = scratch[p.start..].as_mut_ptr();
            mh.msg_iovlen = cnt as _;
            // SAFETY: the iovecs before `payload_iovs` are the read buffers of a request whose
            // entry was removed from the map and is not completed yet (see `start_payload`),
            // held by `p`; the last one is our own buffer, exclusively borrowed here.
            let n = unsafe { libc::recvmsg(fd, &mut mh, libc::MSG_DONTWAIT) };
            match received(n)? {
                None => return Ok(false),
                Some(n) if n >= p.left => {
                    self.end = n - p.left;
                    p.left = 0;
                }
                Some(n) => {
                    advance(&mut scratch[..p.payload_iovs], &mut p.start, n);
                    p.left -= n;
                }
            }
        }
        Ok(true)
    }
}

/// What a non-blocking receive that returned `n` means: bytes received (0 after an
/// interruption: try again), or `None` when the socket has nothing for now. End of stream and
/// errors are `Err`.
fn received(n: isize) -> Result<Option<usize>, Recv> {
    match n {
        0 => Err(Recv::Io(io::ErrorKind::UnexpectedEof.into())),
        n if n > 0 => Ok(Some(n as usize)),
        _ => {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => Ok(Some(0)),
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(Recv::Io(e)),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wire helpers

fn be_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn request_header(
    flags: u16,
    cmd: u16,
    handle: u64,
    offset: u64,
    len: u32,
) -> [u8; proto::REQUEST_LEN] {
    let mut h = [0u8; proto::REQUEST_LEN];
    h[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// NBD error values are fixed by the protocol, not the host's errno numbering.
fn nbd_errno(e: u32) -> i32 {
    match e {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::ENOTSUP,
        108 => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

fn preferred_block_size(preferred: u32) -> u32 {
    let c = preferred.clamp(512, 4096);
    // Round down to a power of two, as the layers above expect.
    1 << (31 - c.leading_zeros())
}

/// Largest payload of one command: the server's maximum, capped at 32 MiB, whole blocks.
fn payload_limit(server_max: Option<u32>, block_size: u32) -> u32 {
    let m = server_max.unwrap_or(MAX_PAYLOAD).min(MAX_PAYLOAD);
    let m = m.max(block_size);
    m / block_size * block_size
}

/// Walks a `Buffers` front to back, handing out consecutive byte ranges as new `Buffers`.
#[derive(Default)]
struct BufCursor {
    seg: usize,
    off: usize,
}

impl BufCursor {
    fn take(&mut self, bufs: &Buffers, mut len: usize) -> Buffers {
        let mut out = Buffers::new();
        let segs = bufs.iovecs();
        while len > 0 && self.seg < segs.len() {
            let s = &segs[self.seg];
            let n = (s.len() - self.off).min(len);
            if n > 0 {
                let ptr = s.ptr().wrapping_add(self.off);
                // SAFETY: `ptr..ptr+n` lies inside a segment the submitter promised valid for
                // this request (see `Buffers::push`), and the piece completes no later than the
                // request itself.
                unsafe { out.push(ptr, n) };
            }
            self.off += n;
            len -= n;
            if self.off == s.len() {
                self.seg += 1;
                self.off = 0;
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Connecting and the handshake

fn connect_tcp(host: &str, port: u16, timeout: Duration) -> io::Result<OwnedFd> {
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve '{host}': {e}")))?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                // Small request headers must not wait for Nagle.
                if let Err(e) = s.set_nodelay(true) {
                    log::debug!("TCP_NODELAY on {addr}: {e}");
                }
                let fd = OwnedFd::from(s);
                set_keepalive(fd.as_raw_fd());
                return Ok(fd);
            }
            Err(e) => {
                last = Some(io::Error::new(
                    e.kind(),
                    format!("connecting to {addr} failed: {e}"),
                ))
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("'{host}' resolved to no address"),
        )
    }))
}

fn connect_unix(path: &Path) -> io::Result<OwnedFd> {
    UnixStream::connect(path).map(OwnedFd::from).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("connecting to {} failed: {e}", path.display()),
        )
    })
}

fn setsockopt_raw<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: `val` points at a live, initialised `T` of the size passed, which is what the
    // caller picked for this option.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Detects a silently vanished peer (host crash, cable pulled), which the blocking reader would
/// otherwise wait for forever. A stopped server process still has its kernel answer, so this
/// never fires just because the server is slow.
fn set_keepalive(fd: RawFd) {
    let opts: [(libc::c_int, libc::c_int, libc::c_int); 5] = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
        // Unacknowledged data for this long means the peer is gone.
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 30_000),
    ];
    for (level, name, val) in opts {
        if let Err(e) = setsockopt_raw(fd, level, name, &val) {
            log::debug!("socket option {level}/{name}: {e}");
        }
    }
}

fn set_io_timeouts(fd: RawFd, timeout: Option<Duration>) -> io::Result<()> {
    let tv = match timeout {
        // A zero timeval means "forever", so round up to at least a microsecond.
        Some(t) => libc::timeval {
            tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_usec: t.subsec_micros().max(u32::from(t.as_secs() == 0)) as libc::suseconds_t,
        },
        None => libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
    };
    setsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    setsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv)
}

/// Blocking socket I/O for the handshake, without SIGPIPE.
struct FdIo(RawFd);

impl Read for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a live, exclusively borrowed buffer of `buf.len()` bytes.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for FdIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a live buffer of `buf.len()` bytes.
        let n = unsafe { libc::send(self.0, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct BlockSizes {
    preferred: u32,
    maximum: u32,
}

#[derive(Debug)]
struct Negotiated {
    size: u64,
    flags: u16,
    block_sizes: Option<BlockSizes>,
}

#[derive(Debug)]
enum HandshakeError {
    Io(io::Error),
    Protocol(String),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

impl HandshakeError {
    fn into_open_error(self, uri: &str, timeout: Duration) -> OpenError {
        let reason = match self {
            HandshakeError::Protocol(reason) => reason,
            HandshakeError::Io(e) => match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    format!("server did not answer within {timeout:?}")
                }
                io::ErrorKind::UnexpectedEof => {
                    "server closed the connection during the handshake".into()
                }
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    format!("server closed the connection during the handshake ({e})")
                }
                _ => {
                    return OpenError::Io {
                        uri: uri.to_string(),
                        source: e,
                    }
                }
            },
        };
        OpenError::Handshake {
            uri: uri.to_string(),
            reason,
        }
    }
}

fn protocol<T>(msg: impl Into<String>) -> Result<T, HandshakeError> {
    Err(HandshakeError::Protocol(msg.into()))
}

fn rep_err_name(t: u32) -> Cow<'static, str> {
    let name = match t & !proto::REP_FLAG_ERROR {
        1 => "NBD_REP_ERR_UNSUP",
        2 => "NBD_REP_ERR_POLICY",
        3 => "NBD_REP_ERR_INVALID",
        4 => "NBD_REP_ERR_PLATFORM",
        5 => "NBD_REP_ERR_TLS_REQD",
        6 => "NBD_REP_ERR_UNKNOWN",
        7 => "NBD_REP_ERR_SHUTDOWN",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        9 => "NBD_REP_ERR_TOO_BIG",
        10 => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => return Cow::Owned(format!("unknown error {t:#010x}")),
    };
    Cow::Borrowed(name)
}

/// Server-supplied text made safe for one log line.
fn server_text(data: &[u8]) -> String {
    String::from_utf8_lossy(data)
        .chars()
        .take(256)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<Negotiated, HandshakeError> {
    if export.len() > MAX_EXPORT_NAME {
        return protocol(format!(
            "export name is {} bytes, the protocol allows {MAX_EXPORT_NAME}",
            export.len()
        ));
    }
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting[..16])?;
    let magic = be_u64(&greeting[0..8]);
    if magic != proto::NBDMAGIC {
        return protocol(format!("not an NBD server (greeting {magic:#018x})"));
    }
    let opt_magic = be_u64(&greeting[8..16]);
    if opt_magic == proto::CLISERV_MAGIC {
        return protocol("server speaks the old-style protocol, which is not supported");
    }
    if opt_magic != proto::IHAVEOPT {
        return protocol(format!("bad newstyle magic {opt_magic:#018x}"));
    }
    s.read_exact(&mut greeting[16..18])?;
    let hflags = be_u16(&greeting[16..18]);
    if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return protocol("server does not support fixed-newstyle negotiation");
    }
    let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
    let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= proto::FLAG_C_NO_ZEROES;
    }

    // Client flags and NBD_OPT_GO in one write: name, then one info request (block sizes).
    let mut out = Vec::with_capacity(32 + export.len());
    out.extend_from_slice(&cflags.to_be_bytes());
    out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    out.extend_from_slice(&(4 + export.len() as u32 + 2 + 2).to_be_bytes());
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
    s.write_all(&out)?;

    let mut export_info: Option<(u64, u16)> = None;
    let mut block_sizes = None;
    for _ in 0..MAX_OPTION_REPLIES {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let magic = be_u64(&h[0..8]);
        let opt = be_u32(&h[8..12]);
        let rtype = be_u32(&h[12..16]);
        let len = be_u32(&h[16..20]);
        if magic != proto::OPT_REPLY_MAGIC {
            return protocol(format!("bad option reply magic {magic:#018x}"));
        }
        if opt != proto::OPT_GO {
            return protocol(format!("reply to option {opt}, expected NBD_OPT_GO"));
        }
        if len > MAX_OPTION_REPLY {
            return protocol(format!("option reply of {len} bytes is too long"));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        if rtype & proto::REP_FLAG_ERROR != 0 {
            if rtype == proto::REP_ERR_UNSUP && export_info.is_none() {
                return export_name_fallback(s, export, no_zeroes);
            }
            let mut reason = format!("server refused export '{export}': {}", rep_err_name(rtype));
            if !data.is_empty() {
                reason.push_str(": ");
                reason.push_str(&server_text(&data));
            }
            return protocol(reason);
        }
        match rtype {
            proto::REP_ACK => {
                let Some((size, flags)) = export_info else {
                    return protocol("server accepted NBD_OPT_GO without describing the export");
                };
                return Ok(Negotiated {
                    size,
                    flags,
                    block_sizes,
                });
            }
            proto::REP_INFO => {
                if data.len() < 2 {
                    return protocol("NBD_REP_INFO without an info type");
                }
                match be_u16(&data[0..2]) {
                    proto::INFO_EXPORT => {
                        if data.len() != 12 {
                            return protocol(format!("NBD_INFO_EXPORT of {} bytes", data.len()));
                        }
                        export_info = Some((be_u64(&data[2..10]), be_u16(&data[10..12])));
                    }
                    proto::INFO_BLOCK_SIZE => {
                        if data.len() != 14 {
                            return protocol(format!(
                                "NBD_INFO_BLOCK_SIZE of {} bytes",
                                data.len()
                            ));
                        }
                        block_sizes = Some(BlockSizes {
                            preferred: be_u32(&data[6..10]),
                            maximum: be_u32(&data[10..14]),
                        });
                    }
                    // Name, description and future infos carry nothing we use.
                    _ => {}
                }
            }
            // Other non-error replies are meaningless for GO; ignoring them is harmless.
            _ => {}
        }
    }
    protocol(format!(
        "more than {MAX_OPTION_REPLIES} replies to NBD_OPT_GO"
    ))
}

/// For servers predating NBD_OPT_GO. The server answers with the export's size and flags, or
/// closes the connection when it has no such export.
fn export_name_fallback<S: Read + Write>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<Negotiated, HandshakeError> {
    let mut out = Vec::with_capacity(16 + export.len());
    out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    s.write_all(&out)?;
    let closed = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HandshakeError::Protocol(format!(
                "server closed the connection after NBD_OPT_EXPORT_NAME (no export '{export}'?)"
            ))
        } else {
            HandshakeError::Io(e)
        }
    };
    let mut r = [0u8; 10 + 124];
    let want = if no_zeroes { 10 } else { r.len() };
    s.read_exact(&mut r[..want]).map_err(closed)?;
    Ok(Negotiated {
        size: be_u64(&r[0..8]),
        flags: be_u16(&r[8..10]),
        block_sizes: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::AtomicUsize;

    type Completion = (Tag, Result<(), LegError>);

    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    const MIB: usize = 1 << 20;

    fn scratch_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "nbd-leg-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    // ---- nbdkit -------------------------------------------------------------------------

    struct Nbdkit {
        child: Child,
        dir: PathBuf,
        address: NbdAddress,
    }

    impl Nbdkit {
        fn unix(args: &[&str]) -> Nbdkit {
            let dir = scratch_dir();
            let sock = dir.join("nbd.sock");
            let listen = vec!["-U".to_string(), sock.display().to_string()];
            Self::start(dir, listen, NbdAddress::Unix(sock), args)
        }

        fn tcp(host: &str, args: &[&str]) -> Nbdkit {
            let dir = scratch_dir();
            let port = free_port();
            let listen = vec![
                "-p".to_string(),
                port.to_string(),
                "-i".to_string(),
                "127.0.0.1".to_string(),
            ];
            let address = NbdAddress::Tcp {
                host: host.to_string(),
                port,
            };
            Self::start(dir, listen, address, args)
        }

        fn start(dir: PathBuf, listen: Vec<String>, address: NbdAddress, args: &[&str]) -> Self {
            let pidfile = dir.join("pid");
            let child = Command::new("nbdkit")
                .args(["--exit-with-parent", "-f"])
                .args(&listen)
                .arg("-P")
                .arg(&pidfile)
                .args(args)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("nbdkit.log")).unwrap())
                .spawn()
                .expect("nbdkit must be installed");
            let mut k = Nbdkit {
                child,
                dir,
                address,
            };
            // nbdkit writes the pid file once it accepts connections.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if std::fs::read_to_string(&pidfile).is_ok_and(|s| s.trim().parse::<i32>().is_ok())
                {
                    return k;
                }
                if let Ok(Some(st)) = k.child.try_wait() {
                    panic!("nbdkit {args:?} exited at start: {st}");
                }
                assert!(Instant::now() < deadline, "nbdkit {args:?} did not start");
                thread::sleep(Duration::from_millis(10));
            }
        }

        fn signal(&self, sig: libc::c_int) {
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: sending a signal to our own child process has no memory effects.
            let r = unsafe { libc::kill(pid, sig) };
            assert_eq!(r, 0, "kill({sig})");
            if sig == libc::SIGSTOP {
                // kill(2) only queues the stop: until every thread has taken it, a connection
                // thread could still answer a request sent right after. The parent hears of
                // the stop once the whole process has stopped.
                let mut status = 0;
                // SAFETY: waitpid on our own child, not yet reaped, with a valid status slot.
                let r = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) };
                assert!(
                    r == pid && libc::WIFSTOPPED(status),
                    "nbdkit did not stop: waitpid {r}, status {status:#x}"
                );
            }
        }

        fn kill9(&mut self) {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }

    impl Drop for Nbdkit {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }

    // ---- completions ----------------------------------------------------------------------

    struct ChanSink(Sender<Completion>);

    impl CompletionSink for ChanSink {
        fn complete(&self, tag: Tag, result: Result<(), LegError>) {
            let _ = self.0.send((tag, result));
        }
    }

    fn channel_sink() -> (Arc<dyn CompletionSink>, Receiver<Completion>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Arc::new(ChanSink(tx)), rx)
    }

    fn open_with(
        address: &NbdAddress,
        opts: &OpenOptions,
    ) -> Result<(NbdLeg, Receiver<Completion>), OpenError> {
        let (sink, rx) = channel_sink();
        let uri = match address {
            NbdAddress::Tcp { host, port } => format!("nbd://{host}:{port}/"),
            NbdAddress::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
        };
        NbdLeg::connect(uri, address, "", opts, sink).map(|leg| (leg, rx))
    }

    fn open(address: &NbdAddress) -> (NbdLeg, Receiver<Completion>) {
        open_with(address, &OpenOptions::default()).expect("connect")
    }

    /// Collects `n` completions, failing on a duplicate tag or a timeout.
    fn collect(
        rx: &Receiver<Completion>,
        n: usize,
        timeout: Duration,
    ) -> HashMap<Tag, Result<(), LegError>> {
        let deadline = Instant::now() + timeout;
        let mut out = HashMap::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let (tag, res) = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("only {} of {n} completions arrived", out.len()));
            assert!(out.insert(tag, res).is_none(), "tag {tag} completed twice");
        }
        out
    }

    fn assert_quiet(rx: &Receiver<Completion>, wait: Duration) {
        if let Ok(c) = rx.recv_timeout(wait) {
            panic!("unexpected extra completion {c:?}");
        }
    }

    fn one(rx: &Receiver<Completion>, tag: Tag) -> Result<(), LegError> {
        let c = collect(rx, 1, Duration::from_secs(10));
        c.get(&tag)
            .cloned()
            .expect("completion for the expected tag")
    }

    /// Submits a write of each buffer, tag `i` at offset `i * stride`.
    fn submit_writes(leg: &NbdLeg, bufs_w: &mut [Vec<u8>], stride: usize) {
        for (i, b) in bufs_w.iter_mut().enumerate() {
            submit(
                leg,
                i as Tag,
                write((i * stride) as u64, bufs(b, &[]), false),
            );
        }
    }

    /// Cuts `buf` into segments of the given sizes (the rest forms the last one).
    fn bufs(buf: &mut [u8], sizes: &[usize]) -> Buffers {
        let mut b = Buffers::new();
        let mut off = 0;
        for &s in sizes.iter().chain(std::iter::once(&usize::MAX)) {
            let n = s.min(buf.len() - off);
            if n == 0 {
                continue;
            }
            // SAFETY: every test keeps `buf` alive and untouched until the request completed.
            unsafe { b.push(buf[off..].as_mut_ptr(), n) };
            off += n;
        }
        b
    }

    fn pattern(seed: u64, off: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| ((off + i).wrapping_mul(2_654_435_761) >> 7) as u8 ^ seed as u8)
            .collect()
    }

    fn read(offset: u64, b: Buffers) -> LegOp {
        LegOp::Read { offset, bufs: b }
    }

    fn write(offset: u64, b: Buffers, fua: bool) -> LegOp {
        LegOp::Write {
            offset,
            bufs: b,
            fua,
        }
    }

    fn submit(leg: &NbdLeg, tag: Tag, op: LegOp) {
        leg.submit(LegRequest { tag, op });
    }

    fn lost_reason(r: &Result<(), LegError>) -> String {
        match r {
            Err(LegError::Lost(why)) => why.clone(),
            other => panic!("expected Lost, got {other:?}"),
        }
    }

    // ---- against nbdkit --------------------------------------------------------------------

    #[test]
    fn pipelined_multi_segment_writes_read_back() {
        let k = Nbdkit::unix(&["memory", "64M"]);
        let (leg, rx) = open(&k.address);
        let info = leg.info().clone();
        assert_eq!(info.capacity, 64 * MIB as u64);
        assert!(
            info.flush && info.fua && info.discard && info.write_zeroes,
            "{info:?}"
        );
        assert!(!info.read_only);
        assert!((512..=4096).contains(&info.block_size), "{info:?}");
        assert!(leg.is_alive());

        const N: usize = 64;
        const LEN: usize = 64 << 10;
        let mut wbufs: Vec<Vec<u8>> = (0..N).map(|i| pattern(7, (i * LEN) as u64, LEN)).collect();
        for (i, w) in wbufs.iter_mut().enumerate() {
            let b = bufs(w, &[512, 4096, 7680, 1000]);
            submit(&leg, i as Tag, write((i * LEN) as u64, b, i % 4 == 0));
        }
        for (tag, r) in collect(&rx, N, Duration::from_secs(20)) {
            assert_eq!(r, Ok(()), "write {tag}");
        }
        let mut rbufs = vec![vec![0u8; LEN]; N];
        for (i, r) in rbufs.iter_mut().enumerate() {
            let b = bufs(r, &[LEN - 1000, 999]);
            submit(&leg, 1000 + i as Tag, read((i * LEN) as u64, b));
        }
        for (tag, r) in collect(&rx, N, Duration::from_secs(20)) {
            assert_eq!(r, Ok(()), "read {tag}");
        }
        for i in 0..N {
            assert!(rbufs[i] == wbufs[i], "request {i} read back different data");
        }
        assert_quiet(&rx, Duration::from_millis(50));
        assert!(leg.is_alive());
    }

    /// Replies arrive many to a `recv`: headers, short read payloads and the start of long
    /// ones land in the reader's buffer and are copied out, the rest of a payload goes straight
    /// to the request's buffers with the next replies behind it, also past `IOV_MAX` segments.
    #[test]
    fn buffered_replies_and_split_payloads_read_back() {
        let k = Nbdkit::unix(&["memory", "64M"]);
        let (leg, rx) = open(&k.address);
        const SPAN: usize = 4 << 20;
        let mut image = pattern(11, 0, SPAN);
        submit(&leg, 0, write(0, bufs(&mut image, &[SPAN]), false));
        assert_eq!(one(&rx, 0), Ok(()));

        // Lengths from one sector to 20 KiB, and one read of 2000 16-byte segments.
        let mut lens: Vec<usize> = (0..120).map(|i| 512 * (1 + (i * 7) % 40)).collect();
        lens.insert(60, 2000 * 16);
        let mut rbufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0u8; l]).collect();
        let mut offsets = Vec::new();
        crate::batch::run(|| {
            for (i, r) in rbufs.iter_mut().enumerate() {
                let len = r.len();
                let off = (i * 37 * 512) % (SPAN - len);
                let off = off - off % 512;
                offsets.push(off);
                let sizes: Vec<usize> = if len == 2000 * 16 {
                    vec![16; 2000]
                } else {
                    // Uneven segments, so copies out of the buffer end mid-segment.
                    vec![len / 3, len - len / 3]
                };
                submit(&leg, 10 + i as Tag, read(off as u64, bufs(r, &sizes)));
            }
        });
        for (tag, r) in collect(&rx, lens.len(), Duration::from_secs(20)) {
            assert_eq!(r, Ok(()), "read {tag}");
        }
        for (i, r) in rbufs.iter().enumerate() {
            let off = offsets[i];
            assert!(
                r[..] == image[off..off + r.len()],
                "read {i} ({} bytes at {off}) returned different data",
                r.len()
            );
        }
        assert_quiet(&rx, Duration::from_millis(50));
        assert!(leg.is_alive());
    }

    /// Inside a batch, commands wait for its end and then leave together: nothing reaches the
    /// server before, everything completes after.
    #[test]
    fn commands_of_a_batch_leave_at_its_end() {
        let k = Nbdkit::unix(&["memory", "64M"]);
        let (leg, rx) = open(&k.address);
        let mut w: Vec<Vec<u8>> = (0..8).map(|i| pattern(i, 0, 4096)).collect();
        crate::batch::run(|| {
            submit_writes(&leg, &mut w, 4096);
            thread::sleep(Duration::from_millis(100));
            assert!(rx.is_empty(), "a command left before the batch ended");
        });
        for (tag, r) in collect(&rx, 8, Duration::from_secs(5)) {
            assert_eq!(r, Ok(()), "write {tag}");
        }
        let mut r = vec![0u8; 8 * 4096];
        submit(&leg, 100, read(0, bufs(&mut r, &[])));
        assert_eq!(one(&rx, 100), Ok(()));
        assert!(r.chunks(4096).zip(&w).all(|(a, b)| a == b.as_slice()));
    }

    /// Several threads submitting at once, in and outside batches, with writes big enough to
    /// fill the socket: inline writers and the sender take turns without interleaving bytes on
    /// the wire (which would desynchronise the protocol) and every write lands where it should.
    #[test]
    fn concurrent_inline_and_queued_writers_keep_the_stream_whole() {
        let k = Nbdkit::unix(&["memory", "64M"]);
        let (leg, rx) = open(&k.address);
        let leg = Arc::new(leg);
        const THREADS: usize = 4;
        const PER: usize = 48;
        const SLOT: usize = 256 << 10;
        let size = |i: usize| [4096, 65536, SLOT][i % 3];
        let data: Vec<Vec<u8>> = (0..THREADS * PER)
            .map(|i| pattern(i as u64 + 11, (i * SLOT) as u64, size(i)))
            .collect();
        let data = Arc::new(data);
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let leg = Arc::clone(&leg);
                let data = Arc::clone(&data);
                thread::spawn(move || {
                    for j in (0..PER).step_by(3) {
                        let go = |i: usize| {
                            let b = data[i].as_ptr().cast_mut();
                            let mut bs = Buffers::new();
                            // SAFETY: `data` outlives every request (the test waits for all of
                            // them) and writes only read the buffer.
                            unsafe { bs.push(b, data[i].len()) };
                            submit(&leg, i as Tag, write((i * SLOT) as u64, bs, false));
                        };
                        let i = t * PER + j;
                        if t % 2 == 0 {
                            crate::batch::run(|| (i..i + 3).for_each(go));
                        } else {
                            (i..i + 3).for_each(go);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        for (tag, r) in collect(&rx, THREADS * PER, Duration::from_secs(30)) {
            assert_eq!(r, Ok(()), "write {tag}");
        }
        for (i, want) in data.iter().enumerate() {
            let mut got = vec![0u8; want.len()];
            submit(
                &leg,
                10_000 + i as Tag,
                read((i * SLOT) as u64, bufs(&mut got, &[])),
            );
            assert_eq!(one(&rx, 10_000 + i as Tag), Ok(()));
            assert!(&got == want, "write {i} read back different data");
        }
        assert!(leg.is_alive());
    }

    #[test]
    fn requests_larger_than_32mib_are_split() {
        let k = Nbdkit::unix(&["memory", "64M"]);
        let (leg, rx) = open(&k.address);
        let len = 40 * MIB + 4096;
        let mut w = pattern(3, 4096, len);
        submit(
            &leg,
            1,
            write(4096, bufs(&mut w, &[MIB, 31 * MIB + 7]), true),
        );
        assert_eq!(one(&rx, 1), Ok(()));
        let mut r = vec![0u8; len];
        submit(&leg, 2, read(4096, bufs(&mut r, &[33 * MIB])));
        assert_eq!(one(&rx, 2), Ok(()));
        assert!(r == w, "split read-back differs");
        assert_quiet(&rx, Duration::from_millis(50));
    }

    #[test]
    fn flush_trim_and_write_zeroes() {
        let k = Nbdkit::unix(&["memory", "64M"]);
        let (leg, rx) = open(&k.address);
        let mut w = pattern(9, 0, 4 * 65536);
        submit(&leg, 1, write(0, bufs(&mut w, &[]), false));
        assert_eq!(one(&rx, 1), Ok(()));
        submit(&leg, 2, LegOp::Flush);
        assert_eq!(one(&rx, 2), Ok(()));
        submit(
            &leg,
            3,
            LegOp::WriteZeroes {
                offset: 0,
                len: 65536,
                may_unmap: false,
            },
        );
        submit(
            &leg,
            4,
            LegOp::WriteZeroes {
                offset: 65536,
                len: 65536,
                may_unmap: true,
            },
        );
        submit(
            &leg,
            5,
            LegOp::Discard {
                offset: 2 * 65536,
                len: 65536,
            },
        );
        for (tag, r) in collect(&rx, 3, Duration::from_secs(10)) {
            assert_eq!(r, Ok(()), "request {tag}");
        }
        let mut r = vec![0xAAu8; 4 * 65536];
        submit(&leg, 6, read(0, bufs(&mut r, &[100, 65436])));
        assert_eq!(one(&rx, 6), Ok(()));
        // The memory plugin reads trimmed ranges back as zeroes.
        assert!(
            r[..3 * 65536].iter().all(|&b| b == 0),
            "zeroed range not zero"
        );
        assert!(r[3 * 65536..] == w[3 * 65536..], "untouched range changed");
        // Out of range and empty requests never reach the server.
        submit(
            &leg,
            7,
            read(64 * MIB as u64 - 512, bufs(&mut r[..1024], &[])),
        );
        assert_eq!(one(&rx, 7), Err(LegError::Io(libc::EINVAL)));
        submit(&leg, 8, read(0, Buffers::new()));
        assert_eq!(one(&rx, 8), Ok(()));
        assert_quiet(&rx, Duration::from_millis(50));
    }

    #[test]
    fn read_only_export_refuses_writes() {
        let k = Nbdkit::unix(&["-r", "memory", "1M"]);
        let (leg, rx) = open(&k.address);
        assert!(leg.info().read_only);
        let mut b = vec![1u8; 4096];
        submit(&leg, 1, write(0, bufs(&mut b, &[]), false));
        assert_eq!(one(&rx, 1), Err(LegError::Io(libc::EROFS)));
        submit(
            &leg,
            2,
            LegOp::Discard {
                offset: 0,
                len: 4096,
            },
        );
        assert_eq!(one(&rx, 2), Err(LegError::Io(libc::EROFS)));
        submit(
            &leg,
            3,
            LegOp::WriteZeroes {
                offset: 0,
                len: 4096,
                may_unmap: true,
            },
        );
        assert_eq!(one(&rx, 3), Err(LegError::Io(libc::EROFS)));
        submit(&leg, 4, read(0, bufs(&mut b, &[])));
        assert_eq!(one(&rx, 4), Ok(()));
        assert!(b.iter().all(|&x| x == 0));
        assert!(leg.is_alive());

        // Opening read-only refuses writes even when the server would take them.
        let k2 = Nbdkit::unix(&["memory", "1M"]);
        let opts = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let (leg2, rx2) = open_with(&k2.address, &opts).expect("connect");
        assert!(leg2.info().read_only);
        submit(&leg2, 1, write(0, bufs(&mut b, &[]), true));
        assert_eq!(one(&rx2, 1), Err(LegError::Io(libc::EROFS)));
    }

    #[test]
    fn server_errors_fail_only_the_request() {
        let k = Nbdkit::unix(&[
            "--filter=error",
            "memory",
            "64M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            "error-pwrite=ENOSPC",
            "error-pwrite-rate=100%",
        ]);
        let (leg, rx) = open(&k.address);
        let mut b = vec![0x55u8; 8192];
        for i in 0..8 {
            submit(&leg, i, read(i * 8192, bufs(&mut b, &[])));
        }
        for (tag, r) in collect(&rx, 8, Duration::from_secs(10)) {
            assert_eq!(r, Err(LegError::Io(libc::EIO)), "read {tag}");
        }
        submit(&leg, 100, write(0, bufs(&mut b, &[]), false));
        assert_eq!(one(&rx, 100), Err(LegError::Io(libc::ENOSPC)));
        assert!(leg.is_alive());
        submit(&leg, 101, LegOp::Flush);
        assert_eq!(one(&rx, 101), Ok(()), "the connection still works");
        assert!(b.iter().all(|&x| x == 0x55), "failed reads left no payload");
    }

    #[test]
    fn killed_server_loses_every_request_exactly_once() {
        let mut k = Nbdkit::unix(&["--filter=delay", "memory", "64M", "rdelay=10", "wdelay=10"]);
        let (leg, rx) = open(&k.address);
        let mut rb = vec![0u8; 16 * 65536];
        let mut wb = pattern(1, 0, 16 * 65536);
        for (i, chunk) in rb.chunks_mut(65536).enumerate() {
            submit(&leg, i as Tag, read(i as u64 * 65536, bufs(chunk, &[4096])));
        }
        for (i, chunk) in wb.chunks_mut(65536).enumerate() {
            submit(
                &leg,
                100 + i as Tag,
                write(i as u64 * 65536, bufs(chunk, &[]), false),
            );
        }
        thread::sleep(Duration::from_millis(300));
        assert!(rx.is_empty(), "nothing completes while the server sleeps");
        let t0 = Instant::now();
        k.kill9();
        let done = collect(&rx, 32, Duration::from_secs(5));
        assert!(t0.elapsed() < Duration::from_secs(2), "loss detected late");
        for r in done.values() {
            let why = lost_reason(r);
            assert!(why.contains("server"), "reason: {why}");
        }
        assert!(!leg.is_alive());
        assert_quiet(&rx, Duration::from_millis(200));
        // Later requests fail at once, inside submit.
        submit(&leg, 999, LegOp::Flush);
        let (tag, r) = rx.try_recv().expect("completed inline");
        assert_eq!(tag, 999);
        lost_reason(&r);
    }

    #[test]
    fn abort_with_paused_server_fails_requests_promptly() {
        let k = Nbdkit::unix(&["memory", "64M"]);
        let (leg, rx) = open(&k.address);
        k.signal(libc::SIGSTOP);
        // Enough write payload to fill the socket so the sender is stuck in the middle of it.
        let mut wb = pattern(5, 0, 32 * MIB);
        for (i, chunk) in wb.chunks_mut(4 * MIB).enumerate() {
            submit(
                &leg,
                i as Tag,
                write((i * 4 * MIB) as u64, bufs(chunk, &[MIB]), false),
            );
        }
        let mut rb = vec![0xAAu8; 8 * 65536];
        for (i, chunk) in rb.chunks_mut(65536).enumerate() {
            submit(
                &leg,
                100 + i as Tag,
                read((i * 65536) as u64, bufs(chunk, &[])),
            );
        }
        submit(&leg, 200, LegOp::Flush);
        thread::sleep(Duration::from_millis(200));
        assert!(rx.is_empty());
        let t0 = Instant::now();
        leg.abort("test abort");
        assert!(!leg.is_alive());
        let done = collect(&rx, 17, Duration::from_secs(1));
        assert!(t0.elapsed() < Duration::from_secs(1));
        for (tag, r) in &done {
            assert_eq!(r, &Err(LegError::Aborted("test abort".into())), "tag {tag}");
        }
        submit(&leg, 300, LegOp::Flush);
        assert_eq!(
            rx.try_recv().ok(),
            Some((300, Err(LegError::Aborted("test abort".into()))))
        );
        // Until the server resumes, it may still execute what it received.
        assert!(!leg.wait_quiet(Duration::from_millis(200)));
        // The server wakes up and answers whatever reached it: nothing lands in our buffers,
        // it sees our end-of-file after its replies and closes the connection itself.
        k.signal(libc::SIGCONT);
        assert!(
            leg.wait_quiet(Duration::from_secs(5)),
            "the server kept the connection"
        );
        assert!(rb.iter().all(|&b| b == 0xAA), "aborted reads were written");
        assert_quiet(&rx, Duration::from_millis(50));
    }

    /// A server paused while requests were in flight must survive our giving up on it: it gets
    /// an orderly end-of-file, not EPIPE on its replies (nbdkit 1.32 dies of an assertion on
    /// that), and it serves the next connection.
    #[test]
    fn paused_server_survives_abort_and_serves_again() {
        let mut k = Nbdkit::unix(&["memory", "64M"]);
        let (leg, rx) = open(&k.address);
        k.signal(libc::SIGSTOP);
        let mut bufs_w: Vec<Vec<u8>> = (0..64).map(|i| pattern(i, 0, 65536)).collect();
        submit_writes(&leg, &mut bufs_w, 65536);
        thread::sleep(Duration::from_millis(100));
        leg.abort("test abort");
        assert_eq!(collect(&rx, 64, Duration::from_secs(2)).len(), 64);
        k.signal(libc::SIGCONT);
        assert!(leg.wait_quiet(Duration::from_secs(5)));
        drop(leg);
        thread::sleep(Duration::from_millis(200));
        let log = std::fs::read_to_string(k.dir.join("nbdkit.log")).unwrap_or_default();
        assert!(
            k.child.try_wait().unwrap().is_none(),
            "nbdkit died after the aborted connection: {log}"
        );
        // Cut on a request boundary: the server never saw a torn request.
        assert!(!log.contains("Bad message"), "{log}");
        let (leg2, rx2) = open(&k.address);
        let mut rb = vec![0u8; 65536];
        submit(&leg2, 1, read(0, bufs(&mut rb, &[])));
        assert_eq!(one(&rx2, 1), Ok(()));
    }

    #[test]
    fn drop_with_requests_outstanding_aborts_them() {
        let k = Nbdkit::unix(&["--filter=delay", "memory", "64M", "rdelay=10"]);
        let (leg, rx) = open(&k.address);
        let mut rb = vec![0u8; 8 * 4096];
        for (i, chunk) in rb.chunks_mut(4096).enumerate() {
            submit(&leg, i as Tag, read((i * 4096) as u64, bufs(chunk, &[])));
        }
        thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        drop(leg);
        assert!(t0.elapsed() < Duration::from_secs(2), "drop took too long");
        for r in collect(&rx, 8, Duration::from_secs(1)).values() {
            assert_eq!(r, &Err(LegError::Aborted("leg closed".into())));
        }
        assert_quiet(&rx, Duration::from_millis(100));
    }

    /// Submitters race with the connection going away: each request still completes once, and
    /// none succeeds after the first loss was reported.
    fn race_submit_with_death(kill: bool) {
        let mut k = Nbdkit::unix(&["memory", "64M"]);
        let (leg, rx) = open(&k.address);
        let leg = Arc::new(leg);
        const PER_THREAD: usize = 3000;
        // Halfway through, the workers wait while the server is paused: what they submit after
        // that cannot succeed, so the death surely fails some requests while they submit.
        let (half, go) = (
            Arc::new(std::sync::Barrier::new(3)),
            Arc::new(std::sync::Barrier::new(3)),
        );
        let mut workers = Vec::new();
        for t in 0..2u64 {
            let leg = Arc::clone(&leg);
            let (half, go) = (Arc::clone(&half), Arc::clone(&go));
            workers.push(thread::spawn(move || {
                let mut mem = vec![0u8; PER_THREAD * 4096];
                for (i, chunk) in mem.chunks_mut(4096).enumerate() {
                    if i == PER_THREAD / 2 {
                        half.wait();
                        go.wait();
                    }
                    let tag = t * 1_000_000 + i as Tag;
                    let off = (t as usize * PER_THREAD + i) as u64 * 4096;
                    let op = if i % 2 == 0 {
                        read(off, bufs(chunk, &[]))
                    } else {
                        write(off, bufs(chunk, &[]), false)
                    };
                    leg.submit(LegRequest { tag, op });
                    if i % 64 == 0 {
                        thread::yield_now();
                    }
                }
                // Buffers must outlive every request of this thread.
                mem
            }));
        }
        half.wait();
        k.signal(libc::SIGSTOP);
        go.wait();
        if kill {
            k.kill9();
        } else {
            leg.abort("race abort");
        }
        let mems: Vec<Vec<u8>> = workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect();
        let done = collect(&rx, 2 * PER_THREAD, Duration::from_secs(20));
        let failed = done.values().filter(|r| r.is_err()).count();
        assert!(failed > 0, "the death must fail some requests");
        for r in done.values() {
            match r {
                Ok(()) => {}
                Err(LegError::Lost(_)) if kill => {}
                Err(LegError::Aborted(why)) if !kill => assert_eq!(why, "race abort"),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(!leg.is_alive());
        assert_quiet(&rx, Duration::from_millis(200));
        drop(mems);
    }

    #[test]
    fn submit_racing_with_server_death_completes_each_once() {
        race_submit_with_death(true);
    }

    #[test]
    fn submit_racing_with_abort_completes_each_once() {
        race_submit_with_death(false);
    }

    /// A sink that resubmits from inside `complete` and can hold the last reference to the leg.
    struct ReentrantSink {
        tx: Sender<Completion>,
        leg: Mutex<Option<std::sync::Weak<NbdLeg>>>,
        last_ref: Mutex<Option<Arc<NbdLeg>>>,
    }

    impl CompletionSink for ReentrantSink {
        fn complete(&self, tag: Tag, result: Result<(), LegError>) {
            let _ = self.tx.send((tag, result));
            if tag % 10 < 3 {
                let weak = self.leg.lock().unwrap().clone();
                if let Some(leg) = weak.and_then(|w| w.upgrade()) {
                    leg.submit(LegRequest {
                        tag: tag + 1,
                        op: LegOp::Flush,
                    });
                }
            }
            if tag == 100 {
                // Drops the leg on the thread that is delivering this completion.
                let last = self.last_ref.lock().unwrap().take();
                drop(last);
                let _ = self.tx.send((101, Ok(())));
            }
        }
    }

    #[test]
    fn sink_may_submit_and_drop_the_leg_from_complete() {
        let k = Nbdkit::unix(&["memory", "1M"]);
        let (tx, rx) = crossbeam_channel::unbounded();
        let sink = Arc::new(ReentrantSink {
            tx,
            leg: Mutex::new(None),
            last_ref: Mutex::new(None),
        });
        let leg = NbdLeg::connect(
            "reentrant".into(),
            &k.address,
            "",
            &OpenOptions::default(),
            Arc::clone(&sink) as Arc<dyn CompletionSink>,
        )
        .expect("connect");
        let leg = Arc::new(leg);
        *sink.leg.lock().unwrap() = Some(Arc::downgrade(&leg));
        // Completed on the reader thread, each completion submits the next.
        submit(&leg, 0, LegOp::Flush);
        for r in collect(&rx, 4, Duration::from_secs(5)).values() {
            assert_eq!(r, &Ok(()));
        }
        // The same from inside submit, once the leg is dead.
        leg.abort("stop");
        submit(&leg, 10, LegOp::Flush);
        let done = collect(&rx, 4, Duration::from_secs(5));
        assert!(done.keys().all(|t| (10..14).contains(t)));
        assert!(done
            .values()
            .all(|r| r == &Err(LegError::Aborted("stop".into()))));

        // A live leg whose last reference goes away on its own reader thread.
        let (tx, rx) = crossbeam_channel::unbounded();
        let sink = Arc::new(ReentrantSink {
            tx,
            leg: Mutex::new(None),
            last_ref: Mutex::new(None),
        });
        let leg = NbdLeg::connect(
            "self-drop".into(),
            &k.address,
            "",
            &OpenOptions::default(),
            Arc::clone(&sink) as Arc<dyn CompletionSink>,
        )
        .expect("connect");
        let leg = Arc::new(leg);
        *sink.last_ref.lock().unwrap() = Some(Arc::clone(&leg));
        submit(&leg, 100, LegOp::Flush);
        drop(leg);
        let done = collect(&rx, 2, Duration::from_secs(5));
        assert_eq!(done.get(&100), Some(&Ok(())));
        assert!(
            done.contains_key(&101),
            "the drop on the reader thread returned"
        );
        assert!(sink.last_ref.lock().unwrap().is_none());
    }

    #[test]
    fn tcp_connection_tries_every_resolved_address() {
        // nbdkit listens on 127.0.0.1 only; "localhost" may resolve to ::1 first.
        let k = Nbdkit::tcp("localhost", &["memory", "1M"]);
        let (leg, rx) = open(&k.address);
        let mut w = pattern(2, 0, 8192);
        submit(&leg, 1, write(0, bufs(&mut w, &[4096]), true));
        assert_eq!(one(&rx, 1), Ok(()));
        let mut r = vec![0u8; 8192];
        submit(&leg, 2, read(0, bufs(&mut r, &[10])));
        assert_eq!(one(&rx, 2), Ok(()));
        assert!(r == w);
    }

    #[test]
    fn connect_failures_name_the_leg() {
        let port = free_port();
        let addr = NbdAddress::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let err = open_with(&addr, &OpenOptions::default())
            .err()
            .expect("must fail");
        let msg = err.to_string();
        assert!(matches!(err, OpenError::Io { .. }), "{msg}");
        assert!(msg.contains(&format!("nbd://127.0.0.1:{port}/")), "{msg}");
        assert!(msg.contains("refused"), "{msg}");

        let dir = scratch_dir();
        let addr = NbdAddress::Unix(dir.join("missing.sock"));
        let err = open_with(&addr, &OpenOptions::default())
            .err()
            .expect("must fail");
        let msg = err.to_string();
        assert!(msg.contains("missing.sock"), "{msg}");
        let _ = std::fs::remove_dir_all(dir);
    }

    // ---- fake servers ------------------------------------------------------------------------

    struct Fake(UnixStream);

    #[derive(Debug, Clone, Copy)]
    struct Req {
        flags: u16,
        cmd: u16,
        handle: u64,
        offset: u64,
        len: u32,
    }

    impl Fake {
        fn greet(&mut self) {
            let mut g = Vec::new();
            g.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
            g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            g.extend_from_slice(
                &(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes(),
            );
            self.0.write_all(&g).unwrap();
            let mut c = [0u8; 4];
            self.0.read_exact(&mut c).unwrap();
            assert_eq!(
                u32::from_be_bytes(c),
                proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES
            );
        }

        fn read_option(&mut self) -> (u32, Vec<u8>) {
            let mut h = [0u8; 16];
            self.0.read_exact(&mut h).unwrap();
            assert_eq!(be_u64(&h[0..8]), proto::IHAVEOPT);
            let mut data = vec![0u8; be_u32(&h[12..16]) as usize];
            self.0.read_exact(&mut data).unwrap();
            (be_u32(&h[8..12]), data)
        }

        fn reply_option(&mut self, opt: u32, rtype: u32, data: &[u8]) {
            let mut r = Vec::new();
            r.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
            r.extend_from_slice(&opt.to_be_bytes());
            r.extend_from_slice(&rtype.to_be_bytes());
            r.extend_from_slice(&(data.len() as u32).to_be_bytes());
            r.extend_from_slice(data);
            self.0.write_all(&r).unwrap();
        }

        /// Greets and answers one NBD_OPT_GO; returns the export name asked for.
        fn go(&mut self, size: u64, flags: u16, block: Option<(u32, u32, u32)>) -> String {
            self.greet();
            let (opt, data) = self.read_option();
            assert_eq!(opt, proto::OPT_GO);
            let n = be_u32(&data[0..4]) as usize;
            let name = String::from_utf8(data[4..4 + n].to_vec()).unwrap();
            let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&size.to_be_bytes());
            info.extend_from_slice(&(flags | proto::FLAG_HAS_FLAGS).to_be_bytes());
            self.reply_option(proto::OPT_GO, proto::REP_INFO, &info);
            // An info type this client does not know must be skipped.
            self.reply_option(proto::OPT_GO, proto::REP_INFO, &[0, 2, b'h', b'i']);
            if let Some((min, pref, max)) = block {
                let mut info = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [min, pref, max] {
                    info.extend_from_slice(&v.to_be_bytes());
                }
                self.reply_option(proto::OPT_GO, proto::REP_INFO, &info);
            }
            self.reply_option(proto::OPT_GO, proto::REP_ACK, &[]);
            name
        }

        fn read_req(&mut self) -> Req {
            let mut h = [0u8; 28];
            self.0.read_exact(&mut h).unwrap();
            assert_eq!(be_u32(&h[0..4]), proto::REQUEST_MAGIC);
            Req {
                flags: be_u16(&h[4..6]),
                cmd: be_u16(&h[6..8]),
                handle: be_u64(&h[8..16]),
                offset: be_u64(&h[16..24]),
                len: be_u32(&h[24..28]),
            }
        }

        fn payload(&mut self, len: u32) -> Vec<u8> {
            let mut p = vec![0u8; len as usize];
            self.0.read_exact(&mut p).unwrap();
            p
        }

        fn reply(&mut self, error: u32, handle: u64, payload: &[u8]) {
            let mut r = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&error.to_be_bytes());
            r.extend_from_slice(&handle.to_be_bytes());
            r.extend_from_slice(payload);
            self.0.write_all(&r).unwrap();
        }

        fn expect_disc(&mut self) {
            let r = self.read_req();
            assert_eq!(r.cmd, proto::CMD_DISC, "expected NBD_CMD_DISC, got {r:?}");
        }
    }

    fn fake_server<F>(f: F) -> (NbdAddress, PathBuf, JoinHandle<()>)
    where
        F: FnOnce(Fake) + Send + 'static,
    {
        let dir = scratch_dir();
        let path = dir.join("fake.sock");
        let l = UnixListener::bind(&path).expect("bind");
        let h = thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            f(Fake(s))
        });
        (NbdAddress::Unix(path), dir, h)
    }

    #[test]
    fn reply_with_unknown_handle_loses_the_leg() {
        let (addr, dir, server) = fake_server(|mut f| {
            f.go(1 << 20, proto::FLAG_SEND_FLUSH, None);
            let r = f.read_req();
            assert_eq!(r.cmd, proto::CMD_READ);
            f.reply(0, 0xdead_beef, &[]);
            // The client hangs up; anything more it sends is ignored.
            let mut sink = Vec::new();
            let _ = f.0.read_to_end(&mut sink);
        });
        let (leg, rx) = open(&addr);
        let mut b = vec![0x11u8; 4096];
        submit(&leg, 1, read(0, bufs(&mut b, &[])));
        let why = lost_reason(&one(&rx, 1));
        assert!(why.contains("unknown handle 0x00000000deadbeef"), "{why}");
        assert!(!leg.is_alive());
        submit(&leg, 2, LegOp::Flush);
        assert_eq!(rx.try_recv().ok().map(|c| c.0), Some(2));
        drop(leg);
        server.join().expect("server");
        assert!(b.iter().all(|&x| x == 0x11));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Hands completions on at the end of the completing thread's batch, as the block
    /// backend does with its answers to the guest.
    struct DeferringSink;

    static DEFERRED_TX: Mutex<Option<Sender<Completion>>> = Mutex::new(None);

    thread_local! {
        static DEFERRED: RefCell<Vec<Completion>> = const { RefCell::new(Vec::new()) };
    }

    fn pass_deferred() {
        let done = DEFERRED.with(|d| std::mem::take(&mut *d.borrow_mut()));
        if let Some(tx) = DEFERRED_TX.lock().unwrap().as_ref() {
            for c in done {
                let _ = tx.send(c);
            }
        }
    }

    impl CompletionSink for DeferringSink {
        fn complete(&self, tag: Tag, result: Result<(), LegError>) {
            DEFERRED.with(|d| d.borrow_mut().push((tag, result)));
            crate::batch::at_end(pass_deferred);
        }
    }

    /// A reply the reader has finished is handed on before the reader waits for the rest of
    /// the next reply's payload, not when that payload is complete.
    #[test]
    fn finished_replies_do_not_wait_for_a_stalled_payload() {
        let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
        let (addr, dir, server) = fake_server(move |mut f| {
            f.go(1 << 20, 0, None);
            let (r1, r2) = (f.read_req(), f.read_req());
            // An error for the first read and the start of the second's payload, together.
            let mut burst = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            burst.extend_from_slice(&5u32.to_be_bytes());
            burst.extend_from_slice(&r1.handle.to_be_bytes());
            burst.extend_from_slice(&proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
            burst.extend_from_slice(&0u32.to_be_bytes());
            burst.extend_from_slice(&r2.handle.to_be_bytes());
            burst.extend_from_slice(&[0xab; 100]);
            f.0.write_all(&burst).unwrap();
            let _ = go_rx.recv_timeout(Duration::from_secs(10));
            f.0.write_all(&[0xab; 4096 - 100]).unwrap();
            let mut rest = Vec::new();
            let _ = f.0.read_to_end(&mut rest);
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        *DEFERRED_TX.lock().unwrap() = Some(tx);
        let uri = format!("nbd+unix:///?socket={}", dir.join("fake.sock").display());
        let leg = NbdLeg::connect(
            uri,
            &addr,
            "",
            &OpenOptions::default(),
            Arc::new(DeferringSink),
        )
        .expect("connect");
        let (mut b1, mut b2) = (vec![0u8; 4096], vec![0u8; 4096]);
        crate::batch::run(|| {
            submit(&leg, 1, read(0, bufs(&mut b1, &[])));
            submit(&leg, 2, read(4096, bufs(&mut b2, &[])));
        });
        let first = rx.recv_timeout(Duration::from_secs(3));
        go_tx.send(()).unwrap();
        assert_eq!(
            first.ok(),
            Some((1, Err(LegError::Io(libc::EIO)))),
            "the failed read waited for the other read's payload"
        );
        assert_eq!(one(&rx, 2), Ok(()));
        assert!(b2.iter().all(|&x| x == 0xab));
        drop(leg);
        server.join().expect("server");
        *DEFERRED_TX.lock().unwrap() = None;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_reply_magic_loses_the_leg() {
        let (addr, dir, server) = fake_server(|mut f| {
            f.go(1 << 20, 0, None);
            let r = f.read_req();
            let mut bad = 0x668e_33efu32.to_be_bytes().to_vec(); // a structured reply
            bad.extend_from_slice(&[0; 4]);
            bad.extend_from_slice(&r.handle.to_be_bytes());
            f.0.write_all(&bad).unwrap();
            let mut sink = Vec::new();
            let _ = f.0.read_to_end(&mut sink);
        });
        let (leg, rx) = open(&addr);
        let mut b = vec![0u8; 512];
        submit(&leg, 1, read(0, bufs(&mut b, &[])));
        submit(&leg, 2, read(0, bufs(&mut b, &[])));
        let done = collect(&rx, 2, Duration::from_secs(5));
        for r in done.values() {
            let why = lost_reason(r);
            assert!(why.contains("bad reply magic 0x668e33ef"), "{why}");
        }
        assert!(!leg.is_alive());
        drop(leg);
        server.join().expect("server");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn truncated_read_payload_loses_the_leg() {
        let (addr, dir, server) = fake_server(|mut f| {
            f.go(1 << 20, 0, None);
            let r = f.read_req();
            f.reply(0, r.handle, &vec![0x77; r.len as usize / 2]);
        });
        let (leg, rx) = open(&addr);
        let mut b = vec![0u8; 8192];
        submit(&leg, 1, read(0, bufs(&mut b, &[3000])));
        let why = lost_reason(&one(&rx, 1));
        assert!(why.contains("middle of a read payload"), "{why}");
        drop(leg);
        server.join().expect("server");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn export_name_fallback_error_mapping_and_disconnect() {
        let (addr, dir, server) = fake_server(|mut f| {
            f.greet();
            let (opt, _) = f.read_option();
            assert_eq!(opt, proto::OPT_GO);
            f.reply_option(proto::OPT_GO, proto::REP_ERR_UNSUP, b"no GO here");
            let (opt, name) = f.read_option();
            assert_eq!(opt, proto::OPT_EXPORT_NAME);
            assert_eq!(name, b"");
            // Size and flags, no zero padding (NO_ZEROES was agreed).
            let mut r = (1u64 << 20).to_be_bytes().to_vec();
            let flags = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH | proto::FLAG_SEND_FUA;
            r.extend_from_slice(&flags.to_be_bytes());
            f.0.write_all(&r).unwrap();

            let w = f.read_req();
            assert_eq!((w.cmd, w.flags), (proto::CMD_WRITE, proto::CMD_FLAG_FUA));
            f.payload(w.len);
            f.reply(28, w.handle, &[]);
            let r1 = f.read_req();
            f.reply(1234, r1.handle, &[]); // unknown error value, no payload
            let r2 = f.read_req();
            f.reply(0, r2.handle, &pattern(4, r2.offset, r2.len as usize));
            f.expect_disc();
        });
        let (leg, rx) = open(&addr);
        assert_eq!(leg.info().capacity, 1 << 20);
        assert!(leg.info().fua && leg.info().flush && !leg.info().discard);
        let mut b = vec![0u8; 4096];
        submit(&leg, 1, write(0, bufs(&mut b, &[]), true));
        assert_eq!(one(&rx, 1), Err(LegError::Io(libc::ENOSPC)));
        submit(&leg, 2, read(0, bufs(&mut b, &[])));
        assert_eq!(one(&rx, 2), Err(LegError::Io(libc::EIO)));
        submit(&leg, 3, read(8192, bufs(&mut b, &[7, 9])));
        assert_eq!(one(&rx, 3), Ok(()));
        assert!(
            b == pattern(4, 8192, 4096),
            "stream stayed in sync after errors"
        );
        submit(
            &leg,
            4,
            LegOp::Discard {
                offset: 0,
                len: 512,
            },
        );
        assert_eq!(one(&rx, 4), Err(LegError::Unsupported));
        assert!(leg.is_alive());
        drop(leg);
        server.join().expect("server saw NBD_CMD_DISC");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn fua_without_server_support_flushes_after_the_write_reply() {
        let events = Arc::new(Mutex::new(Vec::<&'static str>::new()));
        let ev = Arc::clone(&events);
        let (addr, dir, server) = fake_server(move |mut f| {
            f.go(1 << 20, proto::FLAG_SEND_FLUSH, None);
            let w = f.read_req();
            assert_eq!((w.cmd, w.flags), (proto::CMD_WRITE, 0));
            f.payload(w.len);
            thread::sleep(Duration::from_millis(150));
            f.0.set_nonblocking(true).unwrap();
            let mut probe = [0u8; 1];
            let early = f.0.read(&mut probe);
            assert!(
                matches!(&early, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
                "flush sent before the write was acknowledged: {early:?}"
            );
            f.0.set_nonblocking(false).unwrap();
            ev.lock().unwrap().push("write replied");
            f.reply(0, w.handle, &[]);
            let fl = f.read_req();
            assert_eq!(fl.cmd, proto::CMD_FLUSH);
            thread::sleep(Duration::from_millis(100));
            ev.lock().unwrap().push("flush replied");
            f.reply(0, fl.handle, &[]);
            f.expect_disc();
        });
        let (leg, rx) = open(&addr);
        assert!(!leg.info().fua && leg.info().flush);
        let mut b = vec![3u8; 4096];
        submit(&leg, 1, write(0, bufs(&mut b, &[]), true));
        assert_eq!(one(&rx, 1), Ok(()));
        assert_eq!(*events.lock().unwrap(), ["write replied", "flush replied"]);
        assert_quiet(&rx, Duration::from_millis(50));
        drop(leg);
        server.join().expect("server");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn requests_are_split_at_the_server_maximum() {
        const MAX: u32 = 64 << 10;
        let (addr, dir, server) = fake_server(|mut f| {
            f.go(1 << 20, proto::FLAG_SEND_FLUSH, Some((512, 4096, MAX)));
            // A 256 KiB read: four pieces, answered in reverse order.
            let reqs: Vec<Req> = (0..4).map(|_| f.read_req()).collect();
            for (i, r) in reqs.iter().enumerate() {
                assert_eq!(
                    (r.cmd, r.offset, r.len),
                    (proto::CMD_READ, i as u64 * 65536, MAX)
                );
            }
            for r in reqs.iter().rev() {
                f.reply(0, r.handle, &pattern(8, r.offset, r.len as usize));
            }
            // A 200 KiB write: 64+64+64+8 KiB; the third piece fails.
            let mut got = Vec::new();
            for i in 0..4u64 {
                let r = f.read_req();
                assert_eq!((r.cmd, r.offset), (proto::CMD_WRITE, 65536 + i * 65536));
                got.extend(f.payload(r.len));
                f.reply(if i == 2 { 5 } else { 0 }, r.handle, &[]);
            }
            assert_eq!(got, pattern(9, 65536, 200 << 10));
            f.expect_disc();
        });
        let (leg, rx) = open(&addr);
        assert_eq!(leg.info().block_size, 4096);
        let mut r = vec![0u8; 256 << 10];
        submit(&leg, 1, read(0, bufs(&mut r, &[1000, 70000, 3])));
        assert_eq!(one(&rx, 1), Ok(()));
        assert!(r == pattern(8, 0, 256 << 10));
        let mut w = pattern(9, 65536, 200 << 10);
        submit(&leg, 2, write(65536, bufs(&mut w, &[100_000]), false));
        assert_eq!(one(&rx, 2), Err(LegError::Io(libc::EIO)));
        assert_quiet(&rx, Duration::from_millis(100));
        drop(leg);
        server.join().expect("server");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn early_write_reply_waits_until_the_payload_is_sent() {
        let (addr, dir, server) = fake_server(|mut f| {
            f.go(64 << 20, 0, None);
            let w = f.read_req();
            // Acknowledge before taking the payload, which a sane server never does.
            f.reply(0, w.handle, &[]);
            thread::sleep(Duration::from_millis(100));
            assert_eq!(f.payload(w.len), pattern(6, 0, 8 * MIB));
            f.expect_disc();
        });
        let (leg, rx) = open(&addr);
        let mut w = pattern(6, 0, 8 * MIB);
        submit(&leg, 1, write(0, bufs(&mut w, &[MIB]), false));
        assert_eq!(one(&rx, 1), Ok(()));
        drop(leg);
        server.join().expect("server");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Runs one scripted server that writes `bytes` and hangs up, and returns the open error.
    fn handshake_against(bytes: Vec<u8>, timeout: Duration) -> OpenError {
        let (addr, dir, server) = fake_server(move |mut f| {
            let _ = f.0.write_all(&bytes);
            let _ = f.0.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = f.0.read_to_end(&mut sink);
        });
        let opts = OpenOptions {
            connect_timeout: timeout,
            read_only: false,
        };
        let err = match open_with(&addr, &opts) {
            Ok(_) => panic!("handshake unexpectedly succeeded"),
            Err(e) => e,
        };
        server.join().expect("server");
        let _ = std::fs::remove_dir_all(dir);
        err
    }

    fn greeting(hflags: u16) -> Vec<u8> {
        let mut g = proto::NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&hflags.to_be_bytes());
        g
    }

    fn opt_reply(opt: u32, rtype: u32, data: &[u8]) -> Vec<u8> {
        let mut r = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&opt.to_be_bytes());
        r.extend_from_slice(&rtype.to_be_bytes());
        r.extend_from_slice(&(data.len() as u32).to_be_bytes());
        r.extend_from_slice(data);
        r
    }

    fn handshake_reason(bytes: Vec<u8>) -> String {
        match handshake_against(bytes, Duration::from_secs(5)) {
            OpenError::Handshake { uri, reason } => {
                assert!(uri.starts_with("nbd+unix:///?socket="), "{uri}");
                reason
            }
            other => panic!("expected a handshake error, got {other}"),
        }
    }

    #[test]
    fn hostile_handshakes_fail_with_a_reason() {
        let both = proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
                "not an NBD server",
            ),
            (Vec::new(), "closed the connection"),
            (greeting(0), "fixed-newstyle"),
            (
                [
                    &proto::NBDMAGIC.to_be_bytes()[..],
                    &proto::CLISERV_MAGIC.to_be_bytes(),
                ]
                .concat(),
                "old-style",
            ),
            (
                [
                    greeting(both),
                    opt_reply(proto::OPT_GO, proto::REP_ACK, &[]),
                ]
                .concat(),
                "without describing the export",
            ),
            (
                [
                    greeting(both),
                    opt_reply(proto::OPT_GO, proto::REP_FLAG_ERROR | 2, b"go\naway"),
                ]
                .concat(),
                "NBD_REP_ERR_POLICY: go away",
            ),
            (
                [
                    greeting(both),
                    opt_reply(proto::OPT_GO, proto::REP_FLAG_ERROR | 77, &[]),
                ]
                .concat(),
                "unknown error 0x8000004d",
            ),
            (
                [
                    greeting(both),
                    opt_reply(proto::OPT_EXPORT_NAME, proto::REP_ACK, &[]),
                ]
                .concat(),
                "expected NBD_OPT_GO",
            ),
            (
                [
                    greeting(both),
                    opt_reply(proto::OPT_GO, proto::REP_INFO, &[0, 0, 1]),
                ]
                .concat(),
                "NBD_INFO_EXPORT of 3 bytes",
            ),
            (
                {
                    // Claims a 4 GiB reply: refused without reading or allocating it.
                    let mut r = opt_reply(proto::OPT_GO, proto::REP_INFO, &[]);
                    let n = r.len();
                    r[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
                    [greeting(both), r].concat()
                },
                "too long",
            ),
            (
                // GO unsupported, then the server drops the connection on EXPORT_NAME.
                [
                    greeting(both),
                    opt_reply(proto::OPT_GO, proto::REP_ERR_UNSUP, &[]),
                ]
                .concat(),
                "no export ''",
            ),
        ];
        for (bytes, want) in cases {
            let reason = handshake_reason(bytes);
            assert!(reason.contains(want), "reason '{reason}' lacks '{want}'");
        }
    }

    #[test]
    fn silent_server_times_out_the_handshake() {
        let (addr, dir, server) = fake_server(|mut f| {
            let mut sink = Vec::new();
            let _ = f.0.read_to_end(&mut sink);
        });
        let opts = OpenOptions {
            connect_timeout: Duration::from_millis(300),
            read_only: false,
        };
        let t0 = Instant::now();
        let err = open_with(&addr, &opts).err().expect("must time out");
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert!(err.to_string().contains("did not answer"), "{err}");
        server.join().expect("server");
        let _ = std::fs::remove_dir_all(dir);
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
        fn bytes_upto(&mut self, max: u64) -> Vec<u8> {
            let n = self.below(max) as usize;
            self.bytes(n)
        }
    }

    /// A plausible but random handshake, sometimes complete, followed by random garbage.
    fn random_handshake(rng: &mut XorShift) -> Vec<u8> {
        let mut out = match rng.below(4) {
            0 => return rng.bytes_upto(64),
            1 => return random_session(rng),
            _ => greeting(rng.below(4) as u16),
        };
        for _ in 0..rng.below(6) {
            let (rtype, data) = match rng.below(6) {
                0 => {
                    let mut d = vec![0, 0];
                    d.extend(rng.bytes(10));
                    (proto::REP_INFO, d)
                }
                1 => {
                    let mut d = vec![0, 3];
                    d.extend(rng.bytes(12));
                    (proto::REP_INFO, d)
                }
                2 => (proto::REP_INFO, rng.bytes_upto(20)),
                3 => (rng.next() as u32, rng.bytes_upto(20)),
                4 => (proto::REP_ACK, Vec::new()),
                _ => (proto::REP_FLAG_ERROR | rng.below(12) as u32, rng.bytes(8)),
            };
            out.extend(opt_reply(proto::OPT_GO, rtype, &data));
        }
        if rng.below(2) == 0 {
            let cut = rng.below(out.len() as u64 + 1) as usize;
            out.truncate(cut);
        }
        let n = rng.below(64) as usize;
        out.extend(rng.bytes(n));
        out
    }

    /// A complete handshake with random size, flags and block sizes, then random replies.
    fn random_session(rng: &mut XorShift) -> Vec<u8> {
        let mut out = greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
        let size = match rng.below(3) {
            0 => rng.next(),
            1 => rng.below(1 << 16),
            _ => 1 << 20,
        };
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&(rng.next() as u16).to_be_bytes());
        out.extend(opt_reply(proto::OPT_GO, proto::REP_INFO, &info));
        if rng.below(2) == 0 {
            let mut b = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for _ in 0..3 {
                let v = match rng.below(3) {
                    0 => rng.next() as u32,
                    1 => 1 << rng.below(32),
                    _ => 0,
                };
                b.extend_from_slice(&v.to_be_bytes());
            }
            out.extend(opt_reply(proto::OPT_GO, proto::REP_INFO, &b));
        }
        out.extend(opt_reply(proto::OPT_GO, proto::REP_ACK, &[]));
        for _ in 0..rng.below(6) {
            if rng.below(4) == 0 {
                out.extend(rng.bytes_upto(40));
                continue;
            }
            out.extend(proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
            let err = if rng.below(2) == 0 {
                0
            } else {
                rng.next() as u32
            };
            out.extend(err.to_be_bytes());
            out.extend((1 + rng.below(4)).to_be_bytes());
            out.extend(rng.bytes_upto(5000));
        }
        out
    }

    #[test]
    fn random_server_bytes_never_panic() {
        let dir = scratch_dir();
        let path = dir.join("fuzz.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        const ROUNDS: usize = 300;
        let streams: Vec<Vec<u8>> = (0..ROUNDS).map(|_| random_handshake(&mut rng)).collect();
        let server = thread::spawn(move || {
            for bytes in streams {
                let (mut s, _) = listener.accept().expect("accept");
                let _ = s.write_all(&bytes);
                // Hanging up ends the client's handshake or transmission with EOF; the client's
                // own bytes are consumed first so it never fails merely on sending them.
                let _ = s.shutdown(std::net::Shutdown::Write);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
        });
        let opts = OpenOptions {
            connect_timeout: Duration::from_millis(500),
            read_only: false,
        };
        let mut connected = 0;
        for _ in 0..ROUNDS {
            match open_with(&NbdAddress::Unix(path.clone()), &opts) {
                Err(e) => assert!(e.to_string().contains("fuzz.sock"), "{e}"),
                Ok((leg, rx)) => {
                    connected += 1;
                    let mut b = vec![0u8; 4096];
                    submit(&leg, 1, read(0, bufs(&mut b, &[])));
                    submit(&leg, 2, write(0, bufs(&mut b, &[]), true));
                    submit(&leg, 3, LegOp::Flush);
                    collect(&rx, 3, Duration::from_secs(5));
                    drop(leg);
                    assert_quiet(&rx, Duration::from_millis(10));
                }
            }
        }
        server.join().expect("server");
        let _ = std::fs::remove_dir_all(dir);
        eprintln!("{connected} of {ROUNDS} random servers got through the handshake");
    }

    // ---- pure helpers --------------------------------------------------------------------------

    #[test]
    fn helpers() {
        assert_eq!(nbd_errno(5), libc::EIO);
        assert_eq!(nbd_errno(28), libc::ENOSPC);
        assert_eq!(nbd_errno(108), libc::ESHUTDOWN);
        assert_eq!(nbd_errno(95), libc::ENOTSUP);
        assert_eq!(nbd_errno(999), libc::EIO);
        assert_eq!(preferred_block_size(1), 512);
        assert_eq!(preferred_block_size(4096), 4096);
        assert_eq!(preferred_block_size(3000), 2048);
        assert_eq!(preferred_block_size(1 << 20), 4096);
        assert_eq!(payload_limit(None, 512), 32 << 20);
        assert_eq!(payload_limit(Some(u32::MAX), 4096), 32 << 20);
        assert_eq!(payload_limit(Some(0), 4096), 4096);
        assert_eq!(payload_limit(Some(65536 + 100), 4096), 65536);
        let h = request_header(1, 6, 0x0102, 0x0304, 0x0506);
        assert_eq!(&h[..8], &[0x25, 0x60, 0x95, 0x13, 0, 1, 0, 6]);
        assert_eq!(be_u64(&h[8..]), 0x0102);
        assert_eq!(be_u64(&h[16..]), 0x0304);
        assert_eq!(be_u32(&h[24..]), 0x0506);

        let mut mem = vec![0u8; 100];
        let b = bufs(&mut mem, &[10, 30, 60]);
        let mut c = BufCursor::default();
        let sizes: Vec<Vec<usize>> = [25, 25, 50]
            .iter()
            .map(|&n| c.take(&b, n).iovecs().iter().map(|v| v.len()).collect())
            .collect();
        assert_eq!(sizes, vec![vec![10, 15], vec![15, 10], vec![50]]);

        let mut iov = [
            libc::iovec {
                iov_base: mem.as_mut_ptr().cast(),
                iov_len: 10,
            },
            libc::iovec {
                iov_base: mem.as_mut_ptr().cast(),
                iov_len: 5,
            },
        ];
        let mut start = 0;
        advance(&mut iov, &mut start, 12);
        assert_eq!((start, iov[1].iov_len), (1, 3));
        advance(&mut iov, &mut start, 3);
        assert_eq!(start, 2);
    }

    // ---- reaper ---------------------------------------------------------------------------

    type Reaped = (Tag, Result<(), LegError>, thread::ThreadId);

    /// Records the thread every completion runs on.
    struct ThreadSink(Sender<Reaped>);

    impl CompletionSink for ThreadSink {
        fn complete(&self, tag: Tag, result: Result<(), LegError>) {
            let _ = self.0.send((tag, result, thread::current().id()));
        }
    }

    fn open_reaped(address: &NbdAddress) -> (NbdLeg, Receiver<Reaped>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let NbdAddress::Unix(p) = address else {
            panic!("unix sockets only")
        };
        let uri = format!("nbd+unix:///?socket={}", p.display());
        let leg = NbdLeg::connect(
            uri,
            address,
            "",
            &OpenOptions::default(),
            Arc::new(ThreadSink(tx)),
        )
        .expect("connect");
        (leg, rx)
    }

    /// Drives `reaper` as a worker's event loop would (poll when its fd is readable) until `n`
    /// completions have arrived; fails on a duplicate tag or after 10 s.
    fn reap(reaper: &Reaper, rx: &Receiver<Reaped>, n: usize) -> HashMap<Tag, Reaped> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = HashMap::new();
        while out.len() < n {
            reaper.poll();
            while let Ok(c) = rx.try_recv() {
                assert!(out.insert(c.0, c.clone()).is_none(), "tag {} twice", c.0);
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} completions arrived",
                out.len()
            );
            crate::readable(reaper.fd(), 20);
        }
        out
    }

    /// A thread that submits inside its reaper reads the leg's replies itself: every
    /// completion runs on it, including a payload far larger than the socket's buffer, which
    /// arrives over many polls.
    #[test]
    fn a_reaper_reads_the_replies_on_its_own_thread() {
        let k = Nbdkit::unix(&["memory", "size=64M"]);
        let (leg, rx) = open_reaped(&k.address);
        let reaper = Reaper::new().expect("reaper");
        let me = thread::current().id();
        let mut small: Vec<Vec<u8>> = (0..64).map(|i| pattern(i, i * 4096, 4096)).collect();
        let mut big = pattern(99, 1 << 20, 8 * MIB);
        reaper.enter(|| {
            crate::batch::run(|| {
                for (i, b) in small.iter_mut().enumerate() {
                    submit(
                        &leg,
                        i as Tag,
                        write(i as u64 * 4096, bufs(b, &[4096]), false),
                    );
                }
                submit(&leg, 64, write(1 << 20, bufs(&mut big, &[MIB; 8]), false));
            })
        });
        assert_eq!(reaper.adopted(), 1, "the reaper did not adopt the leg");
        for (tag, (_, res, on)) in reap(&reaper, &rx, 65) {
            assert!(res.is_ok(), "write {tag}: {res:?}");
            assert_eq!(on, me, "write {tag} completed on another thread");
        }
        let mut back: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; 4096]).collect();
        let mut big_back = vec![0u8; 8 * MIB];
        reaper.enter(|| {
            crate::batch::run(|| {
                for (i, b) in back.iter_mut().enumerate() {
                    submit(&leg, i as Tag, read(i as u64 * 4096, bufs(b, &[4096])));
                }
                submit(
                    &leg,
                    64,
                    read(1 << 20, bufs(&mut big_back, &[3 * MIB, 5 * MIB])),
                );
            })
        });
        for (tag, (_, res, on)) in reap(&reaper, &rx, 65) {
            assert!(res.is_ok(), "read {tag}: {res:?}");
            assert_eq!(on, me, "read {tag} completed on another thread");
        }
        assert!(back == small, "small reads differ from what was written");
        assert!(
            big_back == big,
            "the 8 MiB read differs from what was written"
        );
    }

    /// A server that dies while a reaper reads its leg: the reaper finds the end of the
    /// connection and gives the leg back; the reader thread fails every request exactly once,
    /// and the reaper forgets the leg.
    #[test]
    fn a_server_that_dies_under_a_reaper_fails_everything_once() {
        let mut k = Nbdkit::unix(&["memory", "size=64M"]);
        let (leg, rx) = open_reaped(&k.address);
        let reaper = Reaper::new().expect("reaper");
        k.signal(libc::SIGSTOP);
        let _data = writes_under(&reaper, &leg, 32);
        assert_eq!(reaper.adopted(), 1);
        k.kill9();
        for (tag, (_, res, _)) in reap(&reaper, &rx, 32) {
            let why = lost_reason(&res);
            assert!(why.contains("by server"), "write {tag}: {why}");
        }
        assert_quiet_reaped(&reaper, &rx);
        assert_eq!(reaper.adopted(), 0, "the reaper still holds a dead leg");
        assert!(!leg.is_alive());
    }

    /// Submits `n` 4 KiB writes to `leg` inside `reaper`, as one batch; returns their buffers,
    /// which must outlive the requests.
    fn writes_under(reaper: &Reaper, leg: &NbdLeg, n: u64) -> Vec<Vec<u8>> {
        let mut data: Vec<Vec<u8>> = (0..n).map(|i| pattern(i, 0, 4096)).collect();
        reaper.enter(|| {
            crate::batch::run(|| {
                for (i, b) in data.iter_mut().enumerate() {
                    let op = write(i as u64 * 4096, bufs(b, &[4096]), false);
                    submit(leg, i as Tag, op);
                }
            })
        });
        data
    }

    fn assert_quiet_reaped(reaper: &Reaper, rx: &Receiver<Reaped>) {
        for _ in 0..10 {
            reaper.poll();
            thread::sleep(Duration::from_millis(10));
        }
        if let Ok(c) = rx.try_recv() {
            panic!("unexpected extra completion {c:?}");
        }
    }

    /// An abort while a reaper reads the leg and its server is paused: the reader thread takes
    /// the leg back by itself (the reaper's thread need not do anything) and fails each
    /// request once.
    #[test]
    fn an_abort_takes_the_leg_back_from_its_reaper() {
        let k = Nbdkit::unix(&["memory", "size=64M"]);
        let (leg, rx) = open_reaped(&k.address);
        let reaper = Reaper::new().expect("reaper");
        k.signal(libc::SIGSTOP);
        let _data = writes_under(&reaper, &leg, 8);
        assert_eq!(reaper.adopted(), 1);
        leg.abort("test abort");
        let me = thread::current().id();
        let mut seen = HashMap::new();
        while seen.len() < 8 {
            let (tag, res, on) = rx
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("only {} of 8 requests failed", seen.len()));
            assert!(matches!(res, Err(LegError::Aborted(_))), "{tag}: {res:?}");
            assert_ne!(on, me, "the abort needed the reaper's thread");
            assert!(seen.insert(tag, ()).is_none(), "tag {tag} twice");
        }
        reaper.poll();
        assert_eq!(reaper.adopted(), 0, "the reaper still holds an aborted leg");
        k.signal(libc::SIGCONT);
        assert!(
            leg.wait_quiet(Duration::from_secs(5)),
            "the old connection never closed"
        );
    }

    /// A server that breaks the protocol while a reaper reads its leg: the reaper kills the
    /// leg itself before handing it back (nothing more is sent to it meanwhile), the request
    /// fails with the reason, later ones fail at once, and the reaper forgets the leg.
    #[test]
    fn a_protocol_violation_under_a_reaper_kills_the_leg() {
        let (addr, dir, server) = fake_server(|mut f| {
            f.go(1 << 20, proto::FLAG_SEND_FLUSH, None);
            let r = f.read_req();
            assert_eq!(r.cmd, proto::CMD_READ);
            f.reply(0, 0xdead_beef, &[]);
            let mut sink = Vec::new();
            let _ = f.0.read_to_end(&mut sink);
        });
        let (leg, rx) = open_reaped(&addr);
        let reaper = Reaper::new().expect("reaper");
        let mut b = vec![0x11u8; 4096];
        reaper.enter(|| submit(&leg, 1, read(0, bufs(&mut b, &[]))));
        assert_eq!(reaper.adopted(), 1);
        let done = reap(&reaper, &rx, 1);
        let why = lost_reason(&done[&1].1);
        assert!(why.contains("unknown handle 0x00000000deadbeef"), "{why}");
        assert!(!leg.is_alive());
        submit(&leg, 2, LegOp::Flush);
        let (tag, res, _) = rx.recv_timeout(Duration::from_secs(1)).expect("flush");
        assert_eq!(tag, 2);
        assert!(res.is_err(), "{res:?}");
        reaper.poll();
        assert_eq!(reaper.adopted(), 0, "the reaper still holds a broken leg");
        drop(leg);
        server.join().expect("server");
        assert!(
            b.iter().all(|&x| x == 0x11),
            "a broken reply wrote the read buffer"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Closing a reaper gives its legs back: their replies are read by the reader thread
    /// again, and a closed reaper adopts nothing. A leg has one reaper at most.
    #[test]
    fn closing_a_reaper_gives_its_legs_back() {
        let k = Nbdkit::unix(&["memory", "size=64M"]);
        let (leg, rx) = open_reaped(&k.address);
        let first = Reaper::new().expect("reaper");
        let second = Reaper::new().expect("reaper");
        let me = thread::current().id();
        let mut b = pattern(1, 0, 4096);
        first.enter(|| submit(&leg, 1, write(0, bufs(&mut b, &[4096]), false)));
        second.enter(|| submit(&leg, 2, write(0, bufs(&mut b, &[4096]), false)));
        assert_eq!((first.adopted(), second.adopted()), (1, 0));
        let done = reap(&first, &rx, 2);
        assert!(done.values().all(|(_, r, on)| r.is_ok() && *on == me));
        first.close();
        assert_eq!(first.adopted(), 0);
        first.enter(|| submit(&leg, 3, write(0, bufs(&mut b, &[4096]), false)));
        assert_eq!(first.adopted(), 0, "a closed reaper adopted a leg");
        let (tag, res, on) = rx.recv_timeout(Duration::from_secs(5)).expect("completion");
        assert_eq!(tag, 3);
        assert!(res.is_ok(), "{res:?}");
        assert_ne!(on, me, "the reader thread did not take the replies back");
        // Given back, the leg can be adopted again by another reaper.
        second.enter(|| submit(&leg, 4, write(0, bufs(&mut b, &[4096]), false)));
        assert_eq!(second.adopted(), 1);
        let done = reap(&second, &rx, 1);
        assert!(done.values().all(|(_, r, on)| r.is_ok() && *on == me));
    }
}
