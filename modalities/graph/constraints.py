"""Structure-constrained sampling: a ``logits_hook`` that keeps every partial graph inside a property.

The valid-token hook (:meth:`GraphPyramidTokenizer.valid_token_hook`) only masks tokens the decoder
would reinterpret; it knows nothing about planarity or lattices.  :class:`StructureHook` adds a
*hereditary* property (one that survives deleting edges: planar, maximum degree, bipartite) and
enforces it while the edge tokens are drawn::

    for every edge scale E_k^c, for every real position p (coarse edge (u, v)), in order:
        P(mask) = softmax(logits[p] / T) over the valid masks            # the model's distribution
        repeat: draw mask ~ P; G' = fine graph so far + the child pairs the mask names
                if prop(G') holds: keep the mask, G = G'; break
                else: P(mask) = 0, renormalise                           # rejection = exact conditioning
        if no mask is left: PAD (the decoder drops the coarse edge; deleting edges keeps prop)
    return logits that are 0 at the drawn token and -inf elsewhere      # msar.sample then takes it

Tokens of one scale are drawn one position after the other, each knowing the edges that the
earlier positions of the same scale added; the model's logits of a scale are still computed in
one parallel pass, so this conditions the model's per-position distributions on validity, it does
not make the model itself sequential.  Split scales (``S_k``) only get the valid-token mask.

``planar`` and ``grid`` check the finest level only.  With the default greedy matching the coarser
levels of a planar graph need not be planar: the coarsening pairs leftover nodes that share no
edge, so a coarse level is not a minor of the graph (on the planar training set, 47-59 of 60
graphs have a non-planar level 3, 4 or 5), and lattice properties (degree <= 4, bipartite) do not
survive contraction at all.  With ``matching="max"`` every level of the planar training graphs is
planar, and ``planar_levels`` keeps every level planar as it is built.

The hook draws with its own generator (``seed``), temperature and ``top_p``, so pass the sampler's
here; ``msar.sample``'s own ``top_k`` / ``top_p`` do not reach the edge tokens it draws.  With ``top_p``
the draws come from the nucleus first (msar's top-p), and only when every mask of the nucleus breaks the
property from the rest of the valid masks: top-p is a preference, the property a constraint.

Completion (:meth:`StructureHook.complete`, after sampling).  Rejection keeps a planar *subgraph* of
the model's proposal, and the proposals of the finest level are far from planar-consistent, so the
kept graphs are sparse.  While drawing the finest level the hook records the model's probability of
every candidate fine edge: for a child pair of a coarse edge, the probability that its mask names
the pair, ``P(bit) = sum of P(mask) over the masks with that bit``; for the two children of a split
node, ``P(PAIR_EDGE) / (P(PAIR) + P(PAIR_EDGE))``.  ``complete`` then adds the candidates that are
not in the graph, most probable first, wherever the property still holds::

    for (a, c) in candidates, by P(a, c) descending:
        if (a, c) not in G and prop(G + (a, c), final=True): G = G + (a, c)

so the result is a maximal graph with the property among the pairs the hierarchy allows.

Projection (:class:`EdgeScores`, :func:`project_graph`), the same rule without the hook: sample the
model with the valid-token mask only, recording the same probabilities, then keep the sample's own
finest-level edges most probable first wherever the property holds and complete as above::

    H = empty graph on G's nodes
    for (a, c) in edges of G, by P descending:  if prop(H + (a, c)): H = H + (a, c)   # projection
    for (a, c) in candidates, by P descending:  if prop(H + (a, c)): H = H + (a, c)   # completion

Coarser levels are the model's own sample.  Completion and projection are deterministic decoding
rules on top of the model's probabilities, not samples of the model: report them apart from the
hook's own samples and from the raw ones.

Degree-keeping projection (:func:`project_graph_degrees`, ``EdgeScores.project(..., rule="degrees")``).
The projection above drops the edges that lose planarity conflicts, and those concentrate on a few
nodes: each ends up joined to the three corners of the triangle it sits in (degree 3), while
completion gives the freed candidates to neighbours that already have their edges (hubs).  This
rule keeps every node near the degree ``t(x)`` it has in the model's sample ``G``::

    H = G's edges, most probable first, where prop holds                      # as projection
    for need in (both endpoints below t, one endpoint below t, none):         # completion, deficits first
        for (a, c) in candidates, by P descending:
            if need holds for (a, c) and prop(H + (a, c)): H = H + (a, c)
    repeat until no flip is accepted:                                         # degree repair
        for (p, q) in H, x and r common neighbours of p and q, (x, r) a candidate not in H:
            H' = H - (p, q) + (x, r)          # an edge flip: same edge count, (x, r) the model proposed
            accept the flip lowering sum_x (deg_H(x) - t(x))^2 most, if prop(H')

Every edge of the result is one the model gave probability to (an edge of the sample or a
candidate), and the flips keep the edge count of the completed graph.
"""
from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import torch

from msar.sampling import filter_top_k_top_p

from .tokenizer import EDGE0, PAD, PAIR, PAIR_EDGE, GraphDecodeState, GraphPyramidTokenizer

# prop(G, final) -> bool: G is the partial fine graph of the level being built, final says whether
# it is the graph's last level.  Must be hereditary: true for G stays true after deleting edges.
Property = Callable[[nx.Graph, bool], bool]


def planar_property(G: nx.Graph, final: bool) -> bool:
    """Planar on the finest level. Coarser levels are not checked: they are not minors of the graph
    (leftover nodes are paired without an edge between them), and most are not planar."""
    return not final or nx.check_planarity(G)[0]


def planar_levels_property(G: nx.Graph, final: bool) -> bool:
    """Planar on every level, for hierarchies whose levels are planar (``matching="max"``)."""
    return nx.check_planarity(G)[0]


def grid_property(G: nx.Graph, final: bool) -> bool:
    """On the finest level: maximum degree 4, bipartite (no odd cycle) and planar, as every 2-D grid
    is. Necessary conditions for a grid, not sufficient; coarser levels are not checked."""
    if not final:
        return True
    return (max((d for _, d in G.degree()), default=0) <= 4 and nx.is_bipartite(G)
            and nx.check_planarity(G)[0])


PROPERTIES: dict[str, Property] = {"planar": planar_property, "planar_levels": planar_levels_property,
                                   "grid": grid_property}

def _property(prop: Property | str) -> Property:
    if isinstance(prop, str):
        if prop not in PROPERTIES:
            raise ValueError(f"unknown structure property {prop!r}; expected one of {sorted(PROPERTIES)}")
        return PROPERTIES[prop]
    return prop


# _MASK_BITS[m - 1, q] = 1 if mask m (1..15) names child pair q = 2 * i + j
_MASK_BITS = torch.tensor([[(m >> q) & 1 for q in range(4)] for m in range(1, 16)], dtype=torch.float32)


def _by_probability(scores: dict[tuple[int, int], float]) -> list[tuple[int, int]]:
    """Candidate pairs, most probable first (ties: by pair, so the order is deterministic)."""
    return [e for e, _ in sorted(scores.items(), key=lambda item: (-item[1], item[0]))]


def complete_graph(G: nx.Graph, scores: dict[tuple[int, int], float], prop: Property) -> tuple[nx.Graph, int]:
    """Add the candidate edges ``scores`` (pair -> probability) missing from ``G``, most probable first,
    each only if ``prop(G, True)`` still holds; returns the new graph and the number of edges added.
    For a hereditary ``prop`` that ``G`` satisfies, the result is maximal: no candidate left out can
    be added."""
    H, added = G.copy(), 0
    for a, c in _by_probability(scores):
        if a == c or H.has_edge(a, c) or not (H.has_node(a) and H.has_node(c)):
            continue
        H.add_edge(a, c)
        if prop(H, True):
            added += 1
        else:
            H.remove_edge(a, c)
    return H, added


def _pair(a: int, c: int) -> tuple[int, int]:
    """An undirected pair as :class:`EdgeScores` keys it, ``(a, c)`` with ``a < c``."""
    return (a, c) if a < c else (c, a)


def keep_own_edges(G: nx.Graph, scores: dict[tuple[int, int], float], prop: Property) -> tuple[nx.Graph, int]:
    """``G``'s nodes with ``G``'s own edges added most probable first wherever ``prop`` holds (the first
    step of every projection); returns the graph and the number of edges kept."""
    H = nx.Graph()
    H.add_nodes_from(G.nodes())
    return complete_graph(H, {_pair(a, c): scores.get(_pair(a, c), 0.0) for a, c in G.edges()}, prop)


def project_graph(G: nx.Graph, scores: dict[tuple[int, int], float], prop: Property) -> tuple[nx.Graph, int, int]:
    """The largest-probability-first graph with the property inside ``G`` and its candidates: ``G``'s own
    edges are kept most probable first wherever ``prop`` holds, then the other candidates are added the
    same way (:func:`complete_graph`). Returns the graph, the edges of ``G`` dropped and the edges added."""
    H, kept = keep_own_edges(G, scores, prop)
    H, added = complete_graph(H, scores, prop)
    return H, G.number_of_edges() - kept, added


def flip_to_degrees(H: nx.Graph, scores: dict[tuple[int, int], float], target: dict[int, int], prop: Property,
                    max_rounds: int = 10) -> tuple[nx.Graph, int]:
    """Edge flips ``(p, q) -> (x, r)`` (``x``, ``r`` common neighbours of ``p`` and ``q``, ``(x, r)`` a candidate
    of ``scores`` not in ``H``; pairs ``a < c`` as :class:`EdgeScores` records them) that lower
    ``sum over nodes v of (deg(v) - target[v])^2``. Per edge, the flip with the largest decrease (ties: the
    more probable candidate) is made if ``prop`` still holds, otherwise the edge stays. Sweeps the edges until
    a sweep accepts no flip, at most ``max_rounds`` times. Returns a new graph and the number of flips."""
    H, flips = H.copy(), 0

    def cost_change(x: int, step: int) -> int:  # change of (deg(x) - t(x))^2 when deg(x) moves by step
        d = H.degree(x) - target[x]
        return (d + step) ** 2 - d ** 2

    for _ in range(max_rounds):
        accepted = 0
        for p, q in sorted(H.edges()):
            if not H.has_edge(p, q):  # flipped away earlier in this sweep
                continue
            common = sorted(set(H[p]) & set(H[q]))
            drop = cost_change(p, -1) + cost_change(q, -1)
            best = None
            for i, x in enumerate(common):
                for r in common[i + 1:]:
                    s = scores.get((x, r), 0.0)
                    if s <= 0 or H.has_edge(x, r):
                        continue
                    gain = -(drop + cost_change(x, 1) + cost_change(r, 1))
                    if gain > 0 and (best is None or (gain, s) > best[0]):
                        best = ((gain, s), x, r)
            if best is None:
                continue
            _, x, r = best
            H.remove_edge(p, q)
            H.add_edge(x, r)
            if prop(H, True):
                accepted += 1
            else:
                H.remove_edge(x, r)
                H.add_edge(p, q)
        flips += accepted
        if not accepted:
            break
    return H, flips


def project_graph_degrees(G: nx.Graph, scores: dict[tuple[int, int], float],
                          prop: Property) -> tuple[nx.Graph, int, int]:
    """Projection that keeps every node near its degree in ``G`` (the module docstring's degree-keeping
    rule): ``G``'s edges most probable first where ``prop`` holds, then the candidates of ``scores`` whose
    endpoints are both below their degree in ``G``, then those with one such endpoint, then the rest (each
    pass most probable first, each edge only if ``prop`` holds), then :func:`flip_to_degrees`. Returns the
    graph, the edges of ``G`` it lacks and the edges it has that ``G`` lacks."""
    target = dict(G.degree())
    H, _ = keep_own_edges(G, scores, prop)
    ranked = [(a, c) for a, c in _by_probability(scores) if a != c and H.has_node(a) and H.has_node(c)]
    for need in (2, 1, 0):  # endpoints that must be below their target degree
        for a, c in ranked:
            if H.has_edge(a, c) or (H.degree(a) < target[a]) + (H.degree(c) < target[c]) < need:
                continue
            H.add_edge(a, c)
            if not prop(H, True):
                H.remove_edge(a, c)
    H, _ = flip_to_degrees(H, scores, target, prop)
    own = {_pair(a, c) for a, c in G.edges()}
    have = {_pair(a, c) for a, c in H.edges()}
    return H, len(own - have), len(have - own)


# name -> rule(G, scores, prop) -> (projected graph, edges of G dropped, edges added)
PROJECTIONS = {"greedy": project_graph, "degrees": project_graph_degrees}


def count_projection(stats: dict[str, int], sample: nx.Graph, dropped: int, added: int) -> None:
    """Add one projection result (:data:`PROJECTIONS`) to ``stats``: ``kept`` / ``dropped`` (edges of the
    sample) and ``added`` (candidates)."""
    for key, v in (("kept", sample.number_of_edges() - dropped), ("dropped", dropped), ("added", added)):
        stats[key] = stats.get(key, 0) + v


class EdgeScores:
    """``logits_hook`` (the valid-token mask, nothing else) that records the model's probability of every
    candidate edge of the finest level: ``scores[b][(a, c)]`` for fine nodes ``a < c`` of sample b.

    A child pair of a coarse edge gets ``P(bit) = sum of P(mask) over the masks naming it``, the two
    children of a split node ``P(PAIR_EDGE) / (P(PAIR) + P(PAIR_EDGE))``; probabilities at
    ``temperature`` over the valid tokens, from the logits the sampler sees.
    """

    def __init__(self, tok: GraphPyramidTokenizer, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.tok, self.temperature = tok, float(temperature)
        self.scores: list[dict[tuple[int, int], float]] = []
        self._join: list[list[float]] = []  # per sample, per node of G_{K-2}: P(its two children are joined)

    def __call__(self, k: int, logits: torch.Tensor, state: GraphDecodeState) -> torch.Tensor:
        logits = self.tok.valid_token_hook(k, logits, state)  # also checks the state belongs to tok
        kind, lvl, chunk = self.tok.kinds[k]
        if lvl + 1 != self.tok.K - 1:
            return logits
        probs = (logits.detach().float().cpu() / self.temperature).softmax(-1)  # (B, n, V), 0 on invalid
        if kind == "S":
            self._join = [(probs[b, :g.n, PAIR_EDGE] / (probs[b, :g.n, PAIR] + probs[b, :g.n, PAIR_EDGE])
                           .clamp_min(1e-12)).tolist() for b, g in enumerate(state.graphs)]
            self.scores = [{} for _ in state.graphs]
            return logits
        C = self.tok.chunks_at(lvl)
        for b, g in enumerate(state.graphs):
            kids = state.children[b]
            if chunk == 0:  # the split pairs are candidates too
                for u, ks in enumerate(kids):
                    if len(ks) == 2:
                        self.scores[b][(ks[0], ks[1])] = self._join[b][u]
            for p, j in enumerate(range(chunk, len(g.edges), C)):
                if p >= probs.shape[1]:
                    break
                u, v = g.edges[j]
                marg = probs[b, p, EDGE0:PAD] @ _MASK_BITS  # (4,): P(child pair 2 * i + j is joined)
                for i, a in enumerate(kids[u]):
                    for jj, c in enumerate(kids[v]):
                        self.scores[b][_pair(a, c)] = float(marg[2 * i + jj])
        return logits

    def project(self, graphs: list[nx.Graph], prop: Property | str,
                rule: str = "greedy") -> tuple[list[nx.Graph], dict[str, int]]:
        """The projection ``rule`` (:data:`PROJECTIONS`: ``"greedy"`` = :func:`project_graph`, ``"degrees"`` =
        :func:`project_graph_degrees`) of every sampled graph of this hook's batch; returns the graphs and
        the total ``kept`` / ``dropped`` (edges of the samples) and ``added`` (candidates) counts."""
        out, stats = [], {"kept": 0, "dropped": 0, "added": 0}
        for G, (H, dropped, added) in zip(graphs, self.project_each(graphs, prop, rule)):
            count_projection(stats, G, dropped, added)
            out.append(H)
        return out, stats

    def project_each(self, graphs: list[nx.Graph], prop: Property | str,
                     rule: str = "greedy") -> list[tuple[nx.Graph, int, int]]:
        """Per sampled graph of this hook's batch, the projection ``rule``'s ``(graph, dropped, added)``."""
        prop = _property(prop)
        if rule not in PROJECTIONS:
            raise ValueError(f"unknown projection rule {rule!r}; expected one of {sorted(PROJECTIONS)}")
        if len(graphs) != len(self.scores):
            raise ValueError(f"project: {len(graphs)} graphs, but the hook recorded the finest level of "
                             f"{len(self.scores)} samples (call it on the batch this hook sampled)")
        return [PROJECTIONS[rule](G, sc, prop) for G, sc in zip(graphs, self.scores)]


class StructureHook:
    """``logits_hook`` for :func:`msar.sample` drawing edge tokens under a hereditary property.

    Args:
        tok: the tokenizer whose decode state the sampler runs.
        prop: ``prop(G, final) -> bool`` (see :data:`PROPERTIES`), or its name ``"planar"`` / ``"grid"``.
        temperature: the temperature the edge tokens are drawn at (use the sampler's).
        seed: seed of the hook's own generator (the same seed and logits give the same tokens).
        top_p: nucleus of the edge tokens tried first (use the sampler's; ``0``: off).

    ``stats`` counts, over real edge positions: ``positions``, ``rejected`` (draws undone because
    they broke the property) and ``dropped`` (positions where every valid mask broke it, so the
    coarse edge was dropped); :meth:`complete` adds ``completed`` (edges it added).
    ``scores[b]`` holds, once the finest level has been drawn, the model's probability of every
    candidate fine edge of sample b (see the module docstring).
    """

    def __init__(self, tok: GraphPyramidTokenizer, prop: Property | str, temperature: float = 1.0,
                 seed: int = 0, top_p: float = 0.0):
        prop = _property(prop)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        self.tok, self.prop, self.temperature, self.top_p = tok, prop, float(temperature), float(top_p)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.stats = {"positions": 0, "rejected": 0, "dropped": 0}
        self.recorder = EdgeScores(tok, temperature)

    @property
    def scores(self) -> list[dict[tuple[int, int], float]]:
        return self.recorder.scores

    def __call__(self, k: int, logits: torch.Tensor, state: GraphDecodeState) -> torch.Tensor:
        logits = self.recorder(k, logits, state)  # valid-token mask (checks the state belongs to tok), scores
        kind, lvl, chunk = self.tok.kinds[k]
        final = lvl + 1 == self.tok.K - 1
        if kind == "S":
            return logits
        x = logits.detach().float().cpu() / self.temperature
        probs = x.softmax(-1)  # (B, n, V), 0 on invalid
        nucleus = filter_top_k_top_p(x, top_p=self.top_p).softmax(-1) if 0 < self.top_p < 1 else probs
        chosen = torch.full(logits.shape[:2], PAD, dtype=torch.long)
        C = self.tok.chunks_at(lvl)
        for b, g in enumerate(state.graphs):
            kids = state.children[b]
            G = nx.Graph()
            G.add_nodes_from(range(sum(len(c) for c in kids)))
            G.add_edges_from(state.fine[b])
            for p, j in enumerate(range(chunk, len(g.edges), C)):
                if p >= chosen.shape[1]:
                    break
                u, v = g.edges[j]
                chosen[b, p] = self._draw(G, nucleus[b, p].clone(), probs[b, p].clone(), kids[u], kids[v], final)
        out = torch.full_like(logits, float("-inf"))
        return out.scatter_(-1, chosen.unsqueeze(-1).to(logits.device), 0.0)

    def complete(self, graphs: list[nx.Graph]) -> list[nx.Graph]:
        """The sampled ``graphs`` (this hook's batch, in order) with the missing candidate edges of the
        finest level added, most probable first, wherever the property holds (:func:`complete_graph`)."""
        if len(graphs) != len(self.scores):
            raise ValueError(f"complete: {len(graphs)} graphs, but the hook recorded the finest level of "
                             f"{len(self.scores)} samples (call it on the batch this hook sampled)")
        out = []
        for G, sc in zip(graphs, self.scores):
            H, added = complete_graph(G, sc, self.prop)
            self.stats["completed"] = self.stats.get("completed", 0) + added
            out.append(H)
        return out

    def _draw(self, G: nx.Graph, first: torch.Tensor, p: torch.Tensor, ku: list[int], kv: list[int],
              final: bool) -> int:
        """Draw one edge token whose child pairs keep ``prop`` from ``first`` (V,), then, when all of those
        break it, from the rest of ``p`` (V,); add its pairs to ``G``."""
        self.stats["positions"] += 1
        tried = torch.zeros_like(p, dtype=torch.bool)
        tried[PAD] = True
        for q in (first, p):
            q = q.masked_fill(tried, 0.0)
            while q.sum() > 0:
                t = int(torch.multinomial(q, 1, generator=self.generator))
                mask = t - EDGE0 + 1
                new = [(a, c) for i, a in enumerate(ku) for jj, c in enumerate(kv)
                       if mask >> (2 * i + jj) & 1 and not G.has_edge(a, c)]
                G.add_edges_from(new)
                if self.prop(G, final):
                    return t
                G.remove_edges_from(new)
                self.stats["rejected"] += 1
                q[t] = 0.0
                tried[t] = True
        self.stats["dropped"] += 1
        return PAD
