"""Models and datasets by Hugging Face Hub id (``org/name``): a local path always wins, else the Hub.

Models go through :func:`huggingface_hub.snapshot_download` into the standard cache (``HF_HOME`` /
``HF_HUB_CACHE``), so a second run, another tool and ``HF_HUB_OFFLINE=1`` all see the same files; the
token is the usual one (``HF_TOKEN`` or ``hf auth login``). Only what a safetensors checkpoint needs is
fetched: configs, tokenizer files, chat template, ``*.safetensors`` (+ index) and sentence-transformers
module folders; never pickles (``*.bin``, ``*.pt``), GGUF, ONNX or the duplicate ``consolidated`` /
``original/`` copies some repos carry.

Datasets go through :func:`datasets.load_dataset` (its own cache and offline fallback); when the Hub cannot
be reached, a snapshot of the dataset repo already in the hub cache (``hf download --repo-type dataset``,
or what an earlier online ``load_dataset`` left there) is read instead.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from qpissa.errors import UserError

REVISION_HELP = "Hub revision (branch, tag or commit) when the model is a Hub id such as org/name (default: main)"
MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken")
CONFIG_FILES = ("config.json",)
SKIPPED_FILES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx",
                 "consolidated*.safetensors", "original/*", "onnx/*", "openvino/*", "coreml/*")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")  # a name ending so is a file, never a Hub id
_TOKEN = "for a gated or private repo set HF_TOKEN (or run `hf auth login`)"


def is_hub_id(name: str | os.PathLike) -> bool:
    """``org/name`` or ``name`` as the Hub spells repo ids (a path like ``./x``, ``/x`` or ``a/b/c`` is not)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = os.fspath(name)
    if text.count("/") > 1 or text.startswith((".", "~")) or text.lower().endswith(DATA_SUFFIXES):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _network() -> str:
    """What to do when the Hub was not reached."""
    if _offline():
        return (f"HF_HUB_OFFLINE=1 and it is not in the cache {_cache()}: unset HF_HUB_OFFLINE, or download it "
                "into the same HF_HOME on a machine with network")
    return f"the Hub could not be reached and it is not in the cache {_cache()}: check the network (proxy, HF_ENDPOINT)"


def _why(err: Exception, name: str, revision: str | None) -> str:
    """What went wrong with the Hub and what to do, in one line."""
    from huggingface_hub.errors import (GatedRepoError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(err, GatedRepoError):
        return (f"the repo is gated: accept its terms on https://huggingface.co/{name} and set HF_TOKEN "
                "(or run `hf auth login`)")
    if isinstance(err, RepositoryNotFoundError):
        return f"no such repo on the Hub: check the spelling; {_TOKEN}"
    if isinstance(err, RevisionNotFoundError):
        return f"the repo has no revision {revision!r}: pass an existing branch, tag or commit with --revision"
    if isinstance(err, IncompleteSnapshotError):
        return f"the cached copy in {_cache()} is incomplete and the Hub cannot be reached: go online once to finish it"
    if isinstance(err, LocalEntryNotFoundError):
        return f"{_network()}; check the spelling; {_TOKEN}"
    return f"{type(err).__name__}: {' '.join(str(err).split())}; check the spelling; {_TOKEN}"


def resolve_model(name_or_path: str | os.PathLike, revision: str | None = None,
                  files: Sequence[str] = MODEL_FILES) -> Path:
    """A local file/folder as given, else the Hub snapshot folder of repo ``name_or_path`` at ``revision``.

    ``files``: the glob patterns to fetch (default: a safetensors checkpoint with its tokenizer; the planner
    asks for :data:`CONFIG_FILES` only). Errors are one :class:`UserError` line naming both places tried.
    """
    path = Path(name_or_path)
    if path.exists():
        if revision is not None:
            raise UserError(f"--revision {revision} applies to a Hub id, but {path} is a local path; drop --revision "
                            "or pass the Hub id")
        return path
    name = os.fspath(name_or_path)
    if not is_hub_id(name):
        raise UserError(f"{name} does not exist: no such local file or folder, and not a Hub id of the form org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(name, revision=revision, allow_patterns=list(files),
                                        ignore_patterns=list(SKIPPED_FILES), library_name="qpissa"))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        at = f"@{revision}" if revision else ""
        raise UserError(f"{name}: no such local folder, and the Hub model {name}{at} could not be fetched: "
                        f"{_why(err, name, revision)}") from None
    if not (folder / "config.json").is_file():
        raise UserError(f"Hub model {name} ({folder}) has no config.json: not a transformers checkpoint")
    if tuple(files) == MODEL_FILES and not any(folder.glob("*.safetensors")):
        if _offline():  # e.g. only config.json was fetched (by `qpissa plan`) before going offline
            raise UserError(f"Hub model {name}: the cached snapshot {folder} holds no *.safetensors and "
                            "HF_HUB_OFFLINE=1; unset HF_HUB_OFFLINE once to fetch the weights")
        raise UserError(f"Hub model {name} has no *.safetensors weights (qpissa never loads pickled *.bin files): "
                        "pick a repo or revision with safetensors, or convert it")
    return folder


def load_hub_dataset(name: str, split: str = "train", config: str | None = None,
                     flags: tuple[str, str] = ("--data-split", "--data-config")) -> Any:
    """``datasets.load_dataset(name, config, split=split)``; offline or unreachable Hub: the hub-cache snapshot.
    ``flags``: the caller's split and subset options, named in errors."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except ConnectionError as err:  # OfflineModeIsEnabled too; a snapshot already in the cache may still serve
        reached = err
    except Exception as err:  # noqa: BLE001 - datasets raises many types (not found, gated, split, config)
        raise UserError(_dataset_error(name, split, config, flags, err)) from None
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(name, repo_type="dataset", local_files_only=True, library_name="qpissa")
    except Exception:  # noqa: BLE001 - no cached snapshot: report the Hub error
        raise UserError(_dataset_error(name, split, config, flags, reached)) from None
    try:
        return datasets.load_dataset(folder, config, split=split)
    except Exception as err:  # noqa: BLE001
        raise UserError(_dataset_error(name, split, config, flags, err)) from None


def _dataset_error(name: str, split: str, config: str | None, flags: tuple[str, str], err: Exception) -> str:
    text = " ".join(str(err).split())
    if "split" in text.lower() and split in text:
        hint = f"choose one of its splits with {flags[0]}"
    elif "config" in text.lower():
        hint = f"pick one of its subsets with {flags[1]}"
    elif isinstance(err, ConnectionError):
        hint = f"{_network()}; check the spelling; {_TOKEN}"
    else:
        hint = f"check the spelling; {_TOKEN}"
    subset = f" (subset {config!r})" if config else ""
    return (f"{name}: no such local file or folder, and the Hub dataset {name}{subset} split {split!r} could not "
            f"be loaded ({type(err).__name__}: {text}); {hint}")
