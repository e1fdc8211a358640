"""Export to serving formats, read back element by element with the formats' own readers."""
import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import compress
from compress.errors import CompressError
from compress.export import ExportConfig, export
from compress.export.compressed_tensors import bitmask_24
from compress.export.gguf import gguf_tensors, permute_qk, unpermute_qk
from compress.nn import PackedLinear
from helpers import is_nm


def _ids():
    return torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def _effective(model) -> dict:
    """{module.weight: fp32 [out, in]} of every decoder linear, packed or not."""
    out = {}
    for n, m in model.named_modules():
        if ".layers." in n and (isinstance(m, PackedLinear) or isinstance(m, torch.nn.Linear)):
            out[f"{n}.weight"] = (m.effective_weight() if isinstance(m, PackedLinear) else m.weight).detach().float()
    return out


def _ct_dense(folder) -> dict:
    ct = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.ct_dequantizer")
    sd = load_file(str(folder / "model.safetensors"))
    return ct.CompressedTensorsDequantizer(str(folder), dtype=torch.float32).process(sd)


@pytest.mark.parametrize("quant", [{"bits": 4, "group_size": 32, "symmetric": False},
                                   {"bits": 4, "group_size": 32, "symmetric": True},
                                   {"bits": 8, "group_size": "channel", "symmetric": True}])
def test_compressed_tensors_pack_quantized_round_trip_is_exact(tiny_llama, tiny_tokenizer, tmp_path, quant):
    compress.run(tiny_llama, [compress.SparseGPT(pattern="2:4"), compress.Quant(**quant)], calib=_ids())
    want = _effective(tiny_llama)
    out = export(tiny_llama, tiny_tokenizer, str(tmp_path / "ct"), ExportConfig(format="compressed-tensors"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert w["num_bits"] == quant["bits"] and w["symmetric"] == quant["symmetric"]
    assert w["strategy"] == ("channel" if quant["group_size"] == "channel" else "group")
    assert qc["sparsity_config"]["format"] == "dense" and qc["sparsity_config"]["sparsity_structure"] == "2:4"
    sd = load_file(str(out / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert sd[f"{q}.weight_packed"].dtype == torch.int32 and sd[f"{q}.weight_packed"].shape == (64, 64 * quant["bits"] // 32)
    assert (f"{q}.weight_zero_point" in sd) == (not quant["symmetric"]) and f"{q}.weight" not in sd
    # The library's own unpacking gives back our codes, scales and zero points bit for bit,
    # and its dequantization (in the scales' fp16) equals our weights rounded to fp16.
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32
    dense = _ct_dense(out)
    for k, W in want.items():
        m, mod = k[:-len(".weight")], tiny_llama.get_submodule(k[:-len(".weight")])
        codes = unpack_from_int32(sd[f"{m}.weight_packed"], quant["bits"], sd[f"{m}.weight_shape"])
        assert torch.equal(codes.to(torch.int16) + 2 ** (quant["bits"] - 1), mod.codes().to(torch.int16)), k
        assert torch.equal(sd[f"{m}.weight_scale"], mod.scales)
        if not quant["symmetric"]:
            zp = unpack_from_int32(sd[f"{m}.weight_zero_point"], quant["bits"], mod.scales.shape, packed_dim=0)
            assert torch.equal(zp.float() + 2 ** (quant["bits"] - 1), mod.zeros()), k
        assert torch.equal(dense[k].float(), W.half().float()), k        # element by element
        assert is_nm(dense[k], 2, 4)
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, PackedLinear)   # the caller's model untouched


def test_compressed_tensors_sparse_only_keeps_zeros_in_place(tiny_llama, tiny_tokenizer, tmp_path):
    compress.run(tiny_llama, [compress.Wanda(pattern="2:4")], calib=_ids())
    want = _effective(tiny_llama)
    out = export(tiny_llama, tiny_tokenizer, str(tmp_path / "ct"), ExportConfig(format="compressed-tensors"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "config_groups" not in qc and qc["sparsity_config"]["global_sparsity"] == pytest.approx(0.5)
    sd = load_file(str(out / "model.safetensors"))
    for k, W in want.items():
        assert torch.equal(sd[k].float(), W.half().float()), k


def test_bitmask_24_by_hand():
    # row [0, 3, 0, -1 | 0, 0, 0, 2]: the second group keeps the 2 and the first zero slot.
    t = bitmask_24(torch.tensor([[0.0, 3, 0, -1, 0, 0, 0, 2]]))
    assert torch.equal(t["compressed"], torch.tensor([[3.0, -1, 0, 2]]))
    assert t["bitmask"].tolist() == [[0b10011010]] and t["shape"].tolist() == [[1], [8]]


def test_compressed_tensors_bitmask_decodes_to_the_weights(tiny_llama, tiny_tokenizer, tmp_path, caplog):
    compress.run(tiny_llama, [compress.Wanda(pattern="2:4")], calib=_ids())
    want = _effective(tiny_llama)
    with caplog.at_level(logging.WARNING):
        out = export(tiny_llama, tiny_tokenizer, str(tmp_path / "ct"),
                     ExportConfig(format="compressed-tensors", sparse_format="bitmask", dtype="float32"))
    assert "compressed-tensors <= 0.14" in caplog.text
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]["format"] == \
        "sparse-24-bitmask"
    sd = load_file(str(out / "model.safetensors"))
    for k, W in want.items():
        m = k[:-len(".weight")]
        rows, cols = sd[f"{m}.shape"].flatten().tolist()
        bits = np.unpackbits(sd[f"{m}.bitmask"].numpy(), axis=1, count=cols, bitorder="little").astype(bool)
        dense = torch.zeros(rows, cols)
        dense[torch.from_numpy(bits)] = sd[f"{m}.compressed"].flatten()
        assert torch.equal(dense, W), k


def test_bitmask_refuses_what_is_not_2of4(tiny_llama, tiny_tokenizer, tmp_path):
    compress.run(tiny_llama, [compress.Wanda(sparsity=0.5)], calib=_ids())
    with pytest.raises(CompressError, match="not 2:4 sparse"):
        export(tiny_llama, tiny_tokenizer, str(tmp_path / "x"), ExportConfig(format="compressed-tensors",
                                                                            sparse_format="bitmask"))
    assert not (tmp_path / "x").exists()


def test_compressed_tensors_refuses_armor_unless_folded(tiny_llama, tiny_tokenizer, tmp_path):
    compress.run(tiny_llama, [compress.SparseGPT(pattern="2:4"), compress.Armor(block_size=16, iters=2)], calib=_ids())
    want = _effective(tiny_llama)
    with pytest.raises(CompressError, match=r"model.layers.0.self_attn.q_proj is a ArmorLinear.*fold"):
        export(tiny_llama, tiny_tokenizer, str(tmp_path / "x"), ExportConfig(format="compressed-tensors"))
    out = export(tiny_llama, tiny_tokenizer, str(tmp_path / "x"),
                 ExportConfig(format="compressed-tensors", fold=True, dtype="float32"))
    sd = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(sd[k], W) for k, W in want.items())


@pytest.mark.parametrize("quant, match", [({"bits": 3, "group_size": 32}, "3-bit codes"),
                                          ({"bits": 4, "group_size": 48}, "not a multiple of group_size 48"),
                                          ({"bits": 4, "group_size": 32, "static_groups": False}, "group index")])
def test_compressed_tensors_refuses_grids_it_cannot_hold(tiny_llama, tiny_tokenizer, tmp_path, quant, match):
    compress.run(tiny_llama, [compress.Quant(**quant)], calib=_ids())
    with pytest.raises(CompressError, match=match):
        export(tiny_llama, tiny_tokenizer, str(tmp_path / "x"), ExportConfig(format="compressed-tensors"))


def test_qk_permutation_by_hand():
    # one head of dim 4: HF rows [r0, r1, r2, r3] (halves r0 r1 | r2 r3) -> GGUF [r0, r2, r1, r3]
    W = torch.arange(4.0)[:, None].repeat(1, 2)
    assert permute_qk(W, 1)[:, 0].tolist() == [0, 2, 1, 3]
    W = torch.randn(24, 5)
    assert torch.equal(unpermute_qk(permute_qk(W, 3), 3), W)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_gguf_round_trip_keeps_every_tensor_and_the_zeros(tiny_llama, tiny_tokenizer, tmp_path, qtype):
    gguf = pytest.importorskip("gguf")
    compress.run(tiny_llama, [compress.Wanda(pattern="2:4")], calib=_ids())
    ref = gguf_tensors(tiny_llama)
    out = export(tiny_llama, tiny_tokenizer, str(tmp_path / "g"), ExportConfig(format="gguf", gguf_type=qtype))
    r = gguf.GGUFReader(str(out / "model.gguf"))
    assert {t.name for t in r.tensors} == set(ref) and "output.weight" in ref   # the fixture's head is untied
    T = gguf.GGMLQuantizationType
    for t in r.tensors:
        W = ref[t.name].numpy()
        if t.tensor_type in (T.F32, T.F16):
            got = np.asarray(t.data, dtype=np.float32).reshape(W.shape)
            want = W.astype(np.float16 if t.tensor_type == T.F16 else np.float32).astype(np.float32)
        else:
            got = gguf.quants.dequantize(t.data, t.tensor_type)
            want = gguf.quants.dequantize(gguf.quants.quantize(W, t.tensor_type), t.tensor_type)
        assert np.array_equal(got, want), t.name
        if t.name.startswith("blk.") and W.ndim == 2:
            assert ((got == 0) >= (W == 0)).all() and is_nm(torch.from_numpy(got.copy()), 2, 4), t.name
    f = {k: r.fields[k].contents() for k in ("llama.block_count", "llama.attention.head_count_kv",
                                            "llama.embedding_length", "tokenizer.ggml.model", "general.file_type")}
    assert f["llama.block_count"] == 2 and f["llama.attention.head_count_kv"] == 2 and f["llama.embedding_length"] == 64
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert r.fields["tokenizer.ggml.tokens"].contents()[:3] == ["<s>", "</s>", "<pad>"]


def test_gguf_warns_for_q4_1_on_a_sparse_model_and_refuses_other_architectures(tiny_llama, tiny_tokenizer, tmp_path,
                                                                                caplog):
    import transformers as tf
    compress.run(tiny_llama, [compress.Magnitude(sparsity=0.5)], calib=_ids())
    with caplog.at_level(logging.WARNING):
        export(tiny_llama, tiny_tokenizer, str(tmp_path / "g"), ExportConfig(format="gguf", gguf_type="Q4_1"))
    assert "Q4_1" in caplog.text and "not stay exactly zero" in caplog.text
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(CompressError, match="gguf export supports model_type .*gpt2"):
        export(gpt2, None, str(tmp_path / "h"), ExportConfig(format="gguf"))


def test_hf_export_folds_quantized_layers_into_plain_weights(tiny_llama, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM
    compress.run(tiny_llama, [compress.SparseGPT(pattern="2:4"), compress.Quant(bits=4, group_size=32)], calib=_ids())
    want = _effective(tiny_llama)
    out = export(tiny_llama, tiny_tokenizer, str(tmp_path / "hf"), ExportConfig(format="hf", dtype="float32"))
    plain = AutoModelForCausalLM.from_pretrained(out)
    got = {f"{n}.weight": m.weight for n, m in plain.named_modules() if f"{n}.weight" in want}
    assert got.keys() == want.keys() and all(torch.equal(got[k], W) for k, W in want.items())
    info = json.loads((out / "export.json").read_text())
    assert info["format"] == "hf" and len(info["folded"]) == 14 and info["bytes"] > 0


def test_export_config_errors():
    for args, match in [({"format": "onnx"}, "output.format"), ({"gguf_type": "Q2_K"}, "output.gguf_type"),
                        ({"sparse_format": "csr"}, "output.sparse_format"), ({"dtype": "int8"}, "output.dtype")]:
        with pytest.raises(CompressError, match=match):
            ExportConfig(**args).validate()


CT14_SCRIPT = '''
import sys, torch
import compressed_tensors
from safetensors.torch import load_file
from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import sparse24_bitmask_decompress
assert compressed_tensors.__version__ == "0.14.0.1", compressed_tensors.__version__   # not the dev extra's >= 0.20
sd = load_file(sys.argv[1])
want = torch.load(sys.argv[2])
for name, W in want.items():
    m = name[:-len(".weight")]
    dense = sparse24_bitmask_decompress(sd[m + ".compressed"], sd[m + ".bitmask"], sd[m + ".shape"].flatten().tolist())
    assert torch.equal(dense.float(), W), name
print("ok", len(want))
'''


def _ct14_dir():
    """The folder holding compressed-tensors 0.14.0.1 on its own (`pip install --no-deps
    --target`), from $COMPRESS_CT14_DIR: .ci/run installs it, the tests never download.
    Unset: skip. Set, but without 0.14.0.1 in it: a broken setup, so fail."""
    import os
    from pathlib import Path
    value = os.environ.get("COMPRESS_CT14_DIR")
    if not value:
        pytest.skip("COMPRESS_CT14_DIR not set: install compressed-tensors 0.14.0.1 into a folder of its own "
                    "(python3 -m pip install --no-deps --target DIR compressed-tensors==0.14.0.1, as .ci/run "
                    "does) and point COMPRESS_CT14_DIR at it")
    d = Path(value)
    assert (d / "compressed_tensors-0.14.0.1.dist-info").is_dir() and (d / "compressed_tensors").is_dir(), \
        f"COMPRESS_CT14_DIR={value}: no compressed-tensors 0.14.0.1 installed there (pip install --target)"
    return d


@pytest.mark.slow
def test_bitmask_read_back_by_compressed_tensors_0_14(tiny_llama, tiny_tokenizer, tmp_path):
    """compressed-tensors 0.14.0.1 is the last release that reads sparse-24-bitmask (the
    dev extra installs >= 0.20, which dropped it; see the export's warning): run from
    its own folder, it decompresses our bitmask export to the exact weights."""
    import os
    import subprocess
    import sys
    env_dir = _ct14_dir()
    compress.run(tiny_llama, [compress.Wanda(pattern="2:4")], calib=_ids())
    want = _effective(tiny_llama)
    torch.save(want, tmp_path / "want.pt")
    out = export(tiny_llama, tiny_tokenizer, str(tmp_path / "ct"),
                 ExportConfig(format="compressed-tensors", sparse_format="bitmask", dtype="float32"))
    (tmp_path / "check.py").write_text(CT14_SCRIPT)
    # ahead of site-packages, which holds the dev extra's compressed-tensors
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(env_dir), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(out / "model.safetensors"),
                          str(tmp_path / "want.pt")], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stdout.startswith("ok 14"), run.stderr[-2000:]
