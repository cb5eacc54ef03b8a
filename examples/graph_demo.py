"""Train a next-scale graph generator on CPU and evaluate it (MMD, V.U.N.) against the test split.

    python -m examples.graph_demo --dataset community-small            # ~ a few minutes
    python -m examples.graph_demo --dataset planar,grid,community-small
    python -m examples.graph_demo --dataset planar --quick              # ~ 1 minute smoke run
    python -m examples.graph_demo --dataset grid --out outputs/grid     # ~ 25 minutes on one core (4000 steps)
    # grid's reported sampling (chosen on the training graphs): raw, T = 1, top-p 0.8, non-grids redrawn
    python -m examples.graph_demo --dataset grid --load outputs/grid --no-constrain --num-samples 200 --top-p 0.8 \
        --resample-invalid 3 --out outputs/grid_topp

For each dataset it writes to ``--out/<dataset>/``: ``metrics.json`` (MMD of degree,
clustering, orbit and spectrum under GRAN's TV and GraphRNN's EMD kernels for samples vs
test and for train vs test, V.U.N., sizes, training curve), ``samples.png`` (real test
graphs above generated ones), ``progression.png`` (one sample decoded level by level)
and ``pipeline/`` (tokenizer and transformer, ``msar.from_pretrained``); the training state in
``ckpt/`` and its per-step log in ``logs/train.csv`` (rerunning the same command resumes an
interrupted run exactly, or only samples again once training has finished).  ``--load DIR`` re-samples (e.g. at another
``--temperature``) from the models of an earlier run without training again.  Sampling masks
the tokens the decoder would reinterpret (:meth:`GraphPyramidTokenizer.valid_token_hook`);
``--no-constrain`` turns that off.  On planar and grid, sampling also keeps the finest level
planar (grid: planar, degree <= 4, bipartite) while it draws the edge tokens
(:class:`modalities.graph.constraints.StructureHook`; ``--structure none`` turns only that off).
``--complete`` then adds the finest level's most probable candidate edges that keep the property;
``--project`` samples without the structure hook and projects each sample onto the property, most
probable edges first, then completes it (decoding rules on the model's probabilities, reported apart);
``--best-of N`` keeps, of N such draws, the one whose projection dropped the fewest edges;
``--resample-invalid K`` redraws every sample that fails the dataset's validity check, at most K draws per
output graph (rejection sampling: the model conditioned on validity; :class:`modalities.graph.metrics.ValidityFilter`);
``--projection degrees`` projects keeping every node near its degree in the sample
(:func:`modalities.graph.constraints.project_graph_degrees`).
``--node-count train`` draws each sample's node count from the training graphs' sizes and makes every
split scale produce the levels of a graph of that size (:class:`modalities.graph.size.NodeCountHook`;
triangulation models: no split past it, and the last level completes the sample,
:class:`modalities.graph.size.TriangulationNodeCountHook`; default ``none``: the size is whatever the
split tokens give); it composes with the other options.  ``--node-count reject --resample-invalid K`` draws
the targets the same way and redraws every sample whose node count misses its target instead (the model
conditioned on its size, exact while the budget of K draws per output lasts).
``--matching aligned`` (the grid preset) coarsens with pairs lined up side by side and in line, so that
every level of a grid's hierarchy is a grid (:func:`modalities.graph.coarsen.coarsen`); ``--parent-links`` tells each
edge position how many edges join its endpoints' parents (the mask one level up).
``--eval-split val`` (``train`` where there is no validation split) compares with those graphs instead
of the test graphs (for choosing settings); ``--face-features`` trains with the planarity inputs of the finest expansion;
``--val-every N`` records the per-token loss on the validation graphs every N training steps
(``val_loss_curve``; for choosing a training length); ``--metric-sensitivity`` trains nothing and measures how the MMD statistics react to edge deletions
and flips of real graphs.  Each run also stores the generated graphs (``graphs.json``: ``{"graphs": [{"n",
"edges"}, ...], "run": ...}``) and a
``structure_summary`` (edges, triangles, degree shares, non-triangular faces) in ``metrics.json``.

``--tokenizer triangulation`` (planar) replaces the coarsening hierarchy by vertex splits of a triangulated
disc (:class:`modalities.graph.triangulation.TriangulationTokenizer`): every sample is planar by construction;
its preset trains 24 orderings per graph for 3000 steps (about 48 min on one core), and
``--split-temperature 0.5 --split-slot-only`` (chosen against the training graphs) sharpens where vertices
split, keeping how many do and how each divides its neighbours::

    python -m examples.graph_demo --dataset planar --tokenizer triangulation --out outputs/tri
    python -m examples.graph_demo --dataset planar --load outputs/tri --split-temperature 0.5 --split-slot-only \
        --out outputs/tri_test

``--candidate-head`` adds to the model a score of every split shape by what it joins (the two neighbours'
kinds and degrees, the degrees it leaves; ``TriangulationTokenizer.candidate_features``): it learns the shapes
in a third of the steps and samples as the preset at the preset's size (about 75 min on one core); in the
smaller setting (``--width 64 --depth 2 --perms 6 --steps 600``) it cuts the degree MMD against the training
graphs tenfold (``benchmarks/results/graph/README.md``, section "the candidate head").
``--partial-finest 0.7 --size-features on --delays 2`` trains on hierarchies whose finest level keeps only a
share of its contractions and that start up to two levels late, so the last level a sample grows in adds
what it still lacks and the level alone never says "stop": samples end at the training graphs' size far more
often (section "partial finest levels")::

    python -m examples.graph_demo --dataset planar --tokenizer triangulation --candidate-head \
        --partial-finest 0.7 --size-features on --delays 2 --steps 2000 --out outputs/tri_partial

Pipeline: graphs -> :class:`GraphPyramidTokenizer` (exact tokens of a coarsening
hierarchy; several random node orderings of each training graph give different
hierarchies, a free augmentation) -> :class:`msar.NextScaleTransformer` trained by
teacher forcing with cross-entropy on the real (non-PAD) positions -> :func:`msar.sample`.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time

import networkx as nx
import numpy as np
import torch
from tqdm import tqdm

import msar
from benchmarks.common import write_result_json
from modalities.graph import GraphPyramidTokenizer, evaluate, graphs_from, make_dataset
from modalities.graph.coarsen import MATCHINGS
from modalities.graph.datasets import WITH_VALIDATION, graphs_json
from modalities.graph.constraints import PROJECTIONS, PROPERTIES, EdgeScores, StructureHook, count_projection
from modalities.graph.metrics import VALIDITY, ValidityFilter, structure_summary
from modalities.graph.size import (NodeCountHook, TriangulationNodeCountHook, draw_node_counts,
                                   level_size_report)
from modalities.graph.triangulation import (CHUNKINGS, SplitShapeTemperature, TriangulationTokenizer,
                                            is_triangulated_disc)
from msar.training import TransformerTrainConfig, TransformerTrainer, build_loader

# per dataset: model width, depth, heads, training steps, batch size, random orderings per graph,
# edge chunks (scales per level for the edge tokens; more = more sequential, same sequence length)
PRESETS = {
    "community-small": dict(width=96, depth=3, heads=4, steps=800, batch=32, perms=8, lr=1e-3, chunks=3),
    "planar": dict(width=96, depth=3, heads=4, steps=1000, batch=12, perms=6, lr=1e-3, chunks=32),
    # grid: the aligned coarsening (every level of a grid a grid; benchmarks/results/graph/aligned/, coarse/);
    # 4000 steps (about 20 min on one core): at 600 no sample is a grid, at 3000 a quarter are not (preset/)
    "grid": dict(width=64, depth=2, heads=4, steps=4000, batch=4, perms=3, lr=1e-3, chunks=8, matching="aligned"),
    "sbm": dict(width=64, depth=2, heads=4, steps=400, batch=4, perms=3, lr=1e-3, chunks=8),
    "lobster": dict(width=96, depth=3, heads=4, steps=500, batch=12, perms=6, lr=1e-3, chunks=8),
}


# --tokenizer triangulation: 24 orderings per graph (more hierarchies; validation loss 0.438 -> 0.373 at 1000
# steps), 12 split chunks per level dealt by colouring (no two neighbours in one chunk, so no collisions),
# 3000 steps (validation loss 0.363 at 2000, 0.360 at 3000; with split temperature 0.5 the validation degree /
# clustering ratios 2.0x / 1.9x -> 1.4x / 1.3x; benchmarks/results/graph/triangulation/colour/)
TRIANGULATION = dict(perms=24, steps=3000, split_chunks=12, split_chunking="colour")


def permuted(G: nx.Graph, rng: np.random.Generator) -> nx.Graph:
    """Same graph, nodes relabelled at random: the coarsening breaks ties by label, so this
    yields a different (equally exact) hierarchy and token sequence."""
    perm = rng.permutation(G.number_of_nodes())
    H = nx.Graph()
    H.add_nodes_from(range(G.number_of_nodes()))
    H.add_edges_from((int(perm[u]), int(perm[v])) for u, v in G.edges())
    return H


def augment(graphs: list[nx.Graph], perms: int, seed: int) -> list[nx.Graph]:
    """Each graph as given plus ``perms - 1`` random relabellings (different hierarchies)."""
    rng = np.random.default_rng(seed)
    return [G if p == 0 else permuted(G, rng) for G in graphs for p in range(perms)]


def build_training_set(tok: GraphPyramidTokenizer, items: list[nx.Graph], chunk: int = 32, encode=None,
                       desc: str = "tokenize") -> tuple[torch.Tensor, torch.Tensor]:
    """All token sequences ``(M, L)`` and teacher-forcing inputs ``(M, L - n0, C)``, precomputed once;
    ``encode(graphs) -> (per-scale tokens, teacher input)`` replaces the tokenizer's own pair."""
    encode = encode or (lambda graphs: (idx := tok.encode(graphs), tok.teacher_forcing_input(idx)))
    toks, tfs = [], []
    for i in tqdm(range(0, len(items), chunk), desc=desc, leave=False):
        idx, tf = encode(items[i:i + chunk])
        toks.append(torch.cat(idx, 1))
        tfs.append(tf)
    return torch.cat(toks), torch.cat(tfs)


def noisy_context_set(tok: TriangulationTokenizer, items: list[nx.Graph], prob: float,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One noisy-context copy of each sequence of ``items`` (:meth:`TriangulationTokenizer.encode_noisy_context`,
    seeded by ``seed``), as :func:`build_training_set` returns them."""
    rng = np.random.default_rng([seed, 1])
    noisy = lambda graphs: tok.encode_noisy_context(graphs, prob, rng)[::2]  # noqa: E731  (targets, teacher input)
    return build_training_set(tok, items, encode=noisy, desc="noisy context")


def draw_panel(rows: list[tuple[str, list[nx.Graph]]], path: str, seed: int = 0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(len(g) for _, g in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.0 * ncol, 2.1 * len(rows)), squeeze=False)
    for r, (title, graphs) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(graphs):
                continue
            G = graphs[c]
            pos = (nx.kamada_kawai_layout(G) if 0 < G.number_of_nodes() <= 120 and nx.is_connected(G)
                   else nx.spring_layout(G, seed=seed))
            nx.draw_networkx(G, pos=pos, ax=ax, node_size=8, width=0.5, with_labels=False, node_color="#1f77b4")
            ax.set_title(f"{title} n={G.number_of_nodes()} m={G.number_of_edges()}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def keep_fewest_dropped(best: list[tuple], drawn: list[tuple]) -> list[tuple]:
    """``--best-of``: per output graph, of two ``(sample, projection, dropped, added)`` candidates keep
    the one whose projection dropped fewer of the sample's edges (the closer to valid); on a tie the
    earlier draw stays, so N = 1 and the first draw of N > 1 agree."""
    if len(best) != len(drawn):
        raise ValueError(f"keep_fewest_dropped: {len(best)} kept candidates but {len(drawn)} new ones")
    return [new if new[2] < old[2] else old for old, new in zip(best, drawn)]


def measuring_hook(tok: GraphPyramidTokenizer, constrain: bool, temperature: float, acc: dict):
    """A logits hook for :func:`msar.sample` that measures, then (``constrain``) masks, invalid tokens.

    Adds to ``acc["mass"]`` the model's probability (at the sampling temperature) on tokens the
    decoder would reinterpret, summed over real positions, and to ``acc["positions"]`` their count.
    Masking is :meth:`GraphPyramidTokenizer.valid_token_hook`."""

    def hook(k: int, logits: torch.Tensor, state) -> torch.Tensor:
        ok = state.allowed(k).to(logits.device)
        real = ~ok[..., tok.pad_token]
        p_bad = (logits / temperature).softmax(-1).masked_fill(ok, 0.0).sum(-1)
        acc["mass"] += float(p_bad[real].sum())
        acc["positions"] += int(real.sum())
        return tok.valid_token_hook(k, logits, state) if constrain else logits

    return hook


def chain_hooks(*hooks):
    """One ``logits_hook`` applying ``hooks`` in order (each sees the previous one's logits)."""

    def hook(k: int, logits: torch.Tensor, state) -> torch.Tensor:
        for h in hooks:
            logits = h(k, logits, state)
        return logits

    return hook


def structure_for(dataset: str, args: argparse.Namespace, tok: GraphPyramidTokenizer) -> str | None:
    """The structure property sampling enforces: ``--structure``, where ``auto`` picks the
    dataset's own (grid; planar, on every level when the hierarchy's levels are planar, i.e.
    ``matching="max"``) and none elsewhere; always none with ``--no-constrain``."""
    if args.no_constrain or args.structure == "none" or isinstance(tok, TriangulationTokenizer):
        return None  # a triangulation's decoded graphs are planar by construction
    if args.structure == "auto":
        if dataset == "planar" and tok.matching == "max":
            return "planar_levels"
        return dataset if dataset in PROPERTIES else None
    return args.structure


def count_invalid(tok: GraphPyramidTokenizer, indices: list[torch.Tensor]) -> int:
    """Sampled tokens at real positions that the decoder has to reinterpret (replayed on a fresh state)."""
    st, bad = tok.start(indices[0].shape[0]), 0
    for k, idx in enumerate(indices):
        ok = st.allowed(k)
        real = ~ok[..., tok.pad_token]
        bad += int((real & ~ok.gather(-1, idx.unsqueeze(-1)).squeeze(-1)).sum())
        st.add_scale(k, idx)
    return bad


def build_model(tok: GraphPyramidTokenizer, cfg: dict, dropout: float) -> msar.NextScaleTransformer:
    return msar.NextScaleTransformer(msar.TransformerConfig(
        schedule=tok.schedule.to_config(), vocab_size=tok.vocab_size, latent_dim=tok.latent_dim, num_classes=0,
        depth=cfg["depth"], embed_dim=cfg["width"], num_heads=cfg["heads"], cond_drop_rate=0.0,
        drop_rate=dropout, init_std=0.02, candidate_dim=tok.candidate_dim if cfg.get("candidate_head") else 0))


def train(model: msar.NextScaleTransformer, tok: GraphPyramidTokenizer, X: torch.Tensor, TF: torch.Tensor,
          cfg: dict, seed: int, out: str, ckpt_every: int = 100,
          heldout: tuple[torch.Tensor, torch.Tensor] | None = None, val_every: int = 0
          ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Teacher forcing with :class:`msar.training.TransformerTrainer`, cross-entropy on the
    non-PAD positions only (``ignore_index=tok.pad_token``), unconditional.  Checkpoints go to
    ``out/ckpt`` (a rerun resumes), the per-step log to ``out/logs/train.csv``; returns the
    loss curve (every 25 steps and the last) read from that log, and the held-out curve: with
    ``heldout`` (tokens and teacher input of other graphs) and ``val_every``, the per-token loss on
    them (eval mode, no dropout) every ``val_every`` steps and at the end, logged to
    ``out/logs/val.csv`` (empty otherwise)."""
    steps = cfg["steps"]
    tc = TransformerTrainConfig(lr=cfg["lr"], total_steps=steps, warmup_steps=max(1, steps // 20), lr_schedule="cos",
                                warmup_start=0.05, final_lr_ratio=0.01, weight_decay=0.05, grad_clip=1.0,
                                ignore_index=tok.pad_token, ckpt_dir=os.path.join(out, "ckpt"), ckpt_every=ckpt_every,
                                log_dir=os.path.join(out, "logs"), tensorboard=False)
    counts = list(tok.schedule.token_counts)

    def tokens_and_input(raw):  # (x (B, L), tf (B, L - n0, C)) -> per-scale tokens, no labels, teacher input
        x, tf = raw
        return list(x.split(counts, dim=1)), None, tf

    trainer = TransformerTrainer(model, tok, tc, prepare_batch=tokens_and_input)
    loader = build_loader(torch.utils.data.TensorDataset(X, TF), cfg["batch"], seed=seed)
    if heldout is None or val_every <= 0:
        trainer.fit(loader)
    else:  # the same training (fit's target is absolute, the loader's order fixed by seed and epoch), paused to evaluate
        val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*heldout), batch_size=32)
        for target in [*range(val_every, steps, val_every), steps]:
            trainer.fit(loader, steps=target)
            if trainer.step == target:  # a resumed run is past the earlier targets (already in val.csv)
                trainer.evaluate(val_loader)
    model.eval()
    with open(os.path.join(out, "logs", "train.csv"), newline="") as f:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    val_curve = []
    if heldout is not None and val_every > 0:
        with open(os.path.join(out, "logs", "val.csv"), newline="") as f:
            val_curve = sorted({int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}.items())
    return [(s_, l_) for s_, l_ in rows if (s_ - 1) % 25 == 0 or s_ == steps], val_curve


def _eval_split(splits: dict, name: str, dataset: str) -> list[nx.Graph]:
    """The graphs samples are compared with: ``test`` for reported figures, ``val`` for choosing
    settings (decoding rules, temperatures, training lengths) without looking at the test split;
    ``train`` for choosing on a dataset without a validation split (grid: its baseline is 0)."""
    if not splits[name]:
        raise SystemExit(f"--eval-split {name}: {dataset} has no {name} split ({' and '.join(WITH_VALIDATION)} have one; "
                         f"--eval-split train compares with the training graphs)")
    return splits[name]


def run(dataset: str, args: argparse.Namespace) -> dict:
    started = time.time()
    torch.manual_seed(args.seed)
    cfg = dict(PRESETS[dataset])
    if args.tokenizer == "triangulation":
        cfg.update(TRIANGULATION, tokenizer="triangulation")
    for k in ("steps", "batch", "width", "depth", "perms"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.edge_chunks is not None:
        cfg["chunks"] = args.edge_chunks
    if args.matching is not None:
        cfg["matching"] = args.matching
    if args.final_chunks is not None:
        cfg["final_chunks"] = None if args.final_chunks == "same" else args.final_chunks
    if args.face_features:
        cfg["face_features"] = True
    if args.parent_links:
        cfg["parent_links"] = True
    if args.tokenizer is not None:
        cfg["tokenizer"] = args.tokenizer
    if args.split_chunks is not None:
        cfg["split_chunks"] = args.split_chunks
    if args.split_chunking is not None:
        cfg["split_chunking"] = args.split_chunking
    if args.split_rate is not None:
        cfg["split_rate"] = args.split_rate
    if args.extra_levels is not None:
        cfg["extra_levels"] = args.extra_levels
    if args.size_features is not None:
        cfg["size_features"] = args.size_features == "on"
    if args.delays is not None:
        cfg["delays"] = args.delays
    if args.partial_finest is not None:
        cfg["partial_finest"] = args.partial_finest
    if args.noisy_context is not None:
        cfg["noisy_context"] = args.noisy_context
    if args.candidate_head:
        cfg["candidate_head"] = True
    data_kw = {}
    if args.quick:
        cfg.update(steps=min(cfg["steps"], 150), perms=2, width=64, depth=2)
        if dataset == "grid":
            data_kw = {"max_side": 13}
    out = os.path.join(args.out, dataset)
    os.makedirs(out, exist_ok=True)
    if not args.load:  # a --load run uses the data settings of the run that trained the model (below)
        splits = make_dataset(dataset, seed=args.seed, **data_kw)
        train_graphs, test = splits["train"], _eval_split(splits, args.eval_split, dataset)
    seconds: dict[str, float] = {}

    if args.load:  # sample from a trained run instead of training
        src = os.path.join(args.load, dataset)
        pipe = msar.from_pretrained(os.path.join(src, "pipeline"))  # tokenizer/ + transformer/
        tok, model = pipe.tokenizer, pipe.transformer
        with open(os.path.join(src, "metrics.json")) as f:
            prev = json.load(f)
        cfg, data_kw = prev["train_config"], prev["data_kw"]
        splits = make_dataset(dataset, seed=args.seed, **data_kw)  # the data of the run that trained it
        train_graphs, test = splits["train"], _eval_split(splits, args.eval_split, dataset)
        curve = prev["loss_curve"]
        val_curve = prev.get("val_loss_curve") or []
        seconds = dict(prev["seconds"])
        trained_by = prev.get("trained_by") or prev.get("run")  # the training run's own record
        train_used = prev.get("training_graphs_used", len(train_graphs))
        if not isinstance(tok, TriangulationTokenizer) and (args.split_temperature != 1.0 or args.split_top_p
                                                              or args.split_slot_only):
            raise SystemExit(f"--split-temperature / --split-top-p / --split-slot-only: {args.load} holds a coarsening "
                             "model, which has no splits to shape")
        if isinstance(tok, TriangulationTokenizer) and (args.project or args.complete or args.expand_test):
            raise SystemExit(f"{args.load} holds a triangulation model: --project, --complete and --expand-test "
                             "are options of the coarsening tokenizer")
    else:
        trained_by = None  # this run (its record is "run")
        train_used = len(train_graphs)  # training graphs the tokenizer could encode
        t0 = time.time()
        if cfg.get("tokenizer") == "triangulation":  # only triangulated discs have that hierarchy
            kept = [G for G in train_graphs if is_triangulated_disc(G)]
            if not kept:
                raise SystemExit(f"--tokenizer triangulation: none of the {len(train_graphs)} {dataset} training graphs "
                                 "is a triangulated disc (planar, bounded faces triangles, one outer cycle)")
            train_used = len(kept)
            items = augment(kept, cfg["perms"], args.seed)
            tok = TriangulationTokenizer.fit(items, chunks=cfg.get("split_chunks", 3), rate=cfg.get("split_rate", 1.0),
                                             extra_levels=cfg.get("extra_levels", 0),
                                             chunking=cfg.get("split_chunking", "round-robin"),
                                             size_features=cfg.get("size_features", False),
                                             delays=cfg.get("delays", 0),
                                             partial_finest=cfg.get("partial_finest", 0.0))
        else:
            items = augment(train_graphs, cfg["perms"], args.seed)
            tok = GraphPyramidTokenizer.fit(items, edge_chunks=cfg["chunks"],  # capacity covers every hierarchy
                                            matching=cfg.get("matching", "greedy"),
                                            final_chunks=cfg.get("final_chunks"),
                                            face_features=cfg.get("face_features", False),
                                            parent_links=cfg.get("parent_links", False))
        X, TF = build_training_set(tok, items)
        if cfg.get("noisy_context"):  # one more copy of every sequence, with spurious splits in its context
            NX, NTF = noisy_context_set(tok, items, cfg["noisy_context"], args.seed)
            X, TF = torch.cat([X, NX]), torch.cat([TF, NTF])
        heldout = None
        if args.val_every:  # the validation graphs, as many orderings each as the training graphs
            if not splits["val"]:
                raise SystemExit(f"--val-every: {dataset} has no validation split here")
            val = splits["val"]
            if cfg.get("tokenizer") == "triangulation":
                val = [G for G in val if is_triangulated_disc(G)]
            heldout = build_training_set(tok, augment(val, cfg["perms"], args.seed + 1))
        seconds["tokenize"] = time.time() - t0
        print(f"[{dataset}] {len(train_graphs)} train / {len(test)} test graphs, {X.shape[0]} sequences, "
              f"L={tok.schedule.L} over {len(tok.schedule)} scales, {(X != tok.pad_token).float().mean():.0%} non-PAD, "
              f"latent_dim={tok.latent_dim}, tokenized in {seconds['tokenize']:.1f}s")
        model = build_model(tok, cfg, 0.1 if not args.quick else 0.0)
        t0 = time.time()
        curve, val_curve = train(model, tok, X, TF, cfg, args.seed, out, args.ckpt_every, heldout, args.val_every)
        seconds["train"] = time.time() - t0
        msar.Pipeline(tok, model).save_pretrained(os.path.join(out, "pipeline"))

    # ---- sample as many graphs as the test set holds
    t0 = time.time()
    sample_seed = args.seed if args.sample_seed is None else args.sample_seed
    invalid = {"mass": 0.0, "positions": 0, "draws": 0}  # see measuring_hook / count_invalid
    structure = structure_for(dataset, args, tok)
    project = None
    if args.project:  # the model's own sample (valid tokens), then projection onto the property (checked in main)
        project, structure = structure, None
    struct_stats = {"positions": 0, "rejected": 0, "dropped": 0}
    project_stats: dict[str, int] = {}
    n_gen = args.num_samples or len(test)
    # --node-count train: one target N per output graph, drawn from the training graphs' sizes (GRAN /
    # DiGress / SPECTRE do the same), then every split scale is made to produce the levels of an N-node graph;
    # --node-count reject: draws are redrawn until one has N nodes (the model conditioned on its size)
    targets = draw_node_counts(train_graphs, n_gen, sample_seed) if args.node_count != "none" else None

    def sized(i: int, b: int, seed: int) -> NodeCountHook | TriangulationNodeCountHook | None:
        """The node-count hook of the batch ``i : i + b`` (None unless --node-count train)."""
        if args.node_count != "train":
            return None
        Hook = TriangulationNodeCountHook if isinstance(tok, TriangulationTokenizer) else NodeCountHook
        h = Hook(tok, targets[i:i + b], args.temperature, seed=seed)
        size_hooks.append(h)
        return h

    size_hooks: list[NodeCountHook | TriangulationNodeCountHook] = []
    level_counts: list[list[int]] = []  # per sample, the node count of every level (see level_size_report)
    if args.expand_test and not 1 <= args.expand_test <= tok.K - 2:
        raise SystemExit(f"--expand-test must be in 1..{tok.K - 2} (expansions with edge scales), got {args.expand_test}")
    if args.expand_test and n_gen > len(test):
        raise SystemExit(f"--expand-test samples one graph per test graph: --num-samples <= {len(test)}, got {n_gen}")
    # --resample-invalid K: draw until n_gen graphs pass the dataset's validity check (with --node-count reject:
    # and have their target's node count), at most K per output (the model conditioned on validity and size);
    # K = 1 keeps every draw. The first n_gen draws are the same either way.
    accept = ValidityFilter(VALIDITY.get(dataset) if args.resample_invalid > 1 else None, n_gen,
                            n_gen * args.resample_invalid, targets if args.node_count == "reject" else None)
    bar = tqdm(total=n_gen, desc="sample", leave=False)
    while not accept.done:
        i, b = accept.drawn, accept.next_batch(32)  # i: the batch's first draw (its seed offset)
        # the hook masks tokens the decoder would reinterpret (PAD at a real node / edge, a wrong
        # kind, mask bits naming a missing child); --no-constrain samples the raw distribution
        hook = measuring_hook(tok, not args.no_constrain, args.temperature, invalid)
        if args.split_temperature != 1.0 or args.split_top_p:  # sharpen how vertices split, keep how many do
            hook = SplitShapeTemperature(args.split_temperature, args.split_top_p, args.split_slot_only).then(hook)
        size = sized(i, b, sample_seed + i)
        if size is not None:  # after the valid-token mask, before the structure hook / scores read the splits
            hook = chain_hooks(hook, size)
        if structure:  # edge tokens drawn one by one, each kept only if the graph stays `structure`
            sh = StructureHook(tok, structure, args.temperature, seed=sample_seed + i, top_p=args.top_p)
            hook = chain_hooks(hook, sh)
        if project:  # records the model's probability of every finest-level candidate edge
            rec = EdgeScores(tok, args.temperature)
            hook = chain_hooks(hook, rec)
        known = known_mask = None
        if args.expand_test:  # the test graphs' own tokens up to the edge scales of the last N expansions
            known = tok.encode(test[i:i + b])
            first = next(s_ for s_, (kd, lvl, _) in enumerate(tok.kinds) if kd == "E" and lvl >= tok.K - 1 - args.expand_test)
            known_mask = [torch.full_like(t, s_ < first, dtype=torch.bool) for s_, t in enumerate(known)]
        res = msar.sample(model, tok, batch_size=b, cfg=0.0, top_k=0, top_p=args.top_p,
                          temperature=args.temperature, seed=sample_seed + i, logits_hook=hook,
                          known=known, known_mask=known_mask)
        batch_graphs = graphs_from(res.data)
        if structure and args.complete:  # add the finest level's likely candidate edges that keep the property
            batch_graphs = sh.complete(batch_graphs)
        if project:
            def candidates(graphs: list[nx.Graph], scores: EdgeScores) -> list[tuple]:
                """``(sample, projection, dropped, added)`` per graph of one draw."""
                return [(G, *res) for G, res in zip(graphs, scores.project_each(graphs, project, args.projection))]

            best = candidates(batch_graphs, rec)
            for r in range(1, args.best_of):  # further draws; keep, per output, the one that needed the fewest drops
                rec_r = EdgeScores(tok, args.temperature)  # the valid-token mask and the scores
                size_r = sized(i, b, sample_seed + i + r * 1_000_003)  # the same target sizes as the first draw
                res_r = msar.sample(model, tok, batch_size=b, cfg=0.0, top_k=0, top_p=args.top_p,
                                    temperature=args.temperature, seed=sample_seed + i + r * 1_000_003,
                                    logits_hook=rec_r if size_r is None else chain_hooks(tok.valid_token_hook,
                                                                                         size_r, rec_r),
                                    known=known, known_mask=known_mask)
                best = keep_fewest_dropped(best, candidates(graphs_from(res_r.data), rec_r))
            batch_graphs = [H for _, H, _, _ in best]
            for G, _, d, a in best:
                count_projection(project_stats, G, d, a)
        kept = len(accept.kept)
        accept.offer(batch_graphs)
        bar.update(len(accept.kept) - kept)
        if isinstance(tok, TriangulationTokenizer):  # splits next to an earlier one of their chunk, read as none
            invalid["refused_splits"] = invalid.get("refused_splits", 0) + res.state.refused
        else:  # the node count of every level (level_size_report), of the (first) draw
            levels = tok.decode_progression(res.indices)
            level_counts.extend([lvl[b_].number_of_nodes() for lvl in levels] for b_ in range(b))
        if structure:
            struct_stats = {key: struct_stats.get(key, 0) + sh.stats.get(key, 0) for key in sh.stats}
        else:  # a structure hook drops coarse edges on purpose (PAD), which is not an invalid draw
            invalid["draws"] += count_invalid(tok, res.indices)
    bar.close()
    gen, rejection = accept.result()
    seconds["sample"] = time.time() - t0
    size_stats: dict[str, int] = {}  # the node-count hooks' counters, summed over the batches
    for h in size_hooks:
        size_stats = {key: size_stats.get(key, 0) + n for key, n in h.stats.items()}
    # the level sizes the halving coarsening implies (a triangulation's levels have no fixed sizes)
    node_count = {} if isinstance(tok, TriangulationTokenizer) else {"level_sizes": level_size_report(level_counts)}
    if targets is not None:  # every generated graph should have its target's node count (checked, not assumed)
        node_count |= {"targets": targets, "stats": size_stats,
                      "on_target": sum(G.number_of_nodes() == N for G, N in zip(gen, targets)) / len(gen),
                      "mean_target": float(np.mean(targets))}
    # mean probability on invalid tokens per real position, and the share of real positions whose drawn
    # token was invalid (read as SINGLE / a dropped edge / bits ignored); 0 by construction when constrained
    invalid_stats = {"mean_invalid_mass": invalid["mass"] / max(invalid["positions"], 1),
                     "invalid_draw_rate": invalid["draws"] / max(invalid["positions"], 1),
                     "real_positions": invalid["positions"]}
    if "refused_splits" in invalid:
        invalid_stats["refused_splits_per_sample"] = invalid["refused_splits"] / accept.drawn  # per draw

    metrics = evaluate(gen, train_graphs, test, dataset)
    # what the MMD statistics react to (edges, triangles, degree shares, non-triangular faces), per set
    metrics["structure_summary"] = {"generated": structure_summary(gen), "test": structure_summary(test),
                                    "train": structure_summary(train_graphs)}
    # the generated graphs, for later analysis (with the same provenance record as metrics.json)
    write_result_json(os.path.join(out, "graphs.json"), graphs_json(gen), started)
    metrics.update({
        "dataset": dataset, "training_graphs_used": train_used, "eval_split": args.eval_split, "seed": args.seed, "quick": args.quick, "data_kw": data_kw, "train_config": cfg,
        "tokenizer": tok.config, "schedule_L": tok.schedule.L, "num_scales": len(tok.schedule),
        "num_parameters": model.num_parameters(), "final_loss": curve[-1][1], "loss_curve": curve,
        "val_loss_curve": val_curve or None,
        "seconds": seconds, "sampling": {"top_p": args.top_p, "temperature": args.temperature,
                                        "constrained": not args.no_constrain, "seed": sample_seed,
                                        "structure": structure, "expand_test": args.expand_test,
                                        "complete": args.complete, "project": project,
                                        "projection": args.projection if project else None,
                                        "best_of": args.best_of, "node_count": args.node_count,
                                        "split_temperature": args.split_temperature,
                                        "split_top_p": args.split_top_p,
                                        "split_slot_only": args.split_slot_only,
                                        "resample_invalid": args.resample_invalid},
        # --resample-invalid: draws made, how many passed the validity check, and invalid graphs kept to fill
        # the set when the budget ran out (with --node-count reject also outputs filled off their target size;
        # None without rejection)
        "rejection": {"max_draws_per_sample": args.resample_invalid, **rejection}
                     if args.resample_invalid > 1 else None,
        "constrained": not args.no_constrain, "invalid_tokens": invalid_stats,
        "structure": structure, "structure_stats": struct_stats if structure else None,
        "project": project, "project_stats": project_stats or None, "node_count": node_count,
        "loaded_from": args.load or None, "trained_by": trained_by,
    })
    write_result_json(os.path.join(out, "metrics.json"), metrics, started)  # + command, commit, date, machine
    draw_panel([("real", test[:8]), ("sample", gen[:8]), ("sample", gen[8:16])], os.path.join(out, "samples.png"))
    idx = [t[:1] for t in res.indices]
    prog = [lvl[0] for lvl in tok.decode_progression(idx)]
    draw_panel([("level", prog[1:])], os.path.join(out, "progression.png"))
    g_mmd, b_mmd, v = metrics["mmd_gen_vs_test"], metrics["mmd_train_vs_test"], metrics["vun"]
    print(f"[{dataset}] loss {curve[-1][1]:.3f}  " + "  ".join(f"{k} {t:.0f}s" for k, t in seconds.items()))
    if val_curve:
        best = min(val_curve, key=lambda r: r[1])
        print(f"  validation loss {val_curve[-1][1]:.3f} at step {val_curve[-1][0]} (lowest {best[1]:.3f} at step {best[0]})")
    for key in ("degree_tv", "clustering_tv", "orbit_tv", "spectral_tv"):
        print(f"  {key:14s} gen {g_mmd[key]:.4f}   train-vs-{args.eval_split} {b_mmd[key]:.4f}")
    print(f"  V.U.N. {v}")
    if args.resample_invalid > 1:
        print(f"  rejection: {rejection['drawn']} draws for {n_gen} graphs, {rejection['acceptance']:.1%} accepted, "
              f"{rejection['kept_invalid']} invalid kept" + (f", {rejection['off_target']} off their node count"
                                                            if "off_target" in rejection else "")
              + f" (budget {args.resample_invalid} draws per graph)")
    mem = metrics["memorization"]
    if mem["valid"]:
        print(f"  valid samples: {mem['valid']} ({mem['distinct_valid']} distinct), {mem['in_train']:.0%} copies of a "
              f"training graph, {mem['in_eval_only']:.0%} graphs of the {args.eval_split} split only, "
              f"{mem['neither']:.0%} new")
    if "level_sizes" in node_count:
        print(f"  levels: {node_count['level_sizes']['consistent']:.0%} of the samples have the level sizes of their "
              f"node count, {node_count['level_sizes']['short_levels']:.2f} levels per sample leave two or more nodes "
              "single")
    if "targets" in node_count:
        print(f"  node count: {node_count['on_target']:.0%} of the samples on their target (mean target "
              f"{node_count['mean_target']:.1f}, mean generated {metrics['mean_nodes_generated']:.1f})")
    return metrics


def flip_edges(G: nx.Graph, k: int, rng: np.random.Generator) -> nx.Graph:
    """``G`` with ``k`` random edge flips: an edge (x, y) between two triangles (x, y, p), (x, y, q) is
    replaced by (p, q) when p, q are not adjacent.  Planarity and the edge count are kept; a
    triangulation stays one; only which nodes are joined changes."""
    H = G.copy()
    for _ in range(k):
        edges = list(H.edges())
        for e in rng.permutation(len(edges)):
            x, y = edges[e]
            common = sorted(set(H[x]) & set(H[y]))
            if len(common) != 2 or H.has_edge(*common):
                continue
            H.remove_edge(x, y)
            H.add_edge(*common)
            break
    return H


def metric_sensitivity(dataset: str, args: argparse.Namespace) -> dict:
    """How far the MMD statistics move when real graphs are perturbed: the validation graphs with
    k random edges deleted, or k random edge flips (same edge count, same planarity), each against
    the training graphs.  Train and validation splits only (the test split is not read)."""
    started = time.time()
    splits = make_dataset(dataset, seed=args.seed)
    if not splits["val"]:
        raise SystemExit(f"--metric-sensitivity needs a validation split; {dataset} has none")
    train_graphs, val = splits["train"], splits["val"]
    from modalities.graph.metrics import graph_stats, mmd_all
    ref = graph_stats(train_graphs)
    rng = np.random.default_rng(args.seed)
    rows = [{"perturbation": "none", "k": 0, "mmd": mmd_all(ref, val, kernels=("tv",)),
             "summary": structure_summary(val)}]
    for kind in ("delete", "flip"):
        for k in (2, 5, 10, 20):
            pert = []
            for G in val:
                if kind == "delete":
                    H = G.copy()
                    edges = list(H.edges())
                    H.remove_edges_from(edges[i] for i in rng.choice(len(edges), k, replace=False))
                else:
                    H = flip_edges(G, k, rng)
                pert.append(H)
            rows.append({"perturbation": kind, "k": k, "mmd": mmd_all(ref, pert, kernels=("tv",)),
                         "summary": structure_summary(pert)})
    for r in rows:
        print(f"  {r['perturbation']:6s} k={r['k']:2d}  " + "  ".join(f"{key} {v:.4f}" for key, v in r["mmd"].items()))
    out = {"dataset": dataset, "seed": args.seed, "reference": "train", "perturbed": "val", "rows": rows}
    path = os.path.join(args.out, dataset, "metric_sensitivity.json")
    write_result_json(path, out, started)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="community-small",
                   help="comma-separated: community-small, grid, planar, sbm, lobster")
    p.add_argument("--out", default="outputs/graph_demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps, smaller grids: a smoke run")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--perms", type=int, default=None, help="random node orderings (hierarchies) per training graph")
    p.add_argument("--num-samples", type=int, default=0, help="graphs to generate (default: size of the test split)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--sample-seed", type=int, default=None,
                   help="seed of the sampler only (default --seed, which also picks the data split)")
    p.add_argument("--no-constrain", action="store_true",
                   help="sample without masking invalid tokens (the behaviour before the valid-token hook)")
    p.add_argument("--structure", default="auto", choices=["auto", "none", *sorted(PROPERTIES)],
                   help="property kept while edge tokens are drawn (modalities.graph.constraints); auto: "
                        "planar for planar, grid for grid, none elsewhere")
    p.add_argument("--complete", action="store_true",
                   help="after sampling with the structure hook, add the finest level's candidate edges "
                        "(child pairs of its coarse edges), most probable under the model first, wherever "
                        "the property holds (StructureHook.complete; a decoding rule, reported apart)")
    p.add_argument("--project", action="store_true",
                   help="sample the model with the valid-token mask only, then keep its finest-level edges most "
                        "probable first while the structure property holds and add the other candidates the same "
                        "way (modalities.graph.constraints.EdgeScores.project; a decoding rule, reported apart)")
    p.add_argument("--projection", default="greedy", choices=sorted(PROJECTIONS),
                   help="with --project: the rule. greedy: the sample's edges most probable first, then the candidates; "
                        "degrees: the same, then candidates at nodes below their sampled degree first, then edge flips "
                        "toward the sampled degrees (modalities.graph.constraints.project_graph_degrees)")
    p.add_argument("--best-of", type=int, default=1, metavar="N",
                   help="with --project: draw N samples per output graph and keep the one whose projection drops "
                        "the fewest of its edges (the closest to valid; N -> infinity with none dropped is the model "
                        "conditioned on the property). A decoding rule, reported apart")
    p.add_argument("--resample-invalid", type=int, default=1, metavar="K",
                   help="rejection sampling: redraw every sample that fails the dataset's validity check (planar: "
                        "connected and planar; grid: a 2-D grid; lobster) or, with --node-count reject, misses its "
                        "target node count, at most K draws per output graph, keeping "
                        "the first valid ones in draw order (the model conditioned on validity; when the budget runs "
                        "out, rejected draws fill the set). metrics.json 'rejection' reports the acceptance rate. "
                        "Default 1: no rejection. A decoding rule, reported apart")
    p.add_argument("--node-count", default="none", choices=["none", "train", "reject"],
                   help="train: draw each sample's node count N from the training graphs' sizes and make every "
                        "split scale produce the levels of an N-node graph, choosing which nodes split by the "
                        "model's own probabilities (modalities.graph.size.NodeCountHook; triangulation models: no "
                        "split past N, and the last level completes the sample to N, TriangulationNodeCountHook); "
                        "reject: draw N the same way and redraw every sample that does not have N nodes, within the "
                        "--resample-invalid K budget (the model conditioned on its size; metrics.json 'rejection'); "
                        "none: the node count is whatever the split tokens give")
    p.add_argument("--matching", default=None, choices=list(MATCHINGS),
                   help="the coarsening's matching (preset; max: fewer leftover pairs, planar levels; aligned: "
                        "pairs lined up side by side and in line, so a grid's levels are grids)")
    p.add_argument("--tokenizer", default=None, choices=["pyramid", "triangulation"],
                   help="pyramid: the coarsening hierarchy of any graph (GraphPyramidTokenizer; default); "
                        "triangulation: vertex splits of a triangulated disc (TriangulationTokenizer; planar: every "
                        "sample is a planar triangulated disc by construction)")
    p.add_argument("--split-chunks", type=int, default=None,
                   help="--tokenizer triangulation: scales per level for the split tokens (preset 12; a later chunk "
                        "sees the splits of the earlier ones)")
    p.add_argument("--split-chunking", default=None, choices=list(CHUNKINGS),
                   help="--tokenizer triangulation: how a level's vertices are dealt into its chunks (preset colour: "
                        "no two neighbours in one chunk, so parallel draws cannot collide; round-robin: vertex j to "
                        "chunk j %% chunks, the setting of the runs before the option existed)")
    p.add_argument("--split-rate", type=float, default=None,
                   help="--tokenizer triangulation: share of the greedy contractions each level of a training "
                        "hierarchy makes (default 1; lower: deeper, more varied hierarchies)")
    p.add_argument("--extra-levels", type=int, default=None,
                   help="--tokenizer triangulation: levels beyond the deepest training hierarchy (default 0)")
    p.add_argument("--size-features", default=None, choices=["on", "off"],
                   help="--tokenizer triangulation: inputs saying how many vertices the graph still lacks to the "
                        "largest training size, over its size and over the vertices the level can still split "
                        "(TriangulationTokenizer size_features)")
    p.add_argument("--delays", type=int, default=None, metavar="E",
                   help="--tokenizer triangulation: each ordering of a training graph starts its hierarchy 0..E "
                        "levels late, so incomplete graphs occur at every level and the size, not the level, says "
                        "when to stop (TriangulationTokenizer delays; default 0)")
    p.add_argument("--partial-finest", type=float, default=None, metavar="F",
                   help="--tokenizer triangulation: the finest level of each ordering's hierarchy makes only a share "
                        "in [1-F, 1] of its contractions, so the last level adds what the graph still misses "
                        "(TriangulationTokenizer partial_finest; use with --size-features on; default 0)")
    p.add_argument("--noisy-context", type=float, default=None, metavar="P",
                   help="--tokenizer triangulation: train also on a copy of every sequence whose context at one level "
                        "has spurious splits (each unsplit vertex of the level's earlier chunks with probability P), "
                        "the data's tokens as targets (TriangulationTokenizer.encode_noisy_context); default off")
    p.add_argument("--candidate-head", action="store_true",
                   help="--tokenizer triangulation: the model also scores every split shape by what it joins (the "
                        "two neighbours' degrees and kinds, the degrees it leaves; TriangulationTokenizer."
                        "candidate_features, msar.TransformerConfig candidate_dim); default off")
    p.add_argument("--split-temperature", type=float, default=1.0,
                   help="triangulation models: temperature of the split shape given a split (keeps P(no split); "
                        "modalities.graph.triangulation.SplitShapeTemperature)")
    p.add_argument("--split-top-p", type=float, default=0.0,
                   help="triangulation models: top-p of the split shape given a split (keeps P(no split) and the "
                        "ratios of the shapes kept; 0 = off; SplitShapeTemperature)")
    p.add_argument("--split-slot-only", action="store_true",
                   help="triangulation models: --split-temperature sharpens only where a vertex splits given how many "
                        "neighbours the new vertex takes, which stays the model's (SplitShapeTemperature slot_only)")
    p.add_argument("--edge-chunks", type=int, default=None, help="scales per level for the edge tokens (preset)")
    p.add_argument("--final-chunks", default=None, choices=["same", "all"],
                   help="chunks of the finest expansion: 'all' = one per edge position (its edge masks are "
                        "predicted one at a time), 'same' = --edge-chunks (preset)")
    p.add_argument("--face-features", action="store_true",
                   help="feed the finest expansion's edge positions whether each child pair can still be added "
                        "without breaking planarity (GraphPyramidTokenizer face_features; preset: off)")
    p.add_argument("--parent-links", action="store_true",
                   help="edge inputs say how many edges join the two endpoints' parents' children (the parent "
                        "edge's mask bit count; GraphPyramidTokenizer parent_links; preset: off)")
    p.add_argument("--expand-test", type=int, default=0, metavar="N",
                   help="diagnostic: force the test graphs' own tokens and sample only the edge masks of the last "
                        "N expansions (1: the finest level's masks, given the true coarse graph and splits)")
    p.add_argument("--eval-split", default="test", choices=["test", "val", "train"],
                   help="graphs the samples are compared with (MMD, and the train-vs-split baseline); use val to "
                        "choose settings (train where there is no val split), test for the reported figures "
                        "(the JSON keys keep the name 'test')")
    p.add_argument("--metric-sensitivity", action="store_true",
                   help="no model: MMD of the validation graphs against the training graphs after k random edge "
                        "deletions or edge flips (how sensitive each statistic is); writes metric_sensitivity.json")
    p.add_argument("--load", default="", help="a previous --out directory: sample and evaluate its trained models")
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every that many training steps")
    p.add_argument("--val-every", type=int, default=0, metavar="N",
                   help="every N training steps and at the end, the per-token loss on the validation graphs "
                        "(teacher forcing, no dropout; logs/val.csv, val_loss_curve in metrics.json): choosing a "
                        "training length without the test split. Needs a validation split (planar, sbm); default off")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [name.strip() for name in args.dataset.split(",")]
    for name in names:  # every check before any training
        if name not in PRESETS:
            raise SystemExit(f"unknown dataset {name!r}; expected one of {sorted(PRESETS)}")
        if (args.project or args.complete) and (args.no_constrain or args.structure == "none"
                                                or (args.structure == "auto" and name not in PROPERTIES)):
            raise SystemExit(f"--project / --complete keep a structure property, and {name} has none here: use "
                             "--structure auto on planar / grid or name a property, without --no-constrain")
    if args.tokenizer == "triangulation":
        pyramid_only = {"--project": args.project, "--complete": args.complete, "--matching": args.matching,
                        "--edge-chunks": args.edge_chunks, "--final-chunks": args.final_chunks,
                        "--face-features": args.face_features, "--parent-links": args.parent_links,
                        "--expand-test": args.expand_test,
                        "--structure": args.structure not in ("auto", "none")}
        used = [flag for flag, on in pyramid_only.items() if on]
        if used:
            raise SystemExit(f"{', '.join(used)}: options of the coarsening tokenizer, not of --tokenizer triangulation "
                             "(whose samples are planar by construction)")
        if args.split_chunks is not None and args.split_chunks < 1:
            raise SystemExit(f"--split-chunks must be >= 1, got {args.split_chunks}")
        if args.split_rate is not None and not 0 < args.split_rate <= 1:
            raise SystemExit(f"--split-rate must be in (0, 1], got {args.split_rate}")
        if args.extra_levels is not None and args.extra_levels < 0:
            raise SystemExit(f"--extra-levels must be >= 0, got {args.extra_levels}")
        if args.delays is not None and not 0 <= args.delays <= 8:
            raise SystemExit(f"--delays must be in 0..8, got {args.delays}")
        if args.partial_finest is not None and not 0 <= args.partial_finest < 1:
            raise SystemExit(f"--partial-finest must be in [0, 1), got {args.partial_finest}")
        if args.noisy_context is not None and not 0 <= args.noisy_context <= 1:
            raise SystemExit(f"--noisy-context must be in [0, 1], got {args.noisy_context}")
        if args.load:
            raise SystemExit("--tokenizer is a training option: a --load run uses the tokenizer it was trained with")
        for name in names:  # before any training: every dataset needs graphs this tokenizer can encode
            if name in PRESETS and not any(is_triangulated_disc(G) for G in make_dataset(name, seed=args.seed)["train"]):
                raise SystemExit(f"--tokenizer triangulation: no {name} training graph is a triangulated disc "
                                 "(planar, bounded faces triangles, one outer cycle); use it for planar")
    elif (args.split_chunks is not None or args.split_chunking is not None or args.split_rate is not None
          or args.extra_levels is not None or args.size_features is not None or args.noisy_context is not None
          or args.delays is not None or args.partial_finest is not None or args.candidate_head):
        flags = ("--split-chunks, --split-chunking, --split-rate, --extra-levels, --size-features, --delays, "
                 "--partial-finest, --noisy-context and --candidate-head are")
        if args.load:
            raise SystemExit(f"{flags} training options: a --load run uses the tokenizer it was trained with")
        raise SystemExit(f"{flags} options of --tokenizer triangulation")
    if not args.split_temperature > 0:
        raise SystemExit(f"--split-temperature must be > 0, got {args.split_temperature}")
    if not 0 <= args.split_top_p <= 1:
        raise SystemExit(f"--split-top-p must be in [0, 1], got {args.split_top_p}")
    if args.split_slot_only and (args.split_temperature == 1.0 or args.split_top_p):
        raise SystemExit("--split-slot-only is a mode of --split-temperature T (T != 1), without --split-top-p "
                         f"(which filters the whole shape); got --split-temperature {args.split_temperature}, "
                         f"--split-top-p {args.split_top_p}")
    if (args.split_temperature != 1.0 or args.split_top_p or args.split_slot_only) and args.tokenizer != "triangulation" \
            and not args.load:
        raise SystemExit("--split-temperature, --split-top-p and --split-slot-only shape the splits of --tokenizer "
                         "triangulation (or of a --load run trained with it)")
    if args.project and args.complete:
        raise SystemExit("--project completes by itself (it samples without the structure hook): drop --complete")
    if args.projection != "greedy" and not args.project:
        raise SystemExit(f"--projection {args.projection} is a rule of --project: add --project")
    if args.best_of < 1 or (args.best_of > 1 and not args.project):
        raise SystemExit(f"--best-of N needs N >= 1 and --project (it picks among projections), got {args.best_of}")
    if args.resample_invalid < 1:
        raise SystemExit(f"--resample-invalid K needs K >= 1 draws per output graph, got {args.resample_invalid}")
    if args.node_count == "reject" and args.resample_invalid < 2:
        raise SystemExit("--node-count reject redraws samples whose node count misses their target: give it a budget "
                         f"of draws per output graph with --resample-invalid K (K >= 2), got K={args.resample_invalid}")
    if args.resample_invalid > 1:
        unchecked = [name for name in names if VALIDITY.get(name) is None]
        if unchecked and args.node_count != "reject":
            raise SystemExit(f"--resample-invalid: {', '.join(unchecked)} has no validity check to resample on "
                             f"(datasets with one: {', '.join(k for k, v in VALIDITY.items() if v)}; any dataset "
                             "with --node-count reject)")
        if args.node_count == "train" or args.expand_test:
            raise SystemExit("--resample-invalid draws past --num-samples, and --node-count train / --expand-test fix "
                             "one target per output graph in the draw itself: drop one of them (--node-count reject "
                             "rejects on the node count instead)")
    if args.val_every < 0 or (args.val_every and args.load):
        raise SystemExit(f"--val-every N (N >= 1) evaluates during training, not with --load; got {args.val_every}")
    if args.val_every:
        for name in names:
            if name not in WITH_VALIDATION:
                raise SystemExit(f"--val-every: {name} has no validation split ({' and '.join(WITH_VALIDATION)} have one)")
    if args.expand_test < 0:
        raise SystemExit(f"--expand-test must be >= 0, got {args.expand_test}")
    if args.node_count != "none" and args.expand_test:
        raise SystemExit("--node-count with --expand-test: the test graphs' own split tokens fix the sizes there; "
                         "drop one of the two")
    for name in names:
        if args.metric_sensitivity:
            metric_sensitivity(name, args)
        else:
            run(name, args)


if __name__ == "__main__":
    main()
