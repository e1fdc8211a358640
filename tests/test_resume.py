"""Resume after a crash, and determinism: a run cut off after any block and resumed
writes the same bytes as a run that was never interrupted."""
import hashlib
import json

import pytest
import yaml

from cli import main
from compress.resume import RunState


class Killed(Exception):
    """Stands in for SIGKILL: raised right after the k-th block was saved."""




def recipe(tmp_path, model, corpus, passes) -> str:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump({"model": str(model), "passes": passes,
                                 "calib": {"source": "text", "path": str(corpus), "nsamples": 8, "seqlen": 32}}))
    return str(p)


def digest(out) -> str:
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def layers(out) -> list:
    rows = json.loads((out / "report.json").read_text())["layers"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def kill_after(monkeypatch, n: int) -> None:
    """Let n blocks be saved (over all sweeps), then 'die'."""
    real, count = RunState.block_done, [0]

    def block_done(self, *args, **kwargs):
        real(self, *args, **kwargs)
        count[0] += 1
        if count[0] == n:
            raise Killed
    monkeypatch.setattr(RunState, "block_done", block_done)


SGPT_W4 = [{"sparsegpt": {"pattern": "2:4"}}, {"quant": {"bits": 4, "group_size": 32}}]
WITH_PERP = [{"wanda": {"pattern": "2:4"}},
             {"perp": {"train": ["norm", "masklora"], "rank": 2, "steps": 3, "batch_size": 2, "lr": 1e-3,
                       "data": {"nsamples": 12, "seqlen": 32}}},
             {"quant": {"method": "rtn", "bits": 4, "group_size": 32}}]


def test_same_recipe_same_bytes(tmp_path, tiny4_dir, corpus):
    r = recipe(tmp_path, tiny4_dir, corpus, SGPT_W4)
    assert main(["-q", "run", r, "--output", str(tmp_path / "a")]) == 0
    assert main(["-q", "run", r, "--output", str(tmp_path / "b")]) == 0
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["device"] == "cpu" and report["calibration"]["seed"] == 0 and len(report["recipe_sha256"]) == 64
    assert set(report["versions"]) >= {"torch", "transformers", "python"}
    assert not (tmp_path / "a.run").exists()                           # removed once the output is written


@pytest.mark.parametrize("passes,kill_at", [(SGPT_W4, 1), (SGPT_W4, 3), (SGPT_W4, 4),
                                            (WITH_PERP, 2), (WITH_PERP, 4), (WITH_PERP, 6)])
def test_resume_after_a_kill_gives_the_same_bytes(tmp_path, tiny4_dir, corpus, monkeypatch, passes, kill_at):
    r = recipe(tmp_path, tiny4_dir, corpus, passes)
    assert main(["-q", "run", r, "--output", str(tmp_path / "whole")]) == 0

    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        kill_after(m, kill_at)
        with pytest.raises(Killed):
            main(["-q", "run", r, "--output", str(out)])
    assert not out.exists() and (tmp_path / "cut.run" / "run.json").is_file()
    progress = json.loads((tmp_path / "cut.run" / "run.json").read_text())
    assert sum(progress["blocks_done"].get(str(s), -1) + 1 for s in (0, 2)) == kill_at   # 4 blocks per sweep
    assert main(["-q", "run", r, "--output", str(out), "--resume", str(tmp_path / "cut.run")]) == 0
    assert digest(out) == digest(tmp_path / "whole")
    assert layers(out) == layers(tmp_path / "whole")


def test_resume_refuses_another_recipe_or_no_run(tmp_path, tiny4_dir, corpus, monkeypatch, capsys):
    r = recipe(tmp_path, tiny4_dir, corpus, SGPT_W4)
    with monkeypatch.context() as m:
        kill_after(m, 2)
        with pytest.raises(Killed):
            main(["-q", "run", r, "--output", str(tmp_path / "out")])
    other = recipe(tmp_path, tiny4_dir, corpus, [{"wanda": {"sparsity": 0.5}}])
    assert main(["-q", "run", other, "--output", str(tmp_path / "out"), "--resume", str(tmp_path / "out.run")]) == 2
    assert "written by a different recipe" in capsys.readouterr().err
    assert main(["-q", "run", r, "--output", str(tmp_path / "out"), "--resume", str(tmp_path / "nowhere")]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_dir_must_be_new_empty_or_a_run(tmp_path, tiny4_dir, corpus, capsys):
    r = recipe(tmp_path, tiny4_dir, corpus, SGPT_W4)
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(["-q", "run", r, "--output", str(tmp_path / "out"), "--run-dir", str(keep)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where,expect", [("model.layers.2.post_attention_layernorm", "input of model.layers.2.mlp.gate_proj"),  # not a linear
                                          ("model.layers.2.mlp.up_proj", "model.layers.2.mlp.up_proj: non-finite"),
                                          ("model.layers.1.self_attn.o_proj", "model.layers.1.self_attn.o_proj: non-finite weights")])
def test_nan_stops_the_run_naming_the_layer(tmp_path, tiny4_dir, corpus, capsys, where, expect):
    """A NaN weight (or the activations it poisons) stops the run with the layer's name, exit 1."""
    from safetensors.torch import load_file, save_file
    f = tiny4_dir / "model.safetensors"
    state = load_file(str(f))
    state[f"{where}.weight"].view(-1)[0] = float("nan")
    save_file(state, str(f), metadata={"format": "pt"})
    r = recipe(tmp_path, tiny4_dir, corpus, SGPT_W4)
    capsys.readouterr()
    assert main(["-q", "run", r, "--output", str(tmp_path / "out")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]            # after the progress bars
    assert last.startswith("compress: numerical fault: ") and expect in last, last
    assert not (tmp_path / "out").exists()
