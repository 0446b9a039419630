"""Calibration statistics H = Σ xᵀx per distinct linear input, collected block by block (GPTQ-style).

Output error of a linear y = W·x on calibration tokens X (tokens×n) is ‖X(W − Ŵ)ᵀ‖_F² =
‖(W − Ŵ)·H^½‖_F² with H = XᵀX (GPTQ, Frantar et al. 2023; CLoQ, Deng et al. 2025); the calibrated methods only need H per target.
The model is never loaded whole: a weightless skeleton is built on the meta device, only the
tensors before the first block (embeddings, rotary buffers) are read, the N sequences' hidden
states at block i's input are kept, and block i alone is materialized from the safetensors
shards, hooked (H accumulated in fp64), run, and released. Its outputs — computed with the
ORIGINAL weights — become block i+1's inputs: every method (and every baseline of the report)
is then fitted and measured against the activations the original model produces, which is
what fine-tuning starts from and what the KL to the original measures; propagating a
method's quantized outputs would make the baselines' H differ from the method's.

Peak memory ≈ one block (fp32) + the hidden states N·T·d·4 bytes (calibration and held-out)
+ the H's of one block (n² · 8 bytes per distinct input; Llama-3-70B's down_proj: 6.6 GB).

Mixture-of-experts blocks: each expert gets its own H per fused parameter from what that parameter multiplies
while the block runs (:mod:`qpissa.decompose.expert_inputs`, any family's forward): gate_up's H from the hidden
states of the tokens routed to it, down's H from its act(gate)·up. An expert routed fewer than
``--calib-expert-tokens`` calibration tokens gets no statistics (its method falls back to the uncalibrated one, and
the report counts it).
Per block and split (calibration, held-out) that is E·(d² + I²)·8 bytes more (Qwen3-30B-A3B: 4.9 GB; Mixtral-8x7B: 14 GB).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from qpissa.errors import UserError
from qpissa.decompose.expert_inputs import ExpertInputs, accumulate_gram
from qpissa.decompose.experts import find_experts, fused_expert_stack
from qpissa.decompose.load_conversion import ConversionBuilder
from qpissa.decompose.roles import checkpoint_map, roles_of
from qpissa.formats import TensorInfo, load_tensor
from qpissa.decompose.targets import Target

BLOCK = re.compile(r"^(.*?)\.(\d+)\.")  # "model.layers.3.self_attn.q_proj" → ("model.layers", "3")


def block_index(module: str) -> int:
    """The block a target sits in (-1 outside numbered blocks): calibration walks the blocks once, so targets are
    taken in block order (an MoE block's experts come after every linear in target order)."""
    m = BLOCK.match(module)
    return int(m.group(2)) if m else -1


# ----------------------------------------------------------------------------- data

@dataclass
class CalibrationData:
    """Token sequences (each (1, T) long): ``calib`` fits H, ``held_out`` measures output error and KL."""

    calib: list[torch.Tensor]
    held_out: list[torch.Tensor]


def calibration_texts(path: str | Path, template: str, limit: int, split: str = "train",
                      config: str | None = None) -> list[str]:
    """Up to ``limit`` texts: one per line of a .txt file, or records (a file or a Hub dataset's ``split``)
    rendered with a train template (prompt + response, as :func:`qpissa.data.render` builds them for training)."""
    from qpissa.data import load_records, render

    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise UserError(f"--calib-data {path} does not exist: pass a .txt (one text a line) or .jsonl file")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise UserError(f"--calib-data {path} has no non-empty line")
        return texts[:limit]
    records = load_records(path, split, config, limit, flags=("--calib-split", "--calib-config"))
    if "text" in records[0] and template == "gsm8k" and "question" not in records[0]:
        return [str(r["text"]) for r in records]
    return ["".join(render(r, template, where=f"{path} row {i}")) for i, r in enumerate(records)]


def load_calibration(model_dir: Path, path: str | Path, samples: int, held_out: int, seq_len: int,
                     template: str = "gsm8k", split: str = "train", config: str | None = None) -> CalibrationData:
    """Tokenize the first ``samples`` texts for calibration and the next ``held_out`` ones for the report."""
    from transformers import AutoTokenizer

    if samples < 1 or held_out < 0 or seq_len < 2:
        raise UserError(f"--calib-samples ({samples}) must be ≥ 1, --calib-holdout ({held_out}) ≥ 0 and "
                        f"--calib-seq-len ({seq_len}) ≥ 2")
    texts = calibration_texts(path, template, samples + held_out, split, config)
    if len(texts) < samples + held_out:
        raise UserError(f"--calib-data {path} has {len(texts)} examples but --calib-samples {samples} + "
                        f"--calib-holdout {held_out} = {samples + held_out} are needed; lower them or add data")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:  # noqa: BLE001 - any tokenizer failure is the model dir's files
        raise UserError(f"{model_dir}: cannot load the tokenizer for calibration ({err})") from None
    seqs = [torch.tensor(tok(t, truncation=True, max_length=seq_len)["input_ids"], dtype=torch.long)[None]
            for t in texts]  # each (1, T)
    return CalibrationData(seqs[:samples], seqs[samples:])


# ----------------------------------------------------------------------------- statistics

class _GramHooks:
    """Forward pre-hooks on a block's target linears: one H per distinct input tensor (q/k/v share one,
    gate/up share one), keyed by the first module (in call order) that receives it."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.group: dict[str, str] = {}  # module name → group key
        self.gram: dict[str, torch.Tensor] = {}  # group key → H (n, n) fp64
        self._seen: list[tuple[torch.Tensor, str]] = []  # this forward's inputs (kept alive: identity is safe)
        self._handles = [mod.register_forward_pre_hook(self._hook(name)) for name, mod in modules.items()]

    def _hook(self, name: str):
        def hook(_mod, inputs):
            x = inputs[0]
            key = next((k for t, k in self._seen if t is x), None)
            if key is None:
                key = self.group.get(name, name)
                self._seen.append((x, key))
                self.gram[key] = accumulate_gram(self.gram.get(key), x)
            self.group.setdefault(name, key)
        return hook

    def next_sequence(self) -> None:
        self._seen.clear()

    def remove(self) -> dict[str, torch.Tensor]:
        """Detach the hooks; {module name: H}."""
        for h in self._handles:
            h.remove()
        return {name: self.gram[key] for name, key in self.group.items()}


class _Captured(Exception):
    pass


class _Catcher(torch.nn.Module):
    """Stands in for a block while the model embeds a sequence: records the block's (hidden states, other arguments,
    keyword arguments) and passes the hidden states on (the last one stops the forward), so each block is later run
    with its own arguments (Gemma-4 and Kolibri give each layer type its own position embeddings and mask). Any
    other attribute is the block's (Nemotron-H's forward reads ``layer.block_type`` before calling it)."""

    def __init__(self, block: torch.nn.Module, last: bool):
        super().__init__()
        self.args: tuple | None = None
        self.kwargs: dict | None = None
        self.__dict__["_block"] = block  # not a submodule
        self.__dict__["_last"] = last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        if self.__dict__["_last"]:
            raise _Captured
        return args[0] if args else kwargs.get("hidden_states")


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _find_info(name: str, by_name: dict[str, TensorInfo]) -> TensorInfo | None:
    """The checkpoint tensor for parameter ``name``, tolerating a base-model prefix either way."""
    if name in by_name:
        return by_name[name]
    hits = [i for k, i in by_name.items() if k.endswith("." + name) or name.endswith("." + k)]
    return hits[0] if len(hits) == 1 else None


class BlockwiseCalibrator:
    """Walks the blocks once, in order; ``stats(module)`` returns (H, H_held_out) for a target.

    Targets must be requested in block order (the decompose driver does); blocks whose targets are
    all done (resume) are only run forward. A request for an earlier block restarts the walk.
    """

    def __init__(self, model_dir: Path, tensors: Sequence[TensorInfo], targets: Sequence[Target],
                 data: CalibrationData, device: str = "cpu", expert_tokens: int = 1):
        self.model_dir, self.data, self.device = Path(model_dir), data, torch.device(device)
        self.expert_tokens = expert_tokens  # fewer routed calibration tokens: no statistics for that expert
        self.by_name = {t.name: t for t in tensors}
        self.conversions = ConversionBuilder(self.model_dir, dict(self.by_name))  # parameters built at load
        self.expert_params = roles_of(self.model_dir).experts  # "module.param" → the fused expert parameter
        if self.expert_params:  # the model's names too (Phi-MoE's router, Granite's fused experts)
            self.by_name.update({new: self.by_name[old] for old, (new, expert, _) in
                                 checkpoint_map(self.model_dir, list(self.by_name)).items() if expert is None})
        self.checkpoint_experts = find_experts(list(tensors), None, self.model_dir)[0]  # every expert (fused at load)
        blocks = {BLOCK.match(t.module).group(1) if BLOCK.match(t.module) else None for t in targets}
        if None in blocks or len(blocks) != 1:
            odd = next((t.module for t in targets if not BLOCK.match(t.module)), sorted(map(str, blocks))[0])
            raise UserError(f"--calib-data: calibration needs every target inside one stack of numbered blocks; "
                            f"{odd} is not (exclude it with --targets)")
        self.blocks_name = blocks.pop()
        self.targets = {t.module: t for t in targets}
        self.experts: dict[str, set[int]] = {}  # fused experts module → the expert indices that are targets
        for t in targets:
            if getattr(t, "experts_module", ""):
                self.experts.setdefault(t.experts_module, set()).add(t.expert)
        self.model = self._skeleton()
        self.blocks: torch.nn.ModuleList = self.model.get_submodule(self.blocks_name)
        self._restart()

    # -- setup ----------------------------------------------------------------
    def _skeleton(self) -> torch.nn.Module:
        """Weightless model (parameters on meta, buffers real) with every tensor outside the blocks loaded."""
        import transformers
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.model_dir)
        config._experts_implementation = "eager"  # the per-expert forward :class:`ExpertInputs` follows
        with init_empty_weights(include_buffers=False):
            model = getattr(transformers, config.architectures[0])(config)
        model.eval()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        skip = {id(p) for p in head.parameters()} if head is not None else set()
        skip -= {id(p) for p in model.get_input_embeddings().parameters()}  # tied head = the embedding
        for name, p in model.named_parameters():
            if name.startswith(self.blocks_name + ".") or id(p) in skip:
                continue  # blocks are streamed; an untied LM head is never reached by the calibration forward
            self._set(model, name)
        for name, b in model.named_buffers():
            if not name.startswith(self.blocks_name + "."):
                _set_tensor(model, name, b.to(self.device))
        return model

    def _set(self, root: torch.nn.Module, name: str, prefix: str = "") -> None:
        if prefix + name in self.expert_params:  # as the model holds it, from per-expert or fused (interleaved) tensors
            stack = fused_expert_stack(prefix + name, self.checkpoint_experts)
            _set_tensor(root, name, stack.to(device=self.device, dtype=torch.float32))
            return
        info = _find_info(prefix + name, self.by_name)
        if info is not None and tuple(info.shape) != tuple(root.get_parameter(name).shape):
            info = None  # a source of a conversion (Kimi's v_conv1d for the concatenated conv1d), not the parameter
        if info is None and (built := self.conversions.build(getattr(self, "model", root), prefix + name)) is not None:
            _set_tensor(root, name, built.to(device=self.device, dtype=torch.float32))  # split/concatenated at load
            return
        if info is None:
            raise UserError(f"{self.model_dir}: parameter {prefix + name} is not in the checkpoint (incomplete, or "
                            "built at load in a way calibration does not follow); leave out --calib-data")
        _set_tensor(root, name, load_tensor(info).to(device=self.device, dtype=torch.float32))

    def _restart(self) -> None:
        """Embed every sequence and keep the hidden states at block 0's input, and each block's other arguments
        (those of block 0 for every block where the model's forward cannot run through stand-ins)."""
        blocks = list(self.blocks)
        catchers = [_Catcher(b, last=i == len(blocks) - 1) for i, b in enumerate(blocks)]
        for i, c in enumerate(catchers):
            self.blocks[i] = c
        self.states: list[list[torch.Tensor]] = [[], []]  # calib, held-out: each sequence's hidden states
        self.block_args: list[list[list[tuple[tuple, dict]]]] = [[], []]  # split → sequence → block → args
        try:
            with torch.no_grad():
                for split, seqs in enumerate((self.data.calib, self.data.held_out)):
                    for ids in seqs:
                        for c in catchers:
                            c.args = None
                        try:
                            self.model(input_ids=ids.to(self.device), use_cache=False)
                        except _Captured:
                            pass
                        except Exception:  # noqa: BLE001 - the forward past stand-ins: block 0's arguments serve all
                            if catchers[0].args is None:
                                raise
                        first = catchers[0]
                        self.states[split].append(first.args[0])
                        self.block_args[split].append([(c.args[1:], c.kwargs) if c.args is not None
                                                       else (first.args[1:], first.kwargs) for c in catchers])
        finally:
            for i, b in enumerate(blocks):
                self.blocks[i] = b
        self.next_block = 0
        self.current: tuple[int, dict, dict] | None = None

    # -- walking --------------------------------------------------------------
    def stats(self, module: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(H from the calibration split, H from the held-out split or None) for target ``module``, fp64 (n, n);
        (None, None) for an expert routed fewer than ``expert_tokens`` calibration tokens."""
        index = int(BLOCK.match(module).group(2))
        if self.current is None or self.current[0] != index:
            if index < self.next_block:
                self._restart()
            while self.next_block < index:
                self._run_block(self.next_block, collect=False)
            calib, held = self._run_block(index, collect=True)
            self.current = (index, calib, held)
        _, calib, held = self.current
        if module not in calib and not getattr(self.targets.get(module), "experts_module", ""):
            raise UserError(f"--calib-data: {module} never ran as a module in the forward (its weight is used "
                            "directly, as Jamba's dt_proj); exclude it with --targets or leave out --calib-data")
        return calib.get(module), held.get(module)

    def _run_block(self, i: int, collect: bool) -> tuple[dict, dict]:
        """Materialize block i, run every sequence through it (hooks on its targets when ``collect``),
        replace the kept hidden states by its outputs, release it."""
        block = self.blocks[i]
        prefix = f"{self.blocks_name}.{i}."
        for name, _ in list(block.named_parameters()):
            self._set(block, name, prefix)
        mods = {prefix + n: m for n, m in block.named_modules() if prefix + n in self.targets}
        stacks = {key: (block.get_parameter(key[len(prefix):]), self.experts[param.module], param.transposed)
                  for key, param in self.expert_params.items() if param.module in self.experts
                  and key.startswith(prefix)}  # "module.param" → (stack, experts that are targets, [E, in, out]?)
        grams: list[dict] = [{}, {}]
        with torch.no_grad():
            for split, states in enumerate(self.states):
                hooks = _GramHooks(mods) if collect else None
                watch = ExpertInputs(stacks) if collect and stacks else None
                for j, hidden in enumerate(states):
                    args, kwargs = self.block_args[split][j][i]  # this block's own arguments
                    try:
                        with watch if watch is not None else contextlib.nullcontext():
                            out = _output(block(hidden, *args, **kwargs))  # (1, T, d)
                    except (RuntimeError, ValueError, TypeError) as err:
                        raise UserError(f"--calib-data: block {i} ({type(block).__name__}) does not run in qpissa's "
                                        f"block-by-block calibration walk ({str(err).splitlines()[0][:160]}); leave "
                                        "out --calib-data") from None
                    states[j] = out
                    if hooks is not None:
                        hooks.next_sequence()
                    if watch is not None:
                        watch.next_sequence()
                if hooks is not None:
                    grams[split] = hooks.remove()
                if watch is not None:
                    watch.check()
                    grams[split].update({k: h for k, h in watch.gram.items()
                                         if split == 1 or watch.tokens[k] >= self.expert_tokens})
        block.to("meta")  # release the weights
        self.next_block = i + 1
        return grams[0], grams[1]


def _set_tensor(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter/buffer ``name`` (dotted) under ``root`` by ``value`` (a frozen parameter stays one)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _data(model_dir: Path, cfg) -> CalibrationData:
    return load_calibration(model_dir, cfg.calib_data, cfg.calib_samples, cfg.calib_holdout, cfg.calib_seq_len,
                            cfg.calib_template, cfg.calib_split, cfg.calib_config)


def held_out(model_dir: Path, cfg) -> list[torch.Tensor]:
    """The held-out sequences of a :class:`qpissa.decompose.DecomposeConfig`'s calibration options."""
    return _data(model_dir, cfg).held_out


def block_stats(model_dir: Path, tensors: Sequence[TensorInfo], targets: Sequence[Target], cfg):
    """module → (Whitening of its calibration H, held-out H or None) or None (an expert with too few routed
    tokens), computed lazily block by block; the roots (one n×n eigendecomposition) are shared by the modules reading the same input (q/k/v, gate/up).
    ``cfg``: a :class:`qpissa.decompose.DecomposeConfig` (calib_* options, damp, device)."""
    from qpissa.decompose.whitening import whiten

    data, damp, device = _data(model_dir, cfg), cfg.damp, cfg.device
    calibrator: BlockwiseCalibrator | None = None
    roots: dict[int, Any] = {}

    def stats(module: str):
        nonlocal calibrator
        if calibrator is None:  # built on first use: a fully resumed run never reads the model
            calibrator = BlockwiseCalibrator(model_dir, tensors, targets, data, device, cfg.calib_expert_tokens)
        h, h_eval = calibrator.stats(module)
        if h is None:  # an expert the router (almost) never chose: the caller falls back to uncalibrated
            return None
        if id(h) not in roots:
            roots.clear()  # one block's distinct inputs at a time
            roots[id(h)] = (h, whiten(h, damp))
        return roots[id(h)][1], h_eval
    return stats
