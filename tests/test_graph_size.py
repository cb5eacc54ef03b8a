"""Node-count conditioned graph sampling (modalities/graph/size.py): exact sizes at every level, the
positions chosen with the model's conditional probabilities, composition with the other hooks."""
import math

import networkx as nx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.stats import chisquare

import msar
from modalities.graph import GraphPyramidTokenizer, coarsen, graphs_from, make_dataset, num_levels_for
from modalities.graph.coarsen import level_sizes
from modalities.graph.constraints import PROPERTIES, EdgeScores, StructureHook
from modalities.graph.size import NodeCountHook, draw_node_counts, level_size_report, sample_exactly_m
from modalities.graph.tokenizer import PAD, PAIR, PAIR_EDGE, SINGLE

GRAPHS = make_dataset("community-small", seed=0, num=10)["train"]
TOK = GraphPyramidTokenizer.fit(GRAPHS, edge_slack=0.0, edge_chunks=2)


def _tiny_model(tok):
    torch.manual_seed(0)
    return msar.NextScaleTransformer(msar.TransformerConfig(
        schedule=tok.schedule.to_config(), vocab_size=tok.vocab_size, latent_dim=tok.latent_dim,
        depth=1, embed_dim=32, num_heads=2)).init_weights().eval()


MODEL = _tiny_model(TOK)


def chain(*hooks):
    def hook(k, logits, state):
        for h in hooks:
            logits = h(k, logits, state)
        return logits
    return hook


def _level_counts(tok, indices):
    """Per sample, the node count of every level the sampled tokens decode to."""
    return [[G.number_of_nodes() for G in col] for col in zip(*tok.decode_progression(indices))]


@given(st.integers(1, 40), st.integers(0, 3))
def test_level_sizes_are_those_of_the_coarsening(n, extra):
    # catches: a wrong halving formula (floor instead of ceil, an off-by-one level) in the targets
    G = nx.gnp_random_graph(n, 0.3, seed=n)
    K = num_levels_for(n) + extra
    assert level_sizes(n, K) == [lvl.n for lvl in coarsen(G, K)]
    with pytest.raises(ValueError, match="levels"):
        level_sizes(n, num_levels_for(n) - 1)


@settings(max_examples=6)
@given(st.lists(st.integers(1, TOK.max_nodes[-1]), min_size=1, max_size=6), st.integers(0, 1000),
       st.sampled_from([-3.0, 0.0, 3.0]))
def test_samples_have_the_target_node_count_at_every_level(Ns, seed, split_bias):
    # catches: splits counted from the wrong level, m off by one, a one-node top level left free to
    # split, a chosen position the sampler can still draw SINGLE at (or an invalid token) from
    bias = torch.zeros(TOK.vocab_size)
    bias[[PAIR, PAIR_EDGE]] = split_bias  # a model that wants too many (or too few) splits
    size = NodeCountHook(TOK, Ns, seed=seed)
    hook = chain(lambda k, logits, state: TOK.valid_token_hook(k, logits + bias, state), size)
    res = msar.sample(MODEL, TOK, batch_size=len(Ns), cfg=0.0, seed=seed, logits_hook=hook)
    assert [G.number_of_nodes() for G in graphs_from(res.data)] == Ns
    assert _level_counts(TOK, res.indices) == [level_sizes(N, TOK.K) for N in Ns]
    assert size.stats["off_target"] == 0
    # every drawn token is one the valid-token mask allows (replayed on a fresh state)
    st_ = TOK.start(len(Ns))
    for k, idx in enumerate(res.indices):
        assert st_.allowed(k).gather(-1, idx.unsqueeze(-1)).all(), f"scale {k}: an invalid token"
        st_.add_scale(k, idx)


def test_without_the_hook_the_sizes_drift():
    # the control for the test above: the same biased model without the hook misses the targets, and
    # (too few splits) its levels are those of no real graph
    bias = torch.zeros(TOK.vocab_size)
    bias[[PAIR, PAIR_EDGE]] = -1.0
    res = msar.sample(MODEL, TOK, batch_size=6, cfg=0.0, seed=0,
                      logits_hook=lambda k, logits, state: TOK.valid_token_hook(k, logits + bias, state))
    assert [G.number_of_nodes() for G in graphs_from(res.data)] != [5] * 6
    assert level_size_report(_level_counts(TOK, res.indices))["consistent"] < 1


def test_level_size_report_on_known_hierarchies():
    # catches: a report that calls a short level (two nodes left SINGLE) consistent, or a one-node top
    # level (small N) short
    assert level_size_report([[1, 1, 2, 4, 7], [1, 1, 1, 2, 3]]) == {"consistent": 1.0, "short_levels": 0.0}
    # 2 -> 2 leaves both single; 3 -> 4 leaves two of three single
    assert level_size_report([[1, 2, 2, 4, 8], [1, 2, 3, 4, 8]]) == {"consistent": 0.0, "short_levels": 1.0}


@pytest.mark.parametrize("prop", ["planar", "grid"])
def test_composes_with_the_structure_hook_and_edge_scores(prop):
    # catches: a size hook whose output the structure hook / score recorder cannot read (NaN join
    # probabilities at a forced SINGLE, sizes changed by what follows)
    Ns = [4, 9, 13, TOK.max_nodes[-1]]
    sh = StructureHook(TOK, prop, seed=1)
    hook = chain(TOK.valid_token_hook, NodeCountHook(TOK, Ns, seed=2), sh)
    res = msar.sample(MODEL, TOK, batch_size=len(Ns), cfg=0.0, seed=3, logits_hook=hook)
    gs = graphs_from(res.data)
    assert [G.number_of_nodes() for G in gs] == Ns
    assert all(PROPERTIES[prop](G, True) for G in gs)
    rec = EdgeScores(TOK)
    res = msar.sample(MODEL, TOK, batch_size=len(Ns), cfg=0.0, seed=3,
                      logits_hook=chain(TOK.valid_token_hook, NodeCountHook(TOK, Ns, seed=2), rec))
    gs = graphs_from(res.data)
    assert all(0.0 <= s <= 1.0 for sc in rec.scores for s in sc.values())
    projected, _ = rec.project(gs, prop)
    assert [H.number_of_nodes() for H in projected] == Ns and all(PROPERTIES[prop](H, True) for H in projected)


def _exact_m_counts(p, m, rows, seed):
    """How often each position (m = 1) or each left-out position (m = n - 1) is drawn, over ``rows`` rows."""
    p = torch.tensor(p, dtype=torch.float64)
    log_w = (p / (1 - p)).log().expand(rows, -1)
    chosen = sample_exactly_m(log_w, torch.full((rows,), m), torch.Generator().manual_seed(seed))
    assert (chosen.sum(1) == m).all()
    return chosen.sum(0) if m == 1 else (~chosen).sum(0)


def test_sample_exactly_m_is_the_model_conditioned_on_m_splits():
    # catches: positions drawn proportional to p (Gumbel-top-m on log p) or uniformly instead of the
    # product distribution conditioned on exactly m splits, P(S) ∝ prod_{i in S} p_i / (1 - p_i)
    p = [0.2, 0.5, 0.9]
    w = torch.tensor([q / (1 - q) for q in p], dtype=torch.float64)
    n = 20000
    got = _exact_m_counts(p, 1, n, seed=0)  # m = 1 of 3: P(i) = w_i / sum w
    assert chisquare(got.numpy(), (w / w.sum() * n).numpy()).pvalue > 1e-3
    got = _exact_m_counts(p, 2, n, seed=1)  # m = 2 of 3: P(leave j out) ∝ prod_{i != j} w_i ∝ 1 / w_j
    assert chisquare(got.numpy(), ((1 / w) / (1 / w).sum() * n).numpy()).pvalue > 1e-3
    # a position with weight 0 (-inf) is never taken; certain ones always are; m = 0 takes none
    log_w = torch.tensor([[float("-inf"), 0.0, 50.0, 50.0]] * 50, dtype=torch.float64)
    c = sample_exactly_m(log_w, torch.full((50,), 2))
    assert c[:, 2:].all() and not c[:, :2].any()
    assert not sample_exactly_m(log_w, torch.zeros(50)).any()
    with pytest.raises(ValueError, match="available positions"):
        sample_exactly_m(log_w, torch.full((50,), 4))


def test_hook_chooses_by_the_model_odds_and_keeps_its_kind_distribution():
    # a state with G_2 of 3 nodes and target N = 5 (level sizes 1, 2, 3, 5): m = 2 of 3 positions.
    # catches: odds taken from the wrong tokens or the wrong temperature, the kind (PAIR vs PAIR_EDGE)
    # not the model's conditional, SINGLE left drawable at a chosen node
    tok = GraphPyramidTokenizer([1, 2, 3, 5], [0, 1, 2, 0], edge_chunks=1)
    B = 4000
    st_ = tok.start(B)
    st_.add_scale(0, torch.full((B, 1), PAIR))
    st_.add_scale(1, torch.tensor([[PAIR, SINGLE]] * B))
    st_.add_scale(2, torch.full((B, 1), PAD))  # G_1 has no edge
    assert tok.kinds[3] == ("S", 2, 0) and st_.graphs[0].n == 3
    p_split, p_edge = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.25, 0.5, 0.75])
    probs = torch.full((3, tok.vocab_size), 1e-30)
    probs[:, SINGLE] = 1 - p_split
    probs[:, PAIR], probs[:, PAIR_EDGE] = p_split * (1 - p_edge), p_split * p_edge
    T = 2.0
    logits = (T * probs.log()).expand(B, -1, -1)  # at temperature T these are the probabilities above
    hook = NodeCountHook(tok, [5] * B, temperature=T, seed=0)
    out = hook(3, tok.valid_token_hook(3, logits, st_), st_)
    q = (out / T).softmax(-1)
    split = q[..., SINGLE] < 0.5
    assert (split.sum(1) == 2).all() and ((q[..., SINGLE] == 1) | (q[..., SINGLE] == 0)).all()
    assert torch.allclose(q[split][:, PAIR_EDGE], p_edge.expand(B, -1)[split], atol=1e-6)
    w = p_split / (1 - p_split)
    left_out = (~split).sum(0).double()
    assert chisquare(left_out.numpy(), ((1 / w) / (1 / w).sum() * B).double().numpy()).pvalue > 1e-3
    assert hook.stats == {"scales": B, "splits": 2 * B, "off_target": 0}


def test_an_off_target_state_is_steered_back():
    # known tokens force a split at the one-node top (N = 3 has levels 1, 1, ..., 2, 3): the hook counts
    # the level as off target and the graph still ends with 3 nodes (no further split until the target
    # catches up). catches: an m that goes negative or exceeds the nodes there are
    Ns = [3, 3]
    size = NodeCountHook(TOK, Ns, seed=0)
    known = [torch.full((2, n), PAD) for n in TOK.schedule.token_counts]
    known[0][:] = PAIR
    mask = [torch.zeros(2, n, dtype=torch.bool) for n in TOK.schedule.token_counts]
    mask[0][:] = True
    res = msar.sample(MODEL, TOK, batch_size=2, cfg=0.0, seed=0, known=known, known_mask=mask,
                      logits_hook=chain(TOK.valid_token_hook, size))
    assert [G.number_of_nodes() for G in graphs_from(res.data)] == Ns
    assert size.stats["off_target"] > 0
    assert all(c[1] == 2 for c in _level_counts(TOK, res.indices))


def test_node_counts_are_drawn_from_the_training_sizes_reproducibly():
    # catches: an unseeded draw, or counts that are not the training graphs' own
    a = draw_node_counts(GRAPHS, 200, seed=5)
    assert a == draw_node_counts(GRAPHS, 200, seed=5) and a != draw_node_counts(GRAPHS, 200, seed=6)
    assert set(a) == {G.number_of_nodes() for G in GRAPHS}
    with pytest.raises(ValueError, match="capacity"):
        NodeCountHook(TOK, [TOK.max_nodes[-1] + 1])
    with pytest.raises(ValueError, match="node counts for a batch"):
        msar.sample(MODEL, TOK, batch_size=3, cfg=0.0, seed=0, logits_hook=NodeCountHook(TOK, [4, 5]))


def test_demo_checks_node_count_options_at_start():
    # catches: an unknown --node-count silently sampling unconditioned, or sizes forced and then
    # overwritten by the test graphs' own tokens (--expand-test)
    from examples.graph_demo import main
    with pytest.raises(SystemExit):
        main(["--dataset", "planar", "--node-count", "test", "--out", "/dev/null/never_written"])
    with pytest.raises(SystemExit, match="--expand-test"):
        main(["--dataset", "planar", "--node-count", "train", "--expand-test", "1", "--out", "/dev/null/never_written"])


def test_demo_samples_every_draw_at_its_target_size(tmp_path):
    # the demo end to end on an untrained small grid pipeline (--load), with --project --best-of 2.
    # catches: a further --best-of draw sampled without the size hook, targets not from the training
    # sizes, graphs off their target
    import json
    from _graph_runs import untrained_grid_run
    from examples.graph_demo import main
    run, train, tok = untrained_grid_run(tmp_path)
    main(["--dataset", "grid", "--load", str(run), "--node-count", "train", "--num-samples", "3",
          "--project", "--best-of", "2", "--out", str(tmp_path / "out")])
    m = json.loads((tmp_path / "out" / "grid" / "metrics.json").read_text())
    nc = m["node_count"]
    assert m["sampling"]["node_count"] == "train" and nc["on_target"] == 1.0
    assert nc["level_sizes"] == {"consistent": 1.0, "short_levels": 0.0}
    assert set(nc["targets"]) <= {G.number_of_nodes() for G in train}
    assert nc["stats"]["scales"] == 3 * 2 * (tok.K - 1)  # every sample of both draws, every split scale
    graphs = json.loads((tmp_path / "out" / "grid" / "graphs.json").read_text())["graphs"]
    assert [g["n"] for g in graphs] == nc["targets"]


# ---------------------------------------------------------------------------- triangulations

def test_log_count_weights_are_the_elementary_symmetric_sums():
    # catches: a count distribution off by one position or one count (the truncated draw of the hook)
    import itertools
    import math

    from modalities.graph.size import log_count_weights
    w = [0.3, 2.0, 0.7, 5.0, 1.1]
    log_w = torch.tensor([[math.log(x) for x in w], [math.log(x) for x in w[:3]] + [float("-inf")] * 2],
                         dtype=torch.float64)
    got = log_count_weights(log_w, 5).exp()
    for row, ws in enumerate([w, w[:3]]):
        for j in range(6):
            ref = sum(math.prod(c) for c in itertools.combinations(ws, j)) if j <= len(ws) else 0.0
            assert math.isclose(float(got[row, j]), ref, rel_tol=1e-9, abs_tol=1e-12)


def _tetrahedron_hook_draws(target: int, p_split, n: int, seed: int):
    """Split sets the triangulation hook draws at scale 0 (the tetrahedron's vertices 1, 2, 3), with
    split probabilities ``p_split`` spread evenly over each vertex's allowed split tokens."""
    from modalities.graph.size import TriangulationNodeCountHook
    from modalities.graph.triangulation import NO_SPLIT, TriangulationTokenizer
    tok = TriangulationTokenizer([4, 8, 16], max_degree=6, chunks=1)  # level 0 is not the last
    st_ = tok.start(n)
    ok = st_.allowed(0)
    logits = torch.full(ok.shape, -30.0)
    logits[:, 0, NO_SPLIT] = 0.0
    for u, p in enumerate(p_split, start=1):
        logits[:, u, NO_SPLIT] = math.log(1 - p)
        logits[:, u, 1:tok.pad_token] = math.log(p / ok[0, u, 1:tok.pad_token].sum())
    masked = tok.valid_token_hook(0, logits, st_)
    hook = TriangulationNodeCountHook(tok, [target] * n, seed=seed)
    out = hook(0, masked, st_)
    q = out.softmax(-1)
    split = q[:, 1:4, NO_SPLIT] < 0.5
    assert ((q[:, 1:4, NO_SPLIT] < 1e-6) | (q[:, 1:4, NO_SPLIT] > 1 - 1e-6)).all()
    # at a chosen vertex the split shape is the model's conditional (uniform here)
    model = masked.softmax(-1)[:, 1:4, 1:tok.pad_token]
    model = model / model.sum(-1, keepdim=True)
    assert torch.allclose(q[:, 1:4, 1:tok.pad_token][split], model[split], atol=1e-6)
    return split, hook


def test_triangulation_hook_draws_the_model_product_truncated_to_the_room():
    # catches: splits chosen uniformly or by p instead of the model's product of Bernoullis, and a cap
    # that truncates in position order (the capacity rule) instead of conditioning the product on it
    p = [0.2, 0.5, 0.9]
    w = [x / (1 - x) for x in p]
    n = 12000
    # room for all three splits (target 7): the product itself, over the 8 subsets
    split, hook = _tetrahedron_hook_draws(7, p, n, seed=0)
    code = (split.long() * torch.tensor([1, 2, 4])).sum(1)
    ref = [math.prod(p[u] if (s >> u) & 1 else 1 - p[u] for u in range(3)) for s in range(8)]
    assert chisquare(torch.bincount(code, minlength=8).numpy(), [r * n for r in ref]).pvalue > 1e-3
    assert hook.stats["short"] == 0
    # room for one split (target 4 = the 3 vertices + 1): the product conditioned on at most one
    split, _ = _tetrahedron_hook_draws(4, p, n, seed=1)
    assert (split.sum(1) <= 1).all()
    code = torch.where(split.any(1), split.long().argmax(1) + 1, 0)
    ref = [1.0] + w
    assert chisquare(torch.bincount(code, minlength=4).numpy(), [r / sum(ref) * n for r in ref]).pvalue > 1e-3


def _grow_with_random_logits(tok, targets, stop_at: int, seed: int):
    """Final vertex counts (outer vertex left out) of samples grown with random logits that stop splitting
    once a sample has ``stop_at`` vertices (a model that stops early), the valid-token mask, and the
    triangulation hook (``targets=None``: no hook)."""
    from modalities.graph.size import TriangulationNodeCountHook
    from modalities.graph.triangulation import NO_SPLIT
    B = len(targets) if targets else 8
    g = torch.Generator().manual_seed(seed)
    hook = TriangulationNodeCountHook(tok, targets, seed=seed) if targets else None
    st_ = tok.start(B)
    for k, n in enumerate(tok.schedule.token_counts):
        logits = torch.randn(B, n, tok.vocab_size, generator=g)
        done = torch.tensor([len(R) - 1 >= stop_at for R in st_.rots])
        logits[done, :, NO_SPLIT] += 30.0
        logits = tok.valid_token_hook(k, logits, st_)
        if hook is not None:
            logits = hook(k, logits, st_)
        draw = torch.multinomial(logits.softmax(-1).reshape(-1, tok.vocab_size), 1, generator=g)
        st_.add_scale(k, draw.reshape(B, n))
    return [len(R) - 1 for R in st_.rots], hook


@pytest.fixture(scope="module")
def tri_tok():
    from modalities.graph.triangulation import TriangulationTokenizer
    return TriangulationTokenizer.fit(make_dataset("planar", seed=0, num=24)["train"], chunks=4)


def test_triangulation_hook_stops_eager_samples_and_completes_reluctant_ones(tri_tok):
    # catches: splits past the target (drawn, or kept by the capacity rule), and a last level that does not
    # complete a sample the model would leave short
    eager, _ = _grow_with_random_logits(tri_tok, None, 64, 0)
    assert eager == [64] * 8  # without the hook: the capacity
    targets = [20, 35, 50, 64, 7, 12, 41, 58]
    got, hook = _grow_with_random_logits(tri_tok, targets, 64, 0)
    assert got == targets and hook.stats["short"] == 0
    shy, _ = _grow_with_random_logits(tri_tok, None, 40, 1)
    assert max(shy) < 48  # without the hook the samples stop near 40
    got, hook = _grow_with_random_logits(tri_tok, [48] * 8, 40, 1)
    assert got == [48] * 8 and hook.stats["short"] == 0
    # a target the last level cannot reach from where the model left it is reported, not hidden
    got, hook = _grow_with_random_logits(tri_tok, [64] * 8, 12, 2)
    assert hook.stats["short"] == sum(n < 64 for n in got) > 0


def test_demo_samples_triangulations_at_their_target_size(tmp_path, tri_tok):
    # catches: --node-count refused for triangulation models, or sampled without the triangulation hook
    import json
    from examples.graph_demo import PRESETS, TRIANGULATION, build_model, main
    cfg = dict(PRESETS["planar"], **TRIANGULATION, width=16, depth=1, heads=2, tokenizer="triangulation")
    src = tmp_path / "run" / "planar"
    msar.Pipeline(tri_tok, build_model(tri_tok, cfg, 0.0).init_weights().eval()).save_pretrained(str(src / "pipeline"))
    (src / "metrics.json").write_text(json.dumps({"train_config": cfg, "data_kw": {}, "loss_curve": [[1, 0.0]],
                                                  "seconds": {}}))
    main(["--dataset", "planar", "--load", str(tmp_path / "run"), "--node-count", "train", "--num-samples", "3",
          "--out", str(tmp_path / "out")])
    m = json.loads((tmp_path / "out" / "planar" / "metrics.json").read_text())
    assert m["node_count"]["on_target"] == 1.0 and m["node_count"]["targets"] == [64] * 3
    assert m["vun"]["validity"] == 1.0 and m["node_count"]["stats"]["short"] == 0


def test_triangulation_hook_refuses_a_state_of_another_tokenizer(tri_tok):
    from modalities.graph.size import TriangulationNodeCountHook
    from modalities.graph.triangulation import TriangulationTokenizer
    hook = TriangulationNodeCountHook(tri_tok, [20, 30])
    other = TriangulationTokenizer(tri_tok.max_nodes, tri_tok.max_degree, tri_tok.chunks)
    logits = torch.zeros(2, tri_tok.schedule.token_counts[0], tri_tok.vocab_size)
    with pytest.raises(TypeError, match="decode state made by its tokenizer"):
        hook(0, logits, other.start(2))
    with pytest.raises(ValueError, match="node counts must be in 3"):
        TriangulationNodeCountHook(tri_tok, [tri_tok.max_nodes[-1]])
