"""Non-uniform sparsity (compress.allocation, compress.survey): OWL's outlier ratios and
block sparsities by hand, the budget's optimum against brute force, the mean sparsity
held at the target, end-to-end runs and the refusals."""
import itertools
import json

import pytest
import torch

import compress
from archs import ids, tiny
from compress import allocation
from compress.errors import CompressError
from compress.passes.sparsity import SparsityConfig
from compress.passes.wanda import WandaConfig


def test_outlier_count_by_hand():
    # one block of two layers: 16 scores
    a = torch.ones(2, 5)                       # ten 1s
    b = torch.tensor([[1.0, 1.0, 30.0], [30.0, 30.0, 1.0]])   # three 1s, three 30s
    # mean = (13 + 90) / 16 = 6.4375; M = 2 -> threshold 12.875: the three 30s
    assert allocation.outlier_count([a, b], 2.0) == (3, 16)
    # M = 5 -> threshold 32.19: none
    assert allocation.outlier_count([a, b], 5.0) == (0, 16)


def test_owl_three_blocks_by_hand():
    # D = 1 %, 2 %, 3 %; lambda 0.08: d = 0, 0.08, 0.16, mean 0.08 -> 0.78, 0.70, 0.62
    s = allocation.owl([0.01, 0.02, 0.03], [100, 100, 100], 0.7, 0.08)
    assert s == pytest.approx([0.78, 0.70, 0.62], abs=1e-12)
    # blocks of different sizes: the size-weighted mean stays at the target exactly
    n = [100, 300, 600]
    s = allocation.owl([0.05, 0.01, 0.03], n, 0.6, 0.1)
    assert sum(v * k for v, k in zip(s, n)) / sum(n) == pytest.approx(0.6, abs=1e-12)
    assert s[0] < s[2] < s[1]                  # more outliers, fewer pruned
    assert allocation.owl([0.02] * 3, n, 0.6, 0.1) == pytest.approx([0.6] * 3)   # no spread: uniform


def test_owl_lambda_out_of_range_is_refused():
    with pytest.raises(CompressError, match="owl_lambda"):
        allocation.owl([0.0, 1.0], [1, 1], 0.9, 0.2)


def test_error_curve_by_hand():
    score = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 1.0, 1.0, 2.0]])
    E, P, total = allocation.error_curve(score, torch.tensor([0.0, 0.25, 0.5, 1.0]), "row")
    # per row the smallest k squares: k = 0, 1, 2, 4
    assert E.tolist() == [0, 1 + 1, (1 + 4) + (1 + 1), 30 + 22] and P.tolist() == [0, 2, 4, 8] and total == 52
    E, P, _ = allocation.error_curve(score, torch.tensor([0.25, 0.5]), "layer")
    assert E.tolist() == [1 + 1, 1 + 1 + 1 + 4] and P.tolist() == [2, 4]


def test_budget_is_the_brute_force_optimum():
    torch.manual_seed(0)
    K, L = 6, 3
    grid = torch.linspace(0.3, 0.8, K)
    sizes = [100, 100, 100]
    curves, pruned = [], []
    for _ in range(L):   # convex, increasing curves with random curvature
        c = torch.rand(1) * 5 + 0.5
        curves.append((c * (grid - 0.3) ** 2 + torch.rand(1) * (grid - 0.3)).double())
        pruned.append(grid.double() * 100)
    target = float(grid[1] + grid[3] + grid[4]) / 3            # reachable on grid points
    s = allocation.budget(curves, pruned, sizes, target, 0.3, 0.8)
    best = min((sum(float(curves[l][k[l]]) for l in range(L)), k) for k in itertools.product(range(K), repeat=L)
               if abs(sum(float(grid[i]) for i in k) / L - target) < 1e-6)
    # the greedy's sparsities land on the optimal grid points
    assert [round(v, 6) for v in s] == [round(float(grid[k]), 6) for k in best[1]]
    assert sum(v * n for v, n in zip(s, sizes)) / sum(sizes) == pytest.approx(target, abs=1e-12)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("alloc", ["uniform", "owl", "budget"])
def test_mean_sparsity_is_the_target(method, alloc):
    model = tiny("llama")
    _, report = compress.run(model, [{method: {"sparsity": 0.6, "allocation": alloc}}], calib=ids(4))
    rows = report["layers"]
    n = {r["layer"]: r["shape"][0] * r["shape"][1] for r in rows}
    realized = sum(r["sparsity"] * n[r["layer"]] for r in rows) / sum(n.values())
    assert realized == pytest.approx(0.6, abs=1 / 128)         # per-row rounding of the counts (in >= 64)
    if alloc == "uniform":
        assert report["allocation"] is None
        return
    (key, entry), = report["allocation"].items()
    assert key == f"0.{method}" and entry["method"] == alloc
    if alloc == "owl":
        blocks = entry["blocks"]
        sizes = {b: sum(k for name, k in n.items() if name.startswith(b + ".")) for b in blocks}
        mean = sum(v["sparsity"] * sizes[b] for b, v in blocks.items()) / sum(sizes.values())
        spread = [v["sparsity"] for v in blocks.values()]
        assert max(spread) - min(spread) == pytest.approx(2 * 0.08)   # lambda 0.08: the span is 2 lambda
    else:
        mean = sum(entry["layers"][name] * k for name, k in n.items()) / sum(n.values())
        assert len(set(round(v, 6) for v in entry["layers"].values())) > 1   # not uniform
    assert mean == pytest.approx(0.6, abs=1e-12)
    for r in rows:   # each layer got (about) what was allocated to it
        want = entry["layers"][r["layer"]] if alloc == "budget" else \
            next(v["sparsity"] for b, v in entry["blocks"].items() if r["layer"].startswith(b + "."))
        assert r["sparsity"] == pytest.approx(want, abs=1 / 64)


def test_owl_gives_blocks_with_more_outliers_less_sparsity():
    model = tiny("llama")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # 1 % of the last block's weights grow 15x: its outlier ratio is the highest
        for lin in [m for m in model.model.layers[3].modules() if isinstance(m, torch.nn.Linear)]:
            lin.weight[torch.rand(lin.weight.shape, generator=g) < 0.01] *= 15
    _, report = compress.run(model, [{"wanda": {"sparsity": 0.6, "allocation": "owl"}}], calib=ids(4))
    blocks = report["allocation"]["0.wanda"]["blocks"]
    ratios = {b: v["outlier_ratio"] for b, v in blocks.items()}
    assert max(ratios, key=ratios.get) == "model.layers.3"
    assert min(blocks, key=lambda b: blocks[b]["sparsity"]) == "model.layers.3"


def test_allocation_with_fused_experts():
    model = tiny("qwen3_moe")
    _, report = compress.run(model, [{"wanda": {"sparsity": 0.5, "allocation": "budget"}}], calib=ids(4))
    layers = report["allocation"]["0.wanda"]["layers"]
    experts = [n for n in layers if ".experts." in n]
    assert experts and all(0.3 <= layers[n] <= 0.7 for n in experts)


def test_survey_propagates_the_dense_model():
    """The survey's statistics of block 1 are those of the dense model's block-1 inputs:
    OWL's ratios do not depend on the pruning that follows."""
    a, b = tiny("llama"), tiny("llama")
    _, ra = compress.run(a, [{"wanda": {"sparsity": 0.3, "allocation": "owl"}}], calib=ids(4))
    _, rb = compress.run(b, [{"wanda": {"sparsity": 0.7, "allocation": "owl"}}], calib=ids(4))
    ratio = lambda r: [v["outlier_ratio"] for v in r["allocation"]["0.wanda"]["blocks"].values()]  # noqa: E731
    assert ratio(ra) == ratio(rb)


@pytest.mark.parametrize("args, match", [
    ({"pattern": "2:4", "allocation": "owl"}, "wanda.allocation: pattern 2:4 fixes every layer's sparsity"),
    ({"allocation": "best"}, "wanda.allocation: expected one of uniform, owl, budget"),
    ({"allocation": "owl", "owl_lambda": 0.7}, r"wanda.owl_lambda: expected a number in \[0, 0.5\)"),
    ({"allocation": "budget", "budget_spread": -0.1}, "wanda.budget_spread"),
])
def test_bad_allocation_is_refused(args, match):
    with pytest.raises(CompressError, match=match):
        compress.run(tiny("llama"), [{"wanda": args}], calib=ids(2))


def test_cli_refuses_allocation_with_nm_in_one_line(tmp_path, capsys):
    import yaml

    from cli import main
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "smollm2-135m", "passes": [
        {"sparsegpt": {"pattern": "2:4", "allocation": "budget"}}]}))
    assert main(["-q", "run", str(recipe), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sparsegpt.allocation: pattern 2:4" in err[0]
    assert not (tmp_path / "out").exists()


def test_sparsity_png_and_report_from_the_cli(tmp_path, tiny4_dir, corpus):
    import yaml

    from cli import main
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny4_dir), "calib": {"source": "text", "path": str(corpus), "nsamples": 4, "seqlen": 32},
        "passes": [{"wanda": {"sparsity": 0.7, "allocation": "owl"}}]}))
    out = tmp_path / "out"
    assert main(["-q", "run", str(recipe), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["allocation"]["0.wanda"]["blocks"]) == {f"model.layers.{i}" for i in range(4)}
    png = (out / "sparsity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_config_without_a_computed_allocation_refuses():
    cfg = WandaConfig(sparsity=0.5, allocation="owl")
    cfg.validate()
    assert isinstance(cfg, SparsityConfig)
    with pytest.raises(CompressError, match="was not computed"):
        cfg.sparsity_for("model.layers.0.mlp.down_proj")


def test_resume_keeps_the_allocation(tmp_path, tiny4_dir, corpus, monkeypatch):
    """Cut off after block 2 and resumed: the allocation is the one saved before the
    sweep (the survey is not run again on half-pruned blocks), and the bytes are those
    of a run never interrupted."""
    from test_resume import Killed, digest, kill_after, recipe

    from cli import main
    r = recipe(tmp_path, tiny4_dir, corpus, [{"sparsegpt": {"sparsity": 0.6, "allocation": "budget"}}])
    assert main(["-q", "run", r, "--output", str(tmp_path / "whole")]) == 0
    with monkeypatch.context() as m:
        kill_after(m, 2)
        with pytest.raises(Killed):
            main(["-q", "run", r, "--output", str(tmp_path / "cut")])
    assert (tmp_path / "cut.run" / "allocation.json").is_file()
    with monkeypatch.context() as m:
        import compress.survey
        m.setattr(compress.survey, "survey", lambda *a, **k: pytest.fail("the survey ran again"))
        assert main(["-q", "run", r, "--output", str(tmp_path / "cut"), "--resume", str(tmp_path / "cut.run")]) == 0
    assert digest(tmp_path / "cut") == digest(tmp_path / "whole")
    whole, cut = (json.loads((tmp_path / d / "report.json").read_text())["allocation"] for d in ("whole", "cut"))
    assert whole == cut
