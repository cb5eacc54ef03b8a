"""Pre-tokenized datasets: encode once with a frozen tokenizer, then train the transformer
on the token maps (much cheaper than re-encoding every batch on CPU)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset


class TokenDataset(Dataset):
    """Per-scale token maps of ``N`` samples with their conditions.

    Args:
        indices: one ``(N, n_k)`` long tensor per scale (what ``tokenizer.encode`` returns
            for a batch of ``N``).
        labels: ``(N,)`` long class labels, ``(N, D)`` float features of a vector
            condition (``msar.Condition.vector``), or ``None`` for unconditional data.

    Item ``i`` is ``([indices[k][i] for k], labels[i])``; batch with :func:`collate_tokens`,
    which gives ``(list of (B, n_k), (B,) or (B, D))`` -- the batch format
    :class:`~msar.training.TransformerTrainer` reads.
    """

    def __init__(self, indices: Sequence[torch.Tensor], labels: torch.Tensor | None = None):
        if len(indices) == 0:
            raise ValueError("TokenDataset: indices must hold one (N, n_k) tensor per scale, got an empty list")
        n = indices[0].shape[0]
        for k, t in enumerate(indices):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != n or t.dtype != torch.long:
                raise ValueError(f"TokenDataset: indices[{k}] must be a long tensor (N={n}, n_k), got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if labels is not None:
            is_class = labels.dim() == 1 and not labels.dtype.is_floating_point
            is_vector = labels.dim() == 2 and labels.dtype.is_floating_point
            if not (is_class or is_vector) or labels.shape[0] != n:
                raise ValueError(f"TokenDataset: labels must be class labels (N={n},) of an integer dtype or vector "
                                 f"features (N={n}, D) of a float dtype, got {tuple(labels.shape)} {labels.dtype}")
        self.indices = list(indices)
        self.labels = labels

    def __len__(self) -> int:
        return self.indices[0].shape[0]

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], Any]:
        label = self.labels[i] if self.labels is not None else None
        return [t[i] for t in self.indices], label

    @classmethod
    @torch.no_grad()
    def encode(cls, tokenizer: Any, data: torch.Tensor, labels: torch.Tensor | None = None,
               batch_size: int = 64) -> "TokenDataset":
        """Tokenize ``data`` (a tensor batched on dim 0) with ``tokenizer.encode`` in chunks."""
        parts = [tokenizer.encode(data[i:i + batch_size]) for i in range(0, len(data), batch_size)]
        if not parts:
            raise ValueError("TokenDataset.encode: no data")
        return cls([torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))], labels)


def collate_tokens(batch: list[tuple[list[torch.Tensor], Any]]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Stack :class:`TokenDataset` items into ``(list of (B, n_k), labels (B,) / features (B, D) or None)``."""
    idx = [torch.stack([b[0][k] for b in batch]) for k in range(len(batch[0][0]))]
    labels = None if batch[0][1] is None else torch.stack([torch.as_tensor(b[1]) for b in batch])
    return idx, labels
