"""Distributed compression benchmark: one run of SmolLM2-135M across processes and threads.

Protocol (the engine issue): calibration 128 x 512 tokens from the C4 train sample,
seed 0; WikiText-2 test, seqlen 512, first 64 windows. Rows: P processes x T threads
each, for P x T in 1x1, 1x2, 2x1 (`--rows`), of Wanda 2:4 and SparseGPT 2:4 + GPTQ W4
g64 (`--methods wanda24,sgpt24_gptq4`). P > 1 runs under torchrun on gloo
(compress.dist: each process calibrates on its shard of the samples, the statistics
are summed, the layers are dealt by cost and broadcast); OMP_NUM_THREADS=T.

"seconds" is the compression call on rank 0 (model loading excluded); "peak RSS" the
largest VmHWM of the processes; the perplexity is computed here, by the same code, on
the effective weights rank 0 saved. "reduced" / "broadcast" are the bytes one process
sent into the statistics' all-sums and the result broadcasts, per block. Targets: 2 x 1
at least 1.7x faster than 1 x 1 for SparseGPT + GPTQ; perplexity within 0.5 % of the
one-process run; peak RSS per process at most 1.2x the one-process peak.

    python benchmarks/distributed.py --data-dir ../shared/data [--nsamples 128] [--windows 64]
        [--rows 1x1,1x2,2x1] [--methods wanda24,sgpt24_gptq4] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from prune import WorkerFailed, perplexity, prepare  # noqa: E402

METHODS = {
    "wanda24": ("Wanda 2:4", [{"wanda": {"pattern": "2:4"}}]),
    "sgpt24_gptq4": ("SparseGPT 2:4 + GPTQ W4 g64", [{"sparsegpt": {"pattern": "2:4"}},
                                                     {"quant": {"bits": 4, "group_size": 64, "method": "gptq"}}]),
}


def vmhwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def worker(a) -> None:
    """One process of a row: compress, then rank 0 saves the effective weights."""
    import torch

    import compress
    from compress import dist
    from compress.loading import load_model
    from rows import measure

    model, _ = load_model("smollm2-135m")
    ids = torch.load(a.calib)
    t0 = time.perf_counter()
    _, report = compress.run(model, METHODS[a.method][1], calib=ids, batch_size=a.batch_size)
    seconds = time.perf_counter() - t0
    out, rank = Path(a.out), dist.rank()
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        from safetensors.torch import save_file
        weights, _ = measure({r["layer"]: model.get_submodule(r["layer"]) for r in report["layers"]}, False)
        save_file(weights, str(out / "weights.safetensors"))
    blocks = len(model.model.layers)
    (out / f"result.rank{rank}.json").write_text(json.dumps({
        "seconds": seconds, "peak_rss_mib": vmhwm_mib(), "threads": torch.get_num_threads(),
        "reduced_per_block": dist.TRAFFIC["reduced"] / blocks, "broadcast_per_block": dist.TRAFFIC["broadcast"] / blocks}))


def run_row(method: str, procs: int, threads: int, work: Path, a) -> dict:
    out = work / f"{method}-{procs}x{threads}"
    me = [str(Path(__file__)), "--worker", "--method", method, "--calib", str(work / "calib.pt"), "--out", str(out),
          "--batch-size", str(a.batch_size)]
    if procs == 1:
        cmd = [sys.executable] + me
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(port)] + me
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise WorkerFailed(f"{method} {procs}x{threads} failed:\n{res.stderr[-3000:]}")
    ranks = [json.loads((out / f"result.rank{r}.json").read_text()) for r in range(procs)]
    return {"procs": procs, "threads": threads, "seconds": ranks[0]["seconds"],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks), "weights": str(out / "weights.safetensors"),
            "reduced": ranks[0]["reduced_per_block"], "broadcast": ranks[0]["broadcast_per_block"]}


def table(rows: dict) -> str:
    lines = ["| processes | threads each | method | ppl | seconds | speed-up vs 1 process x 1 thread | "
             "peak RSS per process MiB | reduced MiB/block | broadcast MiB/block |", "|" + "---|" * 9]
    for method, rs in rows.items():
        base = next((r for r in rs if r["procs"] == 1 and r["threads"] == 1), None)
        for r in rs:
            speed = f"{base['seconds'] / r['seconds']:.2f}x" if base else "—"
            lines.append(f"| {r['procs']} | {r['threads']} | {METHODS[method][0]} | {r['ppl']:.3f} | "
                         f"{r['seconds']:.1f} | {speed} | {r['peak_rss_mib']:.0f} | {r['reduced'] / 2**20:.2f} | "
                         f"{r['broadcast'] / 2**20:.2f} |")
    return "\n".join(lines)


def targets(rows: dict) -> str:
    out = []
    for method, rs in rows.items():
        one = next((r for r in rs if (r["procs"], r["threads"]) == (1, 1)), None)
        two = next((r for r in rs if (r["procs"], r["threads"]) == (2, 1)), None)
        if not (one and two):
            continue
        speed, dppl = one["seconds"] / two["seconds"], abs(two["ppl"] / one["ppl"] - 1)
        rss = two["peak_rss_mib"] / one["peak_rss_mib"]
        if method == "sgpt24_gptq4":
            out.append(f"- {METHODS[method][0]}: 2 x 1 speed-up {speed:.2f}x (target >= 1.7x): "
                       f"{'PASS' if speed >= 1.7 else 'FAIL'}")
        out.append(f"- {METHODS[method][0]}: perplexity {two['ppl']:.3f} vs {one['ppl']:.3f}, {100 * dppl:.3f} % "
                   f"(target <= 0.5 %): {'PASS' if dppl <= 0.005 else 'FAIL'}")
        out.append(f"- {METHODS[method][0]}: peak RSS per process {rss:.2f}x the one-process peak (target <= 1.2x): "
                   f"{'PASS' if rss <= 1.2 else 'FAIL'}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for hidden in ("--method", "--calib", "--out"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default=os.environ.get("COMPRESS_DATA_DIR"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rows", default="1x1,1x2,2x1", help="processes x threads, comma-separated")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--work", default=str(HERE / ".cache" / "distributed"))
    ap.add_argument("--markdown", help="also write the table and targets to this file")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    shapes = [tuple(int(v) for v in r.lower().split("x")) for r in a.rows.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(METHODS)}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model, windows, dense = prepare(a, work)
    rows: dict = {}
    for method in methods:
        for procs, threads in shapes:
            r = run_row(method, procs, threads, work, a)
            r["ppl"] = perplexity(model, dense, r["weights"], windows)
            rows.setdefault(method, []).append(r)
            print(f"{method} {procs}x{threads}: ppl {r['ppl']:.3f}, {r['seconds']:.1f} s, "
                  f"{r['peak_rss_mib']:.0f} MiB", flush=True)
    import torch
    text = (f"SmolLM2-135M, calibration {a.nsamples} x {a.seqlen} C4 train tokens, seed 0; WikiText-2 test, "
            f"seqlen 512, {windows.shape[0]} windows; {os.cpu_count()} CPU cores; torch {torch.__version__}; gloo"
            f"\n\n{table(rows)}\n\n{targets(rows)}")
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
