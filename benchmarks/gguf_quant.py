"""GGUF benchmark (issue 21; not named gguf.py, which would shadow the gguf package on
sys.path): our RTN and GPTQ on llama.cpp's own grids against llama.cpp's
quantizer, all judged by llama.cpp's perplexity on the same WikiText-2 windows.

Protocol (as benchmarks/prune.py): SmolLM2-135M; calibration 128 x 512 tokens of the C4
train sample, seed 0; WikiText-2 test, seqlen 512, first 64 windows. Per row (a GGUF type):

    llama.cpp   our F16 export of the dense model, quantized by llama.cpp itself through
                llama-cpp-python's llama_model_quantize (`pure`: every tensor in the type,
                with llama.cpp's fallbacks; the q4_k_m row is its Q4_K_M mix)
    imatrix     the same, guided by llama-imatrix's importance matrix over our calibration
                samples (decoded to text for its tokenizer), through llama-quantize --imatrix
    ours RTN    quant {method: rtn, format: gguf-TYPE} on ggml's reference fit: the
                least-squares search for K-quants, the plain extremes for the 32-blocks
                (as ggml-quants.c); checks our grid against llama.cpp's
    ours GPTQ   quant {method: gptq, format: gguf-TYPE} (the search on every format, its
                least squares weighted by H_jj: hessian_fit)

Ours are exported with the same type for the embedding (tied head), so the files hold
the same types tensor for tensor. SmolLM2's 576-input projections are not whole
256-weight super-blocks: on both sides q4_k falls back to q5_0 there and q6_k to q8_0,
as llama.cpp's quantizer does. The q4_k_m row: recipes/gguf_q4_k_m.yaml's layout (Q6_K
for v_proj and down_proj in llama.cpp's use_more_bits blocks, Q4_K elsewhere, the
embedding Q6_K, with the same fallbacks).

    bash benchmarks/setup_llamacpp.sh        # once: builds llama-cpp-python
    bash benchmarks/setup_llamacpp_tools.sh  # once: llama-imatrix and llama-quantize (imatrix column)
    python benchmarks/gguf_quant.py --data-dir ../shared/data [--rows q8_0,q4_0,q4_k,q4_k_m,q6_k]
        [--methods llama_cpp,imatrix,rtn,gptq] [--add-rows]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from export import llama_cpp_ppl  # noqa: E402
from prune import prepare  # noqa: E402  (also puts the repository root on sys.path)

ROWS = ("q8_0", "q4_0", "q4_k", "q4_k_m", "q6_k")
METHODS = ("llama_cpp", "imatrix", "rtn", "gptq")
ABLATION = ("gptq_plain",)       # GPTQ with ggml's own fit weights (hessian_fit: false); not a column
TOOLS = Path(os.environ.get("LLAMA_TOOLS", HERE / ".cache" / "llama-tools"))      # setup_llamacpp_tools.sh
FTYPE = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K_S", "q4_k_m": "Q4_K_M", "q6_k": "Q6_K"}
# SmolLM2's 576-input projections (the rest, down_proj, has 1536 inputs).
NARROW = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj)$"


def q4_k_m_layers(n_layers: int) -> str:
    """llama.cpp's use_more_bits blocks (llama-quant.cpp), whose attn_v and ffn_down Q4_K_M makes Q6_K."""
    more = [i for i in range(n_layers) if i < n_layers // 8 or i >= 7 * n_layers // 8
            or (i - n_layers // 8) % 3 == 2]
    return rf"layers\.({'|'.join(map(str, more))})\.(self_attn\.v_proj|mlp\.down_proj)$"


def passes(row: str, method: str, n_layers: int) -> list:
    """Our quant passes for a row. RTN follows ggml's reference quantizers: no search on
    the 32-blocks (a K type's fallback included), the least-squares search on K-quants."""
    def q(fmt, **kw):
        gptq = method.startswith("gptq")
        search = gptq or fmt.endswith("_k")
        extra = {"hessian_fit": method == "gptq"} if gptq else {}
        return {"quant": {"method": "gptq" if gptq else method, "format": f"gguf-{fmt}", "clip_search": search,
                          **extra, **kw}}

    if row == "q4_k_m":
        wide = q4_k_m_layers(n_layers)
        return [q("q6_k", targets=[wide], ignore=[NARROW]), q("q8_0", targets=[wide], ignore=[r"down_proj$"]),
                q("q4_k", ignore=[wide, NARROW]), q("q5_0", targets=[NARROW], ignore=[wide])]
    if row in ("q4_k", "q6_k"):
        return [q(row, ignore=[NARROW]), q({"q4_k": "q5_0", "q6_k": "q8_0"}[row], targets=[NARROW])]
    return [q(row)]


def llama_quantize(src: Path, dst: Path, row: str) -> None:
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPE[row]}")
    p.pure = row != "q4_k_m"
    p.nthread = os.cpu_count()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed on {row} ({rc})")


def tool(name: str) -> str:
    path = TOOLS / "bin" / name
    if not path.exists():
        raise SystemExit(f"--methods imatrix needs llama.cpp's {name}: run benchmarks/setup_llamacpp_tools.sh")
    return str(path)


def imatrix_of(dense_f16: Path, work: Path, calib, tok) -> Path:
    """llama.cpp's importance matrix (llama-imatrix, its mean squared activation per input
    column) over our calibration samples, decoded to text for its tokenizer: one 512-token
    chunk per sample, as many chunks as samples. Made once per work folder."""
    out = work / "imatrix.gguf"
    if not out.exists():
        text = work / "calib.txt"
        text.write_text("\n\n".join(tok.decode(s) for s in calib.tolist()))
        n, T = calib.shape
        subprocess.run([tool("llama-imatrix"), "-m", str(dense_f16), "-f", str(text), "-o", str(out), "-c", str(T),
                        "-b", str(T), "--chunks", str(n), "--no-ppl", "-t", str(os.cpu_count())],
                       check=True, capture_output=True)
    return out


def llama_quantize_imatrix(src: Path, dst: Path, row: str, imatrix: Path) -> None:
    pure = [] if row == "q4_k_m" else ["--pure"]
    subprocess.run([tool("llama-quantize"), *pure, "--imatrix", str(imatrix), str(src), str(dst), FTYPE[row],
                    str(os.cpu_count())], check=True, capture_output=True)


def run_row(row: str, a, work: Path, windows, calib, dense_f16: Path, tok) -> dict:
    import compress
    from compress.export import ExportConfig, export
    from compress.loading import load_model

    out = {"row": row}
    for method in a.methods:
        if method in ("llama_cpp", "imatrix"):
            f = work / f"{method}-{row}.gguf"
            if method == "llama_cpp":
                llama_quantize(dense_f16, f, row)
            else:
                llama_quantize_imatrix(dense_f16, f, row, imatrix_of(dense_f16, work, calib, tok))
            out[method] = {"ppl": llama_cpp_ppl(f, windows), "mib": f.stat().st_size / 2**20}
            print(json.dumps(out), flush=True)
            continue
        model, _ = load_model("smollm2-135m")
        t0 = time.perf_counter()
        compress.run(model, passes(row, method, model.config.num_hidden_layers), calib=calib, batch_size=8)
        seconds = time.perf_counter() - t0
        gguf_type = {"q4_k_m": "Q6_K"}.get(row, row.upper())
        folder = export(model, tok, str(work / f"ours-{row}-{method}"), ExportConfig(format="gguf", gguf_type=gguf_type))
        f = folder / "model.gguf"
        out[method] = {"ppl": llama_cpp_ppl(f, windows), "mib": f.stat().st_size / 2**20, "seconds": seconds,
                       "types": json.loads((folder / "export.json").read_text())["types"]}
        print(json.dumps(out), flush=True)
    return out


def table(rows: list, dense: float) -> str:
    f = lambda d, k, p: "—" if d is None or d.get(k) is None else format(d[k], p)  # noqa: E731
    lines = [f"dense F16 (our export) in llama.cpp: ppl {dense:.3f}", "",
             "| type | llama.cpp quantize ppl | llama.cpp imatrix ppl | ours RTN on the grid ppl | "
             "ours GPTQ on the grid ppl | llama.cpp MiB | ours MiB | ours GPTQ s |", "|" + "---|" * 8]
    for r in rows:
        lc, im, g, q = (r.get(k) for k in ("llama_cpp", "imatrix", "gptq", "rtn"))
        lines.append(f"| {r['row'].upper()} | {f(lc, 'ppl', '.3f')} | {f(im, 'ppl', '.3f')} | {f(q, 'ppl', '.3f')} | "
                     f"{f(g, 'ppl', '.3f')} | {f(lc or im, 'mib', '.1f')} | {f(g or q, 'mib', '.1f')} | "
                     f"{f(g, 'seconds', '.0f')} |")
    return "\n".join(lines)


def targets(rows: list) -> str:
    out = []
    for r in rows:
        lc, im, q, g = (r.get(k) for k in ("llama_cpp", "imatrix", "rtn", "gptq"))
        if q and lc:
            d = q["ppl"] / lc["ppl"] - 1
            out.append(f"- {r['row']}: ours RTN within 0.5 % of llama.cpp: {'PASS' if abs(d) <= 0.005 else 'FAIL'} "
                       f"({d * 100:+.2f} %)")
        for name, peer in (("llama.cpp", lc), ("llama.cpp with imatrix", im)):
            if g and peer and r["row"] in ("q4_0", "q4_k"):
                out.append(f"- {r['row']}: ours GPTQ below {name}: {'PASS' if g['ppl'] < peer['ppl'] else 'FAIL'} "
                           f"({g['ppl']:.3f} vs {peer['ppl']:.3f})")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("COMPRESS_DATA_DIR"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--methods", default=",".join(METHODS), help="llama_cpp: llama.cpp's quantizer; imatrix: "
                    "it with llama-imatrix's importance matrix (benchmarks/setup_llamacpp_tools.sh); rtn, gptq: ours; "
                    "gptq_plain: GPTQ without hessian_fit (printed under the table)")
    ap.add_argument("--work", default=str(HERE / ".cache" / "gguf"))
    ap.add_argument("--markdown")
    ap.add_argument("--add-rows", action="store_true", help="keep the rows and methods already in WORK/rows.json")
    a = ap.parse_args()
    keys, a.methods = a.rows.split(","), a.methods.split(",")
    bad = [k for k in keys if k not in ROWS] + [m for m in a.methods if m not in METHODS + ABLATION]
    if bad:
        raise SystemExit(f"unknown row or method {bad[0]!r}; rows: {', '.join(ROWS)}; methods: {', '.join(METHODS)}")
    import torch

    from compress.export import ExportConfig, export
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model, windows, _ = prepare(a, work)
    from compress.loading import load_model
    _, tok = load_model("smollm2-135m")
    from compress.eval import evaluate
    hf_ppl = evaluate(model, windows, batch_size=8, desc="ppl")["ppl"]    # transformers, fp32, same windows
    dense = export(model, tok, str(work / "dense-f16"), ExportConfig(format="gguf", gguf_type="F16")) / "model.gguf"
    del model
    dense_ppl = llama_cpp_ppl(dense, windows)
    calib = torch.load(work / "calib.pt")
    saved = work / "rows.json"
    old = json.loads(saved.read_text())["rows"] if a.add_rows and saved.exists() else []
    rows = {r["row"]: r for r in old}
    for k in keys:
        rows[k] = {**rows.get(k, {}), **run_row(k, a, work, windows, calib, dense, tok)}
        saved.write_text(json.dumps({"dense": dense_ppl, "hf": hf_ppl, "rows": list(rows.values())}, indent=2))
    rows = [rows[k] for k in ROWS if k in rows]
    d = dense_ppl / hf_ppl - 1
    text = (f"SmolLM2-135M; calibration {a.nsamples} x {a.seqlen} C4 train tokens, seed 0; WikiText-2 test, "
            f"{windows.shape[0]} windows of {a.seqlen}; every perplexity by llama.cpp (llama-cpp-python)\n\n"
            f"{table(rows, dense_ppl)}\n\nTargets:\n"
            f"- F16 export: llama.cpp {dense_ppl:.3f} vs transformers {hf_ppl:.3f} on the same windows, "
            f"{'PASS' if abs(d) <= 0.01 else 'FAIL'} ({d * 100:+.2f} %, target within 1 %)\n{targets(rows)}")
    plain = [f"- {r['row']}: {r['gptq_plain']['ppl']:.3f} (with hessian_fit: "
             f"{r['gptq']['ppl']:.3f})" if 'gptq' in r else f"- {r['row']}: {r['gptq_plain']['ppl']:.3f}"
             for r in rows if "gptq_plain" in r]
    if plain:
        text += "\n\nAblation, GPTQ without hessian_fit (ggml's own fit weights):\n" + "\n".join(plain)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
