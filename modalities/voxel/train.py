"""Small CPU training loops for the voxel tokenizer and the next-scale transformer.

Plain AdamW loops (the occupancy tokenizer needs a BCE reconstruction loss, see
:func:`modalities.voxel.tokenizer.occupancy_loss`), seeded, with tqdm bars.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from msar import NextScaleTransformer

from .metrics import iou
from .tokenizer import VoxelTokenizer, occupancy_loss


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_tokenizer(tok: VoxelTokenizer, voxels: torch.Tensor, steps: int = 1000, batch_size: int = 32,
                    lr: float = 2e-3, seed: int = 0, pos_weight: float = 2.0, restart_every: int = 100,
                    restart_threshold: float = 1.0, progress: bool = True, log: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """Train the VQ-VAE on occupancy grids ``voxels (N, R, R, R)``; returns per-step logs.

    Loss = :func:`occupancy_loss` + quantizer loss (commitment + codebook). Dead
    codewords (EMA hits summed over scales < ``restart_threshold``) are re-seeded
    from encoder outputs every ``restart_every`` steps during the first 80% of training.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(tok.parameters(), lr=lr, weight_decay=1e-4, betas=(0.9, 0.95))
    tok.train()
    history = []
    bar = tqdm(range(steps), desc="tokenizer", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup=min(50, steps // 10 + 1))
        x = voxels[torch.randint(0, len(voxels), (batch_size,), generator=g)].float()
        logits, q = tok(x)
        rec = occupancy_loss(logits, x, pos_weight)
        loss = rec + q.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        restarted = 0
        if restart_every and step % restart_every == restart_every - 1 and step < 0.8 * steps:
            with torch.no_grad():
                restarted = tok.quantize.restart_dead_codes(tok.encode_latent(x), threshold=restart_threshold,
                                                           generator=g)
        rec_iou = float(iou(logits.detach() > 0, x > 0.5).mean())
        entry = {"step": step, "loss": loss.item(), "rec": rec.item(), "vq": q.loss.item(), "iou": rec_iou,
                 "usage": q.usage[-1], "restarted": restarted}
        history.append(entry)
        if log is not None:
            log(step, entry)
        bar.set_postfix(rec=f"{rec.item():.3f}", iou=f"{rec_iou:.3f}", use=f"{q.usage[-1]:.0f}%")
    tok.eval()
    return history


@torch.no_grad()
def encode_dataset(tok: VoxelTokenizer, voxels: torch.Tensor, batch_size: int = 64) -> list[torch.Tensor]:
    """Tokenize a whole set once: per scale ``(N, n_k)`` long."""
    tok.eval()
    parts = [tok.encode(voxels[i:i + batch_size].float()) for i in range(0, len(voxels), batch_size)]
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


@torch.no_grad()
def reconstruction_iou(tok: VoxelTokenizer, voxels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per-shape IoU of ``decode(encode(x))`` against ``x``: ``(N,)``."""
    tok.eval()
    out = []
    for i in range(0, len(voxels), batch_size):
        x = voxels[i:i + batch_size].float()
        out.append(torch.from_numpy(iou(tok.decode(tok.encode(x)) > 0, x > 0.5)))
    return torch.cat(out)


def train_transformer(model: NextScaleTransformer, tok: VoxelTokenizer, indices: list[torch.Tensor],
                      labels: torch.Tensor, steps: int = 1000, batch_size: int = 32, lr: float = 1e-3,
                      seed: int = 0, progress: bool = True,
                      log: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """Teacher-forced next-scale training on pre-tokenized shapes (frozen tokenizer).

    ``indices``: per scale ``(N, n_k)``; ``labels``: ``(N,)``. Loss: cross-entropy of
    the ``(B, L, V)`` logits against all tokens of all scales.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # class-dropout draws of the model's forward
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    model.train()
    tok.eval()
    history = []
    bar = tqdm(range(steps), desc="transformer", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        pick = torch.randint(0, len(labels), (batch_size,), generator=g)
        idx = [t[pick] for t in indices]
        x = tok.teacher_forcing_input(idx)
        logits = model(labels[pick], x)
        target = torch.cat(idx, dim=1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        with torch.no_grad():
            acc = (logits.argmax(-1) == target).float().mean().item()
        entry = {"step": step, "loss": loss.item(), "acc": acc}
        history.append(entry)
        if log is not None:
            log(step, entry)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
    model.eval()
    return history
