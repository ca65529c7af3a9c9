"""Training metrics: one JSON line per step, TensorBoard scalars, and a PNG of loss and per-step
accuracy."""

from __future__ import annotations

import json
import os
from pathlib import Path

from specfast.fileio import atomic_path, atomic_write


class MetricsLog:
    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool):
        self.path = out / "metrics.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            # A killed run may have logged steps after its last checkpoint: drop them, they will
            # be redone.
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= resume_step
            ]
            atomic_write(self.path, "".join(ln + "\n" for ln in kept))
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=(resume_step or 0) + 1)
            except ImportError:
                self.tb = None

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"train/{key}", value, step)
                elif isinstance(value, list):
                    for k, v in enumerate(value):
                        self.tb.add_scalar(f"train/{key}/step{k}", v, step)

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.sync()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_metrics(metrics_path: Path, png_path: Path, smooth: int = 20) -> None:
    """Loss, per-TTT-step accuracy (moving averages) and τ against training step: the simulated τ
    of each step's counts, and the τ measured by real speculative decoding where an in-training
    eval (`--eval-every`) ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = read_metrics(metrics_path)
    if not rows:
        return
    steps = np.array([r["step"] for r in rows])

    def ma(x):
        x = np.asarray(x, dtype=float)
        w = max(1, min(smooth, len(x)))
        return np.convolve(x, np.ones(w) / w, mode="valid"), steps[w - 1 :]

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    y, x = ma([r["loss"] for r in rows])
    ax1.plot(x, y)
    ax1.set(title="TTT loss (weighted sum over steps)", xlabel="step", ylabel="loss")
    accs = np.array([r["acc"] for r in rows])
    for k in range(accs.shape[1]):
        y, x = ma(accs[:, k])
        ax2.plot(x, y, label=f"step {k}")
    ax2.set(title="accuracy per TTT step", xlabel="step", ylabel="accuracy", ylim=(0, 1))
    ax2.legend(fontsize=8)
    y, x = ma([r["sim_accept_len"] for r in rows])
    ax3.plot(x, y, label="simulated (training batches)")
    evals = [r for r in rows if "eval_tau" in r]
    if evals:
        k = evals[-1].get("eval_k", "?")
        ax3.plot(
            [r["step"] for r in evals],
            [r["eval_tau"] for r in evals],
            "o-",
            label=f"measured (held-out, K={k})",
        )
    ax3.set(title="acceptance length τ", xlabel="step", ylabel="τ")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
