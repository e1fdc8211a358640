"""Bad input, property-based (hypothesis): a recipe broken in any one way (broken YAML,
an unknown key, a value of the wrong type or out of range) gives one line on stderr,
exit code 2, and writes nothing: no output folder, no run folder."""
from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli import main
from compress.recipe import yaml_load

BASE = {
    "model": "smollm2-135m",
    "dtype": "float32",
    "calib": {"source": "c4", "nsamples": 8, "seqlen": 64, "seed": 0},
    "passes": [{"wanda": {"sparsity": 0.5, "targets": [".*"]}}, {"quant": {"bits": 4, "group_size": 64}}],
    "runner": {"batch_size": 4, "true_sequential": False, "device": "cpu", "compute_dtype": "float32"},
    "eval": {"dataset": "wikitext2", "split": "test", "seqlen": 128, "max_windows": 2, "batch_size": 2,
             "compare": True},
    "output": {"dir": "OUT", "dtype": "float16", "format": "hf", "fold": False, "gguf_type": "Q8_0"},
}

junk = st.one_of(st.text(max_size=8), st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
not_int = st.one_of(st.text(max_size=8), st.floats(allow_nan=False).filter(lambda f: f != int(f) if f == f and
                                                                            abs(f) < 1e18 else True),
                    st.booleans(), st.lists(st.integers(), max_size=2))
not_bool = st.one_of(st.integers(), st.text(max_size=8), st.floats(), st.lists(st.booleans(), max_size=2))


def below(lo):
    return st.one_of(not_int, st.integers(max_value=lo - 1))


def not_in(*allowed):
    return st.one_of(st.text(max_size=10).filter(lambda s: s not in allowed), st.integers(), st.lists(st.text(), max_size=2))


# (path, strategy of values that field must refuse)
BAD_VALUES = [
    ("model", st.one_of(st.integers(), st.lists(st.text(), max_size=2), st.just(""), st.none())),
    ("dtype", not_in("float32", "float16", "bfloat16")),
    ("calib.source", not_in("c4", "wikitext2", "text", "jsonl", "self")),
    ("calib.field", st.one_of(st.integers(), st.just(""))), ("calib.split", st.one_of(st.integers(), st.lists(st.text()))),
    ("calib.nsamples", below(1)), ("calib.seqlen", below(1)), ("calib.seed", below(0)),
    ("passes", st.one_of(st.just([]), st.integers(), st.text(max_size=5), st.dictionaries(st.text(), st.integers()))),
    ("passes.0.wanda.sparsity", st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9),
                                          st.text(max_size=5), st.booleans(), st.lists(st.floats(), max_size=2))),
    ("passes.0.wanda.targets", st.one_of(st.text(max_size=5), st.integers(), st.lists(st.integers(), min_size=1),
                                         st.just(["("]), st.just(["[a-"]))),
    ("passes.0.wanda.pattern", st.one_of(st.sampled_from(["5:4", "0:4", "2:0", "a:b", "2-4", "4:2"]), st.integers(),
                                         st.lists(st.text(), max_size=2))),
    ("passes.0.wanda.scope", not_in("row", "layer")),
    ("passes.1.quant.bits", st.one_of(st.integers(max_value=1), st.integers(min_value=9), not_int)),
    ("passes.1.quant.group_size", st.one_of(st.integers(max_value=0), st.text(max_size=4), st.booleans())),
    ("runner.batch_size", below(1)), ("runner.true_sequential", not_bool),
    ("runner.device", st.one_of(st.sampled_from(["tpu", "gpu", "cuda:x", ""]), st.integers(), st.lists(st.text()))),
    ("runner.compute_dtype", not_in("float32", "float16", "bfloat16")),
    ("eval.dataset", not_in("wikitext2", "c4", "ptb")), ("eval.split", st.one_of(st.integers(), st.lists(st.text()))),
    ("eval.seqlen", below(2)), ("eval.max_windows", below(1).filter(lambda v: v is not None)),
    ("eval.data_dir", st.one_of(st.integers(), st.just(""), st.lists(st.text(), max_size=2))),
    ("eval.batch_size", below(1)), ("eval.compare", not_bool),
    ("eval.tasks", st.one_of(st.integers(), st.text(max_size=8), st.just([]), st.just([""]),
                             st.lists(st.integers(), min_size=1, max_size=2), st.just(["arc_easy,piqa"]),
                             st.just([" arc_easy"]))),
    ("eval.num_fewshot", below(0)), ("eval.limit", below(1)),
    ("output", st.one_of(st.integers(), st.lists(st.text(), max_size=2), st.booleans())),
    ("output.dir", st.one_of(st.integers(), st.lists(st.text(), max_size=2), st.booleans(), st.just(""))),
    ("output.dtype", not_in("float32", "float16", "bfloat16")),
    ("output.format", not_in("hf", "compressed-tensors", "gguf")),
    ("output.fold", not_bool), ("output.gguf_type", not_in("F16", "Q8_0", "Q4_0", "Q4_1")),
]
SECTIONS = ["", "calib", "runner", "eval", "output", "passes.0.wanda", "passes.1.quant"]
# names a section knows (an "unknown key" must be none of them)
ALL_KEYS = {"model", "dtype", "calib", "passes", "runner", "eval", "output", "source", "nsamples", "seqlen", "seed",
            "path", "field", "data_dir", "split", "batch_size", "true_sequential", "device", "compute_dtype",
            "dataset", "max_windows", "compare", "dir", "format", "fold", "sparse_format", "gguf_type", "sparsity",
            "pattern", "scope", "targets", "ignore", "bits", "group_size", "symmetric", "method", "act_order",
            "static_groups", "percdamp", "blocksize", "clip", "true_sequential", "mse", "damp", "hessian_fit",
            "n_grid", "clip_grid", "max_shrink", "clip_ignore", "tasks", "num_fewshot", "limit"}
# awq's fields, on BASE with an awq pass between wanda and quant (passes.1.awq)
AWQ_BAD_VALUES = [
    ("n_grid", below(1)), ("clip_grid", below(1)), ("clip", not_bool),
    ("max_shrink", st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-9), st.text(max_size=5), st.booleans())),
    ("bits", st.one_of(st.integers(max_value=1), st.integers(min_value=9), not_int)),
    ("group_size", st.one_of(st.integers(max_value=0), st.text(max_size=4).filter(lambda s: s != "channel"),
                             st.booleans())),
    ("clip_ignore", st.one_of(st.text(max_size=5), st.integers(), st.just(["("]))),
]


def _get(d, path):
    for k in path:
        d = d[int(k)] if isinstance(d, list) else d[k]
    return d


def with_value(path: str, value):
    r = copy.deepcopy(BASE)
    *head, last = path.split(".")
    _get(r, head)[last] = value
    return yaml.safe_dump(r)


def with_unknown_key(section: str, key: str, value):
    r = copy.deepcopy(BASE)
    target = _get(r, section.split(".")) if section else r
    target[key] = value
    return yaml.safe_dump(r)


def with_awq(args: dict):
    """BASE with an awq pass of `args` before quant."""
    r = copy.deepcopy(BASE)
    r["passes"].insert(1, {"awq": args})
    return yaml.safe_dump(r)


def unknown_pass(name: str):
    r = copy.deepcopy(BASE)
    r["passes"].append({name: {}})
    return yaml.safe_dump(r)


def broken_yaml(cut: int, junk_text: str):
    text = yaml.safe_dump(BASE)
    return text[:cut] + junk_text + text[cut:]


def unparsable(text: str) -> bool:
    """An insertion can land inside a string and leave a valid recipe: keep only real breaks."""
    try:
        yaml_load(text)
    except yaml.YAMLError:
        return True
    return False


identifier = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
bad_recipes = st.one_of(
    st.sampled_from(BAD_VALUES).flatmap(lambda pv: pv[1].map(lambda v: with_value(pv[0], v))),
    st.builds(with_unknown_key, st.sampled_from(SECTIONS), identifier.filter(lambda k: k not in ALL_KEYS),
              st.integers()),
    identifier.filter(lambda n: n not in {"magnitude", "wanda", "sparsegpt", "quant", "dsnot", "armor", "gqsa",
                                          "perp", "awq"}).map(unknown_pass),
    st.sampled_from(AWQ_BAD_VALUES).flatmap(lambda kv: kv[1].map(lambda v: with_awq({kv[0]: v}))),
    identifier.filter(lambda k: k not in ALL_KEYS).map(lambda k: with_awq({k: 1})),
    st.just(None).map(lambda _: yaml.safe_dump({**BASE, "passes": [{"awq": {}}]})),   # no quant after awq
    st.builds(broken_yaml, st.integers(0, 400),
              st.sampled_from([": [", "\t- {", "]]", "&a *b", "'", ": : :", "{x"])).filter(unparsable),
    st.text(max_size=40),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_recipes)
def test_malformed_recipe_one_line_exit_2_nothing_written(text):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "recipe.yaml").write_text(text.replace("OUT", str(d / "out")))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["-q", "run", str(d / "recipe.yaml")])
        lines = err.getvalue().strip().splitlines()
        assert code == 2, err.getvalue()
        assert len(lines) == 1 and lines[0].startswith("compress: error: "), lines
        assert sorted(p.name for p in d.iterdir()) == ["recipe.yaml"]     # no output, no run folder


def test_pickled_checkpoint_is_refused(tmp_path, tiny_llama, tiny_tokenizer, capsys):
    """Weights load from safetensors only: a folder with just pytorch_model.bin is a one-line error."""
    import torch
    d = tmp_path / "pickled"
    tiny_llama.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    torch.save(tiny_llama.state_dict(), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(d), "passes": [{"magnitude": {}}], "output": str(tmp_path / "o")}))
    capsys.readouterr()
    assert main(["-q", "run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"compress: error: model: cannot load {str(d)!r}")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.run").exists()
