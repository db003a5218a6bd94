//! Filling one destination tensor by the cheapest route: straight from a
//! mapped source (a plain copy), box copies into a backend buffer, or a
//! LoRA merge (gather W, B and A, GEMM-add, round once).

use std::collections::HashMap;

use super::job::Job;
use super::sources::Sources;
use super::wire;
use crate::backend::{Backend, SourceKey, Src};
use crate::error::Result;
use crate::layout::boxes::BoxCopy;
use crate::plan::{Content, CopyStep, LoraTerm, TensorPlan};

impl<'p, B: Backend> Job<'p, B> {
    /// The bytes of tensor `t` (not a string entry), by the cheapest route.
    pub(super) fn fill(&self, t: &TensorPlan) -> Result<Filled<'_, B::Buffer>> {
        let sources = &self.sources;
        match &t.content {
            Content::Str { .. } => unreachable!("string values are read when the file is laid out"),
            Content::Tensor { steps, .. } => {
                if let [only] = steps.as_slice() {
                    if is_plain_copy(&only.copy) {
                        if let Some(b) = sources.received(only) {
                            return Ok(Filled::Host(b?));
                        }
                    }
                }
                // Straight from the mapped sources: no buffer at all.
                if let Some(runs) = mapped_runs(steps, t.bytes(), sources)? {
                    return Ok(Filled::Mapped(runs));
                }
                let bytes = t.bytes() as usize;
                let buffer = gather(self.backend, sources, steps, bytes)?;
                self.on_host(buffer, bytes)
            }
            Content::Merged {
                dtype,
                shape,
                steps,
                lora,
            } => {
                let out = merged(*dtype, shape, steps, lora, sources, self.backend)?;
                self.on_host(out, t.bytes() as usize)
            }
        }
    }

    /// A filled buffer, readable from the host.
    pub(super) fn on_host(&self, buffer: B::Buffer, bytes: usize) -> Result<Filled<'_, B::Buffer>> {
        self.backend.synchronize()?;
        if self.backend.host_bytes(&buffer).is_some() {
            return Ok(Filled::Buffer(buffer));
        }
        let mut host = vec![0u8; bytes];
        self.backend.download(&buffer, 0, &mut host)?;
        self.backend.synchronize()?;
        Ok(Filled::Host(host))
    }
}

/// A tensor's bytes, wherever they are.
pub(super) enum Filled<'s, Buf> {
    /// Parts of a mapped source.
    Mapped(Vec<&'s [u8]>),
    /// A backend buffer the host can read.
    Buffer(Buf),
    /// Downloaded from the device.
    Host(Vec<u8>),
    /// A string entry (its bytes are in the layout).
    Str(String),
}

impl<Buf> Filled<'_, Buf> {
    pub(super) fn chunks<B: Backend<Buffer = Buf>>(&self, backend: &B) -> Vec<&[u8]> {
        match self {
            Filled::Mapped(chunks) => chunks.clone(),
            Filled::Buffer(b) => vec![backend.host_bytes(b).expect("checked in on_host")],
            Filled::Host(h) => vec![h],
            Filled::Str(_) => Vec::new(),
        }
    }
}

/// A copy that is the whole source tensor, unchanged: same dtype, same
/// shape, no axis permutation (a square transpose has equal shapes).
pub(super) fn is_plain_copy(c: &BoxCopy) -> bool {
    c.src_dtype == c.dst_dtype
        && c.src_shape == c.dst_shape
        && c.extent == c.src_shape
        && c.axes_in_order()
}

/// The bytes of a tensor of `bytes` bytes as slices of the mapped
/// sources, in order, when every step copies one contiguous run of its
/// source, unchanged, to one contiguous run of the tensor and the runs tile
/// it (a whole tensor, or rows of one: most splits along the first axis and
/// their merges); `None` when a buffer has to be gathered.
fn mapped_runs<'s>(
    steps: &[CopyStep],
    bytes: u64,
    sources: &'s Sources<'_>,
) -> Result<Option<Vec<&'s [u8]>>> {
    let mut runs = Vec::with_capacity(steps.len());
    for step in steps {
        match contiguous_run(&step.copy) {
            Some(run) if !sources.elsewhere(step.source) => runs.push((run, step)),
            _ => return Ok(None),
        }
    }
    runs.sort_by_key(|(run, _)| run.dst);
    let mut end = 0;
    for (run, _) in &runs {
        if run.dst != end {
            return Ok(None);
        }
        end += run.len;
    }
    if end != bytes {
        return Ok(None);
    }
    let mut slices = Vec::with_capacity(runs.len());
    for (run, step) in runs {
        let chunks = sources.get(step.source)?.chunks(&step.tensor)?;
        let len = chunks.iter().map(|c| c.len()).sum();
        step.copy.validate(len, bytes as usize)?;
        slices.extend(sub_slices(&chunks, run.src, run.len));
    }
    Ok(Some(slices))
}

/// Where a box copy reads and writes, when both are one contiguous run.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Run {
    /// Byte offset in the source tensor.
    pub src: u64,
    /// Byte offset in the destination tensor.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// The run a box copy reads and the run it writes, when it copies bytes
/// unchanged (same dtype, axes in order) from one contiguous run of the
/// source to one contiguous run of the destination.
pub(super) fn contiguous_run(c: &BoxCopy) -> Option<Run> {
    let rank = c.extent.len();
    if c.src_dtype != c.dst_dtype
        || !c.axes_in_order()
        || [
            c.src_shape.len(),
            c.src_offset.len(),
            c.dst_shape.len(),
            c.dst_offset.len(),
        ]
        .iter()
        .any(|&n| n != rank)
    {
        return None;
    }
    let size = c.dst_dtype.size() as u64;
    if c.extent.contains(&0) {
        return Some(Run {
            src: 0,
            dst: 0,
            len: 0,
        });
    }
    // Row-major, a box is one run when every axis inside its outermost
    // axis of extent above 1 is whole.
    let outer = c.extent.iter().position(|&e| e > 1).unwrap_or(rank);
    let start = |shape: &[u64], offset: &[u64]| -> Option<u64> {
        let whole = (outer + 1..rank).all(|d| c.extent[d] == shape[d]);
        whole.then(|| {
            offset
                .iter()
                .zip(shape)
                .fold(0u64, |at, (&o, &n)| at * n + o)
                * size
        })
    };
    Some(Run {
        src: start(&c.src_shape, &c.src_offset)?,
        dst: start(&c.dst_shape, &c.dst_offset)?,
        len: c.extent.iter().product::<u64>() * size,
    })
}

/// The bytes `at..at + len` of the concatenation of `chunks`, as slices of
/// them.
fn sub_slices<'a>(chunks: &[&'a [u8]], mut at: u64, mut len: u64) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    for chunk in chunks {
        let n = chunk.len() as u64;
        if at >= n {
            at -= n;
            continue;
        }
        if len == 0 {
            break;
        }
        let take = len.min(n - at);
        out.push(&chunk[at as usize..(at + take) as usize]);
        len -= take;
        at = 0;
    }
    out
}

/// A buffer of `bytes` filled by `steps` from the sources.
pub(super) fn gather<B: Backend>(
    backend: &B,
    sources: &Sources<'_>,
    steps: &[CopyStep],
    bytes: usize,
) -> Result<B::Buffer> {
    let mut buffer = backend.alloc(bytes)?;
    let mut joined: HashMap<(usize, &str), Vec<u8>> = HashMap::new();
    for step in steps {
        if let Some(b) = sources.received(step) {
            backend.box_copy(Src::Host(&b?), &mut buffer, &wire::placing(&step.copy))?;
            continue;
        }
        let chunks = sources.get(step.source)?.chunks(&step.tensor)?;
        let src: &[u8] = match chunks.as_slice() {
            [one] => one,
            many => joined
                .entry((step.source, step.tensor.as_str()))
                .or_insert_with(|| many.concat()),
        };
        let key = SourceKey {
            job: sources.job,
            source: step.source,
            tensor: step.tensor.clone(),
        };
        backend.box_copy_source(&key, src, &mut buffer, &step.copy)?;
    }
    Ok(buffer)
}

/// A merged weight: gathers W, B rows and A columns as `f32`, adds
/// `scale · B·A` block by block, and rounds once to the weight's dtype.
pub(super) fn merged<B: Backend>(
    dtype: crate::DType,
    shape: &[i64],
    steps: &[CopyStep],
    lora: &LoraTerm,
    sources: &Sources<'_>,
    backend: &B,
) -> Result<B::Buffer> {
    let count: u64 = shape.iter().product::<i64>().max(0) as u64;
    // A weight whose pieces are all stored in its own dtype is gathered in
    // that dtype (a plain copy) and merged in place, widening, adding and
    // rounding tile by tile: the same bits as the f32 route below, with
    // each weight byte touched once and no f32 copy of the weight.
    let fused = sources.remote.is_none()
        && matches!(dtype, crate::DType::BF16 | crate::DType::F16)
        && steps
            .iter()
            .all(|s| s.copy.src_dtype == dtype && s.copy.dst_dtype == crate::DType::F32);
    if fused {
        let steps: Vec<CopyStep> = steps
            .iter()
            .map(|s| {
                let mut s = s.clone();
                s.copy.dst_dtype = dtype;
                s
            })
            .collect();
        let mut w = gather(backend, sources, &steps, count as usize * dtype.size())?;
        let (b, a) = lora_operands(lora, sources, backend)?;
        backend.lora_add_rounded(&mut w, dtype, &b, &a, &lora.blocks)?;
        return Ok(w);
    }
    let mut w = gather(backend, sources, steps, count as usize * 4)?;
    let (b, a) = lora_operands(lora, sources, backend)?;
    for block in &lora.blocks {
        backend.lora_add(&mut w, &b, &a, block)?;
    }
    drop((a, b));
    let mut out = backend.alloc(count as usize * dtype.size())?;
    backend.box_copy(
        Src::Buffer(&w),
        &mut out,
        &BoxCopy::whole(&[count], crate::DType::F32, dtype),
    )?;
    Ok(out)
}

/// The `B` and `A` operands of a LoRA merge, gathered in `f32`.
pub(super) fn lora_operands<B: Backend>(
    lora: &LoraTerm,
    sources: &Sources<'_>,
    backend: &B,
) -> Result<(B::Buffer, B::Buffer)> {
    let matrix = |steps: &[CopyStep], [rows, cols]: [u64; 2]| {
        gather(backend, sources, steps, (rows * cols) as usize * 4)
    };
    Ok((
        matrix(&lora.b_steps, lora.b_shape)?,
        matrix(&lora.a_steps, lora.a_shape)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::DType;
    use proptest::prelude::*;

    /// A same-dtype box copy between small tensors of equal rank.
    fn arb_box() -> impl Strategy<Value = BoxCopy> {
        (1usize..=3)
            .prop_flat_map(|rank| proptest::collection::vec((1u64..=4, 1u64..=4, 1u64..=4), rank))
            .prop_flat_map(|dims| {
                let per: Vec<_> = dims
                    .iter()
                    .map(|&(s, d, e)| {
                        let e = e.min(s).min(d);
                        (Just(s), Just(d), Just(e), 0..=s - e, 0..=d - e)
                    })
                    .collect();
                per
            })
            .prop_map(|per| BoxCopy {
                src_shape: per.iter().map(|p| p.0).collect(),
                src_dtype: DType::BF16,
                src_offset: per.iter().map(|p| p.3).collect(),
                dst_shape: per.iter().map(|p| p.1).collect(),
                dst_dtype: DType::BF16,
                dst_offset: per.iter().map(|p| p.4).collect(),
                extent: per.iter().map(|p| p.2).collect(),
                src_axes: Vec::new(),
            })
    }

    proptest! {
        /// `contiguous_run` finds a run exactly when the box copy reads
        /// consecutive source elements into consecutive destination ones,
        /// and then the right one.
        #[test]
        fn contiguous_run_is_what_the_box_copy_does(c in arb_box()) {
            let src: Vec<u8> = (0..c.src_shape.iter().product::<u64>() as u16)
                .flat_map(u16::to_le_bytes)
                .collect();
            let unset = 0xffffu16;
            let dst_elements = c.dst_shape.iter().product::<u64>() as usize;
            let mut dst = crate::backend::cpu::buf(&unset.to_le_bytes().repeat(dst_elements));
            CpuBackend::new(1).box_copy(Src::Host(&src), &mut dst, &c).unwrap();
            let written: Vec<(u64, u64)> = dst
                .bytes()
                .chunks(2)
                .enumerate()
                .filter_map(|(at, v)| {
                    let v = u16::from_le_bytes([v[0], v[1]]);
                    (v != unset).then_some((at as u64, v as u64))
                })
                .collect();
            let consecutive = written
                .windows(2)
                .all(|w| w[1].0 == w[0].0 + 1 && w[1].1 == w[0].1 + 1);
            let want = consecutive.then(|| Run {
                src: written[0].1 * 2,
                dst: written[0].0 * 2,
                len: written.len() as u64 * 2,
            });
            prop_assert_eq!(contiguous_run(&c), want);
        }
    }

    #[test]
    fn casts_and_transposes_are_never_runs() {
        let whole = BoxCopy::whole(&[4, 4], DType::BF16, DType::BF16);
        assert_eq!(
            contiguous_run(&whole),
            Some(Run {
                src: 0,
                dst: 0,
                len: 32
            })
        );
        assert_eq!(
            contiguous_run(&BoxCopy {
                dst_dtype: DType::F32,
                ..whole.clone()
            }),
            None
        );
        assert_eq!(
            contiguous_run(&BoxCopy {
                src_axes: vec![1, 0],
                ..whole
            }),
            None
        );
    }

    #[test]
    fn sub_slices_cross_chunk_boundaries() {
        let chunks: [&[u8]; 3] = [b"abc", b"", b"defgh"];
        let joined = |at, len| sub_slices(&chunks, at, len).concat();
        assert_eq!(joined(0, 8), b"abcdefgh");
        assert_eq!(joined(2, 3), b"cde");
        assert_eq!(joined(3, 2), b"de");
        assert_eq!(joined(7, 1), b"h");
        assert!(sub_slices(&chunks, 4, 0).is_empty());
    }

    #[test]
    fn a_square_transpose_is_not_a_plain_copy() {
        let whole = BoxCopy::whole(&[4, 4], DType::F32, DType::F32);
        assert!(is_plain_copy(&whole));
        assert!(is_plain_copy(&BoxCopy {
            src_axes: vec![0, 1],
            ..whole.clone()
        }));
        assert!(!is_plain_copy(&BoxCopy {
            src_axes: vec![1, 0],
            ..whole.clone()
        }));
        assert!(!is_plain_copy(&BoxCopy {
            dst_dtype: DType::BF16,
            ..whole
        }));
    }
}
