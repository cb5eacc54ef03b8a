"""Training utilities: trainers for the transformer and the VQ tokenizer, atomic checkpoints,
VAR's optimizer groups and lr schedule, DDP helpers.  Modality-free.

Quick start::

    from msar.training import TransformerTrainer, TransformerTrainConfig, build_loader
    trainer = TransformerTrainer(model, tokenizer, TransformerTrainConfig(lr=3e-4, total_steps=2000,
                                 ckpt_dir="runs/x/ckpt", ckpt_every=500, log_dir="runs/x"))
    trainer.fit(build_loader(dataset, batch_size=64))
"""
from .base import LossOutput, NonFiniteError, TrainConfig, Trainer
from .checkpoint import (Checkpoint, CheckpointError, atomic_write_bytes, capture_rng_state, list_checkpoints,
                         load_checkpoint, load_latest, prune_checkpoints, restore_rng_state, save_checkpoint,
                         unwrap_model, verify_checkpoint)
from .data import TokenDataset, collate_tokens
from .distributed import (all_reduce_mean, barrier, build_loader, init_distributed, is_dist, is_main, rank,
                          world_size)
from .metrics import EMA, CSVLogger
from .optim import (VAR_NO_DECAY_KEYS, WarmupDecaySchedule, build_optimizer, is_no_decay, lr_ratio, param_groups,
                    wd_value)
from .transformer_trainer import TransformerTrainConfig, TransformerTrainer
from .vqvae_trainer import VQVAETrainConfig, VQVAETrainer, hinge_d_loss

__all__ = [
    "Trainer", "TrainConfig", "LossOutput", "NonFiniteError",
    "TransformerTrainer", "TransformerTrainConfig", "VQVAETrainer", "VQVAETrainConfig", "hinge_d_loss",
    "save_checkpoint", "load_latest", "load_checkpoint", "verify_checkpoint", "list_checkpoints",
    "prune_checkpoints", "Checkpoint", "CheckpointError", "capture_rng_state", "restore_rng_state",
    "atomic_write_bytes", "unwrap_model",
    "build_optimizer", "param_groups", "is_no_decay", "VAR_NO_DECAY_KEYS", "WarmupDecaySchedule", "lr_ratio",
    "wd_value",
    "init_distributed", "build_loader", "is_dist", "is_main", "rank", "world_size", "barrier", "all_reduce_mean",
    "EMA", "CSVLogger", "TokenDataset", "collate_tokens",
]
