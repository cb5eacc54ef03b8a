"""Training a multi-scale VQ tokenizer: reconstruction + VQ loss, optional perceptual and adversarial terms."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as D
from .base import LossOutput, TrainConfig, Trainer, _to_device, leaves_rng_alone


@dataclass
class VQVAETrainConfig(TrainConfig):
    """:class:`~msar.training.base.TrainConfig` plus the loss weights.

    ``loss = l1_weight * L1 + l2_weight * MSE + vq_weight * q.loss
    + perceptual_weight * perceptual(x, recon) + d_weight * hinge_G``, where
    ``d_weight = disc_weight * ||grad_last nll|| / ||grad_last G||`` (taming-transformers'
    adaptive weight, clamped to [0, 1e4]) once ``step >= disc_start``.
    ``restart_every`` > 0 re-seeds dead codewords every that many steps, until step
    ``restart_until`` (0 = to the end; a codeword re-seeded late has no time to train).
    """

    lr: float = 2e-4
    weight_decay: float = 0.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    vq_weight: float = 1.0
    perceptual_weight: float = 0.0
    disc_weight: float = 0.5
    disc_start: int = 0
    disc_lr: float | None = None
    disc_betas: tuple[float, float] = (0.5, 0.9)
    adaptive_disc_weight: bool = True
    restart_every: int = 0
    restart_threshold: float = 1e-3
    restart_until: int = 0


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))`` / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def _last_weight(module: nn.Module) -> nn.Parameter | None:
    """The last multi-dimensional trainable weight of ``module`` (the decoder's output layer)."""
    last = None
    for p in module.parameters():
        if p.requires_grad and p.dim() > 1:
            last = p
    return last


class VQVAETrainer(Trainer):
    """Trains a :class:`~msar.tokenizer.MultiScaleVQTokenizer` (anything whose
    ``forward(x)`` returns ``(reconstruction, QuantizerOutput)``).

    Args:
        tokenizer: the model to train.
        config: :class:`VQVAETrainConfig`.
        perceptual: optional ``perceptual(x, recon) -> scalar`` (e.g. LPIPS), weighted by
            ``config.perceptual_weight``.
        discriminator: optional module ``recon -> logits`` trained with the hinge loss
            by its own AdamW (``disc_lr``, ``disc_betas``) from ``config.disc_start``.
        recon_loss: optional ``recon_loss(x, recon) -> scalar or {name: scalar}`` replacing
            the L1 + L2 terms (data that is not a tensor, e.g. graphs).
        last_layer: parameter for the adaptive GAN weight; default the decoder's last weight.

    Batches: ``x`` or a tuple/list whose first element is ``x`` (labels ignored).  Logged: ``loss, l1, l2, vq, usage_k{k}`` (+ ``perceptual``,
    ``g_loss, d_loss, d_weight``, ``restarted``).

    Example::

        tok = MultiScaleVQTokenizer(encoder, decoder, MultiScaleResidualQuantizer(512, 32, schedule))
        trainer = VQVAETrainer(tok, VQVAETrainConfig(lr=2e-4, total_steps=5000, restart_every=200,
                                                     ckpt_dir="runs/vq/ckpt", log_dir="runs/vq"))
        trainer.fit(build_loader(images, batch_size=32))
        print(trainer.evaluate(val_loader))     # {'l1': ..., 'mse': ..., 'vq': ..., 'usage_k0': ...}
    """

    find_unused_parameters = True  # the phi bank may hold convs that no scale of the schedule uses

    def __init__(self, tokenizer: nn.Module, config: VQVAETrainConfig | None = None,
                 perceptual: Callable[[Any, Any], torch.Tensor] | None = None,
                 discriminator: nn.Module | None = None,
                 recon_loss: Callable[[Any, Any], Any] | None = None,
                 last_layer: nn.Parameter | None = None):
        config = config or VQVAETrainConfig()
        super().__init__(tokenizer, config)
        self.tokenizer = tokenizer
        self.quantizer = tokenizer.quantizer
        self.perceptual = perceptual
        self.recon_loss = recon_loss
        if config.perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 but no `perceptual` callable was given")
        self.discriminator = None
        if discriminator is not None:
            self.discriminator = self.add_trainable("disc", discriminator, lr=config.disc_lr or config.lr,
                                                 betas=config.disc_betas)
            last_layer = last_layer if last_layer is not None else _last_weight(tokenizer.decoder)
            if last_layer is None and config.adaptive_disc_weight:
                raise ValueError("adaptive GAN weight needs `last_layer` (no multi-dimensional decoder weight found)")
        self.last_layer = last_layer

    # ------------------------------------------------------------------ batches
    def parse_batch(self, raw: Any) -> Any:
        """``x`` or ``(x, ...)`` (labels ignored, e.g. a ``TensorDataset``) -> ``x`` on the device."""
        return _to_device(raw[0] if isinstance(raw, (list, tuple)) else raw, self.device)

    # ------------------------------------------------------------------ loss
    def reconstruction_terms(self, x: Any, recon: Any) -> dict[str, torch.Tensor]:
        """Weighted reconstruction terms (their sum is the NLL of the adaptive GAN weight)."""
        c = self.config
        if self.recon_loss is not None:
            out = self.recon_loss(x, recon)
            return dict(out) if isinstance(out, dict) else {"recon": out}
        if not isinstance(x, torch.Tensor) or not isinstance(recon, torch.Tensor):
            raise TypeError("data is not a tensor: pass recon_loss=callable(x, recon) to VQVAETrainer")
        if recon.shape != x.shape:
            raise ValueError(f"reconstruction shape {tuple(recon.shape)} differs from input shape {tuple(x.shape)}")
        recon, x = recon.float(), x.float()
        terms = {}
        if c.l1_weight:
            terms["l1"] = c.l1_weight * F.l1_loss(recon, x)
        if c.l2_weight:
            terms["l2"] = c.l2_weight * F.mse_loss(recon, x)
        return terms

    def gan_active(self) -> bool:
        return self.discriminator is not None and self.step >= self.config.disc_start

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """``disc_weight * ||d nll / d w|| / (||d g / d w|| + 1e-4)`` at the decoder's last weight ``w``."""
        c = self.config
        if not c.adaptive_disc_weight:
            return torch.tensor(c.disc_weight, device=self.device)
        g_nll = torch.autograd.grad(nll, self.last_layer, retain_graph=True)[0]
        g_adv = torch.autograd.grad(g_loss, self.last_layer, retain_graph=True)[0]
        w = g_nll.norm() / (g_adv.norm() + 1e-4)
        return w.clamp(0.0, 1e4).detach() * c.disc_weight

    def gan_losses(self, x: torch.Tensor, recon: torch.Tensor, nll: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(g_loss, d_loss, d_weight)``: the generator's hinge loss ``-D(recon)`` (reaching only
        the tokenizer), the discriminator's hinge loss (reaching only D) and the adaptive weight."""
        disc = self.discriminator
        flags = [p.requires_grad for p in disc.parameters()]
        disc.requires_grad_(False)  # the generator loss must not reach D's parameters
        g_loss = -disc(recon).float().mean()
        for p, f in zip(disc.parameters(), flags):
            p.requires_grad_(f)
        d_weight = self.adaptive_weight(nll, g_loss) if torch.is_grad_enabled() else recon.new_tensor(0.0)
        # D sees the reconstruction detached: its loss only reaches D's parameters
        d_loss = hinge_d_loss(disc(x).float(), disc(recon.detach()).float())
        return g_loss, d_loss, d_weight

    def compute_loss(self, x: Any) -> LossOutput:
        c = self.config
        recon, q = self.forward_model(x)
        terms = self.reconstruction_terms(x, recon)
        if self.perceptual is not None and c.perceptual_weight > 0:
            terms["perceptual"] = c.perceptual_weight * self.perceptual(x, recon)
        nll = sum(terms.values()) if terms else recon.new_zeros(())
        vq = q.loss
        loss = nll + c.vq_weight * vq
        metrics = {"loss": loss.detach(), "vq": vq.detach(), **{k: v.detach() for k, v in terms.items()}}
        parts = {**terms, "vq": vq}
        if self.gan_active():
            g_loss, d_loss, d_weight = self.gan_losses(x, recon, nll)
            loss = loss + d_weight * g_loss + d_loss
            metrics.update(g_loss=g_loss.detach(), d_loss=d_loss.detach(), d_weight=d_weight, loss=loss.detach())
            parts.update(g_loss=g_loss, d_loss=d_loss, d_weight=d_weight)  # the adaptive weight can go NaN too
        if self.model.training:  # codebook usage: statistics of the whole (global) batch
            hits = q.hits.detach()
            if D.is_dist():
                torch.distributed.all_reduce(hits)
            self.quantizer.record_usage(hits)
            for k, u in enumerate(self.quantizer.usage(int(hits[-1].sum()))):
                metrics[f"usage_k{k}"] = u
        return LossOutput(loss, metrics, parts)

    def on_step_end(self, x: Any) -> dict:
        c = self.config
        if not (c.restart_every > 0 and self.step % c.restart_every == 0):
            return {}
        if c.restart_until and self.step > c.restart_until:
            return {}
        quantizer, n = self.quantizer, 0
        if D.is_main():  # restart on rank 0, then share the codebook so ranks stay identical
            with torch.no_grad():
                f = self.tokenizer.encode_latent(x)
            n = quantizer.restart_dead_codes(f, threshold=c.restart_threshold)
        if D.is_dist():
            torch.distributed.broadcast(quantizer.code_weight.data, src=0)  # the codebook (VQ)
            torch.distributed.broadcast(quantizer.usage_ema, src=0)
        return {"restarted": n}

    def train_step(self, x: Any) -> dict | None:
        """One batch of data; returns the step record when an optimizer step was taken."""
        return self.step_on(self.parse_batch(x))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    @leaves_rng_alone
    def evaluate(self, loader: Iterable, max_batches: int | None = None, use_ema: bool = True,
                 log: bool = True) -> dict[str, float]:
        """Mean reconstruction L1 / MSE (or ``recon``), VQ loss and per-scale codebook
        usage over a loader (EMA weights when available)."""
        model = self.eval_model if use_ema else self.model
        was_training = model.training
        model.eval()
        totals: dict[str, float] = {}
        n = 0
        try:
            for i, raw in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x = self.parse_batch(raw)
                with self.autocast():
                    recon, q = model(x)
                if self.recon_loss is not None:
                    out = self.recon_loss(x, recon)
                    vals = {k: float(v) for k, v in (out.items() if isinstance(out, dict) else {"recon": out}.items())}
                else:
                    vals = {"l1": F.l1_loss(recon.float(), x.float()).item(),
                            "mse": F.mse_loss(recon.float(), x.float()).item()}
                vals["vq"] = float(q.loss)
                for key, v in vals.items():
                    totals[key] = totals.get(key, 0.0) + v
                n += 1
        finally:
            model.train(was_training)
        if n == 0:
            raise ValueError("evaluate: the loader yielded no batches")
        out = {k: v / n for k, v in totals.items()}
        if D.is_dist():
            keys = sorted(out)
            t = D.all_reduce_mean(torch.tensor([out[k] for k in keys], device=self.device, dtype=torch.float64))
            out = dict(zip(keys, t.tolist()))
        for k, u in enumerate(model.quantizer.usage()):
            out[f"usage_k{k}"] = u
        if log:
            self.log_metrics(out)
        return out
