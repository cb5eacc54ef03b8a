"""Embedded graph datasets made on the fly, deterministic from a seed.

The recipes follow the papers that introduced each benchmark (nothing is downloaded):

* ``grid``            -- GRAN: 2-D grids with 10..19 nodes per side (100 graphs).
* ``community-small`` -- GraphRNN: two Erdos-Renyi communities (p = 0.7) of 6..10 nodes each,
                         inter-community edges with p = 0.05 (at least one), 12..20 nodes (100 graphs).
* ``sbm``             -- SPECTRE: 2..5 communities of 20..40 nodes, p_in = 0.3, p_out = 0.005 (200 graphs).
* ``planar``          -- SPECTRE: Delaunay triangulation of 64 uniform points in the unit square (200 graphs).
* ``lobster``         -- GRAN: ``networkx.random_lobster(80, 0.7, 0.7)`` kept when 10 <= n <= 100 (100 graphs).

Splits: 80 % train / 20 % test after a seeded shuffle (GRAN, GraphRNN), and SPECTRE's
128 / 32 / 40 train / val / test for ``sbm`` and ``planar``.  Graphs are returned as
networkx graphs with nodes ``0..n-1``; :func:`to_data` converts to ``torch_geometric``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import networkx as nx
import numpy as np
import torch
from torch_geometric.data import Data

DATASETS = ("grid", "community-small", "sbm", "planar", "lobster")


def _relabel(G: nx.Graph) -> nx.Graph:
    """Nodes 0..n-1, simple, undirected, no self loops."""
    G = nx.Graph(G)
    G.remove_edges_from(nx.selfloop_edges(G))
    return nx.convert_node_labels_to_integers(G)


def grid_graphs(rng: np.random.Generator, min_side: int = 10, max_side: int = 19) -> list[nx.Graph]:
    return [_relabel(nx.grid_2d_graph(i, j)) for i in range(min_side, max_side + 1)
            for j in range(min_side, max_side + 1)]


def community_small_graphs(rng: np.random.Generator, num: int = 100, p_in: float = 0.7,
                           p_inter: float = 0.05) -> list[nx.Graph]:
    graphs = []
    for _ in range(num):
        sizes = rng.integers(6, 11, size=2)
        parts = [nx.gnp_random_graph(int(s), p_in, seed=int(rng.integers(2**31))) for s in sizes]
        G = nx.disjoint_union_all(parts)
        a = list(range(sizes[0]))
        b = list(range(sizes[0], sizes[0] + sizes[1]))
        hit = rng.random((len(a), len(b))) < p_inter
        for i, j in zip(*np.nonzero(hit)):
            G.add_edge(a[i], b[j])
        if not hit.any():  # GraphRNN guarantees one inter-community edge
            G.add_edge(a[0], b[0])
        graphs.append(_relabel(G))
    return graphs


def sbm_graphs(rng: np.random.Generator, num: int = 200, p_in: float = 0.3, p_out: float = 0.005,
               min_c: int = 2, max_c: int = 5, min_size: int = 20, max_size: int = 40) -> list[nx.Graph]:
    graphs = []
    for _ in range(num):
        c = int(rng.integers(min_c, max_c + 1))
        sizes = [int(s) for s in rng.integers(min_size, max_size + 1, size=c)]
        probs = [[p_in if i == j else p_out for j in range(c)] for i in range(c)]
        graphs.append(_relabel(nx.stochastic_block_model(sizes, probs, seed=int(rng.integers(2**31)))))
    return graphs


def planar_graphs(rng: np.random.Generator, num: int = 200, n: int = 64) -> list[nx.Graph]:
    from scipy.spatial import Delaunay

    graphs = []
    for _ in range(num):
        pts = rng.random((n, 2))
        tri = Delaunay(pts)
        G = nx.Graph()
        G.add_nodes_from(range(n))
        for s in tri.simplices:
            G.add_edges_from([(int(s[0]), int(s[1])), (int(s[1]), int(s[2])), (int(s[0]), int(s[2]))])
        graphs.append(_relabel(G))
    return graphs


def lobster_graphs(rng: np.random.Generator, num: int = 100, mean: int = 80, p1: float = 0.7, p2: float = 0.7,
                   min_n: int = 10, max_n: int = 100) -> list[nx.Graph]:
    make = getattr(nx, "random_lobster_graph", None) or nx.random_lobster  # renamed in networkx 3.5
    graphs = []
    while len(graphs) < num:
        G = make(mean, p1, p2, seed=int(rng.integers(2**31)))
        if min_n <= G.number_of_nodes() <= max_n:
            graphs.append(_relabel(G))
    return graphs


_MAKERS = {"grid": grid_graphs, "community-small": community_small_graphs, "sbm": sbm_graphs,
           "planar": planar_graphs, "lobster": lobster_graphs}
# (train, val) counts for the SPECTRE sets; the others use an 80 / 20 split and no val set
_SPECTRE_SPLIT = {"sbm": (128, 32), "planar": (128, 32)}
WITH_VALIDATION = tuple(_SPECTRE_SPLIT)  # the datasets whose full-size split has validation graphs


def draw_graphs(name: str, seed: int, **kw) -> list[nx.Graph]:
    """Fresh graphs from dataset ``name``'s generator, unshuffled and unsplit (``num=...`` how many;
    planar also takes ``n=...`` points).  A perfect model's samples: scoring them like a model's
    tells how far the metric itself is from 1x the baseline (``benchmarks.graph_reference_floor``)."""
    if name not in _MAKERS:
        raise ValueError(f"unknown graph dataset {name!r}; expected one of {list(DATASETS)}")
    return _MAKERS[name](np.random.default_rng(seed), **kw)


def make_dataset(name: str, seed: int = 0, **kw) -> dict[str, list[nx.Graph]]:
    """``{"train": [...], "val": [...], "test": [...]}`` of networkx graphs, deterministic from ``seed``.

    Extra keyword arguments go to the generator (e.g. ``num=20`` for a small set,
    ``max_side=12`` for smaller grids).
    """
    if name not in _MAKERS:
        raise ValueError(f"unknown graph dataset {name!r}; expected one of {list(DATASETS)}")
    rng = np.random.default_rng(seed)
    graphs = _MAKERS[name](rng, **kw)
    order = rng.permutation(len(graphs))
    graphs = [graphs[i] for i in order]
    if name in _SPECTRE_SPLIT and len(graphs) == 200:
        tr, va = _SPECTRE_SPLIT[name]
        return {"train": graphs[:tr], "val": graphs[tr:tr + va], "test": graphs[tr + va:]}
    n_train = int(round(0.8 * len(graphs)))
    return {"train": graphs[:n_train], "val": [], "test": graphs[n_train:]}


# ---------------------------------------------------------------------------- conversions
def to_data(G: nx.Graph) -> Data:
    """networkx graph -> ``Data(edge_index (2, 2E), num_nodes)`` with both edge directions."""
    G = _relabel(G)
    edges = np.array(list(G.edges()), dtype=np.int64).reshape(-1, 2)
    ei = np.concatenate([edges, edges[:, ::-1]], 0).T if len(edges) else np.zeros((2, 0), np.int64)
    return Data(edge_index=torch.from_numpy(np.ascontiguousarray(ei)), num_nodes=G.number_of_nodes())


def to_networkx(data: Data) -> nx.Graph:
    """``Data`` -> simple undirected networkx graph on nodes ``0..num_nodes-1``."""
    G = nx.Graph()
    G.add_nodes_from(range(int(data.num_nodes)))
    ei = data.edge_index
    if ei is not None and ei.numel():
        G.add_edges_from((int(u), int(v)) for u, v in ei.t().tolist() if u != v)
    return G


def graphs_from(data) -> list[nx.Graph]:
    """A ``Batch``, a ``Data``, a networkx graph or a list of either -> list of networkx graphs."""
    if isinstance(data, nx.Graph):
        return [data]
    if isinstance(data, Data) and not hasattr(data, "to_data_list"):
        return [to_networkx(data)]
    if hasattr(data, "to_data_list"):
        return [to_networkx(d) for d in data.to_data_list()]
    if isinstance(data, Sequence):
        out = []
        for i, d in enumerate(data):
            if isinstance(d, nx.Graph):
                out.append(d)
            elif isinstance(d, Data):
                out.append(to_networkx(d))
            else:
                raise TypeError(f"graph {i}: expected a networkx Graph or torch_geometric Data, got {type(d).__name__}")
        return out
    raise TypeError(f"expected a torch_geometric Data/Batch, a networkx Graph or a list of them, got {type(data).__name__}")


def graphs_json(graphs: Sequence[nx.Graph]) -> dict:
    """``{"graphs": [{"n", "edges"}]}``: the content of the ``graphs.json`` that ``examples.graph_demo``
    writes (nodes ``0 .. n-1``, edges sorted), read back by :func:`read_graphs_json`."""
    return {"graphs": [{"n": G.number_of_nodes(), "edges": sorted(map(sorted, G.edges()))} for G in graphs]}


def read_graphs_json(path: str) -> list[nx.Graph]:
    """The graphs of a ``graphs.json`` (:func:`graphs_json`) as networkx graphs."""
    with open(path) as f:
        rows = json.load(f)["graphs"]
    out = []
    for r in rows:
        G = nx.Graph()
        G.add_nodes_from(range(r["n"]))
        G.add_edges_from(map(tuple, r["edges"]))
        out.append(G)
    return out
