"""Training the voxel tokenizer and the next-scale transformer with :mod:`msar.training`.

Both go through the shared trainers, so a run checkpoints into ``<out>/ckpt_tokenizer`` /
``<out>/ckpt_transformer`` and an interrupted run resumes exactly where it stopped:

* tokenizer: :class:`~msar.training.VQVAETrainer` with the BCE occupancy loss
  (:func:`modalities.voxel.tokenizer.occupancy_loss`) as ``recon_loss``, cosine learning rate,
  dead codewords re-seeded every ``restart_every`` steps during the first 80% of training;
* transformer: :class:`~msar.training.TransformerTrainer` on shapes tokenized once
  (:class:`~msar.training.TokenDataset`), teacher-forced cross-entropy over all scales.

Per-step metrics go to ``<out>/logs_*/train.csv`` (every step once, also across a resume).
"""
from __future__ import annotations

import os

import torch

from msar import NextScaleTransformer
from msar.training import (TokenDataset, TransformerTrainConfig, TransformerTrainer, VQVAETrainConfig, VQVAETrainer,
                           build_loader, collate_tokens)

from .metrics import iou
from .tokenizer import VoxelTokenizer, occupancy_loss


def _dirs(out: str | None, name: str, ckpt_every: int) -> dict:
    if out is None:
        return {}
    return {"ckpt_dir": os.path.join(out, f"ckpt_{name}"), "ckpt_every": ckpt_every,
            "log_dir": os.path.join(out, f"logs_{name}"), "tensorboard": False}


def train_tokenizer(tok: VoxelTokenizer, voxels: torch.Tensor, steps: int = 1000, batch_size: int = 32,
                    lr: float = 2e-3, seed: int = 0, pos_weight: float = 2.0, restart_every: int = 100,
                    restart_threshold: float = 1.0, out: str | None = None, ckpt_every: int = 100,
                    progress: bool = True) -> list[dict]:
    """Train the VQ-VAE on occupancy grids ``voxels (N, R, R, R)`` (bool or {0, 1} float).

    Loss = :func:`occupancy_loss` + the quantizer loss. With ``out`` set, checkpoints (every
    ``ckpt_every`` steps) and the CSV log go under it and a rerun resumes from the newest one. Returns the
    step records of this call (none when the checkpoints already reach ``steps``).
    """
    cfg = VQVAETrainConfig(lr=lr, total_steps=steps, warmup_steps=min(50, steps // 10 + 1), lr_schedule="cos",
                           warmup_start=0.02, final_lr_ratio=0.1, weight_decay=1e-4, grad_clip=1.0,
                           restart_every=restart_every, restart_threshold=restart_threshold,
                           restart_until=int(0.8 * steps), progress=progress, **_dirs(out, "tokenizer", ckpt_every))
    trainer = VQVAETrainer(tok, cfg, recon_loss=lambda x, logits: occupancy_loss(logits, x, pos_weight))
    data = torch.utils.data.TensorDataset(voxels.float())
    records = trainer.fit(build_loader(data, batch_size, seed=seed))
    tok.eval()
    return records


@torch.no_grad()
def encode_dataset(tok: VoxelTokenizer, voxels: torch.Tensor, batch_size: int = 64) -> list[torch.Tensor]:
    """Tokenize a whole set once: per scale ``(N, n_k)`` long."""
    tok.eval()
    return TokenDataset.encode(tok, voxels.float(), batch_size=batch_size).indices


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
                      seed: int = 0, out: str | None = None, ckpt_every: int = 100,
                      progress: bool = True) -> list[dict]:
    """Teacher-forced next-scale training on pre-tokenized shapes (frozen tokenizer).

    ``indices``: per scale ``(N, n_k)``; ``labels``: ``(N,)``. With ``out`` set, checkpoints
    and the CSV log go under it and a rerun resumes. Returns the step records of this call.
    """
    cfg = TransformerTrainConfig(lr=lr, total_steps=steps, warmup_steps=min(100, steps // 10 + 1), lr_schedule="cos",
                                 warmup_start=0.01, final_lr_ratio=0.1, weight_decay=0.05, grad_clip=2.0,
                                 progress=progress, **_dirs(out, "transformer", ckpt_every))
    trainer = TransformerTrainer(model, tok, cfg)
    loader = build_loader(TokenDataset(indices, labels), batch_size, seed=seed, collate_fn=collate_tokens)
    records = trainer.fit(loader)
    model.eval()
    return records


@torch.no_grad()
def token_loss(model: NextScaleTransformer, tok: VoxelTokenizer, indices: list[torch.Tensor], labels: torch.Tensor,
               batch_size: int = 64) -> dict[str, float]:
    """Teacher-forced cross-entropy / accuracy of ``model`` on pre-tokenized shapes (per scale
    ``(N, n_k)``, labels ``(N,)``), e.g. held-out ones: ``{"loss", "acc", "loss_k{k}", "acc_k{k}"}``.
    Leaves the model in eval mode."""
    trainer = TransformerTrainer(model, tok, TransformerTrainConfig(progress=False, log_dir=None))
    loader = build_loader(TokenDataset(indices, labels), batch_size, shuffle=False, drop_last=False,
                          collate_fn=collate_tokens)
    out = trainer.evaluate(loader, log=False)
    model.eval()
    return out
