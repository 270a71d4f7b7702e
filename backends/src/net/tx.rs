//! Guest → paths: each TX chain is a virtio-net header and one frame.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestMemoryMmap};

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

/// Copies the frame out of a TX chain into `frame` (header stripped). Offloads are not offered,
/// so the header carries nothing the paths need.
pub fn read_frame(
    descs: impl IntoIterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
    max_frame: usize,
    frame: &mut Vec<u8>,
) -> Result<(), TxError> {
    frame.clear();
    let mut skip = NET_HDR_LEN;
    let mut total = 0usize;
    for d in descs {
        if d.is_write_only() {
            return Err(TxError::Writable);
        }
        let len = d.len() as usize;
        total += len;
        if total > max_frame + NET_HDR_LEN {
            return Err(TxError::TooLong(total - NET_HDR_LEN, max_frame));
        }
        let s = skip.min(len);
        skip -= s;
        let take = len - s;
        if take == 0 {
            continue;
        }
        let at = frame.len();
        frame.resize(at + take, 0);
        mem.read_slice(&mut frame[at..], d.addr().unchecked_add(s as u64))
            .map_err(|_| TxError::Memory)?;
    }
    if total < NET_HDR_LEN + MIN_FRAME {
        return Err(TxError::Short(total));
    }
    Ok(())
}
