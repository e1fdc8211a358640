"""Offloaded runs (runner.offload): the blocks stay on disk, one is in memory at a time,
and the output equals that of an ordinary run."""
import json

import pytest
import torch
import yaml
from safetensors import safe_open

import compress
from cli import main
from compress.offload import LazyBlocks
from compress.resume import RunState




def recipe(tmp_path, model, corpus, passes, **runner) -> str:
    p = tmp_path / f"recipe{len(runner)}.yaml"
    p.write_text(yaml.safe_dump({"model": str(model), "passes": passes, "runner": runner,
                                 "calib": {"source": "text", "path": str(corpus), "nsamples": 8, "seqlen": 32}}))
    return str(p)


def tensors(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


SGPT_W4 = [{"sparsegpt": {"pattern": "2:4"}}, {"quant": {"bits": 4, "group_size": 32}}]
TWO_SWEEPS = [{"wanda": {"sparsity": 0.5}}, {"perp": {"mode": "reconstruct", "steps": 2}},
              {"dsnot": {"sparsity": 0.5}}]


@pytest.mark.parametrize("passes", [SGPT_W4, [{"magnitude": {"sparsity": 0.5}}, {"quant": {"method": "rtn"}}]])
def test_offloaded_run_equals_ordinary_run(tmp_path, tiny4_dir, corpus, monkeypatch, passes):
    assert main(["-q", "run", recipe(tmp_path, tiny4_dir, corpus, passes), "--output", str(tmp_path / "a")]) == 0
    real_load, most = LazyBlocks.load, [0]

    def load(self, i):   # at most one block is materialized at any time
        real_load(self, i)
        live = [j for j, b in enumerate(self.blocks) if not any(t.is_meta for t in b.state_dict().values())]
        most[0] = max(most[0], len(live))
        assert live == [i]
    monkeypatch.setattr(LazyBlocks, "load", load)
    assert main(["-q", "run", recipe(tmp_path, tiny4_dir, corpus, passes, offload=True),
                 "--output", str(tmp_path / "b")]) == 0
    assert most[0] == 1
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "b").glob("model-*.safetensors"))) == 5          # the rest, then one per block
    assert json.loads((tmp_path / "b" / "config.json").read_text())["compress"]["modules"] == \
        json.loads((tmp_path / "a" / "config.json").read_text())["compress"]["modules"]
    model, _ = compress.load(str(tmp_path / "b"))
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_offloaded_run_resumes(tmp_path, tiny4_dir, corpus, monkeypatch):
    r = recipe(tmp_path, tiny4_dir, corpus, SGPT_W4, offload=True)
    assert main(["-q", "run", r, "--output", str(tmp_path / "whole")]) == 0
    real, count = RunState.block_done, [0]

    class Killed(Exception):
        pass

    def block_done(self, *args, **kwargs):
        real(self, *args, **kwargs)
        count[0] += 1
        if count[0] == 2:
            raise Killed
    with monkeypatch.context() as m:
        m.setattr(RunState, "block_done", block_done)
        with pytest.raises(Killed):
            main(["-q", "run", r, "--output", str(tmp_path / "cut")])
    assert main(["-q", "run", r, "--output", str(tmp_path / "cut"), "--resume", str(tmp_path / "cut.run")]) == 0
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_offload_refuses_what_needs_the_whole_model(tmp_path, tiny4_dir, corpus, capsys):
    def err(path, *extra):
        assert main(["-q", "run", path, *extra]) == 2
        return capsys.readouterr().err.strip()
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"model": str(tiny4_dir), "passes": [{"wanda": {}}], "runner": {"offload": True},
                                 "eval": {"dataset": "wikitext2"}, "output": str(tmp_path / "o")}))
    assert "runner.offload: eval needs the whole model" in err(str(p))
    r = recipe(tmp_path, tiny4_dir, corpus, [{"wanda": {"pattern": "2:4"}}, {"perp": {"steps": 1}}], offload=True)
    assert "perp trains the whole model" in err(r, "--output", str(tmp_path / "o"))
    r = recipe(tmp_path, tiny4_dir, corpus, [{"wanda": {}}], offload=True)
    assert "keeps" in err(r) or "run folder" in err(r)
    assert not (tmp_path / "o").exists()
