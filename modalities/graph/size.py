"""Node-count conditioned sampling: a ``logits_hook`` that makes every sample an ``N``-node graph.

Level ``k`` of an ``N``-node graph's hierarchy has ``n_k = ceil(N / 2^(K-1-k))`` nodes
(:func:`~modalities.graph.coarsen.level_sizes`), and the split scale ``S_k`` has one token per node
of ``G_k``, so the number of ``PAIR`` / ``PAIR_EDGE`` tokens drawn at ``S_k`` decides ``n_{k+1}``.
Consecutive sizes of one ``N`` satisfy ``n_{k+1} in {2 n_k - 1, 2 n_k}`` (every node of a level splits
except at most one; the top levels of a small ``N`` are one-node levels that stay ``SINGLE``).  The tokens
of one scale are drawn independently, so without a rule two or more nodes of a level can stay
``SINGLE`` (the graph comes out smaller than any training size would give) and a one-node top level
can split (the graph jumps to the next range of sizes).  :class:`NodeCountHook` takes one target
``N`` per sample (GRAN, DiGress and SPECTRE draw it from the training set's node counts first:
:func:`draw_node_counts`) and, at every split scale::

    n = nodes of G_k in the decode state;  m = clip(n_{k+1}(N) - n, 0, n)     # splits needed
    w_u = P(split at u) / P(no split at u)          # the model's odds at temperature T, real nodes u < n
    S ~ P(S) ∝ prod_{u in S} w_u  over the sets of exactly m real nodes      # conditional Bernoulli
    logits: u in S -> only PAIR / PAIR_EDGE kept (msar.sample draws the kind from the model's
            conditional P(PAIR | split), P(PAIR_EDGE | split)); u not in S -> SINGLE only

``P(S)`` is the model's own product distribution over the scale (position ``u`` splits with
probability ``p_u``, independently) conditioned on exactly ``m`` splits: ``prod_{u in S} p_u prod_{u not
in S} (1 - p_u)`` is ``prod_{u in S} w_u`` times a constant.  It is sampled exactly, position by
position: with ``Z(i, r)`` the sum of ``prod w`` over the ``r``-sets of positions ``i..n-1`` (an
elementary symmetric polynomial, computed by ``Z(i, r) = Z(i+1, r) + w_i Z(i+1, r-1)`` in log space),
position ``i`` is taken with probability ``w_i Z(i+1, r-1) / Z(i, r)`` when ``r`` splits are still to
place.  (Gumbel-top-m on ``log p_u`` would instead draw ``m`` positions one after another proportional
to ``p_u`` among those left, a different distribution that flattens the model's preferences as ``m``
approaches ``n``.)  With ``m = n - 1``, the usual case, the one node left ``SINGLE`` is drawn with
probability ``(1 - p_u) / p_u`` over the sum of the same.  "Split" is what the decoder reads as a
split (``PAIR`` or ``PAIR_EDGE``); every other token, PAD and wrong kinds included, reads as
``SINGLE``, so the hook works with or without the valid-token mask before it.

When every split scale goes through the hook, ``n_k`` equals the target at every level: ``G_0`` has one
node, and ``0 <= n_{k+1} - n_k <= n_k`` for consecutive sizes of one ``N``.  At the one-node top
levels of a small ``N``, ``m = 0`` forces ``SINGLE``.  A state that is off target anyway (known tokens from editing,
a hook before this one that changed split tokens) is steered back: ``m`` is clipped to ``[0, n]``, so
the level grows as close to the target as one scale allows; ``stats["off_target"]`` counts such levels.
"""
from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import numpy as np
import torch

from .coarsen import level_sizes
from .tokenizer import PAIR, PAIR_EDGE, SINGLE, GraphDecodeState, GraphPyramidTokenizer
from .triangulation import NO_SPLIT, TriangulationDecodeState, TriangulationTokenizer

_LOG_ODDS_CLIP = 50.0  # keeps a certain (p = 0 or 1) split finite, so an infeasible m still has a solution


def draw_node_counts(graphs: Sequence[nx.Graph] | Sequence[int], num: int, seed: int) -> list[int]:
    """``num`` node counts drawn with replacement from the sizes of ``graphs`` (graphs or ints): the
    training set's empirical distribution of ``N``, reproducible from ``seed``."""
    sizes = [g if isinstance(g, (int, np.integer)) else g.number_of_nodes() for g in graphs]
    if not sizes:
        raise ValueError("draw_node_counts: no graphs to take node counts from")
    rng = np.random.default_rng(int(seed))
    return [int(sizes[i]) for i in rng.integers(0, len(sizes), size=int(num))]


def split_log_odds(x: torch.Tensor, is_split: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` log-odds ``log P(split) - log P(no split)`` of logits ``x`` ``(B, n, V)`` (at the
    temperature already applied), ``is_split`` ``(V,)`` the split tokens; clipped so a certain split stays
    finite."""
    log_odds = (x[..., is_split].logsumexp(-1) - x[..., ~is_split].logsumexp(-1)).nan_to_num(0.0)
    return log_odds.clamp(-_LOG_ODDS_CLIP, _LOG_ODDS_CLIP)


def sample_exactly_m(log_w: torch.Tensor, m: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sets of exactly ``m[b]`` positions with ``P(S) ∝ prod_{i in S} exp(log_w[b, i])`` (conditional
    Bernoulli; see the module docstring).

    Args:
        log_w: ``(B, n)`` log-weights (log-odds); ``-inf`` marks a position that is never taken.
        m: ``(B,)`` set sizes, ``0 <= m[b] <=`` the number of finite weights of row b.
    Returns:
        ``(B, n)`` bool, ``m[b]`` True entries per row.
    """
    B, n = log_w.shape
    m = m.to(torch.long).cpu()
    log_w = log_w.detach().double().cpu()
    finite = torch.isfinite(log_w).sum(1)
    if (m < 0).any() or (m > finite).any():
        b = int(((m < 0) | (m > finite)).nonzero()[0])
        raise ValueError(f"sample_exactly_m: row {b} asks for {int(m[b])} of {int(finite[b])} available positions")
    M = int(m.max()) if B else 0
    ninf = float("-inf")
    # logZ[:, i, r] = log of the sum of prod w over the r-sets of positions i..n-1
    logZ = torch.full((B, n + 1, M + 1), ninf, dtype=torch.float64)
    logZ[:, :, 0] = 0.0
    for i in range(n - 1, -1, -1):
        take = log_w[:, i:i + 1] + logZ[:, i + 1, :-1]
        logZ[:, i, 1:] = torch.logaddexp(logZ[:, i + 1, 1:], take)
    chosen = torch.zeros(B, n, dtype=torch.bool)
    r = m.clone()
    rows = torch.arange(B)
    u = torch.rand(B, n, generator=generator, dtype=torch.float64)
    for i in range(n):
        left = r > 0
        rm1 = (r - 1).clamp_min(0)
        p = torch.exp(log_w[:, i] + logZ[rows, i + 1, rm1] - logZ[rows, i, r]).nan_to_num(0.0)
        pick = left & (u[:, i] < p)
        chosen[:, i] = pick
        r = r - pick.long()
    return chosen


class NodeCountHook:
    """``logits_hook`` for :func:`msar.sample` that makes sample b an ``node_counts[b]``-node graph.

    Args:
        tok: the tokenizer whose decode state the sampler runs.
        node_counts: ``B`` target node counts, each in ``1 .. tok.max_nodes[-1]``
            (e.g. :func:`draw_node_counts` over the training graphs).
        temperature: the temperature of the split probabilities the positions are chosen by (use the
            sampler's; the kind, ``PAIR`` or ``PAIR_EDGE``, is drawn by the sampler at its own).
        seed: seed of the hook's own generator (the same seed and logits choose the same positions).

    At a split scale it chooses which real nodes split (see the module docstring) and returns logits
    with only the split tokens kept at those nodes and only ``SINGLE`` at the others; padding
    positions and edge scales pass through unchanged.  Chain it after the valid-token mask and
    before :class:`~modalities.graph.constraints.StructureHook` / ``EdgeScores``
    (``chain_hooks(mask, size, structure)`` in the demo).  ``stats``: ``scales`` (split scales seen, per
    sample), ``splits`` (positions made to split) and ``off_target`` (levels whose size already
    differed from the target's when their split scale came).
    """

    def __init__(self, tok: GraphPyramidTokenizer, node_counts: Sequence[int], temperature: float = 1.0,
                 seed: int = 0):
        counts = [int(n) for n in node_counts]
        bad = [n for n in counts if not 1 <= n <= tok.max_nodes[-1]]
        if bad:
            raise ValueError(f"node counts must be in 1..{tok.max_nodes[-1]} (the tokenizer's capacity), got {bad[:5]}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.tok, self.node_counts, self.temperature = tok, counts, float(temperature)
        self.targets = [level_sizes(n, tok.K) for n in counts]  # per sample, n_k of every level
        self.generator = torch.Generator().manual_seed(int(seed))
        self.stats = {"scales": 0, "splits": 0, "off_target": 0}

    def __call__(self, k: int, logits: torch.Tensor, state: GraphDecodeState) -> torch.Tensor:
        kind, lvl, _ = self.tok.kinds[k]
        if kind != "S":
            return logits
        if state.B != len(self.node_counts):
            raise ValueError(f"NodeCountHook has {len(self.node_counts)} node counts for a batch of {state.B}")
        B, n_pos, _ = logits.shape
        n = torch.tensor([g.n for g in state.graphs])
        want = torch.tensor([t[lvl + 1] for t in self.targets])
        self.stats["off_target"] += sum(int(g.n != t[lvl]) for g, t in zip(state.graphs, self.targets))
        m = torch.minimum((want - n).clamp_min(0), n)
        x = logits.detach().double().cpu() / self.temperature
        is_split = torch.zeros(x.shape[-1], dtype=torch.bool)
        is_split[[PAIR, PAIR_EDGE]] = True
        log_odds = split_log_odds(x, is_split)
        real = torch.arange(n_pos)[None, :] < n[:, None]
        log_w = log_odds.masked_fill(~real, float("-inf"))
        split = sample_exactly_m(log_w, m, self.generator).to(logits.device)
        real = real.to(logits.device)
        self.stats["scales"] += B
        self.stats["splits"] += int(m.sum())
        out = logits.clone()
        ninf = float("-inf")
        keep = logits[..., [PAIR, PAIR_EDGE]]
        keep = torch.where(torch.isfinite(keep).any(-1, keepdim=True), keep, torch.zeros_like(keep))  # no split
        # token left (a hook before this one banned both): the two kinds are equally likely
        out[split] = ninf
        out[..., [PAIR, PAIR_EDGE]] = torch.where(split[..., None], keep, out[..., [PAIR, PAIR_EDGE]])
        single = real & ~split
        out[single] = ninf
        out[..., SINGLE] = torch.where(single, torch.zeros_like(out[..., SINGLE]), out[..., SINGLE])
        return out


def log_count_weights(log_w: torch.Tensor, M: int) -> torch.Tensor:
    """``(B, M + 1)``: ``log e_j(w)``, the log of the sum of ``prod w`` over the ``j``-sets of a row's
    positions, ``j = 0..M`` (``-inf`` where no such set exists).  For independent positions with odds
    ``w_i = p_i / (1 - p_i)``, ``P(exactly j) ∝ e_j(w)``: the count distribution of the product of
    Bernoullis, which a truncation to a range of counts keeps in proportion."""
    B, n = log_w.shape
    out = torch.full((B, M + 1), float("-inf"), dtype=torch.float64)
    out[:, 0] = 0.0
    for i in range(n):
        out[:, 1:] = torch.logaddexp(out[:, 1:], out[:, :-1] + log_w[:, i:i + 1])
    return out


class TriangulationNodeCountHook:
    """``logits_hook`` for :func:`msar.sample` that grows sample b to ``node_counts[b]`` vertices with a
    :class:`~modalities.graph.triangulation.TriangulationTokenizer`.

    A triangulation's levels have no fixed sizes, so the rule only bounds the count, at every chunk
    scale, in the model's own terms: with ``p_u`` the model's probability that vertex ``u`` splits (at
    ``temperature``; positions that cannot split are left alone), the number of splits ``j`` of the
    chunk is drawn from the model's count distribution (the product of the ``p_u``) truncated to
    ``[lo, hi]``, and the set from the same product conditioned on ``j`` (:func:`sample_exactly_m`)::

        r  = target + 1 - vertices now (the outer vertex counts);  hi = min(r, splittable, room under capacity)
        lo = ceil(r / chunks left in the level) at the tokenizer's last level, else 0

    So no sample passes its target (the model's draws past it are not truncated in chunk order, as the
    capacity rule would), and the last level completes it: a sample the model would stop short of the
    target (a level that grew a lot reads as the last one) gets its missing splits where the model
    finds them least unlikely, spread over the last level's chunks.  Where the last level has too
    few vertices free to split, the sample ends short (``stats["short"]``).  At split positions only
    split tokens stay (the sampler draws the shape from the model's conditional), elsewhere only
    ``NO_SPLIT``.  Chain it after the valid-token mask.

    Args:
        tok: the tokenizer whose decode state the sampler runs.
        node_counts: ``B`` target node counts (the outer vertex not counted), each in
            ``3 .. tok.max_nodes[-1] - 1``, e.g. :func:`draw_node_counts` over the training graphs.
        temperature: the sampler's temperature (the split probabilities the counts and sets follow).
        seed: seed of the hook's own generator.
    """

    def __init__(self, tok: TriangulationTokenizer, node_counts: Sequence[int], temperature: float = 1.0,
                 seed: int = 0):
        counts = [int(n) for n in node_counts]
        bad = [n for n in counts if not 3 <= n <= tok.max_nodes[-1] - 1]
        if bad:
            raise ValueError(f"node counts must be in 3..{tok.max_nodes[-1] - 1} (the tokenizer's capacity without "
                             f"the outer vertex), got {bad[:5]}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.tok, self.node_counts, self.temperature = tok, counts, float(temperature)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.stats = {"scales": 0, "splits": 0, "short": 0}

    def __call__(self, k: int, logits: torch.Tensor, state: TriangulationDecodeState) -> torch.Tensor:
        if not isinstance(state, TriangulationDecodeState) or state.tok is not self.tok:
            raise TypeError("TriangulationNodeCountHook needs a decode state made by its tokenizer's start(), got "
                            f"{type(state).__name__}")
        if state.B != len(self.node_counts):
            raise ValueError(f"TriangulationNodeCountHook has {len(self.node_counts)} node counts for a batch "
                             f"of {state.B}")
        tok = self.tok
        lvl, c = tok.kinds[k]
        V = logits.shape[-1]
        x = logits.detach().double().cpu() / self.temperature
        is_split = torch.zeros(V, dtype=torch.bool)
        is_split[NO_SPLIT + 1:tok.pad_token] = True
        # vertices that may split (the decoder's rule) and that a hook before this one left a split
        can = state.allowed(k).cpu()[..., is_split].any(-1) & torch.isfinite(x[..., is_split]).any(-1)  # (B, n_s)
        log_w = split_log_odds(x, is_split).masked_fill(~can, float("-inf"))
        n = torch.tensor([len(g.rot) for g in state.growers])
        r = (torch.tensor(self.node_counts) + 1 - n).clamp_min(0)
        room = (tok.max_nodes[lvl + 1] - n).clamp_min(0)
        hi = torch.minimum(torch.minimum(r, can.sum(1)), room)
        lo = torch.zeros_like(hi)
        if lvl == tok.K - 2:  # the last level: a fair share of what is missing, in every chunk left
            lo = torch.minimum(-(-r // (tok.chunks - c)), hi)
            if c == tok.chunks - 1:
                self.stats["short"] += int((r > hi).sum())
        logE = log_count_weights(log_w, int(hi.max()) if len(hi) else 0)
        j = torch.arange(logE.shape[1])
        logE = logE.masked_fill((j[None] < lo[:, None]) | (j[None] > hi[:, None]), float("-inf"))
        count = torch.multinomial((logE - logE.max(1, keepdim=True).values).exp(), 1, generator=self.generator)[:, 0]
        split = sample_exactly_m(log_w, count, self.generator).to(logits.device)
        can = can.to(logits.device)
        self.stats["scales"] += state.B
        self.stats["splits"] += int(count.sum())
        is_split = is_split.to(logits.device)
        drop = (split[..., None] & ~is_split) | ((can & ~split)[..., None] & is_split)
        return logits.masked_fill(drop, float("-inf"))


def level_size_report(level_counts: Sequence[Sequence[int]]) -> dict:
    """How far sampled hierarchies are from those of real graphs, from the node counts of every level
    (per sample, coarsest first, as :meth:`GraphPyramidTokenizer.decode_progression` gives them).

    Returns ``consistent`` (share of samples whose levels are exactly ``level_sizes(N, K)`` of their own
    final ``N``: what every encoded graph has) and ``short_levels`` (mean number of expansions per sample
    with ``n_{k+1} < 2 n_k - 1``, i.e. two or more nodes left ``SINGLE``, which no encoded graph has).
    """
    if not level_counts:
        raise ValueError("level_size_report: no samples")
    consistent = short = 0
    for counts in level_counts:
        consistent += list(counts) == level_sizes(counts[-1], len(counts))
        short += sum(b < 2 * a - 1 for a, b in zip(counts, counts[1:]))
    return {"consistent": consistent / len(level_counts), "short_levels": short / len(level_counts)}
