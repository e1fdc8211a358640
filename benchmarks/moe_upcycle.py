"""The MoE model of benchmarks/moe.py, SmolLM2-135M upcycled into the Mixtral architecture,
and the protocol's data (`prepare`: calibration ids, evaluation windows, the model).

Every decoder block's MLP (gate_proj, up_proj, down_proj) becomes E experts (default 8,
top-2 routing), each a copy of that MLP plus a seeded perturbation of `perturb` times the
matrix's standard deviation (default 1 %), and a seeded random router. Attention, norms,
embeddings, the tied head, rope, rms_norm_eps, vocabulary and GQA heads are copied exactly.

Mixtral renormalizes the top-2 router weights to sum to 1, so with perturb 0 the experts
are identical and the upcycled model computes SmolLM2's function: `build` checks first
that the unperturbed perplexity equals SmolLM2's to 4 significant digits and stops the
benchmark otherwise. The perturbed model is saved with `save_pretrained` (fp32, no
quantization_config) to WORK/upcycled, which both sides load, so they start from the very
same weights. (Fused Mixtral experts in transformers 5: `mlp.experts.gate_up_proj`
[E, 2I, H], gate rows first, `mlp.experts.down_proj` [E, H, I], router `mlp.gate.weight`
[E, H].)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def mixtral_config(dense_cfg, experts: int, top_k: int):
    """A MixtralConfig with SmolLM2's shapes and settings, and E experts of its MLP size."""
    from transformers import MixtralConfig

    d = dense_cfg
    if getattr(d, "attention_bias", False) or getattr(d, "mlp_bias", False):
        raise SystemExit("upcycle: Mixtral has no attention / MLP biases, the source model has")
    return MixtralConfig(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_hidden_layers, num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads, head_dim=d.head_dim, hidden_act=d.hidden_act,
        max_position_embeddings=d.max_position_embeddings, rms_norm_eps=d.rms_norm_eps,
        rope_parameters=dict(d.rope_parameters), tie_word_embeddings=d.tie_word_embeddings,
        bos_token_id=d.bos_token_id, eos_token_id=d.eos_token_id, pad_token_id=d.pad_token_id,
        num_local_experts=experts, num_experts_per_tok=top_k,
        sliding_window=None,           # Llama attends to the whole window
        router_jitter_noise=0.0, attention_dropout=0.0, output_router_logits=False,
        dtype="float32")


@torch.no_grad()
def upcycle(dense, experts: int = 8, top_k: int = 2, perturb: float = 0.0, seed: int = 0):
    """MixtralForCausalLM with `dense`'s weights, each MLP copied into `experts` experts."""
    from transformers import MixtralForCausalLM

    cfg = mixtral_config(dense.config, experts, top_k)
    moe = MixtralForCausalLM(cfg).float().eval()
    src = dense.state_dict()
    dst = moe.state_dict()
    for k, v in src.items():   # attention, norms, embeddings (the head is tied to them)
        if ".mlp." not in k:
            dst[k].copy_(v)
    gen = torch.Generator().manual_seed(seed)
    H = cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp"
        # 1/sqrt(H): O(1) logits for unit-RMS inputs, so routing is decided, not uniform
        dst[f"{p}.gate.weight"].copy_(torch.randn(experts, H, generator=gen) * H ** -0.5)
        gate, up, down = (src[f"{p}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        dst[f"{p}.experts.gate_up_proj"].copy_(torch.cat([gate, up])[None].expand(experts, -1, -1))
        dst[f"{p}.experts.down_proj"].copy_(down[None].expand(experts, -1, -1))
    if perturb:
        perturb_experts(moe, src, perturb, seed)
    return moe


@torch.no_grad()
def perturb_experts(moe, dense_state: dict, perturb: float, seed: int) -> None:
    """Add perturb * std(W) * N(0, 1) to every expert copy W (gate, up, down apart), with a
    generator of its own (seed + 1), drawn in a fixed order: layer, expert, gate/up/down."""
    gen = torch.Generator().manual_seed(seed + 1)
    I = moe.config.intermediate_size
    for i, layer in enumerate(moe.model.layers):
        ex = layer.mlp.experts
        for e in range(ex.gate_up_proj.shape[0]):
            for name, W in (("gate_proj", ex.gate_up_proj[e, :I]), ("up_proj", ex.gate_up_proj[e, I:]),
                            ("down_proj", ex.down_proj[e])):
                std = dense_state[f"model.layers.{i}.mlp.{name}.weight"].std()
                W.add_(torch.randn(W.shape, generator=gen) * (perturb * std))


def same_to_4_digits(a: float, b: float) -> bool:
    """Equal when rounded to 4 significant digits; a pair that straddles a rounding
    boundary (12.345 / 12.3449) passes when it agrees to 1e-5 relative."""
    return f"{a:.4g}" == f"{b:.4g}" or abs(a - b) <= 1e-5 * abs(a)


def build(dense, windows, work: Path, a) -> Path:
    """Check the unperturbed upcycle against `dense`, then save the perturbed one to
    work/upcycled (with the tokenizer the peer reads); return that folder."""
    from compress.eval import evaluate

    ppl_dense = evaluate(dense, windows, batch_size=8, desc="dense")["ppl"]
    moe = upcycle(dense, a.experts, a.top_k, 0.0, a.seed)
    ppl_moe = evaluate(moe, windows, batch_size=8, desc="upcycled, unperturbed")["ppl"]
    print(f"exactness check: SmolLM2-135M ppl {ppl_dense:.6g} ({ppl_dense:.4g}), upcycled Mixtral "
          f"{a.experts}x top-{a.top_k} with --perturb 0 ppl {ppl_moe:.6g} ({ppl_moe:.4g})", flush=True)
    if not same_to_4_digits(ppl_dense, ppl_moe):
        raise SystemExit("exactness check FAILED: the unperturbed upcycled model does not compute SmolLM2's "
                         "function; the upcycling (or transformers' Mixtral) is wrong, stopping")
    if a.perturb:
        perturb_experts(moe, dense.state_dict(), a.perturb, a.seed)
    out = work / "upcycled"
    if getattr(moe.config, "quantization_config", None) is not None:
        del moe.config.quantization_config
    moe.save_pretrained(out)
    a.tokenizer.save_pretrained(out)
    meta = {"experts": a.experts, "top_k": a.top_k, "perturb": a.perturb, "seed": a.seed,
            "dense_ppl": ppl_dense, "unperturbed_ppl": ppl_moe, "windows": int(windows.shape[0])}
    (out / "upcycle.json").write_text(json.dumps(meta, indent=2))
    return out


def load_moe(folder: Path):
    """The saved upcycled model, fp32, in eval mode (what every perplexity starts from)."""
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True).eval()


def decoder_weights(model) -> list[str]:
    """State-dict names of the decoder's weight matrices the passes may change (>= 2-D,
    inside the blocks), routers left out: no pass edits a router."""
    return [k for k, v in model.state_dict().items()
            if ".layers." in k and v.dim() >= 2 and not k.endswith("mlp.gate.weight")]


def expert_stats(model, weights: dict, levels: bool) -> dict:
    """Expert matrices (gate, up, down of each expert) in `weights` that differ from
    `model`'s, their zero fraction, and (levels) the most distinct values in any group of
    64 inputs: at most 2^bits where GPTQ really quantized them."""
    import torch

    I = model.config.intermediate_size
    total = changed = zeros = numel = 0
    most = 0
    for k, W in weights.items():
        if not k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue
        D = model.get_parameter(k)
        parts = [(W[:, :I], D[:, :I]), (W[:, I:], D[:, I:])] if k.endswith("gate_up_proj") else [(W, D)]
        for w, d in parts:
            total += w.shape[0]
            changed += sum(not torch.equal(w[e], d[e]) for e in range(w.shape[0]))
        zeros, numel = zeros + int((W == 0).sum()), numel + W.numel()
        if levels and W.shape[-1] % 64 == 0:
            s = W.reshape(-1, 64).sort(-1).values
            most = max(most, int(((s.diff(dim=-1) != 0).sum(-1) + 1).max()))
    return {"expert_matrices": total, "experts_changed": changed, "expert_zeros": zeros / max(numel, 1),
            **({"expert_levels": most} if levels else {})}


def dense_ppl(folder: Path, windows) -> dict:
    from compress.eval import evaluate

    return {"ppl": evaluate(load_moe(folder), windows, batch_size=8, desc="dense")["ppl"]}


def prepare(a, work: Path):
    """The shared protocol (the calls of benchmarks/prune.py's prepare): calibration ids
    (C4 train, seed 0) saved to work/calib.pt, WikiText-2 test windows of 512 (saved to
    work/windows.pt for our worker's fallback); then the upcycled model. Returns its
    folder, the windows and the exactness check's numbers."""
    if not a.data_dir:
        raise SystemExit("benchmark needs the C4 / WikiText-2 text: pass --data-dir or set COMPRESS_DATA_DIR")
    os.environ["COMPRESS_DATA_DIR"] = a.data_dir
    import torch

    from calib import CalibConfig, load_calibration, load_text
    from compress.eval import eval_windows
    from compress.loading import load_model

    dense, a.tokenizer = load_model("smollm2-135m")
    ids = load_calibration(CalibConfig(source="c4", nsamples=a.nsamples, seqlen=a.seqlen, seed=0), a.tokenizer)
    torch.save(ids, work / "calib.pt")
    windows = eval_windows(a.tokenizer, load_text("wikitext2", "test", None), 512, a.windows)
    torch.save(windows, work / "windows.pt")
    folder = work / "upcycled"
    if not (a.reuse_model and reusable(folder, windows, a)):
        folder = build(dense, windows, work, a)
    return folder, windows, json.loads((folder / "upcycle.json").read_text())


def reusable(folder: Path, windows, a) -> bool:
    """--reuse-model: the saved upcycle has these settings and passed the check on as many windows."""
    try:
        meta = json.loads((folder / "upcycle.json").read_text())
    except (OSError, ValueError):
        return False
    same = all(meta.get(k) == getattr(a, k) for k in ("experts", "top_k", "perturb", "seed")) \
        and meta.get("windows") == int(windows.shape[0])
    if same:
        print(f"reusing {folder}: its exactness check passed (SmolLM2 ppl {meta['dense_ppl']:.6g}, unperturbed "
              f"upcycle {meta['unperturbed_ppl']:.6g})", flush=True)
    return same
