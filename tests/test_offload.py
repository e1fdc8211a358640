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
# Layer passes, then a block pass that trains against the dense block's outputs: the
# dense targets and the training must come out the same with the blocks on disk. (An
# offloaded run is always one sweep: only a model-level pass, refused offloaded, splits
# a run into several.)
PRUNE_RECONSTRUCT = [{"wanda": {"sparsity": 0.5}}, {"dsnot": {}},
                     {"perp": {"mode": "reconstruct", "train": ["masklora"], "steps": 2}}]


@pytest.mark.parametrize("passes", [SGPT_W4, [{"magnitude": {"sparsity": 0.5}}, {"quant": {"method": "rtn"}}],
                                    PRUNE_RECONSTRUCT], ids=["sparsegpt_w4", "magnitude_rtn", "prune_reconstruct"])
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
    # The packed modules' entries (none without a packing pass) are the same.
    packed_a, packed_b = (json.loads((tmp_path / d / "config.json").read_text()).get("compress") for d in "ab")
    assert packed_a == packed_b and (packed_b is None) == (passes is PRUNE_RECONSTRUCT)
    if passes is PRUNE_RECONSTRUCT:   # the block pass did train, on the same dense targets
        rows_a, rows_b = (json.loads((tmp_path / d / "report.json").read_text())["layers"] for d in "ab")
        assert len(rows_b) == 4 * 7
        assert [r["perp_loss"] for r in rows_b] == [r["perp_loss"] for r in rows_a]
        assert all(after < before for before, after in (r["perp_loss"] for r in rows_b))
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
    r = recipe(tmp_path, tiny4_dir, corpus, [{"wanda": {}}], offload=True)     # no --output, no output.dir
    assert err(r) == "compress: error: runner.offload: the compressed blocks are kept in a run folder; set output"
    assert not (tmp_path / "o").exists()
