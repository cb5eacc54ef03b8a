"""Restriction (fine -> coarse) and prolongation (coarse -> fine) of a latent.

This is the one thing a modality must tell the shared residual quantizer: how to
move a latent between the finest scale and scale k.  Latents are always laid out
channels-first, ``(B, C, *shape)``, where ``shape`` is the grid of the scale or
``(n,)`` for a scale given as a token count.

* :class:`GridPyramid` covers regular grids of rank 1, 2 and 3: area pooling
  down, and linear / bicubic / trilinear interpolation up (VAR's choice for
  rank 2 is area down and bicubic up).
* :class:`OperatorPyramid` covers everything else with explicit linear
  operators, e.g. cluster-assignment matrices of a graph coarsening hierarchy.
  Operators may be shared by the batch ``(n_k, N)`` or per sample ``(B, n_k, N)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .schedule import ScaleSchedule


@runtime_checkable
class LatentPyramid(Protocol):
    """What the residual quantizer needs from a modality.

    ==================================  ====================================================
    ``schedule``                        the :class:`ScaleSchedule` (K scales)
    ``full``                            shape of the full-resolution latent (without B, C);
                                        usually the last scale's grid, but it may differ
                                        (e.g. one spatial pyramid per video frame)
    ``restrict(f, k)``                  ``(B, C, *full) -> (B, C, *shape_k)``: fine -> coarse;
                                        an average (a constant field restricts to itself)
    ``prolong(h, k)``                   ``(B, C, *shape_k) -> (B, C, *full)``: coarse -> fine
    ``resample(f, k)``                  ``(B, C, *full) -> (B, C, *shape_k)``: the transformer
                                        input of scale k from the accumulated latent (VAR: the
                                        same area pooling as ``restrict``)
    ==================================  ====================================================

    ``msar.testing.check_pyramid`` checks the semantics (constants, round trip, no empty
    clusters, token counts) of an implementation.
    """

    schedule: ScaleSchedule
    full: tuple[int, ...]

    def restrict(self, f: torch.Tensor, k: int) -> torch.Tensor: ...

    def prolong(self, h: torch.Tensor, k: int) -> torch.Tensor: ...

    def resample(self, f: torch.Tensor, k: int) -> torch.Tensor: ...


_UP_MODES = {1: "linear", 2: "bicubic", 3: "trilinear"}


class GridPyramid:
    """Area pooling down and (bi|tri)linear / bicubic interpolation up on regular grids.

    Args:
        schedule: a schedule whose scales are all grids of rank 1, 2 or 3.
        up_mode: interpolation used by :meth:`prolong`; default ``linear`` /
            ``bicubic`` / ``trilinear`` for rank 1 / 2 / 3.
        down_mode: interpolation used by :meth:`restrict`; default ``area``.
    """

    def __init__(self, schedule: ScaleSchedule | Sequence, up_mode: str | None = None, down_mode: str = "area"):
        self.schedule = ScaleSchedule.coerce(schedule)
        if any(not self.schedule.is_grid(k) for k in range(len(self.schedule))):
            raise ValueError(f"GridPyramid needs grid scales only, got {self.schedule}; use OperatorPyramid for token counts")
        rank = self.schedule.rank
        if rank not in _UP_MODES:
            raise ValueError(f"GridPyramid supports grids of rank 1, 2 or 3, got rank {rank}")
        self.rank = rank
        self.full = self.schedule.shape(-1)
        self.up_mode = up_mode or _UP_MODES[rank]
        self.down_mode = down_mode

    def _check(self, x: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
        if x.dim() != 2 + self.rank or tuple(x.shape[2:]) != tuple(shape):
            raise ValueError(f"{what}: expected a latent (B, C, {', '.join(map(str, shape))}), got {tuple(x.shape)}")

    def restrict(self, f: torch.Tensor, k: int) -> torch.Tensor:
        self._check(f, self.full, "restrict")
        shape = self.schedule.shape(k)
        if shape == self.full:
            return f
        return F.interpolate(f, size=shape, mode=self.down_mode)

    # Going from the accumulated full-res latent to the next scale's input is the
    # same area pooling in VAR; kept as its own name so operator pyramids can differ.
    resample = restrict

    def prolong(self, h: torch.Tensor, k: int) -> torch.Tensor:
        shape = self.schedule.shape(k)
        self._check(h, shape, "prolong")
        if shape == self.full:
            return h
        return F.interpolate(h, size=self.full, mode=self.up_mode)


class OperatorPyramid:
    """Restriction / prolongation given as explicit matrices.

    Args:
        schedule: the schedule; scale k has ``n_k`` tokens, the last has ``N``.
        restrict_ops: per scale, ``(n_k, N)`` or ``(B, n_k, N)``: row i averages
            (or otherwise combines) the fine nodes of coarse node i.
        prolong_ops: per scale, ``(N, n_k)`` or ``(B, N, n_k)``: copies (or
            interpolates) coarse values back to the fine nodes.

    Raises:
        ValueError: an operator of the wrong shape, or one with NaN or infinite entries
            (they would poison every latent restricted or prolonged through it).

    Use :meth:`from_assignments` for the common case of hard clusters, and
    :func:`msar.testing.check_pyramid` to check the semantics (averaging restriction,
    round trip, no empty clusters).
    """

    def __init__(self, schedule: ScaleSchedule | Sequence, restrict_ops: Sequence[torch.Tensor],
                 prolong_ops: Sequence[torch.Tensor]):
        self.schedule = ScaleSchedule.coerce(schedule)
        K = len(self.schedule)
        if len(restrict_ops) != K or len(prolong_ops) != K:
            raise ValueError(f"expected {K} restriction and prolongation operators, got {len(restrict_ops)} and {len(prolong_ops)}")
        N = self.schedule.token_counts[-1]
        for k, (R, P) in enumerate(zip(restrict_ops, prolong_ops)):
            n = self.schedule.token_counts[k]
            if R.dim() not in (2, 3) or tuple(R.shape[-2:]) != (n, N):
                raise ValueError(f"restrict_ops[{k}]: expected shape (n_k={n}, N={N}) or (B, {n}, {N}), got {tuple(R.shape)}")
            if P.dim() not in (2, 3) or tuple(P.shape[-2:]) != (N, n):
                raise ValueError(f"prolong_ops[{k}]: expected shape (N={N}, n_k={n}) or (B, {N}, {n}), got {tuple(P.shape)}")
            for name, op in (("restrict_ops", R), ("prolong_ops", P)):
                bad = ~torch.isfinite(op)
                if bad.any():
                    where = tuple(int(i) for i in bad.nonzero()[0])
                    raise ValueError(f"{name}[{k}] (scale {k}) has {int(bad.sum())} NaN or infinite entries, "
                                     f"the first at index {where}")
        self.restrict_ops = list(restrict_ops)
        self.prolong_ops = list(prolong_ops)
        self.full = (N,)

    @classmethod
    def from_assignments(cls, schedule: ScaleSchedule | Sequence, assignments: Sequence[torch.Tensor],
                         allow_empty: bool = False) -> "OperatorPyramid":
        """Hard clusters: ``assignments[k]`` is ``(N,)`` or ``(B, N)`` long, the scale-k
        cluster of every finest-level node. Restriction averages the members of a
        cluster (the graph analogue of area pooling); prolongation copies the cluster
        value to every member.

        A cluster without members (a token of scale k whose restriction reads nothing) is an
        error: usually the schedule counts more tokens than the hierarchy has clusters. Pass
        ``allow_empty=True`` when empty clusters are intended (e.g. padding of a batch of
        hierarchies of different sizes); they then restrict to zero.
        """
        schedule = ScaleSchedule.coerce(schedule)
        if len(assignments) != len(schedule):
            raise ValueError(f"expected {len(schedule)} assignments (one per scale of {schedule}), got {len(assignments)}")
        R_ops, P_ops = [], []
        for k, a in enumerate(assignments):
            n = schedule.token_counts[k]
            if a.numel() and (int(a.min()) < 0 or int(a.max()) >= n):
                raise ValueError(f"assignments[{k}]: cluster ids must lie in [0, {n}), got [{int(a.min())}, {int(a.max())}]")
            P = F.one_hot(a.long(), n).float()  # (..., N, n)
            sizes = P.sum(dim=-2, keepdim=True)  # (..., 1, n)
            if not allow_empty and bool((sizes == 0).any()):
                empty = (sizes[..., 0, :] == 0).nonzero()[0]  # (c,) or (b, c)
                where = f"cluster {int(empty[-1])}" + (f" of sample {int(empty[0])}" if len(empty) == 2 else "")
                raise ValueError(f"assignments[{k}] (scale {k}): {where} has no member "
                                 f"({int((sizes == 0).sum())} empty clusters of {n} in all); does the schedule's "
                                 f"n_{k} = {n} exceed the number of clusters of the hierarchy? Pass allow_empty=True "
                                 f"if empty clusters are intended")
            R = (P / sizes.clamp_min(1.0)).transpose(-1, -2)  # (..., n, N)
            R_ops.append(R)
            P_ops.append(P)
        return cls(schedule, R_ops, P_ops)

    def to(self, device: torch.device | str) -> "OperatorPyramid":
        return OperatorPyramid(self.schedule, [R.to(device) for R in self.restrict_ops], [P.to(device) for P in self.prolong_ops])

    @staticmethod
    def _apply(op: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, m); op: (n, m) or (B, n, m)  ->  (B, C, n)
        op = op.to(dtype=x.dtype, device=x.device)
        if op.dim() == 2:
            return torch.einsum("bcm,nm->bcn", x, op)
        if op.shape[0] != x.shape[0]:
            raise ValueError(f"per-sample operator has batch {op.shape[0]} but the latent has batch {x.shape[0]}")
        return torch.einsum("bcm,bnm->bcn", x, op)

    def restrict(self, f: torch.Tensor, k: int) -> torch.Tensor:
        if f.dim() != 3 or f.shape[2] != self.full[0]:
            raise ValueError(f"restrict: expected a latent (B, C, {self.full[0]}), got {tuple(f.shape)}")
        return self._apply(self.restrict_ops[k], f)

    resample = restrict

    def prolong(self, h: torch.Tensor, k: int) -> torch.Tensor:
        n = self.schedule.token_counts[k]
        if h.dim() != 3 or h.shape[2] != n:
            raise ValueError(f"prolong: expected a latent (B, C, {n}) for scale {k}, got {tuple(h.shape)}")
        return self._apply(self.prolong_ops[k], h)
