//! A tiny plan for the executor's unit tests: one 2×2 `f32` source tensor
//! `w` copied by `copy` into each of `outputs`.

use std::path::{Path, PathBuf};

use crate::formats::safetensors::{write, StWriteOptions, TensorRef};
use crate::formats::tree::FileFormat;
use crate::layout::boxes::BoxCopy;
use crate::plan::{Content, CopyStep, FilePlan, Plan, SourceFile, TensorPlan};
use crate::DType;

/// Writes the source `dir/src.safetensors` and returns the plan.
pub(super) fn one_tensor_plan(dir: &Path, outputs: &[(usize, PathBuf)], copy: &BoxCopy) -> Plan {
    let src = dir.join("src.safetensors");
    let data: Vec<u8> = (0..16u8).collect();
    let t = TensorRef {
        dtype: DType::F32,
        shape: vec![2, 2],
        data: &data,
    };
    write(&src, &[("w".to_string(), t)], &StWriteOptions::default()).unwrap();
    let files = outputs
        .iter()
        .map(|(rank, path)| FilePlan {
            rank: *rank,
            path: path.clone(),
            format: FileFormat::Safetensors,
            tensors: vec![TensorPlan {
                name: "w".into(),
                content: Content::Tensor {
                    dtype: DType::F32,
                    shape: vec![2, 2],
                    steps: vec![CopyStep {
                        source: 0,
                        tensor: "w".into(),
                        copy: copy.clone(),
                    }],
                },
            }],
            metadata: None,
        })
        .collect();
    Plan {
        sources: vec![SourceFile { rank: 0, path: src }],
        files,
    }
}
