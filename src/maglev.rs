//! Maglev consistent hashing (Eisenbud et al., NSDI '16): a lookup table of
//! `M` (prime) slots filled with backend ids so that (a) backends get
//! near-equal shares and (b) adding or removing one backend moves only
//! about `1/n` of the slots. Every node builds the same table from the same
//! backend set, so a flow hashed into it lands on the same backend whichever
//! node it enters (what north-south load balancing needs).
//!
//! The table is computed here and written to the datapath per frontend;
//! backends are identified by their address (not their node-local id) so
//! every node agrees.

#![deny(unsafe_code)]

use crate::model::L4Addr;

/// Table sizes kpr accepts: primes, as Cilium's `maglev.tableSize`.
pub const TABLE_SIZES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
];
/// Default table size (Cilium's default).
pub const DEFAULT_TABLE_SIZE: u32 = 16381;
/// Default hash seed. Any value works as long as every node uses the same.
pub const DEFAULT_HASH_SEED: u64 = 0;

/// What every node must agree on to pick the same backend for a flow:
/// the table size (`--maglev-table-size`) and the hash seed
/// (`--maglev-hash-seed`). Tables take `4 x table_size` bytes each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MaglevParams {
    table_size: u32,
    seed: u64,
}

impl Default for MaglevParams {
    fn default() -> Self {
        MaglevParams {
            table_size: DEFAULT_TABLE_SIZE,
            seed: DEFAULT_HASH_SEED,
        }
    }
}

impl MaglevParams {
    /// Refuses a table size that is not one of [`TABLE_SIZES`].
    pub fn new(table_size: u32, seed: u64) -> Result<MaglevParams, MaglevError> {
        if !TABLE_SIZES.contains(&table_size) {
            return Err(MaglevError::BadTableSize(table_size));
        }
        Ok(MaglevParams { table_size, seed })
    }

    /// Slots of every table.
    pub fn table_size(&self) -> u32 {
        self.table_size
    }

    /// The seed of the tables' permutations.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The seed of the datapath's flow hash (32 bits: both halves folded).
    pub fn flow_hash_seed(&self) -> u32 {
        (self.seed ^ (self.seed >> 32)) as u32
    }

    /// The table for `backends` (an index into `backends` per slot).
    pub fn build(&self, backends: &[L4Addr]) -> Result<Vec<u32>, MaglevError> {
        build_table(backends, self.table_size, self.seed)
    }
}

/// The datapath's hash of an IPv4 flow from `saddr:sport` to a frontend's
/// `dport`/`proto` (bpf/include/lb_maglev.h, lb_flow_hash4: the kernel's
/// jhash_3words), seeded with [`MaglevParams::flow_hash_seed`]: a new
/// north-south flow of a Maglev frontend takes slot `hash % table size`.
pub fn flow_hash4(saddr: std::net::Ipv4Addr, sport: u16, dport: u16, proto: u8, seed: u32) -> u32 {
    jhash_3words(
        u32::from(saddr),
        (u32::from(sport) << 16) | u32::from(dport),
        u32::from(proto),
        seed,
    )
}

/// The kernel's jhash_3words() (Bob Jenkins' lookup3 final mix), as the
/// datapath's flow hashes use it (lb_maglev.h, lb_nodeport6.h).
pub fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let init = initval.wrapping_add(0xdead_beef).wrapping_add(3 << 2);
    let (mut a, mut b, mut c) = (
        a.wrapping_add(init),
        b.wrapping_add(init),
        c.wrapping_add(init),
    );
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c.wrapping_sub(b.rotate_left(24))
}

/// `--maglev-table-size`: one of [`TABLE_SIZES`], else an error listing them.
pub fn parse_table_size(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    MaglevParams::new(n, DEFAULT_HASH_SEED)
        .map(|p| p.table_size())
        .map_err(|e| e.to_string())
}

/// Why a table cannot be built.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("maglev table size {0} is not one of the supported primes {TABLE_SIZES:?}")]
    BadTableSize(u32),
    #[error("{backends} backends do not fit a Maglev table of {size} slots (--maglev-table-size; at least 100 x the backends keeps their shares even)")]
    TooManyBackends { backends: usize, size: u32 },
}

/// 64-bit FNV-1a with a seed folded into the offset basis: stable across
/// builds and platforms (std's hashers are not), cheap, and good enough to
/// spread backends' offsets and skips.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche (splitmix64), so close inputs give unrelated outputs.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn backend_key(addr: &L4Addr) -> Vec<u8> {
    addr.to_string().into_bytes()
}

/// The lookup table for `backends` (an index into `backends` per slot), or
/// an empty table when there is no backend. `seed` must be the same on every
/// node (Cilium's `maglev.hashSeed`).
pub fn build_table(backends: &[L4Addr], size: u32, seed: u64) -> Result<Vec<u32>, MaglevError> {
    if !TABLE_SIZES.contains(&size) {
        return Err(MaglevError::BadTableSize(size));
    }
    if backends.is_empty() {
        return Ok(Vec::new());
    }
    if backends.len() > size as usize {
        return Err(MaglevError::TooManyBackends {
            backends: backends.len(),
            size,
        });
    }
    // Order by address so the table does not depend on the caller's order.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|i| backends[*i]);
    let m = u64::from(size);
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|i| {
            let key = backend_key(&backends[*i]);
            let offset = fnv1a(seed, &key) % m;
            let skip = fnv1a(seed ^ 0x5bd1_e995, &key) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0usize;
    'fill: loop {
        for (n, i) in order.iter().enumerate() {
            let (offset, skip) = perms[n];
            // The backend's next preferred slot that is still free.
            let mut slot = (offset + next[n] * skip) % m;
            while table[slot as usize] != u32::MAX {
                next[n] += 1;
                slot = (offset + next[n] * skip) % m;
            }
            table[slot as usize] = *i as u32;
            next[n] += 1;
            filled += 1;
            if filled == size as usize {
                break 'fill;
            }
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn backends(n: usize) -> Vec<L4Addr> {
        (0..n)
            .map(|i| L4Addr {
                ip: format!("10.244.{}.{}", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap(),
                port: 8080,
                proto: Protocol::Tcp,
            })
            .collect()
    }

    #[test]
    fn every_backend_gets_a_near_equal_share() {
        let b = backends(7);
        let table = build_table(&b, 16381, 0).unwrap();
        assert_eq!(table.len(), 16381);
        let mut counts = [0usize; 7];
        for slot in &table {
            counts[*slot as usize] += 1;
        }
        let ideal = 16381.0 / 7.0;
        for c in counts {
            assert!((c as f64 - ideal).abs() / ideal < 0.02, "shares {counts:?}");
        }
    }

    #[test]
    fn removing_one_backend_moves_little_more_than_its_own_slots() {
        let b = backends(10);
        let before = build_table(&b, 4093, 7).unwrap();
        let mut fewer = b.clone();
        let removed = fewer.remove(3);
        let after = build_table(&fewer, 4093, 7).unwrap();
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| b[**x as usize] != fewer[**y as usize] && b[**x as usize] != removed)
            .count();
        // Slots of surviving backends that changed owner: Maglev keeps this
        // small (the paper's near-minimal disruption), far below a rehash's ~90 %.
        assert!(
            moved < 4093 / 10,
            "{moved} of 4093 slots of surviving backends moved"
        );
    }

    #[test]
    fn the_table_depends_on_the_backend_set_and_seed_not_on_order() {
        let b = backends(5);
        let mut shuffled = b.clone();
        shuffled.reverse();
        let t1: Vec<L4Addr> = build_table(&b, 251, 1)
            .unwrap()
            .iter()
            .map(|i| b[*i as usize])
            .collect();
        let t2: Vec<L4Addr> = build_table(&shuffled, 251, 1)
            .unwrap()
            .iter()
            .map(|i| shuffled[*i as usize])
            .collect();
        assert_eq!(t1, t2);
        let t3: Vec<L4Addr> = build_table(&b, 251, 2)
            .unwrap()
            .iter()
            .map(|i| b[*i as usize])
            .collect();
        assert_ne!(t1, t3);
    }

    #[test]
    fn bad_sizes_and_overfull_tables_are_clear_errors() {
        assert_eq!(
            build_table(&backends(1), 1000, 0),
            Err(MaglevError::BadTableSize(1000))
        );
        assert!(matches!(
            build_table(&backends(300), 251, 0),
            Err(MaglevError::TooManyBackends { .. })
        ));
        assert_eq!(build_table(&[], 251, 0), Ok(Vec::new()));
    }

    #[test]
    fn a_golden_table_pins_the_hash() {
        // Every node must compute the same table: pin the first slots.
        let b = backends(3);
        let t = build_table(&b, 251, 0).unwrap();
        assert_eq!(t[..12].to_vec(), GOLDEN_SLOTS.to_vec());
        assert_eq!(format!("{:016x}", fnv1a(0, b"kpr")), GOLDEN_HASH);
    }

    #[test]
    fn the_table_size_flag_takes_only_the_listed_primes() {
        assert_eq!(parse_table_size("16381"), Ok(16381));
        assert_eq!(parse_table_size(" 251 "), Ok(251));
        let err = parse_table_size("16384").unwrap_err();
        assert!(err.contains("16384") && err.contains("16381"), "{err}");
        assert!(parse_table_size("big")
            .unwrap_err()
            .contains("not a number"));
        assert_eq!(
            MaglevParams::new(1000, 0),
            Err(MaglevError::BadTableSize(1000))
        );
        let p = MaglevParams::new(251, 0x0000_0001_0000_0003).unwrap();
        assert_eq!(p.flow_hash_seed(), 2);
        assert_eq!(MaglevParams::default().table_size(), 16381);
    }

    const GOLDEN_HASH: &str = "6cf24a4bb5dc5c62";
    const GOLDEN_SLOTS: [u32; 12] = [1, 1, 1, 0, 0, 0, 1, 2, 1, 2, 0, 1];
}
