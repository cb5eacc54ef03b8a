"""Training the next-scale transformer on the tokens of a frozen pyramid tokenizer."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bitwise import bit_cross_entropy, bit_predictions
from ..conditioning import Condition
from ..tokenizer import check_candidate_features
from . import distributed as D
from .base import LossOutput, TrainConfig, Trainer, _to_device, leaves_rng_alone, config_dict


@dataclass
class TransformerTrainConfig(TrainConfig):
    """:class:`~msar.training.base.TrainConfig` plus ``label_smoothing`` of the cross-entropy,
    ``ignore_index``, a target token left out of loss and accuracy (padding), and
    ``scale_loss_power``, how much a scale's tokens weigh in the training loss.

    Class dropout for classifier-free guidance lives in the model (``cond_drop_rate``).
    """

    label_smoothing: float = 0.0
    # token id excluded from loss and accuracy (padding in fixed schedules, e.g. graphs); None = none
    ignore_index: int | None = None
    # every token of scale k weighs n_k ** -power in the training loss: 0 = every token the same (VAR),
    # 1 = every scale the same (Infinity's reweighting by scale).  Coarse scales hold few tokens but
    # decide the layout every finer scale refines; validation losses stay per token either way.
    scale_loss_power: float = 0.0

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.scale_loss_power <= 1.0:
            raise ValueError(f"scale_loss_power must be in [0, 1] (0: per token, 1: per scale), got "
                             f"{self.scale_loss_power}")


# indices (per scale (B, n_k)), the condition -- labels (B,), a Condition, a tuple of the condition
# encoder's inputs, or None (unconditional: the null class) --, teacher input (B, L - n_0, C), adapter
# positions (B or 1, L, embed_dim) or None
TokenBatch = tuple[list[torch.Tensor], "torch.Tensor | Condition | tuple[torch.Tensor, ...] | None", torch.Tensor,
                   torch.Tensor | None]


class TransformerTrainer(Trainer):
    """Teacher-forced training of a :class:`~msar.models.transformer.NextScaleTransformer`.

    Loss: token cross-entropy averaged over all ``L`` positions (VAR; with a bitwise head the
    binary cross-entropy of each token's bits, averaged over bits), with per-scale
    loss and accuracy logged as ``loss_k{k}`` / ``acc_k{k}``.

    Batches (from ``fit``'s loader) are ``(x, labels)`` or ``(x,)``: ``x`` the precomputed tokens
    (a list of ``(B, n_k)`` long tensors, one per scale; see :class:`~msar.training.TokenDataset`)
    or raw data that the frozen tokenizer encodes on the fly; ``labels`` ``(B,)`` or ``None``
    (unconditional: the null class).  Models with another condition (``cond_kind``, see
    :mod:`msar.conditioning`) take ``(x, cond)`` with ``cond`` a :class:`~msar.Condition` or the
    tensors of ``Condition.from_tensors(model.cond_kind, ...)``: ``(x, features)`` or
    ``(x, features, mask)``, which the default ``DataLoader`` collates.  With a
    ``condition_encoder`` (e.g. :class:`msar.text.TextEncoder`) the batch is ``(x, *inputs)``
    (text: ``(x, token_ids (B, T) long, mask (B, T) bool)``) and ``condition_encoder(*inputs)``
    gives the Condition inside the loss, so the encoder trains jointly: its parameters get
    their own AdamW and schedule (``add_trainable("condition_encoder", ...)``) and are saved in
    every checkpoint and resumed exactly.  An encoder without trainable parameters (e.g.
    :func:`msar.text.load_hf_text_encoder`'s default) is frozen instead: kept in eval mode, never
    optimized, not checkpointed (pass the same one when resuming).  Any other format goes through
    ``prepare_batch(raw) -> (indices, labels, teacher_input[, extra_pos])`` (e.g. graphs whose
    pyramid depends on the sample, or a precomputed teacher input).

    ``extra_pos``: adapter-supplied positions ``(1, L, embed_dim)`` added to every batch (e.g.
    embedded cell centres on a sphere; see ``NextScaleTransformer.forward``); per-sample
    positions ``(B, L, embed_dim)`` come from ``prepare_batch``. Pass the same tensor to
    :func:`msar.sample` (``extra_pos=``) when generating.

    Example::

        from msar import NextScaleTransformer, TransformerConfig
        from msar.training import TransformerTrainer, TransformerTrainConfig, build_loader
        model = NextScaleTransformer(TransformerConfig(schedule, vocab_size=V, latent_dim=C,
                                                       num_classes=10, depth=2, embed_dim=64, num_heads=2))
        cfg = TransformerTrainConfig(lr=3e-4, total_steps=2000, warmup_steps=100,
                                     ckpt_dir="runs/t/ckpt", ckpt_every=500, log_dir="runs/t")
        trainer = TransformerTrainer(model, tokenizer, cfg)
        trainer.fit(build_loader(dataset, batch_size=64))   # resumes from runs/t/ckpt if present
        print(trainer.evaluate(val_loader))                  # {'loss': ..., 'acc': ..., 'loss_k0': ...}

    Under ``torchrun`` the same script trains with DDP (see :mod:`msar.training.distributed`).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: TransformerTrainConfig | None = None,
                 prepare_batch: Callable[[Any], tuple] | None = None,
                 extra_pos: torch.Tensor | None = None, condition_encoder: nn.Module | None = None):
        config = config or TransformerTrainConfig()
        super().__init__(model, config)
        # raw condition inputs -> a Condition (None: batches carry conditions); trained with the model when
        # it has trainable parameters, else frozen like the tokenizer (eval mode, not optimized or checkpointed)
        self.condition_encoder = condition_encoder
        if condition_encoder is not None:
            if any(p.requires_grad for p in condition_encoder.parameters()):
                self.condition_encoder = self.add_trainable("condition_encoder", condition_encoder, averaged=True)
            else:
                self.condition_encoder = condition_encoder.to(self.device).eval()
        self.tokenizer = tokenizer
        if isinstance(tokenizer, nn.Module):  # frozen: used in eval mode under no_grad, never optimized
            tokenizer.to(self.device).eval()
        self.schedule = model.schedule
        if tokenizer is not None and tokenizer.schedule != self.schedule:
            raise ValueError(f"tokenizer schedule {tokenizer.schedule} differs from the model's {self.schedule}")
        self.prepare_batch = prepare_batch
        if extra_pos is not None and (extra_pos.dim() != 3 or extra_pos.shape[0] != 1):
            raise ValueError(f"extra_pos: expected adapter positions (1, L, embed_dim) shared by every batch, got "
                             f"{tuple(extra_pos.shape)} (per-sample positions come from prepare_batch)")
        self.extra_pos = None if extra_pos is None else extra_pos.to(self.device)
        # a model that scores candidate tokens needs their features from the tokenizer: checked here, not
        # at the first step
        self.candidate_dim = model.config.candidate_dim
        if self.candidate_dim:
            check_candidate_features(tokenizer, self.candidate_dim)
        # a NextScaleTransformer with head="bitwise" predicts tokens bit by bit (msar.bitwise)
        self.bitwise_head = model.config.head == "bitwise"
        self.level_ids = self.schedule.level_ids(self.device)
        self.level_counts = torch.tensor(self.schedule.token_counts, device=self.device, dtype=torch.float32)
        # (L,) training-loss weight of every token position (None: all equal, VAR's plain mean)
        power = self.config.scale_loss_power
        self.scale_loss_weights = None if power == 0 else self.level_counts.pow(-power)[self.level_ids]

    def model_config(self) -> Any:
        return config_dict(self.model.config)

    # ------------------------------------------------------------------ batches
    def _looks_like_indices(self, x: Any) -> bool:
        return (isinstance(x, (list, tuple)) and len(x) == self.schedule.num_scales and len(x) > 0
                and all(isinstance(t, torch.Tensor) and t.dim() == 2 and not t.dtype.is_floating_point for t in x))

    def make_batch(self, data_or_indices: Any, labels: torch.Tensor | None = None,
                   teacher_input: torch.Tensor | None = None, extra_pos: torch.Tensor | None = None) -> TokenBatch:
        """``(indices (per scale (B, n_k)), labels (B,) or None, teacher_input (B, L - n_0, C),
        extra_pos (B or 1, L, embed_dim) or None)`` on the device (``extra_pos`` defaults to the
        trainer's)."""
        if self._looks_like_indices(data_or_indices):
            indices = [t.to(self.device).long() for t in data_or_indices]
        else:
            if self.tokenizer is None:
                raise TypeError("got raw data but the trainer has no tokenizer; pass precomputed indices "
                                f"(a list of {self.schedule.num_scales} (B, n_k) long tensors)")
            with torch.no_grad():
                indices = [t.long() for t in self.tokenizer.encode(_to_device(data_or_indices, self.device))]
        self.schedule.check_indices(indices, self.model.vocab_size)
        labels = self.batch_condition(labels)
        if teacher_input is None:
            if self.tokenizer is None:
                raise TypeError("no tokenizer to build the teacher-forcing input: pass teacher_input")
            with torch.no_grad():
                teacher_input = self.tokenizer.teacher_forcing_input(indices)
        extra_pos = self.extra_pos if extra_pos is None else extra_pos.to(self.device)
        return indices, labels, teacher_input.to(self.device), extra_pos

    def batch_condition(self, cond: Any) -> Any:
        """A batch's condition on the device: labels ``(B,)`` long (class models), a
        :class:`~msar.Condition`, the condition encoder's inputs as a tuple of tensors (encoded
        in the loss, with gradients), or None."""
        if cond is None:
            return None
        if isinstance(cond, Condition):
            return cond.to(self.device)
        tensors = tuple(cond) if isinstance(cond, (list, tuple)) else (cond,)
        tensors = tuple(torch.as_tensor(t).to(self.device) for t in tensors)
        if self.condition_encoder is not None:
            return tensors
        kind = self.model.cond_kind
        if kind == "classes":
            if len(tensors) != 1:
                raise TypeError(f"a class model takes labels (B,), got {len(tensors)} condition tensors")
            return tensors[0].long()
        try:
            return Condition.from_tensors(kind, *tensors)
        except ValueError as e:  # say which batch the model needs, not only what is wrong with this one
            want = "(x, features (B, D))" if kind == "vector" else "(x, features (B, T, D)[, mask (B, T) bool])"
            raise ValueError(f"the model takes {kind} conditions (cond_kind={kind!r}): a batch is {want}; {e}") from e

    def parse_batch(self, raw: Any) -> TokenBatch:
        """``(x, labels)`` or ``(x,)`` -- ``x`` per-scale token indices or raw data for the tokenizer,
        ``labels (B,)`` or ``None`` (unconditional) -- or whatever ``prepare_batch`` reads."""
        if self.prepare_batch is not None:
            return self.make_batch(*self.prepare_batch(raw))
        many = self.condition_encoder is not None or self.model.cond_kind == "sequence"  # (x, *cond tensors)
        if (not isinstance(raw, (list, tuple)) or not (len(raw) in (1, 2) or (many and len(raw) > 2))
                or self._looks_like_indices(raw)):
            raise TypeError("a batch is (indices or data, condition) or (indices or data,)"
                            f"{' or (indices or data, *condition tensors)' if many else ''}; got "
                            f"{type(raw).__name__} of length {len(raw) if isinstance(raw, (list, tuple)) else '-'} "
                            "(pass prepare_batch= for other formats)")
        if len(raw) > 2:
            return self.make_batch(raw[0], tuple(raw[1:]))
        return self.make_batch(*raw)

    # ------------------------------------------------------------------ loss
    def token_losses(self, model: nn.Module, batch: TokenBatch, encoder: nn.Module | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token cross-entropy ``(B, L)``, per-token correctness ``(B, L)`` and logits ``(B, L, V)``;
        ``encoder`` encodes the batch's condition inputs (default: the live condition encoder)."""
        indices, labels, x, extra_pos = batch
        if isinstance(labels, tuple):  # the condition encoder's inputs: encoded here, inside autograd
            labels = (encoder or self.condition_encoder)(*labels)
        if labels is None and self.model.cond_kind != "classes":
            raise ValueError(f"the model is conditioned on {self.model.cond_kind} conditions: the batch has none")
        cand = self.tokenizer.candidate_features(x) if self.candidate_dim else None  # checked at construction
        if labels is None:  # unconditional data: the null class, asked for explicitly
            null = torch.full((x.shape[0],), self.model.null_label, dtype=torch.long, device=x.device)
            logits = model(null, x, extra_pos=extra_pos, allow_null=True, candidates=cand)
        else:
            logits = model(labels, x, extra_pos=extra_pos, candidates=cand)
        target = torch.cat(indices, dim=1)
        if self.bitwise_head:  # d binary classifiers (logits (B, L, d)): BCE averaged over the bits
            correct = (bit_predictions(logits.detach()) == target).float()
            return bit_cross_entropy(logits.float(), target), correct, logits
        B, L, V = logits.shape
        ce = F.cross_entropy(logits.float().reshape(-1, V), target.reshape(-1),
                             label_smoothing=self.config.label_smoothing, reduction="none").view(B, L)
        correct = (logits.detach().argmax(-1) == target).float()
        return ce, correct, logits

    def token_weights(self, batch: TokenBatch) -> torch.Tensor | None:
        """``(B, L)`` 1/0 weights of the tokens that count (``None``: all count)."""
        if self.config.ignore_index is None:
            return None
        return (torch.cat(batch[0], dim=1) != self.config.ignore_index).float()

    def per_scale_sums(self, per_token: torch.Tensor, weight: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L)`` -> per-scale ``(K,)`` weighted sums and ``(K,)`` weights (token counts)."""
        K = self.schedule.num_scales
        w = torch.ones_like(per_token) if weight is None else weight
        sums = per_token.new_zeros(K).index_add_(0, self.level_ids, (per_token * w).sum(0))
        counts = per_token.new_zeros(K).index_add_(0, self.level_ids, w.sum(0))
        return sums, counts

    def per_scale(self, per_token: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)`` -> ``(K,)`` mean over each scale's (counted) tokens and the batch."""
        sums, counts = self.per_scale_sums(per_token, weight)
        return sums / counts.clamp_min(1.0)

    def compute_loss(self, batch: TokenBatch) -> LossOutput:
        ce, correct, _ = self.token_losses(self.forward_model, batch)
        w = self.token_weights(batch)
        if w is None:
            loss, acc = ce.mean(), correct.mean()
        else:
            n = w.sum().clamp_min(1.0)
            loss, acc = (ce * w).sum() / n, (correct * w).sum() / n
        metrics = {"loss": loss.detach(), "acc": acc}
        if self.scale_loss_weights is not None:  # the optimized loss; "loss" in the logs stays per token
            sw = self.scale_loss_weights.expand_as(ce) if w is None else w * self.scale_loss_weights
            loss = (ce * sw).sum() / sw.sum().clamp_min(1e-12)
            metrics["loss_scale_weighted"] = loss.detach()
        loss_k = self.per_scale(ce.detach(), w)
        acc_k = self.per_scale(correct, w)
        parts = {}
        for k in range(self.schedule.num_scales):
            metrics[f"loss_k{k}"] = loss_k[k]
            metrics[f"acc_k{k}"] = acc_k[k]
            parts[f"scale {k} {self.schedule.shape(k)}"] = loss_k[k]
        return LossOutput(loss, metrics, parts)

    def train_step(self, indices_or_data: Any, labels: torch.Tensor | None = None,
                   teacher_input: torch.Tensor | None = None) -> dict | None:
        """One batch: precomputed per-scale ``indices`` or raw data, ``labels (B,)`` (None =
        null class).  Returns the step record when an optimizer step was taken (every
        ``grad_accum`` calls), else None."""
        return self.step_on(self.make_batch(indices_or_data, labels, teacher_input))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    @leaves_rng_alone
    def evaluate(self, loader: Iterable, max_batches: int | None = None, use_ema: bool = True,
                 log: bool = True) -> dict[str, float]:
        """Per-scale validation loss / accuracy (token-weighted means over the loader,
        averaged over ranks); uses the EMA weights (of the model and of a jointly trained condition
        encoder) when EMA is on and ``use_ema``."""
        model = self.eval_model if use_ema else self.model
        encoder = self.condition_encoder
        if encoder is not None and use_ema and "condition_encoder" in self.modules:
            encoder = self.eval_module("condition_encoder")
        was_training = model.training
        model.eval()
        enc_training = encoder is not None and encoder.training
        if encoder is not None:
            encoder.eval()
        K = self.schedule.num_scales
        # token-weighted sums over the whole loader: loss_k, acc_k, counted tokens_k
        sums = torch.zeros(3 * K, device=self.device, dtype=torch.float64)
        try:
            for i, raw in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                batch = self.parse_batch(raw)
                with self.autocast():
                    ce, correct, _ = self.token_losses(model, batch, encoder)
                w = self.token_weights(batch)
                loss_s, cnt = self.per_scale_sums(ce, w)
                acc_s, _ = self.per_scale_sums(correct, w)
                sums[:K] += loss_s.double()
                sums[K:2 * K] += acc_s.double()
                sums[2 * K:] += cnt.double()
        finally:
            model.train(was_training)
            if encoder is not None:
                encoder.train(enc_training)
        if D.is_dist():
            torch.distributed.all_reduce(sums)
        n = sums[2 * K:].clamp_min(1.0)
        loss_k, acc_k = (sums[:K] / n).tolist(), (sums[K:2 * K] / n).tolist()
        counts = sums[2 * K:].tolist()
        total = max(1.0, sum(counts))
        out = {"loss": sum(l * c for l, c in zip(loss_k, counts)) / total,
               "acc": sum(a * c for a, c in zip(acc_k, counts)) / total}
        for k in range(K):
            out[f"loss_k{k}"], out[f"acc_k{k}"] = loss_k[k], acc_k[k]
        if log:
            self.log_metrics(out)
        return out
