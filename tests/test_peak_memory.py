"""Peak RSS of a process is its own: a child of a large process does not report the parent's size."""
from __future__ import annotations

import resource
import subprocess
import sys

import torch

from qpissa.train.metrics import peak_rss_mb


def test_child_peak_excludes_the_parent_at_fork():
    """ru_maxrss keeps the pre-exec image's peak (the forked parent); VmHWM starts afresh at exec."""
    ballast = torch.ones(256 * 2**20)  # 1 GiB, touched
    code = ("import resource; from qpissa.train.metrics import peak_rss_mb; "
            "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    ours, maxrss = map(float, subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                                             check=True).stdout.split())
    assert float(ballast[-1]) == 1.0
    assert maxrss > 1024  # the parent's GiB, as the old measure read it (the reason for peak_rss_mb)
    assert ours < 800  # the child's own: interpreter, torch, qpissa
    assert peak_rss_mb() >= 1024 and peak_rss_mb() <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 1
