"""One line of a memory plan: a named number of bytes and how it was computed."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Component:
    name: str
    bytes: int
    detail: str
