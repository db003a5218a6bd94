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
                        // Straight from the mapped source: no buffer at all.
                        return Ok(Filled::Mapped(
                            sources.get(only.source)?.chunks(&only.tensor)?,
                        ));
                    }
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
        && c.src_axes.iter().enumerate().all(|(d, &a)| d == a)
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
    use crate::DType;

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
