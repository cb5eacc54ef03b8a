"""Graph generation metrics: MMD of graph statistics, and validity / uniqueness / novelty.

MMD follows the evaluation code of GraphRNN (You et al. 2018) and GRAN (Liao et al. 2019),
which later papers (SPECTRE, DiGress, HiGen) reuse:

``MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y)`` over all pairs (i = j included),
so the MMD of a set with itself is exactly 0.  Per-graph statistics:

* degree:     ``nx.degree_histogram``, normalised to a distribution;
* clustering: histogram of local clustering coefficients, 100 bins on [0, 1];
* spectrum:   histogram of normalised-Laplacian eigenvalues, 200 bins on [-1e-5, 2];
* orbit:      mean (per node) counts of the 15 node orbits of the 2-, 3- and 4-node graphlets
              (ORCA's orbits 0..14), a vector, not a histogram.

Kernels: ``"tv"`` = GRAN's Gaussian total-variation kernel ``exp(-TV(x, y)^2 / 2 sigma^2)``;
``"emd"`` = GraphRNN's Gaussian EMD kernel ``exp(-EMD(x, y)^2 / 2 sigma^2)`` (1-D EMD with
ground distance ``|i - j| * scale``).  Sigmas as published: degree 1, clustering 0.1
(EMD scale 100 = bins), spectrum 1, orbit 30 (orbit vectors use the TV form under ``"tv"``
as GRAN did, and the plain Gaussian ``exp(-||x - y||^2 / 2 sigma^2)`` under ``"emd"`` as GraphRNN did).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import networkx as nx
import numpy as np

# ---------------------------------------------------------------------------- per-graph statistics


def degree_hist(G: nx.Graph) -> np.ndarray:
    return np.asarray(nx.degree_histogram(G), dtype=np.float64)


def clustering_hist(G: nx.Graph, bins: int = 100) -> np.ndarray:
    c = list(nx.clustering(G).values())
    h, _ = np.histogram(c, bins=bins, range=(0.0, 1.0), density=False)
    return h.astype(np.float64)


def spectral_hist(G: nx.Graph, bins: int = 200) -> np.ndarray:
    if G.number_of_nodes() == 0:
        return np.zeros(bins)
    L = nx.normalized_laplacian_matrix(G).toarray()
    eig = np.linalg.eigvalsh(L)
    h, _ = np.histogram(eig, bins=bins, range=(-1e-5, 2.0), density=False)
    return h / max(h.sum(), 1)


def graphlet_counts(G: nx.Graph) -> dict[str, float]:
    """Induced counts of every connected graphlet with 2..4 nodes, by closed formulas.

    Non-induced counts come from the adjacency matrix (walks, degrees, common
    neighbours); induced counts follow by subtracting the copies each denser
    graphlet contains (e.g. a diamond contains 4 paws and 1 four-cycle).
    """
    n = G.number_of_nodes()
    keys = ("edge", "wedge", "triangle", "path4", "star", "cycle4", "paw", "diamond", "k4")
    if n == 0:
        return {k: 0.0 for k in keys}
    A = nx.to_numpy_array(G, nodelist=sorted(G.nodes()), dtype=np.float64)
    np.fill_diagonal(A, 0)
    d = A.sum(1)
    m = d.sum() / 2
    A2 = A @ A
    t_v = (A2 * A).sum(1) / 2  # triangles at each node
    T = t_v.sum() / 3
    wedge_ni = (d * (d - 1) / 2).sum()
    iu, ju = np.nonzero(np.triu(A))
    c_e = A2[iu, ju]  # common neighbours of each edge
    # K4: for each edge, edges among its common neighbours; each K4 counted on its 6 edges
    k4 = 0.0
    for u, v, c in zip(iu, ju, c_e):
        if c >= 2:
            cn = np.nonzero(A[u] * A[v])[0]
            k4 += A[np.ix_(cn, cn)].sum() / 2
    k4 /= 6
    path4_ni = ((d[iu] - 1) * (d[ju] - 1)).sum() - 3 * T
    star_ni = (d * (d - 1) * (d - 2) / 6).sum()
    cycle4_ni = (np.trace(A2 @ A2) - 2 * (d ** 2).sum() + 2 * m) / 8
    paw_ni = (t_v * (d - 2)).sum()
    diamond_ni = (c_e * (c_e - 1) / 2).sum()
    diamond = diamond_ni - 6 * k4
    cycle4 = cycle4_ni - diamond - 3 * k4
    paw = paw_ni - 4 * diamond - 12 * k4
    star = star_ni - paw - 2 * diamond - 4 * k4
    path4 = path4_ni - 2 * paw - 4 * cycle4 - 6 * diamond - 12 * k4
    vals = (m, wedge_ni - 3 * T, T, path4, star, cycle4, paw, diamond, k4)
    return {k: float(round(v)) for k, v in zip(keys, vals)}


def orbit_vector(G: nx.Graph) -> np.ndarray:
    """Sum over nodes of the 15 orbit counts (ORCA orbits 0..14), divided by the node count.

    Summed over nodes, orbit o of graphlet g counts ``(#nodes of g in orbit o) x (#g)``, so the
    graphlet counts give it directly: orbit 0 edge ends, 1-2 path P3 (ends, middle), 3 triangle,
    4-5 path P4 (ends, inner), 6-7 star (leaves, centre), 8 cycle C4, 9-11 paw (pendant,
    degree-2, degree-3), 12-13 diamond (degree-2, degree-3), 14 K4.
    """
    c = graphlet_counts(G)
    v = np.array([2 * c["edge"], 2 * c["wedge"], c["wedge"], 3 * c["triangle"],
                  2 * c["path4"], 2 * c["path4"], 3 * c["star"], c["star"], 4 * c["cycle4"],
                  c["paw"], 2 * c["paw"], c["paw"], 2 * c["diamond"], 2 * c["diamond"], 4 * c["k4"]])
    return v / max(G.number_of_nodes(), 1)


# ---------------------------------------------------------------------------- kernels and MMD


def _pad(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = max(len(x), len(y))
    return np.pad(x, (0, n - len(x))), np.pad(y, (0, n - len(y)))


# Distances between every row of X (n, D) and of Y (m, D) -> (n, m). The Gaussian kernels below
# are exp(-dist^2 / 2 sigma^2) of these; the scalar forms are kept for readability and tests.
def tv_dist(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    return np.abs(X[:, None, :] - Y[None, :, :]).sum(-1) / 2.0


def emd_dist(X: np.ndarray, Y: np.ndarray, distance_scaling: float = 1.0) -> np.ndarray:
    """1-D earth mover's distance with ground distance ``|i - j| / distance_scaling`` (GraphRNN's
    pyemd call): in 1-D it is the L1 distance between cumulative sums."""
    return tv_dist(np.cumsum(X, 1), np.cumsum(Y, 1)) * 2.0 / distance_scaling


def l2_dist(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    return np.sqrt(np.square(X[:, None, :] - Y[None, :, :]).sum(-1))


_DIST = {"tv": tv_dist, "emd": emd_dist, "l2": l2_dist}


def gaussian_tv(x: np.ndarray, y: np.ndarray, sigma: float = 1.0) -> float:
    x, y = _pad(x, y)
    return float(np.exp(-tv_dist(x[None], y[None])[0, 0] ** 2 / (2 * sigma * sigma)))


def gaussian_emd(x: np.ndarray, y: np.ndarray, sigma: float = 1.0, distance_scaling: float = 1.0) -> float:
    x, y = _pad(x, y)
    return float(np.exp(-emd_dist(x[None], y[None], distance_scaling)[0, 0] ** 2 / (2 * sigma * sigma)))


def gaussian(x: np.ndarray, y: np.ndarray, sigma: float = 1.0) -> float:
    x, y = _pad(x, y)
    return float(np.exp(-l2_dist(x[None], y[None])[0, 0] ** 2 / (2 * sigma * sigma)))


def _stack(vs: Sequence[np.ndarray], D: int) -> np.ndarray:
    return np.stack([np.pad(np.asarray(v, dtype=np.float64), (0, D - len(v))) for v in vs])


def mmd2(X: Sequence[np.ndarray], Y: Sequence[np.ndarray], dist: str = "tv", sigma: float = 1.0,
         is_hist: bool = True, distance_scaling: float = 1.0) -> float:
    """Squared MMD with the biased estimator (all pairs, i = j included, as the published code)
    under ``exp(-dist(x, y)^2 / 2 sigma^2)``; ``dist`` in ``"tv"``, ``"emd"``, ``"l2"``.
    Vectors of different lengths are zero-padded; histograms are normalised first."""
    if len(X) == 0 or len(Y) == 0:
        raise ValueError(f"MMD needs two non-empty sets, got {len(X)} and {len(Y)} samples")
    if dist not in _DIST:
        raise ValueError(f"unknown distance {dist!r}; expected one of {list(_DIST)}")
    D = max(len(v) for v in list(X) + list(Y))
    Xm, Ym = _stack(X, D), _stack(Y, D)
    if is_hist:
        Xm = Xm / np.maximum(Xm.sum(1, keepdims=True), 1e-12)
        Ym = Ym / np.maximum(Ym.sum(1, keepdims=True), 1e-12)
    f = _DIST[dist]
    kw = {"distance_scaling": distance_scaling} if dist == "emd" else {}

    def disc(P, Q):
        return float(np.exp(-f(P, Q, **kw) ** 2 / (2 * sigma * sigma)).mean())

    return disc(Xm, Xm) + disc(Ym, Ym) - 2 * disc(Xm, Ym)


# statistic -> (function, is_hist, kernel kwargs under "tv" (GRAN), under "emd" (GraphRNN))
_STATS = {
    "degree": (degree_hist, True, {"dist": "tv", "sigma": 1.0}, {"dist": "emd", "sigma": 1.0}),
    "clustering": (clustering_hist, True, {"dist": "tv", "sigma": 0.1},
                   {"dist": "emd", "sigma": 0.1, "distance_scaling": 100}),
    "orbit": (orbit_vector, False, {"dist": "tv", "sigma": 30.0}, {"dist": "l2", "sigma": 30.0}),
    "spectral": (spectral_hist, True, {"dist": "tv", "sigma": 1.0}, {"dist": "emd", "sigma": 1.0}),
}


def graph_stats(graphs: Sequence[nx.Graph]) -> dict[str, list[np.ndarray]]:
    """Per-graph statistic vectors of a set (compute once, reuse for several comparisons)."""
    return {name: [f(G) for G in graphs] for name, (f, *_rest) in _STATS.items()}


def mmd_all(ref: Sequence[nx.Graph] | dict, pred: Sequence[nx.Graph] | dict,
            kernels: Sequence[str] = ("tv", "emd")) -> dict[str, float]:
    """``{"degree_tv": ..., "clustering_tv": ..., "orbit_tv": ..., "spectral_tv": ..., *_emd}``:
    squared MMD between two sets (graphs or :func:`graph_stats` results)."""
    sr = ref if isinstance(ref, dict) else graph_stats(ref)
    sp = pred if isinstance(pred, dict) else graph_stats(pred)
    out = {}
    for name, (_f, is_hist, tv_kw, emd_kw) in _STATS.items():
        for kern in kernels:
            if kern not in ("tv", "emd"):
                raise ValueError(f"unknown kernel {kern!r}; expected 'tv' or 'emd'")
            out[f"{name}_{kern}"] = mmd2(sr[name], sp[name], is_hist=is_hist, **(tv_kw if kern == "tv" else emd_kw))
    return out


# ---------------------------------------------------------------------------- structure summary


def face_sizes(G: nx.Graph) -> list[int] | None:
    """Sizes (boundary walk lengths) of the faces of a planar embedding of ``G``, or None when ``G``
    is not planar.  Walk length counts a bridge twice, so a tree on n nodes has one face of 2(n-1).
    A triangulated disc (a Delaunay graph) has every face of size 3 except the outer one."""
    ok, emb = nx.check_planarity(G)
    if not ok:
        return None
    seen, sizes = set(), []
    for u, v in emb.edges():
        if (u, v) in seen:
            continue
        face = emb.traverse_face(u, v, mark_half_edges=seen)
        sizes.append(len(face))
    return sizes


def structure_summary(graphs: Sequence[nx.Graph], max_degree: int = 12) -> dict:
    """Means over a set of the quantities the MMD statistics react to, for diagnosing a sample set:
    nodes, edges, triangles, mean clustering, the degree distribution (share of nodes of degree
    0..``max_degree``, the last entry also counting higher degrees), and for planar graphs the
    faces of a planar embedding: ``nontriangular_faces`` (faces of size > 3 other than the largest
    one, the outer face of a triangulated disc) and ``missing_chords`` (sum over those faces of
    size - 3: the edges that would triangulate them)."""
    if len(graphs) == 0:
        raise ValueError("structure_summary: no graphs")
    deg = np.zeros(max_degree + 1)
    nontri, chords, planar = [], [], 0
    for G in graphs:
        d = np.minimum(np.fromiter((x for _, x in G.degree()), dtype=np.int64, count=G.number_of_nodes()),
                       max_degree)
        deg += np.bincount(d, minlength=max_degree + 1) / max(G.number_of_nodes(), 1)
        fs = face_sizes(G) if G.number_of_edges() else None
        if fs is not None:
            planar += 1
            inner = sorted(fs)[:-1]
            nontri.append(sum(f > 3 for f in inner))
            chords.append(sum(f - 3 for f in inner if f > 3))
    return {
        "graphs": len(graphs),
        "nodes": float(np.mean([G.number_of_nodes() for G in graphs])),
        "edges": float(np.mean([G.number_of_edges() for G in graphs])),
        "triangles": float(np.mean([sum(nx.triangles(G).values()) / 3 for G in graphs])),
        "mean_clustering": float(np.mean([nx.average_clustering(G) if G.number_of_nodes() else 0.0
                                          for G in graphs])),
        "degree_share": [round(float(x), 4) for x in deg / len(graphs)],
        "planar": planar / len(graphs),
        "nontriangular_faces": float(np.mean(nontri)) if nontri else None,
        "missing_chords": float(np.mean(chords)) if chords else None,
    }


# ---------------------------------------------------------------------------- validity, uniqueness, novelty


def is_simple_undirected(G: nx.Graph) -> bool:
    return isinstance(G, nx.Graph) and not G.is_directed() and not G.is_multigraph() and nx.number_of_selfloops(G) == 0


def grid_sides(G: nx.Graph) -> tuple[int, int] | None:
    """``(a, b)`` with ``2 <= a <= b`` when ``G`` is isomorphic to the 2-D grid ``a x b``, else None."""
    n, m = G.number_of_nodes(), G.number_of_edges()
    if n < 4 or not nx.is_connected(G):
        return None
    degs = sorted(d for _, d in G.degree())
    if max(degs) > 4 or degs[:4] != [2, 2, 2, 2]:
        return None
    for a in range(2, int(np.sqrt(n)) + 1):
        if n % a:
            continue
        b = n // a
        if m == a * (b - 1) + b * (a - 1) and nx.is_isomorphic(G, nx.grid_2d_graph(a, b)):
            return a, b
    return None


def is_grid(G: nx.Graph) -> bool:
    """Isomorphic to a 2-D grid ``a x b`` (a, b >= 2) with ``a * b = n``."""
    return grid_sides(G) is not None


def is_lobster(G: nx.Graph) -> bool:
    """A tree whose removal of leaves, twice, leaves a path (GRAN's check)."""
    if G.number_of_nodes() == 0 or not nx.is_tree(G):
        return False
    H = G.copy()
    for _ in range(2):
        H.remove_nodes_from([v for v, d in H.degree() if d <= 1])
    if H.number_of_nodes() <= 1:
        return True
    return max(d for _, d in H.degree()) <= 2 and nx.is_connected(H)


def is_planar_valid(G: nx.Graph) -> bool:
    return G.number_of_nodes() > 0 and nx.is_connected(G) and nx.check_planarity(G)[0]


VALIDITY: dict[str, Callable[[nx.Graph], bool] | None] = {
    "planar": is_planar_valid, "grid": is_grid, "lobster": is_lobster,
    "community-small": None, "sbm": None,  # no structural validity is defined for these
}


class ValidityFilter:
    """Rejection sampling on a validity check: of the graphs offered in draw order, keep the first
    ``n`` that pass ``check``, drawing at most ``max_draws`` in all.

    While the budget lasts the kept graphs are exact draws of the model conditioned on validity
    (a later draw is kept or rejected by the same rule as an earlier one).  When it runs out, the
    earliest rejected graphs fill the set up to ``n``, so its validity is reported as it is rather
    than the set shrinking.  ``check=None`` keeps everything (no rejection, ``max_draws = n``).

    ``targets`` (one node count per output graph, e.g. drawn from the training sizes) adds rejection
    on the size: a draw is kept only for an output still open whose target is its node count (the
    first such output), so output ``j`` holds a draw of the model conditioned on ``N = targets[j]``
    (and on validity).  A draw's fate depends on its size and the open targets only, so given its
    size a kept graph is still an exact draw.  Outputs left open when the budget runs out are filled
    in order with the earliest rejected draws (``off_target`` counts them).

    Usage: ``while not f.done: f.offer(draw(f.next_batch(32)))``, then ``graphs, stats = f.result()``.
    """

    def __init__(self, check: Callable[[nx.Graph], bool] | None, n: int, max_draws: int,
                 targets: Sequence[int] | None = None):
        if n < 1 or max_draws < n:
            raise ValueError(f"ValidityFilter: need n >= 1 and max_draws >= n, got n={n}, max_draws={max_draws}")
        if check is None and targets is None and max_draws != n:
            raise ValueError(f"ValidityFilter: without a check or targets every draw is kept, so max_draws must be "
                             f"n={n}, got {max_draws}")
        if targets is not None and len(targets) != n:
            raise ValueError(f"ValidityFilter: one target node count per output graph, got {len(targets)} for n={n}")
        self.check, self.n, self.max_draws = check, n, max_draws
        self.targets = None if targets is None else [int(t) for t in targets]
        self.slots: list[nx.Graph | None] = [None] * n  # output j's kept graph, filled in draw order
        self.rejected: list[tuple[nx.Graph, bool]] = []  # (graph, passed the check), in draw order
        self.drawn = 0

    @property
    def kept(self) -> list[nx.Graph]:
        return [G for G in self.slots if G is not None]

    @property
    def done(self) -> bool:
        return all(G is not None for G in self.slots) or self.drawn >= self.max_draws

    def next_batch(self, cap: int) -> int:
        """Size of the next draw: the first ``n`` draws in batches of ``cap`` (as without rejection, so
        the first pass is the same samples), then batches of ``cap`` up to the budget."""
        limit = self.n if self.drawn < self.n else self.max_draws
        return max(0, min(cap, limit - self.drawn))

    def _open_slot(self, G: nx.Graph) -> int | None:
        """The first open output that ``G`` may fill (any open one without targets), else None."""
        size = G.number_of_nodes()
        return next((j for j, H in enumerate(self.slots)
                     if H is None and (self.targets is None or self.targets[j] == size)), None)

    def offer(self, graphs: Sequence[nx.Graph]) -> None:
        if self.drawn + len(graphs) > self.max_draws:
            raise ValueError(f"ValidityFilter: {len(graphs)} graphs offered with {self.max_draws - self.drawn} "
                             "draws left in the budget")
        for G in graphs:
            self.drawn += 1
            if not (self.check is None or self.check(G)):
                self.rejected.append((G, False))
            elif (j := self._open_slot(G)) is not None:
                self.slots[j] = G
            elif self.targets is not None:  # valid, but no open output has its size
                self.rejected.append((G, True))

    def result(self) -> tuple[list[nx.Graph], dict[str, float | int]]:
        """The ``n`` graphs (output order; draw order without targets) and ``{drawn, valid_drawn,
        acceptance, kept_invalid}`` (with targets also ``off_target``, and ``acceptance`` is the share
        of draws kept: valid and of an open output's size)."""
        if not self.done:
            raise RuntimeError(f"ValidityFilter: {len(self.kept)} of {self.n} kept and budget left; offer more draws")
        fill = iter(self.rejected)
        graphs, kept_invalid = [], 0
        for G in self.slots:
            if G is None:
                G, valid = next(fill)
                kept_invalid += not valid
            graphs.append(G)
        valid = self.drawn - sum(not ok for _, ok in self.rejected)
        accepted = valid if self.targets is None else len(self.kept)
        stats: dict[str, float | int] = {"drawn": self.drawn, "valid_drawn": valid, "acceptance": accepted / self.drawn,
                                         "kept_invalid": kept_invalid}
        if self.targets is not None:
            stats["off_target"] = self.slots.count(None)
        return graphs, stats


class IsoSet:
    """A set of graphs up to isomorphism, with a Weisfeiler-Lehman hash pre-filter."""

    def __init__(self, graphs: Sequence[nx.Graph] = ()):
        self.buckets: dict[str, list[nx.Graph]] = {}
        for G in graphs:
            self.add(G)

    @staticmethod
    def key(G: nx.Graph) -> str:
        with warnings.catch_warnings():  # networkx >= 3.5 warns that hashes changed; only equality matters here
            warnings.simplefilter("ignore", UserWarning)
            h = nx.weisfeiler_lehman_graph_hash(G, iterations=3)
        return f"{G.number_of_nodes()}-{G.number_of_edges()}-{h}"

    def __contains__(self, G: nx.Graph) -> bool:
        return any(nx.is_isomorphic(G, H) for H in self.buckets.get(self.key(G), ()))

    def add(self, G: nx.Graph) -> bool:
        """Add G; return False when an isomorphic graph was already there."""
        k = self.key(G)
        bucket = self.buckets.setdefault(k, [])
        if any(nx.is_isomorphic(G, H) for H in bucket):
            return False
        bucket.append(G)
        return True

    def __len__(self) -> int:
        """The number of distinct (pairwise non-isomorphic) graphs held."""
        return sum(len(b) for b in self.buckets.values())


def _judge(generated: Sequence[nx.Graph], train: Sequence[nx.Graph], dataset: str | None
           ) -> tuple[Callable[[nx.Graph], bool] | None, list[tuple[bool, bool, bool]]]:
    """One pass over the samples: per sample (valid, first of its isomorphism class, copy of a
    training graph), with the dataset's check (``None``: every sample counts as valid)."""
    check = VALIDITY.get(dataset) if dataset else None
    seen, train_set = IsoSet(), IsoSet(train)
    return check, [(check(G) if check else True, seen.add(G), G in train_set) for G in generated]


def _vun(generated: Sequence[nx.Graph], check, facts) -> dict[str, float]:
    n = len(generated)
    if n == 0:
        raise ValueError("vun: no generated graphs")
    return {"validity": sum(v for v, _, _ in facts) / n if check else None,
            "uniqueness": sum(u for _, u, _ in facts) / n,
            "novelty": sum(not t for _, _, t in facts) / n,
            "vun": sum(v and u and not t for v, u, t in facts) / n,
            "connected": float(np.mean([G.number_of_nodes() > 0 and nx.is_connected(G) for G in generated]))}


def _memorization(generated: Sequence[nx.Graph], test: Sequence[nx.Graph], facts) -> dict[str, float | int | None]:
    test_set = IsoSet(test)
    valid = distinct = in_train = in_test_only = 0
    for G, (v, u, t) in zip(generated, facts):
        if not v:
            continue
        valid += 1
        distinct += u  # isomorphic graphs share their validity: first of all samples = first of the valid
        if t:
            in_train += 1
        elif G in test_set:
            in_test_only += 1
    share = (lambda c: c / valid) if valid else (lambda c: None)
    return {"valid": valid, "distinct_valid": distinct,
            "in_train": share(in_train), "in_eval_only": share(in_test_only),
            "neither": share(valid - in_train - in_test_only)}


def vun(generated: Sequence[nx.Graph], train: Sequence[nx.Graph], dataset: str | None = None) -> dict[str, float]:
    """Validity, uniqueness, novelty (fractions in [0, 1]) and V.U.N. (valid and unique and novel).

    Validity uses the dataset's structural check (planar, grid, lobster); where none is
    defined it is ``None`` and V.U.N. counts unique-and-novel graphs.
    """
    return _vun(generated, *_judge(generated, train, dataset))


def memorization(generated: Sequence[nx.Graph], train: Sequence[nx.Graph], test: Sequence[nx.Graph],
                 dataset: str | None = None) -> dict[str, float | int | None]:
    """Where the valid samples come from: the share of them isomorphic to a training graph, to a graph
    of the evaluation split only, or to neither (new), and how many distinct graphs they are.

    On a dataset that holds every graph of its family in some split (grid: every side 10-19), a valid
    sample is either a copy of a training graph or a graph of the evaluation split; only the second is
    generalisation.  ``valid`` counts the samples that pass the dataset's check (all samples where
    none is defined); the three shares are fractions of ``valid`` (None when nothing is valid)."""
    return _memorization(generated, test, _judge(generated, train, dataset)[1])


def evaluate(generated: Sequence[nx.Graph], train: Sequence[nx.Graph], test: Sequence[nx.Graph],
             dataset: str | None = None) -> dict:
    """Everything for a metrics JSON: MMDs of generated vs test, the train-vs-test baseline, V.U.N."""
    check, facts = _judge(generated, train, dataset)  # validity and isomorphism tests once, for both tables
    vun_table = _vun(generated, check, facts)  # first: no generated graphs is an error before the MMD work
    st_test = graph_stats(test)
    gen = mmd_all(st_test, graph_stats(generated))
    base = mmd_all(st_test, graph_stats(train))
    return {
        "mmd_gen_vs_test": gen,
        "mmd_train_vs_test": base,
        # DiGress-style ratio: generated-vs-test MMD over train-vs-test MMD (1 = as close as the training set)
        "mmd_ratio": {k: (gen[k] / base[k] if base[k] > 0 else None) for k in gen},
        "vun": vun_table,
        # valid samples that copy a training graph / are a graph of the evaluation split only / are new
        "memorization": _memorization(generated, test, facts),
        "num_generated": len(generated), "num_test": len(test), "num_train": len(train),
        "mean_nodes_generated": float(np.mean([G.number_of_nodes() for G in generated])),
        "mean_nodes_test": float(np.mean([G.number_of_nodes() for G in test])),
        "mean_edges_generated": float(np.mean([G.number_of_edges() for G in generated])),
        "mean_edges_test": float(np.mean([G.number_of_edges() for G in test])),
    }
