"""Loads files written by reshard with MindSpore and checks them against a manifest.

usage: ckpt_verify.py MANIFEST CHECKS_JSON
CHECKS_JSON: [{"file": path, "expect": manifest key, "format": "ckpt"|"safetensors",
               "key_hex": optional, "mode": optional, "crc": bool}]
Prints "ok N" or exits 1 listing every difference.
"""
import json
import sys

from common import describe_file, die

manifest = json.load(open(sys.argv[1]))
checks = json.load(open(sys.argv[2]))
problems = []
for check in checks:
    kwargs = {}
    if check.get("format") == "safetensors":
        kwargs["format"] = "safetensors"
    if check.get("key_hex"):
        kwargs["dec_key"] = bytes.fromhex(check["key_hex"])
        kwargs["dec_mode"] = check["mode"]
    if check.get("crc"):
        kwargs["crc_check"] = True
    try:
        got = describe_file(check["file"], **kwargs)
    except Exception as e:  # noqa: BLE001 - report every failure, not only the first
        problems.append(f"{check['file']}: MindSpore cannot load it: {e!r}")
        continue
    want = manifest[check["expect"]]["entries"]
    if check.get("sorted"):
        got = sorted(got, key=lambda e: e["name"])
        want = sorted(want, key=lambda e: e["name"])
    if got != want:
        for g, w in zip(got, want):
            if g != w:
                problems.append(f"{check['file']}: got {g}, want {w}")
                break
        if len(got) != len(want):
            problems.append(f"{check['file']}: {len(got)} entries, want {len(want)}")
if problems:
    die("\n".join(problems))
print("ok", len(checks))
