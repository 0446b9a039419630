"""Triton kernels for NF4, installed as ``qpissa.kernels``; their modules live in the repository's ``kernels/``.

* ``nf4_dequant``  — NF4 → fp32/bf16/fp16, bit-exact to ``bitsandbytes.functional.dequantize_4bit``.
* ``fused_linear`` — y = x·deq(Q)ᵀ + s·(x·Aᵀ)·Bᵀ with its autograd backward; deq(Q) never hits memory.
* ``reference``    — plain-PyTorch references every kernel is tested against.

Importing this package does not import Triton; the submodules do (Triton is optional).

Why this ``__init__`` is here and not in ``kernels/``: ``python -m pytest``, ``python -c`` and a REPL put the
current folder first on ``sys.path``, and a ``kernels/__init__.py`` at the repository root would then shadow
Hugging Face's ``kernels`` package (transformers and bitsandbytes import it). Without an ``__init__``, ``kernels/``
is only a namespace-package candidate and always loses to the installed regular package. A built wheel holds
this file and the modules side by side in ``qpissa/kernels/`` (pyproject: ``package-dir`` maps the modules,
``package-data`` this file); in a source tree (editable install, or ``import qpissa`` from the repository root)
the modules are found by adding ``kernels/`` to this package's path. setuptools' editable finder cannot serve a
``package-dir``-mapped folder without ``__init__`` itself (pypa/setuptools#4248, #4943).
"""
from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
_source = _here.parents[1] / "kernels"  # <repository>/kernels when qpissa/ is the source tree
if not (_here / "reference.py").is_file() and (_source / "reference.py").is_file():
    __path__.append(str(_source))  # noqa: F821  (a package's __path__)
