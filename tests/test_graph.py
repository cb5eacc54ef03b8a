"""Graph modality: coarsening invariants, exact tokenizer round trip, metrics on known cases,
validity and reproducibility of samples, protocol conformance. Tiny graphs and models only."""
import collections
import itertools

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torch_geometric.data import Batch

import msar
from modalities.graph.coarsen import MATCHINGS, level_graph
from modalities.graph import (GraphPyramidTokenizer, assignments, coarsen, graphs_from, make_dataset, mmd_all,
                              num_levels_for, to_data, vun)
from modalities.graph.metrics import (IsoSet, gaussian_emd, gaussian_tv, graphlet_counts, is_grid, is_lobster,
                                      is_planar_valid, mmd2, orbit_vector)
from modalities.graph.tokenizer import EDGE0, PAD, PAIR_EDGE


@st.composite
def graphs(draw, max_n=24):
    n = draw(st.integers(1, max_n))
    p = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**31 - 1))
    return nx.gnp_random_graph(n, p, seed=seed)


# ---------------------------------------------------------------------------- coarsening
@given(graphs(), st.sampled_from(MATCHINGS))
def test_coarsening_hierarchy_invariants(G, matching):
    levels = coarsen(G, matching=matching)
    N = G.number_of_nodes()
    assert levels[0].n == 1, "the top level has one node"
    assert len(levels) == num_levels_for(N)
    for k in range(len(levels) - 1):
        fine = levels[k + 1]
        # every fine node is the child of exactly one coarse node
        kids = sorted(itertools.chain.from_iterable(levels[k].children))
        assert kids == list(range(fine.n))
        assert all(1 <= len(c) <= 2 for c in levels[k].children)
        # levels shrink by exact halving
        assert levels[k].n == -(-fine.n // 2) and (levels[k].n < fine.n or fine.n == 1)
        # a coarse edge exists iff some fine edge joins the two clusters
        parent = {c: p for p, cs in enumerate(levels[k].children) for c in cs}
        projected = {(min(parent[u], parent[v]), max(parent[u], parent[v])) for u, v in fine.edges
                     if parent[u] != parent[v]}
        assert projected == set(levels[k].edges)
    assert nx.is_isomorphic(level_graph(levels[-1]), G)
    # cluster maps: one cluster per node per level, as the core OperatorPyramid wants
    for k, a in enumerate(assignments(levels)):
        assert a.shape == (N,) and a.min() >= 0 and a.max() == levels[k].n - 1
        assert len(np.unique(a)) == levels[k].n


@given(graphs(max_n=20), st.sampled_from(MATCHINGS))
def test_coarsening_is_deterministic_and_pads_top(G, matching):
    a, b = coarsen(G, matching=matching), coarsen(G.copy(), matching=matching)
    assert [(l.n, l.edges, l.children) for l in a] == [(l.n, l.edges, l.children) for l in b]
    padded = coarsen(G, num_levels_for(G.number_of_nodes()) + 2)
    assert [l.n for l in padded[:3]] == [1, 1, 1]


# ---------------------------------------------------------------------------- tokenizer
def _tok_for(gs, edge_chunks=3):
    return GraphPyramidTokenizer.fit(gs, edge_slack=0.0, edge_chunks=edge_chunks)


def _tiny_model(tok):
    """An unconditional depth-1 transformer for ``tok`` with VAR's init, in eval mode."""
    return msar.NextScaleTransformer(msar.TransformerConfig(
        schedule=tok.schedule.to_config(), vocab_size=tok.vocab_size, latent_dim=tok.latent_dim,
        depth=1, embed_dim=32, num_heads=2)).init_weights().eval()


@given(st.lists(graphs(max_n=20), min_size=1, max_size=4), st.integers(1, 3), st.sampled_from(MATCHINGS),
       st.sampled_from([None, "all", 2]))
def test_round_trip_is_isomorphic(gs, chunks, matching, final):
    # catches: a finest expansion dealt into a different number of chunks by the encoder and the decoder
    tok = GraphPyramidTokenizer.fit(gs, edge_slack=0.0, edge_chunks=chunks, matching=matching, final_chunks=final)
    if tok.K >= 3:
        want = {None: chunks, "all": max(1, tok.max_edges[tok.K - 2]), 2: 2}[final]
        assert sum(kd == "E" and lvl == tok.K - 2 for kd, lvl, _ in tok.kinds) == want
        assert GraphPyramidTokenizer(**tok.config).schedule.token_counts == tok.schedule.token_counts
    idx = tok.encode(gs)
    tok.schedule.check_indices(idx, tok.vocab_size, batch_size=len(gs))
    out = graphs_from(tok.decode(idx))
    for G, H in zip(gs, out):
        assert nx.is_isomorphic(G, H)
    # teacher forcing is the decode state's own output, scale by scale
    tf = tok.teacher_forcing_input(idx)
    assert tf.shape == (len(gs), tok.schedule.L - tok.schedule.first_len, tok.latent_dim)
    assert torch.isfinite(tf).all()


def test_round_trip_on_every_dataset_and_pyg_batch():
    for name in ("grid", "community-small", "sbm", "planar", "lobster"):
        kw = {"grid": {"max_side": 11}, "sbm": {"num": 5, "max_c": 2}, "planar": {"num": 5}, "lobster": {"num": 5},
              "community-small": {"num": 5}}[name]
        gs = make_dataset(name, seed=1, **kw)["train"][:2]
        tok = _tok_for(gs)
        batch = Batch.from_data_list([to_data(G) for G in gs])
        out = tok.decode(tok.encode(batch))
        assert isinstance(out, Batch) and out.num_graphs == len(gs)
        for G, H in zip(gs, graphs_from(out)):
            assert nx.is_isomorphic(G, H), name


@given(st.data())
def test_decoding_any_tokens_gives_simple_graphs(data):
    gs = make_dataset("community-small", seed=0, num=5)["train"]
    tok = _tok_for(gs)
    B = 3
    idx = [torch.tensor(data.draw(st.lists(st.lists(st.integers(0, tok.vocab_size - 1), min_size=n, max_size=n),
                                           min_size=B, max_size=B)))
           for n in tok.schedule.token_counts]
    for H in graphs_from(tok.decode(idx)):
        assert 1 <= H.number_of_nodes() <= tok.max_nodes[-1]
        assert nx.number_of_selfloops(H) == 0 and not H.is_directed()


def test_progression_shows_every_level():
    G = nx.convert_node_labels_to_integers(nx.grid_2d_graph(4, 5))
    tok = _tok_for([G])
    prog = tok.decode_progression(tok.encode([G]))
    assert [lvl[0].number_of_nodes() for lvl in prog] == tok.max_nodes
    assert nx.is_isomorphic(prog[-1][0], G)


def test_tokenizer_errors_are_clear():
    gs = make_dataset("community-small", seed=0, num=5)["train"]
    tok = _tok_for(gs)
    with pytest.raises(ValueError, match="at most"):
        tok.encode(nx.path_graph(tok.max_nodes[-1] + 1))
    with pytest.raises(TypeError, match="networkx Graph or torch_geometric Data"):
        tok.encode([np.zeros(3)])
    with pytest.raises(ValueError, match="expected"):
        tok.decode([torch.zeros(1, 1, dtype=torch.long)])
    st_ = tok.start(1)
    with pytest.raises(ValueError, match="in order"):
        st_.add_scale(1, torch.zeros(1, tok.schedule.token_counts[1], dtype=torch.long))


def test_pyramid_is_a_core_operator_pyramid():
    gs = make_dataset("community-small", seed=0, num=5)["train"][:2]
    tok = _tok_for(gs)
    pyr = tok.pyramid(gs)
    N = tok.max_nodes[-1]
    f = torch.randn(2, 3, N)
    for k, n in enumerate(tok.max_nodes):
        h = pyr.restrict(f, k)
        assert h.shape == (2, 3, n)
        assert pyr.prolong(h, k).shape == (2, 3, N)
    assert torch.allclose(pyr.restrict(f, len(tok.max_nodes) - 1), f)


@pytest.mark.parametrize("final", [None, "all"])
def test_conformance_kit(final):
    testing = pytest.importorskip("msar.testing")
    gs = make_dataset("community-small", seed=0, num=6)["train"][:3]
    tok = GraphPyramidTokenizer.fit(gs, edge_slack=0.0, edge_chunks=3, final_chunks=final)
    model = testing.tiny_transformer(tok)
    testing.check_adapter(tok, gs, model=model)


# ---------------------------------------------------------------------------- metrics
def test_mmd_of_a_set_with_itself_is_zero_and_positive_otherwise():
    ring = [nx.cycle_graph(n) for n in range(6, 12)]
    clique = [nx.complete_graph(n) for n in range(4, 8)]
    same = mmd_all(ring, ring)
    assert all(abs(v) < 1e-12 for v in same.values())
    diff = mmd_all(ring, clique)
    assert all(v > 1e-3 for v in diff.values()), diff


def test_kernels_on_known_cases():
    x = np.array([1.0, 0.0])
    y = np.array([0.0, 1.0])
    assert gaussian_tv(x, x) == 1.0
    assert np.isclose(gaussian_tv(x, y, sigma=1.0), np.exp(-0.5))  # TV = 1
    assert np.isclose(gaussian_emd(x, y, sigma=1.0), np.exp(-0.5))  # one unit of mass moved one bin
    assert np.isclose(gaussian_emd(np.array([1.0, 0, 0]), np.array([0, 0, 1.0])), np.exp(-2.0))
    assert np.isclose(mmd2([x], [y], "tv", 1.0), 2 - 2 * np.exp(-0.5))


def _brute_graphlets(G):
    names = {(1, 1, 2): "wedge", (2, 2, 2): "triangle", (1, 1, 2, 2): "path4", (1, 1, 1, 3): "star",
             (2, 2, 2, 2): "cycle4", (1, 2, 2, 3): "paw", (2, 2, 3, 3): "diamond", (3, 3, 3, 3): "k4"}
    c = dict.fromkeys(names.values(), 0)
    for k in (3, 4):
        for S in itertools.combinations(G.nodes(), k):
            H = G.subgraph(S)
            if nx.is_connected(H):
                c[names[tuple(sorted(d for _, d in H.degree()))]] += 1
    return c


@given(graphs(max_n=9))
def test_graphlet_counts_match_brute_force(G):
    got = graphlet_counts(G)
    for k, v in _brute_graphlets(G).items():
        assert got[k] == v, k


def test_orbit_vector_known_graphs():
    assert np.allclose(orbit_vector(nx.complete_graph(4)), [3, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    # a 4-cycle: every node has degree 2, is the middle of 1 and an end of 2 wedges, lies on one C4 (no induced P4)
    assert np.allclose(orbit_vector(nx.cycle_graph(4)), [2, 2, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0])


def test_validity_checks_and_vun():
    assert is_grid(nx.convert_node_labels_to_integers(nx.grid_2d_graph(3, 5)))
    assert not is_grid(nx.cycle_graph(12)) and not is_grid(nx.path_graph(4))
    assert is_lobster(nx.random_lobster_graph(20, 0.7, 0.7, seed=3) if hasattr(nx, 'random_lobster_graph') else nx.random_lobster(20, 0.7, 0.7, seed=3)) and not is_lobster(nx.cycle_graph(5))
    assert is_planar_valid(nx.complete_graph(4)) and not is_planar_valid(nx.complete_graph(5))
    train = [nx.path_graph(5), nx.cycle_graph(5)]
    gen = [nx.relabel_nodes(nx.cycle_graph(5), {i: (i * 2) % 5 for i in range(5)}), nx.path_graph(6),
           nx.path_graph(6), nx.star_graph(4)]
    r = vun(gen, train, "lobster")
    assert r["uniqueness"] == 0.75 and r["novelty"] == 0.75 and r["validity"] == 0.75
    assert r["vun"] == 0.5  # path(6) once and star(4): valid, unique, novel
    s = IsoSet([nx.path_graph(4)])
    assert nx.relabel_nodes(nx.path_graph(4), {0: 3, 3: 0}) in s and nx.star_graph(3) not in s


# ---------------------------------------------------------------------------- datasets
def test_datasets_are_deterministic_with_splits():
    a = make_dataset("planar", seed=3, num=10)
    b = make_dataset("planar", seed=3, num=10)
    assert len(a["train"]) == 8 and len(a["test"]) == 2
    assert all(nx.utils.graphs_equal(x, y) for x, y in zip(a["train"], b["train"]))
    assert all(is_planar_valid(G) and G.number_of_nodes() == 64 for G in a["train"])
    cs = make_dataset("community-small", seed=0, num=20)
    assert all(12 <= G.number_of_nodes() <= 20 for G in cs["train"] + cs["test"])
    g = make_dataset("grid", seed=0, max_side=11)
    assert len(g["train"]) + len(g["test"]) == 4 and all(is_grid(G) for G in g["train"])
    with pytest.raises(ValueError, match="unknown graph dataset"):
        make_dataset("cora")


# ---------------------------------------------------------------------------- sampling
def test_samples_are_valid_simple_graphs_and_reproducible():
    torch.manual_seed(0)
    gs = make_dataset("community-small", seed=0, num=10)["train"]
    tok = _tok_for(gs)
    model = _tiny_model(tok)
    # a few teacher-forced steps so the samples are not uniform noise
    idx = tok.encode(gs)
    x, tf, m = torch.cat(idx, 1), tok.teacher_forcing_input(idx), torch.cat(idx, 1) != PAD
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(5):
        logits = model(torch.zeros(len(gs), dtype=torch.long), tf)
        loss = (torch.nn.functional.cross_entropy(logits.transpose(1, 2), x, reduction="none") * m).sum() / m.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    a = msar.sample(model, tok, batch_size=6, cfg=0.0, seed=123)
    b = msar.sample(model, tok, batch_size=6, cfg=0.0, seed=123)
    assert all(torch.equal(p, q) for p, q in zip(a.indices, b.indices))
    ga, gb = graphs_from(a.data), graphs_from(b.data)
    assert len(ga) == 6
    for G, H in zip(ga, gb):
        assert nx.utils.graphs_equal(G, H)
        assert not G.is_directed() and not G.is_multigraph() and nx.number_of_selfloops(G) == 0
        assert G.number_of_nodes() >= 1
    # the PyG output is undirected: every edge is stored in both directions, no self loops
    for d in a.data.to_data_list():
        ei = d.edge_index
        assert (ei[0] != ei[1]).all()
        assert set(map(tuple, ei.t().tolist())) == set(map(tuple, ei.flip(0).t().tolist()))


# ---------------------------------------------------------------------------- valid-token constraints
def _teacher_force_allowed(tok, idx):
    """Feed ``idx`` through a decode state; at every scale the tokens must be allowed, and the
    real (non-PAD-only) positions must be exactly the non-PAD ones of an encoding."""
    st_ = tok.start(idx[0].shape[0])
    for k, t in enumerate(idx):
        ok = st_.allowed(k)
        assert ok.shape == (t.shape[0], t.shape[1], tok.vocab_size) and ok.any(-1).all()
        assert ok.gather(-1, t.unsqueeze(-1)).all(), f"scale {k} ({tok.kinds[k]}): an encoded token is not allowed"
        st_.add_scale(k, t)
    return st_


@given(st.lists(graphs(max_n=16), min_size=1, max_size=3), st.integers(1, 3), st.sampled_from([None, "all"]))
def test_encoded_tokens_are_always_allowed(gs, chunks, final):
    tok = GraphPyramidTokenizer.fit(gs, edge_slack=0.0, edge_chunks=chunks, final_chunks=final)
    idx = tok.encode(gs)
    st_ = tok.start(len(gs))
    for k, t in enumerate(idx):
        ok = st_.allowed(k)
        assert ok.gather(-1, t.unsqueeze(-1)).all(), f"scale {k} ({tok.kinds[k]})"
        # a position is real (PAD forbidden) exactly where the encoding holds a node or an edge
        assert torch.equal(~ok[..., PAD], t != PAD)
        st_.add_scale(k, t)


def test_allowed_edge_masks_and_full_capacity():
    # path 0-1-2-3 under capacities [1, 1, 2, 4]: G_0 -> G_1 cannot split (capacity 1), and the
    # edge of G_2's coarse level joins two 2-child clusters
    G = nx.path_graph(4)
    tok = GraphPyramidTokenizer([1, 1, 2, 4], [0, 1, 1, 0], edge_chunks=1)
    idx = tok.encode([G])
    st_ = tok.start(1)
    ok0 = st_.allowed(0)
    assert ok0[0, 0].nonzero().flatten().tolist() == [0]  # SINGLE only: a PAIR would be forced to SINGLE
    _teacher_force_allowed(tok, idx)
    # one child on u, two on v: only the masks with bits 0 (0-0) and 1 (0-1)
    tok2 = GraphPyramidTokenizer([1, 2, 3], [0, 1, 0], edge_chunks=1)
    st2 = tok2.start(1)
    st2.add_scale(0, torch.tensor([[1]]))       # PAIR without an edge: G_1 = 2 nodes, no edge
    st2.add_scale(1, torch.tensor([[0, 1]]))    # node 0 stays single, node 1 splits: 3 nodes
    # no coarse edge, so the only edge-scale position is padding
    assert st2.allowed(2)[0, 0].nonzero().flatten().tolist() == [PAD]
    st3 = tok2.start(1)
    st3.add_scale(0, torch.tensor([[2]]))       # PAIR_EDGE: G_1 = one edge (0, 1)
    st3.add_scale(1, torch.tensor([[0, 1]]))
    assert (st3.allowed(2)[0, 0].nonzero().flatten() - EDGE0 + 1).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="scale"):
        st3.allowed(0)
    with pytest.raises(TypeError, match="decode state"):
        tok.valid_token_hook(2, torch.zeros(1, 1, tok.vocab_size), st3)  # st3 is tok2's, not tok's


def test_hook_samples_only_allowed_tokens():
    torch.manual_seed(0)
    gs = make_dataset("community-small", seed=0, num=10)["train"]
    tok = _tok_for(gs)
    model = _tiny_model(tok)
    B = 8
    res = msar.sample(model, tok, batch_size=B, cfg=0.0, seed=1, logits_hook=tok.valid_token_hook)
    # replaying the sampled tokens through a fresh state: every token is allowed (so none is PAD at a
    # real position, none is reinterpreted), and the decoded graphs are those of the sample
    replay = _teacher_force_allowed(tok, res.indices)
    for G, H in zip(graphs_from(res.data), graphs_from(tok.finish(replay))):
        assert nx.utils.graphs_equal(G, H)
    # the untrained model without the hook does put mass on invalid tokens (so the check above means something)
    free = msar.sample(model, tok, batch_size=B, cfg=0.0, seed=1)
    with pytest.raises(AssertionError):
        _teacher_force_allowed(tok, free.indices)


# ---------------------------------------------------------------------------- structure validity
def _grid(a, b):
    return nx.convert_node_labels_to_integers(nx.grid_2d_graph(a, b))


def test_planar_and_grid_validity_on_known_graphs():
    # catches: a validity check that skips planarity (K5, K3,3) or connectivity, or accepts near-grids
    tri = make_dataset("planar", seed=1, num=5)["train"][0]  # a Delaunay triangulation
    assert is_planar_valid(tri) and is_planar_valid(nx.complete_graph(4))
    assert not is_planar_valid(nx.complete_graph(5))
    assert not is_planar_valid(nx.complete_bipartite_graph(3, 3))
    assert not is_planar_valid(nx.disjoint_union(nx.cycle_graph(4), nx.cycle_graph(4)))  # planar, disconnected
    G = _grid(4, 5)
    assert is_grid(G)
    moved = G.copy()  # one edge moved: same node and edge counts, degrees nearly a grid's
    moved.remove_edge(0, 1)
    moved.add_edge(0, 6)
    assert moved.number_of_edges() == G.number_of_edges() and not is_grid(moved)


def test_vun_on_a_hand_made_planar_and_grid_set():
    # grid: a 3x4 grid, the same grid relabelled (not unique), a 2x6 grid seen in training (not novel),
    # a 3x4 grid with one edge moved (not valid), a 4x4 grid (valid, unique, novel)
    bad = _grid(3, 4)
    bad.remove_edge(0, 1)
    bad.add_edge(0, 5)
    relabelled = nx.relabel_nodes(_grid(3, 4), {i: 11 - i for i in range(12)})
    r = vun([_grid(3, 4), relabelled, _grid(2, 6), bad, _grid(4, 4)], [_grid(2, 6)], "grid")
    assert r == {"validity": 0.8, "uniqueness": 0.8, "novelty": 0.8, "vun": 0.4, "connected": 1.0}
    # planar: K4 (valid), K5 (not planar), two triangles (planar, not connected), a wheel (valid, in training)
    gen = [nx.complete_graph(4), nx.complete_graph(5), nx.disjoint_union(nx.cycle_graph(3), nx.cycle_graph(3)),
           nx.wheel_graph(6)]
    r = vun(gen, [nx.wheel_graph(6)], "planar")
    assert r == {"validity": 0.5, "uniqueness": 1.0, "novelty": 0.75, "vun": 0.25, "connected": 0.75}


def test_memorization_splits_valid_samples_into_train_copies_eval_only_and_new():
    # catches: counting invalid samples, checking the evaluation split before the training one (a graph in
    # both is a training copy), comparing labelled graphs instead of isomorphism classes, shares of all samples
    from modalities.graph.metrics import memorization
    relabelled = nx.relabel_nodes(_grid(3, 4), {i: 11 - i for i in range(12)})
    bad = _grid(3, 5)
    bad.remove_edge(0, 1)
    bad.add_edge(0, 6)
    gen = [relabelled, _grid(3, 4), _grid(2, 6), _grid(4, 4), _grid(2, 5), bad]
    r = memorization(gen, train=[_grid(3, 4), _grid(2, 5)], test=[_grid(2, 6), _grid(2, 5)], dataset="grid")
    assert r == {"valid": 5, "distinct_valid": 4, "in_train": 0.6, "in_eval_only": 0.2, "neither": 0.2}
    assert memorization([bad], [_grid(3, 4)], [_grid(2, 6)], "grid")["in_train"] is None
    # no validity check defined: every sample counts
    assert memorization([nx.path_graph(3), nx.cycle_graph(4)], [nx.path_graph(3)], [], "sbm")["in_train"] == 0.5


def test_structure_hook_draw_is_the_model_distribution_given_the_property():
    # catches: a rejection loop that does not renormalise (or redraws from the full distribution)
    from modalities.graph.constraints import StructureHook
    tok = _tok_for([nx.path_graph(4)])
    no_bit0 = lambda G, final: not G.has_edge(0, 2)  # a mask with bit 0 (child 0 of u -- child 0 of v) fails
    hook = StructureHook(tok, no_bit0, seed=0)
    p = torch.zeros(tok.vocab_size)
    p[EDGE0:EDGE0 + 15] = torch.arange(1, 16, dtype=torch.float)  # mask m has weight m
    counts = torch.zeros(tok.vocab_size)
    n = 6000
    for _ in range(n):
        G = nx.empty_graph(4)
        counts[hook._draw(G, p.clone(), p.clone(), [0, 1], [2, 3], final=True)] += 1
    masks = torch.arange(1, 16)
    want = torch.where(masks % 2 == 0, masks.float(), torch.zeros(15))  # even masks: bit 0 unset
    want = want / want.sum()
    assert counts[EDGE0 + masks[masks % 2 == 1] - 1].sum() == 0
    assert torch.allclose(counts[EDGE0:EDGE0 + 15] / n, want, atol=0.02)
    assert hook.stats["positions"] == n and hook.stats["rejected"] > 0 and hook.stats["dropped"] == 0
    # nothing passes: the coarse edge is dropped (PAD), and the graph is left as it was
    G = nx.empty_graph(4)
    empty_only = StructureHook(tok, lambda G, final: G.number_of_edges() == 0)
    assert empty_only._draw(G, p.clone(), p.clone(), [0, 1], [2, 3], True) == PAD
    assert G.number_of_edges() == 0
    with pytest.raises(ValueError, match="unknown structure property"):
        StructureHook(tok, "torus")


def test_structure_hook_top_p_prefers_the_nucleus_and_falls_back_to_the_valid_tail():
    # catches: top-p applied after the property (a valid nucleus mask lost to the tail), a nucleus that is
    # not msar's top-p, or an edge dropped while a valid mask outside the nucleus exists
    from scipy.stats import chisquare

    from modalities.graph.constraints import StructureHook
    from msar.sampling import filter_top_k_top_p
    tok = _tok_for([nx.path_graph(4)])
    logits = torch.full((tok.vocab_size,), float("-inf"))
    logits[EDGE0:EDGE0 + 15] = torch.arange(1, 16, dtype=torch.float) / 3  # mask m: logit m / 3
    nucleus = filter_top_k_top_p(logits, top_p=0.7).softmax(-1)
    full = logits.softmax(-1)
    kept = (nucleus > 0).nonzero().flatten() - EDGE0 + 1  # the largest masks
    assert 1 < len(kept) < 15
    any_mask = lambda G, final: True
    hook = StructureHook(tok, any_mask, seed=0, top_p=0.7)
    n = 6000
    counts = torch.zeros(tok.vocab_size)
    for _ in range(n):
        counts[hook._draw(nx.empty_graph(4), nucleus.clone(), full.clone(), [0, 1], [2, 3], True)] += 1
    ids = EDGE0 + kept - 1
    assert counts.sum() == counts[ids].sum()
    assert chisquare(counts[ids].numpy(), (nucleus[ids] / nucleus[ids].sum() * n).numpy()).pvalue > 1e-3
    # every nucleus mask breaks the property: the draw comes from the valid rest, by the model's odds
    small = lambda G, final: G.number_of_edges() <= 1  # only masks naming one child pair pass
    hook = StructureHook(tok, small, seed=1, top_p=0.7)
    singles = torch.tensor([1, 2, 4, 8])
    assert not set(singles.tolist()) & set(kept.tolist())
    counts = torch.zeros(tok.vocab_size)
    for _ in range(n):
        counts[hook._draw(nx.empty_graph(4), nucleus.clone(), full.clone(), [0, 1], [2, 3], True)] += 1
    ids = EDGE0 + singles - 1
    assert counts.sum() == counts[ids].sum() and hook.stats["dropped"] == 0
    assert chisquare(counts[ids].numpy(), (full[ids] / full[ids].sum() * n).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("prop", ["planar", "grid"])
def test_structure_hook_samples_satisfy_the_property(prop):
    # catches: a hook that checks the wrong level, forgets the edges of earlier positions of the
    # same scale, or lets the sampler draw anything but the token it chose
    from modalities.graph.constraints import PROPERTIES, StructureHook
    torch.manual_seed(0)
    gs = make_dataset("community-small", seed=0, num=10)["train"]
    tok = _tok_for(gs)
    model = _tiny_model(tok)
    B = 8
    bias = torch.zeros(tok.vocab_size)
    bias[[PAIR_EDGE, EDGE0 + 14]] = 4.0  # a model that wants dense graphs: split with an edge, join all pairs

    def dense(k, logits, state):
        return tok.valid_token_hook(k, logits + bias, state)

    def structured(hook):
        return lambda k, logits, state: hook(k, logits + bias, state)

    hook = StructureHook(tok, prop, seed=3)
    res = msar.sample(model, tok, batch_size=B, cfg=0.0, seed=1, logits_hook=structured(hook))
    sampled = graphs_from(res.data)
    assert all(PROPERTIES[prop](G, True) for G in sampled)
    assert hook.stats["rejected"] > 0
    # same seeds, same graphs
    again = msar.sample(model, tok, batch_size=B, cfg=0.0, seed=1,
                        logits_hook=structured(StructureHook(tok, prop, seed=3)))
    assert all(nx.utils.graphs_equal(G, H) for G, H in zip(sampled, graphs_from(again.data)))
    # the same model without the structure hook breaks the property (so the check above means something)
    free = msar.sample(model, tok, batch_size=B, cfg=0.0, seed=1, logits_hook=dense)
    assert not any(PROPERTIES[prop](G, True) for G in graphs_from(free.data))


def test_max_matching_keeps_every_level_of_planar_graphs_planar():
    # catches: a "max" matching that still pairs non-adjacent nodes where a perfect matching exists
    # (then planarity could not be enforced level by level); greedy matching does break it
    gs = make_dataset("planar", seed=0, num=10)["train"][:4]

    def nonplanar_levels(matching):
        return sum(not nx.check_planarity(level_graph(l))[0] for G in gs for l in coarsen(G, matching=matching))
    assert nonplanar_levels("max") == 0 and nonplanar_levels("greedy") > 0
    tok = GraphPyramidTokenizer.fit(gs, matching="max")
    assert GraphPyramidTokenizer(**tok.config).matching == "max"
    assert GraphPyramidTokenizer(**{k: v for k, v in tok.config.items() if k != "matching"}).matching == "greedy"
    with pytest.raises(ValueError, match="matching must be one of"):
        coarsen(gs[0], matching="random")


def _grid_sides(G: nx.Graph):
    """``(a, b)`` when ``G`` is an ``a x b`` grid (a path counts as ``1 x n``), else None."""
    n = G.number_of_nodes()
    if nx.is_isomorphic(G, nx.path_graph(n)):
        return (1, n)
    if not is_grid(G):
        return None
    return next((a, n // a) for a in range(2, n + 1)
                if n % a == 0 and G.number_of_edges() == a * (n // a - 1) + (n // a) * (a - 1))


def _masks(coarse, fine) -> list[tuple[bool, int]]:
    """Per edge ``(u, v)`` of ``coarse``: (u and v are siblings, its mask: bit ``2 i + j`` set when child
    ``i`` of u and child ``j`` of v are joined in ``fine``); siblings need the level above, so this
    takes ``(above, coarse, fine)`` as ``coarse``."""
    above, coarse = coarse
    parent = {c: p for p, cs in enumerate(above.children) for c in cs}
    joined = set(fine.edges)
    return [(parent[u] == parent[v], sum(1 << (2 * i + j) for i, a in enumerate(coarse.children[u])
                                          for j, b in enumerate(coarse.children[v]) if (min(a, b), max(a, b)) in joined))
            for u, v in coarse.edges]


def test_aligned_matching_coarsens_grids_into_grids():
    # catches: a matching that does not line its pairs up (greedy heavy-edge matching turns even the
    # first level of every grid into an irregular graph), one that pairs along an odd side, children
    # oriented by label, or pairs that do not alternate direction where the sides allow it
    from examples.graph_demo import augment
    train = make_dataset("grid", seed=0)["train"]
    pick = list({G.number_of_nodes(): G for G in train if G.number_of_nodes() in (256, 13 * 16, 10 * 12, 14 * 19)}.values())
    assert len(pick) == 4
    for G in augment(pick, 2, seed=0):  # each grid as given and relabelled (other tie-breaks)
        a, b = _grid_sides(G)
        for matching in ("aligned", "greedy"):
            levels = coarsen(G, matching=matching)
            first = _grid_sides(level_graph(levels[-2]))  # one side is even: halving it leaves a grid
            if matching == "aligned":
                assert first is not None and sorted(first) in (sorted((a // 2, b)), sorted((a, b // 2))), first
            else:
                assert first is None
        if G.number_of_nodes() == 256:  # 16 x 16: every level is a grid, down to the single node
            levels = coarsen(G, matching="aligned")
            assert all(s is not None for s in map(_grid_sides, map(level_graph, levels)))
            for above, coarse, fine in zip(levels, levels[1:-1], levels[2:]):
                masks = _masks((above, coarse), fine)
                # children oriented alike (first child left / top everywhere): a mask depends only on the
                # edge's direction, 2 masks per level (label-ordered children: 3-6)
                assert len({m for _, m in masks}) <= 2, masks
                # directions alternate: two siblings (split along the previous direction) lie across the
                # next one, so both of their child pairs are joined (mask 0b1001)
                assert all(m == 0b1001 for sib, m in masks if sib), masks


def test_parent_links_input_counts_the_edges_between_the_parents_children():
    # catches: the count taken over the wrong pairs (siblings, or the fine level), written at the wrong
    # position, or a tokenizer whose config forgets the option (a reloaded model would get other inputs)
    G = nx.convert_node_labels_to_integers(nx.grid_2d_graph(6, 8))
    tok = GraphPyramidTokenizer.fit([G], edge_chunks=2, matching="aligned", parent_links=True)
    plain = GraphPyramidTokenizer.fit([G], edge_chunks=2, matching="aligned")
    assert GraphPyramidTokenizer(**tok.config).parent_links and not plain.parent_links
    idx = tok.encode([G])
    tf, tf_plain = tok.teacher_forcing_input(idx)[0], plain.teacher_forcing_input(plain.encode([G]))[0]
    at = tok._links_at
    assert torch.equal(tf[:, :at], tf_plain[:, :at])  # the other inputs are unchanged
    levels = coarsen(G, tok.K, "aligned")
    offsets = np.cumsum([0] + tok.schedule.token_counts[1:])
    seen = set()
    for s_, (kind, k, c) in enumerate(tok.kinds):
        if kind != "E":
            continue
        parent = {x: p for p, xs in enumerate(levels[k - 1].children) for x in xs}
        between = collections.Counter(tuple(sorted((parent[x], parent[y]))) for x, y in levels[k].edges
                                      if parent[x] != parent[y])
        C = tok.chunks_at(k)
        for j, (u, v) in enumerate(levels[k].edges):
            if j % C != c:
                continue
            row = tf[offsets[s_ - 1] + j // C, at:at + 2].tolist()
            n = 0 if parent[u] == parent[v] else between[tuple(sorted((parent[u], parent[v])))]
            assert row == [float(n == 1), float(n >= 2)], (k, u, v, n, row)
            seen.add(min(n, 2))
    assert seen == {0, 1, 2}


def test_completion_adds_the_most_probable_candidates_that_keep_the_property():
    # catches: candidates added in the wrong order (the least probable first), an edge kept although it
    # breaks the property, or a completion that stops before the graph is maximal
    from modalities.graph.constraints import complete_graph, planar_property
    k5 = list(itertools.combinations(range(5), 2))
    for low in [(0, 1), (2, 3)]:  # K5 minus any one edge is planar: the least probable edge is the one left out
        scores = {e: (0.1 if e == low else 0.9 - 0.01 * i) for i, e in enumerate(k5)}
        H, added = complete_graph(nx.empty_graph(5), scores, planar_property)
        assert added == 9 and set(H.edges()) == set(k5) - {low}
    # edges already there stay; candidates naming a missing node are skipped
    G = nx.Graph([(0, 1)])
    G.add_nodes_from(range(5))
    H, added = complete_graph(G, {(0, 1): 0.5, (1, 2): 0.2, (3, 7): 0.9}, planar_property)
    assert set(H.edges()) == {(0, 1), (1, 2)} and added == 1


def test_structure_hook_completion_is_maximal_over_the_finest_candidates():
    # catches: marginals recorded for the wrong child pair (bit 2 * i + j), candidates outside the
    # finest level's child pairs, and completed graphs that break the property or drop sampled edges
    from modalities.graph.constraints import PROPERTIES, StructureHook
    torch.manual_seed(0)
    gs = make_dataset("community-small", seed=0, num=10)["train"]
    tok = _tok_for(gs, edge_chunks=2)
    model = _tiny_model(tok)
    bias = torch.zeros(tok.vocab_size)
    bias[[PAIR_EDGE, EDGE0 + 14]] = 4.0
    bias[EDGE0] = 2.0  # mask 1: only child 0 of u -- child 0 of v
    captured = {}

    def hook_with(sh):
        def hook(k, logits, state):
            kind, lvl, chunk = tok.kinds[k]
            if kind == "E" and lvl == tok.K - 2:  # the exact marginals of every position, from the same logits
                p = tok.valid_token_hook(k, logits + bias, state).softmax(-1)
                for b, g in enumerate(state.graphs):
                    for q, j in enumerate(range(chunk, len(g.edges), tok.chunks_at(lvl))):
                        if q < p.shape[1]:
                            u, v = g.edges[j]
                            for i, a in enumerate(state.children[b][u]):
                                for jj, c in enumerate(state.children[b][v]):
                                    m = torch.arange(1, 16)
                                    want = p[b, q, EDGE0 + m[(m >> (2 * i + jj)) & 1 == 1] - 1].sum()
                                    captured[(b, min(a, c), max(a, c))] = float(want)
            return sh(k, logits + bias, state)
        return hook

    sh = StructureHook(tok, "planar", seed=0)
    res = msar.sample(model, tok, batch_size=6, cfg=0.0, seed=2, logits_hook=hook_with(sh))
    sampled = graphs_from(res.data)
    done = sh.complete(sampled)
    assert sh.stats["completed"] > 0
    checked = 0
    for b, (G, H) in enumerate(zip(sampled, done)):
        sc = sh.scores[b]
        for (a, c), pr in sc.items():
            if (b, a, c) in captured:
                assert abs(pr - captured[(b, a, c)]) < 1e-5, (b, a, c)
                checked += 1
        assert PROPERTIES["planar"](H, True) and set(G.edges()) <= set(H.edges())
        assert set(H.edges()) - set(G.edges()) <= set(sc)
        for a, c in set(sc) - set(H.edges()):  # maximal: every candidate left out breaks planarity
            H.add_edge(a, c)
            assert not nx.check_planarity(H)[0]
            H.remove_edge(a, c)
    assert checked > 20
    with pytest.raises(ValueError, match="recorded the finest level"):
        sh.complete(sampled[:2])
    # the same recorder without the structure hook: the model's own sample, projected onto planarity
    from modalities.graph.constraints import EdgeScores
    rec = EdgeScores(tok)
    raw = graphs_from(msar.sample(model, tok, batch_size=6, cfg=0.0, seed=2,
                                  logits_hook=lambda k, logits, state: rec(k, logits + bias, state)).data)
    assert not all(nx.check_planarity(G)[0] for G in raw)
    proj, stats = rec.project(raw, "planar")
    assert stats["dropped"] > 0 and stats["kept"] + stats["dropped"] == sum(G.number_of_edges() for G in raw)
    for G, H, sc in zip(raw, proj, rec.scores):
        assert nx.check_planarity(H)[0] and set(H.edges()) <= set(G.edges()) | set(sc)
        assert all(e in sc or (e[1], e[0]) in sc for e in G.edges())  # every sampled edge is a candidate
    # the degree-keeping rule: planar, only edges the model proposed, the counts as the differences
    proj_d, stats_d = rec.project(raw, "planar", rule="degrees")
    for G, H, sc in zip(raw, proj_d, rec.scores):
        assert nx.check_planarity(H)[0] and set(H.edges()) <= set(G.edges()) | set(sc)
    assert stats_d["kept"] + stats_d["dropped"] == sum(G.number_of_edges() for G in raw)
    assert stats_d["added"] == sum(len({frozenset(e) for e in H.edges()} - {frozenset(e) for e in G.edges()})
                                   for G, H in zip(raw, proj_d))
    with pytest.raises(ValueError, match="unknown projection rule"):
        rec.project(raw, "planar", rule="nearest")


def test_projection_keeps_the_sample_most_probable_first_then_completes():
    # catches: a projection that drops the most probable edge of a conflict, that lets candidates
    # outrank the sample's own edges, or that returns a graph without the property
    from modalities.graph.constraints import planar_property, project_graph
    k5 = list(itertools.combinations(range(5), 2))
    for low in [(0, 1), (3, 4)]:
        scores = {e: (0.05 if e == low else 0.5 + 0.01 * i) for i, e in enumerate(k5)}
        H, dropped, added = project_graph(nx.Graph(k5), scores, planar_property)
        assert set(H.edges()) == set(k5) - {low} and (dropped, added) == (1, 0)
    # the sample's own edges come first: a candidate more probable than (0, 1) that conflicts with
    # the kept sample is not added; a sample without conflicts stays whole
    G = nx.Graph([e for e in k5 if e != (2, 3)])  # K5 minus (2, 3): planar
    H, dropped, added = project_graph(G, {**{e: 0.1 for e in k5}, (2, 3): 0.99}, planar_property)
    assert set(H.edges()) == set(G.edges()) and (dropped, added) == (0, 0)
    H, dropped, added = project_graph(nx.empty_graph(5), {e: 0.5 for e in k5}, planar_property)
    assert H.number_of_edges() == 9 and (dropped, added) == (0, 9)


def test_degree_projection_fills_deficient_nodes_first():
    # catches: a completion that ignores the sampled degrees (it would give the free slot to the most
    # probable candidate, a node already at its degree), passes in the wrong order, or counts of
    # dropped / added edges that are not the differences between sample and result
    from modalities.graph.constraints import PROJECTIONS, project_graph, project_graph_degrees

    def budget(m):  # hereditary: (2, 3) and (6, 7) never allowed, at most m edges
        return lambda H, final: not (H.has_edge(2, 3) or H.has_edge(6, 7)) and H.number_of_edges() <= m

    G = nx.Graph([(0, 1), (2, 3), (4, 5), (6, 7)])  # every node of degree 1 in the sample
    scores = {(0, 1): 0.9, (2, 3): 0.9, (4, 5): 0.8, (6, 7): 0.8, (0, 4): 0.95, (3, 5): 0.5, (2, 6): 0.2}
    H, dropped, added = project_graph_degrees(G, scores, budget(4))
    assert set(H.edges()) == {(0, 1), (4, 5), (2, 6), (3, 5)} and (dropped, added) == (2, 2)
    H, _, _ = PROJECTIONS["degrees"](G, scores, budget(3))  # both endpoints below their degree: first
    assert set(H.edges()) == {(0, 1), (4, 5), (2, 6)}
    H, _, _ = project_graph(G, scores, budget(4))  # the greedy rule: most probable candidates first
    assert set(H.edges()) == {(0, 1), (4, 5), (0, 4), (3, 5)}


def test_degree_flips_move_edges_toward_the_target_degrees():
    # catches: a flip to a pair the model never proposed, a flip that breaks the property or raises the
    # squared degree error, and a repair that stops before the flip that matches the targets
    from modalities.graph.constraints import flip_to_degrees, planar_property
    H = nx.Graph([(0, 1), (0, 2), (1, 2), (0, 3), (1, 3)])  # two triangles on (0, 1); 2 and 3 not joined
    want = {0: 2, 1: 2, 2: 3, 3: 3}
    out, flips = flip_to_degrees(H, {(2, 3): 0.1}, want, planar_property)
    assert flips == 1 and set(out.edges()) == {(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)}
    assert set(H.edges()) == {(0, 1), (0, 2), (1, 2), (0, 3), (1, 3)}  # the input is not modified
    out, flips = flip_to_degrees(H, {}, want, planar_property)  # (2, 3) not a candidate: no flip
    assert flips == 0 and set(out.edges()) == set(H.edges())
    out, flips = flip_to_degrees(H, {(2, 3): 0.1}, dict(H.degree()), planar_property)  # already at target
    assert flips == 0
    out, flips = flip_to_degrees(H, {(2, 3): 0.1}, want, lambda G, final: not G.has_edge(2, 3))
    assert flips == 0 and set(out.edges()) == set(H.edges())
    # the error is squared: one node two below its degree outweighs two nodes one off (an absolute error
    # would see no gain), and a flip that leaves the error as it is, is not made
    assert flip_to_degrees(H, {(2, 3): 0.1}, {0: 2, 1: 3, 2: 4, 3: 2}, planar_property)[1] == 1
    assert flip_to_degrees(H, {(2, 3): 0.1}, {0: 3, 1: 2, 2: 3, 3: 2}, planar_property)[1] == 0
    # a node stacked in a triangle of a wheel (degree 3, clustering 1) gains an edge from the hub's side
    W = nx.wheel_graph(6)  # hub 0, rim 1..5
    W.add_edges_from([(6, 0), (6, 1), (6, 5)])  # node 6 inside triangle (0, 1, 5)
    target = dict(W.degree())
    for x, step in ((0, -1), (1, -1), (2, 1), (6, 1)):  # reachable by the flip (0, 1) -> (2, 6)
        target[x] += step
    cands = {(a, c): 0.5 for a in range(7) for c in range(a + 1, 7)}
    out, flips = flip_to_degrees(W, cands, target, planar_property)
    assert flips >= 1 and all(out.degree(x) == target[x] for x in out)
    assert planar_property(out, True) and out.number_of_edges() == W.number_of_edges()


# ---------------------------------------------------------------------------- planar face features, structure summary
def test_face_features_flag_exactly_the_child_pairs_that_keep_the_fine_graph_planar():
    # catches: a flag read off one embedding only (embeddings are not unique: pairs that do not share
    # a face in it can still be added), pairs in different components flagged unaddable, features
    # written at the wrong offset or on the wrong level, and a latent size that ignores the option
    from modalities.graph.datasets import planar_graphs
    gs = planar_graphs(np.random.default_rng(3), num=4, n=24)
    tok = GraphPyramidTokenizer.fit(gs, edge_chunks=4, face_features=True)
    plain = GraphPyramidTokenizer.fit(gs, edge_chunks=4)
    o = 5 + 2 * tok.nbits + 2 * tok._node_dim + 2 + 8  # the face block follows the edge block
    assert tok.latent_dim >= o + 5 and plain.latent_dim == 8 * -(-o // 8)
    assert GraphPyramidTokenizer(**tok.config).face_features
    assert not GraphPyramidTokenizer(**{k: v for k, v in tok.config.items() if k != "face_features"}).face_features
    idx = tok.encode(gs)
    st, flags = tok.start(len(gs)), []
    for k, t in enumerate(idx):
        kind, lvl, chunk = tok.kinds[k]
        if kind == "E":
            X = st._features("E", lvl, chunk)
            for b in range(len(gs)):
                kids = st.children[b]
                G = nx.Graph()
                G.add_nodes_from(range(sum(len(c) for c in kids)))
                G.add_edges_from(st.fine[b])
                for p, j in enumerate(range(chunk, len(st.graphs[b].edges), tok.chunks_at(lvl))):
                    u, v = st.graphs[b].edges[j]
                    if lvl != tok.K - 2:  # only the finest expansion carries the block
                        assert not X[b, p, o:o + 5].any()
                        continue
                    assert X[b, p, o] == 1.0  # the partial graph of a planar graph is planar
                    for i, a in enumerate(kids[u]):
                        for jj, c in enumerate(kids[v]):
                            H = G.copy()
                            H.add_edge(a, c)
                            flags.append(float(X[b, p, o + 1 + 2 * i + jj]))
                            assert flags[-1] == float(nx.check_planarity(H)[0]), (b, a, c)
        st.add_scale(k, t)
    assert 0.0 in flags and 1.0 in flags  # both answers occur, so the comparison above means something
    # a non-planar partial graph: the whole block is 0
    from modalities.graph.tokenizer import _face_block, _face_sets
    k5 = {(a, c) for a in range(5) for c in range(a + 1, 5)}
    assert _face_sets(6, k5) is None and not _face_block(None, [0, 1], [5]).any()


def test_structure_summary_on_known_graphs():
    # catches: the outer face counted as non-triangular, chords miscounted, degree shares not per node
    from modalities.graph.metrics import face_sizes, structure_summary
    wheel = nx.wheel_graph(7)  # a triangulated disc: 6 inner triangles, outer face = the hub-less rim
    s = structure_summary([wheel])
    assert s["nontriangular_faces"] == 0 and s["missing_chords"] == 0 and s["triangles"] == 6
    assert sorted(face_sizes(wheel)) == [3] * 6 + [6]
    g = structure_summary([_grid(3, 3)])  # 4 square faces, each missing one chord
    assert g["nontriangular_faces"] == 4 and g["missing_chords"] == 4 and g["edges"] == 12
    assert g["degree_share"][:5] == [0.0, 0.0, round(4 / 9, 4), round(4 / 9, 4), round(1 / 9, 4)]
    assert structure_summary([nx.complete_graph(5)])["planar"] == 0.0
    assert face_sizes(nx.complete_graph(5)) is None


def test_edge_flips_keep_a_triangulation_and_its_edge_count():
    # catches: a flip that adds a duplicate edge, breaks planarity, or does nothing (the metric-sensitivity
    # figures would then show no effect of flips)
    from examples.graph_demo import flip_edges
    from modalities.graph.datasets import planar_graphs
    from modalities.graph.metrics import structure_summary
    G = planar_graphs(np.random.default_rng(0), num=1, n=30)[0]
    H = flip_edges(G, 5, np.random.default_rng(1))
    assert H.number_of_edges() == G.number_of_edges() and nx.check_planarity(H)[0]
    assert structure_summary([H])["nontriangular_faces"] == structure_summary([G])["nontriangular_faces"] == 0
    assert len(set(map(frozenset, G.edges())) ^ set(map(frozenset, H.edges()))) >= 2


def test_best_of_keeps_the_draw_whose_projection_dropped_fewest_edges():
    # catches: keeping the draw that needed the most repairs, or replacing on a tie (then --best-of 1
    # and the first draw of --best-of N would disagree)
    from examples.graph_demo import keep_fewest_dropped
    first = [("s0", "p0", 5, 1), ("s1", "p1", 2, 0), ("s2", "p2", 3, 3)]
    second = [("t0", "q0", 4, 2), ("t1", "q1", 2, 9), ("t2", "q2", 7, 0)]
    assert [c[0] for c in keep_fewest_dropped(first, second)] == ["t0", "s1", "s2"]
    with pytest.raises(ValueError, match="kept candidates"):
        keep_fewest_dropped(first, second[:2])


def test_demo_rejects_a_projection_rule_without_projection():
    # catches: --projection silently ignored when nothing is projected (a run that claims a rule it never used)
    from examples.graph_demo import main
    with pytest.raises(SystemExit, match="add --project"):
        main(["--dataset", "planar", "--projection", "degrees", "--out", "/dev/null/never_written"])


def test_demo_val_every_records_validation_loss_without_changing_training(tmp_path):
    # catches: pausing training to evaluate changing the training itself (dropout RNG, batch order, LR
    # schedule), a held-out curve at the wrong steps, or one left out of metrics.json
    import json
    from examples.graph_demo import main
    common = ["--dataset", "planar", "--quick", "--steps", "4", "--no-constrain", "--num-samples", "2"]
    main(common + ["--out", str(tmp_path / "plain")])
    main(common + ["--val-every", "3", "--out", str(tmp_path / "val")])
    plain = json.loads((tmp_path / "plain" / "planar" / "metrics.json").read_text())
    m = json.loads((tmp_path / "val" / "planar" / "metrics.json").read_text())
    assert plain["val_loss_curve"] is None
    assert [s for s, _ in m["val_loss_curve"]] == [3, 4] and all(loss > 0 for _, loss in m["val_loss_curve"])
    assert m["loss_curve"] == plain["loss_curve"]
    a = msar.from_pretrained(str(tmp_path / "plain" / "planar" / "pipeline")).transformer.state_dict()
    b = msar.from_pretrained(str(tmp_path / "val" / "planar" / "pipeline")).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_demo_rejects_val_every_without_a_validation_split():
    from examples.graph_demo import main
    with pytest.raises(SystemExit, match="no validation split"):
        main(["--dataset", "grid", "--val-every", "10", "--out", "/dev/null/never_written"])
    with pytest.raises(SystemExit, match="--load"):
        main(["--dataset", "planar", "--val-every", "10", "--load", "x", "--out", "/dev/null/never_written"])


# ---------------------------------------------------------------------------- rejection on validity

def _paths(sizes):
    return [nx.path_graph(k) for k in sizes]


def test_validity_filter_keeps_the_first_valid_draws_in_order_within_the_budget():
    # catches: keeping valid draws past n, counting a rejected draw as kept, a first pass whose batches
    # differ from sampling without rejection (other seeds, other samples), drawing past the budget
    from modalities.graph.metrics import ValidityFilter
    even = lambda G: G.number_of_nodes() % 2 == 0  # noqa: E731
    f = ValidityFilter(even, n=3, max_draws=9)
    assert f.next_batch(2) == 2  # the first n draws come in the batches a run without rejection makes
    f.offer(_paths([1, 2]))
    assert f.next_batch(2) == 1
    f.offer(_paths([4]))
    assert not f.done and f.next_batch(4) == 4  # past n: full batches up to the budget
    f.offer(_paths([3, 6, 8, 10]))
    assert f.done
    graphs, stats = f.result()
    assert [G.number_of_nodes() for G in graphs] == [2, 4, 6]
    assert stats == {"drawn": 7, "valid_drawn": 5, "acceptance": 5 / 7, "kept_invalid": 0}
    # budget spent: the earliest rejected draws fill the set, reported as kept invalid
    f = ValidityFilter(even, n=3, max_draws=6)
    f.offer(_paths([1, 2, 3]))
    assert f.next_batch(32) == 3
    f.offer(_paths([5, 7, 9]))
    assert f.done and f.next_batch(32) == 0
    graphs, stats = f.result()
    assert [G.number_of_nodes() for G in graphs] == [2, 1, 3] and stats["kept_invalid"] == 2
    with pytest.raises(ValueError, match="budget"):
        ValidityFilter(even, n=2, max_draws=3).offer(_paths([1, 1, 1, 1]))
    with pytest.raises(RuntimeError, match="offer more"):
        ValidityFilter(even, n=2, max_draws=3).result()
    with pytest.raises(ValueError, match="max_draws"):
        ValidityFilter(None, n=2, max_draws=4)
    keep_all = ValidityFilter(None, n=2, max_draws=2)
    keep_all.offer(_paths([1, 3]))
    assert [G.number_of_nodes() for G in keep_all.result()[0]] == [1, 3]


def test_validity_filter_draws_from_the_distribution_conditioned_on_validity():
    # many seeded sets drawn through the filter: the kept graphs' sizes follow p(size | valid) exactly
    # (chi-square). catches: per-slot retries that keep a later draw more often than an earlier one, valid
    # draws dropped after the first rejection of a batch, a filter that favours small batches' draws
    from scipy.stats import chisquare
    from modalities.graph.metrics import ValidityFilter
    p = np.array([0.1, 0.3, 0.2, 0.15, 0.15, 0.1])  # sizes 1..6; valid: even sizes (2, 4, 6)
    rng = np.random.default_rng(0)
    kept = collections.Counter()
    for _ in range(1000):
        f = ValidityFilter(lambda G: G.number_of_nodes() % 2 == 0, n=5, max_draws=200)
        while not f.done:
            f.offer(_paths(rng.choice(6, size=f.next_batch(4), p=p) + 1))
        graphs, stats = f.result()
        assert stats["kept_invalid"] == 0 and len(graphs) == 5
        kept.update(G.number_of_nodes() for G in graphs)
    assert set(kept) == {2, 4, 6}
    valid = p[[1, 3, 5]] / p[[1, 3, 5]].sum()
    assert chisquare([kept[2], kept[4], kept[6]], valid * sum(kept.values())).pvalue > 1e-3


def test_validity_filter_with_targets_gives_each_output_a_draw_of_its_size():
    # per-output target node counts: output j holds a draw with N = targets[j], and given its size a kept
    # graph follows p(graph | N) exactly (chi-square over a second property, paths against stars).
    # catches: outputs given a draw of another size (or in another order than their targets), a draw kept
    # for its kind and not only its size, fills not reported as off target
    from scipy.stats import chisquare
    from modalities.graph.metrics import ValidityFilter
    shapes = [(nx.path_graph, 3), (nx.path_graph, 4), (lambda k: nx.star_graph(k - 1), 3),
              (lambda k: nx.star_graph(k - 1), 4)]  # (kind, size): a path and a star of 3 / 4 nodes
    p = np.array([0.4, 0.1, 0.2, 0.3])
    rng = np.random.default_rng(1)
    kept = collections.Counter()
    for _ in range(600):
        targets = list(rng.choice([3, 4], size=4))
        f = ValidityFilter(None, n=4, max_draws=400, targets=targets)
        while not f.done:
            drawn = rng.choice(4, size=f.next_batch(3), p=p)
            f.offer([shapes[i][0](shapes[i][1]) for i in drawn])
        graphs, stats = f.result()
        assert [G.number_of_nodes() for G in graphs] == targets and stats["off_target"] == 0
        kept.update((G.number_of_nodes(), max(d for _, d in G.degree()) == G.number_of_nodes() - 1
                     and G.number_of_nodes() > 3) for G in graphs)
    # within size 4 a star is told apart by its hub (a 3-path is also a 3-star: size 3 has one shape)
    n4 = kept[(4, False)] + kept[(4, True)]
    assert chisquare([kept[(4, False)], kept[(4, True)]], np.array([0.1, 0.3]) / 0.4 * n4).pvalue > 1e-3
    # budget spent: open outputs are filled in order with the earliest rejected draws and counted
    f = ValidityFilter(lambda G: G.number_of_nodes() != 5, n=3, max_draws=6, targets=[2, 4, 2])
    f.offer(_paths([5, 2, 3]))
    f.offer(_paths([6, 7, 3]))
    graphs, stats = f.result()
    assert [G.number_of_nodes() for G in graphs] == [2, 5, 3]
    assert stats == {"drawn": 6, "valid_drawn": 5, "acceptance": 1 / 6, "kept_invalid": 1, "off_target": 2}
    with pytest.raises(ValueError, match="one target"):
        ValidityFilter(None, n=2, max_draws=4, targets=[3])


def test_demo_resample_invalid_redraws_within_its_budget(tmp_path):
    # the demo end to end on an untrained small grid pipeline (--load): nothing it draws is a grid, so every
    # output uses its whole budget. catches: more draws than K per output, a first pass that is not the plain
    # run's samples (kept invalid draws fill the set in draw order), rejection stats missing from metrics.json
    import json
    from _graph_runs import untrained_grid_run
    from examples.graph_demo import main
    run, _, _ = untrained_grid_run(tmp_path)
    common = ["--dataset", "grid", "--load", str(run), "--no-constrain", "--num-samples", "3"]
    main(common + ["--out", str(tmp_path / "plain")])
    main(common + ["--resample-invalid", "2", "--out", str(tmp_path / "resampled")])
    plain, res = (json.loads((tmp_path / d / "grid" / "metrics.json").read_text()) for d in ("plain", "resampled"))
    assert plain["rejection"] is None
    assert res["rejection"] == {"max_draws_per_sample": 2, "drawn": 6, "valid_drawn": 0, "acceptance": 0.0,
                                "kept_invalid": 3}
    assert res["vun"]["validity"] == plain["vun"]["validity"] == 0.0
    graphs = [json.loads((tmp_path / d / "grid" / "graphs.json").read_text())["graphs"] for d in ("plain", "resampled")]
    assert graphs[0] == graphs[1]


def test_demo_node_count_reject_keeps_draws_of_their_target_size(tmp_path):
    # the demo end to end on an untrained community-small pipeline (no validity check: rejection on the
    # node count alone). catches: outputs kept off their target without being reported, targets other than
    # those --node-count train draws, more draws than K per output, a first pass unlike the plain run's
    import json
    from _graph_runs import untrained_run
    from examples.graph_demo import main
    from modalities.graph.size import draw_node_counts
    run, train, _ = untrained_run(tmp_path, "community-small")
    common = ["--dataset", "community-small", "--load", str(run), "--num-samples", "6"]
    main(common + ["--out", str(tmp_path / "plain")])
    main(common + ["--node-count", "reject", "--resample-invalid", "4", "--out", str(tmp_path / "rej")])
    res = json.loads((tmp_path / "rej" / "community-small" / "metrics.json").read_text())
    graphs = json.loads((tmp_path / "rej" / "community-small" / "graphs.json").read_text())["graphs"]
    plain = json.loads((tmp_path / "plain" / "community-small" / "graphs.json").read_text())["graphs"]
    targets = res["node_count"]["targets"]
    assert targets == draw_node_counts(train, 6, 0)
    rej = res["rejection"]
    assert 6 <= rej["drawn"] <= 24 and rej["kept_invalid"] == 0
    off = [g["n"] != t for g, t in zip(graphs, targets)]
    assert sum(off) <= rej["off_target"] and res["node_count"]["on_target"] == pytest.approx(1 - sum(off) / 6)
    assert rej["acceptance"] == pytest.approx((6 - rej["off_target"]) / rej["drawn"]) and rej["acceptance"] > 0
    # the first pass is the plain run's draws: those it keeps fill the first open output of their size, and
    # the outputs left open at the end hold the earliest rejected ones
    open_, first_rejected = list(targets), []
    for g in plain:
        if g["n"] in open_:
            j = open_.index(g["n"])
            open_[j] = None
            assert graphs[j] == g
        else:
            first_rejected.append(g)
    fills = [g for g, o in zip(graphs, off) if o]
    k = min(len(fills), len(first_rejected))
    assert k > 0 and fills[:k] == first_rejected[:k]


def test_demo_checks_resample_invalid_at_start():
    # catches: rejection on a dataset with no validity check (every draw kept, a claim never tested), or
    # combined with per-output targets that the extra draws would not have
    from examples.graph_demo import main
    with pytest.raises(SystemExit, match="no validity check"):
        main(["--dataset", "community-small", "--resample-invalid", "3", "--out", "/dev/null/never_written"])
    with pytest.raises(SystemExit, match="K >= 1"):
        main(["--dataset", "grid", "--resample-invalid", "0", "--out", "/dev/null/never_written"])
    with pytest.raises(SystemExit, match="--node-count"):
        main(["--dataset", "grid", "--resample-invalid", "3", "--node-count", "train", "--out", "/dev/null/never_written"])
    with pytest.raises(SystemExit, match="budget"):
        main(["--dataset", "planar", "--node-count", "reject", "--out", "/dev/null/never_written"])
