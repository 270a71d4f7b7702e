//! The write-intent bitmap in memory, shared lock-free between the request path and the metadata
//! worker.
//!
//! A write may go out only once the bits of its chunks are on disk (`persisted`). Each chunk also
//! counts the writes in flight to it, so a bit is cleared only when nothing is being written
//! there: the writer raises the count and then looks at the bit, the cleaner clears the bit and
//! then looks at the count (both sequentially consistent), so at least one of them sees the other
//! and a write never runs with its bit cleared on disk.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

/// A fixed-size set of bits with atomic access.
pub struct AtomicBits {
    words: Vec<AtomicU64>,
    len: u64,
}

impl AtomicBits {
    /// `len` clear bits.
    pub fn new(len: u64) -> Self {
        AtomicBits {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize].load(SeqCst) & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was clear.
    pub fn set(&self, i: u64) -> bool {
        i < self.len
            && self.words[(i / 64) as usize].fetch_or(1 << (i % 64), SeqCst) & (1 << (i % 64)) == 0
    }

    /// Clears bit `i`; returns whether it was set.
    pub fn clear(&self, i: u64) -> bool {
        i < self.len
            && self.words[(i / 64) as usize].fetch_and(!(1 << (i % 64)), SeqCst) & (1 << (i % 64))
                != 0
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(SeqCst).count_ones()))
            .sum()
    }

    /// Indexes of the set bits.
    pub fn ones(&self) -> Vec<u64> {
        (0..self.len).filter(|&i| self.get(i)).collect()
    }

    /// The bits as bytes, bit i in byte i/8 at position i%8 (the on-disk form), padded to `len`.
    pub fn to_bytes(&self, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        for (w, word) in self.words.iter().enumerate() {
            let v = word.load(SeqCst).to_le_bytes();
            let at = w * 8;
            if at >= len {
                break;
            }
            let n = (len - at).min(8);
            out[at..at + n].copy_from_slice(&v[..n]);
        }
        out
    }

    /// Sets every bit that is set in `bytes` (the on-disk form); bits past `len` are ignored.
    pub fn or_bytes(&self, bytes: &[u8]) {
        for i in 0..self.len.min(bytes.len() as u64 * 8) {
            if bytes[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                self.set(i);
            }
        }
    }
}

/// Per-chunk state of the write path.
pub struct ChunkMap {
    /// Bits on disk (or on their way, with the writes waiting for them).
    pub persisted: AtomicBits,
    /// Bits wanted on disk: set by writers that found their bit clear.
    pub wanted: AtomicBits,
    /// Chunks written since the cleaner last looked: a hot chunk keeps its bit.
    pub touched: AtomicBits,
    inflight: Vec<AtomicU32>,
}

impl ChunkMap {
    /// A map for `chunks` chunks, all clear.
    pub fn new(chunks: u64) -> Self {
        ChunkMap {
            persisted: AtomicBits::new(chunks),
            wanted: AtomicBits::new(chunks),
            touched: AtomicBits::new(chunks),
            inflight: (0..chunks).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.persisted.len()
    }

    /// A write to `range` starts: counts it and returns whether every bit is already on disk. If
    /// not, the caller must wait for a bitmap flush and call [`ChunkMap::begin`] again; the count
    /// stays raised either way until [`ChunkMap::end`].
    pub fn begin(&self, range: std::ops::Range<u64>) -> bool {
        let mut ready = true;
        for c in range {
            if let Some(n) = self.inflight.get(c as usize) {
                n.fetch_add(1, SeqCst);
            }
            self.touched.set(c);
            if !self.persisted.get(c) {
                self.wanted.set(c);
                ready = false;
            }
        }
        ready
    }

    /// Whether every bit of `range` is on disk (for a write that already counted itself).
    pub fn ready(&self, range: std::ops::Range<u64>) -> bool {
        let mut ready = true;
        for c in range {
            if !self.persisted.get(c) {
                self.wanted.set(c);
                ready = false;
            }
        }
        ready
    }

    /// A write to `range` is finished with.
    pub fn end(&self, range: std::ops::Range<u64>) {
        for c in range {
            if let Some(n) = self.inflight.get(c as usize) {
                n.fetch_sub(1, SeqCst);
            }
        }
    }

    /// Writes in flight to chunk `c`.
    pub fn inflight(&self, c: u64) -> u32 {
        self.inflight.get(c as usize).map_or(0, |n| n.load(SeqCst))
    }

    /// Clears chunk `c` if nothing writes to it and it was not written since the last sweep;
    /// returns whether it was cleared. Only sound while every leg holds every chunk.
    pub fn try_clean(&self, c: u64) -> bool {
        if !self.persisted.get(c) || self.touched.clear(c) {
            return false;
        }
        self.persisted.clear(c);
        if self.inflight(c) != 0 {
            // A writer saw the bit set before we cleared it; it relies on it.
            self.persisted.set(c);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_through_bytes() {
        let b = AtomicBits::new(100);
        for i in [0, 7, 8, 63, 64, 99] {
            assert!(b.set(i));
        }
        assert!(!b.set(7));
        assert!(!b.set(100), "out of range is ignored");
        assert_eq!(b.count(), 6);
        let bytes = b.to_bytes(4096);
        assert_eq!(bytes[0], 0x81);
        assert_eq!(bytes[1], 0x01);
        let c = AtomicBits::new(100);
        c.or_bytes(&bytes);
        assert_eq!(c.ones(), vec![0, 7, 8, 63, 64, 99]);
        assert!(c.clear(64));
        assert!(!c.clear(64));
    }

    #[test]
    fn writes_wait_for_their_bits() {
        let m = ChunkMap::new(8);
        assert!(!m.begin(2..4));
        assert_eq!(m.wanted.ones(), vec![2, 3]);
        m.persisted.set(2);
        m.persisted.set(3);
        assert!(m.ready(2..4));
        assert_eq!(m.inflight(2), 1);
        m.end(2..4);
        assert_eq!(m.inflight(2), 0);
    }

    #[test]
    fn cleaner_spares_busy_and_hot_chunks() {
        let m = ChunkMap::new(4);
        m.persisted.set(1);
        m.persisted.set(2);
        assert!(m.begin(1..2));
        // Chunk 1 is being written; chunk 2 was touched since the last sweep.
        m.touched.set(2);
        assert!(!m.try_clean(1), "touched by the write: spared once");
        assert!(!m.try_clean(1), "still being written: the bit stays");
        assert!(m.persisted.get(1));
        assert!(!m.try_clean(2), "touched: spared once");
        assert!(m.try_clean(2), "cold now");
        m.end(1..2);
        assert!(m.try_clean(1), "written and done: cleared");
        assert_eq!(m.persisted.count(), 0);
    }
}
