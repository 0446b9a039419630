"""Slow tier: a real llama.cpp (``llama-cpp-python``, built from PyPI by .ci/run) runs what ``qpissa export`` wrote.

Greedy tokens of the f16 export equal transformers' on the same (merged) weights; the QPiSSA split (residual +
GGUF LoRA) gives the merged export's logits; the chat template and llama.cpp's tokenization round-trip.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import gguf_models as gm
from qpissa.use.gguf_export import ExportConfig, export_gguf

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow
PROMPTS = ["Natalia sold clips to 48 of her friends in April.", "What is 12 times 7?\n\nAnswer:",
           "The capital of France is"]


def _llama(path: Path, lora: Path | None = None):
    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, seed=0,
                           verbose=False, **kwargs)


def _greedy_llama_cpp(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def _logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])  # (T, V)


def _hf(model_dir: Path, adapter: Path | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def _greedy_hf(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_smollm2_f16_greedy_matches_transformers(smollm2_dir, tmp_path):
    export_gguf(smollm2_dir, tmp_path / "smol.gguf")
    model, tok = _hf(smollm2_dir)
    llm = _llama(tmp_path / "smol.gguf")
    for text in PROMPTS[1:]:
        ids = tok(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids  # llama.cpp tokenizes as transformers
        assert _greedy_llama_cpp(llm, ids, 10) == _greedy_hf(model, ids, 10), text
    # chat template: stored verbatim, rendered and tokenized by llama.cpp's side as by transformers
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    messages = [{"role": "user", "content": "How many clips did Natalia sell?"}]
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"], eos_token=tok.eos_token, bos_token=tok.bos_token or "")
    prompt = formatter(messages=messages).prompt
    assert prompt == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert ids == tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"]


def test_gemma3_f16_greedy_matches_transformers(tmp_path):
    """Gemma 3 (norms +1, embedding scaled by √hidden, sliding-window layers) in llama.cpp = transformers."""
    model_dir = gm.build("gemma3_text", tmp_path / "gemma3")
    export_gguf(model_dir, tmp_path / "g.gguf")
    model, tok = _hf(model_dir)
    llm = _llama(tmp_path / "g.gguf")
    for text in PROMPTS[:2]:
        ids = tok(text)["input_ids"]
        assert _greedy_llama_cpp(llm, ids, 10) == _greedy_hf(model, ids, 10), text


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_f16_greedy_matches_transformers(tmp_path, family):
    """Qwen3-MoE and Mixtral (experts stored one matrix each, stacked into llama.cpp's ffn_*_exps)."""
    import json

    import moe_models

    tokenizer = gm.build_tokenizer(tmp_path / "tok")
    model_dir = moe_models.build(family, tmp_path / family, tokenizer=tokenizer)
    if family == "qwen3_moe":  # llama.cpp's qwen3moe always renormalizes the top-k weights (real Qwen3-MoE configs do)
        cfg = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**cfg, "norm_topk_prob": True}))
    summary = export_gguf(model_dir, tmp_path / "moe.gguf")
    assert summary["notes"] == []
    model, tok = _hf(model_dir)
    llm = _llama(tmp_path / "moe.gguf")
    for text in PROMPTS[:2]:
        ids = tok(text)["input_ids"]
        assert _greedy_llama_cpp(llm, ids, 10) == _greedy_hf(model, ids, 10), text


def test_sentencepiece_tokenizer_tokenizes_as_transformers(tmp_path):
    """A SentencePiece-BPE tokenizer.json (Llama 2 / Mistral style, byte fallback) → llama.cpp's `llama` vocab: the
    same ids as transformers, BOS included, on text with digits, accents, CJK and double spaces."""
    import json

    from transformers import AutoTokenizer

    model_dir = gm.build_sentencepiece_tokenizer(gm.build("llama", tmp_path / "spm"))
    export_gguf(model_dir, tmp_path / "s.gguf")
    tok, llm = AutoTokenizer.from_pretrained(model_dir), _llama(tmp_path / "s.gguf")
    rows = [json.loads(x) for x in (gm.FIXTURES / "gsm8k" / "test.jsonl").read_text().splitlines()[:20]]
    for text in [r["question"] for r in rows] + ["ünïcødé 漢字 test", "  two  spaces"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen2 model decomposed with QPiSSA (NF4 residual, r=8 on q/k/v/o/gate/up/down) and its adapter moved
    as a training run would (seeded noise), so the split and the merge differ."""
    import shutil

    from safetensors.torch import load_file

    from qpissa.decompose import decompose
    from qpissa.formats import save_tensors

    root = tmp_path_factory.mktemp("qwen_run")
    model_dir = gm.build("qwen2", root / "qwen2")
    out = root / "out"
    decompose(model_dir, out, method="qpissa", rank=8, svd="exact", loftq_baseline=False, progress=False)
    run = root / "run" / "adapter"
    gen = torch.Generator().manual_seed(7)
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    save_tensors(run / "adapter_model.safetensors",
                 {k: (v.float() + 0.1 * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
                  for k, v in sorted(tensors.items())})
    shutil.copy(out / "adapter" / "adapter_config.json", run / "adapter_config.json")
    return {"model": model_dir, "out": out, "run": run}


def test_qwen_merged_f16_greedy_matches_transformers(qwen_run, tmp_path):
    """The merged export of OUT + trained adapter vs transformers on residual + adapter, merged by PEFT."""
    from qpissa.use.merge import merge

    export_gguf(qwen_run["run"], tmp_path / "q.gguf")
    merge(qwen_run["out"] / "residual", qwen_run["run"], tmp_path / "merged")  # plain HF reference (fp32 deq + s·B·A)
    model, tok = _hf(tmp_path / "merged")
    llm = _llama(tmp_path / "q.gguf")
    for text in PROMPTS[:2]:
        ids = tok(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert _greedy_llama_cpp(llm, ids, 12) == _greedy_hf(model, ids, 12), text


@pytest.mark.parametrize("fam", ["qwen2", "llama"])
def test_split_lora_matches_merged_logits(qwen_run, tmp_path, fam):
    """residual.gguf + --lora adapter.gguf in llama.cpp gives the merged f16 export's logits (llama: B's q/k rows
    reordered like the model's)."""
    if fam == "llama":
        from qpissa.decompose import decompose

        out = tmp_path / "out"
        decompose(gm.build("llama", tmp_path / "llama"), out, method="qpissa", rank=8, svd="exact",
                  loftq_baseline=False, progress=False)
        src = out
    else:
        src = qwen_run["run"]
    export_gguf(src, tmp_path / "m.gguf")
    export_gguf(src, tmp_path / "s.gguf", ExportConfig(split="adapter"))
    ids = list(range(5, 45))
    merged = _logits(_llama(tmp_path / "m.gguf"), ids)
    split = _logits(_llama(tmp_path / "s.gguf", lora=tmp_path / "s-lora.gguf"), ids)
    residual = _logits(_llama(tmp_path / "s.gguf"), ids)
    err, moved = np.abs(split - merged).max(), np.abs(residual - merged).max()
    assert err < 0.02 * np.abs(merged).max(), (err, np.abs(merged).max())
    assert moved > 10 * err  # without the LoRA the logits are far off: the adapter is applied, not ignored
