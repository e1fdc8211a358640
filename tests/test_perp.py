"""PERP: parameter-efficient retraining after pruning, with the mask kept exact."""
import json
import math

import pytest
import torch
from torch import nn

import compress
from compress.errors import CompressError
from compress.models import block_linears, find_blocks, get_weight
from compress.optim import lr_factor
from compress.passes.base import make_config
from compress.passes.perp import Adapter, attach, merge
from helpers import is_nm

TEXT = ("Pruning removes weights; retraining a few parameters brings the model back. " * 60 +
        "The quick brown fox jumps over the lazy dog. " * 60)


def _linear(W: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data.copy_(W)
    return lin


def _set(adapter: Adapter, B, A):
    with torch.no_grad():
        adapter.B.copy_(torch.tensor(B))
        adapter.A.copy_(torch.tensor(A))


def test_masklora_by_hand():
    # W = [[1, 0], [0, 2]], B = [[1], [2]], A = [[3, 4]] -> BA = [[3, 4], [6, 8]];
    # s = alpha / r = 2: W' = W + 2 (BA ⊙ M) = [[7, 0], [0, 18]].
    a = Adapter(_linear(torch.tensor([[1.0, 0], [0, 2]])), "masklora", 1, 2.0, torch.Generator())
    _set(a, [[1.0], [2.0]], [[3.0, 4.0]])
    assert torch.equal(a.weight(), torch.tensor([[7.0, 0], [0, 18]]))
    x = torch.tensor([[1.0, 1.0]])
    assert torch.equal(a(x), torch.tensor([[7.0, 18.0]]))


def test_scalelora_by_hand_and_identity_at_start():
    W = torch.tensor([[1.0, 0], [0, 2]])
    a = Adapter(_linear(W), "scalelora", 4, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(a.B @ a.A, torch.ones(2, 2)) and torch.equal(a.weight(), W)  # B A = 1 exactly
    assert a.A[1:].abs().sum() > 0 and (a.B[:, 1:] == 0).all()  # the other components are free to learn
    a = Adapter(_linear(W), "scalelora", 1, 1.0, torch.Generator())
    _set(a, [[1.0], [2.0]], [[3.0, 4.0]])                         # W ⊙ BA = [[3, 0], [0, 16]]
    assert torch.equal(a.weight(), torch.tensor([[3.0, 0], [0, 16]]))


def test_lora_starts_as_the_base_layer():
    W = torch.randn(6, 8)
    for kind in ("masklora", "lora"):
        a = Adapter(_linear(W), kind, 3, 2.0, torch.Generator().manual_seed(0))
        assert torch.equal(a.weight(), W)  # B = 0


@pytest.mark.parametrize("kind", ["masklora", "scalelora"])
def test_merge_keeps_the_2of4_mask_bit_for_bit(kind):
    torch.manual_seed(0)
    W = torch.randn(16, 32)
    W = W * (torch.rand(16, 8, 4).argsort(-1) < 2).reshape(16, 32)   # random 2:4
    root = nn.Sequential(_linear(W))
    adapters, params = attach(root, make_config("perp", {"train": [kind], "rank": 4}), ["0"])
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    want = adapters["0"].weight().detach()
    notes = merge(root, adapters)
    assert type(root[0]) is nn.Linear and torch.equal(root[0].weight != 0, W != 0) and is_nm(root[0].weight, 2, 4)
    assert torch.equal(root[0].weight, want) and notes == {"adapters": 1, "kept_weights_guarded": 0}


def test_merge_guards_a_kept_weight_that_would_become_zero():
    # W = [[1, 2]], B A = [[-0.5, 1]], s = 2: the first kept weight would merge to 1 - 1 = 0.
    root = nn.Sequential(_linear(torch.tensor([[1.0, 2.0]])))
    adapters, _ = attach(root, make_config("perp", {"train": ["masklora"], "rank": 1, "alpha": 2}), ["0"])
    _set(adapters["0"], [[1.0]], [[-0.5, 1.0]])
    notes = merge(root, adapters)
    assert torch.equal(root[0].weight, torch.tensor([[1.0, 4.0]])) and notes["kept_weights_guarded"] == 1


def test_attach_freezes_all_but_the_chosen_sets(tiny_llama):
    cfg = make_config("perp", {"train": ["norm", "masklora"], "rank": 2})
    prefix, blocks = find_blocks(tiny_llama)
    names = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n in block_linears(b)]
    adapters, params = attach(tiny_llama, cfg, names)
    norms = [p for n, p in tiny_llama.named_parameters() if "norm" in n]
    lora = sum(2 * (m.A.numel() + m.B.numel()) // 2 for m in adapters.values())
    assert len(norms) == 2 * 2 + 1                                    # 2 per block + the final norm
    assert sum(p.numel() for p in params) == sum(p.numel() for p in norms) + lora
    assert {id(p) for p in tiny_llama.parameters() if p.requires_grad} == {id(p) for p in params}
    merge(tiny_llama, adapters)
    with pytest.raises(CompressError, match="selects no parameter"):
        attach(tiny_llama, make_config("perp", {"train": ["bias"]}), [])   # Llama has no biases


def test_lm_head_lora_unties_a_tied_head(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True))
    emb = model.model.embed_tokens.weight.detach().clone()
    adapters, params = attach(model, make_config("perp", {"train": ["lm_head"], "rank": 2}), [], head="lm_head")
    with torch.no_grad():
        adapters["lm_head"].B.fill_(0.1)
    merge(model, adapters)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, emb) and not torch.equal(model.lm_head.weight, emb)


def test_lr_schedule_by_hand():
    cfg = make_config("perp", {"steps": 10, "warmup": 0.2, "schedule": "linear"})
    f = lr_factor(cfg, 10)
    assert [f(t) for t in range(4)] == [0.5, 1.0, 1.0, 0.875] and f(10) == 0.0
    cfg = make_config("perp", {"steps": 10, "warmup": 0.0, "schedule": "cosine"})
    assert lr_factor(cfg, 10)(5) == pytest.approx(0.5) and lr_factor(cfg, 10)(0) == 1.0


def _calib(tmp_path):
    from calib import CalibConfig
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return CalibConfig(source="text", path=str(path), nsamples=4, seqlen=32, seed=0)


def _pruned_run(model, tokenizer, tmp_path, perp: dict, steps=None):
    return compress.run(model, [compress.Wanda(pattern="2:4"), {"perp": perp}], calib=_calib(tmp_path),
                        tokenizer=tokenizer, batch_size=2)


def test_end_to_end_retrain_keeps_2of4_and_lowers_the_loss(tiny_llama, tiny_tokenizer, tmp_path):
    import copy

    # The same Wanda sweep without PERP: the weights PERP starts from.
    pruned, _ = compress.run(copy.deepcopy(tiny_llama), [compress.Wanda(pattern="2:4")], tokenizer=tiny_tokenizer,
                             calib=_calib(tmp_path), batch_size=2)
    perp = {"train": ["norm", "masklora"], "rank": 4, "steps": 30, "lr": 1e-2, "batch_size": 4, "warmup": 0.0}
    _, report = _pruned_run(tiny_llama, tiny_tokenizer, tmp_path, perp)
    start = dict(pruned.named_parameters())
    for n, p in tiny_llama.named_parameters():
        trained = "norm" in n or ("layers." in n and n.endswith("proj.weight"))   # norms and MaskLoRA'd linears
        if trained and p.dim() == 2:   # merged MaskLoRA: changed, on exactly the kept weights
            assert torch.equal(p != 0, start[n] != 0) and not torch.equal(p, start[n]), n
        elif trained:
            assert not torch.equal(p, start[n]), n
        else:   # embeddings and the head were not trained: bit for bit as Wanda left them
            assert torch.equal(p, start[n]), n
    masks = {n: get_weight(m) != 0 for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)}
    for b in find_blocks(tiny_llama)[1]:
        for m in block_linears(b).values():
            assert type(m) is nn.Linear and is_nm(get_weight(m), 2, 4)
    tr = report["training"]["perp"]
    assert tr["steps"] == 30 and tr["tokens"] == 30 * 4 * 32 and len(tr["loss_curve"]) == 30
    assert sum(tr["loss_curve"][-5:]) < 0.9 * sum(tr["loss_curve"][:5])
    assert 0 < tr["trainable_pct"] < 100 and report["summary"]["sparsity"] == pytest.approx(0.5)
    out = compress.save(str(tmp_path / "out"), tiny_llama, tiny_tokenizer, report=report)
    assert (out / "perp_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["training"]["perp"]["steps"] == 30
    loaded, _ = compress.load(str(out))
    for n, m in loaded.named_modules():
        if n in masks:
            assert torch.equal(get_weight(m) != 0, masks[n]), n


def test_rejected_reconstruct_leaves_every_weight_bit_identical(tiny_llama):
    # PERP alone on a dense model: the block already matches its dense outputs, so no
    # fit can lower the error and every block's fit is rejected. The forwards run in
    # bf16, the masters are fp32: nothing may come back rounded.
    before = {n: t.clone() for n, t in tiny_llama.state_dict().items()}
    perp = {"mode": "reconstruct", "train": ["masklora"], "rank": 4, "steps": 3, "lr": 1e-2}
    _, report = compress.run(tiny_llama, [{"perp": perp}], calib=torch.randint(3, 300, (4, 32)),
                             compute_dtype="bfloat16")
    rows = [r for r in report["layers"] if "perp_loss" in r]
    assert rows and all(r["perp_loss"][1] == r["perp_loss"][0] for r in rows)   # rejected everywhere
    for n, t in tiny_llama.state_dict().items():
        assert t.dtype == before[n].dtype and torch.equal(t, before[n]), n


def test_quant_after_reconstruct_packs_the_fitted_weights(tiny_llama):
    # [wanda, perp reconstruct, quant] in recipe order: quant must quantize the weights
    # PERP fitted (the runner checks that each packed weight is the propagated one).
    import copy
    from compress.nn import QuantLinear

    ids = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    perp = {"mode": "reconstruct", "train": ["masklora"], "rank": 4, "steps": 20, "lr": 1e-2}
    quant = compress.Quant(method="rtn", bits=8, group_size=32)
    plain, _ = compress.run(copy.deepcopy(tiny_llama), [compress.Wanda(pattern="2:4"), quant], calib=ids)
    _, report = compress.run(tiny_llama, [compress.Wanda(pattern="2:4"), {"perp": perp}, quant], calib=ids)
    first = [r for r in report["layers"] if ".layers.0." in r["layer"]]
    assert all(r["perp_loss"][1] < r["perp_loss"][0] for r in first)   # the fit was kept in block 0
    for n, m in tiny_llama.model.layers[0].named_modules():
        if isinstance(m, QuantLinear):   # block 0 sees the same inputs in both runs: only PERP differs
            other = plain.model.layers[0].get_submodule(n)
            W, W_plain = m.effective_weight(), other.effective_weight()
            assert is_nm(W, 2, 4) and not torch.equal(W, W_plain), n


def test_reconstruct_mode_fits_blocks_and_keeps_the_mask(tiny_llama, tiny_tokenizer, tmp_path):
    import copy
    base = copy.deepcopy(tiny_llama)
    _, plain = compress.run(base, [compress.Wanda(pattern="2:4")], calib=torch.randint(3, 300, (4, 32)))
    perp = {"mode": "reconstruct", "train": ["masklora"], "rank": 4, "steps": 20, "lr": 1e-2, "grad_accum": 2}
    _, report = compress.run(tiny_llama, [compress.Wanda(pattern="2:4"), {"perp": perp}],
                             calib=torch.randint(3, 300, (4, 32)))
    rows = [r for r in report["layers"] if "perp_loss" in r]
    assert rows and all(r["perp_loss"][1] < r["perp_loss"][0] for r in rows)
    for b in find_blocks(tiny_llama)[1]:
        for m in block_linears(b).values():
            assert type(m) is nn.Linear and is_nm(get_weight(m), 2, 4)
    assert report["training"] is None and plain["training"] is None


def test_training_data_is_disjoint_from_the_calibration_documents(tiny_tokenizer):
    from calib.windows import _sample, training_windows
    docs = [f"document {i} " + "word " * (40 + i) for i in range(30)]
    used = _sample(docs, tiny_tokenizer, 5, 16, 0, "t")[1]
    assert used[0] == "documents" and len(used[1]) == 5
    rows = training_windows(docs, tiny_tokenizer, 1000, 16, 0, "t", exclude=(5, 16, 0))
    text = [tiny_tokenizer.decode(r) for r in rows.tolist()]
    for i in used[1]:
        assert not any(f"document {i} " in t for t in text)
    # without exclusion: the whole "\n\n"-joined stream, cut into consecutive windows
    stream = tiny_tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    assert len(training_windows(docs, tiny_tokenizer, 1000, 16, 0, "t")) == len(stream) // 16


def test_training_data_skips_calibration_spans_of_one_text(tiny_tokenizer):
    from calib.windows import _sample, training_windows
    doc = [" ".join(f"w{i}" for i in range(3000))]
    kind, spans = _sample(doc, tiny_tokenizer, 3, 16, 0, "t")[1]
    assert kind == "stream"
    stream = tiny_tokenizer(doc, add_special_tokens=False)["input_ids"][0]
    taken = {tuple(stream[a:b]) for a, b in spans}
    rows = training_windows(doc, tiny_tokenizer, 10_000, 16, 0, "t", exclude=(3, 16, 0))
    covered = set()
    for a, b in spans:
        covered.update(range(a, b))
    for r in rows.tolist():
        assert tuple(r) not in taken
    assert len(rows) <= (len(stream) - len(covered)) // 16


@pytest.mark.parametrize("args, match", [
    ({"train": ["weights"]}, "perp.train"),
    ({"train": ["masklora", "scalelora"]}, "choose one"),
    ({"mode": "reconstruct", "train": ["norm", "masklora"]}, "perp.train"),
    ({"schedule": "step"}, "perp.schedule"),
    ({"rank": 0}, "perp.rank"),
    ({"lr": 0}, "perp.lr"),
    ({"warmup": 1.5}, "perp.warmup"),
])
def test_bad_config(args, match):
    with pytest.raises(CompressError, match=match):
        make_config("perp", args)


@pytest.mark.parametrize("data, match", [({"source": "c5"}, "perp.data.source"), ({"nsample": 3}, "perp.data.nsample"),
                                         ("c4", "perp.data: expected a calibration section")])
def test_bad_data_section(data, match):
    """The api validates a training data section as a calibration section, naming the field."""
    from compress.api import as_configs
    with pytest.raises(CompressError, match=match):
        as_configs([{"perp": {"data": data}}])


def test_needs_data_with_bare_token_ids_and_packed_layers_first(tiny_llama):
    with pytest.raises(CompressError, match="perp.data: required"):
        compress.run(tiny_llama, [compress.Wanda(pattern="2:4"), compress.Perp()], calib=torch.randint(3, 300, (2, 16)))
    with pytest.raises(CompressError, match="perp runs after quant"):
        compress.run(tiny_llama, [compress.Quant(bits=4, group_size=32), compress.Perp(data={"source": "self"})],
                     calib=torch.randint(3, 300, (2, 16)))
    assert math.isfinite(make_config("perp", {"train": ["norm"]}).scaling)


def test_two_runs_with_different_mixed_precision_in_one_process(tiny_llama, tiny_tokenizer, tmp_path):
    import copy
    perp = {"train": ["norm"], "steps": 2, "batch_size": 2, "mixed_precision": "bf16"}
    _, first = _pruned_run(copy.deepcopy(tiny_llama), tiny_tokenizer, tmp_path, perp)
    _, second = _pruned_run(tiny_llama, tiny_tokenizer, tmp_path, {**perp, "mixed_precision": "no"})
    assert first["training"]["perp"]["mixed_precision"] == "bf16"
    assert second["training"]["perp"]["mixed_precision"] == "no"


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_retrain_on_models_with_biases_and_conv1d(arch, tiny_tokenizer, tmp_path):
    import transformers as tf
    cfg = {"gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tiny_tokenizer)),
           "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=len(tiny_tokenizer))}[arch]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".bias")}
    perp = {"train": ["bias", "masklora"], "rank": 2, "steps": 3, "lr": 1e-2, "batch_size": 2, "warmup": 0.0}
    _, report = _pruned_run(model, tiny_tokenizer, tmp_path, perp)
    for b in find_blocks(model)[1]:
        for m in block_linears(b).values():
            assert is_nm(get_weight(m), 2, 4)
    params = dict(model.named_parameters())
    assert biases and any(not torch.equal(params[n], v) for n, v in biases.items())   # the biases trained
    assert report["training"]["perp"]["steps"] == 3


DDP_SCRIPT = '''
import os, sys, json, torch
sys.path.insert(0, {tests!r})
from transformers import LlamaConfig, LlamaForCausalLM
from conftest import _build_tiny_tokenizer
import compress
from calib import CalibConfig
tok = _build_tiny_tokenizer()
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
calib = CalibConfig(source="text", path={text!r}, nsamples=4, seqlen=32)
perp = compress.Perp(train=["norm", "masklora"], rank=2, steps=4, batch_size=2, grad_accum=2, lr=1e-2)
_, rep = compress.run(model, [compress.Wanda(pattern="2:4"), perp], calib=calib, tokenizer=tok)
w = [float(p.double().sum()) for p in model.parameters()]
json.dump({{"training": rep["training"]["perp"], "weights": w}}, open({out!r} + os.environ["RANK"], "w"))
'''


def test_retrain_is_data_parallel_under_torchrun(tmp_path):
    """Two CPU processes (gloo): each trains on its shard, both end with the same merged
    weights, the loss curve is their mean, and tokens count both shards."""
    import subprocess
    import sys
    from pathlib import Path
    (tmp_path / "t.txt").write_text(TEXT)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), text=str(tmp_path / "t.txt"),
                                        out=str(tmp_path / "rank")))
    import os
    import socket
    with socket.socket() as s:   # a free port, so parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(script)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{k}").read_text()) for k in range(2))
    assert r0["weights"] == r1["weights"] and r0["training"]["loss_curve"] == r1["training"]["loss_curve"]
    assert r0["training"]["tokens"] == 4 * 2 * 2 * 32 * 2   # steps x batch x accum x seqlen x processes
    assert r0["training"]["steps"] == 4


def test_gradient_checkpointing_gives_the_same_training(tiny_llama, tiny_tokenizer, tmp_path):
    import copy
    perp = {"train": ["norm", "masklora"], "rank": 2, "steps": 3, "batch_size": 2, "lr": 1e-2,
            "schedule": "cosine", "mixed_precision": "no"}
    m1, m2 = copy.deepcopy(tiny_llama), tiny_llama
    _, plain = _pruned_run(m1, tiny_tokenizer, tmp_path, perp)
    _, ckpt = _pruned_run(m2, tiny_tokenizer, tmp_path, {**perp, "grad_checkpointing": True})
    assert ckpt["training"]["perp"]["loss_curve"] == pytest.approx(plain["training"]["perp"]["loss_curve"], rel=1e-5)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    flag = "is_activation_checkpointing" if hasattr(type(m2), "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert not getattr(m2, flag)                          # switched off again after training


def test_self_generated_training_text_differs_from_the_calibration(tiny_llama, tiny_tokenizer):
    from calib import CalibConfig, load_calibration, load_training
    cfg = CalibConfig(source="self", nsamples=2, seqlen=12, seed=3)
    calib = load_calibration(cfg, tiny_tokenizer, tiny_llama)
    train = load_training(cfg, tiny_tokenizer, exclude=cfg, model=tiny_llama)
    assert train.shape == (2, 12) and not torch.equal(train, calib)
    assert torch.equal(load_training(cfg, tiny_tokenizer, model=tiny_llama), calib)  # nothing to avoid: same draw


def test_a_sweep_after_perp_calibrates_on_the_retrained_model(tiny_llama, tiny_tokenizer, tmp_path):
    from compress.api import stages
    from compress.nn import SparseQuantLinear
    passes = [compress.Wanda(pattern="2:4"), compress.Perp(train=["norm", "masklora"], rank=2, steps=2, batch_size=2),
              compress.Quant(bits=4, group_size=32)]
    assert [type(s).__name__ for s in stages(passes)] == ["list", "PerpConfig", "list"]
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    from calib import CalibConfig
    _, report = compress.run(tiny_llama, passes, tokenizer=tiny_tokenizer,
                             calib=CalibConfig(source="text", path=str(path), nsamples=4, seqlen=32))
    assert [r["passes"] for r in report["layers"][:1] + report["layers"][-1:]] == [["wanda"], ["quant"]]
    assert len(report["layers"]) == 2 * 14 and report["training"]["perp"]["steps"] == 2
    q = tiny_llama.model.layers[1].mlp.down_proj
    assert isinstance(q, SparseQuantLinear) and is_nm(q.effective_weight(), 2, 4)   # 2:4 survived PERP and GPTQ


def test_lm_head_lora_finds_a_head_of_another_name(tiny_tokenizer, tmp_path):
    # BioGPT's head is `output_projection`: found through get_output_embeddings, not by name.
    import transformers as tf
    from compress.models import head_of

    cfg = tf.BioGptConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=len(tiny_tokenizer), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    assert head_of(model) == "output_projection"
    head = model.output_projection.weight.detach().clone()
    perp = {"train": ["lm_head"], "rank": 2, "steps": 3, "lr": 1e-2, "batch_size": 2, "warmup": 0.0}
    _pruned_run(model, tiny_tokenizer, tmp_path, perp)
    assert not torch.equal(model.output_projection.weight, head)   # the head's LoRA trained and merged
