"""Triangulated discs as rotation systems: the hierarchy of the planar tokenizer.

A *triangulated disc* is a planar graph whose bounded faces are all triangles and whose outer face
is bounded by a simple cycle (the Delaunay graphs of the ``planar`` data set are; so is any
triangle mesh of a disc).  Joining one extra vertex, ``INF``, to every vertex of the outer cycle
turns it into a triangulation of the sphere, which a *rotation system* describes exactly: for every
vertex, its neighbours in clockwise order.

Two local operations move between triangulations and keep every face a triangle:

* **vertex split** (coarse -> fine): vertex ``v`` with clockwise neighbours ``r`` splits along two of
  them, ``u = r[i]`` and ``w = r[i + m]``: a new vertex ``v'`` takes the neighbours ``r[i + 1] ..
  r[i + m - 1]`` strictly between them, and joins ``u``, ``w`` and ``v``.  Any split with
  ``1 <= m <= deg(v) - 1`` gives a triangulation again, so *every* sequence of splits of the
  4-vertex tetrahedron is a triangulated sphere, and removing ``INF`` a triangulated disc: planar
  by construction.
* **edge contraction** (fine -> coarse), its inverse: ``(a, b)`` merges into ``a``; allowed when ``a`` and
  ``b`` have exactly two common neighbours (the two triangles on the edge), so no edge doubles.

:func:`contraction_hierarchy` coarsens a sphere triangulation down to the tetrahedron, each level
contracting an *independent* set of edges (no edge joins two contracted pairs, none touches
``INF``), so the splits of one level commute; :class:`TriangulationTokenizer` predicts them in a
few chunk scales per level.
"""
from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch

from msar import PretrainedMixin, ScaleSchedule
from msar.sampling import filter_top_k_top_p

from .datasets import graphs_from, to_data
from .tokenizer import _bits  # the same tree-order bits as the coarsening tokenizer's

INF = -1  # label of the added vertex in a graph's own labels (decoded triangulations use id 0)


class NotATriangulatedDisc(ValueError):
    """The graph is not a triangulated disc (see the module docstring)."""


class Rotation:
    """A triangulation of the sphere as a rotation system: ``rot[v]`` = neighbours of ``v``, clockwise.

    Vertex ids are arbitrary hashables; :meth:`split` and :meth:`contract` keep the system a
    triangulation (checked by :meth:`check` in the tests, not on every step).
    """

    def __init__(self, rot: dict):
        self.rot = {v: list(nb) for v, nb in rot.items()}

    def copy(self) -> "Rotation":
        return Rotation(self.rot)

    def __len__(self) -> int:
        return len(self.rot)

    def degree(self, v) -> int:
        return len(self.rot[v])

    def edges(self) -> list[tuple]:
        return [(u, v) for u, nb in self.rot.items() for v in nb if _key(u) < _key(v)]

    def graph(self, drop=None) -> nx.Graph:
        """The graph (``drop``: a vertex to leave out, e.g. ``INF``)."""
        G = nx.Graph()
        G.add_nodes_from(v for v in self.rot if v != drop)
        G.add_edges_from((u, v) for u, v in self.edges() if drop not in (u, v))
        return G

    def split(self, v, new, i: int, m: int) -> None:
        """Split ``v``: the new vertex ``new`` takes the neighbours strictly between ``r[i]`` and
        ``r[i + m]`` (clockwise, indices mod ``deg(v)``) and joins both of those and ``v``."""
        r = self.rot[v]
        d = len(r)
        if not (0 <= i < d and 1 <= m <= d - 1):
            raise ValueError(f"split of a degree-{d} vertex needs 0 <= i < {d} and 1 <= m <= {d - 1}, got i={i}, m={m}")
        arc = [r[(i + j) % d] for j in range(m + 1)]  # u ... w, clockwise
        u, w = arc[0], arc[-1]
        self.rot[new] = arc + [v]
        self.rot[v] = [r[(i + m + j) % d] for j in range(d - m + 1)] + [new]  # w ... u, then new
        for x in arc[1:-1]:
            rx = self.rot[x]
            rx[rx.index(v)] = new
        # u: ``new`` goes between v and the arc's next vertex; w: between v and the arc's previous one
        _insert_between(self.rot[u], v, arc[1], new)
        _insert_between(self.rot[w], v, arc[-2], new)

    def contract(self, a, b) -> tuple:
        """Merge ``b`` into ``a`` (the inverse of a split of ``a``); returns ``(u, m)``: the split of
        ``a`` that undoes it starts at neighbour ``u`` and spans ``m`` steps clockwise."""
        rb = self.rot[b]
        d = len(rb)
        j = rb.index(a)
        arc = [rb[(j + 1 + t) % d] for t in range(d - 1)]  # u ... w, clockwise around b
        u, w = arc[0], arc[-1]
        ra = self.rot[a]
        k = ra.index(b)
        self.rot[a] = ra[:k] + arc[1:-1] + ra[k + 1:]
        for x in arc[1:-1]:
            rx = self.rot[x]
            rx[rx.index(b)] = a
        self.rot[u].remove(b)
        self.rot[w].remove(b)
        del self.rot[b]
        return u, d - 2

    def check(self) -> None:
        """Raise if this is not a triangulation of the sphere (symmetric, simple, every face a triangle,
        Euler characteristic 2)."""
        n = len(self.rot)
        half = set()
        for v, nb in self.rot.items():
            if len(set(nb)) != len(nb) or v in nb or len(nb) < 3:
                raise AssertionError(f"vertex {v}: bad neighbour list {nb}")
            for x in nb:
                if v not in self.rot[x]:
                    raise AssertionError(f"edge {v}-{x} only one way")
                half.add((v, x))
        faces = 0
        seen = set()
        for start in half:
            if start in seen:
                continue
            faces += 1
            length = 0
            e = start
            while e not in seen:
                seen.add(e)
                x, y = e
                ry = self.rot[y]
                e = (y, ry[(ry.index(x) + 1) % len(ry)])  # the next half-edge of the face
                length += 1
            if length != 3:
                raise AssertionError(f"a face of length {length}")
        if n - len(half) // 2 + faces != 2:
            raise AssertionError("Euler characteristic is not 2")


def _key(v):
    return (0, v) if isinstance(v, int) else (1, str(v))


def _insert_between(r: list, a, b, x) -> None:
    """Insert ``x`` between the cyclically adjacent entries ``a`` and ``b`` of ``r``."""
    ia, ib = r.index(a), r.index(b)
    d = len(r)
    if (ia + 1) % d == ib:
        r.insert(ia + 1, x)
    elif (ib + 1) % d == ia:
        r.insert(ib + 1, x)
    else:
        raise AssertionError(f"{a} and {b} are not adjacent in the rotation {r}")


def sphere_triangulation(G: nx.Graph) -> Rotation:
    """The sphere triangulation of a triangulated disc ``G``: ``G`` plus ``INF`` joined to its outer cycle.

    Raises :class:`NotATriangulatedDisc` (what is wrong) for any other graph.  The outer cycle is
    the one face of the embedding networkx finds that is not a triangle, else the ends of the edges in
    exactly one triangle; a disc whose outer edges also lie on a separating triangle *and* whose
    embedding is not unique can escape both rules and is refused too (no graph of the ``planar`` data
    set is; decoded samples, which are discs by construction, can be).
    """
    n = G.number_of_nodes()
    if n < 3:
        raise NotATriangulatedDisc(f"a triangulated disc has at least 3 nodes, got {n}")
    if INF in G:
        raise NotATriangulatedDisc(f"node label {INF} is reserved for the added outer vertex")
    planar, emb = nx.check_planarity(G)
    if not planar:
        raise NotATriangulatedDisc("the graph is not planar")
    outer = _outer_face(emb)
    # a disc that is only 2-connected (an ear on a chord) has several embeddings, and the one found
    # may put the ear in the wrong face: then the outer vertices are the ends of the edges that
    # lie in exactly one triangle
    for ring in ([outer] if outer is not None else []) + [boundary_vertices(G)]:
        H = nx.Graph(G)
        H.add_edges_from((INF, x) for x in ring)
        if H.number_of_edges() == 3 * (n + 1) - 6:
            planar, emb = nx.check_planarity(H)
            if planar:
                break
    else:
        raise NotATriangulatedDisc("no face of the graph takes a vertex joined to all its corners to a "
                                   "triangulation: some bounded face is not a triangle, or the outer "
                                   "boundary is not one simple cycle")
    rot = Rotation({v: list(emb.neighbors_cw_order(v)) for v in H.nodes})
    return rot


def _outer_face(emb: nx.PlanarEmbedding) -> list | None:
    """The one face of ``emb`` that is not a triangle if it is a simple cycle (a triangle if every face
    is one), else None."""
    seen: set = set()
    faces = []
    for u, v in emb.edges():
        if (u, v) not in seen:
            faces.append(emb.traverse_face(u, v, mark_half_edges=seen))
    big = [f for f in faces if len(f) > 3]
    if len(big) > 1:
        return None
    outer = big[0] if big else min(faces, key=lambda f: sorted(map(_key, f)))
    return outer if len(set(outer)) == len(outer) else None


def boundary_vertices(G: nx.Graph) -> list:
    """The ends of the edges in exactly one triangle (the outer cycle of a triangulated disc)."""
    out = set()
    for u, v in G.edges():
        if len(set(G[u]) & set(G[v])) == 1:
            out.update((u, v))
    return sorted(out, key=_key)


def is_triangulated_disc(G: nx.Graph) -> bool:
    try:
        sphere_triangulation(G)
    except NotATriangulatedDisc:
        return False
    return True


@dataclass
class ContractionLevel:
    """One coarsening step: ``pairs`` are the ``(kept, merged)`` vertices contracted to go from the
    finer triangulation to ``coarse`` (a copy); ``undo[kept]`` is the ``(u, m)`` of the split of
    ``kept`` that restores the finer level (:meth:`Rotation.contract`)."""

    coarse: Rotation
    pairs: list[tuple]
    undo: dict


def contraction_level(T: Rotation, rate: float = 1.0) -> list[tuple]:
    """An independent set of contractible edges of ``T`` (``INF`` untouched): no edge joins two chosen
    pairs, and every vertex keeps degree >= 3.  Greedy, the edges of smallest degree sum first (this
    keeps the coarse degrees small and the levels few: 13-16 levels for the 64-node planar graphs,
    against up to 35 in label order); ties by label.  ``rate < 1`` passes over each edge the greedy
    rule would take with probability ``1 - rate``, decided by a hash of its labels and the level's size
    (deterministic for a labelled graph; another labelling decides otherwise): slower hierarchies."""
    deg = {v: len(nb) for v, nb in T.rot.items()}
    blocked: set = {INF}
    pairs = []
    cand = sorted((e for e in T.edges() if INF not in e),
                  key=lambda e: (deg[e[0]] + deg[e[1]], _key(e[0]), _key(e[1])))
    for a, b in cand:
        if a in blocked or b in blocked:
            continue
        ra = T.rot[a]
        common = set(ra) & set(T.rot[b])
        if len(common) != 2:
            continue
        if any(deg[x] <= 3 for x in common):  # the two wings each lose an edge
            continue
        if len(T) - len(pairs) <= 4:  # the tetrahedron is the coarsest level
            break
        if rate < 1.0 and _unit_hash(a, b, len(T)) >= rate:
            continue
        for x in common:
            deg[x] -= 1
        # the endpoint of larger degree stays (ties: the first of the order key's pair)
        keep, merged = (b, a) if deg[b] > deg[a] else (a, b)
        pairs.append((keep, merged))
        blocked.update((a, b), ra, T.rot[b])
    return pairs


def _unit_hash(a, b, n: int) -> float:
    """A number in [0, 1) fixed by the edge's labels and ``n``."""
    lo, hi = sorted((a, b), key=_key)
    return zlib.crc32(f"{lo}|{hi}|{n}".encode()) / 2**32


def contraction_hierarchy(T: Rotation, rate: float = 1.0, max_levels: int = 256,
                          finest_keep: float = 1.0) -> list[ContractionLevel]:
    """Coarsen ``T`` to the tetrahedron: the list of levels, finest first (``rate``: see
    :func:`contraction_level`).  ``finest_keep < 1``: the finest level contracts only that fraction of
    its pairs (rounded, at least one; the pairs first in a hash of their labels), a subset of an
    independent set being independent too; the other levels are unchanged in kind."""
    levels = []
    T = T.copy()
    while len(T) > 4:
        pairs = contraction_level(T, rate)
        if not pairs and rate < 1.0:  # every edge passed over: take the greedy rule's own choice
            pairs = contraction_level(T)
        if pairs and not levels and finest_keep < 1.0:
            pairs = sorted(pairs, key=lambda p: _unit_hash(p[0], p[1], -len(T)))
            pairs = pairs[:max(1, round(finest_keep * len(pairs)))]
        if not pairs:
            raise NotATriangulatedDisc(f"no contractible edge left at {len(T)} vertices")
        undo = {keep: T.contract(keep, merged) for keep, merged in pairs}
        levels.append(ContractionLevel(T.copy(), pairs, undo))
        if len(levels) > max_levels:
            raise RuntimeError("contraction did not reach the tetrahedron")
    return levels


def labelling_unit(T: Rotation, salt: str) -> float:
    """A number in [0, 1) fixed by ``T``'s labelled edges and ``salt``: the same for one labelling of a
    graph, another for another labelling (a random ordering of the training graphs)."""
    edges = sorted(T.edges(), key=lambda e: (_key(e[0]), _key(e[1])))
    return zlib.crc32(f"{salt}|{edges}".encode()) / 2**32


def tetrahedron() -> Rotation:
    """The coarsest level every hierarchy starts from: ``0`` (the outer vertex) and ``1, 2, 3``."""
    return Rotation(_tetrahedron_rotation())


@functools.lru_cache(maxsize=None)
def _tetrahedron_rotation() -> dict:
    """K4's rotation system with ``rot[0] = [1, 2, 3]`` (computed once; every decode state starts from it)."""
    emb = nx.check_planarity(nx.complete_graph(4))[1]
    rot = {v: list(emb.neighbors_cw_order(v)) for v in range(4)}
    if not _same_cycle(rot[0], [1, 2, 3]):  # the mirror image: relabel 2 <-> 3
        swap = {0: 0, 1: 1, 2: 3, 3: 2}
        rot = {swap[v]: [swap[x] for x in nb] for v, nb in rot.items()}
    return {v: _rotate_to(nb, min(nb)) for v, nb in rot.items()}


def _same_cycle(a: list, b: list) -> bool:
    """Whether two lists are the same cyclic sequence."""
    return len(a) == len(b) and (not b or (b[0] in a and _rotate_to(a, b[0]) == b))


def _rotate_to(r: list, x) -> list:
    i = r.index(x)
    return r[i:] + r[:i]


# ---------------------------------------------------------------------------------------------- tokenizer
NO_SPLIT = 0


CHUNKINGS = ("colour", "round-robin")
DEGREE_BINS = 8  # one-hot degrees 3 .. 9 and 10+ (candidate features)
CANDIDATE_DIM = 2 * (3 + DEGREE_BINS) + 2 * DEGREE_BINS + 1


def chunk_members(rot: Rotation, chunks: int, size: int, chunking: str = "colour") -> list[list[int]]:
    """Deal the vertices ``0 .. n-1`` of ``rot`` (decoder ids, tree order) into ``chunks`` lists of at most
    ``size`` each (``n <= chunks * size``); each list in tree order.

    ``"round-robin"``: vertex ``j`` to chunk ``j % chunks``.  ``"colour"``: each vertex in turn to the
    chunk holding none of its neighbours, the emptiest first, then the lowest index (round-robin when
    nothing conflicts).  The outer vertex ``0`` never splits, so it conflicts with nothing; where every
    chunk with room holds a neighbour (a vertex of degree ``>= chunks``, or the last places), the
    emptiest is taken and a collision stays possible.
    """
    n = len(rot)
    if n > chunks * size:
        raise ValueError(f"chunk_members: {n} vertices do not fit {chunks} chunks of {size}")
    if chunking == "round-robin":
        return [list(range(c, n, chunks)) for c in range(chunks)]
    members: list[list[int]] = [[] for _ in range(chunks)]
    chunk_of: dict = {}
    for v in range(n):
        taken = {chunk_of[w] for w in rot.rot[v] if w in chunk_of and w != 0} if v else set()
        room = [c for c in range(chunks) if len(members[c]) < size]
        c = min(room, key=lambda c: (c in taken, len(members[c]), c))
        members[c].append(v)
        chunk_of[v] = c
    return members


class TriangulationTokenizer(PretrainedMixin):
    """Pyramid tokenizer of triangulated discs: each level of the hierarchy is a round of vertex splits.

    Level ``k`` of a graph's hierarchy (:func:`contraction_hierarchy`; level 0 is the tetrahedron of
    the outer vertex ``0`` and ``1, 2, 3``) gets one token per vertex: ``NO_SPLIT`` or a split
    ``(i, m)`` (see :meth:`Rotation.split`), token ``1 + i * (D - 1) + (m - 1)`` for a vertex of
    degree ``d <= D = max_degree``, with ``i`` counted clockwise from the vertex's *reference*
    neighbour (the one first in tree order).  Vertices are in *tree order*: level ``k + 1`` lists,
    for every vertex of level ``k`` in order, the vertex and then the vertex its split created.  The
    tokens of a level are dealt into ``chunks`` scales (:func:`chunk_members`), so a later chunk is
    predicted knowing which vertices an earlier one split: the splits of a level must not touch (the
    hierarchy's levels never do), and a vertex next to an earlier split is *blocked*.  With
    ``chunking="colour"`` no two neighbours share a chunk wherever the level allows it, so the
    parallel draws of one chunk cannot collide; ``"round-robin"`` deals vertex ``j`` to chunk
    ``j % chunks`` (two neighbours drawn splitting in one chunk: the second is refused).  Positions
    past a level's vertex count hold ``PAD``.  Hierarchies are aligned at the
    top: a graph whose hierarchy has fewer levels than ``K`` ends with levels of no splits, so at
    every level the training data mixes graphs still growing and graphs complete, and the model
    learns to stop from the size reached, not from the level alone.

    Decoding is total and every decoded graph is a triangulated disc (planar, 2-connected):
    a split naming a slot past the vertex's degree, a split of the outer vertex or of a blocked
    vertex, and splits past the next level's capacity are read as ``NO_SPLIT``; the valid-token
    hook masks all but the last kind (and a vertex next to a split drawn in the *same* chunk is
    refused at decoding: :attr:`TriangulationDecodeState.refused` counts them).

    Next-scale input (``latent_dim`` features per position): valid, outer vertex, degree, created /
    split at the previous level, blocked, level size, level and chunk, the outer cycle's length,
    tree-order bits, and for the first ``D`` clockwise slots from the reference neighbour: present,
    degree, outer vertex, created at the previous level, blocked or split at this level.  With
    ``size_features`` two more say how far the graph is from its full size ``max_nodes[-1]`` (the
    largest training graph): the vertices still missing over the current count, and over the vertices
    this level can still split (the split rate that would complete it now; both capped at 4).  The
    level size alone says the same, but on a scale where 60 and 64 vertices look alike; the rate puts
    "stop" and "split a few more" far apart, which is what a sample that grew early needs to see.

    Two options change the hierarchies the model learns from (not the graphs), so that a sample whose
    size is off the data's track still finds its state in the training data.  Free-running samples
    split a little less per level than the data (about 2%, compounding to 10-15% by the finer levels),
    need a level more, and at the late levels, where every training graph is already complete, stop.
    With ``delays = E`` each labelling of a graph starts its hierarchy ``0 .. E`` levels late (the
    tetrahedron repeated without splits; which one is fixed by the labelling): incomplete graphs then
    occur at every level, and only the size says when to stop.  With ``partial_finest = f`` the finest
    level of each labelling contracts only a fraction ``u`` of the pairs the greedy rule takes, ``u`` in
    ``[1 - f, 1]`` fixed by the labelling: the last level grows a graph by whatever it still misses
    rather than by a maximal set, which a sample anywhere near the full size can then do (with
    ``size_features`` it sees how much that is).

    Args:
        max_nodes: ``K`` ints, the capacity of every level (``max_nodes[0] == 4``; the last one
            includes the outer vertex).
        max_degree: ``D``, the largest degree a vertex may split at.
        chunks: scales per level.
        rate: the hierarchy's contraction rate (:func:`contraction_level`); below 1 a level splits
            fewer vertices and hierarchies are deeper and more varied.
        chunking: ``"colour"`` or ``"round-robin"`` (:func:`chunk_members`).  The constructor's default
            is what configs saved before the option existed used; :meth:`fit` defaults to ``"colour"``.
        size_features: add the two missing-size inputs (above); off in configs saved before the option.
        delays: ``E``, the most levels a hierarchy starts late (above; 0 in configs saved before it).
        partial_finest: ``f`` in ``[0, 1)``, how far below a maximal set the finest level may stay
            (above; 0 in configs saved before it).
    """

    def __init__(self, max_nodes: Sequence[int], max_degree: int, chunks: int = 3, rate: float = 1.0,
                 chunking: str = "round-robin", size_features: bool = False, delays: int = 0,
                 partial_finest: float = 0.0):
        if len(max_nodes) < 2 or int(max_nodes[0]) != 4:
            raise ValueError(f"max_nodes: expected >= 2 levels starting with the tetrahedron's 4, got {list(max_nodes)}")
        if any(int(b) < int(a) for a, b in zip(max_nodes, max_nodes[1:])):
            raise ValueError(f"max_nodes must not shrink from level to level, got {list(max_nodes)}")
        if int(max_degree) < 3:
            raise ValueError(f"max_degree must be >= 3, got {max_degree}")
        if int(chunks) < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        if not 0.0 < float(rate) <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        if chunking not in CHUNKINGS:
            raise ValueError(f"chunking must be one of {CHUNKINGS}, got {chunking!r}")
        if isinstance(delays, bool) or int(delays) != delays or not 0 <= int(delays) <= len(max_nodes) - 2:
            raise ValueError(f"delays must be an int in 0..{len(max_nodes) - 2} (levels - 2), got {delays!r}")
        if not 0.0 <= float(partial_finest) < 1.0:
            raise ValueError(f"partial_finest must be in [0, 1), got {partial_finest}")
        self.delays, self.partial_finest = int(delays), float(partial_finest)
        self.rate = float(rate)
        self.chunking = chunking
        self.size_features = bool(size_features)
        self.max_nodes = [int(x) for x in max_nodes]
        self.max_degree = D = int(max_degree)
        self.chunks = C = int(chunks)
        self.K = len(self.max_nodes)
        self.pad_token = 1 + D * (D - 1)
        self.vocab_size = self.pad_token + 1
        self.kinds = [(k, c) for k in range(self.K - 1) for c in range(C)]  # scale -> (level, chunk)
        self.schedule = ScaleSchedule([-(-self.max_nodes[k] // C) for k, _ in self.kinds])
        self.nbits = max(1, math.ceil(math.log2(self.max_nodes[-1])))
        self._size_at = 10 + self.nbits  # the two missing-size inputs, when size_features
        self._slot_at = self._size_at + (2 if self.size_features else 0)
        self.latent_dim = int(8 * math.ceil((self._slot_at + 5 * D) / 8))
        self.config = {"max_nodes": self.max_nodes, "max_degree": self.max_degree, "chunks": self.chunks,
                       "rate": self.rate, "chunking": self.chunking, "size_features": self.size_features,
                       "delays": self.delays, "partial_finest": self.partial_finest}

    # ------------------------------------------------------------------ construction
    @classmethod
    def fit(cls, graphs: Sequence[nx.Graph], node_slack: float = 0.1, degree_slack: int = 1,
            chunks: int = 3, rate: float = 1.0, extra_levels: int = 0,
            chunking: str = "colour", size_features: bool = False, delays: int = 0,
            partial_finest: float = 0.0) -> "TriangulationTokenizer":
        """Size a tokenizer for a training set of triangulated discs: as many levels as the deepest
        hierarchy plus ``delays`` plus ``extra_levels`` (room for samples that grow slower than the
        data), each level's capacity ``(1 + node_slack) x`` the largest seen there (at most the largest
        graph; a delayed hierarchy is smaller at every level), splits up to ``degree_slack`` above the
        largest degree seen at a split.  The hierarchies depend on the labelling (``delays``,
        ``partial_finest``, ``rate < 1``): fit on the relabelled graphs the model trains on."""
        graphs = graphs_from(graphs)
        if not graphs:
            raise ValueError("fit needs at least one graph")
        sizes: list[list[int]] = []
        dmax = 3
        for i, G in enumerate(graphs):
            T = _sphere(G, i)
            levels = _hierarchy(T, rate, partial_finest)
            sizes.append([len(T)] + [len(lv.coarse) for lv in levels])  # finest first
            dmax = max([dmax] + [lv.coarse.degree(keep) for lv in levels for keep, _ in lv.pairs])
        K = max(len(s) for s in sizes) + int(delays) + int(extra_levels)
        top = [s[::-1] + [s[0]] * (K - len(s)) for s in sizes]  # coarse first; finished graphs keep their size
        cap = [max(s[j] for s in top) for j in range(K)]
        n_max = cap[-1]
        cap = [4] + [min(n_max, int(math.ceil(c * (1 + node_slack)))) for c in cap[1:-1]] + [n_max]
        return cls(cap, dmax + int(degree_slack), chunks, rate, chunking, size_features, delays, partial_finest)

    # ------------------------------------------------------------------ encoding
    def encode_graph(self, G: nx.Graph, index: int = 0) -> list[list[int]]:
        """Token lists (unpadded) per scale for one triangulated disc."""
        T = _sphere(G, index)
        levels = _hierarchy(T, self.rate, self.partial_finest)
        delay = int(labelling_unit(T, "delay") * (self.delays + 1))
        if delay + len(levels) + 1 > self.K:
            late = f" after {delay} delay levels" if delay else ""
            raise ValueError(f"graph {index}: its hierarchy has {len(levels) + 1} levels{late}, this tokenizer {self.K}; "
                             "refit on data that includes it")
        top = levels[-1].coarse if levels else T
        r_inf = top.rot[INF]
        label = [INF] + _rotate_to(r_inf, min(r_inf, key=_key))  # decoder id -> the graph's own label
        mapped = {i: [label.index(x) for x in top.rot[label[i]]] for i in range(4)}
        if not all(_same_cycle(mapped[i], r) for i, r in tetrahedron().rot.items()):
            raise AssertionError("the coarsest level does not map onto the decoder's tetrahedron")
        grower = _Grower(self)
        per_level: list[list[int]] = []
        members: list[list[list[int]]] = []  # per level: the vertices of each chunk
        for _ in range(delay):  # the tetrahedron, unchanged
            members.append(grower.members)
            per_level.append([NO_SPLIT] * len(grower.rot))
            grower.apply_level(per_level[-1], self.max_nodes[len(per_level)])
        for lv in reversed(levels):  # coarse to fine
            merged_of = dict(lv.pairs)
            k = len(per_level)
            n = len(grower.rot)  # within capacity: checked as the level before grew (level 0: the tetrahedron)
            toks = []
            for v in range(n):
                x = label[v]
                if x not in lv.undo:
                    toks.append(NO_SPLIT)
                    continue
                u, m = lv.undo[x]
                r = grower.rot.rot[v]
                d = len(r)
                if d > self.max_degree:
                    raise ValueError(f"graph {index}: a split at degree {d}, above max_degree {self.max_degree}")
                i = (r.index(label.index(u)) - r.index(min(r))) % d
                toks.append(1 + i * (self.max_degree - 1) + (m - 1))
            grown = n + sum(t != NO_SPLIT for t in toks)
            if grown > self.max_nodes[k + 1]:
                raise ValueError(f"graph {index}: level {k + 1} has {grown} vertices, capacity {self.max_nodes[k + 1]}; "
                                 "refit on data that includes it")
            members.append(grower.members)
            new_of = grower.apply_level(toks, self.max_nodes[k + 1])
            if grower.refused:
                raise AssertionError(f"graph {index}: level {k} splits two adjacent vertices")
            label = _tree_labels(label, new_of, merged_of)
            per_level.append(toks)
        # the graph is complete: the remaining levels split nothing
        for k in range(len(per_level), self.K - 1):
            per_level.append([NO_SPLIT] * len(grower.rot))
            members.append(self.chunk_members(grower.rot, k))
        return [[per_level[k][v] for v in members[k][c]] for k, c in self.kinds]

    def chunk_members(self, rot: "Rotation", k: int) -> list[list[int]]:
        """The vertices (decoder ids, tree order) of each chunk of level ``k`` of triangulation ``rot``."""
        return chunk_members(rot, self.chunks, self.schedule.token_counts[k * self.chunks], self.chunking)

    @torch.no_grad()
    def encode(self, data: Any) -> list[torch.Tensor]:
        """``Data`` / ``Batch`` / networkx triangulated disc(s) -> per scale ``(B, n_k)`` long, PAD-filled."""
        graphs = graphs_from(data)
        per = [self.encode_graph(G, i) for i, G in enumerate(graphs)]
        out = []
        for s, n in enumerate(self.schedule.token_counts):
            t = torch.full((len(graphs), n), self.pad_token, dtype=torch.long)
            for b, toks in enumerate(per):
                t[b, :len(toks[s])] = torch.tensor(toks[s], dtype=torch.long)
            out.append(t)
        return out

    def valid_mask(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, L)`` bool: the positions that hold a vertex (non-PAD)."""
        return torch.cat([idx != self.pad_token for idx in indices], 1)

    # ------------------------------------------------------------------ candidate features
    #: features per split token (msar.tokenizer.CandidateFeatures; used by models built with
    #: ``candidate_dim=CANDIDATE_DIM``): for each of the two joined neighbours u and w, outer vertex /
    #: created at the previous level / blocked and its degree after the split (one-hot 3..10+); the
    #: new vertex's and the split vertex's degrees (one-hot); whether the new vertex takes the outer one
    candidate_dim = CANDIDATE_DIM

    def candidate_features(self, x: torch.Tensor) -> torch.Tensor:
        """Next-scale input ``(B, n, latent_dim)`` -> ``(B, n, V, candidate_dim)``: what each split
        ``(i, m)`` of each position's vertex would do, read from the input's slot features (a split
        joins ``u`` = slot ``i`` and ``w`` = slot ``(i + m) mod d`` to the new vertex, of degree
        ``m + 2``; the vertex keeps degree ``d - m + 2``).  ``NO_SPLIT``, ``PAD`` and the shapes a
        vertex's degree does not allow get zeros.  A linear head scores a shape by its token id alone,
        so it has to learn for every slot and degree where that shape's neighbours sit in the input;
        these features give each shape its own, the same way at every slot."""
        D, o = self.max_degree, self._slot_at
        u_slot, w_slot, shape, takes_outer = (t.to(x.device) for t in _candidate_tables(D))
        live = x[..., 0] > 0.5  # (B, n) a vertex (PAD positions: all zeros)
        d = torch.where(live, (x[..., 2] * 8).round().long().clamp(0, D), 0)  # (B, n) its degree; 0: no split
        slots = x[..., o:o + 5 * D].unflatten(-1, (D, 5))  # (B, n, D, 5): present, degree / 8, outer, new, blocked
        # per slot: outer / new / blocked and the degree after the split; slot D (all zeros) is where the
        # tables send the tokens a vertex of this degree cannot take
        per_slot = torch.cat((slots[..., 2:5], _degree_one_hot(slots[..., 1] * 8 + 1)), -1)  # (B, n, D, 11)
        per_slot = F.pad(per_slot, (0, 0, 0, 1))
        outer = slots[..., 2]
        where = torch.where(outer.amax(-1) > 0.5, outer.argmax(-1), D)  # (B, n) the outer vertex's slot, D: none

        def neighbour(slot_table: torch.Tensor) -> torch.Tensor:  # (B, n, V, 11)
            idx = slot_table[d]  # (B, n, V)
            return per_slot.gather(2, idx.unsqueeze(-1).expand(*idx.shape, per_slot.shape[-1]))

        return torch.cat((neighbour(u_slot), neighbour(w_slot), shape[d], takes_outer[d, where].unsqueeze(-1)), -1)

    @torch.no_grad()
    def encode_noisy_context(self, data: Any, extra_split_prob: float,
                             generator: np.random.Generator
                             ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Training sequences whose context holds splits the data does not make, for learning to go on
        from the model's own draws (exposure bias; scheduled sampling without a model in the loop).

        Per graph one level ``k`` is picked (with probability proportional to its number of splits).
        Levels before it are the data's.  In every chunk of level ``k`` but the last, each vertex the
        data leaves unsplit and that could split gets a spurious split with probability
        ``extra_split_prob`` (its shape drawn from the data's shapes at that degree): the context the
        later chunks see has more vertices split and blocked, as the model's own draws do.  The targets
        of level ``k`` stay the data's tokens where the decoder can still read them (a data split that a
        spurious one blocked becomes ``NO_SPLIT``; a spurious split's own target is the data's
        ``NO_SPLIT``); every other scale's target is ``PAD`` (ignored by the loss): before ``k`` they are
        the clean sequence's, after it the graph has left the data.

        Returns ``(targets, context, teacher_input)``: per scale ``(B, n_s)`` long the tokens to predict
        and the tokens the context is built from, and ``teacher_forcing_input(context)``
        ``(B, L - n_0, C)``."""
        if not 0.0 <= float(extra_split_prob) <= 1.0:
            raise ValueError(f"extra_split_prob must be in [0, 1], got {extra_split_prob}")
        clean = self.encode(data)
        B, C = clean[0].shape[0], self.chunks
        shapes = self._split_shapes(clean)
        per_level = np.zeros((B, self.K - 1))  # splits per graph and level
        for t, (k, _) in zip(clean, self.kinds):
            per_level[:, k] += ((t != NO_SPLIT) & (t != self.pad_token)).sum(1).numpy()
        level = [int(generator.choice(self.K - 1, p=n / n.sum())) if n.any() else -1 for n in per_level]
        st = self.start(B)
        targets, context, pieces = [], [], []
        for s, (k, c) in enumerate(self.kinds):
            tgt, inp = clean[s].clone(), clean[s].clone()
            for b, g in enumerate(st.growers):
                vs = g.members[c]
                if k < level[b]:  # the data's context; its targets are the clean sequence's
                    tgt[b] = self.pad_token
                    continue
                if k > level[b]:  # past the corrupted level: nothing to learn, nothing split
                    tgt[b] = self.pad_token
                    inp[b, :len(vs)], inp[b, len(vs):] = NO_SPLIT, self.pad_token
                    continue
                for p, v in enumerate(vs):
                    t = int(tgt[b, p])
                    if t != NO_SPLIT and not g.can_split(v):
                        tgt[b, p] = inp[b, p] = NO_SPLIT  # blocked by a spurious split
                    elif (t == NO_SPLIT and c < C - 1 and g.can_split(v)
                          and generator.random() < extra_split_prob):
                        w = shapes[len(g.rot.rot[v])]
                        inp[b, p] = int(generator.choice(len(w), p=w))
            targets.append(tgt)
            context.append(inp)
            pieces.append(st.add_scale(s, inp))
        return targets, context, torch.cat([x for x in pieces if x is not None], 1)

    def _split_shapes(self, indices: Sequence[torch.Tensor]) -> np.ndarray:
        """``(D + 1, V)``: per degree the frequency of each split token in ``indices`` (uniform over the
        allowed shapes at a degree the data never splits at)."""
        D = self.max_degree
        counts = np.zeros((D + 1, self.vocab_size))
        growers = [_Grower(self) for _ in range(indices[0].shape[0])]  # no transformer inputs needed here
        for s, (k, c) in enumerate(self.kinds):
            for g, row in zip(growers, indices[s].tolist()):
                for v, t in zip(g.members[c], row):
                    if t != NO_SPLIT and t != self.pad_token and g.can_split(v):
                        counts[len(g.rot.rot[v]), t] += 1
                g.apply_chunk(c, row, self.max_nodes[k + 1])
                if c == self.chunks - 1:
                    g.end_level()
        table = _allowed_table(D).astype(float)
        table[:, NO_SPLIT] = 0.0
        counts = np.where(counts.sum(1, keepdims=True) > 0, counts, table)
        return counts / np.maximum(counts.sum(1, keepdims=True), 1.0)

    # ------------------------------------------------------------------ decoding
    def start(self, batch_size: int, device: torch.device | str = "cpu", context: Any = None) -> "TriangulationDecodeState":
        """A decode state that grows ``batch_size`` triangulations from the tetrahedron (no ``context``)."""
        if context is not None:
            raise TypeError(f"TriangulationTokenizer.start takes no context, got {type(context).__name__}")
        return TriangulationDecodeState(self, batch_size, device)

    @torch.no_grad()
    def teacher_forcing_input(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, L - n_0, C)``: what the decode state hands the transformer, fed the true tokens."""
        B = self.schedule.check_indices(indices, self.vocab_size)
        st = self.start(B, indices[0].device)
        pieces = [st.add_scale(k, idx) for k, idx in enumerate(indices)]
        return torch.cat([p for p in pieces if p is not None], 1)

    def replay(self, indices: Sequence[torch.Tensor]) -> "TriangulationDecodeState":
        """A decode state fed all of ``indices`` (its ``rots``, ``history`` and ``refused`` count)."""
        B = self.schedule.check_indices(indices, self.vocab_size)
        st = self.start(B, indices[0].device)
        for k, idx in enumerate(indices):
            st.add_scale(k, idx)
        return st

    @torch.no_grad()
    def decode(self, indices: Sequence[torch.Tensor]) -> Batch:
        return self.finish(self.replay(indices))

    @torch.no_grad()
    def decode_progression(self, indices: Sequence[torch.Tensor]) -> list[list[nx.Graph]]:
        """Per level, coarse to fine, the decoded graphs of the batch (outer vertex left out)."""
        return self.replay(indices).history

    def valid_token_hook(self, k: int, logits: torch.Tensor, state: "TriangulationDecodeState") -> torch.Tensor:
        """A ``logits_hook`` for :func:`msar.sample`: ``-inf`` on the tokens of scale ``k`` the decoder
        would read as something else (PAD at a vertex, a vertex at PAD, slots past the degree, a split
        of the outer vertex or of a blocked one)."""
        if not isinstance(state, TriangulationDecodeState) or state.tok is not self:
            raise TypeError("valid_token_hook needs a decode state made by this tokenizer's start(), "
                            f"got {type(state).__name__}")
        ok = state.allowed(k).to(logits.device)
        if ok.shape != logits.shape:
            raise ValueError(f"valid_token_hook: logits of shape {tuple(logits.shape)} at scale {k}, expected {tuple(ok.shape)}")
        return logits.masked_fill(~ok, float("-inf"))

    def finish(self, state: "TriangulationDecodeState") -> Batch:
        if not state.done:
            raise ValueError(f"finish: the decode state has seen {state.s} of {len(self.schedule)} scales")
        return Batch.from_data_list([to_data(_relabel(g.graph(drop=0))) for g in state.rots])


def _hierarchy(T: Rotation, rate: float, partial_finest: float) -> list[ContractionLevel]:
    """The tokenizer's hierarchy of one labelled triangulation (with ``partial_finest > 0``, the share of
    the finest level's contractions kept is fixed by the labelling)."""
    return contraction_hierarchy(T, rate, finest_keep=1.0 - partial_finest * labelling_unit(T, "finest"))


def _sphere(G: nx.Graph, index: int) -> Rotation:
    try:
        return sphere_triangulation(G)
    except NotATriangulatedDisc as e:
        raise NotATriangulatedDisc(f"graph {index}: {e}") from None


def _relabel(G: nx.Graph) -> nx.Graph:
    return nx.convert_node_labels_to_integers(G, ordering="sorted")


def _tree_labels(label: list, new_of: dict, merged_of: dict) -> list:
    """The next level's decoder-id -> label list: every vertex, then the one its split created."""
    out = []
    for v, x in enumerate(label):
        out.append(x)
        if v in new_of:
            out.append(merged_of[x])
    return out


def _split_of(tok: int, D: int) -> tuple[int, int]:
    """Token -> ``(i, m)`` (for a split token, ``1 <= tok < 1 + D (D - 1)``)."""
    i, r = divmod(tok - 1, D - 1)
    return i, r + 1


class _Grower:
    """One triangulation growing level by level in decoder ids (tree order; ``0`` the outer vertex).

    Within a level, vertices keep their ids and new ones are numbered from the level's size on;
    :meth:`end_level` renumbers to tree order."""

    def __init__(self, tok: TriangulationTokenizer):
        self.tok = tok
        self.rot = tetrahedron()
        self.new: set = set()  # vertices created at the previous level
        self.split: set = set()  # vertices that split at the previous level
        self.refused = 0  # splits read as NO_SPLIT because a neighbour split in the same chunk, or past capacity
        self.level = 0
        self._begin()

    def _begin(self) -> None:
        self.n0 = len(self.rot)
        self.blocked: set = set()  # split vertices and their neighbours, this level
        self.new_of: dict = {}
        self.members = self.tok.chunk_members(self.rot, self.level)

    def can_split(self, v: int) -> bool:
        return 0 < v < self.n0 and v not in self.blocked and len(self.rot.rot[v]) <= self.tok.max_degree

    def missing_size(self, chunk: int) -> tuple[float, float]:
        """The size inputs before ``chunk`` is drawn: the vertices missing to the full size over the
        current count, and over the vertices of chunks ``chunk..`` that can still split (capped at 4)."""
        missing = max(0, self.tok.max_nodes[-1] - len(self.rot))
        ahead = sum(self.can_split(v) for vs in self.members[chunk:] for v in vs)
        return min(4.0, missing / len(self.rot)), min(4.0, missing / max(1, ahead))

    def apply_chunk(self, chunk: int, toks: Sequence[int], cap: int) -> None:
        """Apply the tokens of one chunk (position ``p`` is vertex ``members[chunk][p]``) growing to at
        most ``cap`` vertices; the chunk's splits block their neighbours only after the chunk."""
        D, rot, vs = self.tok.max_degree, self.rot, self.members[chunk]
        blocked_now: set = set()
        for p, t in enumerate(toks):
            if p >= len(vs):
                break
            v, t = vs[p], int(t)
            if t == NO_SPLIT or t >= self.tok.pad_token or not self.can_split(v):
                continue
            i, m = _split_of(t, D)
            d = len(rot.rot[v])
            if i >= d or m > d - 1:
                continue
            if v in blocked_now or self.n0 + len(self.new_of) >= cap:
                self.refused += 1
                continue
            r = rot.rot[v]
            new = self.n0 + len(self.new_of)
            blocked_now.update([v], r)
            rot.split(v, new, (r.index(min(r)) + i) % d, m)
            self.new_of[v] = new
        self.blocked |= blocked_now

    def end_level(self) -> dict:
        """Renumber to tree order (every vertex, then the one it created); returns {vertex: the
        pre-renumbering id of the vertex it created}."""
        new_of = self.new_of
        ids: dict = {}
        for v in range(self.n0):
            ids[v] = len(ids)
            if v in new_of:
                ids[new_of[v]] = len(ids)
        self.rot = Rotation({ids[v]: [ids[x] for x in nb] for v, nb in self.rot.rot.items()})
        self.new = {ids[x] for x in new_of.values()}
        self.split = {ids[v] for v in new_of}
        self.level += 1
        if self.level < self.tok.K - 1:  # the finished graph has no chunks to deal
            self._begin()
        return new_of

    def apply_level(self, toks: Sequence[int], cap: int) -> dict:
        """All chunks of one level's tokens (one per vertex, in order), then :meth:`end_level`."""
        for c, vs in enumerate(self.members):
            self.apply_chunk(c, [toks[v] for v in vs], cap)
        return self.end_level()


class TriangulationDecodeState:
    """Incremental decoding for :class:`TriangulationTokenizer` (``tokenizer.start``)."""

    def __init__(self, tok: TriangulationTokenizer, batch_size: int, device: torch.device | str = "cpu"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size: expected an int >= 0, got {batch_size!r}")
        self.tok, self.B, self.device = tok, batch_size, device
        self.growers = [_Grower(tok) for _ in range(batch_size)]
        self.indices: list[torch.Tensor] = []
        self.s = 0
        self.done = False
        self.history: list[list[nx.Graph]] = [[_relabel(g.rot.graph(drop=0)) for g in self.growers]]
        self._allowed: tuple | None = None  # (scale, state step, mask): the hooks of one scale share it

    @property
    def rots(self) -> list[Rotation]:
        return [g.rot for g in self.growers]

    @property
    def refused(self) -> int:
        """Splits read as NO_SPLIT so far (next to a split drawn in the same chunk, or past capacity)."""
        return sum(g.refused for g in self.growers)

    def allowed(self, s: int) -> torch.Tensor:
        """``(B, n_s, V)`` bool: the tokens of scale ``s`` the decoder reads as drawn (do not modify it: the
        valid-token hook and a node-count hook of the same scale get the same tensor)."""
        if self._allowed is not None and self._allowed[:2] == (s, self.s):
            return self._allowed[2]
        tok = self.tok
        _, c = tok.kinds[s]
        n_pos = tok.schedule.token_counts[s]
        ok = np.zeros((self.B, n_pos, tok.vocab_size), dtype=bool)
        table = _allowed_table(tok.max_degree)
        for b, g in enumerate(self.growers):
            vs = g.members[c]
            ok[b, len(vs):, tok.pad_token] = True
            for p, v in enumerate(vs):
                ok[b, p] = table[len(g.rot.rot[v]) if g.can_split(v) else 0]
        out = torch.from_numpy(ok).to(self.device)
        self._allowed = (s, self.s, out)
        return out

    def _features(self) -> torch.Tensor:
        """``(B, n_s, latent_dim)`` inputs of the current scale ``s``."""
        tok, D, C = self.tok, self.tok.max_degree, self.tok.chunks
        k, c = tok.kinds[self.s]
        n_pos = tok.schedule.token_counts[self.s]
        X = np.zeros((self.B, n_pos, tok.latent_dim), dtype=np.float32)
        o = tok._slot_at
        for b, g in enumerate(self.growers):
            rot = g.rot.rot
            X[b, :, 5] = len(rot) / tok.max_nodes[-1]
            X[b, :, 6] = k / max(1, tok.K - 2)
            X[b, :, 7] = len(rot[0]) / 16
            X[b, :, 9] = c / C
            if tok.size_features:
                X[b, :, tok._size_at:tok._size_at + 2] = g.missing_size(c)
            for p, v in enumerate(g.members[c]):
                r = rot[v]
                d = len(r)
                X[b, p, 0:5] = (1.0, v == 0, d / 8, v in g.new, v in g.split)
                X[b, p, 8] = v in g.blocked
                X[b, p, 10:10 + tok.nbits] = _bits(v, tok.nbits)
                ref = r.index(min(r))
                for j in range(min(d, D)):
                    x = r[(ref + j) % d]
                    X[b, p, o + 5 * j: o + 5 * j + 5] = (1.0, len(rot[x]) / 8, x == 0, x in g.new, x in g.blocked)
        return torch.from_numpy(X).to(self.device)

    def add_scale(self, s: int, idx: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor | None:
        """Add scale ``s``'s tokens ``(B, n_s)``; return the ``(B, n_{s+1}, C)`` features of the next scale
        (``None`` after the last)."""
        if self.done or s != self.s:
            raise ValueError(f"scales must be added in order: expected scale {self.s}, got {s}")
        n = self.tok.schedule.token_counts[s]
        if not isinstance(idx, torch.Tensor) or tuple(idx.shape) != (self.B, n):
            raise ValueError(f"scale {s}: expected indices of shape ({self.B}, {n}), got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        k, c = self.tok.kinds[s]
        last = c == self.tok.chunks - 1
        for g, row in zip(self.growers, idx.tolist()):
            g.apply_chunk(c, row, self.tok.max_nodes[k + 1])
            if last:
                g.end_level()
        self.indices.append(idx)
        if last:
            self.history.append([_relabel(g.rot.graph(drop=0)) for g in self.growers])
        self.s += 1
        if self.s == len(self.tok.schedule):
            self.done = True
            return None
        return self._features()


class _ChainedHook:
    """A logits hook that may run after another one (``then``); subclasses define ``_apply(logits)``."""

    _first = None

    def then(self, first):
        """This hook applied to the output of ``first`` (another logits hook)."""
        self._first = first
        return self

    def __call__(self, k: int, logits: torch.Tensor, state: Any) -> torch.Tensor:
        if self._first is not None:
            logits = self._first(k, logits, state)
        return self._apply(logits)

    def _apply(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SplitShapeTemperature(_ChainedHook):
    """A logits hook (:func:`msar.sample`'s ``logits_hook``) that sharpens *how* vertices split, not
    *whether*: ``P(NO_SPLIT)`` and ``P(PAD)`` stay the model's, and given a split, the split tokens
    follow ``softmax(logits / temperature)``, nucleus-filtered to ``top_p`` (msar's top-p on that
    conditional; ``0`` keeps every shape).

    A plain temperature below 1 also favours ``NO_SPLIT`` (the most probable token at most
    vertices), so samples come out smaller; this one keeps the number of splits the model gives.
    A temperature shifts mass between every pair of shapes; top-p only drops the unlikely tail and
    keeps the ratios of the rest.  Chain it after :meth:`TriangulationTokenizer.valid_token_hook`
    (``then`` does that)::

        hook = SplitShapeTemperature(0.6).then(tok.valid_token_hook)

    With ``slot_only`` the temperature reaches only *where* the vertex splits: a shape ``(i, m)`` is a
    span ``m`` (the new vertex takes ``m`` neighbours: degrees ``m + 2`` and ``d - m + 2``) at slot ``i``,
    and ``P(m | split)``, which decides the degrees, stays the model's while ``P(i | m, split)`` follows
    ``softmax(log P(i | m) / temperature)`` over the slots.  (A joint temperature also thins the rare
    spans: fewer ``m = 1`` splits, fewer degree-3 vertices.)
    """

    def __init__(self, temperature: float, top_p: float = 0.0, slot_only: bool = False):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        if slot_only and 0 < top_p < 1:
            raise ValueError("slot_only sharpens the slot given the span; top_p filters the joint shape: use one")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.slot_only = bool(slot_only)

    def _apply(self, logits: torch.Tensor) -> torch.Tensor:
        V = logits.shape[-1]
        lp = logits.float().log_softmax(-1)  # (B, n, V)
        mass = lp[..., 1:V - 1].logsumexp(-1, keepdim=True)  # log P(some split)
        if self.slot_only:
            shape = self._slot_sharpened(logits[..., 1:V - 1].float())
        else:
            shape = logits[..., 1:V - 1].float() / self.temperature
        if 0 < self.top_p < 1:
            shape = filter_top_k_top_p(shape, top_p=self.top_p)
        shape = shape.log_softmax(-1)
        out = lp.clone()
        # positions whose splits are all masked keep -inf there (log_softmax of all -inf is NaN)
        out[..., 1:V - 1] = torch.where(torch.isfinite(mass), shape + mass, lp[..., 1:V - 1])
        return out.to(logits.dtype)

    def _slot_sharpened(self, shape: torch.Tensor) -> torch.Tensor:
        """``(B, n, D (D - 1))`` split logits -> ``log P(m | split) + log softmax(log P(i | m) / T)``."""
        S = shape.shape[-1]
        D = int(round((1 + math.sqrt(1 + 4 * S)) / 2))  # the split tokens are D (D - 1) shapes (i, m)
        if D * (D - 1) != S:
            raise ValueError(f"slot_only: {S} split tokens is not D (D - 1) for any max_degree D")
        x = shape.log_softmax(-1).unflatten(-1, (D, D - 1))  # log P(i, m | split), token 1 + i (D - 1) + m - 1
        span = x.logsumexp(-2, keepdim=True)  # log P(m | split)
        # a span no slot allows stays -inf (0 instead of NaN inside, removed by the -inf it is added to)
        slot = torch.where(torch.isfinite(span), x - span, torch.zeros_like(x))
        return (span + (slot / self.temperature).log_softmax(-2)).flatten(-2)


class SplitPlacementTemperature(_ChainedHook):
    """A logits hook that sharpens *which* vertices of a chunk split, not *how many* or *how*: with
    ``p_v`` the model's ``P(split)`` at vertex ``v``, the hook's is ``sigmoid(logit(p_v) / temperature + b)``,
    ``b`` per graph and chunk such that the expected number of splits ``sum_v p_v`` stays the model's;
    the split shape given a split stays the model's too.  Vertices with no choice (blocked, PAD) keep
    their logits.  ``temperature < 1`` puts the chunk's splits on the vertices the model favours most.
    Chain it after :meth:`TriangulationTokenizer.valid_token_hook` (``then``)."""

    def __init__(self, temperature: float, iterations: int = 50):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.iterations = int(iterations)

    def _apply(self, logits: torch.Tensor) -> torch.Tensor:
        V = logits.shape[-1]
        lp = logits.float().log_softmax(-1)  # (B, n, V)
        split = lp[..., 1:V - 1]
        log_split = split.logsumexp(-1)  # (B, n) log P(some split)
        free = torch.isfinite(log_split) & torch.isfinite(lp[..., NO_SPLIT])
        z = torch.where(free, log_split - lp[..., NO_SPLIT], torch.zeros_like(log_split))  # logit P(split | not PAD)
        target = (torch.sigmoid(z) * free).sum(-1, keepdim=True)  # (B, 1) expected splits
        lo = torch.full_like(target, -40.0)
        hi = torch.full_like(target, 40.0)
        for _ in range(self.iterations):  # the shift b: the expected count is increasing in it
            mid = (lo + hi) / 2
            more = (torch.sigmoid(z / self.temperature + mid) * free).sum(-1, keepdim=True) > target
            hi, lo = torch.where(more, mid, hi), torch.where(more, lo, mid)
        zt = z / self.temperature + (lo + hi) / 2
        out = lp.clone()
        out[..., NO_SPLIT] = torch.where(free, F.logsigmoid(-zt), lp[..., NO_SPLIT])
        out[..., 1:V - 1] = torch.where(free.unsqueeze(-1), split - log_split.unsqueeze(-1) + F.logsigmoid(zt).unsqueeze(-1),
                                        split)
        return out.to(logits.dtype)


def _degree_one_hot(deg: torch.Tensor) -> torch.Tensor:
    """Degrees (any shape, float or int) -> one-hot ``(..., DEGREE_BINS)`` of ``3 .. 9, 10+`` (below 3: bin 0)."""
    b = (deg.round().long() - 3).clamp(0, DEGREE_BINS - 1)
    return F.one_hot(b, DEGREE_BINS).float()


@functools.lru_cache(maxsize=None)
def _candidate_tables(D: int) -> tuple[torch.Tensor, ...]:
    """Lookup tables of :meth:`TriangulationTokenizer.candidate_features` for max degree ``D`` (row ``d``:
    a vertex of degree ``d``; ``V`` tokens): ``u_slot``, ``w_slot`` ``(D + 1, V)`` long, the slots the split
    joins (``D`` where the vertex cannot take the token); ``shape`` ``(D + 1, V, 2 DEGREE_BINS)``, the
    new vertex's and the split vertex's degrees one-hot; ``takes_outer`` ``(D + 1, D + 1, V)``, with the
    outer vertex at slot ``p`` (``D``: not a neighbour), whether it moves to the new vertex."""
    V = 2 + D * (D - 1)
    u = torch.full((D + 1, V), D, dtype=torch.long)
    w = torch.full((D + 1, V), D, dtype=torch.long)
    shape = torch.zeros(D + 1, V, 2 * DEGREE_BINS)
    takes = torch.zeros(D + 1, D + 1, V)
    for d in range(3, D + 1):
        for i in range(d):
            for m in range(1, d):
                t = 1 + i * (D - 1) + (m - 1)
                u[d, t], w[d, t] = i, (i + m) % d
                shape[d, t] = torch.cat((_degree_one_hot(torch.tensor(m + 2)), _degree_one_hot(torch.tensor(d - m + 2))))
                for p in range(d):
                    takes[d, p, t] = float(1 <= (p - i) % d <= m - 1)
    return u, w, shape, takes


@functools.lru_cache(maxsize=None)
def _allowed_table(D: int) -> np.ndarray:
    """``(D + 1, V)``: row ``d`` = the tokens a vertex of degree ``d`` may take (row 0: NO_SPLIT only)."""
    V = 2 + D * (D - 1)
    t = np.zeros((D + 1, V), dtype=bool)
    t[:, NO_SPLIT] = True
    for d in range(3, D + 1):
        for i in range(d):
            for m in range(1, d):
                t[d, 1 + i * (D - 1) + (m - 1)] = True
    return t
