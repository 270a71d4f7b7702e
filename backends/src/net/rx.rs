//! Paths → guest: a frame goes into one or more RX chains (MRG_RXBUF), behind a virtio-net
//! header whose `num_buffers` says how many.

use smallvec::SmallVec;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::tx::NET_HDR_LEN;

/// Where `num_buffers` sits in the header.
const NUM_BUFFERS: std::ops::Range<usize> = NET_HDR_LEN - 2..NET_HDR_LEN;

/// Why a frame could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RxError {
    #[error("no receive buffers")]
    NoBuffers,
    #[error("frame does not fit one receive buffer (mergeable buffers not negotiated)")]
    TooBig,
}

/// Used entries of one delivered frame: (head, bytes written).
pub type Used = SmallVec<[(u16, u32); 4]>;

/// Writes `packet` (a virtio-net header, then the frame) into the queue's available RX chains,
/// with the header's `num_buffers` set to the number of chains used. On failure every chain
/// taken is put back, so no buffer is lost. Chains with device-readable descriptors (a driver
/// bug) are returned empty and skipped; they count in `bad_chains`.
pub fn write_packet(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    packet: &[u8],
    mergeable: bool,
    used: &mut Used,
    bad_chains: &mut u64,
) -> Result<(), RxError> {
    let total = packet.len();
    let mut written = 0usize;
    let mut popped = 0u16;
    // Where `num_buffers` landed, to patch it once it is known (a header may be split).
    let mut nb_at: SmallVec<[(usize, GuestAddress); 2]> = SmallVec::new();
    let start = used.len();
    while written < total {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            for _ in 0..popped {
                queue.go_to_previous_position();
            }
            used.truncate(start);
            return Err(RxError::NoBuffers);
        };
        popped += 1;
        if !mergeable && popped > 1 {
            for _ in 0..popped {
                queue.go_to_previous_position();
            }
            used.truncate(start);
            return Err(RxError::TooBig);
        }
        let head = chain.head_index();
        let mut in_chain = 0usize;
        let mut bad = false;
        for d in chain {
            if !d.is_write_only() {
                bad = true;
                break;
            }
            if written == total {
                break;
            }
            let n = (d.len() as usize).min(total - written);
            if mem
                .write_slice(&packet[written..written + n], d.addr())
                .is_err()
            {
                bad = true;
                break;
            }
            for pos in NUM_BUFFERS.clone() {
                if (written..written + n).contains(&pos) {
                    nb_at.push((pos, d.addr().unchecked_add((pos - written) as u64)));
                }
            }
            written += n;
            in_chain += n;
        }
        if bad {
            *bad_chains += 1;
            used.push((head, 0));
            // A returned-empty chain takes no part in the packet.
            written -= in_chain;
            nb_at.retain(|(pos, _)| *pos < written);
            continue;
        }
        used.push((head, in_chain as u32));
    }
    let buffers = used[start..].iter().filter(|(_, n)| *n > 0).count() as u16;
    let nb = buffers.to_le_bytes();
    for (pos, addr) in nb_at {
        let _ = mem.write_slice(&nb[pos - NUM_BUFFERS.start..][..1], addr);
    }
    Ok(())
}
