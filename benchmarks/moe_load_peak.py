"""Peak memory of ``qpissa.moe.load`` on a synthetic MoE: the experts never held in bf16.

Builds a Qwen3-MoE checkpoint of a few hundred MB (random weights; the load does not care about their spectrum),
decomposes it with ``--method qlora`` (NF4 residual, the fastest decompose; the load path is the same for every
method), then loads ``OUT`` in a fresh process twice:

* ``meta``: ``qpissa.moe.load(OUT)`` as shipped (experts stay placeholders while transformers loads the rest);
* ``bf16_first``: the earlier path, ``AutoModelForCausalLM.from_pretrained`` (transformers allocates and
  initializes every fused expert parameter in bf16) then :func:`qpissa.moe.attach_nf4_experts`.

Each figure is the peak RSS above the process's RSS after its imports (VmHWM reset with /proc/self/clear_refs),
beside the bytes it is compared with: the NF4 experts file, the dense shards, one block's experts in bf16 and
all experts in bf16. ``qwen3_30b_a3b`` scales the same accounting to Qwen3-30B-A3B's shapes (48 blocks, 128
experts of 768×2048, vocab 151,936) from its config numbers: computed, not measured.

Usage: python benchmarks/moe_load_peak.py [--dir /tmp/moe-load-peak] [--layers 4] [--hidden 1024] [--experts 32]
Writes benchmarks/results/moe_load_peak.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

PROLOGUE = textwrap.dedent('''
    import json, sys, torch
    torch.set_num_threads(1)
    import transformers, peft, bitsandbytes  # noqa: F401  (their import cost is not the load's)
    import qpissa.moe
    from transformers import AutoModelForCausalLM
    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
''')
LOADS = {
    "meta": "model = qpissa.moe.load(sys.argv[1])",
    "bf16_first": textwrap.dedent('''
        from pathlib import Path
        residual = Path(sys.argv[1]) / "residual"
        model = AutoModelForCausalLM.from_pretrained(residual, dtype=torch.bfloat16)
        qpissa.moe.attach_nf4_experts(model, residual)'''),
}
EPILOGUE = textwrap.dedent('''
    print(json.dumps({"peak_above_imports": status("VmHWM") - base, "resident_after": status("VmRSS") - base,
                      "model_bytes": qpissa.moe.resident_bytes(model)}))
''')


def build(dest: Path, layers: int, hidden: int, inter: int, experts: int, vocab: int = 4096) -> Path:
    """A Qwen3-MoE checkpoint in bf16 (transformers' own random init), written by save_pretrained."""
    import torch
    import transformers

    if (dest / "config.json").is_file():
        return dest
    cfg = transformers.Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                      moe_intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=8,
                                      num_key_value_heads=4, head_dim=hidden // 8, num_experts=experts,
                                      num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
                                      max_position_embeddings=256, tie_word_embeddings=False,
                                      architectures=["Qwen3MoeForCausalLM"])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(dest)
    return dest


def measure(out: Path, which: str) -> dict:
    """One load in a fresh process; its peak and resident bytes above the imports."""
    proc = subprocess.run([sys.executable, "-c", PROLOGUE + LOADS[which] + "\n" + EPILOGUE, str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def accounting(ckpt: Path, out: Path) -> dict:
    """Bytes the peaks are compared with, read from the files."""
    from safetensors import safe_open

    experts_bf16, dense, blocks = 0, 0, set()
    for shard in ckpt.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                n = 2 * int(torch_prod(f.get_slice(k).get_shape()))
                if ".experts." in k:
                    experts_bf16 += n
                    blocks.add(k.split(".experts.")[0])
                else:
                    dense += n
    residual = out / "residual"
    nf4 = (residual / "nf4-experts.safetensors").stat().st_size
    shards = sum(p.stat().st_size for p in residual.glob("*.safetensors") if p.name != "nf4-experts.safetensors")
    return {"experts_bf16": experts_bf16, "one_block_experts_bf16": experts_bf16 // len(blocks),
            "dense_bf16": dense, "nf4_experts_file": nf4, "residual_shards": shards}


def torch_prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def qwen3_30b_a3b() -> dict:
    """The same accounting for Qwen3-30B-A3B's shapes (config numbers; computed, not measured)."""
    hidden, layers, experts, inter, vocab, heads, kv, head_dim = 2048, 48, 128, 768, 151_936, 32, 4, 128
    expert_weights = layers * experts * 3 * inter * hidden
    attn = layers * (2 * heads * head_dim * hidden + 2 * kv * head_dim * hidden)
    nf4 = lambda n: n // 2 + n // 64 * 4  # noqa: E731  packed bytes + fp32 absmax per 64 weights
    block_bf16 = 2 * experts * 3 * inter * hidden
    embed = 2 * 2 * vocab * hidden  # embeddings + head in bf16
    four_bit = nf4(expert_weights) + nf4(attn) + embed
    return {"experts_bf16_GB": 2 * expert_weights / 1e9, "bf16_model_GB": (2 * (expert_weights + attn) + embed) / 1e9,
            "four_bit_GB": four_bit / 1e9, "one_block_experts_bf16_GB": block_bf16 / 1e9,
            "expected_peak_GB": (four_bit + block_bf16) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/moe-load-peak")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--experts", type=int, default=32)
    args = ap.parse_args()
    root = Path(args.dir)
    ckpt = build(root / "ckpt", args.layers, args.hidden, args.inter, args.experts)
    out = root / "out"
    if not (out / "report.json").is_file():
        from qpissa.decompose import decompose

        decompose(ckpt, out, method="qlora", rank=8, progress=False, overwrite=True, loftq_baseline=False,
                  spectral_norms=False)
    result = {"shape": vars(args), "bytes": accounting(ckpt, out),
              "meta": measure(out, "meta"), "bf16_first": measure(out, "bf16_first"), "qwen3_30b_a3b": qwen3_30b_a3b()}
    dest = Path(__file__).parent / "results" / "moe_load_peak.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    mb = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    b = result["bytes"]
    print(f"experts bf16 {mb(b['experts_bf16'])}, one block {mb(b['one_block_experts_bf16'])}, "
          f"NF4 experts file {mb(b['nf4_experts_file'])}, residual shards {mb(b['residual_shards'])}")
    for which in ("meta", "bf16_first"):
        print(f"{which:>10}: peak above imports {mb(result[which]['peak_above_imports'])}, "
              f"resident after {mb(result[which]['resident_after'])}")
    print(json.dumps(result["qwen3_30b_a3b"]))


if __name__ == "__main__":
    main()
