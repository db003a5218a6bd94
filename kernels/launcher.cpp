// Host launcher of reshard_box_copy_kernel (box_copy.cpp), exported to Rust
// as `reshard_box_copy` (ascendcl_sys::sys::Api::reshard_box_copy):
//
//   uint32_t reshard_box_copy(uint32_t block_dim, aclrtStream stream,
//                             void *src, void *dst, void *desc_dev,
//                             const ReshardBoxDesc *desc_host);
//
//   * src, dst: device (GM) base addresses of the whole tensors;
//   * desc_dev: device (GM) copy of *desc_host, at least
//     sizeof(ReshardBoxDesc) bytes, uploaded by the caller on `stream`
//     before this call and kept alive until the stream passes it;
//   * desc_host: host copy, validated here (rank 1..=8, a supported pair);
//   * returns 0 when launched, ACL_ERROR_INVALID_PARAM (100000) for a
//     descriptor the kernel does not implement (nothing launched), else the
//     status of the launch itself (ACLRT_LAUNCH_KERNEL). The copy runs
//     asynchronously on `stream`; faults surface at its synchronize.
#include <cstdint>
#include "acl/acl.h"
#include "aclrtlaunch_reshard_box_copy_kernel.h"
#include "box_desc.h"

extern "C" uint32_t reshard_box_copy(uint32_t block_dim, aclrtStream stream, void *src, void *dst,
                                     void *desc_dev, const ReshardBoxDesc *desc_host) {
    if (desc_host == nullptr || desc_dev == nullptr || src == nullptr || dst == nullptr || block_dim == 0 ||
        desc_host->rank == 0 || desc_host->rank > 8 ||
        !reshard_box_copy_supports(desc_host->src_dtype, desc_host->dst_dtype)) {
        return ACL_ERROR_INVALID_PARAM;
    }
    return ACLRT_LAUNCH_KERNEL(reshard_box_copy_kernel)(block_dim, stream, src, dst, desc_dev);
}
