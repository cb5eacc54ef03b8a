"""benchmarks.graph_reference_floor and graph_vs_generator: fresh draws of the data generator, scored as a model's samples."""
import json

import networkx as nx
import pytest

from modalities.graph import draw_graphs, make_dataset


def test_draw_graphs_is_the_data_sets_generator():
    # catches: fresh draws from another distribution than the data set's (then the "perfect model" floor
    # would measure something else), or draws that ignore their seed
    data = make_dataset("planar", seed=3, num=12)
    drawn = draw_graphs("planar", 3, num=12)
    key = lambda G: frozenset(map(frozenset, G.edges()))
    assert {key(G) for G in drawn} == {key(G) for s in data.values() for G in s}
    other = draw_graphs("planar", 4, num=12)
    assert not any(nx.is_isomorphic(a, b) for a in other for b in drawn)
    assert all(G.number_of_nodes() == 30 for G in draw_graphs("planar", 0, num=2, n=30))


def test_reference_floor_writes_ratios_that_see_a_wrong_node_count(tmp_path):
    # catches: ratios over the wrong baseline, or a node count that is not passed to the generator
    from benchmarks.graph_reference_floor import main
    out = tmp_path / "floor.json"
    main(["--dataset", "planar", "--num", "4", "--sets", "2", "--nodes", "64", "24", "--splits", "val",
          "--out", str(out)])
    res = json.loads(out.read_text())
    rows = {r["nodes"]: r for r in res["rows"]}
    assert set(rows) == {64, 24} and res["run"]["command"] and len(rows[64]["per_set"]) == 2
    for k in ("degree_tv", "spectral_tv"):
        assert rows[24][k]["min"] > 2 * rows[64][k]["max"] > 0


def test_reference_floor_refuses_a_node_count_for_other_generators():
    from benchmarks.graph_reference_floor import main
    with pytest.raises(SystemExit, match="--nodes is for planar"):
        main(["--dataset", "sbm", "--nodes", "40", "--out", "/dev/null/never_written"])


def _write_graphs(path, graphs):
    from modalities.graph.datasets import graphs_json
    path.write_text(json.dumps(graphs_json(graphs)))


def test_vs_generator_scores_sets_against_fresh_draws_and_splits_them_by_size(tmp_path):
    # two demo-style graphs.json files pooled into one set of 30-point graphs, one of 64-point draws.
    # catches: files not pooled, a set scored against itself or its perfect twin instead of the reference,
    # subsets by node count compared with draws of another count
    from benchmarks.graph_vs_generator import main
    from modalities.graph.datasets import draw_graphs
    _write_graphs(tmp_path / "a.json", draw_graphs("planar", 1, num=6, n=30))
    _write_graphs(tmp_path / "b.json", draw_graphs("planar", 2, num=6, n=30))
    _write_graphs(tmp_path / "c.json", draw_graphs("planar", 3, num=12))
    out = tmp_path / "vs.json"
    main(["--samples", f"small={tmp_path / 'a.json'},{tmp_path / 'b.json'}", f"right={tmp_path / 'c.json'}",
          "--reference", "24", "--short", "30", "--by-size", "--min-subset", "10", "--out", str(out)])
    res = json.loads(out.read_text())
    rows = {r["set"]: r for r in res["rows"]}
    assert rows["small"]["num"] == 12 and rows["small"]["mean_nodes"] == 30
    for k in ("degree_tv", "spectral_tv"):
        assert rows["small"][k] > 2 * max(rows["right"][k], rows["perfect, 12 graphs"][k])
        assert rows["perfect 30 points, 12 graphs"][k] > 2 * rows["right"][k]
    by = {(r["set"], r["nodes"]): r for r in res["by_size"]}
    assert set(by) == {("small", 30), ("right", 64)}
    assert by[("small", 30)]["model"]["degree_tv"] < rows["small"]["degree_tv"] / 2  # against 30-point draws
    with pytest.raises(SystemExit, match="NAME=PATH"):
        main(["--samples", "no_name", "--out", str(out)])


def test_degrees_by_position_splits_the_outer_cycle_from_the_inside():
    # a wheel (hub + 6-cycle: rim degree 3, hub 6) pooled with a triangle (every vertex on the rim, degree 2).
    # catches: rim and inside swapped, graphs not pooled, the rim found from degrees instead of faces
    import networkx as nx
    import numpy as np
    from benchmarks.graph_vs_generator import degrees_by_position
    wheel, tri = nx.wheel_graph(7), nx.complete_graph(3)
    d = degrees_by_position([wheel, tri])
    rim = [3] * 6 + [2] * 3
    assert d["boundary"] == {"mean": pytest.approx(np.mean(rim)), "sd": pytest.approx(np.std(rim))}
    assert d["inner"] == {"mean": 6.0, "sd": 0.0}
    assert d["boundary_length"] == 4.5
    assert degrees_by_position([tri])["inner"] is None
