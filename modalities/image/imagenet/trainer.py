"""The ImageNet trainer: :class:`msar.training.TransformerTrainer` plus what VAR's recipe
needs that the generic trainer does not do.

* progressive training (VAR's ``--pg``): only the first scales are trained early on; the
  newest scale's loss is ramped in.  Implemented as loss weights over the full-length
  forward: the block-causal mask makes the logits of the first scales independent of
  the later ones, so the objective equals VAR's truncated forward (without its compute saving);
* periodic validation loss (``val_every`` steps, logged to ``val.csv``);
* cheap mid-epoch resume: the already-consumed batches are skipped without decoding
  JPEGs (:meth:`EpochSampler.skip_next`);
* FSDP (``fsdp=True``): parameters, gradients and optimizer state sharded per transformer
  block with ``torch.distributed.fsdp.fully_shard`` (FSDP2); checkpoints hold full
  (unsharded) state dicts gathered on every rank and written by rank 0, so they load into
  a DDP or single-GPU run too (model weights; the optimizer state is in the FSDP layout).
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from msar.training import LossOutput, TransformerTrainConfig, TransformerTrainer
from msar.training import distributed as D

from .data import EpochSampler
from .recipes import Recipe, progressive_stage


class ImageNetTrainer(TransformerTrainer):
    """``ImageNetTrainer(model, vqvae, config, recipe, steps_per_epoch, val_loader=..., val_every=..., fsdp=...)``.

    Adds ``step_time_s``, ``images_per_s`` (``global_batch`` / step wall time, data loading
    included) and on CUDA ``max_mem_gb`` (peak allocated) to every logged step.
    """

    def __init__(self, model: nn.Module, tokenizer: nn.Module, config: TransformerTrainConfig, recipe: Recipe,
                 steps_per_epoch: int, val_loader: Iterable | None = None, val_every: int = 0,
                 val_batches: int | None = None, fsdp: bool = False, global_batch: int | None = None):
        self.recipe = recipe
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.val_loader, self.val_every, self.val_batches = val_loader, int(val_every), val_batches
        self.fsdp = bool(fsdp)
        self.global_batch = global_batch or 0
        self._t_last: float | None = None
        self._fsdp_saved: tuple[dict, dict] | None = None
        if self.fsdp:
            if config.ema_decay > 0:
                raise ValueError("EMA is not supported with FSDP (the EMA copy would not be sharded)")
            device = D.trainer_device(config.device, model)
            if not D.is_dist():  # FSDP needs a process group even on one device
                D.init_single_process_group(device)
            shard_per_block(model.to(device), device)
            # the logits are returned as a view; nothing modifies them in place, so FSDP's warning is moot
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        super().__init__(model, tokenizer, config)
        K = self.schedule.num_scales
        self._ends = [o + n for o, n in zip(self.schedule.offsets, self.schedule.token_counts)]
        self._begins = list(self.schedule.offsets)
        self._stage_start: dict[int, int] = {}
        self.prog_warmup_steps = max(1, round(recipe.progressive_warmup_epochs_frac * recipe.epochs
                                              * self.steps_per_epoch))
        self.last_stage = K - 1

    def wrap_model(self, model: nn.Module) -> nn.Module:
        # the FSDP model is already sharded per block; DDP on top would be wrong
        return model if self.fsdp else super().wrap_model(model)

    # ------------------------------------------------------------------ progressive training
    def stage(self, step: int | None = None) -> int:
        """Index of the last trained scale at ``step`` (all scales unless progressive)."""
        step = self.step if step is None else step
        c = self.config
        return progressive_stage(step, c.total_steps, c.warmup_steps, self.recipe, self.schedule.num_scales)

    def stage_start(self, si: int) -> int:
        """First step of stage ``si`` (the stage is monotone in the step: binary search)."""
        if si not in self._stage_start:
            lo, hi = 0, self.config.total_steps
            while lo < hi:
                mid = (lo + hi) // 2
                if self.stage(mid) >= si:
                    hi = mid
                else:
                    lo = mid + 1
            self._stage_start[si] = lo
        return self._stage_start[si]

    def loss_weights(self, device: torch.device) -> torch.Tensor:
        """``(L,)`` token weights: ``1 / L`` on the trained scales, the newest one ramped in
        over ``progressive_warmup`` steps (VAR's ``prog_wp``, at least 0.01), 0 beyond."""
        L = self.schedule.L
        w = torch.full((L,), 1.0 / L, device=device)
        si = self.stage()
        first = self.recipe.progressive_start_scale
        bg, ed = self._begins[si], self._ends[si]
        w[ed:] = 0
        if si != min(first, self.last_stage):  # VAR does not ramp the very first stage
            ramp = (self.step - self.stage_start(si) + 1) / self.prog_warmup_steps
            w[bg:ed] *= min(max(ramp, 0.01), 1.0)
        return w

    def compute_loss(self, batch: Any) -> LossOutput:
        if self.recipe.progressive <= 0:
            return super().compute_loss(batch)
        ce, correct, _ = self.token_losses(self.forward_model, batch)
        loss = (ce * self.loss_weights(ce.device)).sum(-1).mean()
        loss_k, acc_k = self.per_scale(ce.detach()), self.per_scale(correct)
        metrics = {"loss": loss.detach(), "acc": correct.mean(), "prog_stage": float(self.stage())}
        parts = {}
        for k in range(self.schedule.num_scales):
            metrics[f"loss_k{k}"], metrics[f"acc_k{k}"] = loss_k[k], acc_k[k]
            parts[f"scale {k} {self.schedule.shape(k)}"] = loss_k[k]
        return LossOutput(loss, metrics, parts)

    # ------------------------------------------------------------------ validation
    def on_step_end(self, batch: Any) -> dict:
        out = super().on_step_end(batch)
        now = time.perf_counter()
        if self._t_last is not None:  # wall time of the step, data loading included
            dt = now - self._t_last
            out["step_time_s"] = dt
            out["images_per_s"] = self.global_batch / dt
        if self.device.type == "cuda":
            out["max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        if self.val_loader is not None and self.val_every > 0 and self.step % self.val_every == 0:
            val = self.evaluate(self.val_loader, max_batches=self.val_batches)
            out.update({"val_loss": val["loss"], "val_acc": val["acc"]})
        self._t_last = time.perf_counter()  # validation time does not count as training time
        return out

    # ------------------------------------------------------------------ resume without decoding
    def fit(self, loader: Iterable, steps: int | None = None) -> list[dict]:
        c = self.config
        if c.resume and c.ckpt_dir and self.step == 0 and self._pending_rng is None:
            self.resume()
        sampler = getattr(loader, "sampler", None)
        if self.epoch_batches and isinstance(sampler, EpochSampler):
            sampler.skip_next(self.epoch_batches * loader.batch_size)
        return super().fit(loader, steps)

    # ------------------------------------------------------------------ FSDP gradient accumulation
    def step_on(self, batch: Any) -> dict | None:
        if self.fsdp and self.config.grad_accum > 1:  # reduce-scatter only on the window's last micro-batch
            self.model.set_requires_gradient_sync(len(self.window) == self.config.grad_accum - 1)
        return super().step_on(batch)

    # ------------------------------------------------------------------ FSDP checkpoints
    def checkpoint_models(self) -> dict[str, Any]:
        if not self.fsdp:
            return super().checkpoint_models()
        if self._fsdp_saved is not None:  # inside save(): the gathered full state dict
            return {"model": _FullState(self._fsdp_saved[0])}
        return {"model": _FSDPModelState(self.model)}  # resume(): loads into the shards

    def save(self, ckpt_dir: str | None = None):
        if not self.fsdp:
            return super().save(ckpt_dir)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # collective: every rank
        msd = get_model_state_dict(self.model, options=opts)
        osd = get_optimizer_state_dict(self.model, self.optimizers["model"], options=opts)
        real, self._fsdp_saved = self.optimizers, (msd, osd)
        self.optimizers = {"model": _FullState(osd)}
        try:
            return super().save(ckpt_dir)
        finally:
            self.optimizers, self._fsdp_saved = real, None

    def resume(self, path: str | None = None):
        if not self.fsdp:
            return super().resume(path)
        real = self.optimizers
        self.optimizers = {"model": _FSDPOptimState(self.model, real["model"])}
        try:
            return super().resume(path)
        finally:
            self.optimizers = real

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The (unsharded) model weights on CPU; collective under FSDP (call on every rank)."""
        if not self.fsdp:
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------------- FSDP helpers
def shard_per_block(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2: one communication unit per transformer block, the rest (embeddings, head) in the root.

    The device mesh is built on ``device``'s type: FSDP's default mesh is CUDA whenever a GPU is
    visible, which would not fit a model trained on the CPU of such a machine."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (D.world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class _FullState:
    """A precomputed state dict standing in for a module / optimizer in ``save_checkpoint``."""

    def __init__(self, sd: dict):
        self.sd = sd

    def state_dict(self) -> dict:
        return self.sd


class _FSDPModelState:
    """Loads a full state dict into an FSDP-sharded module (``Checkpoint.restore``)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def load_state_dict(self, sd: dict, strict: bool = True):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        return set_model_state_dict(self.model, sd, options=StateDictOptions(full_state_dict=True, strict=strict))


class _FSDPOptimState:
    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer):
        self.model, self.opt = model, opt

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.model, self.opt, sd, options=StateDictOptions(full_state_dict=True))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self.opt.param_groups
