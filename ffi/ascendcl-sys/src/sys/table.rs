//! `Api`: one typed `unsafe extern "C" fn` pointer per CANN symbol reshard
//! calls. Required symbols are plain pointers (a library without them does
//! not load); symbols that differ between CANN versions (the aclnn ops, the
//! HCCL library split, `aclrtMemcpy2dAsync` device-to-device), HCCL as a
//! whole and reshard's own kernel launcher are `Option`s, so a missing one
//! is a typed "unsupported on this CANN" error at the call, not a load
//! failure. The same table is filled by `dlopen` ([`super::load`]) or by the
//! host emulator (`ascend-stub`).
//!
//! Signatures are copied from the CANN headers (see `shared/spec/ascend.md`);
//! with the `cann` feature each is checked against bindgen's output at
//! compile time ([`super::checked`]).
#![allow(non_snake_case, missing_docs)]

use std::ffi::{c_char, c_void};

use super::types::*;

macro_rules! table {
    (
        required { $( $(#[$rm:meta])* fn $r:ident($($ra:ident: $rt:ty),* $(,)?) -> $rr:ty; )* }
        optional { $( $(#[$om:meta])* fn $o:ident($($oa:ident: $ot:ty),* $(,)?) -> $or:ty; )* }
        extra { $( $(#[$em:meta])* fn $e:ident($($ea:ident: $et:ty),* $(,)?) -> $er:ty; )* }
    ) => {
        /// The function table (see the module docs).
        #[derive(Clone, Copy)]
        pub struct Api {
            $( $(#[$rm])* pub $r: unsafe extern "C" fn($($rt),*) -> $rr, )*
            $( $(#[$om])* pub $o: Option<unsafe extern "C" fn($($ot),*) -> $or>, )*
            $( $(#[$em])* pub $e: Option<unsafe extern "C" fn($($et),*) -> $er>, )*
            /// Where the table came from (`"dlopen"`, `"emulator"`), for messages.
            pub origin: &'static str,
        }

        /// Symbols a library set must export to load.
        pub const REQUIRED: &[&str] = &[$(stringify!($r)),*];
        /// Version-dependent CANN symbols (`None` when absent).
        pub const OPTIONAL: &[&str] = &[$(stringify!($o)),*];
        /// reshard's own kernel launchers (`kernels/`, `None` unless built).
        pub const EXTRA: &[&str] = &[$(stringify!($e)),*];

        impl Api {
            /// Resolves every symbol with `find` (name with a trailing NUL →
            /// address or null). A null required symbol is an error naming it.
            ///
            /// # Safety
            /// `find` must return, for each name, null or the address of a
            /// function with exactly the C signature declared in this table.
            pub unsafe fn resolve(
                origin: &'static str,
                mut find: impl FnMut(&str) -> *mut c_void,
            ) -> Result<Api, String> {
                Ok(Api {
                    $( $r: {
                        let p = find(concat!(stringify!($r), "\0"));
                        if p.is_null() {
                            return Err(stringify!($r).to_string());
                        }
                        std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($rt),*) -> $rr>(p)
                    }, )*
                    $( $o: {
                        let p = find(concat!(stringify!($o), "\0"));
                        (!p.is_null()).then(|| {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($ot),*) -> $or>(p)
                        })
                    }, )*
                    $( $e: {
                        let p = find(concat!(stringify!($e), "\0"));
                        (!p.is_null()).then(|| {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($et),*) -> $er>(p)
                        })
                    }, )*
                    origin,
                })
            }

            /// Whether the optional or extra symbol `name` is present.
            pub fn has(&self, name: &str) -> bool {
                match name {
                    $( stringify!($o) => self.$o.is_some(), )*
                    $( stringify!($e) => self.$e.is_some(), )*
                    $( stringify!($r) => true, )*
                    _ => false,
                }
            }

            /// Removes an optional or extra symbol (to emulate an older CANN
            /// or a build without kernels). Returns whether `name` is one.
            pub fn remove(&mut self, name: &str) -> bool {
                match name {
                    $( stringify!($o) => { self.$o = None; true } )*
                    $( stringify!($e) => { self.$e = None; true } )*
                    _ => false,
                }
            }
        }

        /// The C type of each table function, as we wrote it: the committed
        /// bindings of every supported CANN version (`bindings/`, checked in
        /// [`super::bindings`]) and, with the `cann` feature, the installed
        /// headers' are pinned to these by `pin_table!`.
        #[allow(non_camel_case_types, dead_code)]
        pub mod sig {
            use super::*;
            $( pub type $r = unsafe extern "C" fn($($rt),*) -> $rr; )*
            $( pub type $o = unsafe extern "C" fn($($ot),*) -> $or; )*
        }
    };
}

table! {
    required {
        // --- libascendcl: init, devices, contexts ---
        fn aclInit(config_path: *const c_char) -> aclError;
        fn aclFinalize() -> aclError;
        fn aclGetRecentErrMsg() -> *const c_char;
        fn aclrtGetVersion(major: *mut i32, minor: *mut i32, patch: *mut i32) -> aclError;
        fn aclrtGetDeviceCount(count: *mut u32) -> aclError;
        fn aclrtSetDevice(device_id: i32) -> aclError;
        fn aclrtResetDevice(device_id: i32) -> aclError;
        fn aclrtCreateContext(context: *mut aclrtContext, device_id: i32) -> aclError;
        fn aclrtDestroyContext(context: aclrtContext) -> aclError;
        fn aclrtSetCurrentContext(context: aclrtContext) -> aclError;
        // --- streams / events ---
        fn aclrtCreateStream(stream: *mut aclrtStream) -> aclError;
        fn aclrtDestroyStream(stream: aclrtStream) -> aclError;
        fn aclrtSynchronizeStream(stream: aclrtStream) -> aclError;
        fn aclrtCreateEvent(event: *mut aclrtEvent) -> aclError;
        fn aclrtDestroyEvent(event: aclrtEvent) -> aclError;
        fn aclrtRecordEvent(event: aclrtEvent, stream: aclrtStream) -> aclError;
        fn aclrtStreamWaitEvent(stream: aclrtStream, event: aclrtEvent) -> aclError;
        fn aclrtSynchronizeEvent(event: aclrtEvent) -> aclError;
        fn aclrtEventElapsedTime(ms: *mut f32, start: aclrtEvent, end: aclrtEvent) -> aclError;
        // --- memory ---
        fn aclrtMalloc(dev_ptr: *mut *mut c_void, size: usize, policy: aclrtMemMallocPolicy) -> aclError;
        fn aclrtFree(dev_ptr: *mut c_void) -> aclError;
        fn aclrtMallocHost(host_ptr: *mut *mut c_void, size: usize) -> aclError;
        fn aclrtFreeHost(host_ptr: *mut c_void) -> aclError;
        fn aclrtMemcpy(dst: *mut c_void, dest_max: usize, src: *const c_void, count: usize, kind: aclrtMemcpyKind) -> aclError;
        fn aclrtMemcpyAsync(dst: *mut c_void, dest_max: usize, src: *const c_void, count: usize, kind: aclrtMemcpyKind, stream: aclrtStream) -> aclError;
        fn aclrtMemcpy2dAsync(dst: *mut c_void, dpitch: usize, src: *const c_void, spitch: usize, width: usize, height: usize, kind: aclrtMemcpyKind, stream: aclrtStream) -> aclError;
        fn aclrtGetMemInfo(attr: aclrtMemAttr, free: *mut usize, total: *mut usize) -> aclError;
        // --- libnnopbase: descriptors ---
        fn aclCreateTensor(view_dims: *const i64, view_dims_num: u64, data_type: aclDataType, stride: *const i64, offset: i64, format: aclFormat, storage_dims: *const i64, storage_dims_num: u64, tensor_data: *mut c_void) -> *mut aclTensor;
        fn aclDestroyTensor(tensor: *const aclTensor) -> aclnnStatus;
        fn aclCreateScalar(value: *mut c_void, data_type: aclDataType) -> *mut aclScalar;
        fn aclDestroyScalar(scalar: *const aclScalar) -> aclnnStatus;
        fn aclCreateTensorList(value: *const *const aclTensor, size: u64) -> *mut aclTensorList;
        fn aclDestroyTensorList(array: *const aclTensorList) -> aclnnStatus;
    }
    optional {
        /// `const char *aclrtGetSocName(void)`.
        fn aclrtGetSocName() -> *const c_char;
        // --- libopapi (8.x) / libopapi_math, libopapi_nn (9.x) ---
        fn aclnnInplaceCopyGetWorkspaceSize(self_ref: *mut aclTensor, src: *const aclTensor, workspace_size: *mut u64, executor: *mut *mut aclOpExecutor) -> aclnnStatus;
        fn aclnnInplaceCopy(workspace: *mut c_void, workspace_size: u64, executor: *mut aclOpExecutor, stream: aclrtStream) -> aclnnStatus;
        fn aclnnCastGetWorkspaceSize(self_: *const aclTensor, dtype: aclDataType, out: *mut aclTensor, workspace_size: *mut u64, executor: *mut *mut aclOpExecutor) -> aclnnStatus;
        fn aclnnCast(workspace: *mut c_void, workspace_size: u64, executor: *mut aclOpExecutor, stream: aclrtStream) -> aclnnStatus;
        fn aclnnCatGetWorkspaceSize(tensors: *const aclTensorList, dim: i64, out: *mut aclTensor, workspace_size: *mut u64, executor: *mut *mut aclOpExecutor) -> aclnnStatus;
        fn aclnnCat(workspace: *mut c_void, workspace_size: u64, executor: *mut aclOpExecutor, stream: aclrtStream) -> aclnnStatus;
        fn aclnnSliceGetWorkspaceSize(self_: *const aclTensor, dim: i64, start: i64, end: i64, step: i64, out: *mut aclTensor, workspace_size: *mut u64, executor: *mut *mut aclOpExecutor) -> aclnnStatus;
        fn aclnnSlice(workspace: *mut c_void, workspace_size: u64, executor: *mut aclOpExecutor, stream: aclrtStream) -> aclnnStatus;
        fn aclnnInplaceAddGetWorkspaceSize(self_ref: *const aclTensor, other: *const aclTensor, alpha: *const aclScalar, workspace_size: *mut u64, executor: *mut *mut aclOpExecutor) -> aclnnStatus;
        fn aclnnInplaceAdd(workspace: *mut c_void, workspace_size: u64, executor: *mut aclOpExecutor, stream: aclrtStream) -> aclnnStatus;
        fn aclnnInplaceAddmmGetWorkspaceSize(self_ref: *const aclTensor, mat1: *const aclTensor, mat2: *const aclTensor, beta: *const aclScalar, alpha: *const aclScalar, cube_math_type: i8, workspace_size: *mut u64, executor: *mut *mut aclOpExecutor) -> aclnnStatus;
        fn aclnnInplaceAddmm(workspace: *mut c_void, workspace_size: u64, executor: *mut aclOpExecutor, stream: aclrtStream) -> aclnnStatus;
        // --- libhccl (+ libhcomm in 9.x) ---
        fn HcclGetRootInfo(root_info: *mut HcclRootInfo) -> HcclResult;
        fn HcclCommInitRootInfo(n_ranks: u32, root_info: *const HcclRootInfo, rank: u32, comm: *mut HcclComm) -> HcclResult;
        fn HcclCommDestroy(comm: HcclComm) -> HcclResult;
        fn HcclGetRankSize(comm: HcclComm, rank_size: *mut u32) -> HcclResult;
        fn HcclGetRankId(comm: HcclComm, rank: *mut u32) -> HcclResult;
        fn HcclGetErrorString(code: HcclResult) -> *const c_char;
        fn HcclGetCommAsyncError(comm: HcclComm, async_error: *mut HcclResult) -> HcclResult;
        fn HcclBarrier(comm: HcclComm, stream: aclrtStream) -> HcclResult;
        fn HcclAllGather(send_buf: *mut c_void, recv_buf: *mut c_void, send_count: u64, data_type: HcclDataType, comm: HcclComm, stream: aclrtStream) -> HcclResult;
        fn HcclBroadcast(buf: *mut c_void, count: u64, data_type: HcclDataType, root: u32, comm: HcclComm, stream: aclrtStream) -> HcclResult;
        fn HcclSend(send_buf: *mut c_void, count: u64, data_type: HcclDataType, dest_rank: u32, comm: HcclComm, stream: aclrtStream) -> HcclResult;
        fn HcclRecv(recv_buf: *mut c_void, count: u64, data_type: HcclDataType, src_rank: u32, comm: HcclComm, stream: aclrtStream) -> HcclResult;
        fn HcclAlltoAllV(send_buf: *const c_void, send_counts: *const c_void, sdispls: *const c_void, send_type: HcclDataType, recv_buf: *const c_void, recv_counts: *const c_void, rdispls: *const c_void, recv_type: HcclDataType, comm: HcclComm, stream: aclrtStream) -> HcclResult;
    }
    extra {
        /// reshard's fused strided box copy + cast (`kernels/launcher.cpp`):
        /// `uint32_t reshard_box_copy(uint32_t block_dim, aclrtStream stream,
        /// void *src, void *dst, void *desc_dev, const ReshardBoxDesc
        /// *desc_host)`. `desc_dev` is a device copy of `*desc_host`
        /// uploaded on `stream` before the call (kernel parameters are GM
        /// pointers, never structs); the host copy is validated. 0 means
        /// launched; `ACL_ERROR_INVALID_PARAM` a descriptor the kernel does
        /// not implement; anything else the launch's own status.
        fn reshard_box_copy(block_dim: u32, stream: aclrtStream, src: *mut c_void, dst: *mut c_void, desc_dev: *mut c_void, desc_host: *const ReshardBoxDesc) -> u32;
    }
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let missing: Vec<&str> = OPTIONAL
            .iter()
            .chain(EXTRA)
            .copied()
            .filter(|n| !self.has(n))
            .collect();
        f.debug_struct("Api")
            .field("origin", &self.origin)
            .field("missing", &missing)
            .finish_non_exhaustive()
    }
}

/// The HCCL symbols the communicator needs (all or nothing).
pub const HCCL: &[&str] = &[
    "HcclGetRootInfo",
    "HcclCommInitRootInfo",
    "HcclCommDestroy",
    "HcclGetRankSize",
    "HcclGetRankId",
    "HcclAllGather",
    "HcclBroadcast",
    "HcclSend",
    "HcclRecv",
    "HcclAlltoAllV",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_required_symbol_is_named_and_optional_ones_are_none() {
        // SAFETY: every address is null, nothing is called.
        let err = unsafe { Api::resolve("test", |_| std::ptr::null_mut()) }.unwrap_err();
        assert_eq!(err, "aclInit");
        assert!(REQUIRED.contains(&"aclrtMemcpy2dAsync"));
        assert!(OPTIONAL.contains(&"aclnnInplaceAddmm") && EXTRA.contains(&"reshard_box_copy"));
        for name in HCCL {
            assert!(OPTIONAL.contains(name), "{name}");
        }
    }
}
