//! Paths → guest: a frame goes into one or more RX chains (MRG_RXBUF), behind a virtio-net
//! header whose `num_buffers` says how many.

use smallvec::SmallVec;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::tx::NET_HDR_LEN;

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

/// Writes `frame` into the queue's available RX chains. On failure every chain taken is put
/// back, so no buffer is lost. Chains with device-readable descriptors (a driver bug) are
/// returned empty and skipped; they count in `bad_chains`.
pub fn write_frame(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &[u8],
    mergeable: bool,
    used: &mut Used,
    bad_chains: &mut u64,
) -> Result<(), RxError> {
    let total = NET_HDR_LEN + frame.len();
    let mut hdr = [0u8; NET_HDR_LEN];
    let mut written = 0usize;
    let mut popped = 0u16;
    // Where the header's bytes landed, to patch num_buffers once it is known.
    let mut hdr_at: SmallVec<[(usize, GuestAddress, usize); 2]> = SmallVec::new();
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
            let mut off = 0;
            while off < n {
                let pos = written + off;
                let (src, len) = if pos < NET_HDR_LEN {
                    hdr_at.push((
                        pos,
                        d.addr().unchecked_add(off as u64),
                        (NET_HDR_LEN - pos).min(n - off),
                    ));
                    (&hdr[pos..], (NET_HDR_LEN - pos).min(n - off))
                } else {
                    (&frame[pos - NET_HDR_LEN..], n - off)
                };
                if mem
                    .write_slice(&src[..len], d.addr().unchecked_add(off as u64))
                    .is_err()
                {
                    bad = true;
                    break;
                }
                off += len;
            }
            if bad {
                break;
            }
            written += n;
            in_chain += n;
        }
        if bad {
            *bad_chains += 1;
            used.push((head, 0));
            // A returned-empty chain takes no part in the frame.
            written -= in_chain;
            hdr_at.retain(|(pos, _, _)| *pos < written);
            continue;
        }
        used.push((head, in_chain as u32));
    }
    let buffers = used[start..].iter().filter(|(_, n)| *n > 0).count() as u16;
    hdr[10..12].copy_from_slice(&buffers.to_le_bytes());
    for (pos, addr, len) in hdr_at {
        let _ = mem.write_slice(&hdr[pos..pos + len], addr);
    }
    Ok(())
}
