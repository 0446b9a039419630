"""What a run measures besides the loss: held-out loss, peak memory, the loss plot."""
from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch

from qpissa.data import eval_batches


def memory_mb(device: str) -> float:
    """Peak memory so far: CUDA max allocated, or the process's peak RSS on CPU (MiB)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def reset_peak_memory(device: str) -> None:
    """Start the peak over (several runs in one process, e.g. ``qpissa compare``): CUDA's peak statistics, or
    the process's VmHWM (writing 5 to /proc/self/clear_refs sets it to the current RSS; Linux ≥ 4.0)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak stays the process's


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB): ``VmHWM`` of /proc/self/status, which starts afresh at exec.
    ``ru_maxrss`` (the fallback off Linux) also holds the parent's resident size at fork time (Linux keeps the
    pre-exec image's peak): a child of a 700 MB benchmark process read ≥ 700 MB whatever it did itself."""
    try:
        return proc_status_bytes("VmHWM") / 2**20
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_status_bytes(key: str) -> int:
    """A memory field of /proc/self/status in bytes (``VmRSS``, ``VmHWM``, …; Linux only)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def plot_losses(run: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qpissa.atomic import atomic_path

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    preference = any("rewards_margin" in r or "eval_rewards_margin" in r for r in rows)  # --objective dpo|simpo
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(11 if preference else 6, 4), squeeze=False)
    ax = axes[0][0]
    if preference:  # the reward margin (train, held-out) and the held-out preference accuracy beside the loss
        right = axes[0][1]
        for key, style in (("rewards_margin", "-"), ("eval_rewards_margin", "o-"), ("eval_rewards_accuracy", "s--")):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                right.plot(*zip(*points), style, label=key.replace("_", " "), lw=1)
        right.set_xlabel("optimizer step")
        right.legend()
        right.grid(alpha=0.3)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("preference loss (mean over pairs)" if preference else "cross-entropy (response tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    with atomic_path(run / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def evaluate_loss(model, examples, batch_size: int, pad_id: int, device: str, precision: str) -> float:
    """Token-weighted mean cross-entropy over response tokens of the held-out examples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(examples, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(**batch)
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)
