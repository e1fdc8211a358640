"""Pruning benchmark: ours against llm-compressor on SmolLM2-135M, in one run.

Protocol (the engine issue): calibration 128 x 512 tokens from the C4 train sample,
seed 0; WikiText-2 test, seqlen 512, first 64 windows. Rows: dense, magnitude, Wanda
and SparseGPT at 50 % unstructured, 4:8 and 2:4, ours and llm-compressor's
(`WandaPruningModifier`, `SparseGPTModifier`) on the very same calibration ids.

Every compression runs in a fresh subprocess, so "seconds" (the compression call
alone, model loading excluded) and "peak RSS" (the whole process) are measured the
same way for both; every perplexity is computed here, by the same code, from the
weights each side saved.

    python benchmarks/prune.py [--data-dir ../shared/data] [--nsamples 128] [--windows 64]
                               [--methods magnitude,wanda,sparsegpt] [--settings 50%,4:8,2:4]
                               [--no-peer] [--peer-python PATH] [--markdown FILE] [--allocation]

--allocation prints issue 23's table instead (benchmarks/prune_allocation.py): uniform,
OWL and budget sparsity allocations, with llm-compressor's OWL in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {"50%": ("unstructured", 0.5), "60%": ("unstructured", 0.6), "70%": ("unstructured", 0.7),
            "4:8": ("4:8", 0.5), "2:4": ("2:4", 0.5)}


def sweep_of(method: str, setting: str, allocation: str = "uniform") -> list:
    """Recipe passes of a table row: "wanda" or a chain such as "wanda+dsnot" (the later
    passes take their defaults; DSnoT keeps the pruning pass's pattern), with the
    pruning pass's sparsity allocation (--allocation: OWL at its defaults M 5, lambda 0.08)."""
    pattern, sparsity = SETTINGS[setting]
    first, *rest = method.split("+")
    cfg = {"sparsity": sparsity} if pattern == "unstructured" else {"pattern": pattern}
    if allocation != "uniform":
        cfg["allocation"] = allocation
    return [{first: cfg}] + [{p: {}} for p in rest]


def worker_ours(args) -> None:
    """Subprocess: compress SmolLM2 with our pass; save weights and timings."""
    import torch

    import compress
    from compress.loading import load_model

    model, _ = load_model("smollm2-135m")
    ids = torch.load(args.calib)
    t0 = time.perf_counter()
    _, report = compress.run(model, sweep_of(args.method, args.setting, args.alloc), calib=ids,
                             batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if ".layers." in k and k.endswith("proj.weight")}
    blocks = {k: {b: v["sparsity"] for b, v in e["blocks"].items()} for k, e in (report["allocation"] or {}).items()}
    save_worker_output(Path(args.out), weights, {"seconds": seconds, "allocation": blocks})
    if report["allocation"]:   # what `compress run` writes beside its output: the allocation and its plot
        from compress.plots import plot_sparsity

        keep = {k: report[k] for k in ("allocation", "layers")}
        (Path(args.out) / "report.json").write_text(json.dumps(keep, indent=1, default=str))
        plot_sparsity(keep, Path(args.out) / "sparsity.png")


def save_worker_output(out: Path, weights: dict, result: dict) -> None:
    """Worker side: save the weights to out/weights.safetensors and `result` plus this
    process's peak RSS to out/result.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "weights.safetensors"))
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child would
    # report the (model-holding) parent's peak.
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    (out / "result.json").write_text(json.dumps({**result, "peak_rss_mib": rss}))


class WorkerFailed(SystemExit):
    """A worker exited with an error (uncaught, it ends the benchmark with the message)."""


def run_worker(cmd: list, out: Path, label: str) -> dict:
    """Run a worker subprocess offline; return its result.json plus "wall_process" and "weights"."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise WorkerFailed(f"{label} failed:\n{res.stderr[-3000:]}")
    row = json.loads((out / "result.json").read_text())
    row["wall_process"] = time.perf_counter() - t0
    row["weights"] = str(out / "weights.safetensors")
    return row


def run_row(impl: str, method: str, setting: str, work: Path, a, alloc: str = "uniform") -> dict:
    out = work / f"{impl}-{method}-{setting.replace(':', 'of').replace('%', '')}{'' if alloc == 'uniform' else '-' + alloc}"
    if impl == "ours":
        cmd = [sys.executable, __file__, "--worker", "--method", method, "--setting", setting, "--alloc", alloc,
               "--calib", str(work / "calib.pt"), "--out", str(out), "--batch-size", str(a.batch_size)]
    else:
        pattern, sparsity = SETTINGS[setting]
        cmd = [a.peer_python, str(HERE / "peer_llmcompressor.py"), "--method", method, "--sparsity", str(sparsity),
               "--pattern", pattern, "--calib", str(work / "calib.pt"), "--out", str(out)]
        cmd += ["--owl", "5,0.08"] if alloc == "owl" else []
    return run_worker(cmd, out, f"{impl} {method} {setting}")


def perplexity(model, dense_state, weights_file, windows) -> float:
    from safetensors.torch import load_file

    from compress.eval import evaluate

    model.load_state_dict(dense_state)
    if weights_file:
        missing = model.load_state_dict(load_file(weights_file), strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
    return evaluate(model, windows, batch_size=8, desc="ppl")["ppl"]


def table(rows: list[dict]) -> str:
    head = "| method | setting | ours ppl | llm-compressor ppl | ours s | llm-compressor s | time ratio | ours peak RSS MiB | llm-compressor peak RSS MiB |"
    lines = [head, "|" + "---|" * 9]
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        o, p = r.get("ours", {}), r.get("peer", {})
        ratio = o["seconds"] / p["seconds"] if o.get("seconds") and p.get("seconds") else None
        lines.append(f"| {r['method']} | {r['setting']} | {fmt(o.get('ppl'), '.2f')} | {fmt(p.get('ppl'), '.2f')} | "
                     f"{fmt(o.get('seconds'), '.1f')} | {fmt(p.get('seconds'), '.1f')} | {fmt(ratio, '.2f')} | "
                     f"{fmt(o.get('peak_rss_mib'), '.0f')} | {fmt(p.get('peak_rss_mib'), '.0f')} |")
    return "\n".join(lines)


def prepare(a, work: Path):
    """The shared protocol: dense SmolLM2-135M, calibration ids (C4 train, seed 0) saved to
    work/calib.pt, WikiText-2 test windows of 512. Returns (model, windows, dense state)."""
    if not a.data_dir:
        raise SystemExit("benchmark needs the C4 / WikiText-2 text: pass --data-dir or set COMPRESS_DATA_DIR")
    os.environ["COMPRESS_DATA_DIR"] = a.data_dir
    import torch

    from calib import CalibConfig, load_calibration, load_text
    from compress.eval import eval_windows
    from compress.loading import load_model

    model, tok = load_model("smollm2-135m")
    a.tokenizer = tok   # for suites that evaluate more than perplexity (benchmarks/tasks.py)
    ids = load_calibration(CalibConfig(source="c4", nsamples=a.nsamples, seqlen=a.seqlen, seed=0), tok)
    torch.save(ids, work / "calib.pt")
    windows = eval_windows(tok, load_text("wikitext2", "test", None), 512, a.windows)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, windows, dense_state


def start(a) -> tuple:
    """The work folder, `prepare`'s (model, windows, dense state), and llm-compressor's
    venv built unless --no-peer or --peer-python."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prepared = prepare(a, work)
    if not a.no_peer and not a.peer_python:
        setup = subprocess.run(["bash", str(HERE / "setup_peer.sh")], capture_output=True, text=True, check=True)
        a.peer_python = setup.stdout.strip().splitlines()[-1]
    return work, prepared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method"), ap.add_argument("--setting"), ap.add_argument("--calib"), ap.add_argument("--out")
    ap.add_argument("--alloc", default="uniform", help=argparse.SUPPRESS)
    ap.add_argument("--allocation", action="store_true",
                    help="the allocation table instead (issue 23): uniform, OWL (ours and llm-compressor's), budget; "
                         "default methods wanda,sparsegpt,wanda+dsnot and settings 60%%,70%% (DSnoT at 70%% only)")
    ap.add_argument("--data-dir", default=os.environ.get("COMPRESS_DATA_DIR"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--methods", default=None, help="default magnitude,wanda,sparsegpt")
    ap.add_argument("--settings", default=None, help="default 50%%,4:8,2:4")
    ap.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    ap.add_argument("--peer-python", default=None, help="python of llm-compressor's venv (default: build it)")
    ap.add_argument("--work", default=str(HERE / ".cache" / "prune"))
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--reuse", action="store_true", help="--allocation: take the runs already in WORK/allocation.json")
    a = ap.parse_args()
    if a.worker:
        return worker_ours(a)
    if a.allocation:
        import prune_allocation
        return prune_allocation.main(a)
    a.methods, a.settings = a.methods or "magnitude,wanda,sparsegpt", a.settings or "50%,4:8,2:4"
    import torch

    work, (model, windows, dense_state) = start(a)
    rows = [{"method": "dense", "setting": "—", "ours": {"ppl": perplexity(model, dense_state, None, windows)}}]
    print(f"dense ppl {rows[0]['ours']['ppl']:.2f}", flush=True)
    for setting in a.settings.split(","):
        for method in a.methods.split(","):
            row = {"method": method, "setting": setting}
            impls = ["ours"] + ([] if a.no_peer or method not in ("wanda", "sparsegpt") else ["peer"])
            for impl in impls:
                r = run_row(impl, method, setting, work, a)
                r["ppl"] = perplexity(model, dense_state, r["weights"], windows)
                row[impl] = r
                print(f"{impl:5s} {method:9s} {setting:4s} ppl {r['ppl']:8.2f}  {r['seconds']:7.1f} s  "
                      f"{r['peak_rss_mib']:6.0f} MiB", flush=True)
            rows.append(row)
    (work / "rows.json").write_text(json.dumps(rows, indent=2))
    text = (f"SmolLM2-135M; calibration {a.nsamples} x {a.seqlen} C4 train tokens, seed 0; WikiText-2 test, "
            f"seqlen 512, {windows.shape[0]} windows; {os.cpu_count()} CPU cores; torch {torch.__version__}\n\n"
            + table(rows))
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
