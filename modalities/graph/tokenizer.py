"""Exact-structure pyramid tokenizer for graphs: next-scale prediction = next coarsening level.

A graph ``G`` is coarsened into ``G_0 (1 node) ... G_{K-1} (= G)`` by
:func:`~modalities.graph.coarsen.coarsen` (every coarse node has 1 or 2 children).
Going from ``G_k`` to ``G_{k+1}`` takes two scales of tokens:

* ``S_k`` (one token per node of ``G_k``): how the node splits --
  ``SINGLE`` (one child), ``PAIR`` (two children, no edge between them) or
  ``PAIR_EDGE`` (two children joined by an edge);
* ``E_k`` (one token per edge ``(u, v)`` of ``G_k``, ``k >= 1``): which of the
  (at most 2 x 2) child pairs are joined, a non-empty 4-bit mask -> 15 tokens.  The edges
  are dealt into ``edge_chunks`` scales (edge j to chunk ``j % edge_chunks``) so that a
  later chunk is predicted knowing the fine edges the earlier chunks created (triangles
  across three clusters need that: tokens of one scale are sampled independently).

Every fine edge is either inside a cluster (told by ``S_k``) or between two
clusters that are adjacent in ``G_k`` (told by ``E_k``), so the tokens describe
the graph exactly: decode(encode(G)) is isomorphic to G.

Fixed schedule: the transformer needs the same token counts for every graph, so
scale ``S_k`` has ``max_nodes[k]`` positions and ``E_k`` has ``max_edges[k]``; positions
past the real count hold ``PAD`` (and are left out of the loss).  Scales run
``S_0, S_1, E_1^0..E_1^{C-1}, S_2, E_2^0.., ..., S_{K-2}, E_{K-2}^0..E_{K-2}^{C-1}``.

Next-scale input: instead of a VQ latent, the decode state hands the transformer a
fixed feature vector per position of the next scale, computed from the partial
graph decoded so far (valid flag, binary tree-order index of the node(s),
parent split, degree, random-walk return probabilities, clustering, common
neighbours, the endpoints' split tokens, and for edges the fine degrees and common fine
neighbours of the child pairs from the edges decided so far).  Teacher forcing and sampling run the
very same state, so they agree exactly.

Decoding is total: any token sequence gives a simple undirected graph without
self loops.  Tokens of the wrong kind are read as ``SINGLE`` (node positions) or
"drop the edge" (edge positions); mask bits naming a missing child are ignored;
growth past the schedule's capacity is cut (extra splits become ``SINGLE``,
extra edges dropped).  For sampling, :meth:`GraphPyramidTokenizer.valid_token_hook` masks the
tokens the decoder would reinterpret (PAD or a wrong kind at a real position, a real token at
a padding position, mask bits naming a missing child), so no probability is spent on them.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch_geometric.data import Batch

from msar import OperatorPyramid, PretrainedMixin, ScaleSchedule

from .coarsen import MATCHINGS, Level, assignments, coarsen, num_levels_for
from .datasets import graphs_from, to_data

SINGLE, PAIR, PAIR_EDGE = 0, 1, 2
EDGE0 = 3  # edge token = EDGE0 + mask - 1 for a mask in 1..15 (bit 2 * i + j: child i of u -- child j of v)
PAD = EDGE0 + 15
VOCAB = PAD + 1
RW_STEPS = (2, 3, 4, 5)


def _bits(i: int, nbits: int) -> np.ndarray:
    return np.array([1.0 if (i >> b) & 1 else -1.0 for b in range(nbits)], dtype=np.float32)


class _LevelGraph:
    """Per-sample partial graph at the current level, with the stats the features need."""

    @functools.cached_property
    def parent_links(self) -> dict[tuple[int, int], int]:
        """Sorted parent pair -> edges of this level joining their children (the level is fixed, so
        every edge chunk of its expansion reads the same counts)."""
        links: dict[tuple[int, int], int] = {}
        for x, y in self.edges:
            px, py = sorted((self.parent_of[x], self.parent_of[y]))
            if px != py:
                links[(px, py)] = links.get((px, py), 0) + 1
        return links

    def __init__(self, n: int, edges: list[tuple[int, int]], parent_split: list[int], child_rank: list[int],
                 parent_of: list[int]):
        self.n, self.edges = n, edges
        self.parent_split, self.child_rank, self.parent_of = parent_split, child_rank, parent_of
        A = np.zeros((n, n), dtype=np.float64)
        for u, v in edges:
            A[u, v] = A[v, u] = 1.0
        self.A = A
        self.deg = A.sum(1)
        # random-walk return probabilities (diagonal of (D^-1 A)^t)
        P = A / np.maximum(self.deg, 1)[:, None]
        self.rw = np.zeros((n, len(RW_STEPS)), dtype=np.float64)
        M = P.copy()
        t = 1
        for j, s in enumerate(RW_STEPS):
            while t < s:
                M = M @ P
                t += 1
            self.rw[:, j] = np.diag(M)
        A2 = A @ A
        self.common = A2  # common neighbours of (u, v)
        tri = (A2 * A).sum(1) / 2
        denom = self.deg * (self.deg - 1) / 2
        self.clust = np.where(denom > 0, tri / np.maximum(denom, 1), 0.0)


class GraphPyramidTokenizer(PretrainedMixin):
    """Exact pyramid tokenizer of simple undirected graphs (see the module docstring).

    Args:
        max_nodes: ``K`` ints, capacity of every level (the last is the largest graph size).
        max_edges: ``K`` ints, capacity of the edge lists of levels ``1..K-2`` (others unused).
        nbits: bits of the binary tree-order index fed as a feature (default: enough for ``max_nodes[-1]``).
        edge_chunks: the edge tokens of a level are split into this many scales (edge j goes to
            chunk ``j % edge_chunks``), so later chunks see the fine edges earlier ones decided.
        matching: the coarsening's matching, ``"greedy"``, ``"max"`` or ``"aligned"`` (see :func:`coarsen`).
        final_chunks: chunks of the finest expansion (level ``K - 2``, whose edge masks decide the
            graph's own edges); default ``edge_chunks``. With as many chunks as that level has edge
            positions (``max_edges[K - 2]``), every fine edge mask is predicted knowing all earlier ones.
        face_features: add, for the edge positions of the finest expansion, whether each child pair
            lies on a common face of a planar embedding of the fine graph decided so far (and whether
            that graph is planar): what a pair's crossing an earlier edge depends on, which degrees and
            common neighbours do not tell (see :meth:`GraphDecodeState._face_block`).
        parent_links: add, for every edge position ``(u, v)`` of ``G_k`` whose endpoints have different
            parents, how many edges of ``G_k`` join the children of those two parents (1, or 2 and more):
            the bit count of the parent edge's mask, one level up.  With ``matching="aligned"`` on a
            lattice it says whether the edge runs along or across the previous split, which decides
            its own mask.

    Use :meth:`fit` to size it from a training set; ``save_pretrained(dir)`` /
    ``GraphPyramidTokenizer.from_pretrained(dir)`` save and load it (a config, no weights).
    """

    def __init__(self, max_nodes: Sequence[int], max_edges: Sequence[int], nbits: int | None = None,
                 edge_chunks: int = 3, matching: str = "greedy", final_chunks: int | None = None,
                 face_features: bool = False, parent_links: bool = False):
        K = len(max_nodes)
        if K < 2:
            raise ValueError(f"need at least 2 levels (max_nodes of length >= 2), got {list(max_nodes)}")
        if len(max_edges) != K:
            raise ValueError(f"max_edges must have one entry per level ({K}), got {len(max_edges)}")
        if max_nodes[0] != 1:
            raise ValueError(f"the top level has exactly one node: max_nodes[0] must be 1, got {max_nodes[0]}")
        self.K = K
        self.max_nodes = [int(x) for x in max_nodes]
        self.max_edges = [max(1, int(x)) for x in max_edges]
        self.nbits = int(nbits) if nbits else max(1, math.ceil(math.log2(max(self.max_nodes[-1], 2))))
        if int(edge_chunks) < 1:
            raise ValueError(f"edge_chunks must be >= 1, got {edge_chunks}")
        self.edge_chunks = int(edge_chunks)
        if final_chunks is not None and int(final_chunks) < 1:
            raise ValueError(f"final_chunks must be >= 1 (or None: edge_chunks), got {final_chunks}")
        self.final_chunks = None if final_chunks is None else int(final_chunks)
        if matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
        self.matching = matching
        self.face_features = bool(face_features)
        self.parent_links = bool(parent_links)
        # scales: S_k for k in 0..K-2, then (k >= 1) the chunks E_k^0 .. E_k^{C-1}: ('S', k, 0) / ('E', k, c)
        self.kinds: list[tuple[str, int, int]] = []
        counts: list[int] = []
        for k in range(K - 1):
            self.kinds.append(("S", k, 0))
            counts.append(self.max_nodes[k])
            if k >= 1:
                C = self.chunks_at(k)
                for c in range(C):
                    self.kinds.append(("E", k, c))
                    counts.append(max(1, -(-self.max_edges[k] // C)))
        self.schedule = ScaleSchedule(counts)
        self.vocab_size = VOCAB
        self.pad_token = PAD  # the token of positions past a level's nodes / edges (left out of the loss)
        self._node_dim = 13
        self._links_at = 5 + 2 * self.nbits + 2 * self._node_dim + 2 + 8 + (5 if self.face_features else 0)
        raw = self._links_at + (2 if self.parent_links else 0)
        self.latent_dim = int(8 * math.ceil(raw / 8))

    def chunks_at(self, level: int) -> int:
        """Edge chunks (scales) of the expansion of ``level``: ``final_chunks`` for ``K - 2``, else ``edge_chunks``."""
        return self.final_chunks if level == self.K - 2 and self.final_chunks is not None else self.edge_chunks

    # ------------------------------------------------------------------ construction
    @classmethod
    def fit(cls, graphs: Sequence[nx.Graph], edge_slack: float = 0.1, node_slack: int = 0,
            edge_chunks: int = 3, matching: str = "greedy",
            final_chunks: int | str | None = None, face_features: bool = False,
            parent_links: bool = False) -> "GraphPyramidTokenizer":
        """Size a tokenizer for a training set: levels for the largest graph, edge capacity
        ``(1 + edge_slack) x`` the largest seen per level. ``final_chunks="all"``: one chunk per edge
        position of the finest expansion (its masks are then predicted one at a time)."""
        graphs = graphs_from(graphs)
        nmax = max(2, max(G.number_of_nodes() for G in graphs) + int(node_slack))
        K = num_levels_for(nmax)
        max_nodes = [int(math.ceil(nmax / 2 ** (K - 1 - k))) for k in range(K)]
        max_edges = [0] * K
        for G in graphs:
            for k, lvl in enumerate(coarsen(G, K, matching)):
                max_edges[k] = max(max_edges[k], len(lvl.edges))
        max_edges = [int(math.ceil(m * (1 + edge_slack))) for m in max_edges]
        if final_chunks == "all":
            final_chunks = max(1, max_edges[K - 2]) if K >= 3 else None
        elif isinstance(final_chunks, str):
            raise ValueError(f"final_chunks must be an int, None or 'all', got {final_chunks!r}")
        return cls(max_nodes, max_edges, edge_chunks=edge_chunks, matching=matching, final_chunks=final_chunks,
                   face_features=face_features, parent_links=parent_links)

    @property
    def config(self) -> dict:
        """The constructor's arguments (``save_pretrained`` writes them; no weights)."""
        return {"max_nodes": self.max_nodes, "max_edges": self.max_edges, "nbits": self.nbits,
                "edge_chunks": self.edge_chunks, "matching": self.matching, "final_chunks": self.final_chunks,
                "face_features": self.face_features, "parent_links": self.parent_links}

    # ------------------------------------------------------------------ encoding
    def check_data(self, graphs: list[nx.Graph]) -> None:
        for i, G in enumerate(graphs):
            n = G.number_of_nodes()
            if n == 0:
                raise ValueError(f"graph {i}: has no nodes; expected at least one")
            if n > self.max_nodes[-1]:
                raise ValueError(f"graph {i}: {n} nodes, but this tokenizer holds at most {self.max_nodes[-1]}")

    def levels(self, G: nx.Graph) -> list[Level]:
        return coarsen(G, self.K, self.matching)

    def encode_graph(self, G: nx.Graph) -> list[list[int]]:
        """Token lists (unpadded) per scale for one graph."""
        lv = self.levels(G)
        out = []
        edge_toks: dict[int, list[int]] = {}
        for kind, k, c in self.kinds:
            fine = set(lv[k + 1].edges)
            if kind == "S":
                toks = []
                for kids in lv[k].children:
                    if len(kids) == 1:
                        toks.append(SINGLE)
                    else:
                        toks.append(PAIR_EDGE if (min(kids), max(kids)) in fine else PAIR)
                if len(toks) > self.max_nodes[k]:
                    raise ValueError(f"level {k} has {len(toks)} nodes, capacity {self.max_nodes[k]}")
                out.append(toks)
                continue
            if k not in edge_toks:
                toks = []
                for u, v in lv[k].edges:
                    mask = 0
                    for i, a in enumerate(lv[k].children[u]):
                        for j, b in enumerate(lv[k].children[v]):
                            if (min(a, b), max(a, b)) in fine:
                                mask |= 1 << (2 * i + j)
                    toks.append(EDGE0 + mask - 1)
                if len(toks) > self.max_edges[k]:
                    raise ValueError(f"graph has {len(toks)} edges at level {k}, the tokenizer's capacity is "
                                     f"{self.max_edges[k]}; refit with a larger edge_slack")
                edge_toks[k] = toks
            out.append(edge_toks[k][c::self.chunks_at(k)])
        return out

    @torch.no_grad()
    def encode(self, data: Any) -> list[torch.Tensor]:
        """``Data`` / ``Batch`` / networkx graph(s) -> per scale ``(B, n_k)`` long, PAD-filled."""
        graphs = graphs_from(data)
        self.check_data(graphs)
        per = [self.encode_graph(G) for G in graphs]
        out = []
        for s, n in enumerate(self.schedule.token_counts):
            t = torch.full((len(graphs), n), PAD, dtype=torch.long)
            for b, toks in enumerate(per):
                if toks[s]:
                    t[b, :len(toks[s])] = torch.tensor(toks[s])
            out.append(t)
        return out

    def valid_mask(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, L)`` bool: positions that hold a real node or edge (the ones the loss counts).
        For encoded data these are exactly the non-PAD positions."""
        return torch.cat([idx != PAD for idx in indices], 1)

    # ------------------------------------------------------------------ decoding
    def start(self, batch_size: int, device: torch.device | str = "cpu", context: Any = None) -> "GraphDecodeState":
        """A decode state that grows ``batch_size`` graphs from a single node. Graphs are
        generated structure first, so no per-sample ``context`` is taken."""
        if context is not None:
            raise TypeError(f"GraphPyramidTokenizer.start takes no context, got {type(context).__name__}")
        return GraphDecodeState(self, batch_size, device)

    @torch.no_grad()
    def teacher_forcing_input(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, L - n_0, C)``: what the decode state hands the transformer, fed the true tokens."""
        B = self.schedule.check_indices(indices, self.vocab_size)
        st = self.start(B, indices[0].device)
        pieces = []
        for k, idx in enumerate(indices):
            nxt = st.add_scale(k, idx)
            if nxt is not None:
                pieces.append(nxt)
        return torch.cat(pieces, 1) if pieces else torch.zeros(B, 0, self.latent_dim)

    @torch.no_grad()
    def decode(self, indices: Sequence[torch.Tensor]) -> Batch:
        B = self.schedule.check_indices(indices, self.vocab_size)
        st = self.start(B, indices[0].device)
        for k, idx in enumerate(indices):
            st.add_scale(k, idx)
        return self.finish(st)

    @torch.no_grad()
    def decode_progression(self, indices: Sequence[torch.Tensor]) -> list[list[nx.Graph]]:
        """Per level ``G_0 .. G_{K-1}``, the decoded graphs of the batch (coarse to fine)."""
        B = self.schedule.check_indices(indices, self.vocab_size)
        st = self.start(B, indices[0].device)
        for k, idx in enumerate(indices):
            st.add_scale(k, idx)
        return [[_graph(n, e) for n, e in lvl] for lvl in st.history]

    def valid_token_hook(self, k: int, logits: torch.Tensor, state: "GraphDecodeState") -> torch.Tensor:
        """A ``logits_hook`` for :func:`msar.sample`: ``-inf`` on every token of scale k the decoder
        would have to reinterpret, given the graph decoded so far (see :meth:`GraphDecodeState.allowed`)::

            msar.sample(model, tok, batch_size=B, logits_hook=tok.valid_token_hook)
        """
        if not isinstance(state, GraphDecodeState) or state.tok is not self:
            raise TypeError("valid_token_hook needs a decode state made by this tokenizer's start(), "
                            f"got {type(state).__name__}")
        ok = state.allowed(k).to(logits.device)
        if ok.shape != logits.shape:
            raise ValueError(f"valid_token_hook: logits of shape {tuple(logits.shape)} at scale {k}, "
                             f"expected {tuple(ok.shape)}")
        return logits.masked_fill(~ok, float("-inf"))

    def finish(self, state: "GraphDecodeState") -> Batch:
        if not state.done:
            raise ValueError(f"finish: the decode state has seen {state.s} of {len(self.schedule)} scales")
        return Batch.from_data_list([to_data(_graph(g.n, g.edges)) for g in state.graphs])

    # ------------------------------------------------------------------ core pyramid of a batch
    def pyramid(self, data: Any) -> OperatorPyramid:
        """The coarsening hierarchy as a core :class:`msar.OperatorPyramid` (per-sample cluster maps).

        Node levels of a batch are padded to the capacity ``max_nodes`` (padding nodes form
        their own clusters), so a latent of shape ``(B, C, max_nodes[-1])`` can be restricted
        to any level -- the pyramid a lossy node-latent (MAG-style) variant would quantize over.
        """
        graphs = graphs_from(data)
        self.check_data(graphs)
        N = self.max_nodes[-1]
        rows = []
        for G in graphs:
            a = assignments(self.levels(G))
            n = G.number_of_nodes()
            full = []
            for k, ak in enumerate(a):
                pad = np.minimum(np.arange(n, N), self.max_nodes[k] - 1)  # padding nodes fold into the last cluster
                full.append(np.concatenate([ak, pad]) if N > n else ak)
            rows.append(full)
        ass = [torch.as_tensor(np.stack([r[k] for r in rows]), dtype=torch.long) for k in range(self.K)]
        # padded levels leave clusters without members (a small graph has fewer clusters than the capacity)
        return OperatorPyramid.from_assignments(ScaleSchedule(self.max_nodes), ass, allow_empty=True)


def _mask_table() -> np.ndarray:
    """``(2, 2, 15)`` bool: edge token ``EDGE0 + m - 1`` is valid between clusters of ``nu + 1`` and
    ``nv + 1`` children iff every set bit ``2 * i + j`` of the mask m has i <= nu and j <= nv."""
    t = np.zeros((2, 2, 15), dtype=bool)
    for nu in range(2):
        for nv in range(2):
            for m in range(1, 16):
                t[nu, nv, m - 1] = all(not (m >> (2 * i + j)) & 1 or (i <= nu and j <= nv)
                                       for i in range(2) for j in range(2))
    return t


_MASK_OK = _mask_table()


def _face_sets(n: int, edges: set) -> tuple[nx.Graph, list[set], list[int]] | None:
    """For the graph ``(n, edges)``: the graph, per node the ids of the faces of one planar embedding
    it lies on, and per node its connected component; None when the graph is not planar."""
    G = _graph(n, edges)
    ok, emb = nx.check_planarity(G)
    if not ok:
        return None
    on: list[set] = [set() for _ in range(n)]
    seen: set = set()
    for u, v in emb.edges():
        if (u, v) in seen:
            continue
        f = len(seen)  # a fresh id per face (seen grows by the face's half-edges)
        for w in emb.traverse_face(u, v, mark_half_edges=seen):
            on[w].add(f)
    comp = [0] * n
    for i, cc in enumerate(nx.connected_components(G)):
        for w in cc:
            comp[w] = i
    return G, on, comp


def _face_block(faces: tuple[nx.Graph, list[set], list[int]] | None, ku: list[int], kv: list[int]) -> np.ndarray:
    """``(5,)``: [the partial fine graph is planar, then per child pair 2 * i + j: the graph stays
    planar with the pair's edge added (0 for a missing child)].  Exact: the fast answer "yes" when
    the two nodes lie in different components or on a common face of one embedding, else a
    planarity test (an embedding is not unique, so not sharing a face in it proves nothing)."""
    out = np.zeros(5, dtype=np.float32)
    if faces is None:
        return out
    G, on, comp = faces
    out[0] = 1.0
    for i, a in enumerate(ku):
        for j, c in enumerate(kv):
            if comp[a] != comp[c] or on[a] & on[c]:
                out[1 + 2 * i + j] = 1.0
            elif not G.has_edge(a, c):
                G.add_edge(a, c)
                out[1 + 2 * i + j] = float(nx.check_planarity(G)[0])
                G.remove_edge(a, c)
            else:
                out[1 + 2 * i + j] = 1.0
    return out


def _graph(n: int, edges: Sequence[tuple[int, int]]) -> nx.Graph:
    G = nx.Graph()
    G.add_nodes_from(range(n))
    G.add_edges_from(edges)
    return G


class GraphDecodeState:
    """Incremental decoder: after each scale returns the features of the next one.

    ``graphs[b]`` is sample b's current level; while the edge chunks of a level are being
    added, ``fine[b]`` holds the fine edges decided so far and ``children[b]`` the children
    of every current node. ``history`` keeps ``(n, edges)`` of every completed level.
    """

    def __init__(self, tok: GraphPyramidTokenizer, batch_size: int, device: torch.device | str = "cpu"):
        self.tok, self.B, self.device = tok, int(batch_size), torch.device(device)
        self.s = 0  # next scale to add
        self.level = 0
        self.graphs = [_LevelGraph(1, [], [SINGLE], [0], [0]) for _ in range(self.B)]
        self.splits: list[list[int]] = [[] for _ in range(self.B)]
        self.children: list[list[list[int]]] = [[] for _ in range(self.B)]
        self.fine: list[set] = [set() for _ in range(self.B)]
        self.history: list[list[tuple[int, list]]] = [[(1, [])] * self.B]
        self.indices: list[torch.Tensor] = []  # the tokens added so far, per scale (B, n_k)
        self.done = False

    # ---- features
    def _node_block(self, g: _LevelGraph, u: int, split: int | None) -> np.ndarray:
        f = np.zeros(self.tok._node_dim, dtype=np.float32)
        f[g.parent_split[u]] = 1.0
        f[3] = g.child_rank[u]
        f[4] = math.log1p(g.deg[u]) / 3
        f[5:9] = g.rw[u]
        f[9] = g.clust[u]
        if split is not None:
            f[10 + split] = 1.0
        return f

    def _features(self, kind: str, k: int, chunk: int = 0) -> torch.Tensor:
        """``(B, n_pos, C)`` inputs of scale (kind, level k, chunk)."""
        tok = self.tok
        nb, nd, C = tok.nbits, tok._node_dim, tok.chunks_at(k)
        n_pos = tok.schedule.token_counts[self.s] if not self.done else 0
        X = np.zeros((self.B, n_pos, tok.latent_dim), dtype=np.float32)
        o_u, o_v = 5, 5 + nb
        o_nu, o_nv, o_e = 5 + 2 * nb, 5 + 2 * nb + nd, 5 + 2 * nb + 2 * nd
        for b, g in enumerate(self.graphs):
            X[b, :, 1 if kind == "S" else 2] = 1.0
            X[b, :, 3] = g.n / tok.max_nodes[k]
            X[b, :, 4] = math.log1p(len(g.edges)) / 8
            if kind == "S":
                for u in range(g.n):
                    X[b, u, 0] = 1.0
                    X[b, u, o_u:o_u + nb] = _bits(u, nb)
                    X[b, u, o_nu:o_nu + nd] = self._node_block(g, u, None)
                continue
            sp, kids = self.splits[b], self.children[b]
            # the partial fine graph: intra-cluster edges and the edges of earlier chunks
            nf = sum(len(c) for c in kids)
            Af = np.zeros((nf, nf), dtype=np.float64)
            for a, c in self.fine[b]:
                Af[a, c] = Af[c, a] = 1.0
            degf, A2f = Af.sum(1), Af @ Af
            faces = (_face_sets(nf, self.fine[b]) if tok.face_features and k == tok.K - 2 else None)
            for p, j in enumerate(range(chunk, len(g.edges), C)):
                if p >= n_pos:
                    break
                u, v = g.edges[j]
                X[b, p, 0] = 1.0
                X[b, p, o_u:o_u + nb] = _bits(u, nb)
                X[b, p, o_v:o_v + nb] = _bits(v, nb)
                X[b, p, o_nu:o_nu + nd] = self._node_block(g, u, sp[u])
                X[b, p, o_nv:o_nv + nd] = self._node_block(g, v, sp[v])
                X[b, p, o_e] = math.log1p(g.common[u, v]) / 2
                X[b, p, o_e + 1] = 1.0 if g.parent_of[u] == g.parent_of[v] else 0.0
                # child-level context: fine degrees so far, and common fine neighbours of each child pair
                for i, a in enumerate(kids[u]):
                    X[b, p, o_e + 2 + i] = math.log1p(degf[a]) / 2
                    for jj, c in enumerate(kids[v]):
                        X[b, p, o_e + 6 + 2 * i + jj] = math.log1p(A2f[a, c]) / 2
                for jj, c in enumerate(kids[v]):
                    X[b, p, o_e + 4 + jj] = math.log1p(degf[c]) / 2
                if faces is not None:
                    X[b, p, o_e + 10:o_e + 15] = _face_block(faces, kids[u], kids[v])
                if tok.parent_links:
                    pu, pv = sorted((g.parent_of[u], g.parent_of[v]))
                    if pu != pv:
                        X[b, p, tok._links_at + min(g.parent_links[(pu, pv)], 2) - 1] = 1.0
        return torch.from_numpy(X).to(self.device)

    # ---- which tokens are valid
    def allowed(self, k: int) -> torch.Tensor:
        """``(B, n_k, V)`` bool: the tokens of scale k that the decoder reads as they are, given the
        graph decoded so far (call it before ``add_scale(k, ...)``, i.e. when ``self.s == k``).

        * ``S_k``, node u < n: ``SINGLE`` / ``PAIR`` / ``PAIR_EDGE``, or only ``SINGLE`` when the next
          level is already full (n >= its capacity: every split would be forced to ``SINGLE``);
        * ``E_k``, position p holding coarse edge (u, v) of this chunk: the non-empty masks whose
          bits ``2 * i + j`` name existing children (i < #children(u), j < #children(v));
        * every other position: ``PAD`` only.

        Every encoded graph's tokens are allowed. Not enforced: a scale's splits are sampled
        independently, so too many ``PAIR`` tokens on one scale can still exceed the next level's
        capacity (the decoder then reads the later ones as ``SINGLE``).
        """
        tok = self.tok
        if self.done or k != self.s:
            raise ValueError(f"allowed: the decode state is at scale {self.s if not self.done else 'end'}, got {k}")
        n_pos = tok.schedule.token_counts[k]
        ok = np.zeros((self.B, n_pos, tok.vocab_size), dtype=bool)
        ok[:, :, PAD] = True
        kind, lvl, chunk = tok.kinds[k]
        if kind == "S":
            cap = tok.max_nodes[lvl + 1]
            for b, g in enumerate(self.graphs):
                ok[b, :g.n, PAD] = False
                ok[b, :g.n, SINGLE] = True
                if g.n < cap:  # with n >= cap, _read_splits forces every split to SINGLE
                    ok[b, :g.n, PAIR] = ok[b, :g.n, PAIR_EDGE] = True
            return torch.from_numpy(ok).to(self.device)
        C = tok.chunks_at(lvl)
        for b, g in enumerate(self.graphs):
            kids = self.children[b]
            for p, j in enumerate(range(chunk, len(g.edges), C)):
                if p >= n_pos:
                    break
                u, v = g.edges[j]
                ok[b, p, PAD] = False
                ok[b, p, EDGE0:PAD] = _MASK_OK[len(kids[u]) - 1, len(kids[v]) - 1]
        return torch.from_numpy(ok).to(self.device)

    # ---- structure
    def _read_splits(self, g: _LevelGraph, row: list[int], cap: int) -> list[int]:
        sp, total = [], 0
        for u in range(g.n):
            t = row[u] if row[u] in (SINGLE, PAIR, PAIR_EDGE) else SINGLE
            if t != SINGLE and total + 2 + (g.n - u - 1) > cap:  # keep room for one child each of the rest
                t = SINGLE
            total += 1 if t == SINGLE else 2
            sp.append(t)
        return sp

    def _start_expansion(self, b: int) -> None:
        """After S_k: lay out the children and the intra-cluster fine edges."""
        g, sp = self.graphs[b], self.splits[b]
        kids, c = [], 0
        for u in range(g.n):
            kids.append([c] if sp[u] == SINGLE else [c, c + 1])
            c += len(kids[-1])
        self.children[b] = kids
        self.fine[b] = {(ks[0], ks[1]) for u, ks in enumerate(kids) if sp[u] == PAIR_EDGE}

    def _apply_chunk(self, b: int, lvl: int, chunk: int, row: list[int]) -> None:
        g, kids, C = self.graphs[b], self.children[b], self.tok.chunks_at(lvl)
        for p, j in enumerate(range(chunk, len(g.edges), C)):
            if p >= len(row):
                break
            t = row[p]
            if not EDGE0 <= t < PAD:
                continue  # a non-edge token at an edge position: the edge is dropped
            mask = t - EDGE0 + 1
            u, v = g.edges[j]
            for i, a in enumerate(kids[u]):
                for jj, c in enumerate(kids[v]):
                    if mask >> (2 * i + jj) & 1:
                        self.fine[b].add((min(a, c), max(a, c)))

    def _finish_expansion(self, b: int, cap_edges: int | None) -> _LevelGraph:
        g, sp, kids = self.graphs[b], self.splits[b], self.children[b]
        parent_split, child_rank, parent_of = [], [], []
        for u in range(g.n):
            for r in range(len(kids[u])):
                parent_split.append(sp[u])
                child_rank.append(r)
                parent_of.append(u)
        edges = sorted(self.fine[b])
        if cap_edges is not None and len(edges) > cap_edges:
            edges = edges[:cap_edges]
        return _LevelGraph(len(parent_split), edges, parent_split, child_rank, parent_of)

    def add_scale(self, k: int, idx: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor | None:
        """Add scale k's tokens ``(B, n_k)``; return the ``(B, n_{k+1}, C)`` features of the next scale,
        or None after the last. ``probs`` (soft codewords) has no meaning for structure tokens and is ignored."""
        tok = self.tok
        if self.done or k != self.s:
            raise ValueError(f"scales must be added in order: expected scale {self.s}, got {k}")
        n = tok.schedule.token_counts[k]
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or tuple(idx.shape) != (self.B, n):
            got = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"scale {k}: expected indices of shape ({self.B}, {n}), got {got}")
        rows = idx.tolist()
        kind, lvl, chunk = tok.kinds[k]
        self.indices.append(idx)
        self.s += 1
        if kind == "S":
            cap = tok.max_nodes[lvl + 1]
            self.splits = [self._read_splits(g, r, cap) for g, r in zip(self.graphs, rows)]
            for b in range(self.B):
                self._start_expansion(b)
            if lvl >= 1:  # G_0 has no edges, so no edge scales: expand right away
                return self._features("E", lvl, 0)
        else:
            for b in range(self.B):
                self._apply_chunk(b, lvl, chunk, rows[b])
            if chunk + 1 < tok.chunks_at(lvl):
                return self._features("E", lvl, chunk + 1)
        # the level is complete: G_{lvl+1}
        self.graphs = [self._finish_expansion(b, self._edge_cap(lvl + 1)) for b in range(self.B)]
        self.level = lvl + 1
        self.history.append([(g.n, list(g.edges)) for g in self.graphs])
        if self.level == tok.K - 1:
            self.done = True
            return None
        return self._features("S", self.level)

    def _edge_cap(self, level: int) -> int | None:
        return self.tok.max_edges[level] if level <= self.tok.K - 2 else None
