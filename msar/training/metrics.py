"""Metric logging (CSV, plus TensorBoard when it is installed) and a parameter EMA."""
from __future__ import annotations

import copy
import csv
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn


class CSVLogger:
    """Appends rows of metrics to ``<log_dir>/<name>.csv`` (+ TensorBoard scalars if available).

    A metric that first appears in a later row widens the header (the file is rewritten
    once; earlier rows leave it empty).  ``truncate_after(step)`` deletes rows logged after ``step`` -- used on
    resume so the rows of a crashed run's lost steps do not appear twice.
    """

    def __init__(self, log_dir: str | os.PathLike, name: str = "train", tensorboard: bool = True):
        self.path = Path(log_dir) / f"{name}.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.columns: list[str] | None = None
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
            self.columns = header or None
        self.tb = None
        if tensorboard:
            try:  # optional dependency
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(log_dir) / "tb"))
            except Exception:
                self.tb = None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, **{k: _num(v) for k, v in metrics.items()}}
        if self.columns is None:
            self.columns = list(row)
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writeheader()
        new = [k for k in row if k not in self.columns]
        if new:  # a metric that starts later (e.g. a GAN loss): widen the header, rewrite once
            self._rewrite(self.columns + new, self._rows())
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{self.name}/{k}", v, step)

    def _rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, columns: list[str], rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)
        self.columns = columns

    def truncate_after(self, step: int) -> None:
        if self.columns is None:
            return
        rows = self._rows()
        keep = [r for r in rows if r.get("step") not in (None, "") and float(r["step"]) <= step]
        if len(keep) != len(rows):
            self._rewrite(self.columns, keep)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _num(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


class EMA(nn.Module):
    """Exponential moving average of a model's parameters (buffers are copied).

    ``ema.update(model)`` after every optimizer step; ``ema.module`` is the averaged
    copy (eval mode, no gradients), saved in checkpoints like any model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)

    def train(self, mode: bool = True) -> "EMA":  # the average is always in eval mode
        super().train(False)
        return self
