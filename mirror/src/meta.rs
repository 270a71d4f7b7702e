//! On-leg metadata: where it lives, how it is encoded, and how a set of legs is judged at start.
//!
//! The end of every leg holds the write-intent bitmap followed by two superblock slots in the last
//! 8 KiB (a fixed place, found before the chunk size is known); the guest sees the capacity below. Superblocks are written to the two slots in turn with a rising
//! sequence number and a checksum, so a torn write leaves the other slot intact (md and DRBD keep
//! their superblocks the same way). The bitmap has one bit per chunk: set (and on disk) before a
//! write to the chunk is sent, cleared once every leg holds the chunk.
//!
//! Each superblock carries the mirror's generation and what this leg knew of every leg: up to date,
//! or outdated since a given generation. A leg is ejected by bumping the generation on the legs
//! that remain and recording the ejected leg's last good generation; a leg that later claims a
//! generation above that record has been written on its own, and the two have split.

use serde::{Deserialize, Serialize};

use crate::MAX_LEGS;

/// Marks a leg as belonging to a vhost-mirror mirror.
pub const MAGIC: [u8; 8] = *b"VHMIRROR";
/// Metadata format version.
pub const VERSION: u32 = 1;
/// Bytes of one superblock slot.
pub const SB_SIZE: u64 = 4096;
/// Default write-intent chunk.
pub const DEFAULT_CHUNK: u64 = 1 << 20;
/// Everything is laid out and written in units of this.
pub const ALIGN: u64 = 4096;

/// What went wrong with metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("leg of {0} bytes is too small to hold data and metadata")]
    TooSmall(u64),
    #[error("chunk size {0} must be a power of two between 4 KiB and 1 GiB")]
    BadChunk(u64),
    #[error("no vhost-mirror metadata (run `vhost-mirror create` on the legs first)")]
    NoMetadata,
    #[error("metadata format version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("superblock damaged: {0}")]
    Corrupt(&'static str),
    #[error("{0}")]
    Mismatch(String),
    #[error(
        "split brain: leg {a} (generation {gen_a}) and leg {b} (generation {gen_b}) were both written \
         while apart; pick the leg whose data to keep and restart with --force-current N (the other \
         leg's changes since the split are discarded)"
    )]
    SplitBrain {
        a: usize,
        gen_a: u64,
        b: usize,
        gen_b: u64,
    },
}

/// Where data, superblocks and bitmap lie on a leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The whole leg.
    pub leg_capacity: u64,
    /// Bytes the guest sees, from offset 0.
    pub data_size: u64,
    pub chunk_size: u64,
    /// Chunks covering the data.
    pub chunks: u64,
    /// Start of the metadata: the bitmap, then superblock slots 0 and 1.
    pub meta_offset: u64,
    /// Bytes reserved for the bitmap (a multiple of [`ALIGN`]).
    pub bitmap_len: u64,
}

/// Offset of superblock slot `slot` on a leg of `leg_capacity` bytes.
pub fn sb_offset(leg_capacity: u64, slot: u64) -> u64 {
    leg_capacity.saturating_sub((2 - slot % 2) * SB_SIZE)
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Layout {
    /// The layout of a leg of `leg_capacity` bytes with `chunk_size` chunks.
    pub fn new(leg_capacity: u64, chunk_size: u64) -> Result<Layout, MetaError> {
        if !chunk_size.is_power_of_two() || !(ALIGN..=1 << 30).contains(&chunk_size) {
            return Err(MetaError::BadChunk(chunk_size));
        }
        let max_chunks = leg_capacity.div_ceil(chunk_size);
        let bitmap_len = align_up(max_chunks.div_ceil(8).max(1), ALIGN);
        let meta = 2 * SB_SIZE + bitmap_len;
        let usable = leg_capacity.saturating_sub(meta) / ALIGN * ALIGN;
        if usable == 0 {
            return Err(MetaError::TooSmall(leg_capacity));
        }
        Ok(Layout {
            leg_capacity,
            data_size: usable,
            chunk_size,
            chunks: usable.div_ceil(chunk_size),
            meta_offset: leg_capacity - meta,
            bitmap_len,
        })
    }

    /// Offset of superblock slot `slot` (0 or 1).
    pub fn sb_offset(&self, slot: u64) -> u64 {
        sb_offset(self.leg_capacity, slot)
    }

    /// Offset of the bitmap.
    pub fn bitmap_offset(&self) -> u64 {
        self.meta_offset
    }

    /// Chunks touched by `len` bytes at `offset`.
    pub fn chunks_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / self.chunk_size;
        let last = (offset + len - 1) / self.chunk_size;
        first..(last + 1).min(self.chunks)
    }
}

/// What one leg's superblock says about a leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Holds everything up to the superblock's generation.
    UpToDate,
    /// Missed writes after `since`, its last good generation.
    Outdated,
    /// Being copied to; current only for chunks already copied.
    Resyncing,
}

impl PeerState {
    fn code(self) -> u8 {
        match self {
            PeerState::UpToDate => 0,
            PeerState::Outdated => 1,
            PeerState::Resyncing => 2,
        }
    }
    fn from_code(c: u8) -> Option<PeerState> {
        Some(match c {
            0 => PeerState::UpToDate,
            1 => PeerState::Outdated,
            2 => PeerState::Resyncing,
            _ => return None,
        })
    }
}

/// One leg as recorded in a superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub state: PeerState,
    /// The last generation at which the leg took every write: up to date then, or being
    /// resynced (holding every write since it rejoined; the chunks it still lacked stay in the
    /// bitmap). A superblock of the leg's own newer than this was written elsewhere.
    pub good_gen: u64,
}

/// A decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    pub uuid: [u8; 16],
    /// Rises with every write of this leg's superblock; picks the newer slot.
    pub seq: u64,
    pub generation: u64,
    /// Which leg of the mirror this is.
    pub leg_index: u32,
    pub chunk_size: u64,
    pub data_size: u64,
    /// Set when the daemon stopped with every leg in sync and the bitmap flushed.
    pub clean: bool,
    pub legs: Vec<PeerRecord>,
}

const FIXED: usize = 8 + 4 + 4 + 16 + 8 + 8 + 4 + 4 + 8 + 8;
const PEER: usize = 16;

impl Superblock {
    /// The 4 KiB slot image.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(SB_SIZE as usize);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&u32::from(self.clean).to_le_bytes());
        b.extend_from_slice(&self.uuid);
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.leg_index.to_le_bytes());
        b.extend_from_slice(&(self.legs.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&self.data_size.to_le_bytes());
        for p in &self.legs {
            b.push(p.state.code());
            b.extend_from_slice(&[0; 7]);
            b.extend_from_slice(&p.good_gen.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(SB_SIZE as usize, 0);
        b
    }

    /// Reads a slot image. All-zero or foreign data is [`MetaError::NoMetadata`].
    pub fn decode(b: &[u8]) -> Result<Superblock, MetaError> {
        if b.len() < FIXED + 4 || b[..8] != MAGIC {
            return Err(MetaError::NoMetadata);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let version = u32_at(8);
        if version != VERSION {
            return Err(MetaError::Version(version));
        }
        let count = u32_at(52) as usize;
        if count == 0 || count > MAX_LEGS {
            return Err(MetaError::Corrupt("leg count"));
        }
        let end = FIXED + count * PEER;
        if b.len() < end + 4 {
            return Err(MetaError::Corrupt("truncated"));
        }
        if crc32fast::hash(&b[..end]) != u32_at(end) {
            return Err(MetaError::Corrupt("checksum"));
        }
        let mut legs = Vec::with_capacity(count);
        for i in 0..count {
            let o = FIXED + i * PEER;
            legs.push(PeerRecord {
                state: PeerState::from_code(b[o]).ok_or(MetaError::Corrupt("leg state"))?,
                good_gen: u64_at(o + 8),
            });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let sb = Superblock {
            uuid,
            seq: u64_at(32),
            generation: u64_at(40),
            leg_index: u32_at(48),
            chunk_size: u64_at(56),
            data_size: u64_at(64),
            clean: u32_at(12) != 0,
            legs,
        };
        if sb.leg_index as usize >= count {
            return Err(MetaError::Corrupt("leg index"));
        }
        Ok(sb)
    }

    /// The newer valid superblock of the two slots.
    pub fn pick(
        a: Result<Superblock, MetaError>,
        b: Result<Superblock, MetaError>,
    ) -> Result<Superblock, MetaError> {
        match (a, b) {
            (Ok(a), Ok(b)) => Ok(if b.seq > a.seq { b } else { a }),
            (Ok(s), Err(_)) | (Err(_), Ok(s)) => Ok(s),
            (Err(MetaError::NoMetadata), Err(e)) | (Err(e), Err(MetaError::NoMetadata)) => Err(e),
            (Err(e), Err(_)) => Err(e),
        }
    }

    /// The uuid as text.
    pub fn uuid_string(&self) -> String {
        uuid::Uuid::from_bytes(self.uuid).to_string()
    }
}

/// How a set of legs comes together at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assembly {
    /// The generation the mirror continues from.
    pub generation: u64,
    /// Legs holding every acknowledged write.
    pub current: Vec<usize>,
    /// Legs that must be resynced from a current leg before they serve reads.
    pub stale: Vec<usize>,
    /// The bitmap to start from: the current legs' (unclean stops leave bits of writes that may
    /// have reached some legs only).
    pub source: usize,
}

/// Judges the legs' superblocks (index = leg position): which are current, which are stale, and
/// whether they split. `force` names a leg to take as current whatever the others say.
pub fn assemble(sbs: &[Superblock], force: Option<usize>) -> Result<Assembly, MetaError> {
    let first = sbs.first().ok_or(MetaError::Mismatch("no legs".into()))?;
    for (i, sb) in sbs.iter().enumerate() {
        if sb.uuid != first.uuid {
            return Err(MetaError::Mismatch(format!(
                "leg {i} belongs to mirror {}, leg 0 to mirror {}",
                sb.uuid_string(),
                first.uuid_string()
            )));
        }
        if sb.leg_index as usize != i {
            return Err(MetaError::Mismatch(format!(
                "the leg given as leg {i} is leg {} of this mirror; give the legs in their original order",
                sb.leg_index
            )));
        }
        if sb.legs.len() != sbs.len() {
            return Err(MetaError::Mismatch(format!(
                "leg {i} belongs to a mirror of {} legs, but {} were given",
                sb.legs.len(),
                sbs.len()
            )));
        }
        if sb.chunk_size != first.chunk_size || sb.data_size != first.data_size {
            return Err(MetaError::Mismatch(format!(
                "leg {i} has a different layout (chunk {} / data {} bytes vs chunk {} / data {})",
                sb.chunk_size, sb.data_size, first.chunk_size, first.data_size
            )));
        }
    }
    // Only a leg that itself claims to hold everything can be the source: a leg that was being
    // resynced has holes, whatever its generation.
    let complete = |i: usize| sbs[i].legs[i].state == PeerState::UpToDate;
    let source = match force {
        Some(f) if f < sbs.len() => f,
        Some(f) => {
            return Err(MetaError::Mismatch(format!(
                "--force-current {f}: no such leg"
            )))
        }
        None => (0..sbs.len())
            .filter(|&i| complete(i))
            .max_by_key(|&i| (sbs[i].generation, std::cmp::Reverse(i)))
            .ok_or_else(|| {
                MetaError::Mismatch(
                    "no leg holds a complete copy (each was being resynced); \
                     choose one with --force-current N"
                        .into(),
                )
            })?,
    };
    let src = &sbs[source];
    let mut current = vec![source];
    let mut stale = Vec::new();
    for (i, sb) in sbs.iter().enumerate() {
        if i == source {
            continue;
        }
        let view = src.legs[i];
        let agrees = sb.generation == src.generation
            && view.state == PeerState::UpToDate
            && sb.legs[source].state == PeerState::UpToDate
            && complete(i);
        // Behind the source and not written since it fell behind: it only needs the source's
        // dirty chunks. A leg the source still counts as up to date or resyncing can lag the
        // source's generation only through a crash between the two legs' superblock writes.
        let behind = sb.generation <= view.good_gen
            || (view.state != PeerState::Outdated && sb.generation <= src.generation);
        if agrees && force.is_none() {
            current.push(i);
        } else if force.is_some() || behind {
            stale.push(i);
        } else {
            return Err(MetaError::SplitBrain {
                a: source,
                gen_a: src.generation,
                b: i,
                gen_b: sb.generation,
            });
        }
    }
    current.sort_unstable();
    Ok(Assembly {
        generation: src.generation,
        current,
        stale,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(leg: u32, gen: u64, peers: &[(PeerState, u64)]) -> Superblock {
        Superblock {
            uuid: [7; 16],
            seq: 1,
            generation: gen,
            leg_index: leg,
            chunk_size: DEFAULT_CHUNK,
            data_size: 1 << 30,
            clean: true,
            legs: peers
                .iter()
                .map(|&(state, good_gen)| PeerRecord { state, good_gen })
                .collect(),
        }
    }
    use PeerState::*;

    #[test]
    fn layout_reserves_metadata_at_the_end() {
        let l = Layout::new(64 << 20, DEFAULT_CHUNK).unwrap();
        assert_eq!(l.bitmap_len, 4096);
        assert_eq!(l.meta_offset, (64 << 20) - 3 * 4096);
        assert_eq!(l.sb_offset(0), (64 << 20) - 2 * 4096);
        assert_eq!(l.sb_offset(1), (64 << 20) - 4096);
        assert_eq!(l.data_size, l.meta_offset);
        assert_eq!(l.chunks, 64);
        assert_eq!(l.chunks_of(0, 1), 0..1);
        assert_eq!(l.chunks_of((1 << 20) - 512, 1024), 0..2);
        assert_eq!(l.chunks_of(5, 0), 0..0);
        let big = Layout::new(1 << 40, DEFAULT_CHUNK).unwrap();
        assert_eq!(big.bitmap_len, 128 << 10);
        assert!(matches!(
            Layout::new(8192, DEFAULT_CHUNK),
            Err(MetaError::TooSmall(_))
        ));
        assert!(matches!(
            Layout::new(1 << 30, 3000),
            Err(MetaError::BadChunk(3000))
        ));
    }

    #[test]
    fn superblock_round_trips_and_detects_damage() {
        let s = sb(1, 42, &[(Outdated, 41), (UpToDate, 42)]);
        let mut img = s.encode();
        assert_eq!(img.len(), 4096);
        assert_eq!(Superblock::decode(&img).unwrap(), s);
        img[41] ^= 1;
        assert_eq!(
            Superblock::decode(&img),
            Err(MetaError::Corrupt("checksum"))
        );
        assert_eq!(Superblock::decode(&[0; 4096]), Err(MetaError::NoMetadata));
        let mut v2 = s.encode();
        v2[8] = 2;
        assert_eq!(Superblock::decode(&v2), Err(MetaError::Version(2)));
        assert!(Superblock::decode(&img[..10]).is_err());
    }

    #[test]
    fn newer_slot_wins_and_a_torn_slot_is_survived() {
        let mut a = sb(0, 1, &[(UpToDate, 1), (UpToDate, 1)]);
        let mut b = a.clone();
        a.seq = 5;
        b.seq = 6;
        b.generation = 2;
        assert_eq!(
            Superblock::pick(Ok(a.clone()), Ok(b.clone()))
                .unwrap()
                .generation,
            2
        );
        assert_eq!(
            Superblock::pick(Ok(a.clone()), Err(MetaError::Corrupt("checksum")))
                .unwrap()
                .seq,
            5
        );
        assert_eq!(
            Superblock::pick(Err(MetaError::NoMetadata), Err(MetaError::NoMetadata)),
            Err(MetaError::NoMetadata)
        );
    }

    #[test]
    fn legs_in_step_are_both_current() {
        let a = assemble(
            &[
                sb(0, 3, &[(UpToDate, 3), (UpToDate, 3)]),
                sb(1, 3, &[(UpToDate, 3), (UpToDate, 3)]),
            ],
            None,
        )
        .unwrap();
        assert_eq!((a.current, a.stale, a.generation), (vec![0, 1], vec![], 3));
    }

    #[test]
    fn ejected_leg_is_stale_and_the_survivor_current() {
        // Leg 1 was ejected at generation 3; leg 0 went on to 4.
        let legs = [
            sb(0, 4, &[(UpToDate, 4), (Outdated, 3)]),
            sb(1, 3, &[(UpToDate, 3), (UpToDate, 3)]),
        ];
        let a = assemble(&legs, None).unwrap();
        assert_eq!((a.current, a.stale, a.source), (vec![0], vec![1], 0));
        // Order does not decide: the newer leg does.
        let legs = [
            sb(0, 3, &[(UpToDate, 3), (UpToDate, 3)]),
            sb(1, 4, &[(Outdated, 3), (UpToDate, 4)]),
        ];
        let a = assemble(&legs, None).unwrap();
        assert_eq!((a.current, a.stale, a.source), (vec![1], vec![0], 1));
    }

    #[test]
    fn crash_before_the_other_leg_heard_of_the_bump() {
        // Leg 0 recorded the ejection of leg 1 and went on several generations.
        let legs = [
            sb(0, 7, &[(UpToDate, 7), (Outdated, 3)]),
            sb(1, 3, &[(UpToDate, 3), (UpToDate, 3)]),
        ];
        assert_eq!(assemble(&legs, None).unwrap().stale, vec![1]);
    }

    #[test]
    fn split_brain_is_refused_and_can_be_forced() {
        // Each leg ejected the other at generation 3 and was written alone.
        let legs = [
            sb(0, 4, &[(UpToDate, 4), (Outdated, 3)]),
            sb(1, 5, &[(Outdated, 3), (UpToDate, 5)]),
        ];
        let e = assemble(&legs, None).unwrap_err();
        assert_eq!(
            e,
            MetaError::SplitBrain {
                a: 1,
                gen_a: 5,
                b: 0,
                gen_b: 4
            }
        );
        assert!(e.to_string().contains("--force-current"));
        let same = [
            sb(0, 4, &[(UpToDate, 4), (Outdated, 3)]),
            sb(1, 4, &[(Outdated, 3), (UpToDate, 4)]),
        ];
        assert!(matches!(
            assemble(&same, None),
            Err(MetaError::SplitBrain { .. })
        ));
        let f = assemble(&legs, Some(0)).unwrap();
        assert_eq!((f.current, f.stale, f.source), (vec![0], vec![1], 0));
    }

    #[test]
    fn interrupted_resync_resumes_and_is_never_the_source() {
        // Leg 1 was being resynced at generation 5 (outdated since 3).
        let legs = [
            sb(0, 5, &[(UpToDate, 5), (Resyncing, 3)]),
            sb(1, 5, &[(UpToDate, 5), (Resyncing, 3)]),
        ];
        let a = assemble(&legs, None).unwrap();
        assert_eq!((a.current, a.stale), (vec![0], vec![1]));
        // Finished, but the crash came between leg 0's superblock and leg 1's.
        let legs = [
            sb(0, 5, &[(UpToDate, 5), (UpToDate, 5)]),
            sb(1, 5, &[(UpToDate, 5), (Resyncing, 3)]),
        ];
        assert_eq!(assemble(&legs, None).unwrap().stale, vec![1]);
        // Leg 0 died mid-resync and leg 1 was written alone: neither holds everything.
        let legs = [
            sb(0, 5, &[(UpToDate, 5), (Resyncing, 3)]),
            sb(1, 6, &[(Outdated, 5), (Resyncing, 3)]),
        ];
        assert!(matches!(
            assemble(&legs, None),
            Err(MetaError::SplitBrain { .. })
        ));
        // Only resyncing legs: nothing is complete.
        let legs = [
            sb(0, 5, &[(Resyncing, 3), (UpToDate, 5)]),
            sb(1, 5, &[(UpToDate, 5), (Resyncing, 3)]),
        ];
        let e = assemble(&legs, None).unwrap_err();
        assert!(
            e.to_string().contains("no leg holds a complete copy"),
            "{e}"
        );
        assert_eq!(assemble(&legs, Some(1)).unwrap().source, 1);
    }

    #[test]
    fn foreign_or_misordered_legs_are_refused() {
        let mut other = sb(1, 3, &[(UpToDate, 3), (UpToDate, 3)]);
        other.uuid = [9; 16];
        let e = assemble(&[sb(0, 3, &[(UpToDate, 3), (UpToDate, 3)]), other], None).unwrap_err();
        assert!(e.to_string().contains("belongs to mirror"), "{e}");
        let e = assemble(
            &[
                sb(1, 3, &[(UpToDate, 3), (UpToDate, 3)]),
                sb(0, 3, &[(UpToDate, 3), (UpToDate, 3)]),
            ],
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("original order"), "{e}");
    }
}
