"""Compile every kernel variant for a CUDA target without a GPU (``python -m pipesd.kernels.aot_check``).

Triton lowers to PTX and runs ptxas for the target architecture on the CPU, so the CUDA path
is at least known to compile (and its register use / spills are visible) on machines with no
GPU. Used by the test suite and by ``bench/kernels/run_gpu.sh``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import sampling, verify


def _variants(V: int = 152064, dtype: str = "bf16"):
    from .rowops import row_config

    cfg = row_config(V)
    row = dict(BLOCK=cfg["BLOCK"], NBLK=cfg["NBLK"], PBLOCK=cfg["PBLOCK"], NPIV=cfg["NPIV"])
    lp = f"*{dtype}"
    samp_sig = {"logits_ptr": lp, "stride_lb": "i32", "temp_ptr": "*fp32", "topk_ptr": "*i32", "topp_ptr": "*fp32",
                "minp_ptr": "*fp32", "seed_ptr": "*i64", "out_ptr": "*i64", "bad_ptr": "*i32", "V": "i32"}
    yield "sample", sampling._sample_kernel, samp_sig, row, cfg["num_warps"]
    probs_sig = dict(samp_sig)
    del probs_sig["seed_ptr"]
    probs_sig["out_ptr"] = "*fp32"
    yield "filtered_probs", sampling._probs_kernel, probs_sig, row, cfg["num_warps"]
    node_sig = {"logits_ptr": lp, "stride_lb": "i32", "stride_ln": "i32", "tok_ptr": "*i64", "stride_tb": "i32",
                "par_ptr": "*i32", "stride_pb": "i32", "len_ptr": "*i32", "qid_ptr": "*i32", "qp_ptr": "*fp32",
                "stride_qb": "i32", "stride_qn": "i32", "KQ": "i32", "temp_ptr": "*fp32", "topk_ptr": "*i32",
                "topp_ptr": "*fp32", "minp_ptr": "*fp32", "bonus_ptr": "*i8", "seed_ptr": "*i64",
                "acc_ptr": "*i32", "cand_ptr": "*i32", "bad_ptr": "*i32", "N": "i32", "V": "i32"}
    for is_tree in (False, True):
        for samp in (False, True):
            name = f"{'tree' if is_tree else 'chain'}_{'sample' if samp else 'greedy'}"
            yield name, verify._verify_nodes_kernel, node_sig, dict(row, IS_TREE=is_tree, SAMPLE=samp, KQP=32, NP=16), cfg["num_warps"]
    # the widest q the kernels take (pipesd.verify.TRITON_MAX_Q_ENTRIES)
    yield "tree_sample_q128", verify._verify_nodes_kernel, node_sig, dict(row, IS_TREE=True, SAMPLE=True, KQP=128, NP=64), cfg["num_warps"]
    walk_sig = {"acc_ptr": "*i32", "cand_ptr": "*i32", "tok_ptr": "*i64", "stride_tb": "i32", "path_ptr": "*i64",
                "tokens_ptr": "*i64", "nacc_ptr": "*i64", "ntok_ptr": "*i64", "N": "i32"}
    for is_tree in (False, True):
        yield f"walk_{'tree' if is_tree else 'chain'}", verify._walk_kernel, walk_sig, dict(IS_TREE=is_tree, NP=16), 1


def compile_all(arch: int = 90, V: int = 152064, dtype: str = "bf16", only: str | None = None) -> list[dict]:
    """Compile each kernel variant for ``sm_<arch>``; returns one dict per variant."""
    out = []
    for name, fn, sig, consts, warps in _variants(V, dtype):
        if only and only not in name:
            continue
        t0 = time.time()
        signature = dict(sig)
        signature.update({k: "constexpr" for k in consts})
        src = ASTSource(fn=fn, signature=signature, constexprs=dict(consts))
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "enable_fp_fusion": False})
        row = {"kernel": name, "dtype": dtype, "arch": f"sm_{arch}", "seconds": round(time.time() - t0, 2),
               "has_cubin": bool(k.asm.get("cubin"))}
        row.update(_resource_usage(k.asm.get("cubin")))
        out.append(row)
    return out


def _resource_usage(cubin) -> dict:
    """REG / STACK / LOCAL bytes from ``cuobjdump --dump-resource-usage`` (empty if unavailable)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        r = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", r.stdout)
    return {} if m is None else {"regs": int(m[1]), "stack": int(m[2]), "shared": int(m[3]), "local": int(m[4])}


def main(argv=None) -> int:
    """``python -m pipesd.kernels.aot_check [--arch 90] [--dtype bf16,fp32] [--json]`` (needs
    TRITON_INTERPRET unset: interpreted kernels cannot be compiled)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="bf16,fp32")
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    rows = [r for dt in a.dtype.split(",") for r in compile_all(a.arch, V=a.vocab, dtype=dt)]
    if a.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(r)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
