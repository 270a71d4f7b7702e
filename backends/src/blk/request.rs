//! Turning a virtio-blk descriptor chain into a checked request.
//!
//! Nothing a driver puts in a chain may crash the backend: every address is checked against guest
//! memory, every length against the device, and every failure names what was wrong so the request
//! can be answered with IOERR or UNSUPP.

use smallvec::SmallVec;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, Le32,
    Le64, VolatileMemory,
};

/// Bytes in a virtio-blk sector, whatever the device's block size.
pub const SECTOR_SIZE: u64 = 512;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Segments we accept in one discard or write-zeroes request (advertised in the config space).
pub const MAX_DISCARD_SEGMENTS: u32 = 1;
/// Descriptors we accept in one chain beyond header and status (advertised as `seg_max`).
pub const MAX_DATA_SEGMENTS: usize = 126;

/// `struct virtio_blk_outhdr`.
#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
pub struct RequestHeader {
    pub type_: Le32,
    pub ioprio: Le32,
    pub sector: Le64,
}
// SAFETY: plain little-endian integers with no padding; every bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// `struct virtio_blk_discard_write_zeroes`.
#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
pub struct DiscardSegment {
    pub sector: Le64,
    pub num_sectors: Le32,
    pub flags: Le32,
}
// SAFETY: plain little-endian integers with no padding; every bit pattern is valid.
unsafe impl ByteValued for DiscardSegment {}

/// What the request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes { unmap: bool },
}

/// One data segment in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A parsed, checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Bytes the request covers on disk (data length for IN/OUT, range for discard/zeroes).
    pub len: u64,
    /// Payload buffers (IN, OUT, GET_ID).
    pub data: SmallVec<[Segment; 8]>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Bytes the device writes into the driver's buffers, as reported in the used ring.
    pub fn used_len(&self) -> u32 {
        let data = match self.kind {
            RequestKind::In => self.len as u32,
            RequestKind::GetId => self
                .data
                .iter()
                .map(|s| s.len)
                .sum::<u32>()
                .min(VIRTIO_BLK_ID_BYTES),
            _ => 0,
        };
        data + 1
    }
}

/// Why a chain was refused. `status` is where the answer can still be written, if anywhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ParseError {
    pub reason: Reason,
    pub status: Option<GuestAddress>,
}

/// What was wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("empty descriptor chain")]
    Empty,
    #[error("last descriptor is not a device-writable status byte")]
    NoStatus,
    #[error("descriptor {addr:#x}+{len} lies outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("header shorter than 16 bytes or not device-readable")]
    ShortHeader,
    #[error("more than {MAX_DATA_SEGMENTS} data descriptors")]
    TooManySegments,
    #[error("request type {0} not supported")]
    Unsupported(u32),
    #[error("data buffer has the wrong direction for a {0} request")]
    WrongDirection(&'static str),
    #[error("length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sectors {first}..{end} lie past the end of the disk ({capacity_sectors} sectors)")]
    PastEnd {
        first: u64,
        end: u64,
        capacity_sectors: u64,
    },
    #[error(
        "discard/write-zeroes payload of {0} bytes is not 1..={MAX_DISCARD_SEGMENTS} segments"
    )]
    BadSegments(u64),
    #[error("unknown discard/write-zeroes flags {0:#x}")]
    BadFlags(u32),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("request type disabled: {0}")]
    Disabled(&'static str),
}

impl ParseError {
    /// UNSUPP for requests the device does not do, IOERR for everything malformed.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self.reason,
            Reason::Unsupported(_) | Reason::BadFlags(_) | Reason::Disabled(_)
        )
    }
}

/// What the device allows, for checking requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub capacity: u64,
    pub read_only: bool,
    pub flush: bool,
    pub discard: bool,
    pub write_zeroes: bool,
}

/// Reads `buf.len()` bytes of a request header from `addr`. The usual framing, the whole
/// header in one descriptor, is one 16-byte volatile load: `read_slice` costs a region lookup
/// and a `memcpy` call for 16 bytes, 6 % of the vring thread on null legs. The load must not
/// assume alignment: libblkio packs its request structs at odd addresses.
fn read_header_part<M: GuestMemory + GuestMemoryBackend>(
    mem: &M,
    buf: &mut [u8],
    addr: GuestAddress,
) -> Result<(), vm_memory::GuestMemoryError> {
    if buf.len() == std::mem::size_of::<RequestHeader>() {
        if let Ok(v) = mem.get_slice(addr, buf.len()) {
            if let Ok(h) = v.get_ref::<RequestHeader>(0) {
                buf.copy_from_slice(h.load().as_slice());
                return Ok(());
            }
        }
    }
    mem.read_slice(buf, addr)
}

/// Whether the `len` bytes at `addr` are guest memory. A buffer almost always lies in one
/// region: one lookup and a comparison, where `check_range` builds a slice per region it
/// crosses (a tenth of the vring thread's instructions on null legs, three descriptors a
/// request).
pub fn in_guest_memory<M: GuestMemory + GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    len: u32,
) -> bool {
    if let (Some(r), Some(last)) = (
        mem.find_region(addr),
        addr.0.checked_add(u64::from(len).saturating_sub(1)),
    ) {
        if len > 0 && last <= r.last_addr().0 {
            return true;
        }
    }
    GuestMemoryBackend::check_range(mem, addr, len as usize)
}

/// Parses the descriptors of one chain (as produced by iterating a `DescriptorChain`).
#[cfg(test)]
pub fn parse<M: GuestMemory + GuestMemoryBackend>(
    descs: impl IntoIterator<Item = Descriptor>,
    mem: &M,
    limits: &Limits,
) -> Result<Request, ParseError> {
    let all: SmallVec<[Descriptor; 16]> = descs.into_iter().take(MAX_DATA_SEGMENTS + 4).collect();
    parse_chain(&all, mem, limits)
}

/// Parses the descriptors of one chain.
pub fn parse_chain<M: GuestMemory + GuestMemoryBackend>(
    all: &[Descriptor],
    mem: &M,
    limits: &Limits,
) -> Result<Request, ParseError> {
    if all.len() > MAX_DATA_SEGMENTS + 3 {
        return Err(ParseError {
            reason: Reason::TooManySegments,
            status: None,
        });
    }
    let Some(last) = all.last().copied() else {
        return Err(ParseError {
            reason: Reason::Empty,
            status: None,
        });
    };
    let in_memory = |d: &Descriptor| in_guest_memory(mem, d.addr(), d.len());
    // The status byte first: wherever else the chain is wrong, a driver that gets its chain back
    // must read IOERR there, not whatever the byte held before (often 0, "OK").
    let status = (in_memory(&last) && last.is_write_only() && last.len() > 0)
        .then(|| GuestAddress(last.addr().0 + u64::from(last.len()) - 1));
    if let Some(d) = all.iter().find(|d| !in_memory(d)) {
        return Err(ParseError {
            reason: Reason::OutOfMemory {
                addr: d.addr().0,
                len: d.len(),
            },
            status,
        });
    }
    let Some(status) = status else {
        return Err(ParseError {
            reason: Reason::NoStatus,
            status: None,
        });
    };
    let fail = |reason| ParseError {
        reason,
        status: Some(status),
    };

    // Drivers may split the header across descriptors or share one descriptor between header and
    // data; carve the stream of bytes rather than trusting the framing. The status byte is the
    // last byte of the last descriptor.
    let n = all.len();
    let seg_len = |i: usize| all[i].len() - u32::from(i == n - 1);
    let mut header_bytes = [0u8; std::mem::size_of::<RequestHeader>()];
    // Header bytes read so far, and where they stopped: descriptor `idx`, `skip` bytes in.
    let (mut got, mut idx, mut skip) = (0usize, 0usize, 0u32);
    while got < header_bytes.len() {
        let Some(d) = all.get(idx) else {
            return Err(fail(Reason::ShortHeader));
        };
        if d.is_write_only() {
            return Err(fail(Reason::ShortHeader));
        }
        let take = ((seg_len(idx) - skip) as usize).min(header_bytes.len() - got);
        read_header_part(
            mem,
            &mut header_bytes[got..got + take],
            GuestAddress(d.addr().0 + u64::from(skip)),
        )
        .map_err(|_| fail(Reason::ShortHeader))?;
        got += take;
        skip += take as u32;
        if skip == seg_len(idx) {
            idx += 1;
            skip = 0;
        }
    }
    let header = RequestHeader::from_slice(&header_bytes)
        .copied()
        .unwrap_or_default();
    let mut data: SmallVec<[Segment; 8]> = SmallVec::new();
    let (mut data_len, mut all_writable, mut all_readable) = (0u64, true, true);
    for (i, d) in all.iter().enumerate().skip(idx) {
        let off = if i == idx { skip } else { 0 };
        let len = seg_len(i) - off;
        if len == 0 {
            continue;
        }
        if data.len() == MAX_DATA_SEGMENTS {
            return Err(fail(Reason::TooManySegments));
        }
        data.push(Segment {
            addr: GuestAddress(d.addr().0 + u64::from(off)),
            len,
        });
        data_len += u64::from(len);
        all_writable &= d.is_write_only();
        all_readable &= !d.is_write_only();
    }
    let sector = header.sector.to_native();
    let type_ = header.type_.to_native();
    let capacity_sectors = limits.capacity / SECTOR_SIZE;
    let check_range = |first: u64, sectors: u64| {
        let end = first.checked_add(sectors);
        match end {
            Some(end) if end <= capacity_sectors => Ok(()),
            _ => Err(fail(Reason::PastEnd {
                first,
                end: end.unwrap_or(u64::MAX),
                capacity_sectors,
            })),
        }
    };

    let (kind, offset, len, data) = match type_ {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_in = type_ == VIRTIO_BLK_T_IN;
            if is_in && !all_writable {
                return Err(fail(Reason::WrongDirection("read")));
            }
            if !is_in && !all_readable {
                return Err(fail(Reason::WrongDirection("write")));
            }
            if !is_in && limits.read_only {
                return Err(fail(Reason::ReadOnly));
            }
            if !data_len.is_multiple_of(SECTOR_SIZE) {
                return Err(fail(Reason::Unaligned(data_len)));
            }
            check_range(sector, data_len / SECTOR_SIZE)?;
            let kind = if is_in {
                RequestKind::In
            } else {
                RequestKind::Out
            };
            (kind, sector * SECTOR_SIZE, data_len, data)
        }
        VIRTIO_BLK_T_FLUSH => {
            if !limits.flush {
                return Err(fail(Reason::Disabled("flush")));
            }
            (RequestKind::Flush, 0, 0, SmallVec::new())
        }
        VIRTIO_BLK_T_GET_ID => {
            if !all_writable {
                return Err(fail(Reason::WrongDirection("get-id")));
            }
            (RequestKind::GetId, 0, 0, data)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = type_ == VIRTIO_BLK_T_DISCARD;
            if discard && !limits.discard {
                return Err(fail(Reason::Disabled("discard")));
            }
            if !discard && !limits.write_zeroes {
                return Err(fail(Reason::Disabled("write-zeroes")));
            }
            if limits.read_only {
                return Err(fail(Reason::ReadOnly));
            }
            if !all_readable {
                return Err(fail(Reason::WrongDirection("discard/write-zeroes")));
            }
            let seg_size = std::mem::size_of::<DiscardSegment>() as u64;
            if data_len != seg_size * u64::from(MAX_DISCARD_SEGMENTS) {
                return Err(fail(Reason::BadSegments(data_len)));
            }
            let mut raw = [0u8; std::mem::size_of::<DiscardSegment>()];
            let mut got = 0usize;
            for s in &data {
                let take = (s.len as usize).min(raw.len() - got);
                mem.read_slice(&mut raw[got..got + take], s.addr)
                    .map_err(|_| fail(Reason::BadSegments(data_len)))?;
                got += take;
            }
            let seg = DiscardSegment::from_slice(&raw)
                .copied()
                .unwrap_or_default();
            let flags = seg.flags.to_native();
            let known = if discard { 0 } else { WRITE_ZEROES_FLAG_UNMAP };
            if flags & !known != 0 {
                return Err(fail(Reason::BadFlags(flags)));
            }
            let first = seg.sector.to_native();
            let sectors = u64::from(seg.num_sectors.to_native());
            check_range(first, sectors)?;
            let kind = if discard {
                RequestKind::Discard
            } else {
                RequestKind::WriteZeroes {
                    unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            };
            (
                kind,
                first * SECTOR_SIZE,
                sectors * SECTOR_SIZE,
                SmallVec::new(),
            )
        }
        other => return Err(fail(Reason::Unsupported(other))),
    };
    Ok(Request {
        kind,
        offset,
        len,
        data,
        status,
    })
}

#[cfg(test)]
mod tests;
