//! Guest → paths: each TX chain is a virtio-net header and one frame.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryMmap};

/// `struct virtio_net_hdr_v1` (VERSION_1 always carries `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
/// Smallest frame worth sending: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// Why a TX chain was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error("device-writable descriptor in a TX chain")]
    Writable,
    #[error("chain of {0} bytes is shorter than header and Ethernet header")]
    Short(usize),
    #[error("frame of {0} bytes exceeds the largest frame ({1})")]
    TooLong(usize, usize),
    #[error("descriptor outside guest memory")]
    Memory,
}

/// Copies a TX chain (virtio-net header, then the frame) into `packet`. The header stays: with
/// offloads it tells the path which checksum to fill in and how to segment.
pub fn read_packet(
    descs: impl IntoIterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
    max_packet: usize,
    packet: &mut Vec<u8>,
) -> Result<(), TxError> {
    packet.clear();
    let mut total = 0usize;
    for d in descs {
        if d.is_write_only() {
            return Err(TxError::Writable);
        }
        let len = d.len() as usize;
        total += len;
        if total > max_packet {
            return Err(TxError::TooLong(
                total - NET_HDR_LEN,
                max_packet - NET_HDR_LEN,
            ));
        }
        if len == 0 {
            continue;
        }
        let at = packet.len();
        packet.resize(at + len, 0);
        mem.read_slice(&mut packet[at..], d.addr())
            .map_err(|_| TxError::Memory)?;
    }
    if total < NET_HDR_LEN + MIN_FRAME {
        return Err(TxError::Short(total));
    }
    Ok(())
}
