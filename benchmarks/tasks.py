"""Task accuracy beside perplexity (issue 24): SmolLM2-135M dense, SparseGPT 50 %,
SparseGPT 2:4, GPTQ W4 g64 and SparseGPT 2:4 + GPTQ W4 g64, each judged by WikiText-2
perplexity and by the offline last-word task of compress/tasks.py (`lastword_wikitext2`,
LAMBADA-style: greedy prediction of a paragraph's last word, run through
lm-evaluation-harness on the model object with the row's weights).

Protocol (as benchmarks/prune.py): calibration 128 x 512 tokens from the C4 train sample,
seed 0, the same ids for every row; WikiText-2 test, seqlen 512, first 64 windows; the
last-word task on its first --task-limit examples (all 1402 take ~5 min per row here).

    python benchmarks/tasks.py --data-dir ../shared/data [--task-limit 400] [--rows dense,gptq4,...]
                               [--work DIR] [--markdown FILE] [--reuse]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quant  # noqa: E402  (the rows' passes, as the quantization table runs them)
import rows  # noqa: E402  (the shared harness)

NAME = "tasks"
ROWS = {
    "dense": quant.ROWS["dense"],
    "sgpt50": ("SparseGPT 50 %", [{"sparsegpt": {"sparsity": 0.5}}]),
    "sgpt24": quant.ROWS["sgpt24"],
    "gptq4": quant.ROWS["gptq4"],
    "sgpt24_gptq4": quant.ROWS["sgpt24_gptq4"],
}
ARGS = [("--task-limit", {"type": int, "default": 400, "help": "last-word examples per row (default 400)"})]
EXTRA = [("last-word acc", "lastword_acc", ".4f"), ("± stderr", "lastword_acc_stderr", ".4f"),
         ("last-word ppl", "lastword_ppl", ".2f"), ("examples", "lastword_n", "d")]
NOTE = ("Last-word accuracy: the share of paragraphs whose last word the model predicts greedily, token for "
        "token (lambada's is_greedy), after the paragraph's preceding sentences; ± is lm-eval's standard error. "
        "Last-word ppl: exp of the mean negative log-likelihood of the target word.")
TARGETS = [
    ("accuracy falls with perplexity's ordering of the compressed rows", ["sgpt50", "sgpt24", "gptq4"],
     lambda r: r["gptq4"]["lastword_acc"] >= r["sgpt50"]["lastword_acc"] >= r["sgpt24"]["lastword_acc"]),
]


def EVAL(model, a) -> dict:
    """The last-word task on the model as it stands (the row's weights swapped in)."""
    from calib import load_text
    from compress.tasks import OFFLINE_TASK, evaluate_tasks

    text = load_text("wikitext2", "test", None)
    s = evaluate_tasks(model, a.tokenizer, [OFFLINE_TASK], text=text, limit=a.task_limit, batch_size=8)[OFFLINE_TASK]
    print(f"{OFFLINE_TASK}: acc {s['acc']:.4f} ± {s['acc_stderr']:.4f}, ppl {s['perplexity']:.2f}, n {s['n']}",
          flush=True)
    return {"lastword_acc": s["acc"], "lastword_acc_stderr": s["acc_stderr"], "lastword_ppl": s["perplexity"],
            "lastword_n": s["n"]}


if __name__ == "__main__":
    rows.main(sys.modules[__name__])
