//! Port-space helpers: splitting 0..=65535 at the boundaries rules mention, and turning a port
//! range into the aligned power-of-two blocks an LPM key can express.

use std::collections::BTreeSet;

/// Collects the boundaries of inclusive port ranges; `intervals` then yields the pieces of
/// 0..=65535 on which every collected range is either wholly in or wholly out.
#[derive(Default)]
pub(crate) struct Boundaries(BTreeSet<u32>);

impl Boundaries {
    pub(crate) fn add(&mut self, lo: u16, hi: u16) {
        self.0.insert(u32::from(lo));
        self.0.insert(u32::from(hi) + 1);
    }

    pub(crate) fn intervals(&self) -> Vec<(u16, u16)> {
        let mut cuts: Vec<u32> = self.0.iter().copied().filter(|c| *c <= 65535).collect();
        cuts.insert(0, 0);
        cuts.dedup();
        let mut out = Vec::with_capacity(cuts.len());
        for (i, lo) in cuts.iter().enumerate() {
            let hi = cuts.get(i + 1).map_or(65535, |next| next - 1);
            out.push((*lo as u16, hi as u16));
        }
        out
    }
}

/// `[lo, hi]` as maximal aligned blocks: (first port, number of leading bits that are fixed).
pub(crate) fn blocks(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    let mut out = Vec::new();
    while lo <= hi {
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros() as u8));
        lo += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_cover_the_port_space() {
        let mut b = Boundaries::default();
        assert_eq!(b.intervals(), [(0, 65535)]);
        b.add(80, 80);
        b.add(8000, 8080);
        b.add(65535, 65535);
        assert_eq!(
            b.intervals(),
            [
                (0, 79),
                (80, 80),
                (81, 7999),
                (8000, 8080),
                (8081, 65534),
                (65535, 65535)
            ]
        );
        let mut b = Boundaries::default();
        b.add(0, 10);
        assert_eq!(b.intervals(), [(0, 10), (11, 65535)]);
    }

    #[test]
    fn blocks_are_aligned_and_exact() {
        assert_eq!(blocks(80, 80), [(80, 16)]);
        assert_eq!(blocks(0, 65535), [(0, 0)]);
        assert_eq!(blocks(8000, 8003), [(8000, 14)]);
        assert_eq!(blocks(1, 4), [(1, 16), (2, 15), (4, 16)]);
        // Every port of a range is covered exactly once, none outside.
        for (lo, hi) in [(1u16, 1000u16), (1024, 65535), (3, 3), (30000, 32767)] {
            let mut covered = vec![0u8; 65536];
            for (start, bits) in blocks(lo, hi) {
                let size = 1u32 << (16 - u32::from(bits));
                assert_eq!(u32::from(start) % size, 0, "aligned");
                for p in u32::from(start)..u32::from(start) + size {
                    covered[p as usize] += 1;
                }
            }
            for (p, c) in covered.iter().enumerate() {
                let want = u8::from(p >= usize::from(lo) && p <= usize::from(hi));
                assert_eq!(*c, want, "port {p} of {lo}..={hi}");
            }
        }
    }
}
