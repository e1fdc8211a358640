"""Kernel benchmark (issue 8): each compressed linear kernel against dense fp16 cuBLAS on
LLaMA-2-7B layer shapes, then end-to-end decode and prefill of a LLaMA-2-7B-shaped model.
(Not named kernels.py: on sys.path that would shadow the `kernels` package, which
transformers imports, and break every benchmark.)

Layers (out x in): 4096x4096 (q/k/v/o), 11008x4096 (gate/up), 4096x11008 (down), at
M = 1, 16, 128, 2048 tokens. Kernels:

    dense      F.linear, fp16 (cuBLAS)
    2:4        SparseLinear: torch semi-structured sparse (cuSPARSELt / CUTLASS)
    w4a16      Triton group-quantized matmul, int4 g128 asymmetric (QuantLinear storage)
    2:4+w4a16  Triton fused 2:4 + int4 g128 (SparseQuantLinear storage)
    armor      ArmorLinear fast path (block 32): bmm, 2:4 core, bmm

Columns: time (us, median of triton.testing.do_bench on CUDA), speedup over dense, and
"roofline": the time the better-bound of memory bandwidth (bytes actually read: weight
storage + activations + output) and tensor-core peak (2MNK flops; twice the peak for the
2:4 sparse tensor cores) would allow, divided by the measured time.

End to end: a LlamaForCausalLM of LLaMA-2-7B shape built from a config with random
weights (no download), fp16, in each of dense / 2:4 / W4A16 / 2:4+W4A16; decode tokens/s
(batch 1, greedy, after a 128-token prompt) and prefill time for 2048 tokens.

    python benchmarks/kernel_speed.py [--markdown FILE]          # on a CUDA GPU
    TRITON_INTERPRET=1 python benchmarks/kernel_speed.py --small --device cpu   # plumbing check only
"""
from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compress.deploy import deploy  # noqa: E402
from compress.masks import nm_mask  # noqa: E402
from compress.nn import ArmorLinear, module_for  # noqa: E402
from compress.nn.armor_linear import ArmorResult  # noqa: E402
from compress.quantize import QuantSpec, rtn  # noqa: E402

# Peak HBM bandwidth (B/s) and dense fp16 tensor-core rate (flop/s), SXM parts.
PEAKS = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12), "A100": (2.0e12, 312e12)}
KERNELS = ("dense", "2:4", "w4a16", "2:4+w4a16", "armor")


def timer(fn, device) -> float:
    """Seconds per call: triton's do_bench on CUDA, a median of wall times elsewhere."""
    if device.type == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def layer_modules(N: int, K: int, device, group: int) -> dict:
    """{kernel: (module, bytes of its weight state)} for one random [N, K] layer; the
    2:4 one is an nn.Linear with zeros in place until `deploy` compresses it."""
    W = torch.randn(N, K, device=device) * K ** -0.5
    keep = nm_mask(W.abs(), 2, 4)
    dense = torch.nn.Linear(K, N, bias=False, device=device, dtype=torch.float16)
    dense.weight.data.copy_(W)
    mods = {"dense": (dense, 2 * N * K)}
    if device.type == "cuda":
        s24 = torch.nn.Linear(K, N, bias=False, device=device, dtype=torch.float16)
        s24.weight.data.copy_(W * keep)
        mods["2:4"] = (s24, N * K + N * K // 8)                   # kept halves + 2-bit metadata
    spec = QuantSpec(4, group, False)
    q = module_for(rtn(W, None, spec))
    res = rtn(W * keep, keep, spec)
    res.sparse24 = True
    sq = module_for(res)
    b = 32
    A = torch.eye(b, device=device) + 0.01 * torch.randn(N // b, b, b, device=device)
    B = torch.eye(b, device=device) + 0.01 * torch.randn(K // b, b, b, device=device)
    arm = ArmorLinear.from_result(ArmorResult(A, B, W * keep, keep))
    for k, m in (("w4a16", q), ("2:4+w4a16", sq), ("armor", arm)):
        mods[k] = (m, m.storage_bits() // 8)
    return mods


def bench_layers(device, shapes, Ms, group: int) -> list[dict]:
    bw, peak = next((v for k, v in PEAKS.items() if k in torch.cuda.get_device_name(device)), (None, None)) \
        if device.type == "cuda" else (None, None)
    rows = []
    for N, K in shapes:
        mods = layer_modules(N, K, device, group)
        # deploy() compresses exact 2:4 linears under a ".layers." name, as in a model
        key = {k: f"layers.{i}" for i, k in enumerate(mods)}
        holder = torch.nn.Module()
        holder.add_module("model", torch.nn.ModuleDict({"layers": torch.nn.ModuleList(m for m, _ in mods.values())}))
        chosen = {k: v for k, v in deploy(holder, device, torch.float16 if device.type == "cuda" else
                                          torch.float32).items()}
        mods = {k: (holder.get_submodule(f"model.{key[k]}"), nb) for k, (_, nb) in mods.items()}
        for M in Ms:
            x = torch.randn(M, K, device=device, dtype=mods["dense"][0].weight.dtype)
            base = None
            for k, (m, nbytes) in mods.items():
                kern = chosen.get(f"model.{key[k]}", "cuBLAS" if device.type == "cuda" else "torch")
                with torch.no_grad():
                    t = timer(lambda: m(x), device)
                base = base or t
                roof = None
                if bw:
                    moved = nbytes + 2 * M * K + 2 * M * N
                    roof = max(moved / bw, 2 * M * N * K / (peak * (2 if k == "2:4" else 1))) / t
                rows.append({"shape": f"{N}x{K}", "M": M, "kernel": k, "impl": kern, "us": t * 1e6,
                             "speedup": base / t, "roofline": roof})
        del mods, holder
        gc.collect()
    return rows


def build_model(config, variant: str, device, group: int):
    """A random LLaMA of `config` shape in fp16 on `device`, its decoder linears in `variant`."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if device.type == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old)
    for name, lin in list(model.named_modules()):
        if not (isinstance(lin, torch.nn.Linear) and ".layers." in name) or variant == "dense":
            continue
        W = lin.weight.data.float()
        keep = nm_mask(W.abs(), 2, 4) if "2:4" in variant else None
        if variant == "2:4":
            lin.weight.data.mul_(keep)
            continue
        res = rtn(W if keep is None else W * keep, keep, QuantSpec(4, group, False))
        res.sparse24 = keep is not None
        model.set_submodule(name, module_for(res))
        del W, keep, res
    deploy(model, device, model.dtype)
    return model


def bench_e2e(config, device, group: int, decode_tokens: int, prefill_tokens: int) -> list[dict]:
    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for variant in ("dense", "2:4", "w4a16", "2:4+w4a16"):
        if variant == "2:4" and device.type != "cuda":
            continue
        model = build_model(config, variant, device, group)
        ids = torch.randint(0, config.vocab_size, (1, prefill_tokens), device=device)
        with torch.no_grad():
            model(ids[:, :16])                                      # warm-up (Triton compiles here)
            sync()
            t = time.perf_counter()
            model(ids)
            sync()
            prefill = time.perf_counter() - t
            out = model(ids[:, :128], use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            t = time.perf_counter()
            for _ in range(decode_tokens):                          # greedy decode, one token a step
                out = model(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync()
            decode = decode_tokens / (time.perf_counter() - t)
        rows.append({"variant": variant, "decode_tok_s": decode, "prefill_s": prefill})
        print(rows[-1], flush=True)
        del model, cache, out
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def tables(layers: list[dict], e2e: list[dict], prefill_tokens: int) -> str:
    f = lambda v, p: "—" if v is None else format(v, p)  # noqa: E731
    out = ["| shape (out x in) | M | kernel | implementation | µs | speedup vs dense | roofline |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {r['shape']} | {r['M']} | {r['kernel']} | {r['impl']} | {r['us']:.1f} | {r['speedup']:.2f}× | "
            f"{f(r['roofline'], '.0%')} |" for r in layers]
    if e2e:
        d = e2e[0]
        out += ["", f"| model | decode tokens/s | × dense | prefill {prefill_tokens} s | × dense |", "|---|---|---|---|---|"]
        out += [f"| {r['variant']} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / d['decode_tok_s']:.2f}× | "
                f"{r['prefill_s']:.3f} | {d['prefill_s'] / r['prefill_s']:.2f}× |" for r in e2e]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes and model: checks the plumbing, not speed")
    ap.add_argument("--no-e2e", dest="e2e", action="store_false")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--markdown")
    a = ap.parse_args()
    device = torch.device(a.device)
    from transformers import LlamaConfig
    if a.small:
        shapes, Ms = [(256, 256), (512, 256), (256, 512)], [1, 16, 64]
        config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=1000)
        decode_tokens, prefill_tokens, group = 8, 256, 64
    else:
        shapes, Ms = [(4096, 4096), (11008, 4096), (4096, 11008)], [1, 16, 128, 2048]
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
        decode_tokens, prefill_tokens, group = 128, 2048, a.group_size
    layers = bench_layers(device, shapes, Ms, group)
    e2e = bench_e2e(config, device, group, decode_tokens, prefill_tokens) if a.e2e else []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    text = f"{name}, torch {torch.__version__}, {datetime.date.today()}, commit {commit}\n\n{tables(layers, e2e, prefill_tokens)}"
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
