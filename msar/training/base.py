"""The training loop shared by every trainer.

What :meth:`Trainer.fit` does, in order::

    resume from the newest good checkpoint in ckpt_dir (if any)
    for each epoch, starting at the saved data position:
        for each batch:
            out = compute_loss(parse_batch(batch))          # under autocast when amp is on
            (out.loss / grad_accum).backward()
            every grad_accum batches:                       # one optimizer step
                clip gradients; optimizer.step(); ema.update(); scheduler.step()
                log the step's metrics; checkpoint every ckpt_every steps

A subclass implements ``compute_loss(batch) -> LossOutput`` (and may override
``parse_batch`` and ``on_step_end``).  Everything else is opt-in through :class:`TrainConfig`:
mixed precision (``amp``, CUDA only), DDP (launched with ``torchrun``; FSDP by overriding
:meth:`Trainer.wrap_model`), an EMA copy (``ema_decay``), extra modules with their own
optimizer (:meth:`Trainer.add_trainable`, e.g. a GAN discriminator), CSV/TensorBoard logs
(``log_dir``), checkpoints (``ckpt_dir``), ``torch.compile`` (``compile``).

A non-finite loss or gradient either raises :class:`NonFiniteError` or skips the step
(``on_nonfinite``); the message names the step and the parts of the loss that went bad.

Exact resume: a checkpoint holds the weights, optimizer, scheduler, grad-scaler, EMA, the
counters below and every rank's RNG state, so ``fit`` resumed from step N continues
bit-for-bit like the run that never stopped -- given a loader whose order depends only on
the epoch (a list, or :func:`~msar.training.distributed.build_loader`).  Counters:
``step`` (optimizer steps), ``batches_seen`` (micro-batches), ``epoch`` and
``epoch_batches`` (the data position inside the epoch), ``nonfinite_steps``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import distributed as D
from .checkpoint import (Checkpoint, capture_rng_state, load_checkpoint, load_latest, restore_rng_state,
                         save_checkpoint)
from .metrics import EMA, CSVLogger
from .optim import VAR_NO_DECAY_KEYS, WarmupDecaySchedule, build_optimizer

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Raised (``on_nonfinite="raise"``) when a loss or gradient is NaN/Inf; the message
    names the step and the part (scale, loss term) that went non-finite."""


@dataclass
class TrainConfig:
    """Settings shared by all trainers.

    Optimisation (VAR's defaults): AdamW with peak learning rate ``lr``, reached after
    ``warmup_steps`` from ``warmup_start x lr``, then decayed by ``lr_schedule`` (``lin0``,
    ``lin``, ``lin00``, ``cos``, ``const``) to ``final_lr_ratio x lr`` at ``total_steps``;
    weight decay goes from ``weight_decay`` to ``weight_decay_end`` (cosine; ``None`` =
    constant).  One optimizer step consumes ``grad_accum`` batches; ``grad_clip`` <= 0 disables
    clipping.

    Opt-in parts: ``amp`` (``"bf16"``, ``"fp16"`` with a GradScaler, or ``"none"``; CUDA only),
    ``ema_decay`` > 0 (an EMA copy of the weights), ``compile``, ``ddp_find_unused`` (DDP's
    ``find_unused_parameters``; ``None`` = the trainer's default), ``on_nonfinite`` (``"skip"``
    the step with a warning, or ``"raise"``).

    Bookkeeping: a checkpoint every ``ckpt_every`` steps (0 = only at the end of ``fit``) into
    ``ckpt_dir`` keeping ``keep_last``; ``resume`` makes ``fit`` start from the newest good
    checkpoint there; metrics go to ``log_dir/train.csv`` every ``log_every`` steps.

    Device: ``device`` (``"cuda"`` = ``cuda:LOCAL_RANK`` under torchrun, ``"cpu"``, ...) moves the
    model and every batch there; ``None`` keeps the device the model is on (move the model to the
    GPU before building the trainer, as in plain PyTorch).
    """

    lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    total_steps: int = 1000
    warmup_steps: int = 0
    lr_schedule: str = "lin0"
    warmup_start: float = 0.005
    final_lr_ratio: float = 0.01
    grad_clip: float = 2.0
    grad_accum: int = 1
    amp: str = "none"
    compile: bool = False
    ema_decay: float = 0.0
    on_nonfinite: str = "skip"
    device: str | None = None
    ddp_find_unused: bool | None = None
    ckpt_dir: str | None = None
    ckpt_every: int = 0
    keep_last: int = 3
    resume: bool = True
    log_dir: str | None = None
    log_every: int = 1
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> None:
        checks = [(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
                  (self.amp in ("none", "bf16", "fp16"), f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}"),
                  (self.on_nonfinite in ("skip", "raise"),
                   f"on_nonfinite must be 'skip' or 'raise', got {self.on_nonfinite!r}"),
                  (self.total_steps >= 1, f"total_steps must be >= 1, got {self.total_steps}"),
                  (0 <= self.warmup_steps <= self.total_steps,
                   f"warmup_steps must be in [0, total_steps], got {self.warmup_steps}"),
                  (not self.ema_decay or 0 < self.ema_decay < 1,
                   f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class LossOutput:
    """What ``compute_loss`` returns.

    loss: scalar to back-propagate (all trainable parts summed).
    metrics: scalars to log (tensors are fine; averaged over a step's micro-batches).
    parts: named scalars whose finiteness explains a non-finite ``loss``
        (e.g. ``{"scale 2 (4, 4)": loss_2}``).
    """

    loss: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _float(v: Any) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


def config_dict(obj: Any) -> Any:
    return asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj


def leaves_rng_alone(fn):
    """Decorator of the trainers' ``evaluate``: the random streams (Python, NumPy, torch CPU and CUDA)
    are put back as they were, so evaluating between two ``fit`` calls leaves the training that
    follows exactly as without the pause (iterating a plain shuffling ``DataLoader`` draws from the
    global RNG, which would move every later dropout mask)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        state = capture_rng_state()
        try:
            return fn(*args, **kwargs)
        finally:
            restore_rng_state(state)
    return wrapper


class Trainer:
    """Base class; see the module docstring.  Subclasses call ``super().__init__(model, config)``."""

    find_unused_parameters = False  # DDP default of this trainer (see TrainConfig.ddp_find_unused)

    def __init__(self, model: nn.Module, config: TrainConfig):
        config.validate()
        self.config = c = config
        self.device = D.trainer_device(c.device, model)
        self.model = model.to(self.device).train()
        cuda = self.device.type == "cuda"
        if c.amp != "none" and not cuda:
            warnings.warn(f"amp={c.amp!r} ignored: mixed precision is only used on CUDA")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.amp) if cuda else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.modules: dict[str, nn.Module] = {"model": self.model}  # everything an optimizer trains
        self.optimizers = {"model": self.make_optimizer(self.model)}
        self.schedulers = {"model": self.make_scheduler(self.optimizers["model"])}
        self.ema = EMA(self.model, c.ema_decay) if c.ema_decay > 0 else None
        self.averaged: dict[str, EMA] = {}  # EMA copies of trainables that are part of the model
        self.ddp_model = self.wrap_model(self.model)
        self.forward_model = torch.compile(self.ddp_model) if c.compile else self.ddp_model

        self.step = self.batches_seen = self.epoch = self.epoch_batches = self.nonfinite_steps = 0
        self.history: list[dict] = []     # records of the steps taken by this object
        self.window: list[dict] = []      # metrics of the micro-batches of the current step
        self.skip_reason: str | None = None  # why the current step will be skipped (non-finite)
        self.saved_step = -1
        self._pending_rng: dict | None = None  # restored once the loader is fast-forwarded
        self.loggers: dict[str, CSVLogger] = {}

    # ------------------------------------------------------------------ construction helpers
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the training forward runs through: DDP when more than one process
        runs, else the model itself.  Override for other parallelism (e.g. FSDP, where the
        model is sharded before the trainer is built)."""
        if D.world_size() <= 1:
            return model
        c = self.config
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters if c.ddp_find_unused is None else c.ddp_find_unused)

    def make_optimizer(self, module: nn.Module, lr: float | None = None,
                       betas: tuple[float, float] | None = None) -> torch.optim.Optimizer:
        c = self.config
        return build_optimizer(module, lr=lr or c.lr, weight_decay=c.weight_decay, betas=betas or c.betas,
                               eps=c.eps, no_decay_keys=VAR_NO_DECAY_KEYS)

    def make_scheduler(self, opt: torch.optim.Optimizer, lr: float | None = None) -> WarmupDecaySchedule:
        c = self.config
        return WarmupDecaySchedule(opt, peak_lr=lr or c.lr, total_steps=c.total_steps, warmup_steps=c.warmup_steps,
                                   kind=c.lr_schedule, wp0=c.warmup_start, final_ratio=c.final_lr_ratio,
                                   wd=c.weight_decay, wd_end=c.weight_decay_end)

    def add_trainable(self, name: str, module: nn.Module, lr: float | None = None,
                      betas: tuple[float, float] | None = None, averaged: bool = False) -> nn.Module:
        """Train ``module`` alongside the model with its own AdamW and schedule (e.g. a GAN
        discriminator).  It is checkpointed as ``name``; under DDP its gradients are averaged
        over ranks by the trainer (it is not wrapped).

        ``averaged=True`` declares it part of the model (e.g. a jointly trained text encoder): with
        ``ema_decay > 0`` it gets its own EMA copy, updated with the model's, checkpointed as
        ``ema_<name>`` and returned by :meth:`eval_module` -- an averaged model evaluated with the
        live encoder would pair weights from different points of training."""
        module = module.to(self.device).train()
        self.modules[name] = module
        self.optimizers[name] = self.make_optimizer(module, lr=lr, betas=betas)
        self.schedulers[name] = self.make_scheduler(self.optimizers[name], lr=lr)
        if averaged and self.config.ema_decay > 0:
            self.averaged[name] = EMA(module, self.config.ema_decay)
        return module

    # ------------------------------------------------------------------ to implement
    def parse_batch(self, raw: Any) -> Any:
        """Loader item -> model inputs on ``self.device``."""
        return _to_device(raw, self.device)

    def compute_loss(self, batch: Any) -> LossOutput:
        raise NotImplementedError

    def on_step_end(self, batch: Any) -> dict:
        """Called after every optimizer step with the step's last batch; returns extra metrics."""
        return {}

    def checkpoint_models(self) -> dict[str, nn.Module]:
        models = dict(self.modules)
        if self.ema is not None:
            models["ema"] = self.ema.module
        for name, ema in self.averaged.items():
            models[f"ema_{name}"] = ema.module
        return models

    def model_config(self) -> Any:
        return None

    # ------------------------------------------------------------------ one micro-batch, one step
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def step_on(self, batch: Any) -> dict | None:
        """Forward/backward one parsed batch; every ``grad_accum`` batches take an optimizer
        step.  Returns the step's record (metrics, lr, grad norm) after a step, else ``None``."""
        c = self.config
        last = len(self.window) == c.grad_accum - 1
        ddp = self.ddp_model is not self.model
        with self.ddp_model.no_sync() if ddp and not last else contextlib.nullcontext():
            with self.autocast():
                out = self.compute_loss(batch)
            finite = torch.isfinite(out.loss.detach()).float()
            if D.all_reduce_mean(finite).item() < 1.0:  # every rank must agree, or DDP's backward would hang
                self.skip(self.nonfinite_message(out))
            if self.skip_reason is None:
                loss = out.loss / c.grad_accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            elif ddp and out.loss.requires_grad:  # keep DDP's reducer in step; the gradients are dropped
                (out.loss * 0.0).backward()
        self.window.append({k: _float(v) for k, v in out.metrics.items()})
        self.batches_seen += 1
        return self.optimizer_step(batch) if last else None

    def optimizer_step(self, batch: Any) -> dict:
        """Clip, step every optimizer whose parameters got gradients, update EMA and schedules,
        log and checkpoint.  A step marked non-finite only advances the counters."""
        norms = self.clip_gradients() if self.skip_reason is None else {}
        bad = [name for name, g in norms.items() if not torch.isfinite(g)]
        if bad and self.scaler is None:  # with fp16 the scaler skips inf steps itself
            params = [n for n, p in self.modules[bad[0]].named_parameters()
                      if p.grad is not None and not torch.isfinite(p.grad).all()][:5]
            self.skip(f"non-finite gradient norm of {bad} at step {self.step} (batch {self.batches_seen}); "
                      f"parameters: {params}")
        skipped = self.skip_reason is not None
        if not skipped:
            for name in norms:
                opt = self.optimizers[name]
                self.scaler.step(opt) if self.scaler is not None else opt.step()
            if self.scaler is not None and norms:
                self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model)
            for name, ema in self.averaged.items():
                ema.update(self.modules[name])
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.nonfinite_steps += skipped
        self.skip_reason = None
        self.step += 1
        for s in self.schedulers.values():
            s.step()

        record: dict[str, Any] = {"step": self.step, "skipped": int(skipped)}
        for k in self.window[-1]:  # mean over the step's micro-batches
            vals = [m[k] for m in self.window if k in m]
            record[k] = sum(vals) / len(vals)
        self.window = []
        record.update({"grad_norm" if n == "model" else f"grad_norm_{n}": _float(g) for n, g in norms.items()})
        record["lr"] = self.optimizers["model"].param_groups[0]["lr"]
        if not skipped:
            record.update(self.on_step_end(batch))
        self.history.append(record)
        c = self.config
        if self.step % max(1, c.log_every) == 0:
            self.log_metrics({k: v for k, v in record.items() if k != "step"}, "train")
        if c.ckpt_dir and c.ckpt_every > 0 and self.step % c.ckpt_every == 0:
            self.save()
        return record

    def clip_gradients(self) -> dict[str, torch.Tensor]:
        """Per optimizer whose parameters received gradients: unscale (fp16), average the
        gradients of unwrapped modules over ranks, clip; returns the gradient norms."""
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norms = {}
        for name, opt in self.optimizers.items():
            # module order, not the optimizer's groups: the norm's float sum depends on the order
            params = [p for p in self.modules[name].parameters() if p.grad is not None]
            if not params:  # e.g. a discriminator before its start step (GradScaler.step would fail)
                continue
            if self.scaler is not None:
                self.scaler.unscale_(opt)
            if name != "model" and D.is_dist():  # DDP averages the model's gradients only
                for p in params:
                    p.grad.copy_(D.all_reduce_mean(p.grad))
            norms[name] = torch.nn.utils.clip_grad_norm_(params, clip)
        return norms

    def skip(self, msg: str) -> None:
        """Mark the current step non-finite: raise, or warn and drop it (``on_nonfinite``)."""
        if self.config.on_nonfinite == "raise":
            raise NonFiniteError(msg)
        warnings.warn(msg + "; skipping this step")
        log.warning("%s; skipping this step", msg)
        self.skip_reason = msg

    def nonfinite_message(self, out: LossOutput) -> str:
        msg = f"non-finite loss at step {self.step} (batch {self.batches_seen})"
        if D.is_dist():
            msg += f" on rank {D.rank()}"
        if out.parts:
            values = {k: _float(v) for k, v in out.parts.items()}
            bad = [f"{k}={v:.4g}" for k, v in values.items() if not math.isfinite(v)]
            ok = [k for k, v in values.items() if math.isfinite(v)]
            msg += f": non-finite in {', '.join(bad) or 'none of the parts'}"
            msg += f" (finite: {', '.join(ok)})" if ok else ""
        return msg

    # ------------------------------------------------------------------ the loop
    def fit(self, loader: Iterable, steps: int | None = None) -> list[dict]:
        """Train until ``self.step == steps`` (default ``config.total_steps``), resuming
        first from ``config.ckpt_dir`` when ``config.resume``.  ``steps`` is the absolute
        target, so the same call finishes an interrupted run.  Returns the records of the
        steps taken in this call.  A checkpoint is written at the end when ``ckpt_dir`` is set.
        """
        from tqdm.auto import tqdm

        c = self.config
        target = c.total_steps if steps is None else int(steps)
        if c.resume and c.ckpt_dir and self.step == 0 and self._pending_rng is None:
            self.resume()
        start = len(self.history)
        with tqdm(total=target, initial=min(self.step, target), disable=not (c.progress and D.is_main()),
                  desc=type(self).__name__, dynamic_ncols=True) as bar:
            while self.step < target:
                batches = self.epoch_iterator(loader)
                for raw in batches:
                    self.epoch_batches += 1
                    rec = self.step_on(self.parse_batch(raw))
                    if rec is not None:
                        bar.update(1)
                        bar.set_postfix({k: f"{rec[k]:.4g}" for k in ("loss", "lr") if k in rec})
                        if self.step >= target:
                            break
                else:  # the epoch ran out
                    if self.epoch_batches == 0:
                        raise ValueError("the loader yielded no batches (empty dataset, or a one-shot iterator "
                                         "that is already exhausted)")
                    self.epoch, self.epoch_batches = self.epoch + 1, 0
        if c.ckpt_dir and self.saved_step != self.step:
            self.save()
        return self.history[start:]

    def epoch_iterator(self, loader: Iterable):
        """An iterator over the current epoch, fast-forwarded past the ``epoch_batches``
        already consumed; the RNG state of a resumed checkpoint is restored after that."""
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if self.epoch_batches and isinstance(sampler, torch.utils.data.RandomSampler) and sampler.generator is None:
            warnings.warn("resuming mid-epoch with a shuffling DataLoader whose order depends on the global RNG: "
                          "the batches will differ from the interrupted run; use msar.training.build_loader "
                          "(order fixed by seed and epoch) for exact resume")
        it = iter(loader)
        for skipped in range(self.epoch_batches):
            if next(it, None) is None:
                self.epoch_batches = skipped  # the loader is shorter than the saved position
                break
        if self._pending_rng is not None:  # after iter() and fast-forwarding, which may draw random numbers
            restore_rng_state(self._pending_rng)
            self._pending_rng = None
        return it

    # ------------------------------------------------------------------ checkpoints
    def state_extra(self) -> dict:
        """Counters and every rank's RNG state (collective under DDP: call on every rank)."""
        rng_ranks = None  # in a single process the checkpoint's own RNG state is this rank's
        if D.is_dist():  # ranks draw different dropout masks / augmentations
            rng_ranks = [None] * D.world_size()
            torch.distributed.all_gather_object(rng_ranks, capture_rng_state())
        return {"step": self.step, "batches_seen": self.batches_seen, "epoch": self.epoch,
                "epoch_batches": self.epoch_batches, "nonfinite_steps": self.nonfinite_steps,
                "trainer": type(self).__name__, "rng_ranks": rng_ranks}

    def save(self, ckpt_dir: str | None = None) -> Path | None:
        """Write a checkpoint of the current step (rank 0 only; all ranks wait)."""
        ckpt_dir = ckpt_dir or self.config.ckpt_dir
        if not ckpt_dir:
            raise ValueError("no checkpoint directory: set config.ckpt_dir or pass ckpt_dir")
        if self.window:
            raise RuntimeError(f"cannot checkpoint in the middle of a gradient-accumulation window "
                               f"({len(self.window)}/{self.config.grad_accum} batches)")
        extra = self.state_extra()
        path = None
        if D.is_main():
            path = save_checkpoint(
                ckpt_dir, self.step, self.checkpoint_models(), optimizer=self.optimizers, scheduler=self.schedulers,
                scaler=self.scaler, extra=extra, rng=True, keep_last=self.config.keep_last,
                config={"trainer": config_dict(self.config), "model": config_dict(self.model_config())})
        D.barrier()
        self.saved_step = self.step
        return path

    def resume(self, path: str | None = None) -> Checkpoint | None:
        """Restore from checkpoint directory ``path`` or the newest good one in
        ``config.ckpt_dir``; returns the checkpoint, or ``None`` if there was none."""
        if path is None and not self.config.ckpt_dir:
            raise ValueError("resume() needs a path or config.ckpt_dir")
        ck = (load_checkpoint(path, map_location=self.device) if path is not None
              else load_latest(self.config.ckpt_dir, map_location=self.device))
        if ck is None:
            return None
        ck.restore(models=self.checkpoint_models(), optimizer=self.optimizers, scheduler=self.schedulers,
                   scaler=self.scaler, rng=True)  # the RNG now too: a finished run leaves it as it ended
        e = ck.extra
        self.step = int(e.get("step", ck.step))
        for key in ("batches_seen", "epoch", "epoch_batches", "nonfinite_steps"):
            setattr(self, key, int(e.get(key, 0)))
        self._pending_rng = ck.state["rng"]
        ranks = e.get("rng_ranks")
        if D.is_dist():
            if ranks is not None and len(ranks) == D.world_size():
                self._pending_rng = ranks[D.rank()]  # this rank's own stream, not rank 0's
            else:
                warnings.warn(f"{ck.path} was saved by {len(ranks) if ranks else 1} process(es), resumed by "
                              f"{D.world_size()}: every rank restarts from rank 0's RNG state (not exact)")
        self.saved_step = self.step
        self.window, self.skip_reason = [], None
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        logger = self._logger("train")
        if logger is not None:
            logger.truncate_after(self.step)  # rows a killed run logged after its last checkpoint
        log.info("resumed from %s at step %d", ck.path, self.step)
        return ck

    # ------------------------------------------------------------------ logging and evaluation helpers
    def _logger(self, name: str) -> CSVLogger | None:
        c = self.config
        if not (c.log_dir and D.is_main()):
            return None
        if name not in self.loggers:
            self.loggers[name] = CSVLogger(c.log_dir, name, c.tensorboard)
        return self.loggers[name]

    def log_metrics(self, metrics: Mapping[str, float], name: str = "val") -> None:
        """Append metrics to ``log_dir/<name>.csv`` at the current step (rank 0, when ``log_dir`` is set)."""
        logger = self._logger(name)
        if logger is not None:
            logger.log(self.step, metrics)

    @property
    def eval_model(self) -> nn.Module:
        """The EMA copy when EMA is on, else the live model."""
        return self.ema.module if self.ema is not None else self.model

    def eval_module(self, name: str) -> nn.Module:
        """The EMA copy of the trainable ``name`` when it has one (``add_trainable(averaged=True)``
        with EMA on), else the live module; ``eval_module("model")`` is :attr:`eval_model`."""
        if name == "model":
            return self.eval_model
        return self.averaged[name].module if name in self.averaged else self.modules[name]
