"""One writer per output folder: ``OUT/.lock`` (pid, host, token), created with O_EXCL.

A second run into the same folder stops with one clear line instead of racing the first one's
files. A lock whose process is gone (same host, pid no longer alive: a killed run) is stale and is
taken over, so ``--resume`` after ``kill -9`` just works.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from qpissa.errors import UserError

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    """``acquire()`` before writing into ``out_dir``; ``release()`` removes the lock only if it is ours."""

    def __init__(self, out_dir: Path, command: str = "qpissa decompose") -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.command = command
        self.token: str | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        record = {"pid": os.getpid(), "host": socket.gethostname(), "token": token,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": self.command}
        for _ in range(2):  # second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale_or_raise()
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
            self.token = token
            return
        raise UserError(f"{self.path}: another run took this output folder at the same moment; retry later")

    def _clear_stale_or_raise(self) -> None:
        try:
            other = json.loads(self.path.read_text())
            pid, host = int(other["pid"]), str(other["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (ValueError, KeyError, TypeError):
            other, pid, host = {}, -1, "?"
        if host == socket.gethostname() and pid > 0 and not _alive(pid):
            print(f"removing stale lock {self.path} (pid {pid} is gone)", file=sys.stderr)
            self.path.unlink(missing_ok=True)
            return
        raise UserError(f"{self.path.parent} is in use by another {other.get('command', 'qpissa run')} "
                        f"(pid {pid} on {host}, since {other.get('started', '?')}); wait for it to finish, "
                        f"or delete {self.path} if that process is gone")

    def release(self) -> None:
        if self.token is None:
            return
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (FileNotFoundError, ValueError):
            pass
        self.token = None
