"""Calibrated inits on MoE families whose experts run differently from Qwen3-MoE's ``F.linear(x, W[e])``:
per-expert H read from the block's own forward (qpissa/decompose/expert_inputs.py) against a hand-written forward,
and decompose --method cloq end to end on families with other expert forwards."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moe_models import build

from qpissa.decompose import decompose


def _calibrator(src: Path, gsm8k_dir: Path):
    from qpissa.decompose.calibration import BlockwiseCalibrator, load_calibration
    from qpissa.decompose.experts import find_experts
    from qpissa.decompose.targets import find_targets
    from qpissa.formats import scan_checkpoint

    data = load_calibration(src, gsm8k_dir / "train.jsonl", 4, 2, 32)
    tensors = scan_checkpoint(src)
    targets = find_targets(src, tensors, None)[0] + find_experts(tensors, None, src)[0]
    return BlockwiseCalibrator(src, tensors, targets, data), data


def _gpt_oss_grams(src: Path, seqs: list[torch.Tensor], layer: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """gpt-oss's experts by hand: x @ W[e] + b[e] with W stored [E, H, 2I], gate/up interleaved (even/odd columns),
    clamped SwiGLU with α; the routed tokens read from the router's indices. expert → (H of gate_up's input, H of
    down's input), fp64, from the whole model in fp32 (no block streaming)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    experts = model.model.layers[layer].mlp.experts
    seen = []
    hook = experts.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        for ids in seqs:
            model(input_ids=ids)
    hook.remove()
    out = {}
    for e in range(experts.gate_up_proj.shape[0]):
        h_in = h_inner = 0
        for args, kwargs in seen:
            hidden = (args[0] if args else kwargs["hidden_states"]).reshape(-1, experts.gate_up_proj.shape[1]).double()
            index = args[1] if len(args) > 1 else kwargs["router_indices"]
            x = hidden[(index.reshape(hidden.shape[0], -1) == e).any(-1)]
            gate_up = x @ experts.gate_up_proj[e].double() + experts.gate_up_proj_bias[e].double()
            gate, up = gate_up[:, ::2].clamp(max=experts.limit), gate_up[:, 1::2].clamp(-experts.limit, experts.limit)
            inner = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
            h_in, h_inner = h_in + x.T @ x, h_inner + inner.T @ inner
        out[e] = (h_in, h_inner)
    return out


@pytest.mark.slow
def test_gpt_oss_experts_are_calibrated_on_their_inputs(smollm2_dir, gsm8k_dir, tmp_path):
    """gpt-oss (stack [E, in, out], biases, interleaved clamped SwiGLU): each expert's H equals the hand-written one."""
    src = build("gpt_oss", tmp_path / "src", tokenizer=smollm2_dir)
    calibrator, data = _calibrator(src, gsm8k_dir)
    want = _gpt_oss_grams(src, data.calib, layer=1)
    for e, (h_gate_up, h_down) in want.items():
        got_gu, _ = calibrator.stats(f"model.layers.1.mlp.experts.{e}.gate_up_proj")
        got_down, _ = calibrator.stats(f"model.layers.1.mlp.experts.{e}.down_proj")
        if not torch.is_tensor(h_gate_up):  # no token routed here: no statistics either
            assert got_gu is None and got_down is None
            continue
        torch.testing.assert_close(got_gu, h_gate_up, rtol=1e-4, atol=1e-4 * h_gate_up.abs().max().item())
        torch.testing.assert_close(got_down, h_down, rtol=1e-3, atol=1e-3 * h_down.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt_oss", "inkling_text", "nemotron_h", "jetmoe", "gemma4_text", "sarvam_moe",
                                    "kimi_linear"])
def test_cloq_calibrates_every_expert(family, smollm2_dir, gsm8k_dir, tmp_path):
    """cloq on families whose experts run as x @ W[e] (gpt-oss), bmm on a stacked shared expert (Inkling), behind a
    block that reads attributes of its layer (Nemotron-H), two experts modules per block (JetMoE), layers whose
    position embeddings differ by layer type (Gemma-4: each block gets its own arguments), parameters transformers
    builds at load (Sarvam-MoE's split q/k/v, Kimi-Linear's concatenated convolutions: built by its own operations):
    every expert matrix is calibrated or falls back, and the report counts both."""
    src = build(family, tmp_path / "src", tokenizer=smollm2_dir)
    # Inkling's first block has 8192-wide attention in the tiny config: its 8192² H alone takes minutes to whiten
    targets = [r"model\.layers\.1\..*"] if family == "inkling_text" else None
    rep = decompose(src, tmp_path / "out", rank=4, method="cloq", calib_data=str(gsm8k_dir / "train.jsonl"), targets=targets,
                    calib_samples=8, calib_holdout=2, calib_seq_len=64, calib_expert_tokens=1, progress=False)
    experts = rep["experts"]
    assert experts["calibrated"] + experts["calibration_fallback"] == experts["matrices"] > 0
    assert experts["calibrated"] >= experts["matrices"] // 2


@pytest.mark.slow
def test_llama4_experts_refuse_calibration_in_one_line(smollm2_dir, gsm8k_dir, tmp_path):
    """Llama-4 multiplies its input along the axis the decomposition takes as the output ([E, H, 2I] without
    is_transposed): --calib-data is refused in one line, nothing written."""
    src = build("llama4_text", tmp_path / "src", tokenizer=smollm2_dir)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "qpissa", "decompose", str(src), "-o", str(out), "--rank", "4",
                           "--method", "cloq", "--calib-data", str(gsm8k_dir / "train.jsonl"), "--calib-samples", "4",
                           "--calib-holdout", "1", "--calib-seq-len", "32"], capture_output=True, text=True)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "feed_forward.experts.gate_up_proj" in errors[0] and "--calib-data" in errors[0]
    assert not out.exists()


@pytest.mark.slow
def test_a_block_the_walk_cannot_run_is_one_line(smollm2_dir, gsm8k_dir, tmp_path):
    """Kolibri-1.1's indexed attention wants a 4-D mask that only the whole model's forward builds: one line naming
    the block, no traceback, no finished output (block 0's parts stay for --resume)."""
    from qpissa.errors import UserError

    src = build("kolibri1_1", tmp_path / "src", tokenizer=smollm2_dir)
    with pytest.raises(UserError, match=r"--calib-data: block 1 \(Kolibri1_1DecoderLayer\) does not run"):
        decompose(src, tmp_path / "out", rank=4, method="cloq", calib_data=str(gsm8k_dir / "train.jsonl"),
                  calib_samples=2, calib_holdout=1, calib_seq_len=32, progress=False)
    assert not (tmp_path / "out" / "report.json").exists()
