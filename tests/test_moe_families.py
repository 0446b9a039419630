"""Every MoE family transformers 5 ships with routed experts: decompose → train 2 steps → merge → plain load.

Per family (tests/moe_models.py builds each from transformers' own config class): the experts are NF4 targets, the
routers and gates are no target and stay in the source dtype, shared experts and dense layers get ordinary LoRAs,
expert biases (gpt-oss) stay beside the NF4 experts; the merged folder holds exactly the tensor names of the source
checkpoint, plain ``from_pretrained`` reports no missing, unexpected or mismatched key, and its logits equal the
trained model's through ``qpissa.moe.load``. One family with shared experts (qwen2_moe, with a [1, H] shared-expert
gate) and one with a dense first layer (deepseek_v3) run in the fast tier; the rest of the matrix is slow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moe_models import ALL_FAMILIES, BUILT_AT_LOAD, EXPERTS, REFUSED, build
from safetensors import safe_open

FAST = ("qwen2_moe", "deepseek_v3")
RANK = 4


def keys_of(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of a checkpoint folder (all shards): name → (dtype, shape), read from the files."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = (s.get_dtype(), tuple(s.get_shape()))
    return out


def _renamed(meta, names) -> set[str]:
    """Model names of the checkpoint tensors that transformers' renamings alone load (a tensor a conversion splits,
    concatenates or transposes is not one: what it becomes has no checkpoint tensor of its own)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(meta, add_legacy=False)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    renamed = (rename_source_key(n, renamings, converters) for n in names)
    return {new for new, pattern in renamed if pattern is None}


def run_family(family: str, root: Path, tokenizer: Path, data: Path) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from qpissa.data import DataConfig
    from qpissa.decompose import decompose
    from qpissa.decompose.roles import model_roles
    from qpissa.decompose.targets import full_precision_modules, model_type_of, peft_accepts
    from qpissa.moe import load
    from qpissa.train import TrainConfig, train
    from qpissa.use.merge import MergeConfig, merge

    src = build(family, root / "src", tokenizer=tokenizer)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    roles = model_roles(meta)
    report = decompose(src, root / "out", rank=RANK, progress=False)

    # experts: every fused parameter of every MoE layer, each expert a target with NF4 bytes
    assert roles.experts and report["experts"]["matrices"] == sum(p.shape[0] for p in roles.experts.values())
    assert all(p.shape[0] in (EXPERTS, 1) for p in roles.experts.values())  # 1: a shared expert held as a stack
    with safe_open(str(root / "out/residual/nf4-experts.safetensors"), "pt") as f:
        nf4 = set(f.keys())
    for key, param in roles.experts.items():
        assert all(f"{key.rsplit('.', 1)[0]}.{e}.{key.rsplit('.', 1)[1]}.weight" in nf4 for e in range(param.shape[0]))
    # routers/gates: found, never targets, in the residual byte for byte in their source dtype
    source, residual = keys_of(src), keys_of(root / "out/residual")
    routers = report["experts"]["routers"]
    assert routers["count"] > 0 and routers["count"] == len([k for k in source if _in(k, roles.routers, src)])
    adapter_cfg = json.loads((root / "out/adapter/adapter_config.json").read_text())
    assert not any(roles.is_router(m) for m in adapter_cfg["target_modules"])
    for name in (k for k in source if _in(k, roles.routers, src)):
        assert residual[name] == source[name], name
    # expert biases (gpt-oss) stay beside the NF4 experts in the source dtype
    for name in (k for k in source if k.endswith("_bias") and ".experts." in k):
        assert residual[name] == source[name]
    # shared experts and dense MLPs: ordinary LoRA targets, as every other linear inside the blocks but the routers
    linears = four_bit_linears(meta) - full_precision_modules(src)  # minus those whose parent reads their weight
    if family in BUILT_AT_LOAD:  # linears with no checkpoint tensor (split/transposed at load): kept as built, listed
        built = {n for n in linears if f"{n}.weight" not in _renamed(meta, source) and not roles.is_router(n)}
        assert built and report["coverage"]["built_at_load"]["modules"] == len(built)
        assert BUILT_AT_LOAD[family] in report["coverage"]["built_at_load"]["from"]
        linears -= built
    kind = model_type_of(src)  # PEFT refuses Mamba out_proj/conv1d LoRAs (Nemotron-H): no default target either
    assert set(adapter_cfg["target_modules"]) == {n for n in linears if not roles.is_router(n) and peft_accepts(kind, n)}
    for module in roles.shared:  # (Ergo's shared expert is built at load from transposed kernels: none left)
        if any(n.startswith(module + ".") for n in linears):
            assert any(m.startswith(module + ".") for m in adapter_cfg["target_modules"]), module
    check_factors(load(root / "out", dtype=torch.bfloat16), root / "out/adapter")

    train(TrainConfig(model=str(root / "out"), data=str(data), output=str(root / "run"), steps=2, batch_size=2,
                      lr=1e-3, warmup_ratio=0.0, seed=0, progress=False, data_cfg=DataConfig(max_length=96)))
    adapter = root / "run/adapter"
    trained = load(root / "out", adapter, dtype=torch.bfloat16)
    assert isinstance(trained, PeftModel)
    check_factors(trained, adapter)
    import bitsandbytes as bnb

    for router in roles.routers:  # in memory too: no router or gate is 4-bit or carries a LoRA
        module = trained.base_model.model.get_submodule(router)
        assert not any(isinstance(m, bnb.nn.Linear4bit) or hasattr(m, "lora_A") for m in module.modules()), router
    merge(root / "out/residual", adapter, root / "merged", MergeConfig(dtype="float32"))
    merged_keys = keys_of(root / "merged")
    assert merged_keys.keys() == source.keys()  # exactly the tensors transformers reads: no extra copy, none missing
    assert all(merged_keys[k][1] == source[k][1] for k in source)
    merged, info = AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.tensor([[1, 5, 7, 9, 11, 3, 40, 2]])
    with torch.no_grad():
        a, b = merged(ids).logits, trained(ids).logits.float()
    err = float((a - b).abs().max()) / float(b.abs().max())  # bf16 tolerance (the trained model runs in bf16), or
    assert err < 3e-2 or err < 2 * bf16_noise(src, ids), err  # twice what bf16 alone moves this family's logits


def bf16_noise(src: Path, ids: torch.Tensor) -> float:
    """How far the source model's own logits move from fp32 to bf16 (max |Δ| / max |logit|): 0.4–0.5% for most tiny
    families, 4–5% where the architecture amplifies rounding (Gemma-4's norm after every branch, Kolibri-1.1's FP4
    rounding of keys and values)."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        low = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)(ids).logits.float()
    return float((ref - low).abs().max()) / float(ref.abs().max())


def four_bit_linears(meta) -> set[str]:
    """The block linears transformers' own 4-bit load makes ``Linear4bit`` (its ``replace_with_bnb_linear`` on the
    meta model, skipping what the model keeps in fp32): the linears a 4-bit residual can hold."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    model = replace_with_bnb_linear(meta, modules_to_not_convert=sorted(meta._keep_in_fp32_modules),
                                    quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    return {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and ".layers." in n}


def check_factors(model, adapter: Path) -> None:
    """The adapter PEFT built is the one on disk: every written LoRA factor loaded in place, bit for bit, and no
    LoRA the file does not have (PEFT 0.21 rewrites DeepSeek/Qwen2-MoE-style targets unless told not to)."""
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    loaded = {k.replace(".default.", "."): v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == written.keys(), (sorted(loaded.keys() - written.keys())[:4],
                                             sorted(written.keys() - loaded.keys())[:4])
    for k, v in written.items():
        assert torch.equal(loaded[k].to(v.dtype), v), k


def _in(name: str, modules: tuple[str, ...], src: Path) -> bool:
    """Whether checkpoint tensor ``name`` belongs to one of the model's ``modules`` (names as the model reads them)."""
    from qpissa.decompose.roles import checkpoint_map

    model_name = checkpoint_map(src, [name])[name][0]
    return any(model_name == m or model_name.startswith(m + ".") for m in modules)


@pytest.mark.parametrize("family", FAST)
def test_family_end_to_end(family, smollm2_dir, tiny_data, tmp_path):
    run_family(family, tmp_path, smollm2_dir, tiny_data)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f not in FAST])
def test_every_family_end_to_end(family, smollm2_dir, tiny_data, tmp_path):
    run_family(family, tmp_path, smollm2_dir, tiny_data)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refused_family(family, tmp_path):
    """A family whose experts qpissa cannot take is refused in one line naming the tensor: nothing written."""
    from qpissa.decompose import decompose
    from qpissa.errors import UserError

    src = build(family, tmp_path / "src")
    with pytest.raises(UserError, match=REFUSED[family]) as err:
        decompose(src, tmp_path / "out", rank=RANK, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


ROLES = {  # family → (router/gate children of its MoE block, shared-expert children): what the model card describes
    "qwen3_moe": ({"gate"}, set()), "mixtral": ({"gate"}, set()), "olmoe": ({"gate"}, set()),
    "deepseek_v3": ({"gate"}, {"shared_experts"}), "glm4_moe": ({"gate"}, {"shared_experts"}),
    "qwen2_moe": ({"gate", "shared_expert_gate"}, {"shared_expert"}),
    "qwen3_next": ({"gate", "shared_expert_gate"}, {"shared_expert"}),
    "llama4_text": ({"router"}, {"shared_expert"}), "gpt_oss": ({"router"}, set()), "granitemoe": ({"router"}, set()),
    "phimoe": ({"router"}, set()), "ernie4_5_moe": ({"gate"}, {"shared_experts"}),
    "dots1": ({"gate"}, {"shared_experts"}), "hunyuan_v1_moe": ({"gate"}, {"shared_mlp"}),
    "minimax": ({"gate"}, set()),
    "zaya": ({"gate"}, set()),  # its router is an MLP of two linears: told by role (feeds top-k), not by shape
}


def test_roles_of_every_family():
    """Routers/gates and shared experts found from the modules alone, per family; gpt-oss declares its experts
    [E, in, out] (``is_transposed``, as PEFT reads it); gpt-oss's expert biases are kept apart."""
    from transformers import AutoModelForCausalLM

    from moe_models import config
    from qpissa.decompose.roles import model_roles

    for family, (routers, shared) in ROLES.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config(family))
        roles = model_roles(model)
        assert {r.rsplit(".", 1)[1] for r in roles.routers} == routers, family
        assert {s.rsplit(".", 1)[1] for s in roles.shared} == shared, family
        assert {p.name for p in roles.experts.values()} == {"gate_up_proj", "down_proj"}, family
        assert all(p.transposed == (family == "gpt_oss") for p in roles.experts.values()), family  # is_transposed
        want_biases = {"gate_up_proj_bias", "down_proj_bias"} if family == "gpt_oss" else set()
        assert {b.rsplit(".", 1)[1] for b in roles.expert_biases} == want_biases, family


@pytest.mark.slow
def test_plain_peft_snippet_loads_every_lora(tmp_path):
    """--experts-dtype bfloat16 on DeepSeek-V3 (dense first layer, shared experts): the snippet decompose prints
    (plain transformers + PEFT inside ``native_targets``) loads every written LoRA factor in place."""
    from qpissa.decompose import decompose
    from qpissa.usage import load_snippet

    src, out = build("deepseek_v3", tmp_path / "src"), tmp_path / "out"
    decompose(src, out, rank=RANK, experts_dtype="bfloat16", progress=False)
    snippet = load_snippet(out)
    assert "native_targets" in snippet and "qpissa.moe" not in snippet
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the text decompose prints
    check_factors(scope["model"], out / "adapter")


def test_adapter_keys_are_not_renamed_again(tmp_path):
    """Laguna's checkpoint names its shared expert ``mlp.shared_expert.``, the model ``mlp.shared_experts.``, and
    PEFT renames adapter keys with that rule, which matches the model's own name too (``shared_experts..down_proj``):
    the shared expert's LoRA would stay at its random init. Loaded through qpissa, every written factor is in place."""
    from qpissa.decompose import decompose
    from qpissa.moe import load

    src = build("laguna", tmp_path / "src")
    decompose(src, tmp_path / "out", rank=RANK, progress=False)
    assert any(".shared_experts." in k for k in keys_of(tmp_path / "out/adapter"))
    check_factors(load(tmp_path / "out", dtype=torch.bfloat16), tmp_path / "out/adapter")


def test_module_named_weight_stays_in_source_dtype(tmp_path):
    """transformers' 4-bit loader misreads the quant state of a module whose name ends in ``weight`` (Qwen4-Exp's
    hyper-connection ``block_inject_weight``): no default target (kept in source dtype, counted as a non-target, as
    :data:`FULL_PRECISION` checks), and ``--targets`` naming it is refused in one line, nothing written."""
    from qpissa.decompose import decompose
    from qpissa.decompose.targets import bnb_loadable
    from qpissa.errors import UserError

    assert not bnb_loadable("model.layers.0.attn_hyper_connection.block_inject_weight")
    assert bnb_loadable("model.layers.0.attn_hyper_connection.input_mix_weight_down")
    assert bnb_loadable("model.layers.0.self_attn.indexer.weights_proj") and bnb_loadable("model.layers.0.q_proj")
    src = build("qwen4_exp_text", tmp_path / "src")
    with pytest.raises(UserError, match="block_inject_weight cannot be 4-bit") as err:
        decompose(src, tmp_path / "out", rank=RANK, targets=["block_inject_weight"], progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


FULL_PRECISION = {  # family → block linears that cannot be NF4 (what the model card / modeling file says of them)
    "deepseek_v4": {"self_attn.o_a_proj", "self_attn.compressor.kv_proj", "self_attn.compressor.gate_proj",  # grouped
                    "self_attn.compressor.indexer.kv_proj", "self_attn.compressor.indexer.gate_proj",  # kept in fp32
                    "self_attn.compressor.indexer.scorer.weights_proj"},
    "deepseek_v32": {"self_attn.indexer.weights_proj"},  # _keep_in_fp32_modules
    "inkling2_loop_text": {f"{k}_message_gate.down_proj" for k in ("q", "k", "v", "mlp")},  # input cast to its dtype
    "qwen4_exp_text": {f"{k}_hyper_connection.block_inject_weight" for k in ("attn", "mlp")},  # name misread 4-bit
    "qwen3_moe": set(), "deepseek_v3": set(),
}


def test_modules_that_cannot_be_4bit_are_no_targets(tmp_path):
    """Linears a 4-bit load keeps in full precision or that their parent reads as a weight are found from the model
    (no name list): not default targets (the residual keeps them in the source dtype), refused by --targets."""
    from transformers import AutoModelForCausalLM

    from moe_models import config
    from qpissa.decompose.targets import find_targets, full_precision_modules
    from qpissa.errors import UserError
    from qpissa.formats import scan_checkpoint

    for family, want in FULL_PRECISION.items():
        cfg = config(family)
        with torch.device("meta"):
            cfg.architectures = [type(AutoModelForCausalLM.from_config(cfg)).__name__]
        cfg.save_pretrained(tmp_path / family)
        found = {n.split(".", 3)[3] for n in full_precision_modules(tmp_path / family) if ".layers." in n}
        assert found == want, family
    src = build("deepseek_v32", tmp_path / "src")
    targets, others, *_ = find_targets(src, scan_checkpoint(src), None)
    assert "model.layers.0.self_attn.indexer.weights_proj" in others
    assert not any(t.module.endswith("weights_proj") for t in targets)
    with pytest.raises(UserError, match="indexer.weights_proj cannot be 4-bit"):
        find_targets(src, scan_checkpoint(src), ["weights_proj"])


def test_interleaved_experts_read_as_transformers_loads_them(tmp_path):
    """Inkling-2 stores each expert's gate and up rows alternating (``w13_weight``); every expert matrix decompose
    reads equals the model's parameter after transformers' own load (its Interleave), gate rows first."""
    from transformers import AutoModelForCausalLM

    from qpissa.decompose.experts import find_experts, load_expert
    from qpissa.formats import scan_checkpoint

    src = build("inkling2_text", tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    targets, _ = find_experts(scan_checkpoint(src), None, src)
    assert {t.interleaved for t in targets if t.kind == "gate_up_proj"} == {True}
    assert {t.interleaved for t in targets if t.kind == "down_proj"} == {False}
    assert len(targets) == 2 * 2 * EXPERTS
    for t in targets:
        assert torch.equal(load_expert(t), model.get_parameter(f"{t.experts_module}.{t.kind}")[t.expert]), t.module
