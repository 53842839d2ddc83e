//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4): a lookup table of
//! `M` slots (M prime) filled round-robin from each backend's permutation, so every backend
//! gets ⌊M/N⌋ or ⌈M/N⌉ slots and removing one backend moves few of the others' slots.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;

/// Table size: prime, and ≥ 100 × the backend counts we expect per Service, which keeps
/// per-backend shares within 1% of each other.
pub const M: usize = 16381;

/// FNV-1a, 64 bit, with a seed: stable across runs and builds (unlike std's SipHash keys),
/// so two agents build the same table from the same backends.
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

fn hash(seed: u64, backend: &(IpAddr, u16)) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325 ^ seed);
    backend.hash(&mut h);
    h.finish()
}

/// Slot → index into `backends`. Empty when there are no backends. The result depends on
/// the set of backends, not their order.
pub fn table(backends: &[(IpAddr, u16)], m: usize) -> Vec<u32> {
    let n = backends.len();
    if n == 0 {
        return Vec::new();
    }
    // Sort so that the table depends only on the set.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| backends[i]);
    let perms: Vec<(usize, usize)> = order
        .iter()
        .map(|&i| {
            let offset = (hash(0x5eed_0001, &backends[i]) % m as u64) as usize;
            let skip = (hash(0x5eed_0002, &backends[i]) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; n];
    let mut entry = vec![u32::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for (k, &(offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[k] * skip) % m;
            while entry[c] != u32::MAX {
                next[k] += 1;
                c = (offset + next[k] * skip) % m;
            }
            entry[c] = order[k] as u32;
            next[k] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<(IpAddr, u16)> {
        (0..n)
            .map(|i| (format!("198.18.1.{}", i + 2).parse().unwrap(), 8080))
            .collect()
    }

    #[test]
    fn every_backend_gets_floor_or_ceil_of_m_over_n() {
        for n in [1, 2, 3, 7, 10, 64] {
            let t = table(&backends(n), M);
            assert_eq!(t.len(), M);
            let mut counts = vec![0usize; n];
            for i in &t {
                counts[*i as usize] += 1;
            }
            let (lo, hi) = (M / n, M.div_ceil(n));
            assert!(
                counts.iter().all(|c| *c == lo || *c == hi),
                "n={n}: {counts:?}"
            );
        }
    }

    #[test]
    fn removing_one_of_ten_keeps_the_others_flows() {
        let all = backends(10);
        let before = table(&all, M);
        let removed = all[3];
        let rest: Vec<_> = all.iter().copied().filter(|b| *b != removed).collect();
        let after = table(&rest, M);
        // Slots that did not belong to the removed backend: how many keep their backend?
        let (mut kept, mut total) = (0, 0);
        for (s, b) in before.iter().enumerate() {
            let was = all[*b as usize];
            if was == removed {
                continue;
            }
            total += 1;
            if rest[after[s] as usize] == was {
                kept += 1;
            }
        }
        let share = kept as f64 / total as f64;
        assert!(share >= 0.99, "kept {share:.4} of surviving flows");
    }

    #[test]
    fn order_of_backends_does_not_matter() {
        let a = backends(5);
        let mut b = a.clone();
        b.reverse();
        let (ta, tb) = (table(&a, 251), table(&b, 251));
        for (x, y) in ta.iter().zip(&tb) {
            assert_eq!(a[*x as usize], b[*y as usize]);
        }
    }

    #[test]
    fn no_backends_no_table() {
        assert!(table(&[], M).is_empty());
    }
}
