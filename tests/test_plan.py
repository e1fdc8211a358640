"""`compress plan`: estimates from the config alone, before anything heavy."""
import json

import yaml

from cli import main
from compress.plan import BASE_MIB, plan
from compress.recipe import parse_recipe


def _recipe(model_dir, **runner):
    return parse_recipe({"model": str(model_dir), "passes": [{"sparsegpt": {"pattern": "2:4"}}],
                         "calib": {"source": "c4", "nsamples": 16, "seqlen": 64}, "runner": runner})


def test_plan_counts_what_a_real_run_holds(tmp_path, tiny_llama, monkeypatch):
    import copy

    import torch

    import compress
    from compress.models import block_linears, find_blocks, get_weight
    from compress.stats import InputStats

    tiny_llama.save_pretrained(tmp_path / "m")
    p = plan(_recipe(tmp_path / "m", compute_dtype="float32", device="cpu"))
    assert p["blocks"] == 2 and p["parameters"] == sum(t.numel() for t in tiny_llama.parameters())
    # hidden 64: 16 x 64 tokens x 64 x 4 bytes of activations
    assert p["activations_mib"] == 16 * 64 * 64 * 4 / 2 ** 20
    # Statistics: the bytes of the InputStats objects a real run of the recipe makes.
    made = []
    init = InputStats.__init__
    monkeypatch.setattr(InputStats, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    compress.run(copy.deepcopy(tiny_llama), [compress.SparseGPT(pattern="2:4")], calib=torch.randint(3, 300, (2, 16)),
                 compute_dtype="float32")
    nbytes = sum(t.numel() * t.element_size() for s in made for t in (s.sum, s.sumsq, s.xtx))
    assert len(made) == 2 * 4   # q/k/v, o, gate/up, down in each block
    assert p["statistics_mib"] == nbytes / 2 / 2 ** 20
    # The block: fp32 masters and two fp32 working copies of each linear (fp32 forwards:
    # no second copy of the block)
    lin = sum(get_weight(m).numel() for m in block_linears(find_blocks(tiny_llama)[1][0]).values())
    assert p["block_mib"] == lin * 12 / 2 ** 20
    assert p["host_mib"] > BASE_MIB and p["device_mib"] == 0 and p["seconds"] > 0


def test_offload_lowers_the_host_estimate(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "m")
    whole = plan(_recipe(tmp_path / "m", device="cpu"))["host_mib"]
    block = sum(t.numel() for t in tiny_llama.model.layers[0].parameters()) * 4 / 2 ** 20
    assert abs(whole - plan(_recipe(tmp_path / "m", device="cpu", offload=True))["host_mib"] - block) < 1e-6


def test_cli_plan(tmp_path, tiny_llama, capsys):
    tiny_llama.save_pretrained(tmp_path / "m")
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"model": str(tmp_path / "m"), "passes": [{"wanda": {}}]}))
    assert main(["-q", "plan", str(r)]) == 0
    assert "peak host memory" in capsys.readouterr().out
    assert main(["-q", "plan", str(r), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blocks"] == 2
    assert main(["-q", "plan", str(r), "--set", "runner.batch_size=0"]) == 2
    assert not (tmp_path / "out").exists()
