//! Who converts which destination ranks (`TransformCkpt`'s work split,
//! spec §5.1), with and without a shared disk.

use serde::Serialize;

use crate::error::{Error, Result};

/// A contiguous block of destination ranks and the rank that converts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Block {
    /// The converting rank: the first rank of the block.
    pub converter: usize,
    /// The destination ranks, ascending and contiguous.
    pub ranks: Vec<usize>,
    /// The node of the block (`converter / npu_num_per_node`).
    pub node: usize,
}

/// The whole job's split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkSplit {
    /// Blocks in rank order; together they cover `0..world_size` once.
    pub blocks: Vec<Block>,
    /// `transform_process_num` after clamping to the world size.
    pub process_num: usize,
    /// Devices per node.
    pub npu_num_per_node: usize,
    /// Whether blocks were cut at node boundaries (no shared disk).
    pub node_local: bool,
}

impl WorkSplit {
    /// The split of a job of `world` ranks over `process_num` converting
    /// processes, as mindformers' `TransformCkpt` does it:
    /// - `npu_num_per_node` must be a power of two;
    /// - `process_num` must be at least 1; above `world` it is clamped to
    ///   `world` (with a note, as mindformers warns), and it must divide
    ///   `world`;
    /// - ranks `0, W/K, 2W/K, …` convert blocks of `W/K` ranks each.
    ///
    /// Without a shared disk (`node_local`), each block is further cut at
    /// node boundaries (node = `rank / npu_num_per_node`) and each piece is
    /// converted by its first rank, on its own node: every node converts
    /// exactly the destination ranks it hosts (with `process_num = 1` that
    /// is one converter per node, like mindformers on ModelArts).
    pub fn new(
        world: usize,
        process_num: usize,
        npu_num_per_node: usize,
        node_local: bool,
        notes: &mut Vec<String>,
    ) -> Result<WorkSplit> {
        if npu_num_per_node == 0 || !npu_num_per_node.is_power_of_two() {
            return Err(Error::usage(format!(
                "npu_num_per_node (or DEVICE_NUM_PER_NODE) must be a power of 2, not {npu_num_per_node}"
            )));
        }
        if process_num == 0 {
            return Err(Error::usage(
                "transform_process_num must be at least 1 (1: the first rank converts, the others wait)",
            ));
        }
        let mut k = process_num;
        if k > world {
            notes.push(format!(
                "transform_process_num {k} is above the world size {world}; using {world}"
            ));
            k = world;
        }
        if world % k != 0 {
            return Err(Error::usage(format!(
                "transform_process_num {k} must divide the world size {world} (each converting \
                 rank takes world_size / transform_process_num destination ranks); try one of {}",
                divisors(world)
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let per = world / k;
        let mut blocks = Vec::new();
        for c in 0..k {
            let (start, end) = (c * per, (c + 1) * per);
            if node_local {
                let mut s = start;
                while s < end {
                    let node_end = (s / npu_num_per_node + 1) * npu_num_per_node;
                    let e = node_end.min(end);
                    blocks.push(Block {
                        converter: s,
                        ranks: (s..e).collect(),
                        node: s / npu_num_per_node,
                    });
                    s = e;
                }
            } else {
                blocks.push(Block {
                    converter: start,
                    ranks: (start..end).collect(),
                    node: start / npu_num_per_node,
                });
            }
        }
        Ok(WorkSplit {
            blocks,
            process_num: k,
            npu_num_per_node,
            node_local,
        })
    }

    /// The node of `rank`.
    pub fn node_of(&self, rank: usize) -> usize {
        rank / self.npu_num_per_node
    }

    /// The block `rank` converts, if it is a converting rank.
    pub fn block_converted_by(&self, rank: usize) -> Option<&Block> {
        self.blocks.iter().find(|b| b.converter == rank)
    }

    /// The block holding destination rank `rank`.
    pub fn block_of(&self, rank: usize) -> &Block {
        self.blocks
            .iter()
            .find(|b| b.ranks.contains(&rank))
            .expect("the blocks cover every rank")
    }

    /// The blocks whose markers `rank` can see and waits for: all of them
    /// on a shared disk, its node's without one.
    pub fn blocks_seen_by(&self, rank: usize) -> Vec<&Block> {
        let node = self.node_of(rank);
        self.blocks
            .iter()
            .filter(|b| !self.node_local || b.node == node)
            .collect()
    }

    /// The converting ranks.
    pub fn converters(&self) -> Vec<usize> {
        self.blocks.iter().map(|b| b.converter).collect()
    }
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n % d == 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(w: usize, k: usize, npn: usize, local: bool) -> Vec<(usize, Vec<usize>)> {
        WorkSplit::new(w, k, npn, local, &mut Vec::new())
            .unwrap()
            .blocks
            .into_iter()
            .map(|b| (b.converter, b.ranks))
            .collect()
    }

    #[test]
    fn mindformers_split() {
        assert_eq!(split(8, 1, 8, false), vec![(0, (0..8).collect())]);
        assert_eq!(
            split(8, 2, 8, false),
            vec![(0, vec![0, 1, 2, 3]), (4, vec![4, 5, 6, 7])]
        );
        assert_eq!(split(8, 8, 4, false).len(), 8);
        assert_eq!(split(8, 8, 4, false)[5], (5, vec![5]));
    }

    #[test]
    fn node_local_cuts_at_node_boundaries() {
        // One converter per node with process_num 1.
        assert_eq!(
            split(8, 1, 4, true),
            vec![(0, vec![0, 1, 2, 3]), (4, vec![4, 5, 6, 7])]
        );
        assert_eq!(
            split(8, 4, 4, true),
            vec![
                (0, vec![0, 1]),
                (2, vec![2, 3]),
                (4, vec![4, 5]),
                (6, vec![6, 7])
            ]
        );
        // A world smaller than a node: one node.
        assert_eq!(split(2, 1, 8, true), vec![(0, vec![0, 1])]);
        let s = WorkSplit::new(8, 2, 4, true, &mut Vec::new()).unwrap();
        assert_eq!(s.blocks_seen_by(6).len(), 1);
        assert_eq!(s.blocks_seen_by(6)[0].converter, 4);
        assert_eq!(s.block_of(3).converter, 0);
    }

    #[test]
    fn constraints_of_section_5_1() {
        let mut notes = Vec::new();
        let e = WorkSplit::new(8, 3, 8, false, &mut notes)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("must divide the world size 8") && e.contains("1, 2, 4, 8"),
            "{e}"
        );
        let e = WorkSplit::new(8, 0, 8, false, &mut notes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 1"), "{e}");
        let e = WorkSplit::new(8, 1, 6, false, &mut notes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("power of 2"), "{e}");
        let s = WorkSplit::new(4, 16, 8, false, &mut notes).unwrap();
        assert_eq!((s.process_num, s.blocks.len()), (4, 4));
        assert!(notes[0].contains("above the world size"), "{notes:?}");
    }
}
