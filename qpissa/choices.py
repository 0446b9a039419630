"""Allowed values of a config field, read from its ``Literal`` type (declared once, checked here)."""
from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

from qpissa.errors import UserError


def unoptional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (hint, False)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """Field name → allowed values, for every ``Literal`` (or ``Literal | None``) field of dataclass ``cls``."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        base, _ = unoptional(hint)
        if typing.get_origin(base) is Literal:
            out[name] = typing.get_args(base)
    return out


def check_choices(obj: Any) -> None:
    """One line naming the flag when a ``Literal`` field of dataclass ``obj`` holds another value."""
    for name, allowed in choices(type(obj)).items():
        value = getattr(obj, name)
        if value is not None and value not in allowed:
            raise UserError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(map(str, allowed))}")
