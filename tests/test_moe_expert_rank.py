"""--expert-rank: experts take their own adapter rank (scale s kept), or none (0: NF4(W) experts, as QLoRA)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moe_models import EXPERTS, HIDDEN, INTER, build
from safetensors import safe_open

import qpissa.moe
from qpissa.decompose import decompose
from qpissa.errors import UserError
from qpissa.quant import NF4Spec, dequantize_nf4, quantize_nf4

RANK = 8


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return build("qwen3_moe", tmp_path_factory.mktemp("er") / "src")


def adapter(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_expert_rank_below_rank_writes_rank_pattern_peft_loads(src, tmp_path):
    out = tmp_path / "out"
    rep = decompose(src, out, rank=RANK, expert_rank=2, progress=False)
    ranks = {m["module"]: m["rank"] for m in rep["modules"]}
    assert {r for k, r in ranks.items() if ".experts." in k} == {2}
    assert {r for k, r in ranks.items() if ".experts." not in k} == {RANK}
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    params = {f"model.layers.{i}.mlp.experts.{k}" for i in range(2) for k in ("gate_up_proj", "down_proj")}
    assert cfg["r"] == RANK and cfg["rank_pattern"] == dict.fromkeys(params, 2)
    assert cfg["alpha_pattern"] == dict.fromkeys(params, 2.0)  # s = α/r = 1 kept
    a = adapter(out)
    assert a["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (2 * EXPERTS, HIDDEN)
    model = qpissa.moe.load(out)  # PEFT builds rank-2 expert wrappers and rank-8 attention LoRAs from the config
    sd = model.state_dict()
    for k, v in a.items():
        key = k.replace(".weight", ".default.weight")
        assert torch.equal(sd[key], v), k


def test_expert_rank_zero_leaves_experts_nf4_without_adapter(src, tmp_path):
    out = tmp_path / "out"
    decompose(src, out, rank=RANK, expert_rank=0, progress=False)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert not cfg.get("target_parameters") and not any(".experts." in k for k in adapter(out))
    # the residual is NF4(W) of each expert, exactly QLoRA's base (independent: quantize the source matrix here)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        w = torch.cat([f.get_tensor("model.layers.1.mlp.experts.3.gate_proj.weight"),
                       f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight")]).float()
    model = qpissa.moe.load(out)
    stack = next(m for n, m in model.named_modules() if n.endswith("layers.1.mlp.experts.nf4_gate_up_proj"))
    assert torch.equal(stack.dequantize(torch.float32)[3], dequantize_nf4(quantize_nf4(w, NF4Spec())))
    assert not any(".experts." in n and "lora_" in n for n, _ in model.named_parameters())


def test_expert_rank_checked_against_expert_shapes(src, tmp_path):
    with pytest.raises(UserError, match="--expert-rank"):
        decompose(src, tmp_path / "out", rank=4, expert_rank=INTER, progress=False)
    with pytest.raises(UserError, match="--expert-rank must be 0"):
        decompose(src, tmp_path / "out2", rank=4, expert_rank=-1, progress=False)
