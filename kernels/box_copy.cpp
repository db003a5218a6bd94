// reshard's fused strided box copy + dtype cast, for Atlas A2 (910B,
// dav-c220) AI Vector cores, in Ascend C: the device side of
// `reshard_box_copy` (launcher.cpp).
//
// STATUS: written against the Ascend C documentation and CANN headers cited
// in docs/ascend.md ("Kernel rules"); never compiled or run by us (no CANN,
// no NPU where reshard is developed). The host emulator (ffi/ascend-stub)
// implements the launcher's contract, not this code. Opt-in at run time
// (RESHARD_ASCEND_KERNEL=1) until examples/npu_smoke.rs has passed on an
// Atlas 800T A2.
//
// Rules this file follows (evidence in docs/ascend.md):
//  * kernel parameters are GM pointers or primitive scalars only: the
//    descriptor is read from a GM copy the host uploaded on the same stream
//    (CANN 8.0/8.1 Ascend C docs; later docs also allow POD structs by value,
//    which we do not rely on);
//  * Cast on dav-c220: half->float and bfloat16_t->float accept CAST_NONE
//    only; float->half and float->bfloat16_t accept CAST_RINT (round to
//    nearest even, as the CPU backend); half<->bfloat16_t is not a Cast
//    pair on A2, so the launcher refuses it (the backend sends it to aclnn);
//  * GlobalTensor::SetValue writes the core's data cache, not GM: after the
//    scalar path, DataCacheCleanAndInvalid writes it out; and two cores must
//    not SetValue within one 64-byte cache line, so the scalar path runs on
//    one core only.

#include <cstdint>
#include "kernel_operator.h"
#include "box_desc.h"

using namespace AscendC;

namespace {
constexpr uint32_t kTile = 4096;  // elements per UB tile (2 x in + 2 x out fit 192 KB UB)

// Round mode of each Cast pair we use (A2 table of the Cast API).
template <typename S, typename D>
struct CastMode {
    static constexpr RoundMode value = RoundMode::CAST_RINT;  // float -> half, float -> bfloat16_t
};
template <>
struct CastMode<half, float> {
    static constexpr RoundMode value = RoundMode::CAST_NONE;
};
template <>
struct CastMode<bfloat16_t, float> {
    static constexpr RoundMode value = RoundMode::CAST_NONE;
};

// One contiguous run of `n` elements, tiled through the unified buffer,
// cast on the way when the types differ.
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
                // DataCopy between UB tensors moves whole 32-byte blocks.
                DataCopy(out, in, (len * sizeof(S) + 31) / 32 * 32 / sizeof(S));
            } else {
                Cast(out, in, CastMode<S, D>::value, len);
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

// Scalar conversion of one element (only same-type or the float pairs).
template <typename S, typename D>
__aicore__ inline D Convert(S v) {
    if constexpr (std::is_same<S, D>::value) {
        return v;
    } else if constexpr (std::is_same<D, float>::value) {
        return ToFloat(v);  // half / bfloat16_t -> float: exact
    } else if constexpr (std::is_same<D, bfloat16_t>::value) {
        return ToBfloat16(v);  // float -> bfloat16_t, round to nearest even
    } else {
        return static_cast<D>(v);  // float -> half, round to nearest even
    }
}

template <typename S, typename D>
__aicore__ inline void BoxCopy(GM_ADDR src, GM_ADDR dst, const ReshardBoxDesc &d) {
    const uint32_t r = d.rank;
    const uint64_t inner = d.extent[r - 1];
    uint64_t rows = 1;
    for (uint32_t k = 0; k + 1 < r; ++k) rows *= d.extent[k];
    const bool contiguous = d.src_stride[r - 1] == 1 && d.dst_stride[r - 1] == 1;
    // Contiguous rows are split evenly across the cores (DataCopyPad writes
    // GM through the MTE, byte-exact). Strided rows use SetValue, which
    // writes whole cache lines from each core's data cache: one core only.
    const uint64_t blocks = contiguous ? GetBlockNum() : 1, me = GetBlockIdx();
    if (me >= blocks) return;
    const uint64_t per = (rows + blocks - 1) / blocks;
    const uint64_t lo = me * per, hi = (lo + per < rows) ? lo + per : rows;
    TPipe pipe;
    RunCopy<S, D> run;
    if (contiguous) run.Init(&pipe);
    GlobalTensor<D> last;
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
            for (uint64_t i = 0; i < inner; ++i) {
                t.SetValue(i * d.dst_stride[r - 1], Convert<S, D>(s.GetValue(i * d.src_stride[r - 1])));
            }
            last = t;
        }
    }
    if (!contiguous) {
        // Write every dirty line of this core's data cache out to GM.
        DataCacheCleanAndInvalid<D, CacheLine::ENTIRE_DATA_CACHE, DcciDst::CACHELINE_OUT>(last);
    }
}
}  // namespace

// `desc` is a GM copy of the launcher's host descriptor (uploaded on the
// same stream before the launch).
extern "C" __global__ __aicore__ void reshard_box_copy_kernel(GM_ADDR src, GM_ADDR dst, GM_ADDR desc) {
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
    ReshardBoxDesc d;
    // Scalar reads of the descriptor from GM (read-only: no flush needed).
    const __gm__ uint8_t *g = reinterpret_cast<const __gm__ uint8_t *>(desc);
    uint8_t *l = reinterpret_cast<uint8_t *>(&d);
    for (uint32_t i = 0; i < sizeof(ReshardBoxDesc); ++i) l[i] = g[i];
    const int32_t s = d.src_dtype, t = d.dst_dtype;
    if (s == t) {
        switch (s) {
            case kReshardUint8: BoxCopy<uint8_t, uint8_t>(src, dst, d); return;
            case kReshardInt16: BoxCopy<int16_t, int16_t>(src, dst, d); return;
            case kReshardInt32: BoxCopy<int32_t, int32_t>(src, dst, d); return;
            case kReshardInt64: BoxCopy<int64_t, int64_t>(src, dst, d); return;
            default: return;  // refused by the launcher
        }
    }
    if (s == kReshardFloat && t == kReshardHalf) BoxCopy<float, half>(src, dst, d);
    else if (s == kReshardFloat && t == kReshardBf16) BoxCopy<float, bfloat16_t>(src, dst, d);
    else if (s == kReshardHalf && t == kReshardFloat) BoxCopy<half, float>(src, dst, d);
    else if (s == kReshardBf16 && t == kReshardFloat) BoxCopy<bfloat16_t, float>(src, dst, d);
    // Anything else is refused by the launcher before a launch.
}
