"""Resume benchmark (issue 9): run a SmolLM2 recipe once without interruption, then
three times killed with SIGKILL after different blocks and resumed with --resume;
compare each output's weights (sha256 of model.safetensors) with the uninterrupted one.

The recipe defaults to recipes/sparsegpt_2of4_w4.yaml (SparseGPT 2:4 then GPTQ W4 g64,
one sweep over 30 blocks) without its evaluation, on --nsamples x 512 C4 tokens.

    python benchmarks/resume.py --data-dir ../shared/data [--kill-after 3,14,28] [--nsamples 64]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def sha(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def command(a, out: Path, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "-q", "run", a.recipe, "--output", str(out),
            "--set", "eval=null", "--set", f"calib.nsamples={a.nsamples}", *extra]


def run(cmd, env) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def run_and_kill(cmd, env, run_dir: Path, after: int) -> tuple[float, int]:
    """Start the run, SIGKILL it once block `after` is saved; (seconds, blocks saved)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    info = run_dir / "run.json"
    while p.poll() is None:
        try:
            done = json.loads(info.read_text())["blocks_done"].get("0", -1)
        except (OSError, ValueError, KeyError):
            done = -1
        if done >= after:
            p.send_signal(signal.SIGKILL)
            p.wait()
            break
        time.sleep(0.05)
    else:
        raise SystemExit(f"the run ended before block {after} was saved")
    return time.perf_counter() - t, json.loads(info.read_text())["blocks_done"]["0"] + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("COMPRESS_DATA_DIR"))
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "sparsegpt_2of4_w4.yaml"))
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--kill-after", default="3,14,28", help="blocks (0-based) after whose checkpoint to kill")
    ap.add_argument("--work", default=str(HERE / ".cache" / "resume"))
    ap.add_argument("--markdown")
    a = ap.parse_args()
    if not a.data_dir:
        raise SystemExit("benchmark needs the C4 text: pass --data-dir or set COMPRESS_DATA_DIR")
    env = {**os.environ, "COMPRESS_DATA_DIR": a.data_dir, "PYTHONPATH": str(ROOT)}
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    whole = work / "whole"
    t_whole = run(command(a, whole), env)
    want = sha(whole)
    rows = []
    for k in map(int, a.kill_after.split(",")):
        out = work / f"killed-{k}"
        t_kill, saved = run_and_kill(command(a, out), env, Path(f"{out}.run"), k)
        t_resume = run(command(a, out, "--resume", f"{out}.run"), env)
        got = sha(out)
        rows.append({"kill_after_block": k, "blocks_saved": saved, "killed_at_s": t_kill,
                     "resume_s": t_resume, "sha256": got[:16], "identical": got == want})
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"recipe {Path(a.recipe).name}, C4 {a.nsamples} x 512; uninterrupted run {t_whole:.1f} s, "
             f"sha256 {want[:16]}", "",
             "| killed after block | blocks saved | killed at (s) | resume (s) | sha256 | identical |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['kill_after_block']} | {r['blocks_saved']} | {r['killed_at_s']:.1f} | {r['resume_s']:.1f} | "
              f"{r['sha256']} | {'yes' if r['identical'] else 'NO'} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    if not all(r["identical"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
