"""What a generation is conditioned on: one explicit type, :class:`Condition`, of three kinds.

=============  ==========================================  ============================================
kind           tensors                                     how the transformer uses it
=============  ==========================================  ============================================
``classes``    ``labels (B,)`` long                        class embedding (VAR, bit-identical)
``vector``     ``features (B, D)`` float                   ``cond_proj`` to width C: start token + AdaLN
``sequence``   ``features (B, T, D)`` float,               ``cond_proj`` per token; masked mean = start
               ``mask (B, T)`` bool (True = real token)     token + AdaLN; every block cross-attends
=============  ==========================================  ============================================

A model declares the kind it takes (``TransformerConfig.cond_kind``) and its feature size D
(``cond_dim``); a plain label tensor still works wherever a class model takes labels.  A
Condition is validated once, at construction (dtype, rank, mask shape, rows without a real
token); the model checks kind, feature size and batch size at its public entry points.

Batches for training: ``(x, labels)``, ``(x, Condition)``, or the raw tensors of
:meth:`Condition.from_tensors` (``(x, features)``, ``(x, features, mask)``) -- those collate
with PyTorch's default ``DataLoader``, a Condition object does not.  Text goes in as token ids
``(B, T)`` long + mask ``(B, T)`` bool (see :mod:`msar.text`) and becomes a Condition inside
the trainer's ``condition_encoder``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

KINDS = ("classes", "vector", "sequence")


class Condition:
    """A batch of conditions of one kind; build it with :meth:`classes`, :meth:`vector` or
    :meth:`sequence` (the constructor validates the same way).

    Attributes: ``kind``; ``labels (B,)`` long (classes), ``features`` ``(B, D)`` (vector) or
    ``(B, T, D)`` (sequence), ``mask (B, T)`` bool (sequence; True = real token); the others
    are None.
    """

    __slots__ = ("kind", "labels", "features", "mask")

    def __init__(self, kind: str, labels: torch.Tensor | None = None, features: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None):
        if kind not in KINDS:
            raise ValueError(f"Condition kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.labels, self.features, self.mask = kind, None, None, None
        if kind == "classes":
            if features is not None or mask is not None:
                raise ValueError("a classes Condition takes labels only (no features or mask)")
            if not isinstance(labels, torch.Tensor):
                labels = torch.as_tensor(labels)
            if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError(f"Condition.classes: expected labels (B,) of an integer dtype, got shape "
                                 f"{tuple(labels.shape)} dtype {labels.dtype}")
            self.labels = labels.long()
            return
        if labels is not None:
            raise ValueError(f"a {kind} Condition takes features (and a mask), not labels")
        if not isinstance(features, torch.Tensor) or not features.dtype.is_floating_point:
            got = f"dtype {features.dtype}" if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"Condition.{kind}: features must be a floating-point tensor, got {got}")
        want = 2 if kind == "vector" else 3
        if features.dim() != want or 0 in features.shape[1:]:
            shape = "(B, D)" if kind == "vector" else "(B, T, D)"
            raise ValueError(f"Condition.{kind}: expected features {shape} with T, D >= 1, got shape "
                             f"{tuple(features.shape)}")
        self.features = features
        if kind == "vector":
            if mask is not None:
                raise ValueError("a vector Condition has no mask (one vector per sample)")
            return
        B, T = features.shape[:2]
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=features.device)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"Condition.sequence: mask must be a bool tensor (True = real token), got {got}")
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"Condition.sequence: mask must have shape (B, T) = {(B, T)} like the features "
                             f"{tuple(features.shape)}, got {tuple(mask.shape)}")
        empty = ~mask.any(1)
        if empty.any():
            rows = empty.nonzero().flatten().tolist()[:8]
            raise ValueError(f"Condition.sequence: rows {rows} have no real token (mask all False); every sample "
                             f"needs at least one (the unconditional case is the model's null condition)")
        self.mask = mask.to(features.device)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def classes(cls, labels: torch.Tensor | Sequence[int]) -> "Condition":
        """Class labels ``(B,)`` (an integer dtype)."""
        return cls("classes", labels=labels)

    @classmethod
    def vector(cls, features: torch.Tensor) -> "Condition":
        """One continuous vector per sample: ``features (B, D)`` float."""
        return cls("vector", features=features)

    @classmethod
    def sequence(cls, features: torch.Tensor, mask: torch.Tensor | None = None) -> "Condition":
        """A variable-length sequence per sample: ``features (B, T, D)`` float and ``mask (B, T)``
        bool, True on real tokens (None: every token is real). Padded positions are ignored."""
        return cls("sequence", features=features, mask=mask)

    @classmethod
    def from_tensors(cls, kind: str, *tensors: torch.Tensor) -> "Condition":
        """The Condition of ``kind`` from the tensors a default ``DataLoader`` collates:
        ``(labels,)``, ``(features,)`` or ``(features[, mask])`` for a sequence."""
        n = {"classes": (1,), "vector": (1,), "sequence": (1, 2)}.get(kind)
        if n is None:
            raise ValueError(f"Condition kind must be one of {KINDS}, got {kind!r}")
        if len(tensors) not in n:
            want = "(features, mask) or (features,)" if kind == "sequence" else ("(labels,)" if kind == "classes"
                                                                                 else "(features,)")
            raise ValueError(f"a {kind} condition is built from {want}, got {len(tensors)} tensors")
        if kind == "classes":
            return cls.classes(tensors[0])
        if kind == "vector":
            return cls.vector(tensors[0])
        return cls.sequence(*tensors)

    @classmethod
    def cat(cls, conditions: Sequence["Condition"]) -> "Condition":
        """Concatenate along the batch; sequences of different lengths are right-padded to the
        longest (padding is masked out)."""
        if not conditions:
            raise ValueError("Condition.cat needs at least one condition")
        kinds = {c.kind for c in conditions}
        if len(kinds) != 1:
            raise ValueError(f"Condition.cat: all conditions must be of one kind, got {sorted(kinds)}")
        kind = kinds.pop()
        if kind == "classes":
            return cls.classes(torch.cat([c.labels for c in conditions]))
        dims = {c.dim for c in conditions}
        if len(dims) != 1:
            raise ValueError(f"Condition.cat: all conditions must have one feature size, got {sorted(dims)}")
        if kind == "vector":
            return cls.vector(torch.cat([c.features for c in conditions]))
        T = max(c.length for c in conditions)
        feats, masks = [], []
        for c in conditions:
            pad = T - c.length
            feats.append(torch.nn.functional.pad(c.features, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(c.mask, (0, pad), value=False))
        return cls.sequence(torch.cat(feats), torch.cat(masks))

    # ------------------------------------------------------------------ views
    @property
    def batch_size(self) -> int:
        """B, the number of conditions in the batch."""
        return int((self.labels if self.kind == "classes" else self.features).shape[0])

    @property
    def dim(self) -> int | None:
        """Feature size D (None for classes)."""
        return None if self.kind == "classes" else int(self.features.shape[-1])

    @property
    def length(self) -> int | None:
        """Padded sequence length T (None unless a sequence)."""
        return int(self.features.shape[1]) if self.kind == "sequence" else None

    @property
    def device(self) -> torch.device:
        """The device of the labels / features."""
        return (self.labels if self.kind == "classes" else self.features).device

    def to(self, device: torch.device | str) -> "Condition":
        """The same condition on ``device``."""
        if self.kind == "classes":
            return Condition.classes(self.labels.to(device))
        return Condition(self.kind, features=self.features.to(device),
                         mask=None if self.mask is None else self.mask.to(device))

    def __getitem__(self, rows: int | slice | torch.Tensor) -> "Condition":
        """The rows ``rows`` (an int, a slice, or an index / bool tensor over the batch) as a
        Condition; an int keeps the batch dimension (a batch of one)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        if self.kind == "classes":
            return Condition.classes(self.labels[rows])
        return Condition(self.kind, features=self.features[rows], mask=None if self.mask is None else self.mask[rows])

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        if self.kind == "classes":
            return f"Condition.classes(labels={tuple(self.labels.shape)})"
        m = "" if self.mask is None else f", mask={tuple(self.mask.shape)}"
        return f"Condition.{self.kind}(features={tuple(self.features.shape)}{m})"
