// The box-copy descriptor shared by the kernel (box_copy.cpp), its host
// launcher (launcher.cpp) and Rust (ascendcl_sys::sys::ReshardBoxDesc,
// #[repr(C)]; the emulator in ffi/ascend-stub checks the same rules).
#pragma once
#include <cstdint>

struct ReshardBoxDesc {
    uint32_t rank;        // 1..=8
    int32_t src_dtype;    // aclDataType
    int32_t dst_dtype;    // aclDataType
    uint32_t reserved;    // 0
    uint64_t extent[8];   // destination order
    int64_t src_stride[8];  // source elements
    int64_t dst_stride[8];  // destination elements
    int64_t src_offset;
    int64_t dst_offset;
};
// The Rust mirror asserts the same size (ascendcl_sys::sys::ReshardBoxDesc).
static_assert(sizeof(ReshardBoxDesc) == 224, "ReshardBoxDesc layout");

// aclDataType values (acl/acl_base.h).
constexpr int32_t kReshardFloat = 0;
constexpr int32_t kReshardHalf = 1;
constexpr int32_t kReshardInt32 = 3;
constexpr int32_t kReshardUint8 = 4;
constexpr int32_t kReshardInt16 = 6;
constexpr int32_t kReshardInt64 = 9;
constexpr int32_t kReshardBf16 = 27;

// The pairs the kernel implements: same-type raw integers (the backend
// types float copies as integers of their size), and the A2 Cast pairs
// float<->half, float<->bfloat16_t. half<->bfloat16_t is not one.
inline bool reshard_box_copy_supports(int32_t s, int32_t d) {
    if (s == d) return s == kReshardUint8 || s == kReshardInt16 || s == kReshardInt32 || s == kReshardInt64;
    return (s == kReshardFloat && (d == kReshardHalf || d == kReshardBf16)) ||
           (d == kReshardFloat && (s == kReshardHalf || s == kReshardBf16));
}
