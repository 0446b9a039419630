"""Memory planner: byte counts against hand computation, bitsandbytes, PEFT and autograd's saved tensors."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qpissa.errors import UserError
from qpissa.plan.model_shapes import load_config, shapes_from_config
from qpissa.plan.memory import (PlanConfig, adapter_params, bert_layer_bytes, decompose_estimate, largest_batch,
                         largest_rank, llama_layer_bytes, nf4_bytes, parse_size, plan,
                         select_targets)

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def shapes(name: str):
    return shapes_from_config(load_config(CONFIGS / f"{name}.json"))


# ------------------------------------------------------------------ parameter and NF4 byte counts

@pytest.mark.parametrize("name,expected", [("llama-2-7b", 6_738_415_616), ("llama-3-8b", 8_030_261_248),
                                           ("llama-3-70b", 70_553_706_496)])
def test_param_counts_match_published(name, expected):
    assert shapes(name).n_params == expected


@pytest.mark.parametrize("cfg,expected", [
    ({"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,   # Qwen2-0.5B
      "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
     494_032_768),
    ({"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,  # Mistral-7B
      "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False},
     7_241_732_096)])
def test_param_counts_other_decoders(cfg, expected):
    assert shapes_from_config(cfg).n_params == expected


def test_llama2_7b_nf4_bytes_by_hand():
    s = shapes("llama-2-7b")
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)                    # 6,476,005,376 quantized weights
    p = plan(s, PlanConfig(method="qlora", rank=64, seq_len=512))
    assert p.get("nf4 weights") == linear // 2
    assert p.get("nf4 absmax+maps") == 4 * linear // 64 + 7 * 32 * 64      # fp32 absmax + 16-entry code each
    rest = 6_738_415_616 - linear                                          # embed + head + norms
    assert p.get("unquantized weights") == 2 * rest
    dq = plan(s, PlanConfig(method="qlora", double_quant=True))
    blocks_q, blocks_mlp = 4096 * 4096 // 64, 4096 * 11008 // 64
    per_layer = 4 * (blocks_q + 4 * math.ceil(blocks_q / 256)) + 3 * (blocks_mlp + 4 * math.ceil(blocks_mlp / 256))
    assert dq.get("nf4 absmax+maps") == 32 * (per_layer + 7 * (1024 + 4 + 64))


@pytest.mark.parametrize("shape", [(576, 1536), (37, 100), (192, 576)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_bytes_match_bitsandbytes(shape, double_quant, blocksize):
    import bitsandbytes.functional as bf
    w = torch.randn(*shape, dtype=torch.bfloat16)
    packed, st = bf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    got = nf4_bytes(w.numel(), blocksize, double_quant)
    assert got["packed"] == packed.numel() * packed.element_size()
    absmax = st.absmax.numel() * st.absmax.element_size()
    if double_quant:
        absmax += (st.state2.absmax.numel() * st.state2.absmax.element_size()
                   + st.state2.code.numel() * st.state2.code.element_size() + st.offset.numel() * 4)
    assert got["absmax"] == absmax
    assert got["quant_map"] == st.code.numel() * st.code.element_size()


def test_minilm_4bit_model_bytes_match_loaded_model(minilm_dir):
    """Every byte of a bitsandbytes-quantized BertModel (packed weights, quant states, fp32 rest)."""
    import transformers
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",  # as decompose writes it:
                                        bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["pooler"])
    model = transformers.AutoModel.from_pretrained(minilm_dir, dtype=torch.float32, quantization_config=q)
    packed = absmax = other = 0
    for _, prm in model.named_parameters():
        st = getattr(prm, "quant_state", None)
        if st is None:
            other += prm.numel() * prm.element_size()
        else:
            packed += prm.numel() * prm.element_size()
            absmax += st.absmax.numel() * st.absmax.element_size() + st.code.numel() * st.code.element_size()
    p = plan(shapes_from_config(load_config(minilm_dir)), PlanConfig(method="qlora", rank=8, dtype="fp32", seq_len=128))
    assert (p.get("nf4 weights"), p.get("nf4 absmax+maps"), p.get("unquantized weights")) == (packed, absmax, other)


def test_nf4_and_full_precision_bytes_match_decompose_output_for_a_targets_subset(minilm_dir, tmp_path):
    """`plan --targets query,value` counts NF4 bytes for exactly the linears `decompose --targets query value`
    quantizes (double quant: nested absmax too), and full precision for every other weight it writes (not
    counted: the serialized quant-state blob, bnb's load-time metadata, and the int64 position_ids buffer)."""
    double_quant = True
    from safetensors import safe_open

    from qpissa.decompose import decompose
    out = tmp_path / "out"
    decompose(minilm_dir, out, method="qlora", rank=4, targets=["query", "value"], double_quant=double_quant,
              progress=False)
    packed = absmax = other = 0
    with safe_open(str(out / "residual" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for k in keys:
            n = f.get_slice(k)
            size = math.prod(n.get_shape()) * {"F32": 4, "U8": 1, "I64": 8}[n.get_dtype()]
            if f"{k}.absmax" in keys:
                packed += size
                absmax += 4  # double quant's fp32 offset: in memory a tensor, on disk a field of the quant-state blob
            elif k.rsplit(".", 1)[-1] in ("absmax", "quant_map") or ".nested_" in k:
                absmax += size
            elif ".quant_state." not in k and n.get_dtype() != "I64":
                other += size
    assert packed > 0 and other > 0
    p = plan(shapes_from_config(load_config(minilm_dir)),
             PlanConfig(method="qpissa", rank=4, targets="query,value", dtype="fp32", double_quant=double_quant, seq_len=128))
    assert (p.get("nf4 weights"), p.get("nf4 absmax+maps"), p.get("unquantized weights")) == (packed, absmax, other)
    assert packed == 6 * 2 * 384 * 384 // 2                     # query and value of 6 blocks; the rest stays fp32


# ------------------------------------------------------------------ adapters vs PEFT

@pytest.mark.parametrize("targets,peft_targets", [("all", "all-linear"),
                                                  ("attn", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                                  ("q_proj,v_proj", ["q_proj", "v_proj"])])
def test_adapter_params_match_peft_smollm2(smollm2_dir, targets, peft_targets):
    import transformers
    from peft import LoraConfig, get_peft_model
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=peft_targets))
    trainable, total = peft_model.get_nb_trainable_parameters()
    s = shapes_from_config(load_config(smollm2_dir))
    assert adapter_params(select_targets(s, targets), 8) == trainable
    assert s.n_params == total - trainable


def test_adapter_params_match_peft_minilm(minilm_dir):
    import transformers
    from peft import LoraConfig, get_peft_model
    model = transformers.AutoModel.from_pretrained(minilm_dir)
    trainable, total = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).get_nb_trainable_parameters()
    s = shapes_from_config(load_config(minilm_dir))
    assert plan(s, PlanConfig(rank=4, method="lora", seq_len=128)).trainable == trainable
    assert s.n_params == total - trainable


# ------------------------------------------------------------------ activations vs autograd's saved tensors

def _saved_bytes(model, run) -> int:
    """Bytes of distinct non-parameter storages autograd saves for backward during ``run()``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def test_llama_activation_formula_matches_saved_tensors(smollm2_dir):
    import transformers
    from peft import LoraConfig, get_peft_model
    # the first 4 real blocks keep the test fast (bf16 matmuls are slow on CPU); the formula is per block
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16, num_hidden_layers=4)
    model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))     # fp32 adapters (PEFT default)
    model.train()
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    got = _saved_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)
    s = shapes_from_config({**load_config(smollm2_dir), "num_hidden_layers": 4})
    cfg = PlanConfig(method="lora", rank=16, adapter_dtype="fp32", dtype="bf16")
    per_layer = llama_layer_bytes(s, cfg, select_targets(s, "all"))
    assert per_layer == 37_348                                                        # the docstring's example
    want = 48 * (s.layers * per_layer + 4 * s.hidden + 4 * s.vocab)                  # + final norm + log-softmax
    assert got == pytest.approx(want, rel=0.01)


def test_bert_activation_formula_matches_saved_tensors_cpu(minilm_dir):
    import transformers
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(transformers.AutoModel.from_pretrained(minilm_dir),
                           LoraConfig(r=8, target_modules="all-linear"))
    model.train()
    ids = torch.randint(0, 30522, (2, 64), generator=torch.Generator().manual_seed(0))
    got = _saved_bytes(model, lambda: model(input_ids=ids).last_hidden_state.mean())
    s = shapes_from_config(load_config(minilm_dir))
    cfg = PlanConfig(method="lora", rank=8, dtype="fp32", device="cpu")
    want = 128 * (s.layers * bert_layer_bytes(s, cfg, select_targets(s, "all"), 64) + 5 * s.hidden)
    assert got == pytest.approx(want, rel=0.03)


# ------------------------------------------------------------------ verdicts and searches

def test_70b_on_one_80gb_gpu():
    s = shapes("llama-3-70b")
    base = PlanConfig(rank=128, seq_len=2048, gpu_memory=parse_size("80GB"))
    assert plan(s, base).trainable == 1_656_750_080                                 # ≈ 1.66B: r=128 on all 7 linears × 80 blocks
    assert not plan(s, base).fits                                                    # no checkpointing: ~170 GB
    ckpt = plan(s, replace(base, grad_checkpointing=True))
    assert ckpt.fits and ckpt.total > 70e9
    lean = plan(s, replace(base, grad_checkpointing=True, optim="paged_adamw8bit", double_quant=True))
    assert lean.fits and lean.total < 65e9
    assert lean.get("optimizer states") == pytest.approx(2.03 * 1_656_750_080, rel=0.01)
    assert not plan(s, replace(base, method="full", grad_checkpointing=True)).fits
    assert not plan(s, replace(base, method="lora", grad_checkpointing=True)).fits    # bf16 base = 141 GB


def test_largest_batch_and_rank_are_the_boundary():
    s = shapes("llama-3-8b")
    cfg = PlanConfig(method="qpissa", rank=64, seq_len=1024, grad_checkpointing=True, gpu_memory=parse_size("24GB"))
    b = largest_batch(s, cfg)
    brute = max(x for x in range(0, 200) if x == 0 or plan(s, replace(cfg, batch_size=x)).fits)
    assert b == brute and b > 0
    r = largest_rank(s, cfg)
    assert plan(s, replace(cfg, rank=r)).fits and not plan(s, replace(cfg, rank=r + 1)).fits
    assert largest_batch(s, replace(cfg, gpu_memory=parse_size("4GB"))) == 0


def test_decompose_estimate_uses_the_driver_cost_model():
    s = shapes("llama-3-70b")
    rates = {"oversample": 16, "s_per_weight": {"base": 2e-8, "per_k": 1e-10, "per_extra_iter": 5e-9},
             "import_s": 7.0, "other_s_per_byte": 1e-9, "peak_bytes_per_weight": 12.0}
    est = decompose_estimate(s, rank=128, iterations=3, rates=rates)
    assert est["largest"] == [28672, 8192] and est["tensors"] == 560
    assert est["peak_bytes"] == 512 * 2**20 + 12 * 28672 * 8192
    mn = 80 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192)            # elements of all 560 linears
    assert est["seconds"] == pytest.approx(7.0 + 2 * 70_553_706_496 * 1e-9 + mn * (2e-8 + 144e-10 + 2 * 5e-9))


def test_fit_rates_recovers_the_cost_model():
    from qpissa.plan.decompose_cost import fit_rates, per_weight_seconds
    truth = {"oversample": 16, "s_per_weight": {"base": 3e-8, "per_k": 2e-10, "per_extra_iter": 7e-9}}
    runs = [{"rank": r, "iters": t, "weights": w, "seconds": 9.0 + w * per_weight_seconds(truth, r, t)}
            for r, t, w in ((16, 1, 10**8), (128, 1, 10**8), (16, 5, 10**8), (16, 1, 2 * 10**7))]
    rates, fixed = fit_rates(runs)
    assert rates == pytest.approx(truth["s_per_weight"], rel=1e-6) and fixed == pytest.approx(9.0, rel=1e-6)


def test_packaged_rates_come_from_timing_the_driver():
    from qpissa.plan.decompose_cost import load_rates
    rates = load_rates()
    assert "qpissa.decompose" in rates["source"]
    assert [(r["rank"], r["iters"]) for r in rates["calibration"]] == [(16, 1), (128, 1), (16, 5), (16, 1)]
    assert all(v > 0 for v in rates["s_per_weight"].values()) and rates["peak_bytes_per_weight"] > 0


# ------------------------------------------------------------------ user errors

def test_bad_config_files(tmp_path):
    with pytest.raises(UserError, match="no such config"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(bad)
    gpt = tmp_path / "gpt.json"
    gpt.write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(UserError, match="'mamba' is not supported"):
        shapes_from_config(load_config(gpt))
    half = tmp_path / "half.json"
    half.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(UserError, match="intermediate_size"):
        shapes_from_config(load_config(half))
    with pytest.raises(UserError, match="no linear named"):
        select_targets(shapes("llama-2-7b"), "query")
    with pytest.raises(UserError, match="memory size"):
        parse_size("lots")
    assert parse_size("80GB") == 80 * 10**9 and parse_size("1GiB") == 2**30 and parse_size("512MiB") == 2**29


CLI = [sys.executable, "-c", "from qpissa.cli import main; main()"]


def test_cli_plan_json_and_error(tmp_path):
    out = tmp_path / "plan.json"
    ok = subprocess.run([*CLI, "plan", str(CONFIGS / "llama-3-70b.json"),
                         "--grad-checkpointing", "--optim", "paged_adamw8bit", "--double-quant", "--json", str(out)],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "fits" in ok.stdout
    data = json.loads(out.read_text())
    assert data["fits"] and data["largest_batch"] >= 1 and data["decompose"]["tensors"] == 560
    bad = subprocess.run([*CLI, "plan", str(tmp_path / "nope.json")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "nope.json" in bad.stderr and "Traceback" not in bad.stderr


def test_bert_plan_matches_what_decompose_makes(minilm_dir, tmp_path):
    """No logits row (no LM head), fp32 adapters need no master copy, the pooler is neither adapted nor NF4,
    and --seq-len beyond the position table is refused."""
    s = shapes_from_config(load_config(minilm_dir))
    p = plan(s, PlanConfig(method="qpissa", rank=8, seq_len=128, adapter_dtype="fp32"))
    names = [c.name for c in p.components]
    assert "loss (logits)" not in names
    master = next(c for c in p.components if c.name == "fp32 master copy")
    assert master.bytes == 0 and "16-bit" not in master.detail
    block_linears = 6 * (4 * 384 * 384 + 2 * 384 * 1536)  # 6 layers: q,k,v,o + intermediate + output
    assert p.get("nf4 weights") == block_linears // 2
    assert p.trainable == 6 * 8 * (4 * (384 + 384) + 2 * (384 + 1536))  # the 36 block linears, not pooler.dense
    with pytest.raises(UserError, match="max_position_embeddings 512"):
        plan(s, PlanConfig(method="qpissa", rank=8, seq_len=2048))
    proc = subprocess.run([sys.executable, "-c", "from qpissa.cli import main; main()", "plan", str(minilm_dir),
                           "--seq-len", "2048", "--device", "cpu"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--seq-len 2048" in proc.stderr
