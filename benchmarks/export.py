"""Export benchmark (issue 7): SmolLM2-135M dense, 2:4, int4 g64 and 2:4 + int4 g64,
written natively and in each serving format; size on disk, exactness of the round
trip, and perplexity after reloading; llama.cpp's perplexity on the GGUF Q8_0 files.

Protocol (as benchmarks/prune.py): calibration 128 x 512 tokens from the C4 train
sample, seed 0; WikiText-2 test, seqlen 512, first 64 windows. Rows:

    dense      the model as loaded (fp32 weights from the Q4_1 GGUF)
    s24        SparseGPT 2:4
    w4         GPTQ W4 g64 (asymmetric, act_order + static groups + clipping: the defaults)
    s24w4      SparseGPT 2:4, then GPTQ W4 g64 (stored as SparseQuantLinear natively)

Formats: native (compress.save), hf (fp16), ct (compressed-tensors: pack-quantized and/
or dense sparsity), gguf-q8 (Q8_0; quantized rows folded first), gguf-q4 (Q4_0).

Columns: "MiB" the whole folder, "÷ fp16 model" that against 2 bytes per parameter of the
dense model (256.6 MiB: the weights alone); "linear MiB" the decoder linears' tensors alone (what
a format stores for them: codes, scales, zero points, patterns), "÷ fp16" that against
the same layers in fp16 dense; "exact" whether every decoder weight read back equals
what was meant to be written (native: the effective weights; hf and ct: them rounded to
fp16, as the format stores or the library dequantizes; gguf: our own Q8_0 / Q4_0 blocks
of them, read with gguf.GGUFReader); "ppl" after reloading the folder (ct through
transformers' compressed-tensors loader, gguf through transformers' GGUF loader);
"llama.cpp ppl" from llama-cpp-python on the same windows, when it is installed
(benchmarks/setup_llamacpp.sh builds it).

    python benchmarks/export.py --data-dir ../shared/data [--rows dense,s24,w4,s24w4] [--formats ...]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from prune import prepare  # noqa: E402  (also puts the repository root on sys.path)

S24 = {"sparsegpt": {"pattern": "2:4"}}
W4 = {"quant": {"bits": 4, "group_size": 64}}
ROWS = {"dense": [], "s24": [S24], "w4": [W4], "s24w4": [S24, W4]}
FORMATS = ("native", "hf", "ct", "gguf-q8", "gguf-q4")


def linear_bytes(folder: Path, fmt: str) -> int:
    """Bytes of the decoder linears' tensors in a written folder."""
    if fmt.startswith("gguf"):
        import gguf
        r = gguf.GGUFReader(str(folder / "model.gguf"))
        return sum(int(t.n_bytes) for t in r.tensors if t.name.startswith("blk.") and "norm" not in t.name)
    from safetensors import safe_open
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if ".layers." in k and "norm" not in k:
                    t = st.get_slice(k)
                    total += math.prod(t.get_shape()) * {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8,
                                                         "U8": 1, "I16": 2, "I8": 1}[t.get_dtype()]
    return total


def reload(folder: Path, fmt: str):
    import torch
    from transformers import AutoModelForCausalLM

    import compress
    if fmt == "native":
        return compress.load(str(folder))[0]
    if fmt == "ct":
        from transformers.utils.quantization_config import CompressedTensorsConfig
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
        kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if "config_groups" in qc else {}
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    if fmt.startswith("gguf"):
        from compress.loading import clear_gguf_marker
        m = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32).eval()
        clear_gguf_marker(m)
        return m
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def weights_of(model) -> tuple[dict, set]:
    """({decoder linear name.weight: fp32 effective weight}, names of the packed ones)."""
    import torch

    from compress.nn import PackedLinear
    mods = {n: m for n, m in model.named_modules() if ".layers." in n and isinstance(m, (PackedLinear, torch.nn.Linear))}
    W = {f"{n}.weight": (m.effective_weight() if isinstance(m, PackedLinear) else m.weight).detach().float()
         for n, m in mods.items()}
    return W, {f"{n}.weight" for n, m in mods.items() if isinstance(m, PackedLinear)}


def expected(model, fmt: str) -> dict:
    """{decoder linear name.weight: what that format should give back}, fp32. Every
    format here stores dense tensors in fp16; packed layers keep their exact values natively."""
    import numpy as np
    import torch

    W, packed = weights_of(model)
    if fmt == "native":
        return {k: v if k in packed else v.half().float() for k, v in W.items()}
    if fmt in ("hf", "ct"):
        return {k: v.half().float() for k, v in W.items()}
    if fmt.startswith("gguf"):
        import gguf
        from compress.export.gguf import permute_qk, unpermute_qk
        t = gguf.GGMLQuantizationType.Q8_0 if fmt == "gguf-q8" else gguf.GGMLQuantizationType.Q4_0
        c = model.config
        out = {}
        for k, v in W.items():
            heads = c.num_attention_heads if "q_proj" in k else c.num_key_value_heads if "k_proj" in k else None
            v = permute_qk(v, heads) if heads else v
            v = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), t), t).astype(np.float32))
            out[k] = unpermute_qk(v, heads) if heads else v
        return out
    return W


def llama_cpp_ppl(path: Path, windows) -> float | None:
    """Perplexity of llama.cpp on the windows (positions 1..T-1 of each, as ours)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import numpy as np
    T = windows.shape[1]
    llm = Llama(model_path=str(path), n_ctx=T, n_batch=T, n_ubatch=T, logits_all=True, verbose=False,
                n_threads=os.cpu_count())
    nll, n = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        lg = np.asarray(llm.scores[:T], dtype=np.float64)
        lse = np.logaddexp.reduce(lg[:-1], axis=1)
        nll += float((lse - lg[np.arange(T - 1), w[1:]]).sum())
        n += T - 1
    return math.exp(nll / n)


def run_row(key: str, a, work: Path, windows, formats) -> list[dict]:
    import copy

    import torch

    import compress
    from compress.eval import evaluate
    from compress.export import ExportConfig, export
    from compress.loading import load_model

    model, tok = load_model("smollm2-135m")
    t0 = time.perf_counter()
    if ROWS[key]:
        compress.run(model, ROWS[key], calib=torch.load(work / "calib.pt"), batch_size=8)
    seconds = time.perf_counter() - t0
    out = []
    for fmt in formats:
        folder = work / f"{key}-{fmt}"
        if fmt == "native":
            compress.save(str(folder), copy.deepcopy(model), tok, dtype="float16")
        else:
            cfg = {"hf": ExportConfig(format="hf"), "ct": ExportConfig(format="compressed-tensors"),
                   "gguf-q8": ExportConfig(format="gguf", gguf_type="Q8_0", fold=True),
                   "gguf-q4": ExportConfig(format="gguf", gguf_type="Q4_0", fold=True)}[fmt]
            export(model, tok, str(folder), cfg)
        want = expected(model, fmt)
        back = reload(folder, fmt)
        got = weights_of(back)[0]
        exact = got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
        ppl = evaluate(back, windows, batch_size=8, desc=f"ppl {key} {fmt}")["ppl"] if fmt in a.ppl_formats else None
        del back
        lcpp = llama_cpp_ppl(folder / "model.gguf", windows) if fmt.startswith("gguf") and a.llama_cpp else None
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "export.json")
        row = {"row": key, "format": fmt, "bytes": size, "linear_bytes": linear_bytes(folder, fmt), "exact": exact,
               "ppl": ppl, "llama_cpp_ppl": lcpp, "compress_seconds": seconds}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def table(rows: list[dict], dense_linear: int, dense_total: int) -> str:
    f = lambda v, p: "—" if v is None else format(v, p)  # noqa: E731
    lines = ["| row | format | MiB | ÷ fp16 model | linear MiB | linear ÷ fp16 | exact | ppl | llama.cpp ppl | Δ |",
             "|" + "---|" * 10]
    for r in rows:
        d = (r["llama_cpp_ppl"] / r["ppl"] - 1) * 100 if r["llama_cpp_ppl"] and r["ppl"] else None
        lines.append(f"| {r['row']} | {r['format']} | {r['bytes'] / 2**20:.1f} | {r['bytes'] / dense_total:.3f} | "
                     f"{r['linear_bytes'] / 2**20:.1f} | {r['linear_bytes'] / dense_linear:.3f} | "
                     f"{'yes' if r['exact'] else 'NO'} | {f(r['ppl'], '.2f')} | {f(r['llama_cpp_ppl'], '.2f')} | "
                     f"{f(d, '+.2f')}{'' if d is None else ' %'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("COMPRESS_DATA_DIR"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--ppl-formats", default="native,ct,gguf-q8", help="formats whose reload is evaluated")
    ap.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    ap.add_argument("--work", default=str(HERE / ".cache" / "export"))
    ap.add_argument("--markdown")
    a = ap.parse_args()
    keys, formats = a.rows.split(","), a.formats.split(",")
    a.ppl_formats = a.ppl_formats.split(",")
    bad = [k for k in keys if k not in ROWS] + [f for f in formats if f not in FORMATS]
    if bad:
        raise SystemExit(f"unknown row or format {bad[0]!r}; rows: {', '.join(ROWS)}; formats: {', '.join(FORMATS)}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model, windows, _ = prepare(a, work)
    n = sum(m.weight.numel() for name, m in model.named_modules() if ".layers." in name and hasattr(m, "weight")
            and m.weight.dim() == 2)
    dense_linear, dense_total = 2 * n, 2 * sum(p.numel() for p in model.parameters())   # fp16 bytes
    del model
    rows = [r for k in keys for r in run_row(k, a, work, windows, formats)]
    (work / "rows.json").write_text(json.dumps(rows, indent=2))
    s24w4 = [r for r in rows if r["row"] == "s24w4" and r["format"] in ("native", "ct")]
    q8 = [r for r in rows if r["format"] == "gguf-q8" and r["llama_cpp_ppl"]]
    text = (f"SmolLM2-135M; fp16 dense: whole model {dense_total / 2**20:.1f} MiB, decoder linears "
            f"{dense_linear / 2**20:.1f} MiB; WikiText-2 test, {windows.shape[0]} windows of 512\n\n"
            f"{table(rows, dense_linear, dense_total)}\n\nTargets:\n"
            f"- every round trip exact: {'PASS' if all(r['exact'] for r in rows) else 'FAIL'}\n"
            f"- llama.cpp within 1 % of ours on Q8_0: "
            f"{'n/a (llama-cpp-python not installed)' if not q8 else 'PASS' if all(abs(r['llama_cpp_ppl'] / r['ppl'] - 1) <= 0.01 for r in q8) else 'FAIL'}\n"
            f"- 2:4 + int4 g64 decoder linears <= 0.2x fp16 (native or compressed-tensors): "
            f"{'n/a' if not s24w4 else 'PASS' if min(r['linear_bytes'] for r in s24w4) <= 0.2 * dense_linear else 'FAIL'}")
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
