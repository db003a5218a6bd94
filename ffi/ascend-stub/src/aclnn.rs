//! aclnn on the emulated machine: descriptors (`aclCreateTensor`, …) and
//! the two-phase ops. Phase 1 validates like the op docs say and returns a
//! workspace size and an executor; phase 2 checks the executor (single use)
//! and the workspace, and enqueues the op on the stream.

use std::ffi::c_void;

use ascendcl_sys::sys::*;

use crate::compute::{self, View};
use crate::runtime::{current_device, enqueue, fail, stream_of, tri};
use crate::state::*;
use crate::Emu;

#[derive(Clone)]
pub(crate) struct T {
    pub id: u64,
    pub addr: u64,
    pub view: View,
}

impl T {
    fn bytes_span(&self) -> (u64, u64) {
        let es = compute::size(self.view.dtype).unwrap() as i64;
        let last: i64 = self
            .view
            .dims
            .iter()
            .zip(&self.view.strides)
            .map(|(d, s)| (d - 1).max(0) * s)
            .sum();
        let lo = self.addr + (self.view.offset * es) as u64;
        let hi = if self.view.numel() == 0 {
            lo
        } else {
            self.addr + ((self.view.offset + last + 1) * es) as u64
        };
        (lo, hi)
    }
}

pub(crate) enum AclnnOp {
    Copy {
        dst: T,
        src: T,
    },
    Cast {
        src: T,
        out: T,
    },
    Cat {
        inputs: Vec<T>,
        dim: usize,
        out: T,
    },
    Slice {
        src: T,
        dim: usize,
        start: i64,
        step: i64,
        out: T,
    },
    Add {
        this: T,
        other: T,
        alpha: f64,
    },
    Addmm {
        this: T,
        m1: T,
        m2: T,
        beta: f64,
        alpha: f64,
    },
}

pub(crate) struct Executor {
    pub device: i32,
    pub name: &'static str,
    pub workspace: u64,
    pub op: AclnnOp,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn create_tensor(
    e: Emu,
    dims: *const i64,
    ndims: u64,
    dtype: aclDataType,
    strides: *const i64,
    offset: i64,
    format: aclFormat,
    storage: *const i64,
    nstorage: u64,
    data: *mut c_void,
) -> *mut aclTensor {
    let mut g = e.inst.lock();
    let slice = |p: *const i64, n: u64| -> Vec<i64> {
        if n == 0 || p.is_null() {
            Vec::new()
        } else {
            // SAFETY: the caller's arrays of `n` elements.
            unsafe { std::slice::from_raw_parts(p, n as usize) }.to_vec()
        }
    };
    let (view, stride, storage) = (
        slice(dims, ndims),
        slice(strides, ndims),
        slice(storage, nstorage),
    );
    let err = |g: &mut State, m: String| -> *mut aclTensor {
        let v = g.violation(format!("aclCreateTensor: {m}"));
        fail(0, v);
        std::ptr::null_mut()
    };
    let Some(es) = compute::size(dtype) else {
        return err(&mut g, format!("dtype {} is not supported", dtype.0));
    };
    if view.len() > 8 || storage.len() > 8 {
        return err(&mut g, format!("rank {} > 8", view.len()));
    }
    if format != ACL_FORMAT_ND {
        return err(
            &mut g,
            format!(
                "format {} is not ND (did offset and format swap?)",
                format.0
            ),
        );
    }
    if view.iter().chain(&storage).any(|d| *d < 0) || stride.iter().any(|s| *s < 0) || offset < 0 {
        return err(
            &mut g,
            format!(
                "negative dim, stride or offset: view {view:?} strides {stride:?} offset {offset}"
            ),
        );
    }
    let storage_numel: i64 = storage.iter().product();
    let numel: i64 = view.iter().product();
    let last: i64 = view
        .iter()
        .zip(&stride)
        .map(|(d, s)| (d - 1).max(0) * s)
        .sum();
    if numel > 0 && offset + last >= storage_numel {
        return err(
            &mut g,
            format!(
                "view {view:?} with strides {stride:?} at offset {offset} reaches element {} of a storage of {storage_numel}",
                offset + last
            ),
        );
    }
    let addr = data as u64;
    let bytes = storage_numel as u64 * es as u64;
    if bytes > 0 && g.find(addr, bytes).is_none() {
        return err(
            &mut g,
            format!("storage of {bytes} bytes at {addr:#x} is not inside a live device allocation"),
        );
    }
    let id = g.id();
    g.tensors.insert(
        id,
        TensorDesc {
            addr,
            view: View {
                dtype,
                dims: view,
                strides: stride,
                offset,
            },
        },
    );
    id as *mut aclTensor
}

pub(crate) fn destroy_tensor(e: Emu, t: *const aclTensor) -> aclnnStatus {
    let mut g = e.inst.lock();
    if g.tensors.remove(&(t as u64)).is_none() {
        let v = g.violation(format!("aclDestroyTensor({t:?}): not a live descriptor"));
        return fail(ACLNN_ERR_PARAM_INVALID, v);
    }
    ACLNN_SUCCESS
}

pub(crate) fn create_scalar(e: Emu, value: *mut c_void, dtype: aclDataType) -> *mut aclScalar {
    let mut g = e.inst.lock();
    if value.is_null() || !compute::is_float(dtype) && !compute::is_int(dtype) {
        fail(0, "aclCreateScalar: null value or unsupported dtype".into());
        return std::ptr::null_mut();
    }
    let es = compute::size(dtype).unwrap();
    // SAFETY: the caller's value of `dtype`.
    let bytes = unsafe { std::slice::from_raw_parts(value as *const u8, es) };
    let v = compute::to_f32(dtype, bytes) as f64;
    let v = if dtype == ACL_DOUBLE {
        f64::from_le_bytes(bytes.try_into().unwrap())
    } else {
        v
    };
    let id = g.id();
    g.scalars.insert(id, (dtype, v));
    id as *mut aclScalar
}

pub(crate) fn destroy_scalar(e: Emu, s: *const aclScalar) -> aclnnStatus {
    let mut g = e.inst.lock();
    if g.scalars.remove(&(s as u64)).is_none() {
        return fail(
            ACLNN_ERR_PARAM_INVALID,
            "aclDestroyScalar: not a live scalar".into(),
        );
    }
    ACLNN_SUCCESS
}

pub(crate) fn create_list(e: Emu, items: *const *const aclTensor, n: u64) -> *mut aclTensorList {
    let mut g = e.inst.lock();
    // SAFETY: the caller's array of `n` pointers.
    let ids: Vec<u64> = (0..n as usize)
        .map(|i| unsafe { *items.add(i) } as u64)
        .collect();
    if ids.iter().any(|i| !g.tensors.contains_key(i)) {
        fail(
            0,
            "aclCreateTensorList: a member is not a live descriptor".into(),
        );
        return std::ptr::null_mut();
    }
    let id = g.id();
    g.lists.insert(id, ids);
    id as *mut aclTensorList
}

pub(crate) fn destroy_list(e: Emu, l: *const aclTensorList) -> aclnnStatus {
    let mut g = e.inst.lock();
    if g.lists.remove(&(l as u64)).is_none() {
        return fail(
            ACLNN_ERR_PARAM_INVALID,
            "aclDestroyTensorList: not a live list".into(),
        );
    }
    ACLNN_SUCCESS
}

fn tensor(g: &mut State, p: *const aclTensor, what: &str, op: &str) -> Result<T, (i32, String)> {
    match g.tensors.get(&(p as u64)) {
        Some(t) => Ok(T {
            id: p as u64,
            addr: t.addr,
            view: t.view.clone(),
        }),
        None => Err((
            ACLNN_ERR_PARAM_NULLPTR,
            format!("{op}: {what} is not a live aclTensor"),
        )),
    }
}

fn scalar(g: &State, p: *const aclScalar, op: &str) -> Result<f64, (i32, String)> {
    g.scalars.get(&(p as u64)).map(|s| s.1).ok_or_else(|| {
        (
            ACLNN_ERR_PARAM_NULLPTR,
            format!("{op}: not a live aclScalar"),
        )
    })
}

fn invalid(g: &mut State, op: &str, m: String) -> (i32, String) {
    (ACLNN_ERR_PARAM_INVALID, g.violation(format!("{op}: {m}")))
}

fn contiguous(v: &View) -> bool {
    let mut expect = 1;
    for (d, s) in v.dims.iter().zip(&v.strides).rev() {
        if *d != 1 && *s != expect {
            return false;
        }
        expect *= d;
    }
    true
}

fn finish(
    g: &mut State,
    e: Emu,
    name: &'static str,
    workspace: u64,
    op: AclnnOp,
    ws_out: *mut u64,
    ex_out: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    if ws_out.is_null() || ex_out.is_null() {
        return fail(
            ACLNN_ERR_PARAM_NULLPTR,
            format!("{name}GetWorkspaceSize: null out-pointer"),
        );
    }
    let device = current_device(e, g).unwrap_or(-1);
    let id = g.id();
    g.executors.insert(
        id,
        Executor {
            device,
            name,
            workspace,
            op,
        },
    );
    // SAFETY: checked non-null out-pointers.
    unsafe {
        *ws_out = workspace;
        *ex_out = id as *mut aclOpExecutor;
    }
    ACLNN_SUCCESS
}

const FLOATS: [aclDataType; 3] = [ACL_FLOAT, ACL_FLOAT16, ACL_BF16];

fn copy_dtype_ok(d: aclDataType) -> bool {
    compute::is_float(d) || compute::is_int(d) || matches!(d, ACL_COMPLEX64 | ACL_COMPLEX128)
}

pub(crate) fn inplace_copy_ws(
    e: Emu,
    dst: *mut aclTensor,
    src: *const aclTensor,
    ws: *mut u64,
    ex: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    let name = "aclnnInplaceCopy";
    let mut g = e.inst.lock();
    let d = tri!(tensor(&mut g, dst, "selfRef", name));
    let s = tri!(tensor(&mut g, src, "src", name));
    if d.view.dims != s.view.dims {
        let m = format!(
            "shapes differ: selfRef {:?}, src {:?} (broadcast is not emulated)",
            d.view.dims, s.view.dims
        );
        let m = invalid(&mut g, name, m);
        return fail(m.0, m.1);
    }
    if !copy_dtype_ok(d.view.dtype) || !copy_dtype_ok(s.view.dtype) {
        let m = invalid(
            &mut g,
            name,
            format!(
                "dtypes {} → {} not supported",
                s.view.dtype.0, d.view.dtype.0
            ),
        );
        return fail(m.0, m.1);
    }
    if matches!(s.view.dtype, ACL_COMPLEX64 | ACL_COMPLEX128) && s.view.dtype != d.view.dtype {
        let m = invalid(&mut g, name, "complex casts are not supported".into());
        return fail(m.0, m.1);
    }
    let workspace = if contiguous(&d.view) && contiguous(&s.view) && d.view.dtype == s.view.dtype {
        0
    } else {
        512
    };
    finish(
        &mut g,
        e,
        name,
        workspace,
        AclnnOp::Copy { dst: d, src: s },
        ws,
        ex,
    )
}

pub(crate) fn cast_ws(
    e: Emu,
    src: *const aclTensor,
    dtype: aclDataType,
    out: *mut aclTensor,
    ws: *mut u64,
    ex: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    let name = "aclnnCast";
    let mut g = e.inst.lock();
    let s = tri!(tensor(&mut g, src, "self", name));
    let o = tri!(tensor(&mut g, out, "out", name));
    if o.view.dtype != dtype || o.view.dims != s.view.dims {
        let m = invalid(
            &mut g,
            name,
            format!(
                "out must have self's shape {:?} and dtype {}",
                s.view.dims, dtype.0
            ),
        );
        return fail(m.0, m.1);
    }
    if !copy_dtype_ok(dtype) || !copy_dtype_ok(s.view.dtype) {
        let m = invalid(&mut g, name, "unsupported dtype".into());
        return fail(m.0, m.1);
    }
    finish(&mut g, e, name, 0, AclnnOp::Cast { src: s, out: o }, ws, ex)
}

pub(crate) fn cat_ws(
    e: Emu,
    list: *const aclTensorList,
    dim: i64,
    out: *mut aclTensor,
    ws: *mut u64,
    ex: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    let name = "aclnnCat";
    let mut g = e.inst.lock();
    let Some(ids) = g.lists.get(&(list as u64)).cloned() else {
        return fail(
            ACLNN_ERR_PARAM_NULLPTR,
            format!("{name}: not a live aclTensorList"),
        );
    };
    let o = tri!(tensor(&mut g, out, "out", name));
    let mut inputs = Vec::new();
    for id in ids {
        inputs.push(tri!(tensor(&mut g, id as *const aclTensor, "member", name)));
    }
    let rank = o.view.dims.len() as i64;
    let d = if dim < 0 { dim + rank } else { dim };
    if inputs.is_empty() || !(0..rank).contains(&d) {
        let m = invalid(
            &mut g,
            name,
            format!("dim {dim} out of range or empty list"),
        );
        return fail(m.0, m.1);
    }
    let d = d as usize;
    let mut total = 0;
    for t in &inputs {
        let same = t.view.dims.len() == o.view.dims.len()
            && t.view
                .dims
                .iter()
                .zip(&o.view.dims)
                .enumerate()
                .all(|(i, (a, b))| i == d || a == b);
        if !same || matches!(t.view.dtype, ACL_UINT16 | ACL_UINT32 | ACL_UINT64) {
            let m = invalid(&mut g, name, format!("input {:?} does not match out {:?} except in dim {d} (or its dtype is unsupported on A2)", t.view.dims, o.view.dims));
            return fail(m.0, m.1);
        }
        total += t.view.dims[d];
    }
    if total != o.view.dims[d] {
        let m = invalid(
            &mut g,
            name,
            format!(
                "inputs sum to {total} along dim {d}, out has {}",
                o.view.dims[d]
            ),
        );
        return fail(m.0, m.1);
    }
    let workspace = 64 * inputs.len() as u64;
    finish(
        &mut g,
        e,
        name,
        workspace,
        AclnnOp::Cat {
            inputs,
            dim: d,
            out: o,
        },
        ws,
        ex,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn slice_ws(
    e: Emu,
    src: *const aclTensor,
    dim: i64,
    start: i64,
    end: i64,
    step: i64,
    out: *mut aclTensor,
    ws: *mut u64,
    ex: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    let name = "aclnnSlice";
    let mut g = e.inst.lock();
    let s = tri!(tensor(&mut g, src, "self", name));
    let o = tri!(tensor(&mut g, out, "out", name));
    let rank = s.view.dims.len() as i64;
    let d = if dim < 0 { dim + rank } else { dim };
    if step <= 0 || !(0..rank).contains(&d) {
        let m = invalid(
            &mut g,
            name,
            format!("step {step} must be > 0 and dim {dim} in range"),
        );
        return fail(m.0, m.1);
    }
    let d = d as usize;
    let n = s.view.dims[d];
    let clamp = |x: i64| if x < 0 { (x + n).clamp(0, n) } else { x.min(n) };
    let (a, b) = (clamp(start), clamp(end));
    let len = if b > a { (b - a + step - 1) / step } else { 0 };
    let mut want = s.view.dims.clone();
    want[d] = len;
    let supported = matches!(
        s.view.dtype,
        ACL_FLOAT
            | ACL_FLOAT16
            | ACL_BF16
            | ACL_INT32
            | ACL_INT64
            | ACL_INT8
            | ACL_UINT8
            | ACL_BOOL
    );
    if o.view.dims != want || o.view.dtype != s.view.dtype || !supported {
        let m = invalid(&mut g, name, format!("out must be {want:?} of self's dtype (one of FLOAT, FLOAT16, BFLOAT16, INT32, INT64, INT8, UINT8, BOOL)"));
        return fail(m.0, m.1);
    }
    finish(
        &mut g,
        e,
        name,
        0,
        AclnnOp::Slice {
            src: s,
            dim: d,
            start: a,
            step,
            out: o,
        },
        ws,
        ex,
    )
}

pub(crate) fn inplace_add_ws(
    e: Emu,
    this: *const aclTensor,
    other: *const aclTensor,
    alpha: *const aclScalar,
    ws: *mut u64,
    ex: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    let name = "aclnnInplaceAdd";
    let mut g = e.inst.lock();
    let t = tri!(tensor(&mut g, this, "selfRef", name));
    let o = tri!(tensor(&mut g, other, "other", name));
    let a = tri!(scalar(&g, alpha, name));
    if t.view.dims != o.view.dims
        || !FLOATS.contains(&t.view.dtype)
        || !FLOATS.contains(&o.view.dtype)
    {
        let m = invalid(
            &mut g,
            name,
            format!(
                "shapes {:?} and {:?} must match, float dtypes",
                t.view.dims, o.view.dims
            ),
        );
        return fail(m.0, m.1);
    }
    finish(
        &mut g,
        e,
        name,
        0,
        AclnnOp::Add {
            this: t,
            other: o,
            alpha: a,
        },
        ws,
        ex,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn inplace_addmm_ws(
    e: Emu,
    this: *const aclTensor,
    m1: *const aclTensor,
    m2: *const aclTensor,
    beta: *const aclScalar,
    alpha: *const aclScalar,
    cube: i8,
    ws: *mut u64,
    ex: *mut *mut aclOpExecutor,
) -> aclnnStatus {
    let name = "aclnnInplaceAddmm";
    let mut g = e.inst.lock();
    let t = tri!(tensor(&mut g, this, "selfRef", name));
    let a = tri!(tensor(&mut g, m1, "mat1", name));
    let b = tri!(tensor(&mut g, m2, "mat2", name));
    let (beta, alpha) = (tri!(scalar(&g, beta, name)), tri!(scalar(&g, alpha, name)));
    let ok = t.view.dims.len() == 2
        && a.view.dims.len() == 2
        && b.view.dims.len() == 2
        && a.view.dims[1] == b.view.dims[0]
        && t.view.dims == [a.view.dims[0], b.view.dims[1]]
        && [&t, &a, &b].iter().all(|x| FLOATS.contains(&x.view.dtype))
        && (0..=4).contains(&cube);
    if !ok {
        let m = invalid(
            &mut g,
            name,
            format!(
                "shapes must be [m,n] += [m,k]·[k,n] (got {:?}, {:?}, {:?}), dtypes FLOAT/FLOAT16/BFLOAT16, cubeMathType 0..4",
                t.view.dims, a.view.dims, b.view.dims
            ),
        );
        return fail(m.0, m.1);
    }
    let workspace = (t.view.numel() as u64 * 4).max(32);
    finish(
        &mut g,
        e,
        name,
        workspace,
        AclnnOp::Addmm {
            this: t,
            m1: a,
            m2: b,
            beta,
            alpha,
        },
        ws,
        ex,
    )
}

/// Phase 2 of every op.
pub(crate) fn launch(
    e: Emu,
    name: &'static str,
    workspace: *mut c_void,
    size: u64,
    executor: *mut aclOpExecutor,
    stream: aclrtStream,
) -> aclnnStatus {
    let mut g = e.inst.lock();
    let sid = tri!(stream_of(e, &g, stream));
    let id = executor as u64;
    if g.used_executors.contains(&id) {
        let v = g.violation(format!(
            "{name}: the executor was already run (executors are single use unless made repeatable)"
        ));
        return fail(ACLNN_ERR_PARAM_INVALID, v);
    }
    let Some(ex) = g.executors.remove(&id) else {
        let v = g.violation(format!(
            "{name}: {executor:?} is not an executor from phase 1"
        ));
        return fail(ACLNN_ERR_PARAM_INVALID, v);
    };
    if ex.name != name {
        let v = g.violation(format!("{name}: the executor belongs to {}", ex.name));
        return fail(ACLNN_ERR_PARAM_INVALID, v);
    }
    g.used_executors.insert(id);
    if ex.workspace > 0 {
        let ws = workspace as u64;
        if workspace.is_null() || size < ex.workspace || g.find(ws, ex.workspace).is_none() {
            let v = g.violation(format!(
                "{name}: needs a device workspace of {} bytes, got {size} bytes at {ws:#x}",
                ex.workspace
            ));
            return fail(ACLNN_ERR_PARAM_INVALID, v);
        }
    }
    let mut op = Op::new(name, OpKind::Record(0));
    let (reads, writes): (Vec<&T>, Vec<&T>) = match &ex.op {
        AclnnOp::Copy { dst, src } => (vec![src], vec![dst]),
        AclnnOp::Cast { src, out } => (vec![src], vec![out]),
        AclnnOp::Cat { inputs, out, .. } => (inputs.iter().collect(), vec![out]),
        AclnnOp::Slice { src, out, .. } => (vec![src], vec![out]),
        AclnnOp::Add { this, other, .. } => (vec![this, other], vec![this]),
        AclnnOp::Addmm { this, m1, m2, .. } => (vec![this, m1, m2], vec![this]),
    };
    op.reads = reads.iter().map(|t| t.bytes_span()).collect();
    op.writes = writes.iter().map(|t| t.bytes_span()).collect();
    op.tensors = reads.iter().chain(&writes).map(|t| t.id).collect();
    if ex.workspace > 0 {
        let ws = workspace as u64;
        op.writes.push((ws, ws + ex.workspace));
    }
    op.kind = OpKind::Aclnn { op: ex.op };
    tri!(enqueue(&mut g, sid, op));
    ACLNN_SUCCESS
}

/// A strided copy between two device views (with conversion).
pub(crate) fn strided(
    g: &mut State,
    src: u64,
    sv: &View,
    dst: u64,
    dv: &View,
) -> Result<(), String> {
    let src_bytes = span(sv);
    let dst_bytes = span(dv);
    let s = g.read(src, src_bytes)?.to_vec();
    let mut d = g.read(dst, dst_bytes)?.to_vec();
    compute::copy_view(&s, sv, &mut d, dv);
    g.write(dst, &d)
}

/// Bytes from the storage start to the end of the view.
fn span(v: &View) -> usize {
    if v.numel() == 0 {
        return 0;
    }
    let last: i64 = v
        .dims
        .iter()
        .zip(&v.strides)
        .map(|(d, s)| (d - 1) * s)
        .sum();
    (v.offset + last + 1) as usize * compute::size(v.dtype).unwrap()
}

fn values(g: &State, t: &T) -> Result<Vec<f32>, String> {
    let es = compute::size(t.view.dtype).unwrap();
    let bytes = g.read(t.addr, span(&t.view))?;
    Ok(t.view
        .offsets()
        .iter()
        .map(|o| compute::to_f32(t.view.dtype, &bytes[*o as usize * es..]))
        .collect())
}

fn store(g: &mut State, t: &T, vals: &[f32]) -> Result<(), String> {
    let es = compute::size(t.view.dtype).unwrap();
    let mut bytes = g.read(t.addr, span(&t.view))?.to_vec();
    for (o, v) in t.view.offsets().iter().zip(vals) {
        compute::encode(
            t.view.dtype,
            compute::Val::F32(*v),
            &mut bytes[*o as usize * es..*o as usize * es + es],
        );
    }
    g.write(t.addr, &bytes)
}

pub(crate) fn run(g: &mut State, op: AclnnOp) -> Result<(), String> {
    match op {
        AclnnOp::Copy { dst, src } | AclnnOp::Cast { src, out: dst } => {
            strided(g, src.addr, &src.view, dst.addr, &dst.view)
        }
        AclnnOp::Cat { inputs, dim, out } => {
            let mut at = 0;
            for t in inputs {
                let mut v = out.view.clone();
                v.offset += at * out.view.strides[dim];
                v.dims[dim] = t.view.dims[dim];
                at += t.view.dims[dim];
                strided(g, t.addr, &t.view, out.addr, &v)?;
            }
            Ok(())
        }
        AclnnOp::Slice {
            src,
            dim,
            start,
            step,
            out,
        } => {
            let mut v = src.view.clone();
            v.offset += start * src.view.strides[dim];
            v.strides[dim] *= step;
            v.dims[dim] = out.view.dims[dim];
            strided(g, src.addr, &v, out.addr, &out.view)
        }
        AclnnOp::Add { this, other, alpha } => {
            let (a, b) = (values(g, &this)?, values(g, &other)?);
            let alpha = alpha as f32;
            let r: Vec<f32> = a
                .iter()
                .zip(&b)
                .map(|(x, y)| if alpha == 1.0 { x + y } else { x + alpha * y })
                .collect();
            store(g, &this, &r)
        }
        AclnnOp::Addmm {
            this,
            m1,
            m2,
            beta,
            alpha,
        } => {
            let (w, a, b) = (values(g, &this)?, values(g, &m1)?, values(g, &m2)?);
            let (m, k, n) = (
                m1.view.dims[0] as usize,
                m1.view.dims[1] as usize,
                m2.view.dims[1] as usize,
            );
            let mut r = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0f32;
                    for q in 0..k {
                        acc += a[i * k + q] * b[q * n + j];
                    }
                    r[i * n + j] = beta as f32 * w[i * n + j] + alpha as f32 * acc;
                }
            }
            store(g, &this, &r)
        }
    }
}

/// The launcher of reshard's box-copy kernel (`kernels/launcher.cpp`),
/// emulated: the contract of `ascendcl_sys::sys::Api::reshard_box_copy`.
/// A descriptor the real kernel does not implement — a pair outside
/// `box_copy_supports` (f16↔bf16, f64, same-dtype floats not typed as raw
/// integers) — is refused *and recorded as a violation*, so a routing error
/// in the backend fails its tests; the device copy of the descriptor must
/// be a live device allocation and, when the kernel runs, equal the host
/// copy (checked in `exec`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn box_copy_kernel(
    e: Emu,
    block_dim: u32,
    stream: aclrtStream,
    src: *mut c_void,
    dst: *mut c_void,
    desc_dev: *mut c_void,
    desc: *const ReshardBoxDesc,
) -> u32 {
    let mut g = e.inst.lock();
    let sid = match stream_of(e, &g, stream) {
        Ok(s) => s,
        Err((c, m)) => return fail(c, m) as u32,
    };
    if desc.is_null() || desc_dev.is_null() || block_dim == 0 {
        let v = g.violation("reshard_box_copy: null descriptor or block_dim 0".into());
        return fail(ACL_ERROR_INVALID_PARAM, v) as u32;
    }
    let dsize = std::mem::size_of::<ReshardBoxDesc>() as u64;
    if g.find(desc_dev as u64, dsize).is_none() {
        let v = g.violation(format!(
            "reshard_box_copy: the kernel's descriptor must be in device memory ({dsize} bytes at              {:#x} are not; kernel parameters are GM pointers, never host structs)",
            desc_dev as u64
        ));
        return fail(ACL_ERROR_INVALID_PARAM, v) as u32;
    }
    // SAFETY: the caller's host descriptor, read during the call.
    let d = unsafe { *desc };
    let rank = d.rank as usize;
    let (sd, dd) = (aclDataType(d.src_dtype), aclDataType(d.dst_dtype));
    if !(1..=8).contains(&rank) || compute::size(sd).is_none() || compute::size(dd).is_none() {
        let v = g.violation(format!("reshard_box_copy: bad descriptor {d:?}"));
        return fail(ACL_ERROR_INVALID_PARAM, v) as u32;
    }
    if !box_copy_supports(sd, dd) {
        let v = g.violation(format!(
            "reshard_box_copy: the kernel does not implement {} -> {} (only same-type raw              integers and the A2 Cast pairs FLOAT<->FLOAT16, FLOAT<->BF16; route the rest to aclnn)",
            sd.name().unwrap_or("?"),
            dd.name().unwrap_or("?")
        ));
        return fail(ACL_ERROR_INVALID_PARAM, v) as u32;
    }
    let dims: Vec<i64> = d.extent[..rank].iter().map(|x| *x as i64).collect();
    let sv = View {
        dtype: sd,
        dims: dims.clone(),
        strides: d.src_stride[..rank].to_vec(),
        offset: d.src_offset,
    };
    let dv = View {
        dtype: dd,
        dims,
        strides: d.dst_stride[..rank].to_vec(),
        offset: d.dst_offset,
    };
    let (sb, db) = (span(&sv) as u64, span(&dv) as u64);
    let (s, t) = (src as u64, dst as u64);
    if g.find(s, sb).is_none() || g.find(t, db).is_none() {
        let v = g.violation(format!(
            "reshard_box_copy: the views reach past their buffers ({sb} bytes at {s:#x}, {db} bytes at {t:#x})"
        ));
        return fail(ACL_ERROR_INVALID_PARAM, v) as u32;
    }
    let mut op = Op::new(
        "reshard_box_copy",
        OpKind::Kernel {
            src: s,
            dst: t,
            src_view: sv,
            dst_view: dv,
            desc_dev: desc_dev as u64,
            desc_host: d,
        },
    );
    op.reads.push((desc_dev as u64, desc_dev as u64 + dsize));
    op.reads.push((s, s + sb));
    op.writes.push((t, t + db));
    match enqueue(&mut g, sid, op) {
        Ok(()) => 0,
        Err((c, m)) => fail(c, m) as u32,
    }
}
