"""The command line: recipes end to end on a tiny model, and bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import compress
from cli import main
from helpers import is_nm


@pytest.fixture
def tiny_dir(tmp_path, tiny_llama, tiny_tokenizer):
    d = tmp_path / "tiny"
    tiny_llama.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d



def write_recipe(tmp_path, **fields):
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(fields))
    return p


def run_cli(*args):
    return main(["-q", *map(str, args)])


def test_passes_lists_each_pass_with_defaults(capsys):
    assert run_cli("passes") == 0
    out = capsys.readouterr().out
    for name in ("magnitude:", "wanda:", "sparsegpt:", "blocksize = 128", "percdamp = 0.01"):
        assert name in out


def test_run_writes_loadable_checkpoint(tmp_path, tiny_dir, corpus, tiny_tokenizer, capsys):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, model=str(tiny_dir),
                          calib={"source": "text", "path": str(corpus), "nsamples": 8, "seqlen": 32},
                          passes=[{"wanda": {"sparsity": 0.5}}], output=str(tmp_path / "ignored"))
    assert run_cli("run", recipe, "--set", "passes.0.wanda.pattern=2:4", "--set", "passes.0.wanda.sparsity=null",
                   "--output", out) == 0
    assert not (tmp_path / "ignored").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["sparsity"] == 0.5 and len(report["layers"]) == 14
    assert report["passes"] == [{"wanda": {"targets": [".*"], "ignore": [], "sparsity": None,
                                           "pattern": "2:4", "scope": "row", "allocation": "uniform",
                                           "owl_m": 5.0, "owl_lambda": 0.08, "budget_spread": 0.2, "budget_weight": "influence",
                                           "survey_samples": 16}}]
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["passes"][0]["wanda"]["pattern"] == "2:4"  # the --set override, as run
    assert resolved["calib"]["seed"] == 0 and resolved["runner"]["batch_size"] == 8  # defaults filled in
    assert list(out.glob("*.safetensors")) and (out / "tokenizer_config.json").exists()
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert is_nm(plain.model.layers[1].mlp.down_proj.weight, 2, 4)
    model, tok = compress.load(out)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, plain.model.layers[0].self_attn.q_proj.weight)
    assert tok("pruned weights").input_ids == tiny_tokenizer("pruned weights").input_ids
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_run_with_eval_reports_ppl_kl_top1(tmp_path, tiny_dir, corpus, data_dir):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, model=str(tiny_dir),
                          calib={"source": "text", "path": str(corpus), "nsamples": 4, "seqlen": 32},
                          passes=[{"magnitude": {"sparsity": 0.5}}],
                          eval={"dataset": "wikitext2", "seqlen": 64, "max_windows": 3, "data_dir": str(data_dir)},
                          output=str(out))
    assert run_cli("run", recipe) == 0
    ev = json.loads((out / "report.json").read_text())["eval"]
    assert ev["dense"]["windows"] == 3 and ev["compressed"]["kl"] > 0 and 0 <= ev["compressed"]["top1"] < 1
    assert ev["compressed"]["ppl"] != ev["dense"]["ppl"]


def test_run_perp_recipe_keeps_2of4_and_plots_the_loss(tmp_path, tiny_dir, corpus):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, model=str(tiny_dir),
                          calib={"source": "text", "path": str(corpus), "nsamples": 4, "seqlen": 32},
                          passes=[{"wanda": {"pattern": "2:4"}},
                                  {"perp": {"train": ["norm", "scalelora"], "rank": 2, "steps": 4, "batch_size": 2}}],
                          output=str(out))
    assert run_cli("run", recipe) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["perp"]["steps"] == 4 and len(report["training"]["perp"]["loss_curve"]) == 4
    assert (out / "perp_loss.png").stat().st_size > 1000
    model, _ = compress.load(out)
    assert all(is_nm(m.weight, 2, 4) for b in model.model.layers for m in (b.self_attn.q_proj, b.mlp.down_proj))


def test_export_command_and_recipe_output_format(tmp_path, tiny_dir, corpus):
    src, ct = tmp_path / "src", tmp_path / "ct"
    recipe = write_recipe(tmp_path, model=str(tiny_dir),
                          calib={"source": "text", "path": str(corpus), "nsamples": 4, "seqlen": 32},
                          passes=[{"wanda": {"pattern": "2:4"}}, {"quant": {"bits": 4, "group_size": 32}}],
                          output=str(src))
    assert run_cli("run", recipe) == 0
    assert run_cli("export", src, "--format", "compressed-tensors", ct) == 0
    cfg = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and (ct / "export.json").exists() and (ct / "report.json").exists()
    assert run_cli("export", src, "--format", "gguf", "--gguf-type", "Q4_0", tmp_path / "g") == 2  # packed: needs --fold
    assert not (tmp_path / "g").exists()
    assert run_cli("export", src, "--format", "gguf", "--gguf-type", "Q4_0", "--fold", tmp_path / "g") == 0
    assert (tmp_path / "g" / "model.gguf").stat().st_size > 0
    recipe = write_recipe(tmp_path, model=str(tiny_dir),
                          calib={"source": "text", "path": str(corpus), "nsamples": 4, "seqlen": 32},
                          passes=[{"wanda": {"pattern": "2:4"}}],
                          output={"dir": str(tmp_path / "direct"), "format": "gguf", "gguf_type": "F16"})
    assert run_cli("run", recipe) == 0
    assert json.loads((tmp_path / "direct" / "export.json").read_text())["gguf_type"] == "F16"
    assert (tmp_path / "direct" / "report.json").exists()


BAD = [
    ({"passes": [{"prune": {}}]}, "unknown pass 'prune'; valid passes: armor, awq, dsnot, gqsa, magnitude, perp, quant, sparsegpt, wanda"),
    ({"passes": [{"wanda": {}}, {"perp": {"train": ["weights"]}}]}, "perp.train: expected a non-empty list of bias"),
    ({"passes": [{"wanda": {}}, {"perp": {"data": {"source": "c5"}}}]}, "perp.data.source: expected one of"),
    ({"passes": [{"wanda": {"sparsity": 1.5}}]}, "wanda.sparsity: expected a number in [0, 1)"),
    ({"passes": [{"wanda": {"pattern": "3:2"}}]}, "wanda.pattern: expected 'unstructured' or 'N:M'"),
    ({"passes": [{"wanda": {"bogus": 1}}]}, "wanda: unknown argument 'bogus'"),
    ({"modle": "x"}, "recipe: unknown key 'modle'"),
    ({"model": "/no/such/model"}, "model: folder '/no/such/model' does not exist"),
    ({"output": 123}, "output: expected a folder path or {dir: ..., dtype: ...}, got 123"),
    ({"output": {"dir": "x", "format": "onnx"}}, "output.format: expected one of hf, compressed-tensors, gguf"),
    ({"calib": {"source": "web"}}, "calib.source: expected one of"),
    ({"calib": {"nsamples": 0}}, "calib.nsamples: expected a positive integer"),
    ({"eval": {"max_windows": -1}}, "eval.max_windows: expected an integer >= 1"),
    ({"runner": {"batch_size": "big"}}, "runner.batch_size: expected an integer >= 1"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_recipe_is_one_line_exit_2(tmp_path, tiny_dir, corpus, capsys, change, message):
    raw = {"model": str(tiny_dir), "calib": {"source": "text", "path": str(corpus), "nsamples": 2, "seqlen": 16},
           "passes": [{"wanda": {}}], "output": str(tmp_path / "out")}
    raw.update(change)
    if "modle" in change:
        raw.pop("model")
    assert run_cli("run", write_recipe(tmp_path, **raw)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compress: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_targets_matching_nothing_refused_before_any_work(tmp_path, tiny_dir, corpus, capsys):
    """Checked once the model is loaded (its layers are needed), before calibration."""
    recipe = write_recipe(tmp_path, model=str(tiny_dir), passes=[{"wanda": {}}, {"quant": {"targets": ["nothing_here"]}}],
                          calib={"source": "text", "path": str(corpus)}, output=str(tmp_path / "out"))
    assert run_cli("run", recipe) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "compress: error: quant.targets: no linear layer of the decoder blocks matches ['nothing_here']"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()


def test_nm_indivisible_layer_named(tmp_path, corpus, tiny_tokenizer, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=66, intermediate_size=128, num_hidden_layers=1, num_attention_heads=3,
                      num_key_value_heads=3, vocab_size=len(tiny_tokenizer))
    d = tmp_path / "odd"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    recipe = write_recipe(tmp_path, model=str(d), passes=[{"sparsegpt": {"pattern": "2:4"}}],
                          calib={"source": "text", "path": str(corpus)}, output=str(tmp_path / "out"))
    assert run_cli("run", recipe) == 2
    assert "model.layers.0.self_attn.q_proj has input size 66, not a multiple of 4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_broken_yaml_and_missing_file(tmp_path, capsys):
    p = tmp_path / "broken.yaml"
    p.write_text("model: [unclosed\n")
    assert run_cli("run", p) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert run_cli("run", tmp_path / "nope.yaml") == 2
    assert "does not exist" in capsys.readouterr().err


def test_wikitext2_offline_without_folder_says_how(tmp_path, tiny_dir, corpus, monkeypatch, capsys):
    monkeypatch.delenv("COMPRESS_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    recipe = write_recipe(tmp_path, model=str(tiny_dir), passes=[{"wanda": {}}],
                          calib={"source": "text", "path": str(corpus)}, eval={"dataset": "wikitext2"},
                          output=str(tmp_path / "out"))
    assert run_cli("run", recipe) == 2
    err = capsys.readouterr().err
    assert "COMPRESS_DATA_DIR" in err and "data_dir" in err
    assert not (tmp_path / "out").exists()


def test_entry_point_exit_code(tmp_path):
    """The installed `compress` command (not just main()) exits with 2 on bad input."""
    p = tmp_path / "r.yaml"
    p.write_text("passes: []\n")
    res = subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "run", str(p)],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "model:" in res.stderr


def test_eval_command_against_itself(tiny_dir, data_dir, capsys):
    assert run_cli("eval", tiny_dir, "--reference", tiny_dir, "--seqlen", 32, "--max-windows", 2,
                   "--data-dir", data_dir) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"]["windows"] == 2 and res["model"]["ppl"] == pytest.approx(res["reference"]["ppl"])
    assert res["model"]["kl"] == pytest.approx(0, abs=1e-4) and res["model"]["top1"] == 1.0


def test_eval_command_bad_split(tiny_dir, data_dir, capsys):
    assert run_cli("eval", tiny_dir, "--split", "train", "--data-dir", data_dir) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("compress: error: eval.split: wikitext2 'train' is not in the data folder")


def test_unquoted_nm_pattern_is_a_pattern(tmp_path):
    """YAML 1.1 would read `2:4` as the base-60 integer 124."""
    from compress.recipe import load_recipe
    p = tmp_path / "r.yaml"
    p.write_text("model: m\npasses:\n  - wanda: {pattern: 2:4}\n  - sparsegpt: {percdamp: 1e-2, sparsity: .5}\n")
    r = load_recipe(str(p), ["passes.0.wanda.pattern=4:8"])
    assert r.passes == [{"wanda": {"pattern": "4:8"}}, {"sparsegpt": {"percdamp": 0.01, "sparsity": 0.5}}]


def test_output_path_that_is_a_file_is_refused_before_work(tmp_path, tiny_dir, corpus, capsys):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    recipe = write_recipe(tmp_path, model=str(tiny_dir), passes=[{"wanda": {}}],
                          calib={"source": "text", "path": str(corpus)}, output=str(target))
    assert run_cli("run", recipe) == 2
    assert "output.dir: " in capsys.readouterr().err and target.read_text() == "not a folder"


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    from compress.api import as_configs
    from compress.recipe import load_recipe

    recipe = load_recipe(str(path))
    names = [c.name for c in as_configs(recipe.passes)]
    assert names and names == [next(iter(p)) for p in recipe.raw["passes"]]
