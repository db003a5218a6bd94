#!/usr/bin/env bash
# Regenerates ffi/ascendcl-sys/bindings/cann_<version>.rs from real CANN
# headers. Needs libclang (Debian: apt-get install libclang-dev) and network
# access to the public repositories below; CI never runs it (the generated
# files are committed and checked by `cargo test -p ascendcl-sys`).
#
# Usage: ffi/ascendcl-sys/regen/regen.sh SRC_DIR
#   SRC_DIR holds (or receives) git clones of the public repositories:
#     Ascend/pytorch          tag v7.0.0-pytorch2.5.1  (torch_npu 7.0.0, built
#                             against CANN 8.1.RC1: third_party/acl/inc,
#                             third_party/hccl/inc = the toolkit's acl/ and
#                             hccl/ headers of that release)
#     hicann/runtime          tag v8.5.0  include/external/acl/
#     hicann/opbase           tag v8.5.0  include/nnopbase/aclnn/, include/aclnnop/aclnn_util.h
#     hicann/ops-math         tag v8.5.0  aclnn_{add,cast,cat,copy,slice}.h
#     hicann/ops-nn           tag v8.5.0  aclnn_{addmm,matmul}.h
#     hicann/hccl             tag v8.5.0  include/hccl.h
#     hicann/hcomm            tag v8.5.0  include/hccl/{hccl_types,hccl_comm}.h
#   and the same six hicann repositories at tag v9.0.0 (cann_9_0.rs; paths as
#   in the v9.0.0 block below; hccl_comm.h then includes hccl_res.h, which
#   includes securec.h: an empty stand-in is supplied).
#   (These headers are not committed: the Huawei ones are under the CANN Open
#   Software License; only the generated declarations are.)
# Or: ffi/ascendcl-sys/regen/regen.sh --toolkit NAME ROOT
#   bindgen over an installed toolkit's ROOT/include → bindings/cann_NAME.rs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$here/../bindings
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

build() {
  (cd "$here" && cargo build --release --quiet)
  regen=$here/target/release/ascendcl-regen
  [ -x "$regen" ] || regen=${CARGO_TARGET_DIR:-$here/target}/release/ascendcl-regen
}

if [ "${1:-}" = "--toolkit" ]; then
  build
  "$regen" "$out/cann_$2.rs" "installed toolkit $3 ($(cat "$3/version.cfg" 2>/dev/null | head -1))" "$3/include" "$3/include/aclnn"
  exit
fi

src=${1:?usage: regen.sh SRC_DIR | --toolkit NAME ROOT}
mkdir -p "$src"
clone() { # repo tag
  local dir=$src/${1//\//+}
  [ -d "$dir" ] || git clone --quiet --filter=blob:none "https://github.com/$1" "$dir"
  git -C "$dir" fetch --quiet --tags || true
  git -C "$dir" rev-parse "$2^{commit}"
}
show() { git -C "$src/${1//\//+}" show "$2:$3"; }

# --- CANN 8.1 (acl + hccl; the aclnn headers of 8.1 are not public) ---
c81=$(clone Ascend/pytorch v7.0.0-pytorch2.5.1)
h81=$work/8.1
mkdir -p "$h81"
git -C "$src/Ascend+pytorch" archive v7.0.0-pytorch2.5.1 third_party/acl/inc/acl third_party/acl/inc/ge \
  third_party/hccl/inc/hccl | tar -x -C "$h81"
# torch_npu's hccl.h includes "third_party/..." paths: -I the snapshot root too.
build
"$regen" "$out/cann_8_1.rs" "Ascend/pytorch@$c81 (v7.0.0-pytorch2.5.1, CANN 8.1.RC1): third_party/acl/inc, third_party/hccl/inc" \
  "$h81/third_party/acl/inc" "$h81/third_party/hccl/inc" "$h81"

# --- CANN 8.5 (first open-source release: acl, aclnn, hccl) ---
h85=$work/8.5/include
mkdir -p "$h85/acl" "$h85/aclnn" "$h85/aclnnop" "$h85/hccl"
prov=""
for r in hicann/runtime hicann/opbase hicann/ops-math hicann/ops-nn hicann/hccl hicann/hcomm; do
  prov="$prov $r@$(clone $r v8.5.0)"
done
git -C "$src/hicann+runtime" archive v8.5.0 include/external/acl | tar -x -C "$work"
cp -r "$work/include/external/acl/." "$h85/acl/"
for f in acl_meta.h aclnn_base.h; do show hicann/opbase v8.5.0 include/nnopbase/aclnn/$f > "$h85/aclnn/$f"; done
show hicann/opbase v8.5.0 include/aclnnop/aclnn_util.h > "$h85/aclnnop/aclnn_util.h"
show hicann/ops-math v8.5.0 conversion/concat_d/op_api/aclnn_cat.h > "$h85/aclnnop/aclnn_cat.h"
show hicann/ops-math v8.5.0 conversion/slice/op_api/aclnn_slice.h > "$h85/aclnnop/aclnn_slice.h"
show hicann/ops-math v8.5.0 conversion/view_copy/op_host/op_api/aclnn_copy.h > "$h85/aclnnop/aclnn_copy.h"
show hicann/ops-math v8.5.0 math/add/op_api/aclnn_add.h > "$h85/aclnnop/aclnn_add.h"
show hicann/ops-math v8.5.0 math/cast/op_host/op_api/aclnn_cast.h > "$h85/aclnnop/aclnn_cast.h"
show hicann/ops-nn v8.5.0 matmul/mat_mul_v3/op_host/op_api/aclnn_addmm.h > "$h85/aclnnop/aclnn_addmm.h"
show hicann/ops-nn v8.5.0 matmul/mat_mul_v3/op_host/op_api/aclnn_matmul.h > "$h85/aclnnop/aclnn_matmul.h"
show hicann/hccl v8.5.0 include/hccl.h > "$h85/hccl/hccl.h"
for f in hccl_types.h hccl_comm.h; do show hicann/hcomm v8.5.0 include/hccl/$f > "$h85/hccl/$f"; done
"$regen" "$out/cann_8_5.rs" "tag v8.5.0 of$prov" "$h85"

# --- CANN 9.0 ---
h90=$work/9.0/include
mkdir -p "$h90/acl" "$h90/aclnn" "$h90/aclnnop" "$h90/hccl" "$work/9.0/shim"
: > "$work/9.0/shim/securec.h"
prov=""
for r in hicann/runtime hicann/opbase hicann/ops-math hicann/ops-nn hicann/hccl hicann/hcomm; do
  prov="$prov $r@$(clone $r v9.0.0)"
done
rm -rf "$work/include"
git -C "$src/hicann+runtime" archive v9.0.0 include/external/acl | tar -x -C "$work"
cp -r "$work/include/external/acl/." "$h90/acl/"
for f in acl_meta.h aclnn_base.h; do show hicann/opbase v9.0.0 include/nnopbase/aclnn/$f > "$h90/aclnn/$f"; done
show hicann/opbase v9.0.0 include/aclnnop/aclnn_util.h > "$h90/aclnnop/aclnn_util.h"
show hicann/ops-math v9.0.0 conversion/concat_d/op_api/aclnn_cat.h > "$h90/aclnnop/aclnn_cat.h"
show hicann/ops-math v9.0.0 conversion/slice/op_api/aclnn_slice.h > "$h90/aclnnop/aclnn_slice.h"
show hicann/ops-math v9.0.0 conversion/view_copy/op_api/aclnn_copy.h > "$h90/aclnnop/aclnn_copy.h"
show hicann/ops-math v9.0.0 math/add/op_api/aclnn_add.h > "$h90/aclnnop/aclnn_add.h"
show hicann/ops-math v9.0.0 math/cast/op_api/aclnn_cast.h > "$h90/aclnnop/aclnn_cast.h"
show hicann/ops-nn v9.0.0 matmul/mat_mul_v3/op_host/op_api/aclnn_addmm.h > "$h90/aclnnop/aclnn_addmm.h"
show hicann/ops-nn v9.0.0 matmul/mat_mul_v3/op_host/op_api/aclnn_matmul.h > "$h90/aclnnop/aclnn_matmul.h"
show hicann/hccl v9.0.0 include/hccl.h > "$h90/hccl/hccl.h"
for f in hccl_comm.h hccl_rank_graph.h hccl_res.h hccl_sym_win.h hccl_types.h hcomm_primitives.h; do
  show hicann/hcomm v9.0.0 include/hccl/$f > "$h90/hccl/$f"
done
"$regen" "$out/cann_9_0.rs" "tag v9.0.0 of$prov (+ an empty securec.h)" "$h90" "$work/9.0/shim"
