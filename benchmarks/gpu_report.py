"""The GPU check's report (benchmarks/gpu_check.sh writes its inputs): the device, each
step's outcome, the CUDA tests' summary, the kernel, decode and compression tables, and
issue 25's targets, each met or not, as markdown on stdout.

    python benchmarks/gpu_report.py OUT_DIR
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

TARGETS_S = 745          # llm-compressor's Llama-3-8B GPTQ W4A16 seconds on one GPU


def load(out: Path, name: str):
    p = out / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def steps(out: Path) -> list[str]:
    lines = ["| step | outcome | seconds |", "|---|---|---|"]
    for line in (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").exists() else []:
        name, rc, secs, state = line.split("\t")
        lines.append(f"| {name} | {state} | {secs} |")
    return lines


def pytest_summary(out: Path) -> str:
    log = (out / "check.log").read_text() if (out / "check.log").exists() else ""
    part = log.split("== pytest")[1] if "== pytest" in log else ""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|skipped).*? in [\d.]+s.*?)=*$", part, re.M)
    fails = re.findall(r"^(?:FAILED|ERROR) .*$", part, re.M)
    return "\n".join([f"pytest -m cuda: {found[-1].strip() if found else 'no summary (see check.log)'}"]
                     + [f"- {f}" for f in fails[:20]])


def kernel_lines(k: dict) -> list[str]:
    out = [f"Copy bandwidth {k['copy_bandwidth'] / 1e12:.2f} TB/s (read + write).", "",
           "Every kernel with the launch shapes the code had when the check ran:", "", *layer_table(k["layers"])]
    if k.get("winners"):
        out += ["", "The launch-shape sweep's winners (geometric mean of time over the per-problem best):", ""]
        for path, w in k["winners"].items():
            out.append(f"- {path}: {w['config']}: {w['geomean_vs_best']:.3f}× (the shape the code had: "
                       f"{w['current_geomean'] or float('nan'):.3f}×)")
    if k.get("tuned_layers"):
        out += ["", "The Triton kernels again, with the winners:", "", *layer_table(k["tuned_layers"])]
    return out


def layer_table(rows: list[dict]) -> list[str]:
    out = ["| shape (out x in) | M | kernel | implementation | µs | × dense | TFLOP/s | roofline |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "us" not in r:
            out.append(f"| {r['shape']} | {r['M']} | {r['kernel']} | {r['impl']} | — | — | — | — |")
            continue
        roof = "—" if r["roofline"] is None else f"{r['roofline']:.0%}"
        out.append(f"| {r['shape']} | {r['M']} | {r['kernel']} | {r['impl']} | {r['us']:.1f} | "
                   f"{r['speedup']:.2f}× | {r['tflops']:.1f} | {roof} |")
    return out


def kernel_targets(k: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) per shape for the three kernel targets."""
    tuned = k.get("tuned_layers") or []
    rows = [r for r in k["layers"] if not (tuned and r["kernel"] in ("w4a16", "2:4+w4a16"))]
    rows += [r for r in tuned if r["kernel"] != "dense"]           # their speed-ups are against dense
    res = []                                                      # timed beside them

    def best(shape, M, names):
        got = [r["speedup"] for r in rows if r["shape"] == shape and r["M"] == M and r["kernel"] in names
               and "speedup" in r]
        return max(got) if got else None
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for what, M, names, goal in (("2:4 fp16", 2048, ("2:4 cuSPARSELt", "2:4 CUTLASS"), 1.5),
                                     ("W4A16 g128", 1, ("w4a16",), 3.0), ("2:4 + W4A16", 1, ("2:4+w4a16",), 4.5)):
            s = best(shape, M, names)
            if s is not None:
                res.append((f"{what} at M = {M}, {shape}: ≥ {goal}× dense", f"{s:.2f}×", s >= goal))
    return res


def decode_lines(d) -> tuple[list[str], list]:
    rows = d["rows"] if isinstance(d, dict) else d
    out = ["| variant | batch | decode tok/s | × dense | mode | prefill 2048 s | × dense | peak GiB |",
           "|---|---|---|---|---|---|---|---|"]
    dense = {r.get("batch"): r for r in rows if r.get("variant") == "dense" and r.get("decode_tok_s")}
    targets = []
    for r in rows:
        if not r.get("decode_tok_s"):
            why = r.get("error") or r.get("skipped") or "no measurement"
            out.append(f"| {r.get('variant')} | {r.get('batch', '')} | {str(why)[:100]} ||||||")
            continue
        base = dense.get(r.get("batch"))
        x = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        px = base["prefill_s"] / r["prefill_s"] if base and r.get("prefill_s") else float("nan")
        pre = f"{r['prefill_s']:.3f}" if r.get("prefill_s") else "—"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "—"
        mode = r.get("mode", "") + (f" ({r['graph_error'][:60]})" if r.get("mode") == "eager" else "")
        out.append(f"| {r['variant']} | {r['batch']} | {r['decode_tok_s']:.1f} | {x:.2f}× | {mode} | "
                   f"{pre} | {px:.2f}× | {peak} |")
        if r["variant"] == "2:4+w4a16" and r["batch"] == 1:
            targets.append(("decode 2:4 + W4A16 at batch 1: ≥ 3× dense tokens/s", f"{x:.2f}×", x >= 3))
    return out, targets


def main() -> None:
    out = Path(sys.argv[1])
    device = (out / "device.txt").read_text().strip() if (out / "device.txt").exists() else "unknown device"
    text = ["# GPU check", "", "```", device, "```", "", *steps(out), "", pytest_summary(out), ""]
    targets = []
    k = load(out, "kernels.json")
    if k:
        text += ["## Kernels (Llama-3-8B layer shapes, fp16)", "", *kernel_lines(k), ""]
        targets += kernel_targets(k)
    d = load(out, "decode.json")
    if d:
        lines, t = decode_lines(d)
        text += ["## End-to-end decode and prefill (random Llama-3-8B-shaped model, fp16)", "", *lines, ""]
        targets += t
    c = load(out, "compress.json")
    if c:
        text += ["## SparseGPT 2:4 + GPTQ W4 g128 on CUDA", "",
                 f"{c['blocks']} blocks, {c['calibration'][0]} x {c['calibration'][1]} calibration tokens, bf16: "
                 f"{c['per_block_s']:.1f} s per block, peak GPU memory "
                 f"{c['peak_gpu_gib'] if c['peak_gpu_gib'] is None else round(c['peak_gpu_gib'], 1)} GiB; "
                 f"projected 32 blocks {c['projected_32_block_s']:.0f} s against llm-compressor's {TARGETS_S} s "
                 f"for GPTQ alone ({c['ratio_vs_llmcompressor']:.2f}×).", ""]
        targets.append(("SparseGPT + GPTQ, 32 blocks projected: ≤ 0.5× llm-compressor's 745 s",
                        f"{c['projected_32_block_s']:.0f} s", c["ratio_vs_llmcompressor"] <= 0.5))
    text += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    text += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets]
    print("\n".join(text))


if __name__ == "__main__":
    main()
