// reshard's fused strided box copy + dtype cast, for Ascend A2 (910B) AI
// Vector cores, in Ascend C.
//
// STATUS: written against the public Ascend C documentation; never compiled
// or run here (no CANN, no NPU where reshard is developed). The host
// emulator implements the launcher's *contract* below (ffi/ascend-stub),
// not this code. Run examples/npu_smoke.rs on an Atlas 800T A2 before
// trusting it; without it, the backend uses aclnnInplaceCopy.
//
// Contract (mirrored by ascendcl_sys::sys::ReshardBoxDesc and the emulator):
//   uint32_t reshard_box_copy(uint32_t block_dim, aclrtStream stream,
//                             void *src, void *dst, const ReshardBoxDesc *desc)
//   * src, dst: device (GM) addresses of the whole source / destination
//     tensors; desc: HOST pointer, read during the call and passed to the
//     kernel by value.
//   * For every index i of desc->extent (rank ≤ 8, destination order):
//       dst[dst_offset + Σ i_d·dst_stride_d] =
//           cast(src[src_offset + Σ i_d·src_stride_d])
//     strides/offsets in elements of each side's dtype (aclDataType values).
//   * Pairs: same dtype as raw integers (UINT8/INT16/INT32/INT64), and
//     FLOAT/FLOAT16/BF16 among themselves, rounding to nearest even.
//   * Returns 0 when launched; the copy runs asynchronously on `stream`.

#include <cstdint>
#include "kernel_operator.h"

using namespace AscendC;

struct ReshardBoxDesc {
    uint32_t rank;
    int32_t src_dtype;
    int32_t dst_dtype;
    uint32_t reserved;
    uint64_t extent[8];
    int64_t src_stride[8];
    int64_t dst_stride[8];
    int64_t src_offset;
    int64_t dst_offset;
};

namespace {
constexpr int32_t kFloat = 0;   // ACL_FLOAT
constexpr int32_t kHalf = 1;    // ACL_FLOAT16
constexpr int32_t kInt32 = 3;   // ACL_INT32
constexpr int32_t kUint8 = 4;   // ACL_UINT8
constexpr int32_t kInt16 = 6;   // ACL_INT16
constexpr int32_t kInt64 = 9;   // ACL_INT64
constexpr int32_t kBf16 = 27;   // ACL_BF16

constexpr uint32_t kTile = 4096;  // elements per UB tile (fits 192 KB UB with 2 buffers)

// One contiguous inner run of `n` elements, tiled through the unified
// buffer, cast on the way when the types differ.
template <typename S, typename D>
class RunCopy {
public:
    __aicore__ inline void Init(TPipe *pipe) {
        pipe->InitBuffer(inQ, 2, kTile * sizeof(S));
        pipe->InitBuffer(outQ, 2, kTile * sizeof(D));
    }

    __aicore__ inline void Run(GlobalTensor<S> src, GlobalTensor<D> dst, uint64_t n) {
        for (uint64_t at = 0; at < n; at += kTile) {
            uint32_t len = static_cast<uint32_t>((n - at) < kTile ? (n - at) : kTile);
            LocalTensor<S> in = inQ.AllocTensor<S>();
            DataCopyExtParams cin{1, static_cast<uint32_t>(len * sizeof(S)), 0, 0, 0};
            DataCopyPadExtParams<S> pad{false, 0, 0, 0};
            DataCopyPad(in, src[at], cin, pad);
            inQ.EnQue(in);
            in = inQ.DeQue<S>();
            LocalTensor<D> out = outQ.AllocTensor<D>();
            if constexpr (std::is_same<S, D>::value) {
                DataCopy(out, in, (len + 31) / 32 * 32);
            } else {
                Cast(out, in, RoundMode::CAST_RINT, len);
            }
            outQ.EnQue(out);
            inQ.FreeTensor(in);
            out = outQ.DeQue<D>();
            DataCopyExtParams cout{1, static_cast<uint32_t>(len * sizeof(D)), 0, 0, 0};
            DataCopyPad(dst[at], out, cout);
            outQ.FreeTensor(out);
        }
    }

private:
    TQue<QuePosition::VECIN, 2> inQ;
    TQue<QuePosition::VECOUT, 2> outQ;
};

// Element by element through the scalar unit (strided inner dim).
template <typename S, typename D>
__aicore__ inline void Scalar(GlobalTensor<S> src, int64_t ss, GlobalTensor<D> dst, int64_t ds, uint64_t n) {
    for (uint64_t i = 0; i < n; ++i) {
        S v = src.GetValue(i * ss);
        if constexpr (std::is_same<S, D>::value) {
            dst.SetValue(i * ds, v);
        } else {
            dst.SetValue(i * ds, static_cast<D>(static_cast<float>(v)));
        }
    }
}

template <typename S, typename D>
__aicore__ inline void BoxCopy(GM_ADDR src, GM_ADDR dst, const ReshardBoxDesc &d) {
    const uint32_t r = d.rank;
    const uint64_t inner = d.extent[r - 1];
    uint64_t rows = 1;
    for (uint32_t k = 0; k + 1 < r; ++k) rows *= d.extent[k];
    // Rows are split evenly across the cores of the launch.
    const uint64_t blocks = GetBlockNum(), me = GetBlockIdx();
    const uint64_t per = (rows + blocks - 1) / blocks;
    const uint64_t lo = me * per, hi = (lo + per < rows) ? lo + per : rows;
    TPipe pipe;
    RunCopy<S, D> run;
    const bool contiguous = d.src_stride[r - 1] == 1 && d.dst_stride[r - 1] == 1;
    if (contiguous) run.Init(&pipe);
    for (uint64_t row = lo; row < hi; ++row) {
        int64_t so = d.src_offset, doff = d.dst_offset;
        uint64_t rest = row;
        for (int32_t k = static_cast<int32_t>(r) - 2; k >= 0; --k) {
            uint64_t idx = rest % d.extent[k];
            rest /= d.extent[k];
            so += static_cast<int64_t>(idx) * d.src_stride[k];
            doff += static_cast<int64_t>(idx) * d.dst_stride[k];
        }
        GlobalTensor<S> s;
        GlobalTensor<D> t;
        s.SetGlobalBuffer(reinterpret_cast<__gm__ S *>(src) + so);
        t.SetGlobalBuffer(reinterpret_cast<__gm__ D *>(dst) + doff);
        if (contiguous) {
            run.Run(s, t, inner);
        } else {
            Scalar<S, D>(s, d.src_stride[r - 1], t, d.dst_stride[r - 1], inner);
        }
    }
}
}  // namespace

extern "C" __global__ __aicore__ void reshard_box_copy_kernel(GM_ADDR src, GM_ADDR dst, ReshardBoxDesc d) {
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
    const int32_t s = d.src_dtype, t = d.dst_dtype;
    if (s == t) {
        switch (s) {
            case kUint8: BoxCopy<uint8_t, uint8_t>(src, dst, d); return;
            case kInt16: BoxCopy<int16_t, int16_t>(src, dst, d); return;
            case kInt32: BoxCopy<int32_t, int32_t>(src, dst, d); return;
            case kInt64: BoxCopy<int64_t, int64_t>(src, dst, d); return;
            case kFloat: BoxCopy<int32_t, int32_t>(src, dst, d); return;
            case kHalf: case kBf16: BoxCopy<int16_t, int16_t>(src, dst, d); return;
            default: return;
        }
    }
    if (s == kFloat && t == kHalf) BoxCopy<float, half>(src, dst, d);
    else if (s == kFloat && t == kBf16) BoxCopy<float, bfloat16_t>(src, dst, d);
    else if (s == kHalf && t == kFloat) BoxCopy<half, float>(src, dst, d);
    else if (s == kBf16 && t == kFloat) BoxCopy<bfloat16_t, float>(src, dst, d);
    // fp16 <-> bf16 go through f32 (exact), as the CPU backend does; the
    // backend routes them to aclnnInplaceCopy until a two-step cast lands.
}

// Host launcher, called from Rust through ascendcl_sys::Api::reshard_box_copy.
extern "C" uint32_t reshard_box_copy(uint32_t block_dim, void *stream, void *src, void *dst,
                                     const ReshardBoxDesc *desc) {
    if (desc == nullptr || desc->rank == 0 || desc->rank > 8 || block_dim == 0) return 1;
    reshard_box_copy_kernel<<<block_dim, nullptr, stream>>>(
        reinterpret_cast<uint8_t *>(src), reinterpret_cast<uint8_t *>(dst), *desc);
    return 0;
}
