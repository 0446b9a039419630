"""Tiny dense decoders (Llama, Qwen2, Qwen3) with a Qwen-style byte-level BPE tokenizer trained here on the GSM8K
fixture (Qwen2's split rule, ChatML template), for the GGUF export tests. bf16, 2 layers, hidden 64."""
from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 384  # the config's vocab_size; the tokenizer fills fewer ids, the rest are unused rows (as Qwen pads)


def build_tokenizer(dest: Path, vocab: int = 360) -> Path:
    """Train a byte-level BPE (Qwen2's pre-tokenizer) on the fixture questions and save it with a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k" / "train.jsonl").read_text().splitlines()]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["question"] + "\n" + r["answer"] for r in rows], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(dest)
    return dest


def build_sentencepiece_tokenizer(dest: Path, vocab: int = 380) -> Path:
    """A Llama-2-style tokenizer.json (SentencePiece BPE: "▁" for spaces, a dummy prefix, byte fallback <0xNN>, BOS
    prepended) trained on the fixture questions; replaces the tokenizer files in ``dest``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k" / "train.jsonl").read_text().splitlines()]
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([r["question"] for r in rows], trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                                               initial_alphabet=[]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    for f in [*dest.glob("tokenizer*"), dest / "chat_template.jinja"]:
        f.unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(dest)
    return dest


def build(family: str, dest: Path, seed: int = 0, intermediate: int = 128) -> Path:
    """Save a tiny ``family`` ∈ {llama, qwen2, qwen3, gemma3_text} (random weights, std 0.08: peaked enough for greedy ties to be
    rare) with the tokenizer above."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.08, eos_token_id=2,
                  pad_token_id=0)
    cfg, cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[family]
    if family == "qwen3":  # transformers' GGUF loader takes Qwen3's head_dim from its default (128), not the file
        common.update(num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    if family == "gemma3_text":
        common.update(sliding_window=32, tie_word_embeddings=True, query_pre_attn_scalar=16)  # llama.cpp: 1/√head_dim
    torch.manual_seed(seed)
    model = cls(cfg(**common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)  # not all ones, so a lost norm shift or wrong norm would show
            elif name.endswith(".bias"):
                p.normal_(0, 0.05)
    model.to(torch.bfloat16).save_pretrained(dest)
    build_tokenizer(dest)
    return dest
