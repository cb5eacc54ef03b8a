"""Scale schedules: the ordered list of token maps a pyramid is cut into.

A scale is either a *grid* (a tuple of sides of any rank: ``(4,)``, ``(8, 8)``,
``(3, 8, 8)`` for time x height x width) or a plain *token count* (an ``int``)
for data with no grid, such as the levels of a graph coarsening hierarchy.

Tokens of all scales are laid out in one sequence of length ``L``, scale after
scale, each grid flattened row-major (the layout VAR uses).  The schedule knows
where every scale starts, which level each position belongs to, and builds the
block-causal mask of next-scale prediction: a token of scale k sees every token
of scales <= k and nothing later.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from typing import Union

import torch

ScaleSpec = Union[int, Sequence[int]]


def type_name(cls: type) -> str:
    """``module.QualName``: how saved configs name a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


#: ScaleSchedule and its subclasses by :func:`type_name` (filled as classes are defined)
SCHEDULE_TYPES: dict[str, type] = {}


class ScaleSchedule:
    """An ordered list of scales.

    Args:
        scales: each entry an ``int`` (a token count, no grid) or a sequence of
            positive ints (a grid shape). Grid scales must all have the same rank.

    Example::

        >>> s = ScaleSchedule([(1, 1), (2, 2), (4, 4)])
        >>> s.token_counts, s.L
        ([1, 4, 16], 21)
    """

    def __init__(self, scales: Sequence[ScaleSpec]):
        if isinstance(scales, ScaleSchedule):
            scales = scales.scales
        if not isinstance(scales, (list, tuple)) or len(scales) == 0:
            raise ValueError(f"a scale schedule needs a non-empty list of scales, got {scales!r}")
        parsed: list[Union[int, tuple[int, ...]]] = []
        for k, s in enumerate(scales):
            if isinstance(s, bool):
                raise TypeError(f"scale {k}: expected an int token count or a tuple grid shape, got bool {s!r}")
            if isinstance(s, int) or (hasattr(s, "__index__") and not hasattr(s, "__len__")):
                n = int(s)
                if n <= 0:
                    raise ValueError(f"scale {k}: token count must be positive, got {n}")
                parsed.append(n)
            elif isinstance(s, (list, tuple)) and len(s) > 0:
                shape = []
                for d in s:
                    try:  # operator.index refuses floats, float tensors and numpy floats (no truncation)
                        side = None if isinstance(d, bool) else operator.index(d)
                    except TypeError:
                        side = None
                    if side is None:
                        raise TypeError(f"scale {k}: grid sides must be ints, got {s!r}")
                    if side <= 0:
                        raise ValueError(f"scale {k}: grid sides must be positive, got {tuple(s)}")
                    shape.append(side)
                parsed.append(tuple(shape))
            else:
                raise TypeError(
                    f"scale {k}: expected an int token count or a non-empty tuple grid shape, got {s!r}"
                )
        ranks = {len(s) for s in parsed if isinstance(s, tuple)}
        if len(ranks) > 1:
            raise ValueError(f"all grid scales must have the same rank, got ranks {sorted(ranks)} in {parsed}")
        self.scales: tuple[Union[int, tuple[int, ...]], ...] = tuple(parsed)
        self.token_counts: list[int] = [s if isinstance(s, int) else math.prod(s) for s in self.scales]
        self.offsets: list[int] = [0]
        for n in self.token_counts:
            self.offsets.append(self.offsets[-1] + n)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def square(cls, sides: Sequence[int], rank: int = 2) -> "ScaleSchedule":
        """VAR-style schedule from side lengths: ``square([1, 2, 4])`` is ``[(1,1), (2,2), (4,4)]``."""
        return cls([(int(p),) * rank for p in sides])

    @classmethod
    def raster(cls, num_tokens: int) -> "ScaleSchedule":
        """Next-token (raster) order: every token its own scale, so the block-causal mask is causal."""
        return cls([1] * int(num_tokens))

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.scales)

    def __iter__(self) -> Iterator[Union[int, tuple[int, ...]]]:
        return iter(self.scales)

    def __getitem__(self, k: int) -> Union[int, tuple[int, ...]]:
        return self.scales[k]

    @staticmethod
    def coerce(scales: "ScaleSchedule | Sequence[ScaleSpec]") -> "ScaleSchedule":
        """``scales`` itself if it is a schedule (a subclass stays one: its ``progress`` and
        ``coordinates`` are part of what it means), else ``ScaleSchedule(scales)``."""
        return scales if isinstance(scales, ScaleSchedule) else ScaleSchedule(scales)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ScaleSchedule) and self.scales == other.scales

    def __hash__(self) -> int:
        return hash(self.scales)

    def __repr__(self) -> str:
        return f"ScaleSchedule({list(self.scales)})"

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def L(self) -> int:
        """Total number of tokens over all scales."""
        return self.offsets[-1]

    @property
    def first_len(self) -> int:
        """Number of tokens of the first scale (predicted from the start token alone)."""
        return self.token_counts[0]

    @property
    def rank(self) -> int | None:
        """Rank of the grid scales, or ``None`` when no scale is a grid."""
        for s in self.scales:
            if isinstance(s, tuple):
                return len(s)
        return None

    def is_grid(self, k: int) -> bool:
        return isinstance(self.scales[k], tuple)

    def shape(self, k: int) -> tuple[int, ...]:
        """Shape of the token map of scale k: the grid, or ``(n,)`` for a token count."""
        s = self.scales[k]
        return s if isinstance(s, tuple) else (s,)

    def slice(self, k: int) -> slice:
        """Positions of scale k in the flat sequence of length L."""
        return slice(self.offsets[k], self.offsets[k + 1])

    def progress(self, k: int) -> float:
        """How far scale k is along the coarse-to-fine pyramid, from 0 (coarsest) to 1 (finest).

        Samplers that ramp with the scale read it: VAR's linear guidance ``t_k = cfg * progress(k)``
        and ``more_smooth``'s Gumbel temperature; the quantizer picks scale k's phi convolution
        by it (:class:`msar.PhiBank`).  Here ``k / (K - 1)`` (1 for a single scale),
        VAR's ramp.  Extension point: a schedule that lays out several pyramids one after
        another (per-frame video pyramids) overrides it so that the ramp restarts with every
        pyramid instead of running once over the whole sequence.
        """
        K = self.num_scales
        if not 0 <= k < K:
            raise IndexError(f"scale {k} out of range for a schedule of {K} scales")
        return k / (K - 1) if K > 1 else 1.0

    def coordinates(self, k: int) -> torch.Tensor:
        """Where the tokens of scale k sit in the data: ``(n_k, rank)`` float, each row a
        token's cell centre in ``[0, 1]`` per grid axis, in the token layout (row-major).

        Here every grid scale covers the whole latent, so cell ``i`` of a side ``n`` is centred
        at ``(i + 0.5) / n``: tokens of different scales over the same place get nearby
        coordinates (what :attr:`TransformerConfig.coord_frequencies` embeds).  Extension point:
        a schedule whose scales cover part of the latent (the per-frame video pyramids, one
        frame each) overrides it.  A token-count scale has no grid and no coordinates.
        """
        if not 0 <= k < self.num_scales:
            raise IndexError(f"scale {k} out of range for a schedule of {self.num_scales} scales")
        if not self.is_grid(k):
            raise ValueError(f"scale {k} is a token count ({self.scales[k]}), not a grid: it has no coordinates")
        axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n for n in self.scales[k]]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(axes))

    def token_coordinates(self) -> torch.Tensor:
        """``(L, rank)``: :meth:`coordinates` of every scale, in sequence order."""
        return torch.cat([self.coordinates(k) for k in range(self.num_scales)])

    def level_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(L,)`` long tensor: the scale index of every position."""
        counts = torch.tensor(self.token_counts, device=device)
        return torch.repeat_interleave(torch.arange(self.num_scales, device=device), counts, output_size=self.L)

    def attn_mask(self, kind: str = "bool", device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Block-causal mask ``(L, L)``: query i may attend to key j iff level(i) >= level(j).

        ``kind="bool"`` gives True where attention is allowed (the convention of
        ``scaled_dot_product_attention``); ``kind="additive"`` gives 0 where allowed
        and ``-inf`` elsewhere (the form VAR registers as ``attn_bias_for_masking``).
        """
        lvl = self.level_ids(device)
        allowed = lvl[:, None] >= lvl[None, :]
        if kind == "bool":
            return allowed
        if kind == "additive":
            zero = torch.zeros((), dtype=dtype, device=device)
            return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=device))
        raise ValueError(f"mask kind must be 'bool' or 'additive', got {kind!r}")

    def split(self, x: torch.Tensor, dim: int = 1) -> list[torch.Tensor]:
        """Split a tensor whose ``dim`` has length L into the K per-scale pieces."""
        if x.shape[dim] != self.L:
            raise ValueError(f"expected size {self.L} (total tokens of {self}) along dim {dim}, got {x.shape[dim]}")
        return list(torch.split(x, self.token_counts, dim=dim))

    def to_config(self) -> list:
        """The scales as JSON-friendly lists; ``ScaleSchedule(s.to_config()) == s`` (the type is
        not recorded: :meth:`to_dict` keeps it)."""
        return [list(s) if isinstance(s, tuple) else s for s in self.scales]

    # ------------------------------------------------------------------ typed serialisation
    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        SCHEDULE_TYPES[type_name(cls)] = cls

    def to_dict(self) -> dict:
        """JSON form that keeps the type: ``{"type": "msar.schedule.ScaleSchedule", "scales": [...]}``.

        A subclass whose constructor takes other arguments overrides this (adding
        them to the dict) and :meth:`_from_dict`; :meth:`from_dict` rebuilds the subclass.
        """
        return {"type": type_name(type(self)), "scales": self.to_config()}

    @classmethod
    def _from_dict(cls, d: dict) -> "ScaleSchedule":
        """Build this class from its :meth:`to_dict` form (subclasses with other constructor
        arguments override it)."""
        return cls(d["scales"])

    @staticmethod
    def from_dict(d: dict) -> "ScaleSchedule":
        """Inverse of :meth:`to_dict`: the recorded class (imported if it lives in ``msar`` or
        ``modalities``), with the recorded scales (checked)."""
        from .pretrained import resolve_class  # pretrained imports this module

        if not isinstance(d, dict) or "type" not in d:
            raise ValueError(f"a typed schedule is a dict with a 'type' key (ScaleSchedule.to_dict()), got {d!r}")
        cls = resolve_class(d["type"], SCHEDULE_TYPES, "schedule type")
        if not (isinstance(cls, type) and issubclass(cls, ScaleSchedule)):
            raise ValueError(f"schedule type {d['type']!r} is not a ScaleSchedule subclass")
        try:
            s = cls._from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"cannot rebuild a {cls.__name__} from {d!r}: {type(e).__name__}: {e} "
                             f"({cls.__name__} may need to override to_dict / _from_dict)") from e
        if "scales" in d and s.to_config() != [list(x) if isinstance(x, (list, tuple)) else x for x in d["scales"]]:
            raise ValueError(f"{cls.__name__} rebuilt from {d!r} has other scales: {s.to_config()} "
                             f"({cls.__name__} may need to override to_dict / _from_dict)")
        return s

    # ------------------------------------------------------------------ validation
    def check_indices(self, indices: Sequence[torch.Tensor], vocab_size: int | None = None,
                      batch_size: int | None = None, num_scales: int | None = None,
                      name: str = "indices") -> int:
        """Validate per-scale token indices ``list[LongTensor (B, n_k)]``; returns B.

        Raises a ``ValueError`` naming the scale and what was expected for a wrong
        number of scales, a token map of the wrong size, a mismatched batch, a
        non-integer dtype or an index outside ``[0, vocab_size)``.
        """
        expected_scales = self.num_scales if num_scales is None else num_scales
        if not isinstance(indices, (list, tuple)):
            raise TypeError(f"{name}: expected a list of per-scale LongTensors (B, n_k), got {type(indices).__name__}")
        if len(indices) != expected_scales:
            raise ValueError(f"{name}: expected {expected_scales} scales, got {len(indices)}")
        B = batch_size
        for k, idx in enumerate(indices):
            if not isinstance(idx, torch.Tensor):
                raise TypeError(f"{name}[{k}]: expected a tensor, got {type(idx).__name__}")
            if idx.dtype not in (torch.int64, torch.int32):  # what embedding lookups accept
                raise TypeError(f"{name}[{k}]: expected an integer tensor (int64 or int32), got dtype {idx.dtype}")
            n = self.token_counts[k]
            if idx.dim() != 2 or idx.shape[1] != n:
                raise ValueError(
                    f"{name}[{k}]: expected shape (B, {n}) for scale {self.scales[k]}, got {tuple(idx.shape)}"
                )
            if B is None:
                B = idx.shape[0]
            elif idx.shape[0] != B:
                raise ValueError(f"{name}[{k}]: batch size {idx.shape[0]} does not match batch size {B}")
            if vocab_size is not None and idx.numel() > 0:
                lo, hi = int(idx.min()), int(idx.max())
                if lo < 0 or hi >= vocab_size:
                    raise ValueError(
                        f"{name}[{k}]: token index out of range [0, {vocab_size}): found min {lo}, max {hi}"
                    )
        return int(B) if B is not None else 0


SCHEDULE_TYPES[type_name(ScaleSchedule)] = ScaleSchedule
