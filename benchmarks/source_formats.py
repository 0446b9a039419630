"""QPiSSA started from a published quantized copy of a model vs from its bf16 original (SmolLM2-135M-Instruct).

For each format a copy of the bf16 model is written (FP8 e4m3 64×64 blocks; bitsandbytes NF4 and FP4 through
transformers; GPTQ-layout round-to-nearest 4-bit, groups of 64, packed from the format's spec — not the GPTQ
algorithm; compressed-tensors w4a16 groups of 32 through the library), then ``qpissa decompose`` (QPiSSA
r=16, T=1, every linear of the blocks) and ``qpissa merge --dtype float32`` (= deq(NF4 residual) + s·B·A) run
on it. Per format, summed Frobenius norms over the 210 targets:

- ``source_err``   ‖W − S‖: the copy's own quantization error (needs the original: a user of the copy can't see it)
- ``reported``     ‖S − merged‖: what decompose's report says (against the dequantized source)
- ``qlora``        ‖S − NF4(S)‖: the report's QLoRA baseline (re-quantizing the dequantized source)
- ``vs_original``  ‖W − merged‖: where the start really is, against the bf16 weights

    python benchmarks/source_formats.py --model $(qpissa example smollm2 smollm2) --out /tmp/srcfmt
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    import source_models as sm
    from safetensors import safe_open

    from qpissa.decompose import decompose
    from qpissa.formats import load_tensor
    from qpissa.sources import scan_source
    from qpissa.use.merge import MergeConfig, merge

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, root = Path(a.model), Path(a.out)
    builders = {"bf16 (original)": lambda d: model,
                "fp8 e4m3 64x64": lambda d: sm.to_fp8(model, d, (64, 64)),
                "bnb nf4": lambda d: sm.to_bnb(model, d, load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                "bnb fp4": lambda d: sm.to_bnb(model, d, load_in_4bit=True, bnb_4bit_quant_type="fp4"),
                "gptq-layout rtn g64": lambda d: sm.to_gptq_awq(model, d, "gptq", group=64)[0],
                "compressed w4a16 g32": lambda d: sm.to_compressed(model, d, "w4a16")}
    original = {t.name: t for t in scan_source(model)}
    rows = {}
    for i, (name, build) in enumerate(builders.items()):
        src = build(root / f"src{i}")
        t0 = time.perf_counter()
        report = decompose(src, root / f"out{i}", rank=a.rank, loftq_baseline=False, overwrite=True, progress=False)
        seconds = time.perf_counter() - t0
        merge(root / f"out{i}" / "residual", root / f"out{i}" / "adapter", root / f"merged{i}",
              MergeConfig(dtype="float32", overwrite=True))
        deq = {t.name: t for t in scan_source(src)}
        sums = {"source_err": 0.0, "reported": 0.0, "vs_original": 0.0}
        with safe_open(str(root / f"merged{i}" / "model.safetensors"), framework="pt") as f:
            for row in report["modules"]:
                key = row["module"] + ".weight"
                w, s, m = load_tensor(original[key]).float(), load_tensor(deq[key]).float(), f.get_tensor(key).float()
                sums["source_err"] += float((w - s).norm())
                sums["reported"] += float((s - m).norm())
                sums["vs_original"] += float((w - m).norm())
        rows[name] = {**sums, "report_method": report["overall"]["method"]["frobenius"],
                      "qlora": report["overall"]["qlora"]["frobenius"], "decompose_s": round(seconds, 1),
                      "source": report.get("source", {}).get("detail")}
        print(name, json.dumps(rows[name]), flush=True)
    (root / "source_formats.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
