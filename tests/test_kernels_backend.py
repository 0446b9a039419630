"""apply_kernel_backend on a real (tiny, random-init) Llama loaded 4-bit by transformers + PEFT LoRA.

The fused Triton path must give the same logits and LoRA gradients as bitsandbytes + PEFT.
Runs on CPU under Triton's interpreter: TRITON_INTERPRET=1 is set before triton is imported.
"""
from helpers import triton_interpreter

triton_interpreter()  # must precede any triton / qpissa.kernels import

import json
import os
import subprocess
import sys

import pytest
import torch

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from qpissa.train.kernel_backend import apply_kernel_backend  # noqa: E402

N_LINEAR = 7  # q, k, v, o, gate, up, down in one decoder layer


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 1-layer Llama (hidden 64, MLP 128) saved as a normal HF checkpoint."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=32)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _peft_4bit(model_dir, dropout: float, compute=torch.float32):
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute)
    # on CPU everywhere: the interpreter (TRITON_INTERPRET=1, set above) runs CPU tensors only, and on a GPU
    # machine transformers would otherwise put the 4-bit model on the card
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.float32,
                                                 device_map="cpu")
    torch.manual_seed(1)  # init_lora_weights=False: random A and B so every gradient is non-zero
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.train()
    return peft_model


def _step(model, ids):
    """Logits and LoRA grads of one training forward/backward (same dropout RNG every call)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout"])
@pytest.mark.slow
def test_triton_backend_matches_bnb_peft(tiny_llama_dir, dropout):
    model = _peft_4bit(tiny_llama_dir, dropout)
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(2))
    logits_bnb, grads_bnb = _step(model, ids)
    assert len(grads_bnb) == 2 * N_LINEAR and all(g.abs().sum() > 0 for g in grads_bnb.values())

    assert apply_kernel_backend(model, "triton") == N_LINEAR
    assert apply_kernel_backend(model, "triton") == N_LINEAR  # idempotent
    logits_tri, grads_tri = _step(model, ids)
    assert _rel(logits_tri, logits_bnb) < 1e-5
    for name, g in grads_bnb.items():
        assert _rel(grads_tri[name], g) < 1e-4, name

    with model.disable_adapter():  # uncovered state → PEFT's own forward, base model only
        base_logits = model(input_ids=ids).logits
    assert _rel(base_logits, logits_bnb) > 1e-3  # adapters really were active above

    assert apply_kernel_backend(model, "bnb") == 0  # restore
    logits_back, _ = _step(model, ids)
    assert torch.equal(logits_back, logits_bnb)


@pytest.mark.slow
def test_triton_backend_bf16_compute(tiny_llama_dir):
    """bf16 compute dtype: base matmul rounds like bnb; LoRA runs in bf16 (PEFT keeps it fp32)."""
    model = _peft_4bit(tiny_llama_dir, 0.0, compute=torch.bfloat16)
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(3))
    logits_bnb, grads_bnb = _step(model, ids)
    assert apply_kernel_backend(model, "triton") == N_LINEAR
    logits_tri, grads_tri = _step(model, ids)
    assert _rel(logits_tri, logits_bnb) < 2e-2
    for name, g in grads_bnb.items():
        assert _rel(grads_tri[name], g) < 5e-2, name


@pytest.mark.slow
def test_fallback_without_triton_runtime(tiny_llama_dir, tmp_path):
    """No CUDA and no TRITON_INTERPRET: one warning line, 0 layers patched, model still trains on bnb."""
    script = f"""
import json, logging, torch
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model
from qpissa.train.kernel_backend import apply_kernel_backend
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
m = get_peft_model(AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r}, quantization_config=q),
                   LoraConfig(r=2, target_modules="all-linear"))
n = apply_kernel_backend(m, "triton")
loss = m(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss
loss.backward()
print(json.dumps({{"patched": n, "loss": float(loss)}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["patched"] == 0 and result["loss"] > 0
    warnings = [ln for ln in proc.stderr.splitlines() if "--kernels triton unavailable" in ln]
    assert len(warnings) == 1 and "no CUDA device" in warnings[0]


def test_rejects_unknown_backend():
    with pytest.raises(ValueError, match="'bnb' or 'triton'"):
        apply_kernel_backend(torch.nn.Linear(2, 2), "cuda")  # type: ignore[arg-type]
