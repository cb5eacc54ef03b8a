"""benchmarks.graph_grid_breakdown: grids vs non-grids, grid sizes drawn, MMD of each group."""
import json

import networkx as nx
import pytest

from benchmarks.graph_grid_breakdown import breakdown, degree_shares, grid_sides, main
from modalities.graph.metrics import mmd_all


def _grid(a, b):
    return nx.convert_node_labels_to_integers(nx.grid_2d_graph(a, b))


def _near_grid(a, b):
    """An ``a x b`` grid with one extra diagonal: same node count, one more edge, two interior nodes of degree 5."""
    G = _grid(a, b)
    G.add_edge(b + 1, 2 * b + 2)  # interior diagonal
    return G


def test_grid_sides_reads_both_orientations_and_rejects_near_grids():
    # catches: sides swapped or taken from the node count alone (3 x 8 and 4 x 6 both have 24 nodes)
    assert grid_sides(_grid(3, 8)) == (3, 8) and grid_sides(_grid(8, 3)) == (3, 8)
    assert grid_sides(_grid(4, 6)) == (4, 6)
    assert grid_sides(_near_grid(4, 6)) is None and grid_sides(nx.cycle_graph(24)) is None


def test_degree_shares_pools_nodes_and_caps_the_last_bin():
    # catches: averaging per graph instead of pooling nodes, dropping degrees above the last bin
    star = nx.star_graph(7)  # one node of degree 7, seven of degree 1
    shares = degree_shares([star, nx.path_graph(2)])
    assert shares == pytest.approx([0, 9 / 10, 0, 0, 0, 0, 1 / 10])


def test_breakdown_splits_groups_counts_sides_and_mmds():
    # catches: non-grids counted as grids, sides counted as the wrong split's, the groups' MMD taken
    # against the training graphs instead of the reference split, shares of the wrong total
    train = [_grid(3, 4), _grid(2, 6), _grid(3, 5)]
    ref = [_grid(4, 4), _grid(3, 6)]
    samples = [_grid(3, 4), _grid(4, 3), _grid(2, 6), _grid(4, 4), _near_grid(4, 5), _near_grid(4, 5)]
    r = breakdown(samples, train, ref, seed=0)
    assert r["grids"]["count"] == 4 and r["non_grids"]["count"] == 2 and r["grids"]["share"] == pytest.approx(4 / 6)
    assert r["sides_drawn"] == {"3x4": 2, "2x6": 1, "4x4": 1} and r["distinct_sides"] == 3
    assert r["largest_side_share"] == 0.5
    assert r["grids_with_train_sides"] == 3 and r["grids_with_reference_sides"] == 1
    assert r["non_grids"]["distinct"] == 1 and r["non_grids"]["with_grid_node_and_edge_count"] == 0
    assert r["non_grids"]["mean_degree_ge5_nodes"] == pytest.approx(2.0)
    assert r["grids"]["mmd"] == pytest.approx(mmd_all(ref, samples[:4], kernels=("tv",)))
    assert r["non_grids"]["mmd"] == pytest.approx(mmd_all(ref, samples[4:], kernels=("tv",)))
    assert r["reference"]["train_vs_reference_mmd"] == pytest.approx(mmd_all(ref, train, kernels=("tv",)))
    with pytest.raises(ValueError, match="every training graph must be a grid"):
        breakdown(samples, [_near_grid(4, 5)], ref)


def test_main_reads_a_demo_run_folder(tmp_path):
    # catches: the run's eval split ignored (always test), graphs.json rows read with the wrong node count
    from modalities.graph.datasets import make_dataset
    kw = {"max_side": 11}
    splits = make_dataset("grid", seed=0, **kw)
    gen = splits["train"][:2] + [nx.path_graph(5)]
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"dataset": "grid", "seed": 0, "data_kw": kw, "eval_split": "train"}))
    (d / "graphs.json").write_text(json.dumps({"graphs": [{"n": G.number_of_nodes(), "edges": [list(e) for e in G.edges()]}
                                                          for G in gen]}))
    out = tmp_path / "b.json"
    main(["--samples", str(d), "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["eval_split"] == "train" and r["grids"]["count"] == 2 and r["non_grids"]["count"] == 1
    assert r["grids_with_reference_sides"] == 2  # compared with the training split, as the run was
    assert r["reference"]["train_vs_reference_mmd"]["degree_tv"] == 0.0
    assert "run" in r and r["run"]["command"]
