"""Every decompose report says what share of the checkpoint ended up 4-bit (counted here from the files)."""
from __future__ import annotations

import json
import math
import re
import sys

import pytest
from safetensors import safe_open

from qpissa.decompose import decompose
from qpissa.decompose.coverage import coverage, warning
from qpissa.formats import TensorInfo


def counts(path) -> dict[str, tuple[int, str]]:
    """name → (elements, dtype) straight from a safetensors file."""
    out = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            s = f.get_slice(k)
            out[k] = (math.prod(s.get_shape()), s.get_dtype())
    return out


def packed_4bit_elements(residual_dir) -> int:
    """Weights held as NF4 in a residual: packed uint8 tensors hold two weights a byte."""
    total = 0
    for shard in residual_dir.glob("*.safetensors"):
        total += sum(2 * n for k, (n, dt) in counts(shard).items() if dt == "U8" and k.endswith(".weight"))
    return total


def test_minilm_shares_match_the_files(minilm_dir, tmp_path, monkeypatch, capsys):
    """all-MiniLM-L6-v2: encoder linears (46.7%) are 4-bit, so the warning names the word embeddings."""
    from qpissa.cli import main

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["qpissa", "decompose", str(minilm_dir), "-o", str(out), "--rank", "2",
                                      "--no-loftq-baseline", "--no-spectral-norms", "--quiet"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    src = counts(minilm_dir / "model.safetensors")
    total = sum(n for n, _ in src.values())
    linear = re.compile(r"(bert\.)?encoder\.layer\.\d+\..*(query|key|value|dense)\.weight")
    four_bit = sum(n for k, (n, _) in src.items() if linear.fullmatch(k))
    outside = sum(n for k, (n, _) in src.items() if not re.search(r"\.\d+\.", k))
    cov = json.loads((out / "report.json").read_text())["coverage"]
    g = cov["groups"]
    assert cov["total_params"] == total
    assert g["quantized_4bit"]["params"] == four_bit == packed_4bit_elements(out / "residual")
    assert g["embeddings_heads"]["params"] == outside
    assert g["non_targets"]["params"] == total - four_bit - outside  # norms and biases inside blocks
    assert g["quantized_4bit"]["share"] == pytest.approx(four_bit / total) and 0.4 < four_bit / total < 0.5
    word = max((k for k in src if not linear.fullmatch(k)), key=lambda k: src[k][0])
    assert "word_embeddings" in word
    share_line = f"{100 * four_bit / total:.1f}% 4-bit NF4"
    for text in (printed, (out / "report.md").read_text()):
        assert share_line in text
        assert text.count("warning: only") == 1
        warn = next(line for line in text.splitlines() if "warning: only" in line)
        assert word in warn and "no flag quantizes embeddings" in warn
    assert printed.index("warning: only") > printed.index("vs QLoRA")  # after the table, before the load snippet


@pytest.mark.slow
def test_smollm2_most_weights_4bit_no_warning(smollm2_dir, tmp_path):
    """SmolLM2-135M (tied head, bf16): all block linears 4-bit ≈ 79%; counted from the checkpoint, no warning."""
    src = counts(smollm2_dir / "model.safetensors")
    total = sum(n for n, _ in src.values())
    linear = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
    four_bit = sum(n for k, (n, _) in src.items() if linear.fullmatch(k))
    infos = [TensorInfo(k, smollm2_dir / "model.safetensors", (n,), dt) for k, (n, dt) in src.items()]
    cov = coverage(infos, [k for k in src if linear.fullmatch(k)], quantized=True)
    assert cov["groups"]["quantized_4bit"]["share"] == pytest.approx(four_bit / total) and four_bit / total > 0.75
    assert cov["groups"]["embeddings_heads"]["params"] == src["model.embed_tokens.weight"][0] + src["model.norm.weight"][0]
    assert warning(cov) is None
    # a real run on two layers only: the same count path, and the warning names the embeddings (28.3M weights)
    out = tmp_path / "out"
    rep = decompose(smollm2_dir, out, rank=2, targets=[r"model\.layers\.0\.self_attn\.q_proj"], loftq_baseline=False,
                    spectral_norms=False, progress=False)
    assert rep["coverage"]["groups"]["quantized_4bit"]["params"] == 576 * 576 == packed_4bit_elements(out / "residual")
    assert rep["coverage"]["largest_untouched"][0]["tensors"] == "model.embed_tokens.weight"


def test_warning_names_moe_experts_and_the_flag(tmp_path):
    """Experts left out of the targets: the warning names their tensors and a --targets regex that matches them."""
    infos = [TensorInfo("model.embed_tokens.weight", tmp_path, (100, 16), "BF16")]
    for layer in range(2):
        infos += [TensorInfo(f"model.layers.{layer}.self_attn.q_proj.weight", tmp_path, (16, 16), "BF16"),
                  TensorInfo(f"model.layers.{layer}.mlp.gate.weight", tmp_path, (8, 16), "BF16")]
        infos += [TensorInfo(f"model.layers.{layer}.mlp.experts.{e}.{p}.weight", tmp_path, shape, "BF16")
                  for e in range(8) for p, shape in (("gate_proj", (32, 16)), ("up_proj", (32, 16)),
                                                     ("down_proj", (16, 48)))]
    routers = [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    cov = coverage(infos, [i.name for i in infos if "q_proj" in i.name], quantized=True, router_names=routers)
    line = warning(cov)
    assert line is not None and "model.layers.*.mlp.experts.*.down_proj.weight" in line
    regex = re.search(r"--targets '([^']+)'", line).group(1)
    assert re.fullmatch(regex, "model.layers.1.mlp.experts.7.down_proj")
    assert cov["router_params"] == 2 * 8 * 16
    expert = 2 * 8 * (2 * 32 * 16 + 16 * 48)
    assert cov["groups"]["non_targets"]["params"] == expert + 2 * 8 * 16
    assert cov["groups"]["quantized_4bit"]["share"] == pytest.approx(2 * 256 / (1600 + 2 * 256 + 2 * 128 + expert))
