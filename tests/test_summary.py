"""The end of a run: the summary table on stderr (every number in it is report.json's),
`--json` for scripts, layers.png and eval.png beside the report, and `compress report
OUT_DIR`, which shows both again for a finished run."""
import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
import yaml

from cli import main
from compress.plots import error_grid, plot_eval, split_name
from compress.summary import table

PNG = b"\x89PNG\r\n\x1a\n"
TEXT = " ".join(f"Sentence number {i} talks about pruning and the weights of models." for i in range(600))


def run_cli(*args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the command line, in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["-q", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_tokenizer):
    """One real run on a tiny 4-block Llama (Wanda 50 % then GPTQ W4 g32, evaluated on a
    local text laid out like shared/data): (output folder, exit code, stdout, stderr)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("summary")
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(root / "tiny4")
    tiny_tokenizer.save_pretrained(root / "tiny4")
    (root / "data" / "wikitext-2-raw").mkdir(parents=True)
    (root / "data" / "wikitext-2-raw" / "wiki.test.raw").write_text(TEXT)
    (root / "corpus.txt").write_text(TEXT)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(root / "tiny4"), "calib": {"source": "text", "path": str(root / "corpus.txt"), "nsamples": 4,
                                                "seqlen": 32},
        "passes": [{"wanda": {"sparsity": 0.5}}, {"quant": {"bits": 4, "group_size": 32}}],
        "eval": {"dataset": "wikitext2", "seqlen": 32, "max_windows": 3, "data_dir": str(root / "data")},
        "output": str(root / "out")}))
    return (root / "out", *run_cli("run", recipe, "--json"))


def the_table(stderr: str) -> str:
    """The summary at the end of stderr (progress bars come before it)."""
    return stderr[stderr.rindex("compress: "):].rstrip("\n")


def rows(text: str) -> dict[str, list[str]]:
    """{label: cells} of a table: columns are split by two or more spaces."""
    out = {}
    for line in text.splitlines()[1:]:
        if line.strip():
            label, *cells = re.split(r"\s{2,}", line)
            out[label] = cells
    return out


def same(text: str, value) -> None:
    """`text` is `value` written with as many decimals as `text` has."""
    decimals = len(text.partition(".")[2])
    assert abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-12, (text, value)


def check_weight_rows(r: dict, s: dict) -> None:
    targeted, whole = re.fullmatch(r"(\S+) of the targeted layers, (\S+) of all decoder weights", r["sparsity"][0]).groups()
    same(targeted, s["targeted_sparsity"])
    same(whole, s["sparsity"])
    bits, = re.fullmatch(r"(\S+) in the targeted layers \(a plain weight counts 16\)", r["bits per weight"][0]).groups()
    same(bits, s["bits_per_weight"])
    have, dense, ratio = re.fullmatch(r"(\S+) MiB of weight files \(dense in 16 bits: (\S+) MiB, (\S+)x\)",
                                      r["size on disk"][0]).groups()
    same(have, s["output_bytes"] / 2**20)
    same(dense, s["dense_bytes"] / 2**20)
    same(ratio, s["output_bytes"] / s["dense_bytes"])


def test_every_number_in_the_table_is_the_reports(finished):
    out, rc, _, stderr = finished
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    s, ev = report["summary"], report["eval"]
    r = rows(the_table(stderr))
    assert r.pop("") == ["dense", "compressed"]
    for label, key in (("perplexity", "ppl"), ("KL to dense", "kl"), ("top-1 agreement", "top1")):
        dense, compressed = r.pop(label)
        if key == "ppl":
            same(dense, ev["dense"]["ppl"])
        else:   # dense against itself: no KL, no top-1
            assert dense == "-" and key not in ev["dense"]
        same(compressed, ev["compressed"][key])
    check_weight_rows(r, s)
    for label in ("sparsity", "bits per weight", "size on disk"):
        r.pop(label)
    stages = {"load": "load (s)", "calibration": "calibration (s)", "eval_dense": "eval dense (s)",
              "compression": "compression (s)", "eval_compressed": "eval compressed (s)", "save": "save (s)"}
    assert set(s["stage_seconds"]) == set(stages)
    for key, label in stages.items():
        same(r.pop(label)[0], s["stage_seconds"][key])
    same(r.pop("total (s)")[0].removesuffix(" before saving"), s["total_seconds"])
    same(r.pop("peak memory")[0].removesuffix(" MiB resident"), s["peak_rss_mib"])
    assert r.pop("output") == [str(out.resolve())] and r.pop("report") == [str(out.resolve() / "report.json")]
    assert r.pop("plots") == [", ".join(sorted(p.name for p in out.glob("*.png")))]
    assert r == {}   # no row left unchecked


def test_what_the_run_recorded_for_the_table(finished):
    """The numbers the table reads are in report.json: the dense model priced in 16
    bits, the weight files' size, bits per weight of the W4 g32 layers (4 bits of code
    plus a 16-bit scale and a 4-bit zero point per 32 weights: about 4.6, and under 16)."""
    out, *_ = finished
    s = json.loads((out / "report.json").read_text())["summary"]
    assert s["dense_bytes"] == 2 * s["dense_parameters"] and s["dense_parameters"] > 0
    assert s["output_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert 4 < s["bits_per_weight"] < 6
    assert all(v >= 0 for v in s["stage_seconds"].values())


def test_json_prints_parseable_json_on_stdout(finished):
    out, _, stdout, _ = finished
    dump = json.loads(stdout)
    report = json.loads((out / "report.json").read_text())
    assert dump == {"summary": report["summary"], "eval": report["eval"]}


def test_without_json_stdout_is_empty(finished, tmp_path):
    out, *_ = finished
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    recipe["eval"] = None
    recipe["passes"] = [{"magnitude": {"sparsity": 0.5}}]   # no XᵀX: no output error to draw, a heat map saying so
    recipe["output"] = str(tmp_path / "out")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    rc, stdout, stderr = run_cli("run", tmp_path / "r.yaml")
    assert rc == 0 and stdout == ""
    r = rows(the_table(stderr))
    assert r["evaluation"] == ["none (the recipe has no eval section)"] and "eval dense (s)" not in r
    assert not (tmp_path / "out" / "eval.png").exists() and (tmp_path / "out" / "layers.png").exists()


def valid_png(path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0.01   # something is drawn
    return img


def test_layers_and_eval_pngs_are_written(finished):
    out, *_ = finished
    for name in ("layers.png", "eval.png", "sparsity.png"):
        valid_png(out / name)


def test_report_command_reprints_and_redraws(finished):
    out, _, _, stderr = finished
    for name in ("layers.png", "eval.png"):
        (out / name).unlink()
    rc, stdout, _ = run_cli("report", out)
    assert rc == 0
    assert stdout.rstrip("\n") == the_table(stderr)
    for name in ("layers.png", "eval.png"):
        valid_png(out / name)


@pytest.mark.parametrize("make, says", [
    (lambda d: d / "missing", "is not a folder"),
    (lambda d: d, "no report.json"),
    (lambda d: (d / "report.json").write_text("{not json") and d, "not readable JSON"),
    (lambda d: (d / "report.json").write_text("[1, 2]") and d, "no summary section"),
])
def test_report_of_a_bad_folder_is_one_line_exit_2(tmp_path, make, says):
    rc, stdout, stderr = run_cli("report", make(tmp_path))
    assert rc == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("compress: error: report: ") and says in stderr


def task_report(report: dict) -> dict:
    """The report with lm-eval task scores as compress.tasks writes them."""
    report = json.loads(json.dumps(report))
    scores = {"dense": (0.5, 0.1667, 0.61), "compressed": (0.4, 0.1633, 0.58)}
    for side, (acc, se, arc) in scores.items():
        report["eval"][side]["tasks"] = {
            "lastword_wikitext2": {"acc": acc, "acc_stderr": se, "n": 10},
            "arc_easy": {"acc": arc, "acc_stderr": 0.01, "acc_norm": arc - 0.06, "acc_norm_stderr": 0.011, "n": 2376}}
    return report


def test_task_scores_are_rows_with_their_stderr(finished, tmp_path):
    out, *_ = finished
    report = task_report(json.loads((out / "report.json").read_text()))
    r = rows(table(report, str(out)))
    for task, metric, n in (("lastword_wikitext2", "acc", 10), ("arc_easy", "acc", 2376), ("arc_easy", "acc_norm", 2376)):
        cells = r.pop(f"{task}/{metric} [n={n}]")
        for side, cell in zip(("dense", "compressed"), cells):
            v, se = cell.split(" ± ")
            same(v, report["eval"][side]["tasks"][task][metric])
            same(se, report["eval"][side]["tasks"][task][f"{metric}_stderr"])
    assert not [label for label in r if "/" in label]
    plot_eval(report, tmp_path / "eval.png")
    valid_png(tmp_path / "eval.png")


def test_experts_fold_into_one_column_per_projection():
    rows_ = [{"layer": f"model.layers.{b}.mlp.experts.{e}.down_proj", "rel_error": 0.1 * e, "sparsity": 0.5,
              "shape": [8, 8]} for b in range(2) for e in range(4)]
    rows_ += [{"layer": "model.layers.1.self_attn.q_proj", "rel_error": 0.3, "sparsity": 0.5, "shape": [8, 8]},
              {"layer": "model.layers.1.self_attn.q_proj", "rel_error": 0.2, "sparsity": 0.5, "shape": [8, 8]}]
    assert split_name("model.layers.3.mlp.experts.5.down_proj") == (3, "mlp.experts.*.down_proj")
    blocks, projs, grid = error_grid(rows_)
    assert blocks == [0, 1] and projs == ["mlp.experts.*.down_proj", "self_attn.q_proj"]
    assert grid[0][0] == pytest.approx(0.15) and np.isnan(grid[0][1])
    assert grid[1][1] == 0.2   # a layer's last row is its final state
