"""MoE rehearsal without a download: a 2-layer checkpoint with Qwen3-30B-A3B's shapes, decomposed with defaults,
beside PEFT's own path on the same layers.

Shapes are Qwen3-30B-A3B's (hidden 2048, 32 heads / 4 KV heads of 128, 128 experts of moe_intermediate 768, router
128×2048, q/k norms) except the vocabulary (32,000 instead of 151,936: embeddings and head are not targets). Weights
follow ``synthetic_checkpoint.synthetic_linear`` (decaying spectrum + heavy-tailed bulk + outlier channels); experts
are written one tensor per expert, as ``save_pretrained`` does.

1. ours: ``qpissa.decompose.decompose(CKPT, OUT)`` with defaults (qpissa r=16, experts NF4), in a fresh process:
   wall and CPU seconds, peak RSS above the import baseline (VmHWM reset after the imports).
2. PEFT's path on the same checkpoint, in a fresh process: transformers + bitsandbytes 4-bit load (NF4 for
   ``nn.Linear``; the experts stay bf16) and ``LoraConfig(target_parameters=experts, init_lora_weights=…)``, once
   with ``pissa_niter_4`` (its PiSSA init; the error is recorded) and once with the default init (QLoRA-style):
   seconds, peak RSS, and the bytes the experts hold in memory.
3. bytes of the experts: bf16 in the checkpoint vs NF4 in OUT/residual; per layer × 48 layers for the full model.

Usage: python benchmarks/moe_rehearsal.py [--dir /tmp/moe-rehearsal] [--threads 1] [--layers 2]
Writes benchmarks/results/moe_rehearsal.json. Timings on a loaded machine are inflated: say so.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_checkpoint import _generator, _norm_weight, synthetic_linear  # noqa: E402

HIDDEN, HEADS, KV, HEAD_DIM, EXPERTS, MOE_I, VOCAB, LAYERS_FULL = 2048, 32, 4, 128, 128, 768, 32_000, 48


def write_checkpoint(out: Path, layers: int = 2, seed: int = 0, experts: int = EXPERTS) -> Path:
    """Per-layer shards (bf16) + index + a Qwen3MoeConfig config.json; reused when complete."""
    from transformers import Qwen3MoeConfig

    from qpissa.atomic import write_json
    from qpissa.formats import DTYPE_NAMES, write_index, write_safetensors

    marker = out / "synthetic.json"
    stamp = {"layers": layers, "seed": seed, "generator": "qpissa synthetic qwen3-30b-a3b v1",
             **({"experts": experts} if experts != EXPERTS else {})}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total, shards = {}, 0, {}
    for i in range(layers):
        p = f"model.layers.{i}"
        names = [(f"{p}.self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
                 (f"{p}.self_attn.k_proj.weight", (KV * HEAD_DIM, HIDDEN)),
                 (f"{p}.self_attn.v_proj.weight", (KV * HEAD_DIM, HIDDEN)),
                 (f"{p}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
                 (f"{p}.self_attn.q_norm.weight", (HEAD_DIM,)), (f"{p}.self_attn.k_norm.weight", (HEAD_DIM,)),
                 (f"{p}.input_layernorm.weight", (HIDDEN,)), (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
                 (f"{p}.mlp.gate.weight", (experts, HIDDEN))]
        for e in range(experts):
            names += [(f"{p}.mlp.experts.{e}.gate_proj.weight", (MOE_I, HIDDEN)),
                      (f"{p}.mlp.experts.{e}.up_proj.weight", (MOE_I, HIDDEN)),
                      (f"{p}.mlp.experts.{e}.down_proj.weight", (HIDDEN, MOE_I))]
        shards[f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors"] = names
    shards[f"model-{layers + 1:05d}-of-{layers + 1:05d}.safetensors"] = [
        ("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        gen = _generator(seed, name)
        if len(shape) == 1:
            return _norm_weight(shape[0], gen)
        if "embed" in name or "lm_head" in name or name.endswith("mlp.gate.weight"):
            return (0.02 * torch.randn(*shape, generator=gen)).to(torch.bfloat16)
        return synthetic_linear(*shape, gen)

    for shard, names in shards.items():
        shapes = dict(names)
        entries = [(n, DTYPE_NAMES[torch.bfloat16], s, 2 * math.prod(s)) for n, s in names]
        write_safetensors(out / shard, entries, lambda n: make(n, shapes[n]))
        for n, _, _, nbytes in entries:
            weight_map[n], total = shard, total + nbytes
    write_index(out, weight_map, total)
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=6144, moe_intermediate_size=MOE_I,
                         num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM,
                         num_experts=experts, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                         tie_word_embeddings=False, max_position_embeddings=40960, rope_theta=1e6,
                         architectures=["Qwen3MoeForCausalLM"], torch_dtype="bfloat16")
    write_json(out / "config.json", cfg.to_dict())
    write_json(marker, stamp)
    return out


PROLOGUE = textwrap.dedent('''
    import json, os, resource, sys, time, torch
    torch.set_num_threads({threads})
    def hwm():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
    def rss():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
''')

OURS = PROLOGUE + textwrap.dedent('''
    from qpissa.decompose import decompose
    open("/proc/self/clear_refs", "w").write("5")
    base, t0, c0 = rss(), time.perf_counter(), time.process_time()
    decompose(sys.argv[1], sys.argv[2], progress=False, overwrite=True, expert_batch=sys.argv[3] == "batch")
    print(json.dumps({{"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                      "peak_rss_above_imports": hwm() - base}}))
''')

PEFT = PROLOGUE + textwrap.dedent('''
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model
    open("/proc/self/clear_refs", "w").write("5")
    base, t0, c0 = rss(), time.perf_counter(), time.process_time()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=q, dtype=torch.bfloat16)
    init = sys.argv[2] if sys.argv[2] != "default" else True
    cfg = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], init_lora_weights=init)
    out = {{}}
    try:
        model = get_peft_model(model, cfg)
    except Exception as err:
        out["error"] = f"{{type(err).__name__}}: {{err}}"
    experts = [m for n, m in model.named_modules() if type(m).__name__ == "Qwen3MoeExperts"]
    out.update({{"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                "peak_rss_above_imports": hwm() - base,
                "expert_bytes_in_memory": sum(p.numel() * p.element_size() for m in experts for p in m.parameters()),
                "expert_dtype": str(experts[0].gate_up_proj.dtype)}})
    print(json.dumps(out))
''')


def run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_outputs(per: Path, batch: Path) -> dict:
    """The batched experts against the per-matrix ones: each expert's ‖W − Ŵ‖_F (relative difference), the
    share of NF4 bytes that differ, and ‖ΔB·A‖-style factor differences (relative, per adapter tensor)."""
    from safetensors import safe_open

    def modules(out: Path) -> dict:
        return {m["module"]: m for m in json.loads((out / "report.json").read_text())["modules"]}

    a, b = modules(per), modules(batch)
    rel = [abs(b[k]["method"]["frobenius"] - a[k]["method"]["frobenius"]) / a[k]["method"]["frobenius"]
           for k in a if ".experts." in k]
    qlora = max(abs(b[k]["qlora"]["frobenius"] - a[k]["qlora"]["frobenius"]) / a[k]["qlora"]["frobenius"]
                for k in a if ".experts." in k)
    differ = total = 0
    with safe_open(str(per / "residual" / "nf4-experts.safetensors"), "pt") as f, \
            safe_open(str(batch / "residual" / "nf4-experts.safetensors"), "pt") as g:
        for key in f.keys():
            x = f.get_tensor(key)
            if x.dtype == torch.uint8 and x.ndim == 2:
                differ += int((x != g.get_tensor(key)).sum())
                total += x.numel()
    factors = []
    with safe_open(str(per / "adapter" / "adapter_model.safetensors"), "pt") as f, \
            safe_open(str(batch / "adapter" / "adapter_model.safetensors"), "pt") as g:
        for key in (k for k in f.keys() if ".experts." in k):
            x, y = f.get_tensor(key).float(), g.get_tensor(key).float()
            factors.append(float((x - y).norm() / x.norm()))
    return {"experts": len(rel), "max_rel_frobenius_diff": max(rel), "mean_rel_frobenius_diff": sum(rel) / len(rel),
            "mean_frobenius_per_matrix": sum(a[k]["method"]["frobenius"] for k in a if ".experts." in k) / len(rel),
            "mean_frobenius_batched": sum(b[k]["method"]["frobenius"] for k in a if ".experts." in k) / len(rel),
            "max_rel_qlora_diff": qlora, "nf4_bytes_differing": differ / total,
            "max_rel_factor_diff": max(factors)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/moe-rehearsal")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2, help="blocks of Qwen3-30B-A3B shapes (figures scale per layer)")
    ap.add_argument("--skip-peft", action="store_true", help="only ours: per-matrix vs batched experts")
    ap.add_argument("--experts", type=int, default=EXPERTS, help="experts per block (Qwen3-30B-A3B: 128; fewer: a "
                                                                   "proportionally scaled rehearsal)")
    args = ap.parse_args()
    root = Path(args.dir)
    ckpt = write_checkpoint(root / "ckpt", args.layers, experts=args.experts)
    result = {"checkpoint": str(ckpt), "threads": args.threads, "layers": args.layers, "experts_per_block": args.experts,
              "ours_per_matrix": run(OURS.format(threads=args.threads), str(ckpt), str(root / "out-per"), "per"),
              "ours": run(OURS.format(threads=args.threads), str(ckpt), str(root / "out"), "batch")}
    result["batch_speedup_wall"] = result["ours_per_matrix"]["seconds"] / result["ours"]["seconds"]
    result["batch_speedup_cpu"] = result["ours_per_matrix"]["cpu_seconds"] / result["ours"]["cpu_seconds"]
    result["batch_vs_per_matrix"] = compare_outputs(root / "out-per", root / "out")
    if not args.skip_peft:
        result["peft_pissa"] = run(PEFT.format(threads=args.threads), str(ckpt), "pissa_niter_4")
        result["peft_default"] = run(PEFT.format(threads=args.threads), str(ckpt), "default")
    from safetensors import safe_open

    bf16 = 0
    for shard in ckpt.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            bf16 += sum(2 * math.prod(f.get_slice(k).get_shape()) for k in f.keys() if ".experts." in k)
    nf4 = (root / "out" / "residual" / "nf4-experts.safetensors").stat().st_size
    report = json.loads((root / "out" / "report.json").read_text())
    per = args.layers * args.experts / EXPERTS  # in full blocks of 128 experts
    result["experts"] = {"bf16_bytes": bf16, "nf4_file_bytes": nf4,
                         "ratio": nf4 / bf16, f"bf16_GB_{LAYERS_FULL}_layers": bf16 / per * LAYERS_FULL / 1e9,
                         f"nf4_GB_{LAYERS_FULL}_layers": nf4 / per * LAYERS_FULL / 1e9,
                         "reduction_vs_qlora_frobenius": {k: v["reduction_vs_qlora"]["frobenius"]
                                                          for k, v in report["by_layer_type"].items()},
                         "quantized_share": report["coverage"]["groups"]["quantized_4bit"]["share"]}
    dest = Path(__file__).parent / "results" / ("moe_rehearsal.json" if not args.skip_peft else "moe_rehearsal_batch.json")
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
