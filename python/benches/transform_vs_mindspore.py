"""reshard.transform_checkpoints vs mindspore.transform_checkpoints: dp2mp2 -> mp4, fp32,
N layers of two 2048x2048 weights (N=8: 268 MB); checks the outputs are byte-identical.

usage: python python/benches/transform_vs_mindspore.py [N]   (MindSpore venv, reshard installed)
"""
import filecmp, os, shutil, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "conformance", "py"))
import numpy as np
import transform_gen as g
ms = g.ms
import reshard
d = os.path.join(os.environ.get("TMPDIR", "/tmp"), "reshard-bench")
shutil.rmtree(d, ignore_errors=True)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
specs = [(f"model.layers.{i}.w{j}", [2048, 2048], "col" if j == 0 else "row", 0) for i in range(n) for j in range(2)]
rng = np.random.default_rng(0)
os.makedirs(f"{d}/full/rank_0")
ms.save_checkpoint([{"name": s[0], "data": ms.Tensor(rng.standard_normal(s[1]).astype(np.float32))} for s in specs],
                   f"{d}/full/rank_0/full.ckpt")
src_s = g.write_strategies({"dev": [2, 2]}, f"{d}/src_strategy", specs)
dst_s = g.write_strategies({"dev": [4]}, f"{d}/dst_strategy", specs)
ms.transform_checkpoints(f"{d}/full", f"{d}/src", "src_", None, src_s)
print("model MB", os.path.getsize(f"{d}/full/rank_0/full.ckpt") / 1e6)
t = time.perf_counter(); ms.transform_checkpoints(f"{d}/src", f"{d}/ms", "checkpoint_", src_s, dst_s); t_ms = time.perf_counter() - t
t = time.perf_counter(); reshard.transform_checkpoints(f"{d}/src", f"{d}/rs", "checkpoint_", src_s, dst_s, process_num=2); t_rs = time.perf_counter() - t
same = all(filecmp.cmp(f"{d}/ms/rank_{r}/checkpoint_{r}.ckpt", f"{d}/rs/rank_{r}/checkpoint_{r}.ckpt", shallow=False) for r in range(4))
print(f"mindspore {t_ms:.2f} s, reshard {t_rs:.2f} s, identical={same}")
shutil.rmtree(d)
