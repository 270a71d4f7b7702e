//! TX and RX chains in virtio-queue's mock guest memory, well-formed and hostile.

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::rx::{self, RxError, Used};
use super::tx::{self, TxError, NET_HDR_LEN};

const MEM_SIZE: u64 = 0x100_0000;
const BUF: u64 = 0x10_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// A packet: a header with offload fields set (they must pass unchanged) and a frame.
fn packet(frame_len: usize) -> Vec<u8> {
    let mut p = vec![0u8; NET_HDR_LEN];
    p[0] = 1; // NEEDS_CSUM
    p[1] = 1; // GSO TCPv4
    p[2..4].copy_from_slice(&54u16.to_le_bytes());
    p[4..6].copy_from_slice(&1448u16.to_le_bytes());
    p[6..8].copy_from_slice(&34u16.to_le_bytes());
    p[8..10].copy_from_slice(&16u16.to_le_bytes());
    p.extend((0..frame_len).map(|i| (i % 251) as u8));
    p
}

fn read_tx(descs: &[RawDescriptor], m: &GuestMemoryMmap, max: usize) -> Result<Vec<u8>, TxError> {
    let q = MockSplitQueue::new(m, 16);
    let chain = q.build_desc_chain(descs).unwrap();
    let mut out = Vec::new();
    tx::read_packet(chain, m, max, &mut out).map(|()| out)
}

#[test]
fn tx_packet_keeps_its_header_across_descriptors() {
    let m = mem();
    let p = packet(1000);
    m.write_slice(&p[..NET_HDR_LEN], GuestAddress(BUF)).unwrap();
    m.write_slice(&p[NET_HDR_LEN..], GuestAddress(BUF + 0x1000))
        .unwrap();
    let got = read_tx(&[d(BUF, 12, 0, 0), d(BUF + 0x1000, 1000, 0, 0)], &m, 65_000).unwrap();
    assert_eq!(got, p);
}

#[test]
fn tx_refuses_hostile_chains() {
    let m = mem();
    assert_eq!(
        read_tx(&[d(BUF, 100, W, 0)], &m, 9000),
        Err(TxError::Writable)
    );
    assert_eq!(
        read_tx(&[d(BUF, 20, 0, 0)], &m, 9000),
        Err(TxError::Short(20))
    );
    assert!(matches!(
        read_tx(&[d(BUF, 12, 0, 0), d(BUF + 0x1000, 9001, 0, 0)], &m, 9000),
        Err(TxError::TooLong(..))
    ));
    assert_eq!(
        read_tx(&[d(MEM_SIZE - 8, 100, 0, 0)], &m, 9000),
        Err(TxError::Memory)
    );
}

/// Offers `chains` (each a list of (len, flags)) as RX buffers, laid out from `BUF`.
fn rx_queue<'a>(mq: &MockSplitQueue<'a, GuestMemoryMmap>, chains: &[&[(u32, u16)]]) -> Queue {
    let mut descs = Vec::new();
    let mut addr = BUF;
    for c in chains {
        for (j, &(len, flags)) in c.iter().enumerate() {
            let idx = descs.len() as u16;
            let last = j + 1 == c.len();
            let f = if last { flags } else { flags | NEXT };
            descs.push(d(addr, len, f, if last { 0 } else { idx + 1 }));
            addr += 0x1_0000;
        }
    }
    mq.add_desc_chains(&descs, 0).unwrap();
    mq.create_queue().unwrap()
}

/// The bytes a used chain holds: its descriptors' buffers, in order, up to `len`.
fn chain_bytes(m: &GuestMemoryMmap, first_desc: usize, lens: &[u32], len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, &l) in lens.iter().enumerate() {
        let take = l.min(len - out.len() as u32) as usize;
        let mut b = vec![0u8; take];
        let at = BUF + 0x1_0000 * (first_desc + k) as u64;
        m.read_slice(&mut b, GuestAddress(at)).unwrap();
        out.extend(b);
    }
    out
}

#[test]
fn rx_packet_spans_mergeable_buffers_with_num_buffers_set() {
    let m = mem();
    let mq = MockSplitQueue::new(&m, 16);
    // The second chain splits the rest over two descriptors; the header lands in the first.
    let mut q = rx_queue(&mq, &[&[(64, W)], &[(40, W), (2000, W)], &[(64, W)]]);
    let p = packet(600);
    let (mut used, mut bad) = (Used::new(), 0);
    rx::write_packet(&mut q, &m, &p, true, &mut used, &mut bad).unwrap();
    assert_eq!(bad, 0);
    assert_eq!(used.as_slice(), &[(0, 64), (1, 548)]);
    let mut got = chain_bytes(&m, 0, &[64], 64);
    got.extend(chain_bytes(&m, 1, &[40, 2000], 548));
    let mut want = p.clone();
    want[10..12].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(got, want, "header fields kept, num_buffers = 2");
}

#[test]
fn rx_num_buffers_split_across_descriptors_is_patched() {
    let m = mem();
    let mq = MockSplitQueue::new(&m, 16);
    // 11 bytes then the rest: num_buffers straddles the two descriptors.
    let mut q = rx_queue(&mq, &[&[(11, W), (200, W)]]);
    let p = packet(100);
    let (mut used, mut bad) = (Used::new(), 0);
    rx::write_packet(&mut q, &m, &p, false, &mut used, &mut bad).unwrap();
    let got = chain_bytes(&m, 0, &[11, 200], 112);
    assert_eq!(&got[10..12], &1u16.to_le_bytes());
    assert_eq!(&got[12..], &p[12..]);
}

#[test]
fn rx_failures_put_every_buffer_back() {
    let m = mem();
    let mq = MockSplitQueue::new(&m, 16);
    let mut q = rx_queue(&mq, &[&[(64, W)], &[(64, W)]]);
    let (mut used, mut bad) = (Used::new(), 0);
    let big = packet(500);
    assert_eq!(
        rx::write_packet(&mut q, &m, &big, true, &mut used, &mut bad),
        Err(RxError::NoBuffers)
    );
    assert_eq!(
        rx::write_packet(&mut q, &m, &big, false, &mut used, &mut bad),
        Err(RxError::TooBig)
    );
    assert!(used.is_empty());
    // Both buffers are still there for a packet that fits.
    rx::write_packet(&mut q, &m, &packet(100), true, &mut used, &mut bad).unwrap();
    assert_eq!(used.as_slice(), &[(0, 64), (1, 48)]);
    assert_eq!(q.next_avail(), 2);
}

#[test]
fn rx_skips_a_chain_the_device_cannot_write() {
    let m = mem();
    let mq = MockSplitQueue::new(&m, 16);
    let mut q = rx_queue(&mq, &[&[(64, 0)], &[(256, W)]]);
    let (mut used, mut bad) = (Used::new(), 0);
    let p = packet(100);
    rx::write_packet(&mut q, &m, &p, true, &mut used, &mut bad).unwrap();
    assert_eq!(bad, 1);
    assert_eq!(used.as_slice(), &[(0, 0), (1, 112)]);
    let got = chain_bytes(&m, 1, &[256], 112);
    assert_eq!(
        &got[10..12],
        &1u16.to_le_bytes(),
        "the skipped chain is no buffer"
    );
}
