"""Kernel benchmark (issues 8 and 25): each compressed linear kernel against dense fp16
cuBLAS on Llama-3-8B layer shapes, and a small autotune sweep of the Triton kernels'
launch shapes. End-to-end decode is benchmarks/decode_speed.py.
(Not named kernels.py: on sys.path that would shadow the `kernels` package, which
transformers imports, and break every benchmark.)

Layers (out x in): 4096x4096 (q/o), 14336x4096 (gate/up), 4096x14336 (down), at M = 1,
16, 128, 2048 tokens. Kernels:

    dense            F.linear, fp16 (cuBLAS)
    2:4 cuSPARSELt   SparseLinear: torch semi-structured sparse, its default backend
    2:4 CUTLASS      the same, with SparseSemiStructuredTensor._FORCE_CUTLASS
    w4a16            Triton group-quantized matmul, int4 g128 asymmetric (QuantLinear)
    2:4+w4a16        Triton fused 2:4 + int4 g128 (SparseQuantLinear)
    armor            ArmorLinear fast path (block 32): bmm, 2:4 core, bmm
    nvfp4, fp8       Triton FP weight-only matmul (FPLinear): NVFP4 (E2M1, groups of 16), FP8 E4M3

Columns: time (µs, median of triton.testing.do_bench), speed-up over dense, TFLOP/s
(2MNK / t), and "roofline": the HBM bytes the kernel must move (weight storage read once,
activations in, outputs out) ÷ time ÷ the copy bandwidth measured in the same run.

--tune then sweeps the Triton kernels' launch shapes (tiles, warps, pipeline depth) per
path, decode (M <= 16) and prefill, prints the winners by geometric mean over shapes, M
and both kernels (compress/kernels/gemm.py records them: DECODE, PREFILL), and times the
Triton kernels again with the winners ("tuned_layers").

    python benchmarks/kernel_speed.py [--tune] [--json F] [--markdown F]      # a CUDA GPU
    TRITON_INTERPRET=1 python benchmarks/kernel_speed.py --small --device cpu --tune   # plumbing
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compress.deploy import bind, choose  # noqa: E402
from compress.fp_formats import FPSpec  # noqa: E402
from compress.kernels import gemm  # noqa: E402
from compress.masks import nm_mask  # noqa: E402
from compress.nn import ArmorLinear, module_for  # noqa: E402
from compress.nn.armor_linear import ArmorResult  # noqa: E402
from compress.quantize import QuantSpec, rtn  # noqa: E402

LLAMA3 = [(4096, 4096), (14336, 4096), (4096, 14336)]
DECODE_SWEEP = [dict(BN=bn, BK=bk, per_sm=ps, num_warps=w, num_stages=st)
                for bn, bk, ps, w, st in [(32, 128, 4, 4, 2), (32, 128, 4, 2, 2), (64, 128, 4, 4, 2),
                                          (32, 64, 4, 4, 2), (64, 64, 4, 2, 3), (16, 128, 4, 2, 2),
                                          (32, 128, 8, 4, 2), (32, 128, 2, 4, 3), (64, 128, 2, 4, 3),
                                          (16, 128, 1, 2, 3), (32, 128, 1, 4, 3)]]   # per_sm 1: no split-K
                                                                                 # at N >= 4096
PREFILL_SWEEP = [dict(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=st)
                 for bm, bn, bk, w, st in [(128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3),
                                           (128, 128, 32, 4, 4), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4),
                                           (128, 256, 64, 8, 3), (128, 128, 64, 8, 4)]]


def timer(fn, device) -> float:
    """Seconds per call: triton's do_bench median on CUDA, a median of wall times elsewhere."""
    if device.type == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    """Device-to-device copy rate in B/s, counting bytes read plus bytes written (2 GiB)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(2 ** 30, device=device, dtype=torch.float16)
    b = torch.empty_like(a)
    t = timer(lambda: b.copy_(a), device)
    del a, b
    return 2 * 2 ** 31 / t


def sparse_linear(W: torch.Tensor, cutlass: bool):
    """SparseLinear of an exact 2:4 fp16 W with the chosen torch backend."""
    from torch.sparse import SparseSemiStructuredTensor as S

    from compress.nn.sparse_linear import SparseLinear
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device, dtype=torch.float16)
    lin.weight.data.copy_(W)
    old, S._FORCE_CUTLASS = S._FORCE_CUTLASS, cutlass
    try:
        return SparseLinear(lin)
    finally:
        S._FORCE_CUTLASS = old


def layer_modules(N: int, K: int, device, group: int) -> dict:
    """{kernel: (module, bytes of its weight state)} for one random [N, K] layer, each
    module bound to the kernel deploy would give it on `device` (in Triton's interpreter
    on the CPU, the Triton kernels)."""
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    W = torch.randn(N, K, device=device) * K ** -0.5
    keep = nm_mask(W.abs(), 2, 4)
    dense = torch.nn.Linear(K, N, bias=False, device=device, dtype=torch.float16)
    dense.weight.data.copy_(W)
    mods = {"dense": (dense, 2 * N * K)}
    if device.type == "cuda":
        for name, cutlass in (("2:4 cuSPARSELt", False), ("2:4 CUTLASS", True)):
            try:                                     # torch's CUTLASS 2:4 may refuse a chip (sm_90)
                mods[name] = (sparse_linear(W * keep, cutlass), N * K + N * K // 8)   # kept halves + metadata
            except Exception as e:  # noqa: BLE001
                mods[name] = (e, 0)
    spec = QuantSpec(4, group, False)
    q = module_for(rtn(W, None, spec))
    res = rtn(W * keep, keep, spec)
    res.sparse24 = True
    sq = module_for(res)
    b = 32
    A = torch.eye(b, device=device) + 0.01 * torch.randn(N // b, b, b, device=device)
    B = torch.eye(b, device=device) + 0.01 * torch.randn(K // b, b, b, device=device)
    arm = ArmorLinear.from_result(ArmorResult(A, B, W * keep, keep))
    fp = {fmt: module_for(rtn(W, None, FPSpec(fmt))) for fmt in ("nvfp4", "fp8")}
    for k, m in (("w4a16", q), ("2:4+w4a16", sq), ("armor", arm), *fp.items()):
        m.to(device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
        kernel = choose(m, device)
        if interpreted and k != "armor":                   # a rehearsal runs the Triton kernels too
            kernel = {"w4a16": "triton-wNa16", "2:4+w4a16": "triton-2:4+wNa16"}.get(k, "triton-fp")
        bind(m, kernel, torch.float16 if device.type == "cuda" else torch.float32)
        mods[k] = (m, m.storage_bits() // 8)
    return mods


def row(shape, M, kernel, impl, t, base, nbytes, N, K, bw) -> dict:
    moved = nbytes + 2 * M * K + 2 * M * N
    return {"shape": shape, "M": M, "kernel": kernel, "impl": impl, "us": t * 1e6, "speedup": base / t,
            "tflops": 2 * M * N * K / t / 1e12, "roofline": moved / t / bw if bw == bw else None}


def bench_layers(device, shapes, Ms, group: int, bw: float, only=None) -> list[dict]:
    rows = []
    for N, K in shapes:
        mods = layer_modules(N, K, device, group)
        mods = {k: v for k, v in mods.items() if only is None or k in only}
        for M in Ms:
            x = torch.randn(M, K, device=device, dtype=mods["dense"][0].weight.dtype)
            base = None
            for k, (m, nbytes) in mods.items():
                try:
                    if isinstance(m, Exception):
                        raise m
                    with torch.no_grad():
                        t = timer(lambda: m(x), device)
                except Exception as e:  # noqa: BLE001  a backend that refuses: its reason in the table
                    rows.append({"shape": f"{N}x{K}", "M": M, "kernel": k, "impl": f"error: {str(e)[:80]}"})
                    print(f"{N}x{K} M={M} {k}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                base = base or t
                impl = getattr(m, "kernel", "cuBLAS" if device.type == "cuda" else "torch")
                rows.append(row(f"{N}x{K}", M, k, impl, t, base, nbytes, N, K, bw))
                print(f"{N}x{K} M={M} {k} ({impl}): {t * 1e6:.1f} us", flush=True)   # kept if the step runs out
        del mods
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def tune(device, shapes, Ms, group: int) -> tuple[list[dict], dict]:
    """Time every sweep candidate of its M's path for both Triton kernels; the winners
    (lowest geometric mean of time relative to the path's best per problem)."""
    rows = []
    for N, K in shapes:
        mods = layer_modules(N, K, device, group)
        for M in Ms:
            path, sweep = ("decode", DECODE_SWEEP) if M <= 16 else ("prefill", PREFILL_SWEEP)
            x = torch.randn(M, K, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
            for kern in ("w4a16", "2:4+w4a16"):
                m = mods[kern][0]
                pattern = getattr(m, "pattern", None)
                for i, cfg in enumerate(sweep):
                    def call():
                        return gemm.launch(x, m.qweight, pattern, m.scales, m.qzeros, 4, group, None, tuned=cfg)
                    try:
                        t = timer(call, device)
                    except Exception as e:        # a tile that does not fit (shared memory): not a winner
                        print(f"tune {path} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        t = float("inf")
                    rows.append({"path": path, "cand": i, "shape": f"{N}x{K}", "M": M, "kernel": kern, "us": t * 1e6})
            print(f"tuned {N}x{K} M={M}", flush=True)
        del mods
    winners = {}
    for path, sweep in (("decode", DECODE_SWEEP), ("prefill", PREFILL_SWEEP)):
        mine = [r for r in rows if r["path"] == path]
        best = {}
        for r in mine:
            key = (r["shape"], r["M"], r["kernel"])
            best[key] = min(best.get(key, float("inf")), r["us"])
        score = {i: math.exp(statistics.fmean(math.log(r["us"] / best[(r["shape"], r["M"], r["kernel"])])
                                               for r in mine if r["cand"] == i)) for i in range(len(sweep))
                 if any(r["cand"] == i for r in mine)}
        if score:
            i = min(score, key=score.get)
            winners[path] = {"config": sweep[i], "geomean_vs_best": score[i],
                             "current_geomean": score.get(0)}
    return rows, winners


def table(rows: list[dict]) -> str:
    f = lambda v, p: "—" if v is None else format(v, p)  # noqa: E731
    out = ["| shape (out x in) | M | kernel | implementation | µs | × dense | TFLOP/s | roofline |",
           "|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['shape']} | {r['M']} | {r['kernel']} | {r['impl']} | {r['us']:.1f} | {r['speedup']:.2f}× | "
            f"{r['tflops']:.1f} | {f(r['roofline'], '.0%')} |" if "us" in r else
            f"| {r['shape']} | {r['M']} | {r['kernel']} | {r['impl']} | — | — | — | — |" for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes: checks the plumbing, not speed")
    ap.add_argument("--tune", action="store_true", help="sweep the Triton launch shapes first")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    a = ap.parse_args()
    device = torch.device(a.device)
    shapes, Ms, group = ([(256, 256), (512, 256)], [1, 64], 64) if a.small else (LLAMA3, [1, 16, 128, 2048],
                                                                               a.group_size)
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    result = {"device": name, "torch": torch.__version__, "copy_bandwidth": bw}

    def save():                                          # after every stage: kept if the step runs out
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=1))
    result["layers"] = bench_layers(device, shapes, Ms, group, bw)
    save()
    print(table(result["layers"]), flush=True)
    if a.tune:
        result["tune"], result["winners"] = tune(device, shapes, Ms, group)
        save()
        print("tuned launch shapes:", json.dumps(result["winners"]), flush=True)
        for path, w in result["winners"].items():         # re-time the Triton kernels with the winners
            setattr(gemm, path.upper(), w["config"])
            if path == "prefill":
                gemm.PREFILL_64 = w["config"]
        result["tuned_layers"] = bench_layers(device, shapes, Ms, group, bw, only=("dense", "w4a16", "2:4+w4a16"))
        save()
        print(table(result["tuned_layers"]), flush=True)
    if a.markdown:
        Path(a.markdown).write_text(table(result["layers"]) + "\n")

if __name__ == "__main__":
    main()
