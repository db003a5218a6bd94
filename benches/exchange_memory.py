#!/usr/bin/env python3
"""Memory of each rank of a multi-process in-job exchange (issue 16).

Runs `reshard auto --exchange hccl` as 8 processes on the CANN host emulator
(`examples/reshard_emulated`: the CLI linked against ffi/ascend-stub), as two
"nodes" of 4 whose disks hold disjoint source ranks: a synthetic model saved
as mp8, read by a dp2·mp4 job, so every rank receives slices only the other
node has. Samples each process's anonymous resident memory (RssAnon) every
10 ms and prints, per rank, the peak anonymous and peak total resident
memory (VmHWM, mapped source pages included), the emulated device's peak
(on the emulator, device memory is host memory, so it is inside the anonymous
figure; on an NPU it is HBM), what the exchange report says it read, sent,
received and held in its inbox, and checks every rank's file against
`reshard transform`'s. Emulated: the HCCL transport is the emulator's (files
in a folder), not an NPU's.

Usage (from the repository root):
    cargo build --release --bin reshard
    cargo build --release --features ascend --example reshard_emulated
    python3 benches/exchange_memory.py [--size-mib 1024] [--keep DIR]
"""

import argparse
import filecmp
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESHARD = os.path.join(ROOT, "target/release/reshard")
EMULATED = os.path.join(ROOT, "target/release/examples/reshard_emulated")

YAML = """output_dir: './output'
load_checkpoint: './ckpt'
src_strategy_path_or_dir: './src_strategy'
auto_trans_ckpt: True
only_save_strategy: False
use_parallel: True
load_ckpt_format: 'ckpt'
parallel_config:
  data_parallel: 2
  model_parallel: 4
  pipeline_stage: 1
"""


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--keep", help="work in this directory and keep it")
    a = ap.parse_args()
    for b in (RESHARD, EMULATED):
        if not os.path.exists(b):
            sys.exit(f"{b} is missing: build it first (see the usage above)")
    work = a.keep or tempfile.mkdtemp(prefix="reshard-xchg-mem-")
    if a.keep:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
    try:
        measure(work, a.size_mib)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(work, size_mib):
    demo = os.path.join(work, "demo")
    run(RESHARD, "demo", "--dir", demo, "--size-mib", str(size_mib))
    full = os.path.join(work, "full.ckpt")
    os.replace(os.path.join(demo, "full.ckpt"), full)
    shutil.rmtree(demo)
    src_s, dst_s = os.path.join(work, "src_strategy"), os.path.join(work, "dst_strategy")
    run(RESHARD, "strategy", "--checkpoint", full, "-o", src_s, "--mp", "8")
    run(RESHARD, "strategy", "--checkpoint", full, "-o", dst_s, "--dp", "2", "--mp", "4")
    ckpt = os.path.join(work, "ckpt")
    run(RESHARD, "transform", "--src-checkpoint", full, "--dst-strategy", src_s,
        "--dst-checkpoint-dir", ckpt, "--no-fsync")
    expect = os.path.join(work, "expect")
    run(RESHARD, "transform", "--src-checkpoint", ckpt, "--src-strategy", src_s,
        "--dst-strategy", dst_s, "--dst-checkpoint-dir", expect, "--no-fsync")
    largest = max_tensor_bytes(full)
    os.remove(full)
    nodes = []
    for n in range(2):
        node = os.path.join(work, f"node{n}")
        shutil.copytree(src_s, os.path.join(node, "src_strategy"))
        os.makedirs(os.path.join(node, "output/strategy"))
        os.makedirs(os.path.join(node, "ckpt"))
        for r in range(4 * n, 4 * n + 4):
            os.replace(os.path.join(ckpt, f"rank_{r}"), os.path.join(node, f"ckpt/rank_{r}"))
            f = f"ckpt_strategy_rank_{r}.ckpt"
            shutil.copy(os.path.join(dst_s, f), os.path.join(node, "output/strategy", f))
        with open(os.path.join(node, "run.yaml"), "w") as f:
            f.write(YAML)
        nodes.append(node)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    net = os.path.join(work, "net")
    os.makedirs(net)
    procs = []
    for r in range(8):
        env = dict(os.environ, RANK_ID=str(r), RANK_SIZE="8", DEVICE_NUM_PER_NODE="4",
                   ASCEND_STUB_HCCL_DIR=net,
                   ASCEND_STUB_STATS_FILE=os.path.join(work, f"rank{r}.device.json"))
        out = open(os.path.join(work, f"rank{r}.json"), "w")
        err = open(os.path.join(work, f"rank{r}.err"), "w")
        p = subprocess.Popen([EMULATED, "auto", "--config", "run.yaml", "--json", "--exchange",
                              "hccl", "--rendezvous", f"127.0.0.1:{port}", "--timeout", "600"],
                             cwd=nodes[r // 4], env=env, stdout=out, stderr=err)
        procs.append(p)
    peak_anon = [0] * 8
    peak_total = [0] * 8
    while any(p.poll() is None for p in procs):
        for r, p in enumerate(procs):
            if p.returncode is None:
                peak_anon[r] = max(peak_anon[r], status_kib(p.pid, "RssAnon") or 0)
                peak_total[r] = max(peak_total[r], status_kib(p.pid, "VmHWM") or 0)
        time.sleep(0.01)
    print(f"model {size_mib} MiB, largest tensor {largest / 2**20:.1f} MiB; "
          f"8 processes, two nodes of 4 (emulated HCCL)")
    print("rank  peak anon MiB  (emulated device)  peak RSS MiB  read MiB  sent MiB  "
          "received MiB  inbox peak MiB  file")
    ok = True
    for r, p in enumerate(procs):
        text = open(os.path.join(work, f"rank{r}.json")).read()
        if p.returncode != 0:
            ok = False
            print(f"rank {r} failed ({p.returncode}): "
                  f"{open(os.path.join(work, f'rank{r}.err')).read()}")
            continue
        rep = json.loads(text)
        x = rep["exchange"][0]
        path = rep["paths"][0]
        same = filecmp.cmp(path, os.path.join(expect, f"rank_{r}", os.path.basename(path)),
                           shallow=False)
        ok &= same
        mib = lambda b: b / 2**20
        with open(os.path.join(work, f"rank{r}.device.json")) as f:
            device = json.load(f)["peak_device_bytes"]
        print(f"{r:4}  {peak_anon[r] / 1024:13.1f}  {mib(device):17.1f}  "
              f"{peak_total[r] / 1024:12.1f}  "
              f"{mib(x['bytes_read']):8.1f}  {mib(x['bytes_sent']):8.1f}  "
              f"{mib(x['bytes_received']):12.1f}  {mib(x['inbox_peak_bytes']):14.1f}  "
              f"{'identical' if same else 'DIFFERS'}")
    sys.exit(0 if ok else 1)


def max_tensor_bytes(path):
    out = subprocess.run([RESHARD, "inspect", "--json", path], check=True,
                         capture_output=True, text=True).stdout
    rep = json.loads(out)
    sizes = [t.get("bytes", 0) for t in rep.get("tensors", [])]
    return max(sizes) if sizes else 0


if __name__ == "__main__":
    main()
