//! Feature `cann` with headers found: bindgen's view of the installed CANN
//! headers, and compile-time checks that the hand-written layer agrees.
//!
//! `bindings` is generated with the hand-written named types blocklisted and
//! replaced by ours (`use crate::sys::types::*`), so the pins in
//! [`super::table`] (`const aclInit: <our fn type> = bindings::aclInit;`)
//! compare every parameter and return type exactly; `raw` is generated
//! without the blocklist, and the assertions below compare the layouts and
//! enum values of the types we wrote by hand.
#![allow(
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    missing_docs,
    clippy::all
)]

/// Functions, over the hand-written types.
pub mod bindings {
    use crate::sys::types::*;
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

/// Everything, as the headers declare it.
pub mod raw {
    include!(concat!(env!("OUT_DIR"), "/raw.rs"));
}

use crate::sys::types as ours;
use std::mem::{align_of, size_of};

macro_rules! same_layout {
    ($($ours:ty => $theirs:ty),* $(,)?) => {$(
        const _: () = assert!(size_of::<$ours>() == size_of::<$theirs>());
        const _: () = assert!(align_of::<$ours>() == align_of::<$theirs>());
    )*};
}

same_layout! {
    ours::aclDataType => raw::aclDataType,
    ours::aclFormat => raw::aclFormat,
    ours::aclrtMemcpyKind => raw::aclrtMemcpyKind,
    ours::aclrtMemMallocPolicy => raw::aclrtMemMallocPolicy,
    ours::HcclResult => raw::HcclResult,
    ours::HcclDataType => raw::HcclDataType,
    ours::HcclRootInfo => raw::HcclRootInfo,
}

macro_rules! same_value {
    ($($ours:expr => $theirs:expr),* $(,)?) => {$(
        const _: () = assert!($ours as i64 == $theirs as i64);
    )*};
}

same_value! {
    ours::ACL_FLOAT.0 => raw::aclDataType::ACL_FLOAT.0,
    ours::ACL_FLOAT16.0 => raw::aclDataType::ACL_FLOAT16.0,
    ours::ACL_BF16.0 => raw::aclDataType::ACL_BF16.0,
    ours::ACL_DOUBLE.0 => raw::aclDataType::ACL_DOUBLE.0,
    ours::ACL_INT8.0 => raw::aclDataType::ACL_INT8.0,
    ours::ACL_UINT8.0 => raw::aclDataType::ACL_UINT8.0,
    ours::ACL_INT16.0 => raw::aclDataType::ACL_INT16.0,
    ours::ACL_INT32.0 => raw::aclDataType::ACL_INT32.0,
    ours::ACL_INT64.0 => raw::aclDataType::ACL_INT64.0,
    ours::ACL_FORMAT_ND.0 => raw::aclFormat::ACL_FORMAT_ND.0,
    ours::ACL_MEMCPY_HOST_TO_DEVICE.0 => raw::aclrtMemcpyKind::ACL_MEMCPY_HOST_TO_DEVICE.0,
    ours::ACL_MEMCPY_DEVICE_TO_HOST.0 => raw::aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_HOST.0,
    ours::ACL_MEMCPY_DEVICE_TO_DEVICE.0 => raw::aclrtMemcpyKind::ACL_MEMCPY_DEVICE_TO_DEVICE.0,
    ours::ACL_MEM_MALLOC_HUGE_FIRST.0 => raw::aclrtMemMallocPolicy::ACL_MEM_MALLOC_HUGE_FIRST.0,
    ours::HCCL_E_TIMEOUT.0 => raw::HcclResult::HCCL_E_TIMEOUT.0,
    ours::HCCL_DATA_TYPE_UINT8.0 => raw::HcclDataType::HCCL_DATA_TYPE_UINT8.0,
    ours::HCCL_DATA_TYPE_BFP16.0 => raw::HcclDataType::HCCL_DATA_TYPE_BFP16.0,
    ours::HCCL_ROOT_INFO_BYTES => raw::HCCL_ROOT_INFO_BYTES,
}
