"""qpissa.moe.load without the bf16 peak: experts stay placeholders while transformers loads, NF4 stacks dequantize
in batched calls, and the measured peak is the 4-bit bytes + about one block."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from moe_models import build

import qpissa.moe
from qpissa.decompose import decompose
from qpissa.nf4_cpu import dequantize_nf4_cpu

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def moe_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe-load")
    src = build("qwen3_moe", root / "src")
    decompose(src, root / "out", rank=4, progress=False)
    return root / "out"


def test_load_never_allocates_experts_and_matches_the_bf16_first_path(moe_out):
    from transformers import AutoModelForCausalLM

    model = qpissa.moe.load_residual(moe_out / "residual", dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert p.untyped_storage().nbytes() == p.element_size()  # a placeholder, never the (E, out, in) tensor
    # the earlier path: transformers allocates + initializes the experts, then the stacks replace them
    old = AutoModelForCausalLM.from_pretrained(moe_out / "residual", dtype=torch.bfloat16)
    qpissa.moe.attach_nf4_experts(old, moe_out / "residual")
    ids = torch.arange(1, 17).view(1, 16)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, old(ids).logits)
    assert qpissa.moe.resident_bytes(model) == qpissa.moe.resident_bytes(old)


def test_batched_dequantize_equals_one_expert_at_a_time(moe_out, monkeypatch):
    model = qpissa.moe.load_residual(moe_out / "residual", dtype=torch.bfloat16)
    stacks = [m for m in model.modules() if isinstance(m, qpissa.moe.NF4ExpertStack)]
    assert stacks
    for stack in stacks:
        want = torch.stack([dequantize_nf4_cpu(stack.packed[e], stack.absmax[e], stack.code, stack.blocksize,
                                               stack.shape) for e in range(stack.packed.shape[0])])
        assert torch.equal(stack.dequantize(torch.float32), want)
        monkeypatch.setattr(qpissa.moe, "DEQUANT_WEIGHTS", stack.shape[0] * stack.shape[1])  # one expert per call
        assert torch.equal(stack.dequantize(torch.bfloat16), want.bfloat16())
        monkeypatch.undo()


@pytest.mark.slow
def test_load_peak_is_4bit_bytes_plus_one_block(tmp_path):
    """benchmarks/moe_load_peak.py's measurement on a 384 MiB-of-experts Qwen3-MoE (4 blocks of 32 experts)."""
    spec = importlib.util.spec_from_file_location("moe_load_peak", ROOT / "benchmarks" / "moe_load_peak.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ckpt = bench.build(tmp_path / "ckpt", layers=4, hidden=1024, inter=512, experts=32)
    decompose(ckpt, tmp_path / "out", method="qlora", rank=8, progress=False, loftq_baseline=False,
              spectral_norms=False)
    b = bench.accounting(ckpt, tmp_path / "out")
    assert b["experts_bf16"] == 4 * 32 * 3 * 512 * 1024 * 2
    new, old = bench.measure(tmp_path / "out", "meta"), bench.measure(tmp_path / "out", "bf16_first")
    four_bit = b["nf4_experts_file"] + b["residual_shards"]
    assert new["peak_above_imports"] <= four_bit + b["one_block_experts_bf16"] + 48 * 2**20, (new, b)
    assert old["peak_above_imports"] >= b["experts_bf16"]  # the bf16 experts, all at once
    assert new["peak_above_imports"] < 0.6 * old["peak_above_imports"]
