"""What each routed expert's weights multiply, read from the experts' own computation: H = XᵀX per expert and
fused parameter, and the number of tokens routed to it (for the calibrated methods on MoE models).

Families differ in how their experts module runs: most index the stack and call ``F.linear(x, W[e])`` on the
tokens the router sent expert e (Qwen3-MoE, DeepSeek, Mixtral, …); gpt-oss computes ``x @ W[e] + b[e]`` with
the stack stored [E, in, out], interleaved gate/up rows and a clamped activation; Llama-4 applies the router's
scores first and multiplies every expert at once, ``bmm(x.view(E, T, H), W)`` (rows of unrouted tokens are zero).
Rather than re-implement each forward, a :class:`~torch.overrides.TorchFunctionMode` watches the block run (the
model built with ``experts_implementation="eager"``) and records the operand that meets an expert's weight:

* ``W[e]`` (an index into a watched stack) is tagged (stack, e), through views (``.t()``, ``.transpose``, ``.to``);
* ``F.linear(x, W[e])``, ``x @ W[e]`` / ``matmul``: x's rows are expert e's input for that parameter;
* ``bmm(x, W)`` / ``x @ W`` with the whole stack: x[e]'s rows are expert e's input.

Only non-zero rows count as routed tokens (a whole-stack product gets zero rows for the tokens not routed there).
A stack whose inputs meet it along the axis the decomposition takes as its output (Llama-4's [E, H, 2I], taken as
out×in by qpissa and PEFT alike), or that received rows in no form above, is an error naming the module (never a
silent uncalibrated expert).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from qpissa.errors import UserError

F = torch.nn.functional
_INDEX = {torch.Tensor.__getitem__}
_VIEWS = {torch.Tensor.t, torch.Tensor.transpose, torch.transpose, torch.t, torch.Tensor.mT.__get__,
          torch.Tensor.to, torch.Tensor.float, torch.Tensor.contiguous, torch.Tensor.type_as}
_LINEAR = {F.linear}  # (x, weight[out, in])
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}  # (x, W)


def accumulate_gram(h: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """H += XᵀX in fp64 on x's device, X = x flattened to (tokens, n)."""
    xs = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, n)
    if h is None:
        h = torch.zeros(xs.shape[1], xs.shape[1], dtype=torch.float64, device=xs.device)  # (n, n)
    return h.addmm_(xs.T, xs)


class ExpertInputs(TorchFunctionMode):
    """Inside ``with ExpertInputs(stacks):`` every expert's inputs are accumulated. ``stacks``: "module.param" →
    (the fused parameter [E, ·, ·], the expert indices wanted, whether the decomposition takes it as stored
    [E, in, out] (``is_transposed``), else [E, out, in]). Results: :attr:`gram` and :attr:`tokens`, keyed
    "module.e.param" (the expert target's module name)."""

    def __init__(self, stacks: dict[str, tuple[torch.Tensor, set[int], bool]]):
        super().__init__()
        self.gram: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._stacks = {key: (wanted, transposed) for key, (_, wanted, transposed) in stacks.items()}
        self._roots = {id(p): key for key, (p, _, _) in stacks.items()}
        # id(tensor) → (key, expert or None for the whole stack, flipped: its last two axes swapped, the tensor)
        self._tags: dict[int, tuple[str, int | None, bool, torch.Tensor]] = {}
        self.seen: set[str] = set()  # stacks whose inputs were read

    def _tag(self, t: torch.Tensor) -> tuple[str, int | None, bool] | None:
        if id(t) in self._roots:
            return self._roots[id(t)], None, False
        hit = self._tags.get(id(t))
        return hit[:3] if hit is not None else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tag = self._tag(args[0]) if args and isinstance(args[0], torch.Tensor) else None
        if tag is not None and func in _INDEX and tag[1] is None:
            index = args[1]
            if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.numel() == 1
                                          and not index.is_floating_point() and index.dtype != torch.bool):
                self._tags[id(out)] = (tag[0], int(index), tag[2], out)
        elif tag is not None and func in _VIEWS and isinstance(out, torch.Tensor):
            self._tags[id(out)] = (tag[0], tag[1], tag[2] ^ _swaps_last_two(func, args, kwargs), out)
        elif func in _LINEAR or func in _MATMUL:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other", kwargs.get("mat2")))
            wtag = self._tag(w) if isinstance(w, torch.Tensor) else None
            if wtag is not None:
                key, e, flipped = wtag
                contracts_rows = (func in _MATMUL) ^ flipped  # x·W contracts W's first matrix axis
                if e is not None:
                    self._add(key, e, x, contracts_rows)
                elif x.ndim == 3:  # the whole stack: x[e] meets expert e
                    for i in sorted(self._stacks[key][0]):
                        self._add(key, i, x[i], contracts_rows)
        return out

    def _add(self, key: str, e: int, x: torch.Tensor, contracts_rows: bool) -> None:
        """x's rows enter expert e of ``key``; ``contracts_rows``: x·W (W's first axis is the input), else x·Wᵀ."""
        self.seen.add(key)
        if contracts_rows != self._stacks[key][1]:  # H would weight the decomposed matrix's output axis
            raise UserError(f"--calib-data: the experts of {key} multiply their input along the axis the "
                            "decomposition takes as their output (Llama-4's [E, H, 2I] without is_transposed); "
                            "calibrated inits do not take this layout yet; leave out --calib-data or exclude the "
                            "experts with --targets")
        if e not in self._stacks[key][0]:
            return
        rows = x.detach().reshape(-1, x.shape[-1])
        rows = rows[rows.abs().amax(dim=-1) > 0]  # Llama-4: unrouted tokens enter as zero rows
        module, param = key.rsplit(".", 1)
        name = f"{module}.{e}.{param}"
        self.tokens[name] = self.tokens.get(name, 0) + rows.shape[0]
        if rows.shape[0]:
            self.gram[name] = accumulate_gram(self.gram.get(name), rows)

    def next_sequence(self) -> None:
        """Forget this forward's tags (tensor ids may be reused once their tensors are freed)."""
        self._tags.clear()

    def check(self) -> None:
        """Every watched stack's inputs were seen; else one line naming it."""
        missed = sorted(key for key in self._stacks if key not in self.seen)
        if missed:
            raise UserError(f"--calib-data: could not read which tokens reach the experts of {missed[0]} (its forward "
                            "multiplies them in a way qpissa does not follow); leave out --calib-data or exclude "
                            "the experts with --targets")


def _swaps_last_two(func, args, kwargs) -> bool:
    """Whether view ``func`` swaps its input's last two axes (``.t()``, ``.mT``, ``transpose(-1, -2)``)."""
    if func in (torch.Tensor.t, torch.t, torch.Tensor.mT.__get__):
        return True
    if func in (torch.Tensor.transpose, torch.transpose):
        ndim = args[0].ndim
        dims = [*args[1:3], *(kwargs[k] for k in ("dim0", "dim1") if k in kwargs)]
        return sorted(d % ndim for d in dims) == [ndim - 2, ndim - 1]
    return False
