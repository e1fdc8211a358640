"""End-to-end decode and prefill speed of a random Llama-3-8B-shaped model (config only: hidden
4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256, rope_theta 500000, fp16),
its decoder linears in four variants, deploy()ed:

    dense      fp16 nn.Linear (cuBLAS)
    w4a16      QuantLinear, int4 group 128 asymmetric (RTN): Triton kernel
    2:4        exact 2:4 nn.Linear, made SparseLinear (sparse tensor cores) by deploy() on CUDA
    2:4+w4a16  SparseQuantLinear (RTN of the 2:4-masked weight): fused Triton kernel

Per variant: greedy decode tokens/s (all sequences of the batch) after a random prompt, and a
batch-1 prefill (median of 3 after a warm-up; last position's logits only). A decode step is one
CUDA graph replay (see Decoder): Python overhead does not hide the kernels; where capture fails
the eager step is timed ("mode", the reason in the JSON). Checks: replayed tokens equal the eager
step's (graph_matches_eager), the cached path picks what a no-cache forward picks (nocache_agree).

    python benchmarks/decode_speed.py [--json FILE] [--markdown FILE]             # on a CUDA GPU
    TRITON_INTERPRET=1 python benchmarks/decode_speed.py --small --device cpu --graphs off   # plumbing
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compress.deploy import deploy  # noqa: E402
from compress.masks import nm_mask  # noqa: E402
from compress.nn import module_for  # noqa: E402
from compress.quantize import QuantSpec, rtn  # noqa: E402

VARIANTS = ("dense", "w4a16", "2:4", "2:4+w4a16")
CHECK = 4          # decode steps compared between eager, graph and a no-cache forward
LOGIT_TOL = 0.05   # a cached-path token agrees with the no-cache forward within this logit margin
NOT_ASKED = ("--graphs off", "no CUDA device")   # eager by choice, not a capture failure
SHAPE = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
SHAPES = {False: (4096, 14336, 32, 8, 128256), True: (256, 512, 4, 2, 1000)}   # Llama-3-8B; --small
SIZES = {"layers": (32, 2, "decoder layers"), "new_tokens": (128, 8, "decode steps timed"),   # full, --small
         "prompt": (128, 16, "prompt tokens before decoding"), "prefill": (2048, 128, "tokens of the timed prefill")}


def random_llama(config, device, dtype):
    """A random LlamaForCausalLM of `config`, initialised on `device` in `dtype` (seed 0)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old)


def build(config, variant: str, device, dtype, group: int = 128):
    """A random LlamaForCausalLM made on `device` in `dtype`, each decoder linear in `variant`
    (masked, quantized and packed where it lies: on the GPU), deploy()ed -> (model, kernel counts)."""
    model = random_llama(config, device, dtype)
    layers = model.model.layers
    for name, lin in list(layers.named_modules()) if variant != "dense" else []:
        if type(lin) is not nn.Linear:
            continue
        W = lin.weight.float()                                       # [out, in] fp32
        keep = nm_mask(W.abs(), 2, 4) if "2:4" in variant else None  # [out, in] bool, 2 of every 4 inputs
        if variant == "2:4":
            lin.weight.mul_(keep)                                    # deploy() makes it SparseLinear on CUDA
            continue
        res = rtn(W if keep is None else W * keep, keep, QuantSpec(4, group, False))
        res.sparse24 = keep is not None
        layers.set_submodule(name, module_for(res, lin.bias))
    return model, dict(Counter(deploy(model, device, dtype).values()))


class Decoder:
    """Greedy decode with a StaticCache of L = P + new positions and static buffers, all updated in
    place by the step: ids [B, 1], pos [B, 1] (position ids), cpos [1] (cache position), and an
    additive mask [B, 1, 1, L] (0: seen), explicit because masking_utils returns a 4D mask as given:
    no mask building (and no host sync) runs in the graph."""

    def __init__(self, model, B: int, P: int, new: int, device):
        from transformers import StaticCache
        self.model, self.B, self.P, self.L = model, B, P, P + max(new, CHECK)   # room for the check steps
        self.neg = torch.finfo(model.dtype).min                   # the mask's "not seen"
        # transformers 5.17 calls it past_key_values, 5.25 cache. 5.x StaticLayers keep their write
        # position in a device tensor (cumulative_length, set in reset), not a cache_position argument.
        self.cache_kw = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
        self.cache = StaticCache(config=model.config, max_cache_len=self.L)   # allocated at its first update
        self.prompt = torch.randint(0, model.config.vocab_size, (B, P), device=device)
        self.ids, self.pos = (torch.zeros(B, 1, dtype=torch.long, device=device) for _ in range(2))
        self.cpos = self.pos[0]                                   # [1] a view: the cache position, pos of row 0
        self.mask = torch.full((B, 1, 1, self.L), self.neg, dtype=model.dtype, device=device)

    def logits(self, ids, mask, pos) -> torch.Tensor:
        """[B, vocab] logits of the last of ids [B, T]; the cache takes their keys and values."""
        h = self.model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             **{self.cache_kw: self.cache})
        return self.model.lm_head(h.last_hidden_state[:, -1])

    def prefill(self) -> None:
        """The prompt into cache positions 0..P-1 (eager); its argmax is the first token [B, 1]."""
        P, dev = self.P, self.ids.device
        later = torch.arange(self.L, device=dev)[None, :] > torch.arange(P, device=dev)[:, None]   # [P, L]
        mask = torch.zeros(P, self.L, dtype=self.mask.dtype, device=dev).masked_fill_(later, self.neg)
        pos = torch.arange(P, device=dev)[None].expand(self.B, P)
        self.first = self.logits(self.prompt, mask[None, None], pos).argmax(-1)[:, None]

    def reset(self) -> None:
        """Back to just after the prefill (outside any graph; stale later positions stay masked)."""
        self.ids.copy_(self.first)
        self.pos.fill_(self.P)
        self.mask.fill_(self.neg)[..., :self.P] = 0             # the prompt seen, the rest not yet
        for layer in getattr(self.cache, "layers", ()):       # transformers 5: its write position
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length.fill_(self.P)

    def step(self) -> None:
        """One token, in place on device tensors only, so a CUDA graph replays it back to back."""
        self.mask.index_fill_(-1, self.cpos, 0.0)            # the new token sees itself
        logits = self.logits(self.ids, self.mask, self.pos)
        self.ids.copy_(logits.argmax(-1, keepdim=True))       # [B, 1] the next input
        self.pos.add_(1)                                      # and cpos with it

    def run(self, n: int, graph=None, keep: bool = True):
        """n steps (replays of `graph` if given) from the reset state -> their tokens [B, n] if `keep`."""
        self.reset()
        out = []
        for _ in range(n):
            graph.replay() if graph is not None else self.step()
            out += [self.ids.clone()] if keep else []        # copied on device: no host sync
        return torch.cat(out, 1) if keep else None

    def capture(self):
        """(CUDAGraph of one step, None), or (None, reason) where capture fails."""
        try:
            self.reset()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):                        # warm-up on a side stream (PyTorch's CUDA graph docs)
                for _ in range(3):
                    self.step()
            torch.cuda.current_stream().wait_stream(s)
            self.reset()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self.step()
            return g, None
        except Exception as e:  # noqa: BLE001 - an op that will not capture: time the eager step instead
            return None, repr(e)[:400]

    def nocache_agree(self, toks: torch.Tensor) -> float:
        """Fraction of the cached path's tokens [first, toks] ([B, k+1]) that a plain no-cache forward
        of [prompt, first, toks[:, :-1]] also picks, within LOGIT_TOL of its top logit."""
        chosen = torch.cat([self.first, toks], 1)                                 # [B, k+1]
        h = self.model.model(input_ids=torch.cat([self.prompt, chosen[:, :-1]], 1), use_cache=False)
        logits = self.model.lm_head(h.last_hidden_state[:, self.P - 1:]).float()  # [B, k+1, vocab]
        margin = logits.max(-1).values - logits.gather(-1, chosen[..., None])[..., 0]
        return float((margin <= LOGIT_TOL).float().mean())


def bench_decode(model, B: int, a, device) -> dict:
    dec = Decoder(model, B, a.prompt, a.new_tokens, device)
    dec.prefill()
    dec.run(1)                                                # compiles the Triton decode (GEMV) kernels
    eager, t = timed(lambda: dec.run(CHECK), device)
    row = {"eager_step_ms": t / CHECK * 1e3, "nocache_agree": dec.nocache_agree(eager)}
    asked = a.graphs == "auto"
    graph, why = dec.capture() if asked and device.type == "cuda" else (None, NOT_ASKED[asked])
    row.update(mode="eager" if graph is None else "graph", graph_error=why, graph_matches_eager=None)
    if graph is not None:
        row["graph_matches_eager"] = bool(torch.equal(dec.run(CHECK, graph), eager))
    _, t = timed(lambda: dec.run(a.new_tokens, graph, keep=False), device)
    row.update(step_ms=t / a.new_tokens * 1e3, decode_tok_s=B * a.new_tokens / t)
    return row                                                # the graph (and its memory pool) and dec go with it


def timed(fn, device):
    """(fn(), seconds it took), the device synchronized before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@torch.no_grad()
def run_variant(config, variant: str, a, device, dtype) -> list[dict]:
    """One row per batch size; an error goes into its row (or all of them), never raised."""
    rows = [{"variant": variant, "batch": B} for B in a.batches]
    cuda = device.type == "cuda"
    gib = lambda fn: round(fn() / 2 ** 30, 2) if cuda else None  # noqa: E731
    if variant == "2:4" and not cuda:
        return [dict(r, skipped="SparseLinear (sparse tensor cores) needs CUDA") for r in rows]
    model = None
    try:
        (model, kernels), t = timed(lambda: build(config, variant, device, dtype), device)
        common = {"build_s": round(t, 1), "kernels": kernels, "attention": model.config._attn_implementation,
                  "build_peak_gib": gib(torch.cuda.max_memory_allocated),
                  "weights_gib": gib(torch.cuda.memory_allocated)}
        free(device)
        # prefill: batch 1, no cache (transformers passes no mask: SDPA is causal), last position's logits
        ids = torch.randint(0, config.vocab_size, (1, a.prefill), device=device)
        run = lambda: model.lm_head(model.model(ids, use_cache=False).last_hidden_state[:, -1])  # noqa: E731
        try:
            times = [timed(run, device)[1] for _ in range(4)]    # the first is the warm-up (Triton GEMM compiles)
            common["prefill_s"] = sorted(times[1:])[1]           # median of 3
        except Exception as e:  # noqa: BLE001
            common["prefill_error"] = repr(e)[:400]
        common["prefill_peak_gib"] = gib(torch.cuda.max_memory_allocated)
        for r in rows:
            r.update(common)
            free(device)
            try:
                r.update(bench_decode(model, r["batch"], a, device))
            except Exception as e:  # noqa: BLE001
                r["error"] = repr(e)[:400]
            r["peak_gib"] = gib(torch.cuda.max_memory_allocated)   # weights + cache + graph pool + activations
            print(json.dumps(r), flush=True)
    except Exception as e:  # noqa: BLE001
        rows = [dict(r, error=repr(e)[:400]) for r in rows]
        print(json.dumps(rows[0]), flush=True)
    del model
    free(device)
    return rows


def table(rows: list[dict], prefill: int) -> str:
    f = lambda r, k, p: format(r[k], p) if r.get(k) is not None else "—"  # noqa: E731
    dense = {r["batch"]: r for r in rows if r["variant"] == "dense"}

    def ratio(r: dict, k: str, inverse: bool) -> str:   # r[k] over dense's at its batch (inverse: for times)
        d = dense.get(r["batch"], {}).get(k)
        return f"{(d / r[k] if inverse else r[k] / d):.2f}×" if r.get(k) and d else "—"
    out = [f"| variant | batch | decode tok/s | × dense | mode | prefill {prefill} s | × dense | peak GiB |",
           "|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['variant']} | {r['batch']} | {f(r, 'decode_tok_s', '.1f')} | {ratio(r, 'decode_tok_s', False)} | "
            f"{r.get('mode', '—')} | {f(r, 'prefill_s', '.3f')} | {ratio(r, 'prefill_s', True)} | "
            f"{f(r, 'peak_gib', '.1f')} |" for r in rows]
    notes = [f"- {r['variant']} batch {r['batch']}: {k}: {r[k]}" for r in rows
             for k in ("skipped", "error", "prefill_error", "graph_error") if r.get(k) and r[k] not in NOT_ASKED]
    return "\n".join(out + ([""] + notes if notes else []))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny model and lengths: checks the plumbing, not speed")
    for k, (full, small, what) in SIZES.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"{what} (default {full}; {small} with --small)")
    ap.add_argument("--variants", type=lambda s: [v.strip() for v in s.split(",")], default=list(VARIANTS))
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 16])
    ap.add_argument("--graphs", choices=("auto", "off"), default="auto")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    a = ap.parse_args()
    for k, (full, small, _) in SIZES.items():
        setattr(a, k, getattr(a, k) or (small if a.small else full))
    if set(a.variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(set(a.variants) - set(VARIANTS))}; known: {', '.join(VARIANTS)}")
    return a


def main() -> None:
    import transformers
    a = parse_args()
    config = transformers.LlamaConfig(num_hidden_layers=a.layers, rope_theta=500000.0, rms_norm_eps=1e-5,
                                      max_position_embeddings=8192, **dict(zip(SHAPE, SHAPES[a.small])))
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)                        # graphs, streams and memory stats use the current device
    dtype = torch.float16 if cuda else torch.float32         # fp16 matmuls crawl on CPU
    t0 = time.perf_counter()
    rows = []
    for v in a.variants:
        rows += run_variant(config, v, a, device, dtype)
        if a.json:                                           # kept if the step runs out of time later
            Path(a.json).write_text(json.dumps({"header": "partial", "rows": rows}, indent=1) + "\n")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    head = (f"{torch.cuda.get_device_name(device) if cuda else 'CPU'}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, {dtype}, {a.layers} layers, prompt {a.prompt} + {a.new_tokens} tokens, "
            f"{time.strftime('%Y-%m-%d')}, commit {commit}, {time.perf_counter() - t0:.0f} s")
    text = f"{head}\n\n{table(rows, a.prefill)}"
    print(text, flush=True)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"header": head, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
