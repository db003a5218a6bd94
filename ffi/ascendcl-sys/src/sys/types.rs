//! Hand-written C types of the CANN subset: handles, status codes and the
//! enums as *newtypes* over their C integer (never Rust `enum`s: CANN adds
//! members between versions and mixes values with bit flags, so an unknown
//! value from the library must stay representable).
//!
//! Values are those of `acl/acl_base.h`, `acl/acl_rt.h`,
//! `acl/error_codes/rt_error_codes.h`, `aclnn/acl_meta.h` and
//! `hccl/hccl_types.h`; with the `cann` feature, `build.rs` checks them
//! against the installed headers.
#![allow(non_camel_case_types, non_upper_case_globals, missing_docs)]

use std::ffi::{c_char, c_int, c_void};
use std::marker::{PhantomData, PhantomPinned};

/// `aclError` (`int`): `ACL_SUCCESS` is 0.
pub type aclError = c_int;
/// `aclnnStatus` (`int32_t`).
pub type aclnnStatus = i32;
/// A stream handle (`void *`); null is the device's default stream.
pub type aclrtStream = *mut c_void;
/// An event handle (`void *`).
pub type aclrtEvent = *mut c_void;
/// A context handle (`void *`).
pub type aclrtContext = *mut c_void;
/// An HCCL communicator handle (`void *`).
pub type HcclComm = *mut c_void;

macro_rules! opaque {
    ($($(#[$m:meta])* $name:ident;)*) => {$(
        $(#[$m])*
        #[repr(C)]
        pub struct $name {
            _data: [u8; 0],
            _marker: PhantomData<(*mut u8, PhantomPinned)>,
        }
    )*};
}

opaque! {
    /// `aclTensor`: a tensor descriptor (host metadata + device address).
    aclTensor;
    /// `aclScalar`: a host scalar for aclnn.
    aclScalar;
    /// `aclTensorList`.
    aclTensorList;
    /// `aclIntArray`.
    aclIntArray;
    /// `aclOpExecutor`: phase 1's plan, consumed by phase 2.
    aclOpExecutor;
}

macro_rules! newtype_enum {
    ($(#[$m:meta])* $name:ident($repr:ty) { $($(#[$vm:meta])* $v:ident = $val:expr,)* }) => {
        $(#[$m])*
        #[repr(transparent)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub $repr);
        $( $(#[$vm])* pub const $v: $name = $name($val); )*
        impl $name {
            /// Every member we define, `(C name, value)`.
            pub const ALL: &'static [(&'static str, $repr)] = &[$((stringify!($v), $val)),*];
            /// The C name of a known value.
            pub fn name(self) -> Option<&'static str> {
                match self { $( $v => Some(stringify!($v)), )* _ => None }
            }
        }
    };
}

newtype_enum! {
    /// `aclDataType`.
    aclDataType(c_int) {
        ACL_DT_UNDEFINED = -1,
        ACL_FLOAT = 0,
        ACL_FLOAT16 = 1,
        ACL_INT8 = 2,
        ACL_INT32 = 3,
        ACL_UINT8 = 4,
        ACL_INT16 = 6,
        ACL_UINT16 = 7,
        ACL_UINT32 = 8,
        ACL_INT64 = 9,
        ACL_UINT64 = 10,
        ACL_DOUBLE = 11,
        ACL_BOOL = 12,
        ACL_STRING = 13,
        ACL_COMPLEX64 = 16,
        ACL_COMPLEX128 = 17,
        ACL_BF16 = 27,
        ACL_INT4 = 29,
        ACL_UINT1 = 30,
        ACL_COMPLEX32 = 33,
        ACL_HIFLOAT8 = 34,
        ACL_FLOAT8_E5M2 = 35,
        ACL_FLOAT8_E4M3FN = 36,
    }
}

impl aclDataType {
    /// Bytes per element of the types reshard uses (`None` for the others).
    pub fn size(self) -> Option<usize> {
        Some(match self {
            ACL_INT8 | ACL_UINT8 | ACL_BOOL | ACL_HIFLOAT8 | ACL_FLOAT8_E5M2
            | ACL_FLOAT8_E4M3FN => 1,
            ACL_FLOAT16 | ACL_BF16 | ACL_INT16 | ACL_UINT16 => 2,
            ACL_FLOAT | ACL_INT32 | ACL_UINT32 => 4,
            ACL_INT64 | ACL_UINT64 | ACL_DOUBLE | ACL_COMPLEX64 => 8,
            ACL_COMPLEX128 => 16,
            _ => return None,
        })
    }
}

newtype_enum! {
    /// `aclFormat`. reshard only ever uses `ACL_FORMAT_ND`.
    aclFormat(c_int) {
        ACL_FORMAT_UNDEFINED = -1,
        ACL_FORMAT_NCHW = 0,
        ACL_FORMAT_NHWC = 1,
        ACL_FORMAT_ND = 2,
        ACL_FORMAT_NC1HWC0 = 3,
        ACL_FORMAT_FRACTAL_Z = 4,
        ACL_FORMAT_FRACTAL_NZ = 29,
    }
}

newtype_enum! {
    /// `aclrtMemcpyKind`.
    aclrtMemcpyKind(c_int) {
        ACL_MEMCPY_HOST_TO_HOST = 0,
        ACL_MEMCPY_HOST_TO_DEVICE = 1,
        ACL_MEMCPY_DEVICE_TO_HOST = 2,
        ACL_MEMCPY_DEVICE_TO_DEVICE = 3,
        ACL_MEMCPY_DEFAULT = 4,
    }
}

newtype_enum! {
    /// `aclrtMemMallocPolicy` (values and OR-able flags).
    aclrtMemMallocPolicy(c_int) {
        ACL_MEM_MALLOC_HUGE_FIRST = 0,
        ACL_MEM_MALLOC_HUGE_ONLY = 1,
        ACL_MEM_MALLOC_NORMAL_ONLY = 2,
        ACL_MEM_MALLOC_HUGE_FIRST_P2P = 3,
        ACL_MEM_MALLOC_HUGE_ONLY_P2P = 4,
        ACL_MEM_MALLOC_NORMAL_ONLY_P2P = 5,
    }
}

newtype_enum! {
    /// `aclrtMemAttr` (for `aclrtGetMemInfo`).
    aclrtMemAttr(c_int) {
        ACL_DDR_MEM = 0,
        ACL_HBM_MEM = 1,
    }
}

/// `ACL_SUCCESS`.
pub const ACL_SUCCESS: aclError = 0;
pub const ACL_ERROR_INVALID_PARAM: aclError = 100000;
pub const ACL_ERROR_UNINITIALIZE: aclError = 100001;
pub const ACL_ERROR_REPEAT_INITIALIZE: aclError = 100002;
pub const ACL_ERROR_REPEAT_FINALIZE: aclError = 100037;
pub const ACL_ERROR_BAD_ALLOC: aclError = 200000;
pub const ACL_ERROR_API_NOT_SUPPORT: aclError = 200001;
pub const ACL_ERROR_INVALID_DEVICE: aclError = 200002;
pub const ACL_ERROR_MEMORY_ADDRESS_UNALIGNED: aclError = 200003;
pub const ACL_ERROR_FEATURE_UNSUPPORTED: aclError = 200006;
pub const ACL_ERROR_STORAGE_OVER_LIMIT: aclError = 300000;
pub const ACL_ERROR_INTERNAL_ERROR: aclError = 500000;
pub const ACL_ERROR_FAILURE: aclError = 500001;
pub const ACL_ERROR_RT_FAILURE: aclError = 500003;
pub const ACL_ERROR_DRV_FAILURE: aclError = 500004;
pub const ACL_ERROR_RT_PARAM_INVALID: aclError = 107000;
pub const ACL_ERROR_RT_INVALID_DEVICEID: aclError = 107001;
pub const ACL_ERROR_RT_CONTEXT_NULL: aclError = 107002;
pub const ACL_ERROR_RT_STREAM_CONTEXT: aclError = 107003;
pub const ACL_ERROR_RT_FEATURE_NOT_SUPPORT: aclError = 207000;
pub const ACL_ERROR_RT_MEMORY_ALLOCATION: aclError = 207001;
pub const ACL_ERROR_RT_NO_DEVICE: aclError = 207004;
pub const ACL_ERROR_RT_INTERNAL_ERROR: aclError = 507000;
pub const ACL_ERROR_RT_AICORE_TIMEOUT: aclError = 507014;
pub const ACL_ERROR_RT_AICORE_EXCEPTION: aclError = 507015;
pub const ACL_ERROR_RT_STREAM_SYNC_TIMEOUT: aclError = 507046;
pub const ACL_ERROR_RT_DEVICE_MEM_ERROR: aclError = 507053;
pub const ACL_ERROR_RT_DEV_SETUP_ERROR: aclError = 507033;

pub const ACLNN_SUCCESS: aclnnStatus = 0;
pub const ACLNN_ERR_PARAM_NULLPTR: aclnnStatus = 161001;
pub const ACLNN_ERR_PARAM_INVALID: aclnnStatus = 161002;
pub const ACLNN_ERR_RUNTIME_ERROR: aclnnStatus = 361001;
pub const ACLNN_ERR_INNER: aclnnStatus = 561000;
pub const ACLNN_ERR_INNER_FIND_KERNEL_ERROR: aclnnStatus = 561003;
pub const ACLNN_ERR_INNER_OPP_PATH_NOT_FOUND: aclnnStatus = 561107;
pub const ACLNN_ERR_INNER_OPP_KERNEL_PKG_NOT_FOUND: aclnnStatus = 561112;

/// `cubeMathType` of the matmul family: keep the dtype (exact fp32).
pub const KEEP_DTYPE: i8 = 0;
/// `cubeMathType`: fp16/bf16 inputs, fp32 intermediate add.
pub const USE_FP32_ADD: i8 = 4;

/// Every `aclError` / `aclnnStatus` code we name, `(C name, value)`.
pub const ACL_CODES: &[(&str, i32)] = &[
    ("ACL_SUCCESS", 0),
    ("ACL_ERROR_INVALID_PARAM", 100000),
    ("ACL_ERROR_UNINITIALIZE", 100001),
    ("ACL_ERROR_REPEAT_INITIALIZE", 100002),
    ("ACL_ERROR_REPEAT_FINALIZE", 100037),
    ("ACL_ERROR_BAD_ALLOC", 200000),
    ("ACL_ERROR_API_NOT_SUPPORT", 200001),
    ("ACL_ERROR_INVALID_DEVICE", 200002),
    ("ACL_ERROR_MEMORY_ADDRESS_UNALIGNED", 200003),
    ("ACL_ERROR_FEATURE_UNSUPPORTED", 200006),
    ("ACL_ERROR_STORAGE_OVER_LIMIT", 300000),
    ("ACL_ERROR_INTERNAL_ERROR", 500000),
    ("ACL_ERROR_FAILURE", 500001),
    ("ACL_ERROR_RT_FAILURE", 500003),
    ("ACL_ERROR_DRV_FAILURE", 500004),
    ("ACL_ERROR_RT_PARAM_INVALID", 107000),
    ("ACL_ERROR_RT_INVALID_DEVICEID", 107001),
    ("ACL_ERROR_RT_CONTEXT_NULL", 107002),
    ("ACL_ERROR_RT_STREAM_CONTEXT", 107003),
    ("ACL_ERROR_RT_FEATURE_NOT_SUPPORT", 207000),
    ("ACL_ERROR_RT_MEMORY_ALLOCATION", 207001),
    ("ACL_ERROR_RT_NO_DEVICE", 207004),
    ("ACL_ERROR_RT_INTERNAL_ERROR", 507000),
    ("ACL_ERROR_RT_AICORE_TIMEOUT", 507014),
    ("ACL_ERROR_RT_AICORE_EXCEPTION", 507015),
    ("ACL_ERROR_RT_STREAM_SYNC_TIMEOUT", 507046),
    ("ACL_ERROR_RT_DEVICE_MEM_ERROR", 507053),
    ("ACL_ERROR_RT_DEV_SETUP_ERROR", 507033),
    ("ACLNN_ERR_PARAM_NULLPTR", 161001),
    ("ACLNN_ERR_PARAM_INVALID", 161002),
    ("ACLNN_ERR_RUNTIME_ERROR", 361001),
    ("ACLNN_ERR_INNER", 561000),
    ("ACLNN_ERR_INNER_FIND_KERNEL_ERROR", 561003),
    ("ACLNN_ERR_INNER_OPP_PATH_NOT_FOUND", 561107),
    ("ACLNN_ERR_INNER_OPP_KERNEL_PKG_NOT_FOUND", 561112),
];

/// The name of a known `aclError` / `aclnnStatus` code.
pub fn acl_code_name(code: i32) -> Option<&'static str> {
    ACL_CODES.iter().find(|(_, v)| *v == code).map(|(n, _)| *n)
}

newtype_enum! {
    /// `HcclResult`.
    HcclResult(c_int) {
        HCCL_SUCCESS = 0,
        HCCL_E_PARA = 1,
        HCCL_E_PTR = 2,
        HCCL_E_MEMORY = 3,
        HCCL_E_INTERNAL = 4,
        HCCL_E_NOT_SUPPORT = 5,
        HCCL_E_NOT_FOUND = 6,
        HCCL_E_UNAVAIL = 7,
        HCCL_E_SYSCALL = 8,
        HCCL_E_TIMEOUT = 9,
        HCCL_E_OPEN_FILE_FAILURE = 10,
        HCCL_E_TCP_CONNECT = 11,
        HCCL_E_ROCE_CONNECT = 12,
        HCCL_E_TCP_TRANSFER = 13,
        HCCL_E_ROCE_TRANSFER = 14,
        HCCL_E_RUNTIME = 15,
        HCCL_E_DRV = 16,
        HCCL_E_PROFILING = 17,
        HCCL_E_CCE = 18,
        HCCL_E_NETWORK = 19,
        HCCL_E_AGAIN = 20,
        HCCL_E_REMOTE = 21,
        HCCL_E_SUSPENDING = 22,
        HCCL_E_OPRETRY_FAIL = 23,
        HCCL_E_OOM = 24,
        HCCL_E_IN_STATUS = 1041,
    }
}

newtype_enum! {
    /// `HcclDataType` (numbered differently from `aclDataType`).
    HcclDataType(c_int) {
        HCCL_DATA_TYPE_INT8 = 0,
        HCCL_DATA_TYPE_INT16 = 1,
        HCCL_DATA_TYPE_INT32 = 2,
        HCCL_DATA_TYPE_FP16 = 3,
        HCCL_DATA_TYPE_FP32 = 4,
        HCCL_DATA_TYPE_INT64 = 5,
        HCCL_DATA_TYPE_UINT64 = 6,
        HCCL_DATA_TYPE_UINT8 = 7,
        HCCL_DATA_TYPE_UINT16 = 8,
        HCCL_DATA_TYPE_UINT32 = 9,
        HCCL_DATA_TYPE_FP64 = 10,
        HCCL_DATA_TYPE_BFP16 = 11,
        HCCL_DATA_TYPE_INT128 = 12,
    }
}

impl HcclDataType {
    /// Bytes per element.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            HCCL_DATA_TYPE_INT8 | HCCL_DATA_TYPE_UINT8 => 1,
            HCCL_DATA_TYPE_INT16
            | HCCL_DATA_TYPE_UINT16
            | HCCL_DATA_TYPE_FP16
            | HCCL_DATA_TYPE_BFP16 => 2,
            HCCL_DATA_TYPE_INT32 | HCCL_DATA_TYPE_UINT32 | HCCL_DATA_TYPE_FP32 => 4,
            HCCL_DATA_TYPE_INT64 | HCCL_DATA_TYPE_UINT64 | HCCL_DATA_TYPE_FP64 => 8,
            HCCL_DATA_TYPE_INT128 => 16,
            _ => return None,
        })
    }
}

/// `HCCL_ROOT_INFO_BYTES`.
pub const HCCL_ROOT_INFO_BYTES: usize = 4108;

/// `HcclRootInfo`: the opaque blob rank 0 makes and every rank passes to
/// `HcclCommInitRootInfo`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HcclRootInfo {
    pub internal: [c_char; HCCL_ROOT_INFO_BYTES],
}

impl Default for HcclRootInfo {
    fn default() -> Self {
        HcclRootInfo {
            internal: [0; HCCL_ROOT_INFO_BYTES],
        }
    }
}

impl std::fmt::Debug for HcclRootInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HcclRootInfo { .. }")
    }
}

impl HcclRootInfo {
    /// The blob as bytes (for the out-of-band exchange).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: c_char and u8 have the same size and no invalid values.
        unsafe { std::slice::from_raw_parts(self.internal.as_ptr().cast(), HCCL_ROOT_INFO_BYTES) }
    }

    /// Rebuilds the blob from its bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<HcclRootInfo> {
        if bytes.len() != HCCL_ROOT_INFO_BYTES {
            return None;
        }
        let mut info = HcclRootInfo::default();
        for (d, s) in info.internal.iter_mut().zip(bytes) {
            *d = *s as c_char;
        }
        Some(info)
    }
}

/// Descriptor of reshard's fused box-copy kernel (`kernels/box_desc.h`,
/// `struct ReshardBoxDesc`): the copy reduced to at most 8 dims, strides and
/// offsets in elements. The launcher gets it twice: a device copy the
/// kernel reads (uploaded on the launch stream first) and a host copy it
/// validates.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReshardBoxDesc {
    /// Number of dims used (1..=8).
    pub rank: u32,
    /// Source element type (`aclDataType`).
    pub src_dtype: i32,
    /// Destination element type (`aclDataType`).
    pub dst_dtype: i32,
    /// Padding (zero).
    pub reserved: u32,
    /// Extent per dim (destination order).
    pub extent: [u64; 8],
    /// Source stride per dim, in source elements.
    pub src_stride: [i64; 8],
    /// Destination stride per dim, in destination elements.
    pub dst_stride: [i64; 8],
    /// Element offset of the first source element.
    pub src_offset: i64,
    /// Element offset of the first destination element.
    pub dst_offset: i64,
}

impl ReshardBoxDesc {
    /// The descriptor's bytes (`#[repr(C)]`, no padding), for the upload.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: plain integers, repr(C), 4+4+4+4 + 8*8*3 + 8 + 8 bytes, no padding.
        unsafe {
            std::slice::from_raw_parts(
                (self as *const ReshardBoxDesc).cast::<u8>(),
                std::mem::size_of::<ReshardBoxDesc>(),
            )
        }
    }
}

/// Whether reshard's kernel implements the `(source, destination)` pair
/// (`kernels/box_desc.h`, `reshard_box_copy_supports`): same-type raw
/// integers (`UINT8`, `INT16`, `INT32`, `INT64`: float copies are typed as
/// integers of their size), and the Atlas A2 `Cast` pairs `FLOAT`↔`FLOAT16`,
/// `FLOAT`↔`BF16`. `FLOAT16`↔`BF16` is not an A2 `Cast` pair, nor is any
/// `DOUBLE` one.
pub fn box_copy_supports(s: aclDataType, d: aclDataType) -> bool {
    if s == d {
        return matches!(s, ACL_UINT8 | ACL_INT16 | ACL_INT32 | ACL_INT64);
    }
    (s == ACL_FLOAT && matches!(d, ACL_FLOAT16 | ACL_BF16))
        || (d == ACL_FLOAT && matches!(s, ACL_FLOAT16 | ACL_BF16))
}

const _: () = assert!(std::mem::size_of::<ReshardBoxDesc>() == 16 + 8 * 8 * 3 + 16);
