"""Graph modality: the child order of the aligned coarsening stays consistent through odd levels, so
that the edge masks of a lattice's hierarchy are a function of the edge's direction."""
import networkx as nx
import numpy as np
import pytest

from benchmarks.graph_mask_proxy import edge_records
from examples.graph_demo import permuted
from modalities.graph import coarsen


@pytest.mark.parametrize("n", range(2, 42))
def test_aligned_tree_order_of_a_path_runs_along_it(n):
    # catches: children kept in the orientation the matching gave them (each pair oriented from its own
    # neighbours): after an odd level the orientation flips for whole stretches, and the tree order of
    # 3, 5, 6, 7, 9, ... node paths zigzags; any order that is not the same at every node does too
    for seed in range(3):
        G = nx.path_graph(n) if seed == 0 else permuted(nx.path_graph(n), np.random.default_rng(seed))
        levels = coarsen(G, matching="aligned")
        for lvl in levels:  # every level of a path is a path, in tree order
            assert lvl.edges == [(i, i + 1) for i in range(lvl.n - 1)], (n, seed, lvl.n, lvl.edges)


@pytest.mark.parametrize("sides", [(6, 10), (4, 12), (10, 10), (12, 12)])
def test_aligned_grid_masks_depend_only_on_the_edge_direction(sides):
    # catches: children in the matching's orientation (on these grids 9-56% of the masks along the split
    # at the two finest expansions are the "other" one, 0b0010), or ordered by a rule that differs
    # between nodes (across masks 0b0110 next to 0b1001): then which children two clusters join is not
    # a function of anything the model sees
    a, b = sides
    grid = nx.convert_node_labels_to_integers(nx.grid_2d_graph(a, b))
    for seed in range(2):
        G = grid if seed == 0 else permuted(grid, np.random.default_rng(seed))
        levels = coarsen(G, matching="aligned")
        finest = len(levels) - 2
        seen = {}
        for r in edge_records(G, levels):
            if r["level"] >= finest - 1:  # the two finest expansions: regular levels of these grids
                seen.setdefault(r["direction"][1:], set()).add(r["mask"])
        # along the split: the second child of the earlier cluster meets the first of the later one;
        # across it: first meets first, second meets second
        assert seen == {("along", "along"): {0b0100}, ("across", "across"): {0b1001}}, (sides, seed, seen)
