"""Reading a model's config.json fields for ``plan``: one check shared by the dense, MoE and DeepSeek shapes."""
from __future__ import annotations

from qpissa.errors import UserError


def need(cfg: dict, key: str) -> int:
    """``cfg[key]`` as a positive integer; else one line naming the config file and the field."""
    val = cfg.get(key)
    if not isinstance(val, int) or val <= 0:
        raise UserError(f"{cfg.get('_path', 'config')}: field {key!r} missing or not a positive integer (got {val!r})")
    return val
