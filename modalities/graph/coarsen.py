"""Deterministic coarsening hierarchy by heavy-edge matching with exact halving.

``coarsen(G)`` returns levels ``G_0 (1 node) ... G_K (= G)`` where every level has
exactly ``ceil(n / 2)`` nodes of the level below it, so the node counts of all
levels depend on ``N`` alone: ``n_k = ceil(N / 2 ** (K - k))``.  That is what lets
a *fixed* transformer schedule (max nodes per level, padded) cover graphs of any size.

One coarsening step (fine -> coarse):

1. heavy-edge matching: visit nodes by (degree, cluster size, id); match each
   unmatched node with the unmatched neighbour of heaviest edge weight (weight =
   number of fine edges between the two clusters), ties to the smaller cluster;
   (``matching="max"``: instead a maximum-cardinality matching of maximum total weight,
   which leaves as few nodes unmatched as possible; ``matching="aligned"``: see below);
2. leftovers (no unmatched neighbour) are paired with each other, preferring a
   leftover two hops away (most common-neighbour weight), until at most one remains.

A leftover pair shares no edge, so its level is not a minor of the graph: with greedy
matching most coarse levels of a planar (Delaunay) graph are not planar; with
``matching="max"`` on the planar training set every level is.

``matching="aligned"`` lines pairs up, so that lattices coarsen into lattices.  Every node of the
graph has a hop distance from one source node (the first of the static order: least degree, then
label, among nodes with an edge; a corner on a grid), every cluster the mean over its nodes.  The
matching visits the nodes of a level by that mean distance, nearest the source first (ties in the
static order), and matches each unmatched node with the unmatched neighbour ranked first by

* *child links* (most first): edges of the level below joining the two clusters' children, i.e.
  the bits of the mask that will say which children are joined;
* *ladder* (most first): formed pairs ``(a, b)`` with ``u ~ a`` and ``v ~ b``, so that
  ``u - a - b - v`` is a 4-cycle and the new pair lies side by side with an old one;
* *triangles* (fewest first): pairs of formed clusters that both touch ``{u, v}`` and touch each
  other, i.e. triangles the new pair would close in the coarse graph;
* then edge weight and the greedy tie-breaks.

The first pair is the nearest node with each of its neighbours in turn, and the matching kept is the
one with the fewest unmatched nodes, then the most child links inside pairs, then the fewest coarse
triangles, then the fewest edges *against the distance order* (an edge whose nearer endpoint falls in
the farther of the two new clusters: the tree order would run backwards along it, as around an
L-shaped cluster wrapped about its neighbour), then the most weight inside pairs.  On a 2-D grid the
first pair is a domino at the source corner; the ladder rule stacks dominoes beside it and the
triangle rule makes the next strip continue in line instead of turning, so an ``r x 2c`` grid
coarsens into an ``r x c`` grid.  Its edges across the dominoes join two child pairs, so the next step
pairs across them: directions alternate, and a ``2^a x 2^b`` grid is a grid at every level.  Because
the visits sweep away from the source, every line of the lattice is paired from its end nearer the
source: where the side to halve is odd, the node left over in each line is the farthest one, and the
leftovers form one row or column at the far side, paired along it.  The level is then a lattice of
rectangular clusters with one strip along its far side.  (Growing the matching from a frontier
instead, first in first out, let fronts from different directions meet with opposite parities and left
interlocking L-shaped clusters wherever a side was odd.)

The two children of an aligned pair are ordered by the same mean distance from the source, nearer
first; a tie keeps
the orientation the matching gave them (like the pairs it lines up with: beside ``(a, b)`` the node
next to ``a`` takes ``a``'s place, in line after it the other place).  On a grid the source is a
corner, so the first child is the one nearer that corner at every level, odd ones included: the
order is the same at every node, whatever the matching did before, and the tree order is a Morton
(Z) order on the regular levels.  Which children of two adjacent clusters are joined then depends
only on the direction of the edge: across the last split (siblings, and clusters whose parents were
joined by one edge) both child pairs, along it one.  (Orienting each pair from its own neighbours
alone, as the matching does, flips whole regions after an odd level: on the test grids of the grid
data set 13% of the finest masks were not the mask their direction predicts, with the distance order
3.6%, and 1.7% since the matching sweeps away from the source; ``benchmarks/graph_mask_proxy.py``.)

So every coarse node has one or two children.  Children are then ordered
top-down (the bigger / higher-degree child first; ``"aligned"``: nearer the source first, see above) which fixes a *tree order* of
the nodes of every level: the children of coarse node 0, then of node 1, ...
The decoder rebuilds the same order from the tokens alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import networkx as nx
import numpy as np


@dataclass
class Level:
    """One level of the hierarchy, nodes in tree order ``0..n-1``.

    ``edges``: sorted list of ``(u, v)`` with ``u < v``.
    ``children``: for each node, its 1 or 2 children in the next finer level (empty at the finest).
    ``size``: number of finest-level nodes under each node.
    """

    n: int
    edges: list[tuple[int, int]]
    children: list[list[int]] = field(default_factory=list)
    size: list[int] = field(default_factory=list)


MATCHINGS = ("greedy", "max", "aligned")


def _match_step(n: int, w: dict[tuple[int, int], int], size: list[int],
                matching: str = "greedy", links: dict[tuple[int, int], int] | None = None,
                near: list[Fraction] | None = None) -> list[list[int]]:
    """One coarsening step on a weighted graph; returns clusters (lists of 1 or 2 fine nodes).
    ``near`` (``matching="aligned"`` only): every node's mean hop distance from the source node."""
    nbrs: list[dict[int, int]] = [dict() for _ in range(n)]
    for (u, v), x in w.items():
        nbrs[u][v] = x
        nbrs[v][u] = x
    order = sorted(range(n), key=lambda u: (len(nbrs[u]), size[u], u))
    mate = [-1] * n
    lead: list[bool | None] = [None] * n  # aligned pairs: whether the node is the first child
    if matching == "max":
        H = nx.Graph()
        H.add_nodes_from(range(n))
        H.add_weighted_edges_from((u, v, x) for (u, v), x in sorted(w.items()))
        for u, v in nx.max_weight_matching(H, maxcardinality=True):
            mate[u], mate[v] = v, u
    if matching == "aligned":
        lk: list[dict[int, int]] = [{} for _ in range(n)]
        for (u, v), x in (links if links is not None else w).items():
            lk[u][v] = lk[v][u] = x
        rank = {u: i for i, u in enumerate(order)}
        sweep = sorted(range(n), key=lambda u: (near[u], rank[u]))  # nearest the source first
        mate, lead = _aligned_matching(nbrs, lk, size, near, sweep)
    for u in order:
        if mate[u] >= 0:
            continue
        cands = [v for v in nbrs[u] if mate[v] < 0 and v != u]
        if cands:
            v = max(cands, key=lambda v: (nbrs[u][v], -size[v], -len(nbrs[v]), -v))
            mate[u], mate[v] = v, u
    leftovers = [u for u in order if mate[u] < 0]
    left = set(leftovers)
    for u in leftovers:  # pair leftovers, two hops away when possible
        if u not in left:
            continue
        left.discard(u)
        if not left:
            break
        two_hop: dict[int, int] = {}
        for a, wa in nbrs[u].items():
            for b, wb in nbrs[a].items():
                if b in left:
                    two_hop[b] = two_hop.get(b, 0) + wa * wb
        if two_hop:
            v = max(two_hop, key=lambda b: (two_hop[b], -size[b], -b))
        else:
            v = next(x for x in leftovers if x in left)
        left.discard(v)
        mate[u], mate[v] = v, u
    clusters, seen = [], set()
    for u in order:
        if u in seen:
            continue
        c = [u] if mate[u] < 0 else [u, mate[u]]
        if matching == "aligned" and len(c) == 2:  # children in order here (coarsen sorts the others)
            if lead[u] is None:  # a leftover pair: coarsen's order (bigger cluster, higher degree first)
                c.sort(key=lambda x: (-size[x], -len(nbrs[x]), x))
            elif not lead[u]:
                c.reverse()
        seen.update(c)
        clusters.append(c)
    return clusters


def _aligned_matching(nbrs: list[dict[int, int]], links: list[dict[int, int]], size: list[int],
                      near: list[Fraction], order: list[int]) -> tuple[list[int], list[bool | None]]:
    """``matching="aligned"``: the mate of every node (``-1``: unmatched) of a maximal matching that
    visits the nodes in ``order`` (nearest the source first), and for every matched node whether it is
    its pair's first child (see the module docstring).  The first pair is tried with every neighbour of
    the first node; the matching kept is the one with the fewest unmatched nodes, then the most child
    links inside pairs, then the fewest coarse triangles, then the fewest edges against the distance
    order, then the most weight inside pairs (:func:`_matching_score`)."""
    seed = next((u for u in order if nbrs[u]), None)
    if seed is None:
        return [-1] * len(nbrs), [None] * len(nbrs)
    best, best_score = None, None
    for first in sorted(nbrs[seed]):
        mate, lead = _grow_aligned(nbrs, links, size, order, (seed, first))
        score = _matching_score(nbrs, links, mate, size, near)
        if best_score is None or score < best_score:
            best, best_score = (mate, lead), score
    return best


def _grow_aligned(nbrs: list[dict[int, int]], links: list[dict[int, int]], size: list[int], order: list[int],
                  first: tuple[int, int]) -> tuple[list[int], list[bool | None]]:
    """A maximal matching that starts with the pair ``first`` and then visits the nodes in ``order``,
    partners ranked by (child links, ladder, -triangles, edge weight, the greedy tie-breaks); and which
    node of each pair is its first child (``lead``), oriented like the pairs it lines up with."""
    mate = [-1] * len(nbrs)
    lead: list[bool | None] = [None] * len(nbrs)

    def touching(c: tuple[int, int]) -> set[int]:
        """Formed pairs (named by their smaller node) next to the nodes ``c``."""
        return {min(a, mate[a]) for x in c for a in nbrs[x] if mate[a] >= 0 and a not in c}

    def adjacent(p: int, q: int) -> bool:
        return any(b in nbrs[a] for a in (p, mate[p]) for b in (q, mate[q]))

    def rank(u: int, v: int) -> tuple:
        ladder = sum(1 for a in nbrs[u] if mate[a] >= 0 and mate[a] in nbrs[v])
        near = sorted(touching((u, v)))
        triangles = sum(adjacent(p, q) for i, p in enumerate(near) for q in near[i + 1:])
        return links[u][v], ladder, -triangles, nbrs[u][v], -size[v], -len(nbrs[v]), -v

    def u_leads(u: int, v: int) -> bool:
        """Orientation of a new pair ``(u, v)``: side by side with a pair ``(a, b)`` (``u ~ a``,
        ``v ~ b``), ``u`` takes ``a``'s place; in line after it (``u ~ a``, nothing else shared),
        ``u`` takes the other place, as the next domino of a row does.  Side by side decides first."""
        beside = inline = 0
        for x, y, sign in ((u, v, 1), (v, u, -1)):  # sign: +1 votes for u first
            for a in nbrs[x]:
                if mate[a] < 0 or a == y:
                    continue
                first_a = 1 if lead[a] else -1
                if mate[a] in nbrs[y]:
                    beside += sign * first_a
                elif a not in nbrs[y] and mate[a] not in nbrs[x]:
                    inline -= sign * first_a
        return (beside or inline or 1) > 0

    visits = iter(order)
    pair: tuple[int, int] | None = first
    while True:
        if pair is None:
            u = next(visits, None)
            if u is None:
                return mate, lead
            if mate[u] >= 0:
                continue
            cands = [v for v in nbrs[u] if mate[v] < 0 and v != u]
            if not cands:
                continue
            pair = (u, max(cands, key=lambda v: rank(u, v)))
        u, v = pair
        lead[u] = pair == first or u_leads(u, v)
        lead[v] = not lead[u]
        mate[u], mate[v] = v, u
        pair = None


def _matching_score(nbrs: list[dict[int, int]], links: list[dict[int, int]], mate: list[int],
                    size: list[int], near: list[Fraction]) -> tuple[int, int, int, int, int]:
    """(unmatched nodes, -child links inside pairs, triangles of the coarse graph, edges against the
    distance order, -weight inside pairs): lower is better.  An edge ``(u, v)`` between two clusters
    is against the distance order when ``u`` is nearer the source than ``v`` (``near``) but its
    cluster is farther than ``v``'s (the clusters' means weighted by ``size``); it counts its weight,
    the number of edges of the finest level it stands for.  Such an edge makes the tree order run
    backwards along it: an L-shaped cluster wrapped around its neighbour."""
    cluster = [min(u, m) if m >= 0 else u for u, m in enumerate(mate)]
    members = [[u] if m < 0 else [u, m] for u, m in enumerate(mate)]
    mean = [sum(near[x] * size[x] for x in members[c]) / sum(size[x] for x in members[c]) for c in cluster]
    coarse: dict[int, set[int]] = {}
    inside = inside_links = backwards = 0
    for u, nb in enumerate(nbrs):
        for v, x in nb.items():
            a, b = cluster[u], cluster[v]
            if a != b:
                coarse.setdefault(a, set()).add(b)
                if u < v and (near[u] - near[v]) * (mean[u] - mean[v]) < 0:
                    backwards += x
            elif u < v:
                inside += x
                inside_links += links[u][v]
    triangles = sum(len(coarse[a] & coarse.get(b, set())) for a in coarse for b in coarse[a] if a < b) // 3
    return sum(m < 0 for m in mate), -inside_links, triangles, backwards, -inside


def _source_distances(G: nx.Graph) -> list[int]:
    """``matching="aligned"``: every node's hop distance from one source node of ``G`` (the first of
    the static order: least degree, then label, among nodes with an edge; unreachable nodes count as
    one hop past the farthest).  A cluster's mean over its nodes (an exact fraction, so that equal
    means tie instead of differing by a rounding) orders the matching's visits and the children."""
    src = min((u for u in G if G.degree(u) > 0), key=lambda u: (G.degree(u), u), default=0)
    dist = nx.single_source_shortest_path_length(G, src)
    far = max(dist.values()) + 1
    return [dist.get(u, far) for u in range(G.number_of_nodes())]


def coarsen(G: nx.Graph, num_levels: int | None = None, matching: str = "greedy") -> list[Level]:
    """Hierarchy ``[G_0, ..., G_K]`` of a simple undirected graph, coarsest first, all in tree order.

    ``num_levels``: pad the top with one-node levels to this many levels (must be at
    least ``ceil(log2 N) + 1``).  The finest level is isomorphic to ``G``.
    ``matching``: ``"greedy"`` heavy-edge matching, ``"max"`` (maximum-cardinality matching
    of maximum weight; fewer leftover pairs, so more levels are minors of ``G``) or ``"aligned"``
    (a matching grown from a frontier that lines pairs up side by side and in line, alternating
    direction, so that a grid's levels are grids; see the module docstring).
    """
    if matching not in MATCHINGS:
        raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
    G = nx.convert_node_labels_to_integers(nx.Graph(G))
    G.remove_edges_from(nx.selfloop_edges(G))
    N = G.number_of_nodes()
    if N == 0:
        raise ValueError("cannot coarsen an empty graph (0 nodes)")
    # ---- bottom-up: clusters of every step, in the fine level's original labels
    w = {(min(u, v), max(u, v)): 1 for u, v in G.edges()}
    links = dict(w)  # per edge: the edges of the level below it joining its two clusters
    n, size = N, [1] * N
    steps: list[list[list[int]]] = []  # steps[t] clusters of level t (fine ids of level t)
    level_w = [w]
    if matching == "aligned":  # total distance from the source of every cluster's nodes, per level
        total = _source_distances(G)
        reach = [[Fraction(x) for x in total]]
    while n > 1:
        clusters = _match_step(n, w, size, matching, links, reach[-1] if matching == "aligned" else None)
        assign = np.empty(n, dtype=np.int64)
        for c, members in enumerate(clusters):
            assign[members] = c
        nw: dict[tuple[int, int], int] = {}
        links = {}
        for (u, v), x in w.items():
            a, b = int(assign[u]), int(assign[v])
            if a != b:
                key = (min(a, b), max(a, b))
                nw[key] = nw.get(key, 0) + x
                links[key] = links.get(key, 0) + 1
        size = [sum(size[m] for m in members) for members in clusters]
        if matching == "aligned":
            total = [sum(total[m] for m in members) for members in clusters]
            reach.append([Fraction(x, s) for x, s in zip(total, size)])
        steps.append(clusters)
        w, n = nw, len(clusters)
        level_w.append(w)
    depth = len(steps) + 1
    if num_levels is None:
        num_levels = depth
    if num_levels < depth:
        raise ValueError(f"a graph with {N} nodes needs {depth} levels, the hierarchy allows {num_levels}")

    # ---- top-down: tree order. ids[t] maps tree position -> label at bottom-up level t
    # bottom-up level t=0 is the graph, t=len(steps) is the single root
    sizes_bu = [[1] * N]
    for clusters in steps:
        sizes_bu.append([sum(sizes_bu[-1][m] for m in c) for c in clusters])
    deg_bu = []
    for t, wt in enumerate(level_w):
        d = [0] * (len(sizes_bu[t]))
        for (u, v) in wt:
            d[u] += 1
            d[v] += 1
        deg_bu.append(d)
    T = len(steps)
    order = [0]  # tree order of the root level, as bottom-up labels
    levels: list[Level] = []
    for t in range(T, -1, -1):
        pos = {lab: i for i, lab in enumerate(order)}
        edges = sorted((min(pos[u], pos[v]), max(pos[u], pos[v])) for (u, v) in level_w[t])
        lvl = Level(n=len(order), edges=edges, size=[sizes_bu[t][lab] for lab in order])
        if t > 0:
            nxt, children = [], []
            for lab in order:
                kids = (sorted(steps[t - 1][lab], key=lambda c: reach[t - 1][c]) if matching == "aligned" else  # stable
                        sorted(steps[t - 1][lab], key=lambda c: (-sizes_bu[t - 1][c], -deg_bu[t - 1][c], c)))
                children.append(list(range(len(nxt), len(nxt) + len(kids))))
                nxt.extend(kids)
            lvl.children = children
            order = nxt
        levels.append(lvl)
    # ---- pad the top with single-node levels
    while len(levels) < num_levels:
        levels.insert(0, Level(n=1, edges=[], children=[[0]], size=[N]))
    return levels


def num_levels_for(n: int) -> int:
    """Levels of the halving hierarchy of an ``n``-node graph: ``ceil(log2 n) + 1``."""
    return int(np.ceil(np.log2(max(n, 1)))) + 1


def level_sizes(n: int, num_levels: int) -> list[int]:
    """Node counts of the ``num_levels`` levels of an ``n``-node graph's hierarchy, coarsest first:
    ``ceil(n / 2^(num_levels - 1 - k))`` (exact halving; the top levels of a small graph have one node)."""
    if n < 1 or num_levels < num_levels_for(n):
        raise ValueError(f"level_sizes: an {n}-node graph needs n >= 1 and at least {num_levels_for(max(n, 1))} "
                         f"levels, got {num_levels}")
    return [-(-n // 2 ** (num_levels - 1 - k)) for k in range(num_levels)]


def assignments(levels: list[Level]) -> list[np.ndarray]:
    """Per level, the cluster of every finest-level node: ``(N,)`` int arrays, coarsest first
    (the input of :meth:`msar.OperatorPyramid.from_assignments`)."""
    N = levels[-1].n
    out = [np.arange(N)]
    for lvl in reversed(levels[:-1]):
        parent = np.empty(sum(len(c) for c in lvl.children), dtype=np.int64)
        for p, kids in enumerate(lvl.children):
            parent[kids] = p
        out.append(parent[out[-1]])
    return out[::-1]


def level_graph(level: Level) -> nx.Graph:
    G = nx.Graph()
    G.add_nodes_from(range(level.n))
    G.add_edges_from(level.edges)
    return G
