"""Graph modality: next-scale prediction over a coarsening hierarchy (see docs/graph_design.md).

* :mod:`.datasets`  -- grid, community-small, SBM, planar, lobster made on the fly from a seed;
* :mod:`.coarsen`   -- deterministic heavy-edge-matching hierarchy with exact halving;
* :mod:`.tokenizer` -- :class:`GraphPyramidTokenizer`, an exact (lossless) PyramidTokenizer;
* :mod:`.triangulation` -- :class:`TriangulationTokenizer`: triangulated discs grown by vertex splits of a
  rotation system (every sample planar by construction; the planar data set's tokenizer of choice);
* :mod:`.size`      -- :class:`~.size.NodeCountHook`, sampling with a given node count per graph;
* :mod:`.metrics`   -- MMD (degree, clustering, 4-node orbits, spectrum; TV and EMD kernels), V.U.N.
"""
from .coarsen import Level, assignments, coarsen, level_sizes, num_levels_for
from .datasets import DATASETS, draw_graphs, graphs_from, make_dataset, to_data, to_networkx
from .metrics import evaluate, graph_stats, mmd_all, vun
from .tokenizer import GraphDecodeState, GraphPyramidTokenizer
from .triangulation import NotATriangulatedDisc, SplitShapeTemperature, TriangulationTokenizer, is_triangulated_disc

__all__ = ["Level", "coarsen", "assignments", "num_levels_for", "level_sizes", "DATASETS", "draw_graphs", "make_dataset", "to_data",
           "to_networkx", "graphs_from", "evaluate", "graph_stats", "mmd_all", "vun",
           "GraphPyramidTokenizer", "GraphDecodeState", "TriangulationTokenizer", "SplitShapeTemperature",
           "NotATriangulatedDisc", "is_triangulated_disc"]
