"""The `compress` command line.

    compress run recipe.yaml [--set passes.0.wanda.sparsity=0.6] [--output DIR] [--resume RUN_DIR] [--json]
    compress report OUT_DIR
    compress eval MODEL [--dataset wikitext2] [--reference MODEL]
    compress export IN_DIR --format hf|compressed-tensors|gguf OUT_DIR [--fold] [--gguf-type Q8_0]
    compress plan recipe.yaml [--json]
    compress passes

A run ends with a summary table on stderr (evaluation dense against compressed,
sparsity, bits per weight, size on disk, seconds per stage, peak memory, where the
files are); `--json` also prints the report's summary and evaluation as JSON on stdout,
for scripts. `compress report OUT_DIR` prints a finished run's table again and redraws
its plots (layers.png, eval.png, ...) from OUT_DIR/report.json.

Bad input prints one line, `compress: error: ...`, and exits with code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compress", description="Post-training compression of causal LMs.")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe: calibrate, compress, evaluate, save")
    r.add_argument("recipe", help="recipe YAML file")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. passes.0.wanda.sparsity=0.6 (repeatable)")
    r.add_argument("--output", help="output folder (overrides the recipe's output)")
    r.add_argument("--run-dir", help="where progress is saved after every block (default: OUTPUT.run)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted run saved in RUN_DIR")
    r.add_argument("--json", action="store_true", help="also print the summary and evaluation as JSON on stdout")

    e = sub.add_parser("eval", help="perplexity of a model (and KL / top-1 against a reference), lm-eval task accuracy")
    e.add_argument("model", help="output folder, hub id, .gguf file or smollm2-135m")
    e.add_argument("--reference", help="model to compare against (KL divergence, top-1 agreement)")
    e.add_argument("--dataset", default="wikitext2", choices=["wikitext2", "c4", "ptb"])
    e.add_argument("--split", default="test", help="test | valid (wikitext2, ptb); validation (c4)")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--data-dir", default=None, help="local folder laid out like shared/data "
                   "(default: $COMPRESS_DATA_DIR, else the Hugging Face hub)")
    e.add_argument("--device", default=None)
    e.add_argument("--tasks", default=None, metavar="T1,T2,...",
                   help="lm-eval tasks, comma-separated (arc_easy,hellaswag,...; lastword_wikitext2 runs offline); "
                        "needs compress[tasks]")
    e.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (default: the task's)")
    e.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")

    x = sub.add_parser("export", help="write a compressed model in a serving format")
    x.add_argument("input", help="output folder of `compress run` (or any model spec)")
    x.add_argument("--format", required=True, choices=["hf", "compressed-tensors", "gguf"])
    x.add_argument("output", help="folder to write")
    x.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the dense tensors")
    x.add_argument("--fold", action="store_true",
                   help="store layers the format cannot express (ARMOR, GQSA...) as dense weights")
    x.add_argument("--sparse-format", default="dense", choices=["dense", "bitmask"],
                   help="compressed-tensors: zeros in place, or sparse-24-bitmask (2:4; compressed-tensors <= 0.14)")
    x.add_argument("--gguf-type", default="Q8_0",
                   choices=["F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])

    pl = sub.add_parser("plan", help="estimate a recipe's peak memory and run time before running it")
    pl.add_argument("recipe", help="recipe YAML file")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for run")
    pl.add_argument("--json", action="store_true", help="print the estimate as JSON")

    rp = sub.add_parser("report", help="print a finished run's summary again and redraw its plots")
    rp.add_argument("output", help="output folder of `compress run` (it holds report.json)")

    sub.add_parser("passes", help="list the passes with their arguments and defaults")
    return p


def cmd_run(args) -> int:
    from compress.pipeline import run_recipe
    from compress.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    report = run_recipe(recipe, output=args.output, run_dir=args.run_dir, resume=args.resume)
    if args.json:
        print(json.dumps({"summary": report["summary"], "eval": report["eval"]}, indent=2))
    if int(os.environ.get("RANK", "0")) == 0:   # under a launcher, the process that wrote the output
        from compress.summary import table

        print(table(report, args.output or recipe.output.dir), file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    """The table and the plots again, from report.json alone: a run's numbers can be
    looked at long after its log has scrolled away."""
    from compress.reporting import draw, read_report
    from compress.summary import table

    report = read_report(args.output)
    draw(args.output, report)
    print(table(report, args.output))
    return 0


def cmd_eval(args) -> int:
    from compress.loading import load_model
    from compress.pipeline import eval_windows_for, evaluate_model, task_text
    from compress.recipe import parse_recipe

    tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",")]
    raw = {"model": args.model, "passes": [{"magnitude": {}}],
           "eval": {"dataset": args.dataset, "split": args.split, "seqlen": args.seqlen,
                    "max_windows": args.max_windows, "batch_size": args.batch_size, "data_dir": args.data_dir,
                    "tasks": tasks, "num_fewshot": args.num_fewshot, "limit": args.limit}}
    cfg = parse_recipe(raw).eval  # validates the numbers (and the task names) like a recipe would
    text = task_text(cfg)         # the offline task's data: missing data fails before the model loads
    model, tokenizer = load_model(args.model)
    windows = eval_windows_for(cfg, tokenizer)
    result, reference = {}, None
    if args.reference:
        from compress.eval import ReferenceLogProbs

        ref_model, ref_tokenizer = load_model(args.reference)
        reference = ReferenceLogProbs()
        result["reference"] = evaluate_model(ref_model, windows, cfg, args.device, record=reference,
                                             desc="eval reference", tokenizer=ref_tokenizer or tokenizer, text=text)
        del ref_model
    try:
        result["model"] = evaluate_model(model, windows, cfg, args.device, reference=reference,
                                         tokenizer=tokenizer, text=text)
    finally:
        if reference is not None:
            reference.close()
    print(json.dumps(result, indent=2))
    return 0


def cmd_export(args) -> int:
    from compress.checkpoint import check_output_dir
    from compress.export import ExportConfig, export_folder

    cfg = ExportConfig(format=args.format, dtype=args.dtype, fold=args.fold, sparse_format=args.sparse_format,
                       gguf_type=args.gguf_type)
    cfg.validate()
    check_output_dir(args.output)
    out = export_folder(args.input, args.output, cfg)
    print(json.dumps(json.loads((out / "export.json").read_text()), indent=2))
    return 0


def cmd_plan(args) -> int:
    from compress.plan import plan, table
    from compress.recipe import load_recipe

    p = plan(load_recipe(args.recipe, args.set))
    print(json.dumps(p, indent=2) if args.json else table(p))
    return 0


def cmd_passes(args) -> int:
    from compress.passes import REGISTRY

    for name, (cls, fn) in sorted(REGISTRY.items()):
        doc = (sys.modules[fn.__module__].__doc__ or "").strip().split("\n\n")[0]
        print(f"{name}: {' '.join(doc.split())}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            means = f"   ({f.metadata['means']})" if "means" in f.metadata else ""
            print(f"    {f.name} = {default!r}{means}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from compress.errors import CompressError

    try:
        return {"run": cmd_run, "eval": cmd_eval, "export": cmd_export, "plan": cmd_plan,
                "passes": cmd_passes, "report": cmd_report}[args.command](args)
    except CompressError as e:
        print(f"compress: error: {' '.join(str(e).split())}", file=sys.stderr)   # always one line
        return 2
    except FloatingPointError as e:
        print(f"compress: numerical fault: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compress: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
