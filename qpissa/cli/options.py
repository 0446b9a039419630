"""Typer options derived from config dataclasses: every option is declared once, as a dataclass field.

A field's name gives the flag (``batch_size`` → ``--batch-size``), its default the CLI default,
``metadata["help"]`` the help text and its type the option type. ``Literal[...]`` fields become
plain ``str`` options whose choices the dataclass validates (one :class:`~qpissa.errors.UserError`
line, exit 2) and the help lists. The Python API takes the same dataclasses, so the CLI, the API and
the planner cannot drift apart (the pattern of PEFT's ``LoraConfig``).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional

import typer

from qpissa.choices import unoptional


def help_of(cls: type, name: str) -> str:
    """The help text of field ``name`` of dataclass ``cls``."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("help", "")


@dataclass(frozen=True)
class Options:
    """Which fields of ``cls`` a command exposes, and how.

    ``defaults``: CLI defaults that differ from the Python API's (e.g. ``device="auto"``);
    ``toggles``: booleans as ``--x/--no-x`` (else an on-switch ``--x``); ``shorts``: field → short flag;
    ``list_choices``: append "(one of: …)" to the help of ``Literal`` fields; ``flags``: field → flag name when
    it is not ``--field-name`` (e.g. ``init_adapter`` → ``--init``); ``types``: field → CLI type when it is not
    the field's (e.g. ``Path`` for a ``str`` path: typer shows ``<path>``; the command converts it back).
    """

    cls: type
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    toggles: bool = True
    shorts: Mapping[str, str] = field(default_factory=dict)
    list_choices: bool = True
    flags: Mapping[str, str] = field(default_factory=dict)
    types: Mapping[str, type] = field(default_factory=dict)

    def parameters(self) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(self.cls)
        out = []
        for f in dataclasses.fields(self.cls):
            if f.name in self.exclude or (self.include is not None and f.name not in self.include):
                continue
            out.append(self._parameter(f, hints[f.name]))
        return out

    def _parameter(self, f: dataclasses.Field, hint: Any) -> inspect.Parameter:
        base, optional = unoptional(hint)
        base = self.types.get(f.name, base)
        help_text = f.metadata.get("help", "")
        if typing.get_origin(base) is Literal:
            allowed = [str(a) for a in typing.get_args(base)]
            if self.list_choices:
                help_text = f"{help_text} (one of: {', '.join(allowed)})"
            base = str
        flag = self.flags.get(f.name, "--" + f.name.replace("_", "-"))
        if base is bool and (self.toggles or optional):
            flag = f"{flag}/--no-{flag[2:]}"
        decls = [flag, *([self.shorts[f.name]] if f.name in self.shorts else [])]
        if f.name in self.defaults:
            default = self.defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = ...  # required
        annotation = Optional[base] if optional else base
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=typer.Option(default, *decls, help=help_text))


def with_options(**groups: Options) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a typer command: for each ``name=Options(Cfg)``, add Cfg's fields as options and pass
    the command ``name={field: value}`` (the command builds the config, so nested configs stay explicit)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values() if p.name not in groups]
        added = {name: opts.parameters() for name, opts in groups.items()}
        params = own + [p for ps in added.values() for p in ps]
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise TypeError(f"{fn.__name__}: an option is declared twice: {sorted(n for n in names if names.count(n) > 1)}")

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            for name, ps in added.items():
                kwargs[name] = {p.name: kwargs.pop(p.name) for p in ps}
            return fn(**kwargs)

        del command.__wrapped__  # typer must see the signature below, not fn's
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap
