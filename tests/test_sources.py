"""Each published format, read by qpissa.sources, against the format's own decoder: transformers' FP8 and MXFP4
loaders, bitsandbytes, the compressed-tensors library; GPTQ/AWQ against the integer codes they were packed from.

Equality is bit for bit: in fp32 where the reference decodes to fp32, else after casting our fp32 to the
reference's dtype (bf16), since every format's value is one product that fp32 holds exactly or rounds once.
"""
from __future__ import annotations

import json

import pytest
import torch

from qpissa.errors import UserError
from qpissa.formats import load_index, load_tensor
from qpissa.sources import open_source, scan_source
import source_models as sm


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return sm.tiny_llama(tmp_path_factory.mktemp("plain") / "m")


def _ours(path) -> dict[str, torch.Tensor]:
    return {t.name: load_tensor(t) for t in scan_source(path)}


def _same_names_and_shapes(src, plain) -> None:
    ours = {t.name: t.shape for t in scan_source(src)}
    want = {t.name: t.shape for t in scan_source(plain)}
    assert ours == want  # the quantized checkpoint reads as the bf16 one: no companion tensors, same shapes


@pytest.mark.parametrize("dtype,block", [(torch.float8_e4m3fn, (32, 32)), (torch.float8_e5m2, (16, 64))])
def test_fp8_matches_transformers_loader(plain, tmp_path, dtype, block):
    from transformers import AutoModelForCausalLM

    src = sm.to_fp8(plain, tmp_path / "fp8", block, dtype)
    _same_names_and_shapes(src, plain)
    ref = AutoModelForCausalLM.from_pretrained(src, device_map="cpu").state_dict()  # CPU: dequantizes to bf16
    ours = _ours(src)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert ours[q].dtype == torch.float32 and ref[q].dtype == torch.bfloat16
    for name, w in ours.items():
        assert torch.equal(w.to(ref[name].dtype), ref[name]), name
    source = open_source(src)
    assert source.format.name == "fp8" and source.format.block == list(block) and source.format.quantized == 14
    assert ("e4m3" if dtype == torch.float8_e4m3fn else "e5m2") in source.format.detail


def test_fp8_fp32_product_matches_transformers_dequantizer(plain, tmp_path):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    src = sm.to_fp8(plain, tmp_path / "fp8", (32, 32))
    info = next(t for t in scan_source(src) if t.name.endswith("mlp.down_proj.weight"))
    q, s = (load_tensor(p) for p in info.packed.parts)
    ref = Fp8Dequantize(None)._dequantize_one(q, s, torch.float32)
    assert torch.equal(load_tensor(info), ref)  # fp32, bit for bit


def test_mxfp4_matches_transformers_convert_moe_packed_tensors(tmp_path):
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 2, 16), dtype=torch.uint8, generator=gen)  # E=3, rows=40, in=64
    scales = torch.randint(118, 136, (3, 40, 2), dtype=torch.uint8, generator=gen)
    save_file({"mlp.experts.down_proj_blocks": blocks, "mlp.experts.down_proj_scales": scales,
               "mlp.experts.down_proj_bias": torch.zeros(3, 40, dtype=torch.bfloat16)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}}))
    source = open_source(tmp_path)
    info = {t.name: t for t in source.tensors}["mlp.experts.down_proj"]
    assert info.shape == (3, 64, 40) and info.dtype == "BF16"  # (E, in, out): the bf16 release's layout
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(load_tensor(info), ref)
    assert torch.equal(load_index(info, 1), ref[1])  # one expert, decoded from its own slice of blocks and scales
    assert source.format.name == "mxfp4" and source.format.block == 32
    assert source.format.extra["modules_to_not_convert"] == ["model.layers.*.self_attn"]


@pytest.mark.parametrize("kwargs,name,block", [
    (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "bnb-nf4", 64),
    (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True), "bnb-fp4", 64),
    (dict(load_in_8bit=True), "bnb-int8", None)])
def test_bitsandbytes_matches_bitsandbytes(plain, tmp_path, kwargs, name, block):
    import bitsandbytes.functional as bnbf
    from safetensors import safe_open

    src = sm.to_bnb(plain, tmp_path / "bnb", **kwargs)
    _same_names_and_shapes(src, plain)
    ours = _ours(src)
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    for key in [k for k in ours if k.endswith("proj.weight")]:
        if name == "bnb-int8":
            ref = bnbf.int8_vectorwise_dequant(raw[key], raw[key.removesuffix("weight") + "SCB"])
        else:
            state = bnbf.QuantState.from_dict({k.removeprefix(key + "."): v for k, v in raw.items()
                                               if k.startswith(key + ".")}, device=torch.device("cpu"))
            assert state.dtype == torch.bfloat16  # bitsandbytes decodes to the weight's dtype; fp32 on request:
            assert torch.equal(ours[key].bfloat16(), bnbf.dequantize_4bit(raw[key], state)), key
            state.dtype = torch.float32
            ref = bnbf.dequantize_4bit(raw[key], state)
        assert torch.equal(ours[key], ref), key
    fmt = open_source(src).format
    assert fmt.name == name and fmt.block == block and fmt.quantized == 14
    assert fmt.extra.get("double_quant", False) == kwargs.get("bnb_4bit_use_double_quant", False)


@pytest.mark.parametrize("method,act_order", [("gptq", False), ("gptq", True), ("awq", False)])
def test_gptq_awq_match_their_integer_codes(plain, tmp_path, method, act_order):
    src, expected = sm.to_gptq_awq(plain, tmp_path / method, method, group=32, act_order=act_order)
    _same_names_and_shapes(src, plain)
    ours = _ours(src)
    for key, want in expected.items():
        assert torch.equal(ours[key], want), key
    fmt = open_source(src).format
    assert fmt.name == method and fmt.block == 32 and ("g_idx" in fmt.detail) == act_order


@pytest.mark.parametrize("kind", ["w4a16", "fp8"])
def test_compressed_tensors_match_the_library(plain, tmp_path, kind):
    src = sm.to_compressed(plain, tmp_path / kind, kind)
    _same_names_and_shapes(src, plain)
    ours = _ours(src)
    ref = sm.compressed_reference(src, kind)
    assert len(ref) == 14
    for key, want in ref.items():
        assert torch.equal(ours[key].to(want.dtype), want), key  # the library decodes to the scale's bf16
    assert open_source(src).format.name == "compressed-tensors"


def test_unknown_or_unsupported_formats_are_refused_in_one_line(plain, tmp_path):
    import shutil

    for qcfg, words in [({"quant_method": "hqq"}, "'hqq' is not read"),
                        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "3-bit"),
                        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "GEMM")]:
        dest = tmp_path / qcfg["quant_method"]
        shutil.copytree(plain, dest, dirs_exist_ok=True)
        config = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**config, "quantization_config": qcfg}))
        with pytest.raises(UserError, match=words) as err:
            open_source(dest)
        assert "\n" not in str(err.value)


def test_plain_checkpoint_reads_unchanged(plain):
    source = open_source(plain)
    assert not source.quantized and all(t.packed is None for t in source.tensors)
    assert source.format.detail == "bf16"


def test_fp8_ragged_blocks_follow_deepseeks_ceil_grid(tmp_path):
    """DeepSeek-V3 has weights whose rows are not a multiple of 128 (kv_a_proj_with_mqa: 576): the scale grid is
    ⌈m/bm⌉ × ⌈n/bn⌉ and the last block is partial (transformers' loader refuses such shapes; DeepSeek's
    weight_dequant does not). Checked against an explicit per-element index."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(40, 72, generator=gen) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3, generator=gen)
    save_file({"w.weight": q, "w.weight_scale_inv": s}, str(tmp_path / "m.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [32, 32]}}))
    rows, cols = torch.arange(40)[:, None] // 32, torch.arange(72)[None, :] // 32
    assert torch.equal(load_tensor(scan_source(tmp_path)[0]), q.float() * s[rows, cols])
    save_file({"w.weight": q, "w.weight_scale_inv": s[:1]}, str(tmp_path / "m.safetensors"))
    with pytest.raises(UserError, match="expected \\[2, 3\\]"):
        open_source(tmp_path)


def test_a_quantized_layout_not_decoded_is_refused_not_read_as_a_matrix(plain, tmp_path):
    """compressed-tensors' int-quantized (int8 ``weight`` + ``weight_scale``) is not read: refused, not taken as
    an int8 matrix (the bug decompose had with packed NF4 bytes)."""
    import shutil

    from safetensors.torch import load_file, save_file

    dest = tmp_path / "int8"
    shutil.copytree(plain, dest)
    state = load_file(str(dest / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    state[key] = (state[key].float() * 1000).clamp(-127, 127).to(torch.int8)
    state[key.removesuffix("weight") + "weight_scale"] = torch.full((state[key].shape[0], 1), 1e-3)
    save_file(state, str(dest / "model.safetensors"), {"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized",
                                     "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int"}}}}
    (dest / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="up_proj.weight is stored as I8"):
        open_source(dest)
