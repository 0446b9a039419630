"""Mixture-of-experts: every expert decomposed, NF4 experts loaded 4-bit, the adapter in PEFT's own layout."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import tree_digest
from moe_models import EXPERTS, FAMILIES, build
from safetensors import safe_open
from safetensors.torch import save_file

from qpissa.decompose import decompose
from qpissa.errors import UserError

RANK = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {f: build(f, root / f) for f in FAMILIES}


def per_expert(src: Path) -> dict[tuple[int, str, int], torch.Tensor]:
    """(layer, kind, expert) → the original fp32 matrix, gate and up stacked, read straight from the file."""
    out = {}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for layer in range(2):
            for e in range(EXPERTS):
                for block, g, u, d in (("mlp", "gate_proj", "up_proj", "down_proj"), ("block_sparse_moe", "w1", "w3", "w2")):
                    p = f"model.layers.{layer}.{block}.experts.{e}."
                    if p + g + ".weight" in keys:
                        out[(layer, "gate_up_proj", e)] = torch.cat([f.get_tensor(p + g + ".weight"),
                                                                     f.get_tensor(p + u + ".weight")]).float()
                        out[(layer, "down_proj", e)] = f.get_tensor(p + d + ".weight").float()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_is_a_target_and_beats_qlora(family, tiny, tmp_path):
    src, out = tiny[family], tmp_path / "out"
    rep = decompose(src, out, rank=RANK, progress=False)
    experts = [m for m in rep["modules"] if ".experts." in m["module"]]
    assert len(experts) == 2 * 2 * EXPERTS  # layers × (gate_up, down) × experts
    for kind in ("gate_up_proj", "down_proj"):
        s = rep["by_layer_type"][f"mlp.experts.{kind}"]
        assert s["modules"] == 2 * EXPERTS and s["reduction_vs_qlora"]["frobenius"] > 0.3
    assert all(m["method"]["frobenius"] < m["qlora"]["frobenius"] for m in experts)
    assert rep["experts"]["routers"]["count"] == 2 and rep["experts"]["residual"] == "nf4"
    # the 4-bit share, counted from the checkpoint: attention + expert matrices
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        sizes = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    four = sum(n for k, n in sizes.items() if ".experts." in k or any(f"{p}_proj.weight" in k for p in "qkvo"))
    cov = rep["coverage"]
    assert cov["groups"]["quantized_4bit"]["params"] == four and cov["groups"]["quantized_4bit"]["share"] > 0.5
    assert cov["router_params"] == 2 * EXPERTS * 64
    with safe_open(str(out / "residual" / "nf4-experts.safetensors"), "pt") as f:
        packed = sum(2 * math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith(".weight"))
    assert packed == sum(n for k, n in sizes.items() if ".experts." in k)
    assert "routers" in (out / "report.md").read_text()


def test_fused_layout_gives_the_same_bytes(tiny, tmp_path):
    """A checkpoint stored with transformers 5's fused 3-D expert tensors decomposes to the same files."""
    from transformers import AutoModelForCausalLM

    src = tiny["qwen3_moe"]
    fused = tmp_path / "fused"
    fused.mkdir()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (EXPERTS, 128, 64)
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", fused / "config.json")
    a = decompose(src, tmp_path / "a", rank=RANK, progress=False)
    b = decompose(fused, tmp_path / "b", rank=RANK, progress=False)
    assert b["experts"]["layout"] == "fused 3-D"
    for name in ("nf4-experts.safetensors",):
        assert (tmp_path / "a/residual" / name).read_bytes() == (tmp_path / "b/residual" / name).read_bytes()
    assert (tmp_path / "a/adapter/adapter_model.safetensors").read_bytes() == \
        (tmp_path / "b/adapter/adapter_model.safetensors").read_bytes()
    assert [m["method"] for m in a["modules"]] == [m["method"] for m in b["modules"]]


PLAIN = textwrap.dedent('''
    """Plain transformers + peft (no qpissa): PEFT's expert forward == residual + s·B·A decoded by hand."""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    from safetensors import safe_open
    out, E, r = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out + "/residual", dtype=torch.float32),
                                      out + "/adapter")
    assert "qpissa" not in sys.modules
    wrapper = model.base_model.model.model.layers[0].mlp.experts
    inner = wrapper.get_base_layer()  # recursive: the experts module
    s = wrapper.scaling["default"]
    res = {}
    with safe_open(out + "/adapter/adapter_model.safetensors", "pt") as f:
        for kind, where in (("gate_up_proj", "experts.base_layer"), ("down_proj", "experts")):
            A = f.get_tensor(f"base_model.model.model.layers.0.mlp.{where}.lora_A.weight").float()  # (E·r, in)
            B = f.get_tensor(f"base_model.model.model.layers.0.mlp.{where}.lora_B.weight").float()  # (out, r·E)
            W = getattr(inner, kind).detach().float()
            res[kind] = torch.stack([W[e] + s * B[:, [k * E + e for k in range(r)]] @ A[e * r:(e + 1) * r]
                                     for e in range(E)])
    torch.manual_seed(0)
    x = torch.randn(10, res["gate_up_proj"].shape[2])
    idx = torch.randint(0, E, (10, 2))
    wts = torch.rand(10, 2)
    with torch.no_grad():
        y = wrapper(x, idx, wts)
    hand = torch.zeros_like(x)
    for t in range(10):
        for j in range(2):
            e = int(idx[t, j])
            g, u = (res["gate_up_proj"][e] @ x[t]).chunk(2)
            hand[t] += wts[t, j] * (res["down_proj"][e] @ (torch.nn.functional.silu(g) * u))
    print(json.dumps({"max_diff": float((y - hand).abs().max()), "scale": float(hand.abs().max())}))
    torch.save(res, out + "/hand.pt")
''')


def test_bfloat16_experts_load_in_plain_peft(tiny, tmp_path):
    """--experts-dtype bfloat16: plain transformers + peft load it; PEFT's forward equals W_res + s·B·A decoded with
    lora_A (E·r, in) expert-major and lora_B (out, r·E) expert-minor, and W_res + s·B·A ≈ the original experts."""
    src, out = tiny["qwen3_moe"], tmp_path / "out"
    rep = decompose(src, out, rank=RANK, experts_dtype="bfloat16", progress=False)
    assert rep["experts"]["method"] == "pissa" and rep["coverage"]["groups"]["targets_source_dtype"]["params"] > 0
    config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    script = tmp_path / "plain.py"
    script.write_text(PLAIN)
    proc = subprocess.run([sys.executable, str(script), str(out), str(EXPERTS), str(RANK)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["max_diff"] < 1e-4 * max(1.0, result["scale"])
    hand = torch.load(out / "hand.pt")
    orig = per_expert(src)
    for kind in ("gate_up_proj", "down_proj"):
        for e in range(EXPERTS):
            w = orig[(0, kind, e)]
            assert float((hand[kind][e] - w).norm() / w.norm()) < 1e-2  # PiSSA: exact up to bf16 storage
            u, sv, vh = torch.linalg.svd(w)  # the adapter is the top-r part of the original, by an independent SVD
            top = u[:, :RANK] @ torch.diag(sv[:RANK]) @ vh[:RANK]
            delta = hand[kind][e] - (w - top)  # = s·B·A + rounding
            assert float((delta - top).norm() / top.norm()) < 2e-2


@pytest.mark.slow
def test_sharded_checkpoint_gathers_every_shards_experts(tiny, tmp_path):
    """A checkpoint in several shards (as every real MoE is) writes one nf4-experts.safetensors holding the experts
    of every shard, the same bytes as from one shard, and qpissa.moe.load builds the same model."""
    from transformers import AutoModelForCausalLM

    from qpissa.moe import load

    src = tiny["qwen3_moe"]
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, sharded / name)
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    one, many = tmp_path / "one", tmp_path / "many"
    decompose(src, one, rank=RANK, progress=False)
    decompose(sharded, many, rank=RANK, progress=False)

    def experts(out: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(out / "residual" / "nf4-experts.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    a, b = experts(one), experts(many)
    assert len(a) > 0 and sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[1, 5, 7, 9, 11, 3, 40, 2]])
    with torch.no_grad():
        assert torch.equal(load(one, dtype=torch.float32)(ids).logits, load(many, dtype=torch.float32)(ids).logits)


def test_nf4_experts_stay_4bit_in_memory(tiny, tmp_path):
    """qpissa.moe.load: the experts hold NF4 bytes (parameter + buffer storage), dequantize exactly as bitsandbytes,
    and PEFT's forward adds s·B·A on top of them."""
    import bitsandbytes.functional as bnbf

    from qpissa.moe import load, resident_bytes

    out = tmp_path / "out"
    decompose(tiny["mixtral"], out, rank=RANK, progress=False)
    model = load(out, dtype=torch.float32)
    wrapper = model.base_model.model.model.layers[1].mlp.experts
    inner = wrapper.get_base_layer()  # recursive: the experts module
    dense = sum(p.numel() for p in (inner.gate_up_proj, inner.down_proj)) * 2  # what bf16 experts would hold
    lora = sum(p.numel() * p.element_size() for n, p in wrapper.named_parameters() if "lora_" in n)
    held = resident_bytes(inner)
    assert held < 0.3 * dense, (held, dense)
    assert held + lora == resident_bytes(wrapper)
    with safe_open(str(out / "residual/nf4-experts.safetensors"), "pt") as f:
        prefix = "model.layers.1.mlp.experts.2.down_proj.weight"
        state = {k[len(prefix) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
        qs = bnbf.QuantState.from_dict(state, device=torch.device("cpu"))
        ref = bnbf.dequantize_4bit(f.get_tensor(prefix), qs).float()
    assert torch.equal(inner.nf4_down_proj.dequantize(torch.float32)[2], ref)
    x = torch.randn(6, 64)
    idx, wts = torch.randint(0, EXPERTS, (6, 2)), torch.rand(6, 2)
    with torch.no_grad():
        fill = inner.nf4_gate_up_proj.dequantize(torch.float32), inner.nf4_down_proj.dequantize(torch.float32)
        inner.gate_up_proj.data, inner.down_proj.data = fill
        y = wrapper(x, idx, wts)
    s = wrapper.scaling["default"]
    hand = torch.zeros_like(x)
    for kind_i, (layer_w, mod) in enumerate(zip(fill, (wrapper.base_layer, wrapper))):
        A, B = mod.lora_A["default"].weight.float(), mod.lora_B["default"].weight.float()
        fill[kind_i].copy_(torch.stack([layer_w[e] + s * B[:, e::EXPERTS] @ A[e * RANK:(e + 1) * RANK]
                                        for e in range(EXPERTS)]))
    for t in range(6):
        for j in range(2):
            e = int(idx[t, j])
            g, u = (fill[0][e] @ x[t]).chunk(2)
            hand[t] += wts[t, j] * (fill[1][e] @ (torch.nn.functional.silu(g) * u))
    assert torch.allclose(y, hand, atol=1e-4)


def test_unknown_expert_layout_writes_nothing(tmp_path):
    src = tmp_path / "odd"
    build("qwen3_moe", src, layers=1)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        state = {k.replace("experts.0.down_proj", "experts.0.fc2"): f.get_tensor(k) for k in f.keys()}
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"unknown expert layout: tensors model\.layers\.0\.mlp\.experts\.0\.fc2\.weight.*"
                                        r"supported layouts"):
        decompose(src, tmp_path / "out", rank=RANK, progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_resume_recomputes_lost_experts_byte_identical(tiny, tmp_path):
    src, out = tiny["olmoe"], tmp_path / "out"
    decompose(src, out, rank=RANK, progress=False)
    before = tree_digest(out)
    manifest = json.loads((out / "manifest.json").read_text())
    lost = [e["part"] for m, e in manifest["tensors"].items() if ".experts." in m][::3]
    for part in lost:
        (out / ".parts" / part).unlink()
    manifest["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(out / "residual")
    shutil.rmtree(out / "adapter")
    decompose(src, out, rank=RANK, resume=True, progress=False)
    assert tree_digest(out) == before


@pytest.mark.parametrize("family,experts_dtype", [("mixtral", "nf4"), ("mixtral", "bfloat16"), ("qwen3_moe", "nf4"),
                                                  ("olmoe", "nf4")])
@pytest.mark.slow
def test_merge_writes_the_save_pretrained_layout(family, experts_dtype, tiny, tmp_path):
    """merge: per-expert tensors under the source's names (Mixtral w1/w3/w2), loaded by plain transformers with
    logits equal to the decomposed model (residual + adapter) as qpissa.moe.load builds it."""
    from transformers import AutoModelForCausalLM

    from qpissa.moe import load
    from qpissa.use.merge import MergeConfig, merge

    src, out = tiny[family], tmp_path / "out"
    decompose(src, out, rank=RANK, experts_dtype=experts_dtype, progress=False)
    merge(out / "residual", out / "adapter", tmp_path / "merged", MergeConfig(dtype="float32"))
    with safe_open(str(tmp_path / "merged/model.safetensors"), "pt") as f:
        keys = set(f.keys())
    up = "block_sparse_moe.experts.3.w3" if family == "mixtral" else "mlp.experts.3.up_proj"
    assert f"model.layers.1.{up}.weight" in keys and not any("nf4" in k for k in keys)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    model = load(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 7, 9, 11, 3, 40, 2]])
    with torch.no_grad():
        a, b = merged(ids).logits, model(ids).logits.float()
    assert torch.allclose(a, b, atol=2e-2 * float(b.abs().max())), float((a - b).abs().max())
    orig = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        ref = orig(ids).logits
    assert float((a - ref).norm()) < 0.2 * float(ref.norm())  # near the original: residual + principal part ≈ W


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_convert_gives_a_lora_on_the_original_moe(family, tiny, tmp_path):
    """convert: original model + the rank-2r LoRA (experts included, per expert) == residual + "trained" adapter;
    PiSSA with bf16 experts so that residual + s·B₀·A₀ = W up to bf16 and the comparison is exact."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from qpissa.use.convert import convert_pissa_to_lora

    src, out = tiny[family], tmp_path / "out"
    decompose(src, out, rank=RANK, method="pissa", experts_dtype="bfloat16", progress=False)
    trained = tmp_path / "trained"
    shutil.copytree(out / "adapter", trained)
    factors = load_file(str(trained / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * v.float().std() * torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in factors.items()},
              str(trained / "adapter_model.safetensors"))
    convert_pissa_to_lora(trained, out / "adapter", tmp_path / "lora")
    ids = torch.tensor([[1, 5, 7, 9, 11, 3, 40, 2]])
    with torch.no_grad():
        a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32),
                                      str(tmp_path / "lora"))(ids).logits
        b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "residual", dtype=torch.float32),
                                      str(trained))(ids).logits
        c = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
    assert float((a - b).norm()) < 0.02 * float((b - c).norm()), (float((a - b).norm()), float((b - c).norm()))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_convert_keeps_dense_and_shared_expert_loras(family, tmp_path):
    """convert on the families PEFT 0.21 rewrites (DeepSeek: dense first layer, shared experts; Qwen2-MoE: shared
    expert + its [1, H] gate): the LoRA on the original model, loaded with PEFT inside ``native_targets()``, equals
    residual + "trained" adapter, so no dense, shared-expert or routed-expert LoRA was dropped or resized."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from qpissa.adapters import native_targets
    from qpissa.moe import load
    from qpissa.use.convert import convert_pissa_to_lora

    src, out = build(family, tmp_path / "src"), tmp_path / "out"
    decompose(src, out, rank=RANK, method="pissa", experts_dtype="bfloat16", progress=False)
    trained = tmp_path / "trained"
    shutil.copytree(out / "adapter", trained)
    factors = load_file(str(trained / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * v.float().std() * torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in factors.items()},
              str(trained / "adapter_model.safetensors"))
    convert_pissa_to_lora(trained, out / "adapter", tmp_path / "lora")
    ids = torch.tensor([[1, 5, 7, 9, 11, 3, 40, 2]])
    with torch.no_grad(), native_targets():
        a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32),
                                      str(tmp_path / "lora"))(ids).logits
        b = load(out, trained, dtype=torch.float32)(ids).logits
        c = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
    assert float((a - b).norm()) < 0.05 * float((b - c).norm()), (float((a - b).norm()), float((b - c).norm()))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe", "llama4_text"])
def test_lora_baseline_trains_experts_not_routers(family, smollm2_dir, tiny_data, tmp_path):
    """``train --method lora`` on an MoE: QPiSSA's targets (dense, shared-expert and attention linears, every
    expert's fused parameters), no router or gate (Llama-4's router and Qwen2-MoE's shared-expert gate are
    ``nn.Linear``: PEFT's all-linear would train them), and PEFT 0.21's DeepSeek rewrite skipped; the saved adapter
    loads back with every LoRA."""
    import bitsandbytes  # noqa: F401  (train imports it; keeps the import order of the other tests)
    from safetensors import safe_open

    from qpissa.data import DataConfig
    from qpissa.decompose.roles import roles_of
    from qpissa.decompose.targets import moe_lora_targets
    from qpissa.train import TrainConfig, train

    src = build(family, tmp_path / "src", tokenizer=smollm2_dir)
    train(TrainConfig(model=str(src), method="lora", lora_rank=4, data=str(tiny_data), output=str(tmp_path / "run"),
                      steps=1, batch_size=2, lr=1e-3, warmup_ratio=0.0, seed=0, progress=False,
                      data_cfg=DataConfig(max_length=96)))
    roles, (modules, params) = roles_of(src), moe_lora_targets(src)
    saved = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == modules and sorted(saved["target_parameters"]) == params
    with safe_open(str(tmp_path / "run/adapter/adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(roles.is_router(k.removeprefix("base_model.model.").split(".lora_")[0]) for k in keys)
    for module in modules:  # every dense / shared-expert / attention linear carries its LoRA
        assert f"base_model.model.{module}.lora_A.weight" in keys, module
    experts = [k for k in keys if ".experts." in k or k.split(".lora_")[0].endswith(".experts")]
    assert len(experts) == 2 * len(roles.experts), experts  # A and B per fused parameter of every MoE layer
    from transformers import AutoModelForCausalLM

    from qpissa.adapters import load_peft

    loaded = load_peft(AutoModelForCausalLM.from_pretrained(src), tmp_path / "run/adapter")
    state = {k.replace(".default", "") for k in loaded.state_dict() if ".lora_" in k}
    assert state == set(keys)  # every saved LoRA in place, none added (PEFT's rewrite would resize or move them)
