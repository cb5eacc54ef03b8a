"""Metric logging (CSV, plus TensorBoard when it is installed) and a parameter EMA."""
from __future__ import annotations

import copy
import csv
import os
import warnings
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn as nn


class CSVLogger:
    """Appends rows of metrics to ``<log_dir>/<name>.csv`` (+ TensorBoard scalars if available).

    Columns are fixed by the first row written (keys first seen later are dropped with
    a warning).  ``truncate_after(step)`` deletes rows logged after ``step`` -- used on
    resume so the rows of a crashed run's lost steps do not appear twice.
    """

    def __init__(self, log_dir: str | os.PathLike, name: str = "train", tensorboard: bool = True):
        self.path = Path(log_dir) / f"{name}.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.columns: Optional[list[str]] = None
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
            self.columns = header or None
        self._warned: set[str] = set()
        self.tb = None
        if tensorboard:
            try:  # optional dependency
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(log_dir) / "tb"))
            except Exception:
                self.tb = None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, **{k: _num(v) for k, v in metrics.items()}}
        new_file = self.columns is None
        if new_file:
            self.columns = list(row)
        extra = [k for k in row if k not in self.columns and k not in self._warned]
        if extra:
            warnings.warn(f"{self.path}: dropping columns not in the header: {extra}")
            self._warned.update(extra)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new_file:
                w.writeheader()
            w.writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{self.name}/{k}", v, step)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists() or self.columns is None:
            return
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if r.get("step") not in (None, "") and float(r["step"]) <= step]
        if len(keep) == len(rows):
            return
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(keep)
        os.replace(tmp, self.path)

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
