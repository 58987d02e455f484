"""Run metrics: metrics.jsonl (one JSON object a line), TensorBoard when installed, and the loss-curve plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import atomic_write, atomic_write_text


class MetricsLog:
    """metrics.jsonl (appended, one JSON object a line) and TensorBoard when installed."""

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int | None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop records past the checkpoint we resume from: they will be written again.
            keep = [r for r in self.records() if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def records(self) -> list[dict[str, Any]]:
        """Every record logged so far (a line cut short by a crash is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for ln in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(ln)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Loss curves (train per logged step, validation per evaluation) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), marker="." if len(tr) < 30 else None, label="train")  # a single point shows too
    if va:
        ax.plot(*zip(*va), marker="o", label="validation")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
