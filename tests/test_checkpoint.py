"""compress.save and compress.load of packed checkpoints: saving in another dtype leaves
the caller's model alone, and loading never builds the dense weights of packed layers."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

import compress
from compress.nn import PackedLinear
from tests.archs import ids, tiny

# Llama 3 rotary scaling: a wrongly recomputed inv_freq would not be the plain default table.
ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def packed_llama():
    """A tiny Llama with a tied head, every block linear packed (4-bit RTN QuantLinear); its
    vocabulary (160) makes the embedding's shape unlike any packed layer's."""
    model = tiny("llama", vocab_size=160, tie_word_embeddings=True, rope_parameters=ROPE, max_position_embeddings=64)
    compress.run(model, [{"quant": {"method": "rtn", "group_size": 32, "clip_search": False}}], calib=ids(n=2))
    return model.eval()


def tensors(model) -> dict:
    """Every parameter and buffer (non-persistent ones too), by name."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


class DenseWatch(TorchDispatchMode):
    """Records every real (not meta) floating tensor an op returns whose shape is in `shapes`."""

    def __init__(self, shapes: set):
        super().__init__()
        self.shapes, self.seen = shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta \
                    and tuple(t.shape) in self.shapes:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def dense_shapes(model) -> set:
    """[out, in] of the packed layers; no other tensor of the tiny Llama has one of these shapes."""
    packed = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, PackedLinear)}
    others = {tuple(t.shape) for n, t in tensors(model).items()
              if not isinstance(model.get_submodule(n.rpartition(".")[0]), PackedLinear)}
    assert packed and not packed & others
    return packed


def test_save_in_bf16_leaves_the_model_alone(tmp_path):
    model = packed_llama()
    before = {k: t.detach().clone() for k, t in tensors(model).items()}
    config_dtype = model.config.dtype
    out = compress.save(str(tmp_path / "out"), model, dtype="bfloat16")
    after = tensors(model)
    assert after.keys() == before.keys()
    for k, t in before.items():
        assert after[k].dtype == t.dtype and torch.equal(after[k], t), k
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.dtype == config_dtype

    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert "lm_head.weight" not in stored                              # the tied head is stored once
    q = "model.layers.0.self_attn.q_proj"
    assert stored[f"{q}.qweight"] == "I32" and stored[f"{q}.scales"] == "F16"   # packed buffers keep their dtype
    assert stored["model.embed_tokens.weight"] == stored["model.norm.weight"] == "BF16"

    loaded, _ = compress.load(str(out))                                 # bf16, as config.json says
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # Like the model cast to bf16, but the rotary tables stay fp32, as transformers builds them.
    tables = {k: t for k, t in model.named_buffers() if k not in model.state_dict()}
    want = model.to(torch.bfloat16)
    for k, t in tables.items():
        mod, _, name = k.rpartition(".")
        want.get_submodule(mod)._buffers[name] = t
    got = tensors(loaded)
    for k, t in tensors(want).items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    x = ids(n=2, seq=12)
    assert torch.equal(logits(loaded, x), logits(want, x))


def test_packed_load_builds_no_dense_weight_and_gives_the_same_logits(tmp_path):
    model = packed_llama()
    x = ids(n=2, seq=20)
    want = logits(model, x)
    model.generation_config.max_new_tokens = 7                          # not a default: read from the folder
    out = compress.save(str(tmp_path / "out"), model)
    watch = DenseWatch(dense_shapes(model))
    with watch:
        loaded, _ = compress.load(str(out))
    assert watch.seen == []                                             # e.g. ('aten.empty_like', (64, 64))

    assert torch.equal(logits(loaded, x), want)
    original, got = tensors(model), tensors(loaded)
    assert got.keys() == original.keys()
    for k, t in original.items():                                       # rotary inv_freq recomputed, not left empty
        assert not got[k].is_meta and got[k].dtype == t.dtype and torch.equal(got[k], t), k
    assert type(loaded) is type(model) and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.generation_config.max_new_tokens == 7


def test_load_with_dtype_keeps_packed_buffers(tmp_path):
    model = packed_llama()
    out = compress.save(str(tmp_path / "out"), model)
    loaded, _ = compress.load(str(out), dtype=torch.bfloat16)
    q = loaded.model.layers[1].mlp.up_proj
    assert q.scales.dtype == torch.float16 and q.qweight.dtype == torch.int32
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(q.effective_weight(), model.model.layers[1].mlp.up_proj.effective_weight())


def test_load_names_a_missing_packed_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    out = compress.save(str(tmp_path / "out"), packed_llama())
    state = load_file(out / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.scales"]
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(compress.CompressError, match=r"lacks model\.layers\.1\.mlp\.up_proj\.scales"):
        compress.load(str(out))


def test_load_refuses_an_unknown_module_type(tmp_path):
    out = compress.save(str(tmp_path / "out"), packed_llama())
    config = json.loads((out / "config.json").read_text())
    config["compress"]["modules"]["model.layers.0.mlp.up_proj"]["type"] = "Mystery"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(compress.CompressError, match=r"model\.layers\.0\.mlp\.up_proj has unknown module type 'Mystery'"):
        compress.load(str(out))
