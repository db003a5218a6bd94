"""Builds distributed safetensors checkpoints and MindSpore's unified answers.

usage: unify_gen.py OUT_DIR CASES_JSON

CASES_JSON: [{"name", "dtype", "src": SIDE, "dst": SIDE|null, "runs": [RUN]}]  (SIDE as in transform_gen.py)
RUN: {"out": "<dir name>", "part_bytes": N|null, "drop_prefix": P|null, "rename": {OLD: NEW}|null,
      "split": [K, N]|null, "file_suffix": S|null}

For each case OUT_DIR/<name>/ gets (transform_gen.make_case):
  src/rank_{r}/src_{r}.safetensors   the source shards (ckpt-era transform + ckpt_to_safetensors),
                                     re-headed with metadata {"format", "remove_redundancy": "False",
                                     "crc_num": <its CRC>} as MindFormers' CheckpointMonitor leaves them
  src_strategy_merged.ckpt           the source strategy
  full/rank_0/full.ckpt              the full model
and for each run OUT_DIR/<name>/<out>/ is ms.unified_safetensors' output. With a "dst" side,
OUT_DIR/<name>/loaded/rank_{r}/net.safetensors is ms.load_distributed_checkpoint(None, predict_strategy=dst,
unified_safetensors_dir=<name>/unified) (the first run must write "unified"). "part_bytes" replaces the
3 GiB of split_num = ceil(total / 3 GiB) (MindSpore's own code, with math.ceil patched), so small
models give several parts.
"""
import json
import math
import os
import struct
import sys
import types
import zlib

from common import ms, np
import mindspore.parallel.transform_safetensors as T
from transform_gen import make_case


INTS = {"I8": np.int8, "U8": np.uint8, "I16": np.int16, "U16": np.uint16, "I32": np.int32, "U32": np.uint32,
        "I64": np.int64, "U64": np.uint64}


def reheader(path):
    """Rewrites a safetensors file's __metadata__ in place (the tensor bytes stay)."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    crc = 0
    for name in sorted(header):
        info = header[name]
        raw = data[base + info["data_offsets"][0]:base + info["data_offsets"][1]]
        crc = zlib.crc32(name.encode(), crc)
        if not info["shape"] and info["dtype"] in INTS:
            # MindSpore's bytes() of a 0-d integer array: `value` zero bytes.
            raw = bytes(int(np.frombuffer(raw, INTS[info["dtype"]])[0]))
        crc = zlib.crc32(raw, crc)
    meta = {"format": "ms", "remove_redundancy": "False", "crc_num": str(crc)}
    text = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    os.chmod(path, 0o600)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data[8 + n:])


def run(d, strategy, r):
    real = math
    if r.get("part_bytes"):
        pb = r["part_bytes"]
        T.math = types.SimpleNamespace(
            ceil=lambda x: real.ceil(round(x * 3 * 1024 ** 3) / pb), prod=real.prod)
    else:
        T.math = real
    choice = None
    if r.get("drop_prefix") or r.get("rename"):
        prefix, rename = r.get("drop_prefix"), r.get("rename") or {}

        def choice(name):
            if prefix and name.startswith(prefix):
                return False
            return rename.get(name, True)
    kw = {}
    if r.get("split"):
        kw["split_dst_file"] = tuple(r["split"])
    ms.unified_safetensors(os.path.join(d, "src"), strategy, os.path.join(d, r["out"]),
                           file_suffix=r.get("file_suffix"), max_process_num=1, choice_func=choice, **kw)
    T.math = real


def main():
    root, cases = sys.argv[1], json.load(open(sys.argv[2]))
    for case in cases:
        case = dict(case, format="safetensors")
        make_case(root, case)
        d = os.path.join(root, case["name"])
        for rank_dir in sorted(os.listdir(os.path.join(d, "src"))):
            for f in os.listdir(os.path.join(d, "src", rank_dir)):
                reheader(os.path.join(d, "src", rank_dir, f))
        strategy = os.path.join(d, "src_strategy_merged.ckpt")
        for r in case["runs"]:
            run(d, strategy, r)
        if case.get("dst"):
            # Splitting the unified dir for the destination strategy, as MindFormers does.
            ms.load_distributed_checkpoint(None, predict_strategy=os.path.join(d, "dst_strategy_merged.ckpt"),
                                           format="safetensors", unified_safetensors_dir=os.path.join(d, "unified"),
                                           dst_safetensors_dir=os.path.join(d, "loaded"), max_process_num=1)
    print("ok", len(cases))


if __name__ == "__main__":
    main()
