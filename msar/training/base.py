"""The training loop shared by the transformer and VQ-VAE trainers.

:class:`Trainer` owns everything that is not specific to a model: device and DDP
setup, AdamW + warm-up/decay schedule, gradient accumulation, AMP (CUDA only),
gradient clipping, non-finite loss / gradient detection, EMA, CSV/TensorBoard
logging, a tqdm bar, periodic atomic checkpoints and exact resume.  A subclass
implements two methods:

* ``parse_batch(raw) -> batch``: turn what the loader yields into model inputs on the device;
* ``compute_loss(batch) -> LossOutput``: the scalar to back-propagate, metrics to log,
  and named parts (per scale, per term) that explain a non-finite loss.

Counters: ``step`` counts optimizer steps, ``batches_seen`` counts micro-batches
(the data position), ``epoch`` / ``epoch_batches`` locate the loader.  A checkpoint
holds all of them plus model, optimizer, scheduler, grad-scaler, EMA and RNG state,
so ``fit`` resumed from step N continues bit-for-bit like the run that never stopped
(given a loader whose order depends only on the epoch: a list, or
:func:`~msar.training.distributed.build_loader`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from . import distributed as D
from .checkpoint import (Checkpoint, capture_rng_state, load_checkpoint, load_latest, restore_rng_state,
                         save_checkpoint, unwrap_model)
from .metrics import EMA, CSVLogger
from .optim import VAR_NO_DECAY_KEYS, WarmupDecaySchedule, build_optimizer

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Raised (``on_nonfinite="raise"``) when a loss or gradient is NaN/Inf; the message
    names the step and the part (scale, loss term) that went non-finite."""


@dataclass
class TrainConfig:
    """Settings shared by all trainers.

    Optimisation (VAR's defaults): ``lr`` is the peak learning rate, reached after
    ``warmup_steps`` from ``warmup_start x lr``, then decayed by ``lr_schedule``
    (``lin0``, ``lin``, ``lin00``, ``cos``, ``const``) to ``final_lr_ratio x lr`` at
    ``total_steps``; weight decay goes from ``weight_decay`` to ``weight_decay_end``
    (cosine; ``None`` = constant).  Steps are optimizer steps; one step consumes
    ``grad_accum`` batches.

    Numerics: ``amp`` is ``"bf16"``, ``"fp16"`` (with a GradScaler) or ``"none"`` and
    only acts on CUDA; ``grad_clip`` <= 0 disables clipping; ``on_nonfinite`` is
    ``"skip"`` (drop the step, warn) or ``"raise"`` (:class:`NonFiniteError`).

    DDP: ``ddp_find_unused`` is passed to DistributedDataParallel as
    ``find_unused_parameters`` (``None`` = the trainer's default: True for the VQ-VAE,
    whose phi bank may hold convs no scale uses, False for the transformer).

    Bookkeeping: a checkpoint every ``ckpt_every`` steps (0 = only at the end of
    ``fit``) into ``ckpt_dir`` keeping ``keep_last``; ``resume`` makes ``fit`` start
    from the newest good checkpoint there; metrics go to ``log_dir/train.csv`` every
    ``log_every`` steps.
    """

    lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_end: Optional[float] = None
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
    device: Optional[str] = None
    ddp_find_unused: Optional[bool] = None
    ckpt_dir: Optional[str] = None
    ckpt_every: int = 0
    keep_last: int = 3
    resume: bool = True
    log_dir: Optional[str] = None
    log_every: int = 1
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> None:
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {self.on_nonfinite!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps], got {self.warmup_steps}")
        if self.ema_decay and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")


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
    if hasattr(x, "to"):  # e.g. torch_geometric batches
        return x.to(device)
    return x


def _float(v: Any) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


def config_dict(obj: Any) -> Any:
    return asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj


class Trainer:
    """Base class; see the module docstring. Subclasses call ``super().__init__(model, config)``
    and may register more optimizers in ``self.optimizers`` / ``self.schedulers``."""

    find_unused_parameters = False  # DDP default of this trainer (see TrainConfig.ddp_find_unused)

    def __init__(self, model: nn.Module, config: TrainConfig):
        config.validate()
        self.config = config
        self.device = D.init_distributed(config.device)
        self.model = model.to(self.device)
        self.model.train()
        use_cuda = self.device.type == "cuda"
        if config.amp != "none" and not use_cuda:
            warnings.warn(f"amp={config.amp!r} ignored: mixed precision is only used on CUDA")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp) if use_cuda else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

        self.optimizers: dict[str, torch.optim.Optimizer] = {"model": self.make_optimizer(self.model)}
        self.schedulers: dict[str, WarmupDecaySchedule] = {"model": self.make_scheduler(self.optimizers["model"])}
        self.clip_params: dict[str, list[nn.Parameter]] = {
            "model": [p for p in self.model.parameters() if p.requires_grad]}
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay > 0 else None

        self.ddp_model: nn.Module = self.wrap_model(self.model)
        self.forward_model: nn.Module = torch.compile(self.ddp_model) if config.compile else self.ddp_model

        self.step = 0            # optimizer steps taken
        self.batches_seen = 0    # micro-batches consumed (data position)
        self.epoch = 0
        self.epoch_batches = 0   # batches of the current epoch already consumed
        self.nonfinite_steps = 0
        self.history: list[dict] = []
        self._accum = 0
        self._window_bad: Optional[str] = None
        self._window_metrics: list[dict] = []
        self._pending_rng: Optional[dict] = None
        self._resumed = False
        self._last_saved = -1
        self.logger = (CSVLogger(config.log_dir, "train", config.tensorboard)
                       if config.log_dir and D.is_main() else None)
        self._val_logger: Optional[CSVLogger] = None

    # ------------------------------------------------------------------ construction helpers
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the training forward runs through: DDP when more than one process
        runs, else the model itself. Override for other parallelism (e.g. FSDP, where the
        model is sharded before the trainer is built)."""
        if D.world_size() <= 1:
            return model
        find_unused = (self.find_unused_parameters if self.config.ddp_find_unused is None
                       else self.config.ddp_find_unused)
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused)

    def make_optimizer(self, module: nn.Module, lr: Optional[float] = None,
                       betas: Optional[tuple[float, float]] = None) -> torch.optim.Optimizer:
        c = self.config
        return build_optimizer(module, lr=lr or c.lr, weight_decay=c.weight_decay, betas=betas or c.betas,
                               eps=c.eps, no_decay_keys=VAR_NO_DECAY_KEYS)

    def make_scheduler(self, opt: torch.optim.Optimizer, lr: Optional[float] = None) -> WarmupDecaySchedule:
        c = self.config
        return WarmupDecaySchedule(opt, peak_lr=lr or c.lr, total_steps=c.total_steps, warmup_steps=c.warmup_steps,
                                   kind=c.lr_schedule, wp0=c.warmup_start, final_ratio=c.final_lr_ratio,
                                   wd=c.weight_decay, wd_end=c.weight_decay_end)

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
        models = {"model": self.model}
        if self.ema is not None:
            models["ema"] = self.ema.module
        return models

    def model_config(self) -> Any:
        return None

    # ------------------------------------------------------------------ one micro-batch
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _nonfinite_message(self, what: str, out: Optional[LossOutput]) -> str:
        msg = f"non-finite {what} at step {self.step} (batch {self.batches_seen})"
        if D.is_dist():
            msg += f" on rank {D.rank()}"
        if out is not None and out.parts:
            bad = [f"{k}={_float(v):.4g}" for k, v in out.parts.items() if not math.isfinite(_float(v))]
            ok = [k for k, v in out.parts.items() if math.isfinite(_float(v))]
            msg += f": non-finite in {', '.join(bad) if bad else 'none of the parts'}"
            if ok:
                msg += f" (finite: {', '.join(ok)})"
        return msg

    def _handle_nonfinite(self, msg: str) -> None:
        if self.config.on_nonfinite == "raise":
            raise NonFiniteError(msg)
        warnings.warn(msg + "; skipping this step")
        log.warning("%s; skipping this step", msg)
        self._window_bad = msg

    def step_on(self, batch: Any) -> Optional[dict]:
        """Forward/backward one parsed batch; every ``grad_accum`` batches take an
        optimizer step.  Returns the step's record (metrics, lr, grad norm) when a step
        was taken, else ``None``."""
        accum = self.config.grad_accum
        last = self._accum == accum - 1
        sync = (self.ddp_model.no_sync() if (not last and self.ddp_model is not self.model)
                else contextlib.nullcontext())
        with sync:
            with self.autocast():
                out = self.compute_loss(batch)
            finite = torch.isfinite(out.loss.detach()).float()
            if D.is_dist():  # every rank must agree, or DDP's backward would hang
                finite = D.all_reduce_mean(finite)
            if finite.item() < 1.0:
                self._handle_nonfinite(self._nonfinite_message("loss", out))
            if self._window_bad is None:
                loss = out.loss / accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            elif self.ddp_model is not self.model and out.loss.requires_grad:
                # keep DDP's reducer in step on every rank; these gradients are discarded at the step's end
                (out.loss * 0.0).backward()
        self._window_metrics.append({k: _float(v) for k, v in out.metrics.items()})
        self.batches_seen += 1
        self._accum += 1
        if not last:
            return None
        return self._optimizer_step(batch)

    def _optimizer_step(self, batch: Any) -> dict:
        self._accum = 0
        record: dict[str, Any] = {"step": self.step + 1}
        grad_norms = {}
        active = []  # optimizers whose parameters received gradients this step
        if self._window_bad is None:
            for name, opt in self.optimizers.items():
                params = [p for p in self.clip_params.get(name, []) if p.grad is not None]
                if not params:  # e.g. a discriminator before its start step (GradScaler.step would fail)
                    continue
                active.append(opt)
                if self.scaler is not None:
                    self.scaler.unscale_(opt)
                self._sync_extra_grads(name)
                clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
                grad_norms[name] = torch.nn.utils.clip_grad_norm_(params, clip)
            bad = [n for n, g in grad_norms.items() if not torch.isfinite(g)]
            if bad and self.scaler is None:  # with fp16 the scaler skips inf steps itself
                names = [pn for pn, p in self._named_params(bad[0]) if p.grad is not None
                         and not torch.isfinite(p.grad).all()][:5]
                self._handle_nonfinite(f"non-finite gradient norm of {bad} at step {self.step} "
                                       f"(batch {self.batches_seen}); parameters: {names}")
        if self._window_bad is None:
            for opt in active:
                if self.scaler is not None:
                    self.scaler.step(opt)
                else:
                    opt.step()
            if self.scaler is not None and active:
                self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model)
            record["skipped"] = 0
        else:
            self.nonfinite_steps += 1
            record["skipped"] = 1
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self._window_bad = None
        self.step += 1
        for s in self.schedulers.values():
            s.step()
        # metrics: mean over the micro-batches of the step
        keys = self._window_metrics[-1].keys() if self._window_metrics else []
        for k in keys:
            vals = [m[k] for m in self._window_metrics if k in m]
            record[k] = sum(vals) / len(vals)
        self._window_metrics = []
        for name, g in grad_norms.items():
            record["grad_norm" if name == "model" else f"grad_norm_{name}"] = _float(g)
        record["lr"] = self.optimizers["model"].param_groups[0]["lr"]
        if record["skipped"] == 0:
            record.update(self.on_step_end(batch))
        self.history.append(record)
        if self.logger is not None and (self.step % max(1, self.config.log_every) == 0):
            self.logger.log(self.step, {k: v for k, v in record.items() if k != "step"})
        c = self.config
        if c.ckpt_dir and c.ckpt_every > 0 and self.step % c.ckpt_every == 0:
            self.save()
        return record

    def _named_params(self, opt_name: str) -> Iterable[tuple[str, nn.Parameter]]:
        ids = {id(p) for p in self.clip_params.get(opt_name, [])}
        for m in [self.model] + list(getattr(self, "_extra_modules", {}).values()):
            for n, p in m.named_parameters():
                if id(p) in ids:
                    yield n, p

    def _sync_extra_grads(self, name: str) -> None:
        """Average gradients over ranks for parameters outside the DDP-wrapped model."""
        if name == "model" or not D.is_dist():
            return
        for p in self.clip_params.get(name, []):
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(D.world_size())

    # ------------------------------------------------------------------ the loop
    def fit(self, loader: Iterable, steps: Optional[int] = None) -> list[dict]:
        """Train until ``self.step == steps`` (default ``config.total_steps``), resuming
        first from ``config.ckpt_dir`` when ``config.resume``. ``steps`` is the absolute
        target, so the same call finishes an interrupted run.  Returns the records of the
        steps taken in this call.  A checkpoint is written at the end when ``ckpt_dir`` is set.
        """
        from tqdm.auto import tqdm

        target = self.config.total_steps if steps is None else int(steps)
        c = self.config
        if c.resume and c.ckpt_dir and not self._resumed and self.step == 0:
            self.resume()
        start_len = len(self.history)
        bar = tqdm(total=target, initial=min(self.step, target), disable=not (c.progress and D.is_main()),
                   desc=type(self).__name__, dynamic_ncols=True)
        try:
            while self.step < target:
                sampler = getattr(loader, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(self.epoch)
                if self.epoch_batches and isinstance(sampler, torch.utils.data.RandomSampler) \
                        and sampler.generator is None:
                    warnings.warn("resuming mid-epoch with a shuffling DataLoader whose order depends on the "
                                  "global RNG: the batches will differ from the interrupted run; use "
                                  "msar.training.build_loader (order fixed by seed and epoch) for exact resume")
                it = iter(loader)
                consumed = 0
                for _ in range(self.epoch_batches):  # fast-forward to the resumed data position
                    if next(it, None) is None:
                        break
                    consumed += 1
                if self._pending_rng is not None:  # after fast-forwarding, which may draw random numbers
                    restore_rng_state(self._pending_rng)
                    self._pending_rng = None
                stopped = False
                for raw in it:
                    consumed += 1
                    self.epoch_batches += 1
                    rec = self.step_on(self.parse_batch(raw))
                    if rec is not None:
                        bar.update(1)
                        bar.set_postfix({k: f"{rec[k]:.4g}" for k in ("loss", "lr") if k in rec})
                        if self.step >= target:
                            stopped = True
                            break
                if stopped:
                    break
                if consumed == 0:
                    raise ValueError("the loader yielded no batches (empty dataset, or a one-shot iterator "
                                     "that is already exhausted)")
                self.epoch += 1
                self.epoch_batches = 0
        finally:
            bar.close()
        if c.ckpt_dir and self._last_saved != self.step:
            self.save()
        return self.history[start_len:]

    # ------------------------------------------------------------------ checkpoints
    def state_extra(self) -> dict:
        return {"step": self.step, "batches_seen": self.batches_seen, "epoch": self.epoch,
                "epoch_batches": self.epoch_batches, "nonfinite_steps": self.nonfinite_steps,
                "trainer": type(self).__name__, "module_counters": self._module_counters(),
                "rng_ranks": self._rank_rng_states()}

    def _counter_modules(self) -> Iterable[tuple[str, nn.Module]]:
        for name, model in self.checkpoint_models().items():
            if isinstance(model, nn.Module):  # (not the state-dict stand-ins of sharded trainers)
                for path, m in unwrap_model(model).named_modules():
                    if isinstance(getattr(m, "record_hit", None), int):
                        yield f"{name}/{path}", m

    def _module_counters(self) -> dict[str, int]:
        """Plain-int training counters that live outside state dicts: the quantizer's
        ``record_hit`` decides whether its usage EMA copies or mixes the next hits, and
        whether dead codes may be restarted -- a resumed run must continue the count."""
        return {key: m.record_hit for key, m in self._counter_modules()}

    def _restore_module_counters(self, counters: Mapping[str, int]) -> None:
        for key, m in self._counter_modules():
            if key in counters:
                m.record_hit = int(counters[key])

    def _rank_rng_states(self) -> Optional[list]:
        """Every rank's RNG state (ranks draw different dropout masks / augmentations);
        ``None`` in a single process, where the checkpoint's own RNG state is this rank's."""
        if not D.is_dist():
            return None
        states = [None] * D.world_size()
        torch.distributed.all_gather_object(states, capture_rng_state())
        return states

    def save(self, ckpt_dir: Optional[str] = None) -> Optional[Path]:
        """Write a checkpoint of the current step (rank 0 only; all ranks wait)."""
        ckpt_dir = ckpt_dir or self.config.ckpt_dir
        if not ckpt_dir:
            raise ValueError("no checkpoint directory: set config.ckpt_dir or pass ckpt_dir")
        if self._accum != 0:
            raise RuntimeError(f"cannot checkpoint in the middle of a gradient-accumulation window "
                               f"({self._accum}/{self.config.grad_accum} batches)")
        path = None
        extra = self.state_extra()  # collective on every rank (RNG states of all ranks)
        if D.is_main():
            path = save_checkpoint(
                ckpt_dir, self.step, self.checkpoint_models(), optimizer=self.optimizers,
                scheduler=self.schedulers, scaler=self.scaler, extra=extra,
                config={"trainer": config_dict(self.config), "model": config_dict(self.model_config())},
                rng=True, keep_last=self.config.keep_last)
        D.barrier()
        self._last_saved = self.step
        return path

    def resume(self, path: Optional[str] = None) -> Optional[Checkpoint]:
        """Restore from checkpoint directory ``path`` or the newest good one in
        ``config.ckpt_dir``; returns the checkpoint, or ``None`` if there was none."""
        if path is not None:
            ck = load_checkpoint(path, map_location=self.device)
        elif self.config.ckpt_dir:
            ck = load_latest(self.config.ckpt_dir, map_location=self.device)
        else:
            raise ValueError("resume() needs a path or config.ckpt_dir")
        self._resumed = True
        if ck is None:
            return None
        models = self.checkpoint_models()
        ck.restore(models=models, optimizer=self.optimizers, scheduler=self.schedulers, scaler=self.scaler,
                   rng=True)
        e = ck.extra
        self.step = int(e.get("step", ck.step))
        self.batches_seen = int(e.get("batches_seen", 0))
        self.epoch = int(e.get("epoch", 0))
        self.epoch_batches = int(e.get("epoch_batches", 0))
        self.nonfinite_steps = int(e.get("nonfinite_steps", 0))
        self._restore_module_counters(e.get("module_counters") or {})
        self._pending_rng = ck.state.get("rng")
        ranks = e.get("rng_ranks")
        if D.is_dist():
            if ranks is not None and len(ranks) == D.world_size():
                self._pending_rng = ranks[D.rank()]  # this rank's own stream, not rank 0's
            else:
                warnings.warn(f"{ck.path} was saved by {len(ranks) if ranks else 1} process(es), resumed by "
                              f"{D.world_size()}: every rank restarts from rank 0's RNG state (not exact)")
        self._last_saved = self.step
        self._accum = 0
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if self.logger is not None:
            self.logger.truncate_after(self.step)
        log.info("resumed from %s at step %d", ck.path, self.step)
        return ck

    # ------------------------------------------------------------------ evaluation helpers
    def log_eval(self, metrics: Mapping[str, float], name: str = "val") -> None:
        """Append evaluation metrics to ``log_dir/<name>.csv`` at the current step."""
        if self.config.log_dir and D.is_main():
            if self._val_logger is None or self._val_logger.name != name:
                self._val_logger = CSVLogger(self.config.log_dir, name, self.config.tensorboard)
            self._val_logger.log(self.step, metrics)

    @property
    def eval_model(self) -> nn.Module:
        """The EMA copy when EMA is on, else the live model."""
        return self.ema.module if self.ema is not None else self.model

    def unwrapped(self) -> nn.Module:
        return unwrap_model(self.model)
