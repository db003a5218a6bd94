//! The dtype cast matrix, in one place. Float conversions round to nearest,
//! ties to even (`half`'s conversions and Rust's `as f32` both do), which is
//! what MindSpore/numpy produce for the same casts.

use half::{bf16, f16};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::boxes::BoxCopy;

/// Checks a box copy against its buffers (`src_len`, `dst_len` bytes) and
/// that its cast is one the backends do: what every backend checks first.
pub(crate) fn check_box_copy(copy: &BoxCopy, src_len: usize, dst_len: usize) -> Result<()> {
    copy.validate(src_len, dst_len)?;
    if !supported(copy.src_dtype, copy.dst_dtype) {
        return Err(Error::UnsupportedDtype {
            dtype: format!("{} → {}", copy.src_dtype, copy.dst_dtype),
            op: "box copy",
        });
    }
    Ok(())
}

/// Whether `from → to` is a cast this backend performs.
pub fn supported(from: DType, to: DType) -> bool {
    let float = |d| matches!(d, DType::F16 | DType::BF16 | DType::F32 | DType::F64);
    from == to || (float(from) && float(to))
}

/// Converts every `FS`-byte element of `src` into a `TS`-byte element of
/// `dst` with `f`. Fixed sizes make each load and store a plain move (a
/// `copy_from_slice` of a runtime length is a `memmove` call per element).
fn convert<const FS: usize, const TS: usize>(
    src: &[u8],
    dst: &mut [u8],
    f: impl Fn([u8; FS]) -> [u8; TS],
) {
    for (s, d) in src.chunks_exact(FS).zip(dst.chunks_exact_mut(TS)) {
        let s: [u8; FS] = s.try_into().expect("chunks_exact");
        let d: &mut [u8; TS] = d.try_into().expect("chunks_exact_mut");
        *d = f(s);
    }
}

/// Elements converted per block by the f16 fast paths.
const BLOCK: usize = 4096;

/// f32 → f16 and back through `half`'s slice conversions, which use the
/// CPU's F16C instructions when present (detected at run time); blocks of
/// aligned scratch arrays bridge the unaligned byte buffers.
fn f16_via_f32(from: DType, src: &[u8], to: DType, dst: &mut [u8]) {
    use half::slice::HalfFloatSliceExt;
    let (fs, ts) = (from.size(), to.size());
    let mut wide = [0f32; BLOCK];
    let mut narrow = [f16::ZERO; BLOCK];
    for (s, d) in src.chunks(BLOCK * fs).zip(dst.chunks_mut(BLOCK * ts)) {
        let n = s.len() / fs;
        // Widen the source to f32.
        match from {
            DType::F32 => convert(s, bytemuck_f32(&mut wide[..n]), |b: [u8; 4]| b),
            DType::F16 => {
                convert(s, bytemuck_f16(&mut narrow[..n]), |b: [u8; 2]| b);
                narrow[..n].convert_to_f32_slice(&mut wide[..n]);
            }
            DType::BF16 => convert(s, bytemuck_f32(&mut wide[..n]), |b: [u8; 2]| {
                bf16::from_le_bytes(b).to_f32().to_le_bytes()
            }),
            _ => unreachable!("f16 fast path sources"),
        }
        // Narrow (or store) into the destination.
        match to {
            DType::F32 => convert(bytemuck_f32(&mut wide[..n]), d, |b: [u8; 4]| b),
            DType::F16 => {
                narrow[..n].convert_from_f32_slice(&wide[..n]);
                convert(bytemuck_f16(&mut narrow[..n]), d, |b: [u8; 2]| b);
            }
            DType::BF16 => convert(bytemuck_f32(&mut wide[..n]), d, |b: [u8; 4]| {
                bf16::from_f32(f32::from_le_bytes(b)).to_le_bytes()
            }),
            _ => unreachable!("f16 fast path destinations"),
        }
    }
}

/// The bytes of an f32 scratch array (little-endian, as every target we build for).
fn bytemuck_f32(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: f32 has no invalid bit patterns and no padding; u8 has
    // alignment 1; the length covers exactly the same memory.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 4) }
}

/// The bytes of an f16 scratch array.
fn bytemuck_f16(v: &mut [f16]) -> &mut [u8] {
    // SAFETY: f16 is a transparent u16: no invalid bit patterns, no padding.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 2) }
}

/// Converts `src` (elements of `from`) into `dst` (elements of `to`). Each
/// pair converts directly (never through f64 into a narrower type), so
/// there is one rounding, to nearest, ties to even.
pub fn cast_slice(from: DType, src: &[u8], to: DType, dst: &mut [u8]) -> Result<()> {
    use DType::{BF16, F16, F32, F64};
    let (b16, h16) = (bf16::from_le_bytes, f16::from_le_bytes);
    match (from, to) {
        _ if from == to => dst.copy_from_slice(src),
        (BF16, F32) => convert(src, dst, |b| b16(b).to_f32().to_le_bytes()),
        (F16, F32) | (F32, F16) | (BF16, F16) | (F16, BF16) if cfg!(target_endian = "little") => {
            f16_via_f32(from, src, to, dst)
        }
        (F16, F32) => convert(src, dst, |b| h16(b).to_f32().to_le_bytes()),
        (F64, F32) => convert(src, dst, |b| (f64::from_le_bytes(b) as f32).to_le_bytes()),
        (F32, BF16) => convert(src, dst, |b| {
            bf16::from_f32(f32::from_le_bytes(b)).to_le_bytes()
        }),
        (F32, F16) => convert(src, dst, |b| {
            f16::from_f32(f32::from_le_bytes(b)).to_le_bytes()
        }),
        (F32, F64) => convert(src, dst, |b| (f32::from_le_bytes(b) as f64).to_le_bytes()),
        (BF16, F64) => convert(src, dst, |b| b16(b).to_f64().to_le_bytes()),
        (F16, F64) => convert(src, dst, |b| h16(b).to_f64().to_le_bytes()),
        (F64, BF16) => convert(src, dst, |b| {
            bf16::from_f64(f64::from_le_bytes(b)).to_le_bytes()
        }),
        (F64, F16) => convert(src, dst, |b| {
            f16::from_f64(f64::from_le_bytes(b)).to_le_bytes()
        }),
        // bf16 ↔ f16 through f32, which holds both exactly.
        (BF16, F16) => convert(src, dst, |b| f16::from_f32(b16(b).to_f32()).to_le_bytes()),
        (F16, BF16) => convert(src, dst, |b| bf16::from_f32(h16(b).to_f32()).to_le_bytes()),
        _ => {
            return Err(Error::UnsupportedDtype {
                dtype: format!("{from} → {to}"),
                op: "cast",
            })
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: ties to even (1.0).
        let x = 1.0f32 + f32::powi(2.0, -8);
        let mut out = [0u8; 2];
        cast_slice(DType::F32, &x.to_le_bytes(), DType::BF16, &mut out).unwrap();
        assert_eq!(bf16::from_le_bytes(out).to_f32(), 1.0);
        let y = 1.0f32 + 3.0 * f32::powi(2.0, -8);
        cast_slice(DType::F32, &y.to_le_bytes(), DType::BF16, &mut out).unwrap();
        assert_eq!(bf16::from_le_bytes(out).to_f32(), 1.0 + f32::powi(2.0, -6));
    }

    #[test]
    fn every_float_pair_agrees_with_a_reference() {
        let values = [
            0.0f64,
            -0.0,
            1.0,
            -2.5,
            3.25,
            65504.0,
            1e-7,
            6.1e-5,
            1e30,
            f64::INFINITY,
        ];
        let floats = [DType::F16, DType::BF16, DType::F32, DType::F64];
        let encode = |d: DType, v: f64| -> Vec<u8> {
            match d {
                DType::F16 => f16::from_f64(v).to_le_bytes().to_vec(),
                DType::BF16 => bf16::from_f64(v).to_le_bytes().to_vec(),
                DType::F32 => (v as f32).to_le_bytes().to_vec(),
                _ => v.to_le_bytes().to_vec(),
            }
        };
        let decode = |d: DType, b: &[u8]| -> f64 {
            match d {
                DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f64(),
                DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f64(),
                DType::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
                _ => f64::from_le_bytes(b.try_into().unwrap()),
            }
        };
        for from in floats {
            for to in floats {
                let src: Vec<u8> = values.iter().flat_map(|&v| encode(from, v)).collect();
                let mut dst = vec![0u8; values.len() * to.size()];
                cast_slice(from, &src, to, &mut dst).unwrap();
                for (i, &v) in values.iter().enumerate() {
                    let x = decode(from, &encode(from, v));
                    // One rounding of the exact source value into `to`.
                    let want = encode(to, x);
                    assert_eq!(
                        &dst[i * to.size()..(i + 1) * to.size()],
                        &want[..],
                        "{from} → {to} of {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn widening_is_exact_and_ints_are_refused() {
        let v = bf16::from_f32(-3.5);
        let mut out = [0u8; 8];
        cast_slice(DType::BF16, &v.to_le_bytes(), DType::F64, &mut out).unwrap();
        assert_eq!(f64::from_le_bytes(out), -3.5);
        let err = cast_slice(DType::I32, &[0; 4], DType::F32, &mut [0; 4]).unwrap_err();
        assert!(err.to_string().contains("Int32 → Float32"), "{err}");
    }
}
