"""The triangulated-disc tokenizer: rotation-system operations, the hierarchy, exact round trips,
and that every token sequence decodes to a planar triangulated disc."""
import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modalities.graph import graphs_from, make_dataset
from modalities.graph.triangulation import (INF, NO_SPLIT, NotATriangulatedDisc, Rotation, TriangulationTokenizer,
                                            chunk_members, contraction_hierarchy, contraction_level,
                                            is_triangulated_disc, sphere_triangulation, tetrahedron)


@pytest.fixture(scope="module")
def planar():
    sp = make_dataset("planar", seed=0, num=24)
    return [G for G in sp["train"] if is_triangulated_disc(G)]


@pytest.fixture(scope="module")
def tok(planar):
    return TriangulationTokenizer.fit(planar)


def _cycles(T: Rotation) -> dict:
    """Each rotation started at its smallest neighbour (a rotation is a cyclic order)."""
    out = {}
    for v, nb in T.rot.items():
        i = nb.index(min(nb, key=str))
        out[v] = nb[i:] + nb[:i]
    return out


def _grown(seed: int, n: int) -> Rotation:
    """A random sphere triangulation: the tetrahedron and ``n`` random splits."""
    rng = np.random.default_rng(seed)
    T = tetrahedron()
    for new in range(4, 4 + n):
        v = int(rng.integers(new))
        d = T.degree(v)
        T.split(v, new, int(rng.integers(d)), int(rng.integers(1, d)))
    return T


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 40))
def test_a_split_keeps_a_triangulation_and_contraction_undoes_it(seed, n):
    T = _grown(seed, n)
    T.check()  # every face a triangle, Euler characteristic 2
    rng = np.random.default_rng(seed + 1)
    v = int(rng.integers(len(T)))
    d = T.degree(v)
    i, m = int(rng.integers(d)), int(rng.integers(1, d))
    before = T.copy()
    T.split(v, "x", i, m)
    T.check()
    assert T.degree("x") == m + 2 and T.degree(v) == d - m + 2
    u, m_back = T.contract(v, "x")
    assert m_back == m and u == before.rot[v][i]
    assert _cycles(T) == _cycles(before)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 50))
def test_a_level_contracts_an_independent_set_away_from_the_outer_vertex(seed, n):
    T = _grown(seed, n)
    T = Rotation({(INF if v == 0 else v): [INF if x == 0 else x for x in nb] for v, nb in T.rot.items()})
    pairs = contraction_level(T)
    assert pairs, "a triangulation with more than 4 vertices has a contractible edge"
    touched = [set(p) for p in pairs]
    for a, b in pairs:
        assert INF not in (a, b) and b in T.rot[a]
        assert len(set(T.rot[a]) & set(T.rot[b])) == 2  # contractible: no separating triangle
    for p, q in ((p, q) for i, p in enumerate(touched) for q in touched[i + 1:]):
        assert not any(y in T.rot[x] for x in p for y in q), "two contracted pairs are joined by an edge"
    levels = contraction_hierarchy(T)
    assert len(levels[-1].coarse) == 4
    for lv in levels:
        lv.coarse.check()


def test_round_trip_is_exact_on_the_planar_data(planar, tok):
    idx = tok.encode(planar[:8])
    out = graphs_from(tok.decode(idx))
    for G, H in zip(planar[:8], out):
        assert nx.is_isomorphic(G, H)
    # a relabelling gives another hierarchy (ties go by label), the same graph back
    rng = np.random.default_rng(0)
    G = planar[0]
    perm = rng.permutation(G.number_of_nodes())
    P = nx.relabel_nodes(G, {i: int(perm[i]) for i in G.nodes})
    idx_p = tok.encode([P])
    assert any(not torch.equal(a[:1], b) for a, b in zip(idx, idx_p))
    assert nx.is_isomorphic(graphs_from(tok.decode(idx_p))[0], G)


def test_a_slower_contraction_rate_gives_deeper_hierarchies_and_exact_round_trips(planar):
    # catches: a rate that is ignored, or a hierarchy the decoder cannot replay (rate changes which edges contract)
    T = sphere_triangulation(planar[0])
    assert len(contraction_hierarchy(T, rate=0.5)) > len(contraction_hierarchy(T))
    slow = TriangulationTokenizer.fit(planar[:6], rate=0.5, extra_levels=2)
    assert slow.K >= TriangulationTokenizer.fit(planar[:6]).K + 2
    out = graphs_from(slow.decode(slow.encode(planar[:6])))
    assert all(nx.is_isomorphic(G, H) for G, H in zip(planar[:6], out))


def _level_sizes(tok: TriangulationTokenizer, graphs: list) -> np.ndarray:
    """``(B, K)`` vertex counts of every level, as decoded."""
    from benchmarks.graph_size_trajectory import level_sizes
    return level_sizes(tok.decode_progression(tok.encode(graphs)))


def test_delays_start_hierarchies_late_by_labelling_and_keep_exact_round_trips(planar):
    # catches: a delay that is ignored or the same for every labelling (the model would still learn to
    # stop from the level), delay levels that split something, a level count short of the deepest
    # delayed hierarchy, or a hierarchy the decoder cannot replay after the delay
    from examples.graph_demo import augment
    graphs = augment(planar[:3], 6, seed=0)  # each graph in 6 labellings
    plain = TriangulationTokenizer.fit(graphs, chunks=4)
    late = TriangulationTokenizer.fit(graphs, chunks=4, delays=2)
    assert late.K == plain.K + 2 and late.config["delays"] == 2
    assert all(nx.is_isomorphic(G, H) for G, H in zip(graphs, graphs_from(late.decode(late.encode(graphs)))))
    a, b = _level_sizes(plain, graphs), _level_sizes(late, graphs)
    shift = [int(np.argmax(y > y[0])) - int(np.argmax(x > x[0])) for x, y in zip(a, b)]  # first level that grew
    assert set(shift) == {0, 1, 2}
    for x, y, d in zip(a, b, shift):  # the same hierarchy, d levels later
        assert (y[:d + 1] == y[0]).all() and (y[d:d + plain.K] == x).all()


def test_finest_keep_contracts_a_share_of_the_greedy_finest_level_only(planar):
    # catches: a share taken at every level, a share of the wrong size, or pairs the greedy rule did not choose
    T = sphere_triangulation(planar[0])
    full, part = contraction_hierarchy(T), contraction_hierarchy(T, finest_keep=0.4)
    n = len(full[0].pairs)
    assert len(part[0].pairs) == max(1, round(0.4 * n)) < n
    assert set(part[0].pairs) <= set(full[0].pairs)
    assert len(part[1].pairs) > len(part[0].pairs)  # the next level is maximal again
    assert contraction_hierarchy(T, finest_keep=1.0)[0].pairs == full[0].pairs


def test_partial_finest_levels_grow_by_less_and_vary_by_labelling(planar):
    # catches: an option the encoder ignores, a share that is the same for every labelling, or a hierarchy
    # the decoder cannot replay
    from examples.graph_demo import augment
    graphs = augment(planar[:3], 6, seed=1)
    plain = TriangulationTokenizer.fit(graphs, chunks=4)
    part = TriangulationTokenizer.fit(graphs, chunks=4, partial_finest=0.8)
    assert all(nx.is_isomorphic(G, H) for G, H in zip(graphs, graphs_from(part.decode(part.encode(graphs)))))

    def last_growth(sizes: np.ndarray) -> np.ndarray:  # vertices the finest growing level adds
        return np.array([s[-1] - s[np.nonzero(s < s[-1])[0][-1]] for s in sizes])
    g_plain, g_part = last_growth(_level_sizes(plain, graphs)), last_growth(_level_sizes(part, graphs))
    assert (g_part <= g_plain).all() and g_part.mean() < 0.8 * g_plain.mean()
    assert np.std(g_part / g_plain) > 0.1  # shares drawn over [0.2, 1], not one share rounded
    with pytest.raises(ValueError, match="partial_finest"):
        TriangulationTokenizer([4, 8], 6, partial_finest=1.0)
    with pytest.raises(ValueError, match="delays"):
        TriangulationTokenizer([4, 8], 6, delays=1)


def test_progression_grows_from_a_triangle_to_the_graph(planar, tok):
    levels = tok.decode_progression(tok.encode(planar[:2]))
    assert [g.number_of_nodes() for g in levels[0]] == [3, 3]  # the tetrahedron without the outer vertex
    for b in range(2):
        sizes = [lvl[b].number_of_nodes() for lvl in levels]
        assert sizes == sorted(sizes) and sizes[-1] == planar[b].number_of_nodes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10**6))
def test_every_token_sequence_decodes_to_a_triangulated_disc(tok, seed):
    g = torch.Generator().manual_seed(seed)
    B = 4
    st_ = tok.start(B)
    for k, n in enumerate(tok.schedule.token_counts):
        # mostly allowed tokens (so the graphs grow), some arbitrary ones
        ok = st_.allowed(k)
        logits = torch.randn(B, n, tok.vocab_size, generator=g).masked_fill(~ok, -3.0)
        st_.add_scale(k, torch.distributions.Categorical(logits=logits).sample())
    for R, H in zip(st_.rots, graphs_from(tok.finish(st_))):
        R.check()  # a sphere triangulation, so H (without the outer vertex 0) is a triangulated disc
        assert H.number_of_nodes() == len(R) - 1
        assert H.number_of_edges() == 3 * len(R) - 6 - R.degree(0)
        assert nx.check_planarity(H)[0] and nx.is_biconnected(H)


def test_allowed_tokens_are_decoded_as_drawn(tok):
    """A split the hook allows grows the graph by one vertex (at a scale with one split)."""
    one = TriangulationTokenizer(tok.max_nodes, tok.max_degree, chunks=1)
    st_ = one.start(1)
    ok = st_.allowed(0)[0]
    assert ok[0, NO_SPLIT] and ok[0].sum() == 1  # the outer vertex never splits
    assert not ok[:, one.pad_token].any()
    d = 3
    split = [t for t in range(1, one.pad_token) if ok[1, t]]
    assert len(split) == d * (d - 1)  # every (i, m) with i < 3, 1 <= m <= 2
    for t in split:
        s2 = one.start(1)
        s2.add_scale(0, torch.tensor([[NO_SPLIT, t, NO_SPLIT, NO_SPLIT]]))
        assert len(s2.rots[0]) == 5 and s2.refused == 0


def test_adjacent_splits_in_one_chunk_keep_the_first_and_a_later_chunk_is_blocked(tok):
    one = TriangulationTokenizer(tok.max_nodes, tok.max_degree, chunks=1)
    st_ = one.start(1)
    st_.add_scale(0, torch.tensor([[NO_SPLIT, 1, 1, NO_SPLIT]]))  # 1 and 2 are adjacent; token 1: i = 0, m = 1
    assert len(st_.rots[0]) == 5 and st_.refused == 1
    # two chunks: vertex 1 (chunk 1) sees that vertex 2 (chunk 0) split, and may not split
    two = TriangulationTokenizer(tok.max_nodes, tok.max_degree, chunks=2)
    st_ = two.start(1)
    st_.add_scale(0, torch.tensor([[NO_SPLIT, 1]]))  # vertices 0 and 2
    ok = st_.allowed(1)[0]  # vertices 1 and 3, both next to vertex 2
    assert ok[:, NO_SPLIT].all() and ok.sum() == 2
    st_.add_scale(1, torch.tensor([[1, 1]]))
    assert len(st_.rots[0]) == 5 and st_.refused == 0  # read as NO_SPLIT, as the hook says


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 60), st.integers(2, 12), st.integers(0, 3))
def test_colour_chunks_partition_the_vertices_and_keep_neighbours_apart(seed, n, chunks, slack):
    # catches: a vertex dealt twice or never, a chunk past its size, positions out of tree order, and
    # neighbours sharing a chunk where a chunk without one had room
    T = _grown(seed, n)
    size = -(-len(T) // chunks) + slack
    members = chunk_members(T, chunks, size, "colour")
    assert sorted(v for m in members for v in m) == list(range(len(T)))
    assert all(len(m) <= size and m == sorted(m) for m in members)
    chunk_of = {v: c for c, m in enumerate(members) for v in m}
    filled = [0] * chunks
    for v in range(len(T)):  # replay the dealing: a shared chunk only when every chunk with room held a neighbour
        earlier = {chunk_of[w] for w in T.rot[v] if w < v and w != 0} if v else set()
        if chunk_of[v] in earlier:
            assert all(c in earlier for c in range(chunks) if filled[c] < size)
        filled[chunk_of[v]] += 1
    assert chunk_members(T, chunks, size, "round-robin") == [list(range(c, len(T), chunks)) for c in range(chunks)]


@pytest.mark.parametrize("chunking, collides", [("colour", False), ("round-robin", True)])
def test_colour_chunks_leave_no_collisions_to_refuse(chunking, collides):
    # catches: parallel draws of one chunk splitting two neighbours (the second refused: a sample smaller than
    # drawn). Room to double every level, and no split at degree >= chunks: colouring always finds a chunk
    tok = TriangulationTokenizer([4 * 2 ** k for k in range(11)], max_degree=11, chunks=12, chunking=chunking)
    g = torch.Generator().manual_seed(0)
    st_ = tok.start(16)
    for k, n in enumerate(tok.schedule.token_counts):
        logits = torch.randn(16, n, tok.vocab_size, generator=g).masked_fill(~st_.allowed(k), float("-inf"))
        logits[..., NO_SPLIT] -= 2.0  # split often
        st_.add_scale(k, torch.distributions.Categorical(logits=logits).sample())
    assert (st_.refused > 0) == collides
    assert np.mean([len(R) for R in st_.rots]) > 40


@pytest.mark.parametrize("chunking", ["colour", "round-robin"])
def test_round_trip_is_exact_with_either_chunking(planar, chunking):
    t = TriangulationTokenizer.fit(planar[:6], chunks=5, chunking=chunking)
    assert t.config["chunking"] == chunking
    out = graphs_from(t.decode(t.encode(planar[:6])))
    assert all(nx.is_isomorphic(G, H) for G, H in zip(planar[:6], out))


def test_a_config_saved_before_chunking_existed_loads_as_round_robin(tok):
    # catches: flipping the constructor default, which would silently re-deal the positions of every
    # model saved before the option (its transformer learned round-robin positions)
    old = {k: v for k, v in tok.config.items() if k not in ("chunking", "delays", "partial_finest")}
    again = TriangulationTokenizer.from_config(old)
    assert again.chunking == "round-robin" and again.delays == 0 and again.partial_finest == 0.0


def test_teacher_forcing_matches_incremental_decoding(planar, tok):
    from msar import testing
    testing.check_adapter(tok, planar[:3], model=testing.tiny_transformer(tok))


def test_size_features_count_the_missing_vertices_and_the_rate_that_completes_the_graph(planar):
    # catches: a count that misses the splits of earlier chunks of the level, a rate over every vertex of
    # the level instead of those still to be drawn, and features that stay on once the graph is complete
    t = TriangulationTokenizer.fit(planar[:8], chunks=4, size_features=True)
    n_max, a = t.max_nodes[-1], t._size_at
    idx = t.encode(planar[:8])
    X = t.teacher_forcing_input(idx)  # (B, L - n_0, C): scale s >= 1 starts at offsets[s] - n_0
    n0, off = t.schedule.token_counts[0], t.schedule.offsets
    st = t.start(len(idx[0]))
    for s, (k, c) in enumerate(t.kinds):
        if s:
            feats = X[:, off[s] - n0:off[s + 1] - n0, a:a + 2]
            assert torch.equal(feats, feats[:, :1].expand_as(feats))  # one value per graph
            size = 4 + sum(((i != NO_SPLIT) & (i != t.pad_token)).sum(1) for i in idx[:s])  # (B,) counted from the tokens
            assert torch.allclose(feats[:, 0, 0], ((n_max - size) / size).clamp(max=4).float())
            if k == t.K - 2:  # the last level: its splits complete the graph, so the rate is at most 1
                left = sum(((i != NO_SPLIT) & (i != t.pad_token)).sum(1) for i in idx[s:])
                assert torch.equal(left, n_max - size)
                assert (feats[:, 0, 1] <= 1 + 1e-6).all()
                if c == t.chunks - 1:  # only this chunk is still to be drawn: over its splittable vertices
                    ahead = st.allowed(s)[..., 1:t.pad_token].any(-1).sum(1)
                    assert torch.allclose(feats[:, 0, 1], (left / ahead.clamp(min=1)).float())
        st.add_scale(s, idx[s])
    assert (X[:, :, a] == 0).any() and (X[:, :, a + 1] > 0).any()  # both complete and growing graphs were seen
    old = TriangulationTokenizer.fit(planar[:8], chunks=4)
    assert old._slot_at == a and t.latent_dim >= old.latent_dim
    assert TriangulationTokenizer.from_config({k: v for k, v in t.config.items() if k != "size_features"}).size_features is False


def test_teacher_forcing_matches_incremental_decoding_with_size_features(planar):
    from msar import testing
    t = TriangulationTokenizer.fit(planar[:3], size_features=True)
    testing.check_adapter(t, planar[:3], model=testing.tiny_transformer(t))


@pytest.mark.parametrize("G, why", [
    (nx.grid_2d_graph(4, 4), "bounded face is not a triangle"),
    (nx.complete_graph(5), "not planar"),
    (nx.path_graph(2), "at least 3 nodes"),
])
def test_graphs_that_are_not_triangulated_discs_are_refused_with_the_reason(tok, G, why):
    with pytest.raises(NotATriangulatedDisc, match=why):
        sphere_triangulation(nx.convert_node_labels_to_integers(G))
    with pytest.raises(NotATriangulatedDisc, match="graph 0"):
        tok.encode([nx.convert_node_labels_to_integers(G)])


def test_save_and_load(tmp_path, tok, planar):
    tok.save_pretrained(tmp_path)
    again = TriangulationTokenizer.from_pretrained(tmp_path)
    assert again.config == tok.config
    assert all(torch.equal(a, b) for a, b in zip(again.encode(planar[:2]), tok.encode(planar[:2])))


def test_demo_trains_and_samples_planar_triangulations(tmp_path):
    # catches: the demo's triangulation path not wired end to end (tokenizer, PAD, sampling hook, metrics),
    # or samples that are not planar discs
    import json

    from examples.graph_demo import main
    main(["--dataset", "planar", "--tokenizer", "triangulation", "--quick", "--steps", "3", "--num-samples", "3",
          "--out", str(tmp_path)])
    m = json.loads((tmp_path / "planar" / "metrics.json").read_text())
    assert m["vun"]["validity"] == 1.0 and m["training_graphs_used"] == 128
    assert m["tokenizer"]["chunks"] == 12 and m["tokenizer"]["chunking"] == "colour"
    assert m["invalid_tokens"]["invalid_draw_rate"] == 0.0
    graphs = json.loads((tmp_path / "planar" / "graphs.json").read_text())["graphs"]
    for g in graphs:
        H = nx.Graph()
        H.add_nodes_from(range(g["n"]))
        H.add_edges_from(map(tuple, g["edges"]))
        assert nx.check_planarity(H)[0] and nx.is_biconnected(H)


@pytest.mark.parametrize("flags", [["--project"], ["--expand-test", "1"], ["--matching", "max"],
                                   ["--split-chunks", "0"]])
def test_demo_refuses_coarsening_options_with_the_triangulation_tokenizer(flags):
    from examples.graph_demo import main
    with pytest.raises(SystemExit, match="triangulation|split-chunks"):
        main(["--dataset", "planar", "--tokenizer", "triangulation", *flags, "--out", "/dev/null/never_written"])


@pytest.mark.parametrize("flags", [["--split-chunking", "colour"], ["--size-features", "on"], ["--noisy-context", "0.1"],
                                   ["--candidate-head"], ["--delays", "1"], ["--partial-finest", "0.5"]])
def test_demo_refuses_triangulation_options_without_the_tokenizer(flags):
    from examples.graph_demo import main
    with pytest.raises(SystemExit, match="options of --tokenizer triangulation"):
        main(["--dataset", "planar", *flags, "--out", "/dev/null/never_written"])
    with pytest.raises(SystemExit, match="training options: a --load run"):  # the model exists: its tokenizer is fixed
        main(["--dataset", "planar", "--load", "/dev/null/never_read", *flags, "--out", "/dev/null/never_written"])


def test_split_shape_temperature_keeps_the_split_rate_and_sharpens_the_shape():
    # catches: a temperature that moves P(NO_SPLIT) (fewer vertices), a conditional that is not
    # softmax(logits / T) over the allowed splits, NaN where every split is masked
    from scipy.stats import chisquare

    from modalities.graph.triangulation import SplitShapeTemperature
    from msar.sampling import sample_tokens
    g = torch.Generator().manual_seed(0)
    V, T = 8, 0.5  # tokens: NO_SPLIT, 6 splits, PAD
    logits = torch.randn(1, 3, V, generator=g)
    logits[0, 1, 3:6] = float("-inf")  # some splits masked
    logits[0, 2, 1:V - 1] = float("-inf")  # a blocked vertex: no split allowed
    out = SplitShapeTemperature(T)(0, logits, None)
    p, q = logits.double().softmax(-1)[0].numpy(), out.double().softmax(-1)[0].numpy()
    assert np.allclose(q[:, 0], p[:, 0]) and np.allclose(q[:, -1], p[:, -1])
    for i in range(2):
        z = logits[0, i, 1:V - 1].double().numpy() / T
        ref = np.exp(z - z[np.isfinite(z)].max())
        ref = ref / ref.sum() * p[i, 1:V - 1].sum()
        assert np.allclose(q[i, 1:V - 1], ref)
    assert np.allclose(q[2], p[2]) and np.isfinite(out[0, 2, [0, V - 1]]).all()
    # draws through the shared sampler follow it
    n = 20000
    draws = sample_tokens(out[:, :1].expand(n, 1, V), generator=g)[:, 0]
    counts = np.bincount(draws.numpy(), minlength=V)
    keep = q[0] > 0
    assert chisquare(counts[keep], q[0, keep] / q[0, keep].sum() * n).pvalue > 1e-3


def test_split_placement_temperature_keeps_the_expected_splits_and_shapes_and_scales_the_log_odds():
    # catches: a shift that does not keep each row's expected split count, log-odds not divided by T,
    # a changed shape given a split, touched blocked or PAD positions
    from modalities.graph.triangulation import SplitPlacementTemperature
    g = torch.Generator().manual_seed(0)
    V, T = 8, 0.5  # tokens: NO_SPLIT, 6 splits, PAD
    logits = torch.randn(2, 6, V, generator=g) * 2
    logits[..., V - 1] = float("-inf")  # real positions: no PAD
    logits[0, 1, 3:6] = float("-inf")  # some splits masked
    logits[1, 2, 1:V] = float("-inf")  # a blocked vertex: NO_SPLIT only
    logits[1, 5, :V - 1], logits[1, 5, V - 1] = float("-inf"), 0.0  # a PAD position
    out = SplitPlacementTemperature(T)(0, logits, None)
    p, q = logits.double().softmax(-1).numpy(), out.double().softmax(-1).numpy()
    for b in range(2):
        free = [i for i in range(6) if (b, i) not in {(1, 2), (1, 5)}]
        ps, qs = 1 - p[b, free, 0], 1 - q[b, free, 0]
        assert abs(qs.sum() - ps.sum()) < 1e-5
        lo_p, lo_q = np.log(ps / (1 - ps)), np.log(qs / (1 - qs))
        assert np.allclose(lo_q - lo_q[0], (lo_p - lo_p[0]) / T, atol=1e-4)
        shape_p = p[b, free, 1:V - 1] / ps[:, None]
        shape_q = q[b, free, 1:V - 1] / qs[:, None]
        assert np.allclose(shape_q, shape_p, atol=1e-6)
    assert torch.equal(out[1, 2].isfinite(), logits[1, 2].isfinite()) and q[1, 2, 0] == 1.0
    assert q[1, 5, V - 1] == 1.0


@pytest.mark.parametrize("flags", [[], ["--split-temperature", "0.5", "--split-top-p", "0.9"]])
def test_demo_refuses_split_slot_only_outside_a_split_temperature(flags):
    from examples.graph_demo import main
    with pytest.raises(SystemExit, match="mode of --split-temperature"):
        main(["--dataset", "planar", "--tokenizer", "triangulation", "--split-slot-only", *flags,
              "--out", "/dev/null/never_written"])


def test_split_slot_temperature_keeps_the_span_distribution_and_sharpens_the_slot():
    # catches: a temperature that reaches the span m (which decides the degrees), a slot conditional that
    # is not softmax(log P(i | m) / T), the tokens read as (m, i) instead of (i, m), NaN where a span or a
    # whole vertex is masked
    from scipy.stats import chisquare

    from modalities.graph.triangulation import SplitShapeTemperature
    from msar.sampling import sample_tokens
    g = torch.Generator().manual_seed(1)
    D, T = 4, 0.5
    V = 2 + D * (D - 1)  # NO_SPLIT, shapes 1 + i (D - 1) + m - 1, PAD
    logits = 2 * torch.randn(1, 3, V, generator=g)
    shapes = logits[0, 1, 1:V - 1].view(D, D - 1)
    shapes[3, :] = float("-inf")  # a degree-3 vertex: slots i < 3 ...
    shapes[:, 2] = float("-inf")  # ... and spans m < 3
    logits[0, 2, 1:V - 1] = float("-inf")  # a blocked vertex: no split allowed
    out = SplitShapeTemperature(T, slot_only=True)(0, logits, None)
    assert torch.isfinite(out[0, :, [0, V - 1]]).all()
    p, q = logits.double().softmax(-1)[0].numpy(), out.double().softmax(-1)[0].numpy()
    assert np.allclose(q[:, 0], p[:, 0]) and np.allclose(q[:, -1], p[:, -1]) and np.allclose(q[2], p[2])
    for pos in range(2):
        P, Q = p[pos, 1:V - 1].reshape(D, D - 1), q[pos, 1:V - 1].reshape(D, D - 1)
        assert np.allclose(Q.sum(0), P.sum(0))  # P(m, split) unchanged
        for m in range(D - 1):
            if P[:, m].sum() > 0:
                ref = P[:, m] ** (1 / T)
                assert np.allclose(Q[:, m], ref / ref.sum() * P[:, m].sum())
            else:
                assert (Q[:, m] == 0).all()
    assert not np.allclose(q[0], p[0])  # the slots did sharpen
    n = 20000
    draws = sample_tokens(out[:, :1].expand(n, 1, V), generator=g)[:, 0]
    counts = np.bincount(draws.numpy(), minlength=V)
    keep = q[0] > 0
    assert chisquare(counts[keep], q[0, keep] / q[0, keep].sum() * n).pvalue > 1e-3
    with pytest.raises(ValueError, match="use one"):
        SplitShapeTemperature(0.5, top_p=0.9, slot_only=True)


def test_split_shape_top_p_drops_the_tail_and_keeps_the_ratios_of_the_rest():
    # catches: top-p applied to the whole distribution (NO_SPLIT would compete with the shapes), the
    # kept shapes not renormalised to the split mass, or their ratios changed
    from modalities.graph.triangulation import SplitShapeTemperature
    V = 8  # NO_SPLIT, 6 splits, PAD
    logits = torch.tensor([[[2.0, 1.0, 0.5, -0.2, -1.0, -2.0, -3.0, float("-inf")]]])
    out = SplitShapeTemperature(1.0, top_p=0.8)(0, logits, None)
    p, q = logits.double().softmax(-1)[0, 0], out.double().softmax(-1)[0, 0]
    assert torch.isclose(q[0], p[0]) and q[V - 1] == 0
    shape = p[1:V - 1] / p[1:V - 1].sum()  # decreasing already
    keep = (shape.cumsum(0) - shape) < 0.8
    assert keep.tolist() == [True, True, True, False, False, False]
    ref = torch.where(keep, shape, 0.0)
    assert torch.allclose(q[1:V - 1], ref / ref.sum() * p[1:V - 1].sum())


def test_demo_refuses_a_dataset_without_triangulated_discs_before_training():
    # catches: planar training for minutes, then a crash on the next dataset of the list
    from examples.graph_demo import main
    with pytest.raises(SystemExit, match="no grid training graph is a triangulated disc"):
        main(["--dataset", "planar,grid", "--tokenizer", "triangulation", "--out", "/dev/null/never_written"])


def test_a_graph_beyond_the_fitted_capacity_is_refused_with_the_reason(planar, tok):
    # catches: a level grown past its capacity passing (splits silently dropped) or failing as something else
    shallow = TriangulationTokenizer.fit([nx.convert_node_labels_to_integers(nx.triangular_lattice_graph(2, 4))])
    with pytest.raises(ValueError, match="levels, this tokenizer"):
        shallow.encode([planar[0]])
    narrow = TriangulationTokenizer([4] + [min(c, 20) for c in tok.max_nodes[1:]], tok.max_degree, tok.chunks)
    with pytest.raises(ValueError, match="vertices, capacity 20; refit"):
        narrow.encode([planar[0]])


def test_last_level_benchmark_resamples_only_the_chunks_it_names(tmp_path):
    # an untrained triangulation pipeline saved as a demo run. catches: a known-token mask that resamples
    # other scales than the last level's chunks from c on (then "resample nothing" would not reproduce the
    # data), counts taken at another level than each graph's last split level
    import json
    from _graph_runs import untrained_run
    from benchmarks.graph_last_level import main
    run, train, _ = untrained_run(tmp_path, "planar", fit=lambda g: TriangulationTokenizer.fit(g, chunks=3), num=12)
    out = tmp_path / "last.json"
    main(["--load", str(run), "--from-chunks", "3", "0", "--slot-temperatures", "1.0",
          "--reference", "20", "--out", str(out)])
    res = json.loads(out.read_text())
    none, all_ = res["rows"]
    assert none["sampled_splits"] == res["data"]["splits"] and none["sampled_blocked"] == res["data"]["blocked"]
    assert none["degree_mmd"] == pytest.approx(res["training_graphs_degree_mmd"])
    assert none["mean_nodes"] == np.mean([G.number_of_nodes() for G in train])
    assert all_["sampled_splits"] != res["data"]["splits"]  # an untrained model splits at random
    assert sum(res["data"]["splits"]) > 0 and len(res["teacher_forced_calibration"]) == 4


def test_sample_output_carries_the_decode_state_the_data_came_from(planar):
    # msar.sample returns the tokenizer's final decode state (SampleOutput.state), so an adapter reads its
    # decoding counts without replaying the tokens. catches: a fresh or stale state in the output (its
    # refused splits and graphs would differ from the replay of the same tokens)
    import msar
    from examples.graph_demo import PRESETS, build_model
    tok = TriangulationTokenizer.fit(planar[:8], chunks=2, chunking="round-robin")  # collisions to refuse
    torch.manual_seed(0)
    model = build_model(tok, dict(PRESETS["planar"], width=16, depth=1, heads=2), 0.0).init_weights().eval()
    split_often = lambda k, logits, state: logits.index_add(  # noqa: E731
        -1, torch.tensor([NO_SPLIT]), torch.full(logits.shape[:-1] + (1,), -4.0))
    res = msar.sample(model, tok, batch_size=6, cfg=0.0, top_k=0, top_p=0.0, seed=0,
                      logits_hook=lambda k, lg, st: tok.valid_token_hook(k, split_often(k, lg, st), st))
    replayed = tok.replay(res.indices)
    assert res.state.refused == replayed.refused > 0
    assert [sorted(G.edges()) for G in res.state.history[-1]] == [sorted(G.edges()) for G in replayed.history[-1]]
    assert all(nx.is_isomorphic(G, H) for G, H in zip(graphs_from(res.data), res.state.history[-1]))


def _noisy_level(tok, targets) -> list[int]:
    """Per graph, the one level whose targets are not all PAD."""
    levels = []
    for b in range(targets[0].shape[0]):
        seen = {tok.kinds[s][0] for s, t in enumerate(targets) if (t[b] != tok.pad_token).any()}
        assert len(seen) == 1, f"graph {b}: targets on levels {sorted(seen)}, expected one level"
        levels.append(seen.pop())
    return levels


def test_noisy_context_adds_splits_only_before_a_levels_last_chunk_and_keeps_the_datas_readable_targets(planar):
    # catches: targets that still name a split its spurious neighbour blocked (unreadable in the context the
    # model sees), spurious splits in the last chunk or on vertices the data splits, a teacher input built
    # from other tokens than the returned context, a spurious rate other than the one asked for
    tok = TriangulationTokenizer.fit(planar, chunks=4, chunking="colour")
    graphs, prob = planar[:8], 0.3
    clean = tok.encode(graphs)
    targets, context, teacher = tok.encode_noisy_context(graphs, prob, np.random.default_rng(0))
    assert torch.allclose(teacher, tok.teacher_forcing_input(context))
    levels = _noisy_level(tok, targets)
    st = tok.start(len(graphs))
    spurious = eligible = retargeted = 0
    for s, (k, c) in enumerate(tok.kinds):
        ok = st.allowed(s)
        for b, lvl in enumerate(levels):
            if k != lvl:
                if k < lvl:
                    assert torch.equal(context[s][b], clean[s][b])
                continue
            tgt, ctx, ref = targets[s][b], context[s][b], clean[s][b]
            real = ref != tok.pad_token
            assert ok[b][real].gather(-1, tgt[real].unsqueeze(-1)).all(), "a target the context does not allow"
            assert ok[b][real].gather(-1, ctx[real].unsqueeze(-1)).all(), "a context token the decoder would not read"
            changed = tgt != ref
            assert (tgt[changed] == NO_SPLIT).all()
            retargeted += int(changed.sum())
            extra = ctx != tgt
            assert (tgt[extra] == NO_SPLIT).all() and (ctx[extra] != NO_SPLIT).all()
            if c == tok.chunks - 1:
                assert not extra.any(), "a spurious split in the level's last chunk (it is no one's context)"
            else:
                spurious += int(extra.sum())
                eligible += int((real & (ref == NO_SPLIT) & (ok[b].sum(-1) > 1)).sum())
        st.add_scale(s, context[s])
    assert retargeted > 0
    sd = (eligible * prob * (1 - prob)) ** 0.5
    assert abs(spurious - eligible * prob) < 4 * sd, (spurious, eligible)


def test_noisy_context_picks_a_level_in_proportion_to_its_splits(planar):
    # catches: a level drawn uniformly, or always the last one (the chi-square against split counts / total)
    from scipy.stats import chisquare
    tok = TriangulationTokenizer.fit(planar[:1], chunks=2)
    n = 300
    clean = tok.encode(planar[:1])
    splits = np.zeros(tok.K - 1)
    for s, (k, _) in enumerate(tok.kinds):
        splits[k] += int(((clean[s] != NO_SPLIT) & (clean[s] != tok.pad_token)).sum())
    targets, _, _ = tok.encode_noisy_context(planar[:1] * n, 0.0, np.random.default_rng(1))
    counts = np.bincount(_noisy_level(tok, targets), minlength=tok.K - 1)
    used = splits > 0
    assert counts[~used].sum() == 0
    assert chisquare(counts[used], n * splits[used] / splits.sum()).pvalue > 1e-3


def test_demo_noisy_context_adds_one_noisy_copy_of_every_training_sequence(tmp_path, monkeypatch):
    # catches: --noisy-context parsed but not used, or copies for only some sequences
    import json

    import examples.graph_demo as demo
    seen = []
    real = TriangulationTokenizer.encode_noisy_context

    def counting(self, data, prob, generator):
        seen.append((len(graphs_from(data)), prob))
        return real(self, data, prob, generator)

    monkeypatch.setattr(TriangulationTokenizer, "encode_noisy_context", counting)
    demo.main(["--dataset", "planar", "--tokenizer", "triangulation", "--quick", "--steps", "2", "--num-samples", "2",
               "--noisy-context", "0.25", "--out", str(tmp_path)])
    m = json.loads((tmp_path / "planar" / "metrics.json").read_text())
    assert m["train_config"]["noisy_context"] == 0.25
    assert sum(n for n, _ in seen) == m["training_graphs_used"] * m["train_config"]["perms"]
    assert {p for _, p in seen} == {0.25}


def _one_hot_degree(deg: int) -> list[float]:
    return [float(b == min(max(deg, 3), 10) - 3) for b in range(8)]


def test_candidate_features_describe_the_split_each_token_makes(planar, tok):
    """Every allowed split of every vertex on the way to two planar graphs, applied to a copy of the
    triangulation: the features name the two vertices it joins to the new one (outer / created at the
    previous level / blocked, degree after the split), the new and the split vertex's degrees, and
    whether the outer vertex moves to the new vertex; tokens the vertex's degree does not allow get zeros.  Catches a
    slot, span or degree read off by one, and a feature of the wrong neighbour."""
    from modalities.graph.triangulation import _allowed_table, _split_of
    idx = tok.encode(planar[:2])
    st = tok.start(2)
    D, checked, x = tok.max_degree, 0, None  # x: the input of the scale being checked
    allowed = _allowed_table(D)
    for s_, t in enumerate(idx):
        if s_ > 0:
            feats = tok.candidate_features(x)  # (2, n_s, V, F)
            assert feats.shape == (2, t.shape[1], tok.vocab_size, tok.candidate_dim)
            _, c = tok.kinds[s_]
            for b, g in enumerate(st.growers):
                vs = g.members[c]
                assert not feats[b, len(vs):].any()  # PAD positions
                for p, v in enumerate(vs[:6]):  # a few positions per scale: ~2k splits in all
                    r = g.rot.rot[v]
                    if v == 0 or len(r) > D:  # the outer vertex never splits
                        continue
                    # what a split would do, blocked vertices included (the valid-token hook masks those)
                    ok = allowed[len(r)]
                    assert not feats[b, p, ~torch.from_numpy(ok)].any()
                    for tt in np.flatnonzero(ok)[1:]:
                        i, m = _split_of(int(tt), D)
                        T = g.rot.copy()
                        T.split(v, "new", (r.index(min(r)) + i) % len(r), m)
                        u, w = T.rot["new"][0], T.rot["new"][-2]
                        want = ([u == 0, u in g.new, u in g.blocked] + _one_hot_degree(T.degree(u))
                                + [w == 0, w in g.new, w in g.blocked] + _one_hot_degree(T.degree(w))
                                + _one_hot_degree(T.degree("new")) + _one_hot_degree(T.degree(v))
                                + [0 in T.rot["new"] and 0 not in T.rot[v]])
                        assert feats[b, p, tt].tolist() == [float(f) for f in want], (s_, b, v, i, m)
                        checked += 1
        x = st.add_scale(s_, t)
    assert checked > 1000


def test_demo_trains_and_samples_with_the_candidate_head(tmp_path):
    # catches: the candidate head not reaching the model, the trainer or the sampler of the demo
    import json

    from examples.graph_demo import main
    main(["--dataset", "planar", "--tokenizer", "triangulation", "--candidate-head", "--quick", "--steps", "3",
          "--num-samples", "2", "--out", str(tmp_path)])
    m = json.loads((tmp_path / "planar" / "metrics.json").read_text())
    assert m["vun"]["validity"] == 1.0
    cfg = json.loads((tmp_path / "planar" / "pipeline" / "transformer" / "config.json").read_text())
    assert cfg["config"]["candidate_dim"] == TriangulationTokenizer.candidate_dim


def test_size_trajectory_summary_counts_growth_and_where_short_graphs_stopped():
    # catches: levels that do not grow counted in the growth factor, an off-by-one in the last growing level,
    # a short graph that grew at the last level counted as stopped there
    from benchmarks.graph_size_trajectory import summary
    sizes = np.array([[3, 4, 6, 6], [3, 5, 5, 5], [3, 3, 4, 7], [3, 4, 5, 6]])
    s = summary(sizes, full=7)
    assert s["last_growing_level"] == {1: 1, 2: 1, 3: 2}
    assert s["short"] == 3 and s["short_and_last_level_did_not_grow"] == 2
    factors = [4 / 3, 6 / 4, 5 / 3, 4 / 3, 7 / 4, 4 / 3, 5 / 4, 6 / 5]
    assert s["growth_by_size"] == {0: [pytest.approx(np.mean(factors)), len(factors)]}
    assert s["final_nodes"] == {5: 1, 6: 2, 7: 1} and s["level_mean"][0] == 3


def test_size_trajectory_benchmark_follows_the_training_hierarchies_and_the_samples(tmp_path):
    # an untrained pipeline with delayed, partial hierarchies. catches: data trajectories that are not the
    # tokenizer's (every training graph ends at its own size), samples not followed level by level
    import json
    from _graph_runs import untrained_run
    from benchmarks.graph_size_trajectory import main
    fit = lambda g: TriangulationTokenizer.fit(g, chunks=3, delays=1, partial_finest=0.5, size_features=True)  # noqa: E731
    run, train, tok = untrained_run(tmp_path, "planar", fit=fit, num=12)
    out = tmp_path / "traj.json"
    main(["--load", str(run), "--num", "6", "--seeds", "0", "--data-orderings", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    data, samples = res["data"], res["samples"]
    assert data["graphs"] == len(train) and data["short"] == 0
    assert data["final_nodes"] == {"64": len(train)} and len(data["level_mean"]) == tok.K
    assert np.all(np.diff(data["level_mean"]) >= 0) and data["level_mean"][0] == 3
    assert samples["graphs"] == 6 and len(samples["level_mean"]) == tok.K
    assert set(data["last_growing_level"]) <= set(map(str, range(1, tok.K)))
