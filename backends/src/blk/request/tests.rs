//! Chains built in virtio-queue's mock guest memory, well-formed and hostile.

use super::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryMmap;

const MEM_SIZE: u64 = 0x100_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn limits() -> Limits {
    Limits {
        capacity: 1 << 20,
        read_only: false,
        flush: true,
        discard: true,
        write_zeroes: true,
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn header(mem: &GuestMemoryMmap, at: u64, type_: u32, sector: u64) {
    let h = RequestHeader {
        type_: type_.into(),
        ioprio: 0.into(),
        sector: sector.into(),
    };
    mem.write_obj(h, GuestAddress(at)).unwrap();
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
        addr, len, flags, 0,
    ))
}

fn parse_with(
    descs: &[RawDescriptor],
    m: &GuestMemoryMmap,
    l: &Limits,
) -> Result<Request, ParseError> {
    let q = MockSplitQueue::new(m, 256);
    let chain = q.build_desc_chain(descs).unwrap();
    parse(chain, m, l)
}

fn run(type_: u32, sector: u64, descs: &[RawDescriptor]) -> Result<Request, ParseError> {
    let m = mem();
    header(&m, HDR, type_, sector);
    parse_with(descs, &m, &limits())
}

fn reason(r: Result<Request, ParseError>) -> Reason {
    r.expect_err("chain should have been refused").reason
}

#[test]
fn read_request() {
    let r = run(
        VIRTIO_BLK_T_IN,
        8,
        &[d(HDR, 16, 0), d(DATA, 4096, W), d(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(r.kind, RequestKind::In);
    assert_eq!(r.offset, 8 * 512);
    assert_eq!(r.len, 4096);
    assert_eq!(
        r.data.as_slice(),
        &[Segment {
            addr: GuestAddress(DATA),
            len: 4096
        }]
    );
    assert_eq!(r.status, GuestAddress(STATUS));
    assert_eq!(r.used_len(), 4097);
}

/// The header is read with two 8-byte loads when aligned and with a copy when not: both read
/// the same request, and one that ends at the end of guest memory reads too.
#[test]
fn header_at_aligned_unaligned_and_last_addresses() {
    for at in [HDR, HDR + 3, HDR + 8, MEM_SIZE - 16] {
        let m = mem();
        header(&m, at, VIRTIO_BLK_T_IN, 7);
        let r = parse_with(
            &[d(at, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)],
            &m,
            &limits(),
        )
        .unwrap_or_else(|e| panic!("header at {at:#x}: {e}"));
        assert_eq!(r.kind, RequestKind::In, "header at {at:#x}");
        assert_eq!(r.offset, 7 * 512, "header at {at:#x}");
    }
}

#[test]
fn write_with_header_and_data_in_one_descriptor() {
    let r = run(
        VIRTIO_BLK_T_OUT,
        0,
        &[d(HDR, 16 + 1024, 0), d(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(r.kind, RequestKind::Out);
    assert_eq!(r.len, 1024);
    assert_eq!(
        r.data[0],
        Segment {
            addr: GuestAddress(HDR + 16),
            len: 1024
        }
    );
    assert_eq!(r.used_len(), 1);
}

#[test]
fn header_split_over_descriptors_and_status_sharing_data() {
    let r = run(
        VIRTIO_BLK_T_IN,
        2,
        &[d(HDR, 8, 0), d(HDR + 8, 8, 0), d(DATA, 512 + 1, W)],
    )
    .unwrap();
    assert_eq!(r.offset, 1024);
    assert_eq!(r.len, 512);
    assert_eq!(r.status, GuestAddress(DATA + 512));
}

/// A data buffer outside guest memory is never touched, but the status byte, which is in
/// memory, still gets IOERR: a driver must not read a stale "OK" there.
#[test]
fn descriptor_outside_guest_memory_is_refused_with_an_error_status() {
    let e = run(
        VIRTIO_BLK_T_IN,
        0,
        &[d(HDR, 16, 0), d(MEM_SIZE - 100, 4096, W), d(STATUS, 1, W)],
    )
    .unwrap_err();
    assert!(matches!(e.reason, Reason::OutOfMemory { .. }));
    assert_eq!(e.status, Some(GuestAddress(STATUS)));
    assert!(!e.is_unsupported());
}

/// A status descriptor outside guest memory leaves nowhere to answer.
#[test]
fn status_outside_guest_memory_is_refused_without_a_status() {
    let e = run(
        VIRTIO_BLK_T_IN,
        0,
        &[d(HDR, 16, 0), d(DATA, 512, W), d(MEM_SIZE + 4096, 1, W)],
    )
    .unwrap_err();
    assert!(matches!(e.reason, Reason::OutOfMemory { .. }));
    assert_eq!(e.status, None);
}

#[test]
fn short_header() {
    let e = run(VIRTIO_BLK_T_IN, 0, &[d(HDR, 8, 0), d(STATUS, 1, W)]).unwrap_err();
    assert_eq!(e.reason, Reason::ShortHeader);
    assert_eq!(
        e.status,
        Some(GuestAddress(STATUS)),
        "IOERR can still be reported"
    );
    assert_eq!(
        reason(run(
            VIRTIO_BLK_T_IN,
            0,
            &[d(HDR, 8, 0), d(DATA, 8, W), d(STATUS, 1, W)]
        )),
        Reason::ShortHeader,
        "a header may not continue in a device-writable descriptor"
    );
}

#[test]
fn missing_or_read_only_status_byte() {
    assert_eq!(
        reason(run(
            VIRTIO_BLK_T_IN,
            0,
            &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, 0)]
        )),
        Reason::NoStatus
    );
    assert_eq!(
        reason(run(VIRTIO_BLK_T_FLUSH, 0, &[d(HDR, 16, 0)])),
        Reason::NoStatus
    );
    assert_eq!(
        reason(run(
            VIRTIO_BLK_T_FLUSH,
            0,
            &[d(HDR, 16, 0), d(STATUS, 0, W)]
        )),
        Reason::NoStatus
    );
}

#[test]
fn sectors_past_the_end() {
    let cap_sectors = (1u64 << 20) / 512;
    assert!(run(
        VIRTIO_BLK_T_OUT,
        cap_sectors - 1,
        &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)]
    )
    .is_ok());
    assert!(matches!(
        reason(run(
            VIRTIO_BLK_T_OUT,
            cap_sectors - 1,
            &[d(HDR, 16, 0), d(DATA, 1024, 0), d(STATUS, 1, W)]
        )),
        Reason::PastEnd { .. }
    ));
    assert!(matches!(
        reason(run(
            VIRTIO_BLK_T_IN,
            u64::MAX,
            &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)]
        )),
        Reason::PastEnd { .. }
    ));
}

#[test]
fn unaligned_length_and_wrong_direction() {
    assert_eq!(
        reason(run(
            VIRTIO_BLK_T_IN,
            0,
            &[d(HDR, 16, 0), d(DATA, 100, W), d(STATUS, 1, W)]
        )),
        Reason::Unaligned(100)
    );
    assert_eq!(
        reason(run(
            VIRTIO_BLK_T_IN,
            0,
            &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)]
        )),
        Reason::WrongDirection("read")
    );
    assert_eq!(
        reason(run(
            VIRTIO_BLK_T_OUT,
            0,
            &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)]
        )),
        Reason::WrongDirection("write")
    );
}

#[test]
fn unknown_type_is_unsupported() {
    let e = run(99, 0, &[d(HDR, 16, 0), d(STATUS, 1, W)]).unwrap_err();
    assert_eq!(e.reason, Reason::Unsupported(99));
    assert!(e.is_unsupported());
}

#[test]
fn writes_to_a_read_only_disk() {
    let m = mem();
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    let ro = Limits {
        read_only: true,
        ..limits()
    };
    let e = parse_with(&[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)], &m, &ro).unwrap_err();
    assert_eq!(e.reason, Reason::ReadOnly);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    assert!(parse_with(&[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)], &m, &ro).is_ok());
}

fn discard_run(type_: u32, segs: &[(u64, u32, u32)], l: &Limits) -> Result<Request, ParseError> {
    let m = mem();
    header(&m, HDR, type_, 0);
    for (i, (sector, n, flags)) in segs.iter().enumerate() {
        let s = DiscardSegment {
            sector: (*sector).into(),
            num_sectors: (*n).into(),
            flags: (*flags).into(),
        };
        m.write_obj(s, GuestAddress(DATA + 16 * i as u64)).unwrap();
    }
    let len = 16 * segs.len() as u32;
    parse_with(&[d(HDR, 16, 0), d(DATA, len, 0), d(STATUS, 1, W)], &m, l)
}

#[test]
fn discard_and_write_zeroes() {
    let r = discard_run(VIRTIO_BLK_T_DISCARD, &[(8, 16, 0)], &limits()).unwrap();
    assert_eq!(
        (r.kind, r.offset, r.len),
        (RequestKind::Discard, 4096, 8192)
    );
    let r = discard_run(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 1)], &limits()).unwrap();
    assert_eq!(r.kind, RequestKind::WriteZeroes { unmap: true });
    let e = discard_run(VIRTIO_BLK_T_DISCARD, &[(0, 8, 1)], &limits()).unwrap_err();
    assert_eq!(e.reason, Reason::BadFlags(1));
    assert!(e.is_unsupported());
    assert_eq!(
        reason(discard_run(
            VIRTIO_BLK_T_DISCARD,
            &[(0, 8, 0), (16, 8, 0)],
            &limits()
        )),
        Reason::BadSegments(32)
    );
    assert!(matches!(
        reason(discard_run(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(u64::MAX - 1, 8, 0)],
            &limits()
        )),
        Reason::PastEnd { .. }
    ));
    let off = Limits {
        discard: false,
        ..limits()
    };
    let e = discard_run(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)], &off).unwrap_err();
    assert!(e.is_unsupported());
}

#[test]
fn get_id() {
    let r = run(
        VIRTIO_BLK_T_GET_ID,
        0,
        &[d(HDR, 16, 0), d(DATA, 20, W), d(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(r.kind, RequestKind::GetId);
    assert_eq!(r.used_len(), 21);
}

#[test]
fn random_chains_never_panic() {
    let m = mem();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut refused = 0;
    for _ in 0..5000 {
        header(&m, HDR, (next() % 20) as u32, next() % 4096);
        let n = 1 + (next() % 5) as usize;
        let descs: Vec<RawDescriptor> = (0..n)
            .map(|i| {
                let addr = if next() % 8 == 0 {
                    next()
                } else {
                    HDR + (i as u64) * 0x1000 + next() % 64
                };
                let len = (next() % 5000) as u32;
                d(addr, len, if next() % 2 == 0 { W } else { 0 })
            })
            .collect();
        if parse_with(&descs, &m, &limits()).is_err() {
            refused += 1;
        }
    }
    assert!(refused > 0, "random chains should mostly be refused");
}

#[test]
fn data_segments_up_to_seg_max() {
    let chain = |segs: usize| {
        let mut descs = vec![d(HDR, 16, 0)];
        descs.extend((0..segs).map(|i| d(DATA + i as u64 * 512, 512, 0)));
        descs.push(d(STATUS, 1, W));
        descs
    };
    let r = run(VIRTIO_BLK_T_OUT, 0, &chain(MAX_DATA_SEGMENTS)).unwrap();
    assert_eq!(r.data.len(), MAX_DATA_SEGMENTS);
    assert_eq!(r.len, MAX_DATA_SEGMENTS as u64 * 512);
    for segs in [MAX_DATA_SEGMENTS + 1, MAX_DATA_SEGMENTS + 2, 200] {
        assert_eq!(
            reason(run(VIRTIO_BLK_T_OUT, 0, &chain(segs))),
            Reason::TooManySegments,
            "{segs} data segments"
        );
    }
    // A header that shares its descriptor with data leaves room for one more.
    let mut descs = vec![d(HDR, 16 + 512, 0)];
    descs.extend((0..MAX_DATA_SEGMENTS - 1).map(|i| d(DATA + i as u64 * 512, 512, 0)));
    descs.push(d(STATUS, 1, W));
    assert_eq!(
        run(VIRTIO_BLK_T_OUT, 0, &descs).unwrap().data.len(),
        MAX_DATA_SEGMENTS
    );
}

#[test]
fn in_guest_memory_agrees_with_check_range() {
    // Two adjacent regions, a hole, a third region.
    let m = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x1000),
        (GuestAddress(0x1000), 0x1000),
        (GuestAddress(0x4000), 0x1000),
    ])
    .unwrap();
    let addrs = [
        0, 1, 0xfff, 0x1000, 0x1fff, 0x2000, 0x3fff, 0x4000, 0x4fff, 0x5000,
    ];
    let lens = [0u32, 1, 2, 0x1000, 0x1001, 0x2000, 0x3000, u32::MAX];
    for a in addrs.into_iter().chain([u64::MAX - 1, u64::MAX]) {
        for len in lens {
            assert_eq!(
                in_guest_memory(&m, GuestAddress(a), len),
                GuestMemoryBackend::check_range(&m, GuestAddress(a), len as usize),
                "{a:#x}+{len:#x}"
            );
        }
    }
    assert!(
        in_guest_memory(&m, GuestAddress(0x800), 0x1000),
        "across two regions"
    );
    assert!(
        !in_guest_memory(&m, GuestAddress(0x1800), 0x1000),
        "into the hole"
    );
}
