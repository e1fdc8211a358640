"""`compress plan`: estimates from the config alone, before anything heavy."""
import json

import yaml

from cli import main
from compress.plan import BASE_MIB, plan
from compress.recipe import parse_recipe


def _recipe(model_dir, **runner):
    return parse_recipe({"model": str(model_dir), "passes": [{"sparsegpt": {"pattern": "2:4"}}],
                         "calib": {"source": "c4", "nsamples": 16, "seqlen": 64}, "runner": runner})


def test_plan_counts_by_hand(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "m")
    p = plan(_recipe(tmp_path / "m", compute_dtype="float32", device="cpu"))
    assert p["blocks"] == 2 and p["parameters"] == sum(t.numel() for t in tiny_llama.parameters())
    # hidden 64, intermediate 128: 16 x 64 tokens x 64 x 4 bytes of activations
    assert p["activations_mib"] == 16 * 64 * 64 * 4 / 2 ** 20
    # X^T X per input: q/k/v/o (64), gate/up (64), down (128)
    assert p["statistics_mib"] == (64 * 64 + 64 * 64 + 128 * 128) * 4 / 2 ** 20
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
