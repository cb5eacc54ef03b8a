"""AdamW with VAR's parameter groups, and VAR's learning-rate / weight-decay schedule.

VAR (arXiv 2404.02905) trains with AdamW, betas (0.9, 0.95), weight decay 0.05
that is *not* applied to biases, 1-D parameters (norm gains) and the embedding-like
tensors listed in :data:`VAR_NO_DECAY_KEYS`.  Its learning rate warms up linearly
from ``wp0 x peak`` and then decays (``lin0``: hold the peak for 5% of the remaining
steps, then go linearly down to ``final_ratio x peak``), while the weight decay follows
a cosine from ``wd`` to ``wd_end`` over the whole run.

Example::

    opt = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    sched = WarmupDecaySchedule(opt, peak_lr=1e-4, total_steps=10_000, warmup_steps=500)
    for batch in loader:
        loss(batch).backward(); opt.step(); opt.zero_grad(); sched.step()
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

# Substrings of parameter names that never get weight decay: VAR's ``nowd_keys`` and the names msar
# gives the same tensors (pos_1LC = pos_embed, pos_start = start_pos, lvl_embed = level_embed,
# ada_gss = adaln_offset, scale_mul_1H11 = attn_scale).
VAR_NO_DECAY_KEYS: frozenset[str] = frozenset({
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
    "lvl_embed", "level_embed", "gamma", "beta", "ada_gss", "adaln_offset", "moe_bias", "scale_mul", "attn_scale",
})


def is_no_decay(name: str, param: torch.Tensor, no_decay_keys: Iterable[str] = VAR_NO_DECAY_KEYS) -> bool:
    """VAR's rule: 1-D (or scalar) parameters, biases, and names containing a no-decay key."""
    return param.ndim <= 1 or name.endswith("bias") or any(k in name for k in no_decay_keys)


def param_groups(model: nn.Module, weight_decay: float,
                 no_decay_keys: Iterable[str] = VAR_NO_DECAY_KEYS) -> list[dict]:
    """Two AdamW groups ``[decay, no_decay]``; frozen parameters are left out.

    Each group carries ``names`` (for inspection) and ``wd_scale`` (1 or 0) that
    :class:`WarmupDecaySchedule` multiplies the scheduled weight decay by.
    """
    keys = tuple(no_decay_keys)
    decay, no_decay = {"names": [], "params": []}, {"names": [], "params": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = no_decay if is_no_decay(name, p, keys) else decay
        g["names"].append(name)
        g["params"].append(p)
    groups = []
    if decay["params"]:
        groups.append({**decay, "weight_decay": weight_decay, "wd_scale": 1.0})
    if no_decay["params"]:
        groups.append({**no_decay, "weight_decay": 0.0, "wd_scale": 0.0})
    if not groups:
        raise ValueError("model has no trainable parameters")
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    no_decay_keys: Iterable[str] = VAR_NO_DECAY_KEYS, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (``fused`` defaults to True on CUDA)."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    groups = param_groups(model, weight_decay, no_decay_keys)
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)


def lr_ratio(step: int, total_steps: int, warmup_steps: int, kind: str = "lin0", wp0: float = 0.005,
             final_ratio: float = 0.01) -> float:
    """Learning rate at ``step`` as a fraction of the peak (VAR's ``lr_wd_annealing``).

    kinds: ``lin0`` (hold 5% then linear), ``lin`` (hold 15% then linear), ``lin00``
    (linear), ``cos`` (cosine), ``const`` (peak after warm-up).  All decays end at
    ``final_ratio`` on the last step ``total_steps - 1``.
    """
    if step < warmup_steps:
        return wp0 + (1 - wp0) * step / warmup_steps
    if kind == "const":
        return 1.0
    span = max(1, total_steps - 1 - warmup_steps)
    passed = min(1.0, (step - warmup_steps) / span)  # 0 -> 1 over the decay phase
    if kind == "cos":
        return final_ratio + (1 - final_ratio) * (0.5 + 0.5 * math.cos(math.pi * passed))
    holds = {"lin0": 0.05, "lin": 0.15, "lin00": 0.0}
    if kind not in holds:
        raise ValueError(f"lr schedule must be one of lin0, lin, lin00, cos, const; got {kind!r}")
    hold = holds[kind]
    if passed < hold:
        return 1.0
    return final_ratio + (1 - final_ratio) * (1 - passed) / (1 - hold)


def wd_value(step: int, total_steps: int, wd: float, wd_end: float | None = None) -> float:
    """Weight decay at ``step``: cosine from ``wd`` (step 0) to ``wd_end`` (last step)."""
    if wd_end is None or wd_end == wd:
        return wd
    passed = min(1.0, step / max(1, total_steps - 1))
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * passed))


class WarmupDecaySchedule:
    """Sets ``lr`` and ``weight_decay`` of every param group from the step count.

    The schedule applies the values for the current step on construction and after
    every :meth:`step` (call it once after each optimizer step).  Groups may carry
    ``lr_scale`` / ``wd_scale`` multipliers (:func:`param_groups` sets ``wd_scale``).
    State is just the step, so resuming is exact.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, total_steps: int, warmup_steps: int = 0,
                 kind: str = "lin0", wp0: float = 0.005, final_ratio: float = 0.01, wd: float | None = None,
                 wd_end: float | None = None):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        lr_ratio(warmup_steps, total_steps, warmup_steps, kind)  # validates `kind`
        self.optimizer = optimizer
        self.peak_lr, self.total_steps, self.warmup_steps = peak_lr, total_steps, int(warmup_steps)
        self.kind, self.wp0, self.final_ratio = kind, wp0, final_ratio
        self.wd = wd if wd is not None else max(g.get("weight_decay", 0.0) for g in optimizer.param_groups)
        self.wd_end = wd_end
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        return self.peak_lr * lr_ratio(step, self.total_steps, self.warmup_steps, self.kind, self.wp0, self.final_ratio)

    def wd_at(self, step: int) -> float:
        return wd_value(step, self.total_steps, self.wd, self.wd_end)

    def _apply(self) -> None:
        lr, wd = self.lr_at(self.step_count), self.wd_at(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
            g["weight_decay"] = wd * g.get("wd_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "peak_lr": self.peak_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "kind": self.kind, "wp0": self.wp0,
                "final_ratio": self.final_ratio, "wd": self.wd, "wd_end": self.wd_end}

    def load_state_dict(self, state: dict) -> None:
        # only the position is restored: the live hyper-parameters win, so a resumed run may
        # extend `total_steps` on purpose (the saved ones stay in the dict for inspection)
        self.step_count = int(state["step_count"])
        self._apply()
