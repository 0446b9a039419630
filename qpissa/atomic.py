"""Atomic file writes (temp file in the same folder + fsync + rename), so a kill -9 never leaves a half file;
and :func:`output_folder`, what a command's output folder holds after a failure, a full disk or Ctrl-C."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from qpissa.errors import UserError
from qpissa.lock import LOCK_NAME


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(dest: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is renamed over ``dest``, on error removed.
    ``durable=False`` skips the fsync before the rename (the file may be empty after a power loss)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        if durable:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files ``atomic_path`` left in ``folder`` when a process was killed mid-write (SIGKILL
    skips the cleanup); call it only while no other writer uses the folder (under the output lock)."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file() and p.name.count(".") >= 3]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | os.PathLike, text: str) -> None:
    write_bytes(dest, text.encode("utf-8"))


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------- a run's output folder

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how libraries word a full disk they wrap: safetensors' Rust writer ("No space left on device (os error 28)")
FULL_WORDS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


class DiskFull(UserError):
    """The disk (or quota) filled up while a run wrote its output: what was kept and how to go on, in one line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what was kept and how to resume."""


def disk_full(err: BaseException | None) -> bool:
    """Whether ``err``, or an exception it was raised from or while handling, is a full disk or quota (torch.save
    into a file object raises a RuntimeError while handling the ENOSPC; safetensors only words it)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if (isinstance(err, OSError) and err.errno in FULL_ERRNOS) or any(w in str(err) for w in FULL_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False


def size_of(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds (or will hold) ``path``."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def mb(n: int | float) -> str:
    """Bytes for a message: 980 KB, 2.4 MB, 1.25 GB."""
    return f"{n / 1e3:,.0f} KB" if n < 1e6 else f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


@dataclass
class Output:
    """A command's output folder while it runs (see :func:`output_folder`). The command sets ``kept`` (what
    the folder holds worth keeping, e.g. "7 of 12 tensors"; None: nothing yet) and ``needs`` (bytes the rest of
    the run still writes) as it learns them; ``resume`` says how to continue."""

    path: Path
    resume: str = "rerun"
    kept: Callable[[], str | None] = field(default=lambda: None)
    needs: Callable[[], int | None] = field(default=lambda: None)


@contextmanager
def output_folder(path: str | os.PathLike, resume: str = "rerun", remove: bool = True) -> Iterator[Output]:
    """Guard a run that writes into ``path``. On any failure before something worth keeping was written
    (``kept()`` is None) what this run created there is removed (never what was there before: a resumed run's
    files stay); ``remove=False`` on the non-writing ranks. A full disk becomes :class:`DiskFull` and Ctrl-C
    :class:`Interrupted`, each one line: what was kept, how much space the rest needs, how to continue."""
    out = Output(Path(path), resume)
    top = out.path
    while top != top.parent and not top.parent.exists():  # the highest folder this run creates (mkdir parents)
        top = top.parent
    before = set(os.listdir(out.path)) if out.path.is_dir() else None
    remove = remove and (before is not None or not out.path.exists())  # a file at OUT: its command refuses it
    try:
        yield out
    except (Exception, KeyboardInterrupt) as err:
        try:
            kept = out.kept()
        except Exception:  # noqa: BLE001  (a half-written journal: describe nothing rather than fail here)
            kept = None
        remove = remove and not (out.path / LOCK_NAME).exists()  # our lock is released by now: another run's
        created = before is None and remove and top.exists()
        if kept is None and remove:
            if before is None:
                shutil.rmtree(top, ignore_errors=True)
            elif out.path.is_dir():
                for name in set(os.listdir(out.path)) - before:
                    p = out.path / name
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        what = f"kept {kept} in {out.path}" if kept is not None else (
            f"nothing kept (removed {top})" if created else "nothing kept" if before is None else
            f"nothing new kept in {out.path}")
        if isinstance(err, KeyboardInterrupt):
            raise Interrupted(f"interrupted: {what}; {out.resume} to continue" if kept is not None else
                              f"interrupted: {what}") from None
        if disk_full(err):  # an inner run's DiskFull too (compare → decompose): said again from this folder
            try:
                needs = out.needs() or getattr(err, "needs", None)
            except Exception:  # noqa: BLE001
                needs = getattr(err, "needs", None)
            rest = f"the rest needs about {mb(needs)} more" if needs else "the rest needs more"
            full = DiskFull(f"no space left on device writing {out.path} ({mb(free_bytes(out.path))} free there, "
                            f"{rest}); {what}; free space and {out.resume}")
            full.needs = needs
            raise full from (err.__cause__ if isinstance(err, DiskFull) else err)
        raise
