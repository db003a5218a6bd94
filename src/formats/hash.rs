//! The one hash of reshard's integrity data (manifests, `verify`): XXH3-64
//! with seed 0. `twox-hash` picks AVX2 or NEON at run time, so a portable
//! build hashes at memory speed on the machines it lands on.

use std::hash::Hasher as _;

/// Streaming XXH3-64.
#[derive(Clone, Default)]
pub struct Hasher(twox_hash::XxHash3_64);

impl Hasher {
    /// A hasher over no bytes yet.
    pub fn new() -> Hasher {
        Hasher::default()
    }

    /// Appends `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    /// The hash of everything appended.
    pub fn digest(&self) -> u64 {
        self.0.finish()
    }
}

/// XXH3-64 of `bytes`.
pub fn hash(bytes: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_equals_one_shot_and_the_reference_values() {
        // Reference values from the xxHash project (XXH3_64bits, seed 0).
        assert_eq!(hash(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(hash(b"abc"), 0x78af_5f94_892f_3950);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let mut h = Hasher::new();
        for part in data.chunks(777) {
            h.update(part);
        }
        assert_eq!(h.digest(), hash(&data));
        assert_eq!(hash(&data), xxhash_rust::xxh3::xxh3_64(&data));
    }
}
