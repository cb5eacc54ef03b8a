"""Where a grid model's MMD comes from: the samples that are grids, the ones that are not, and the grid sizes.

A degree-histogram MMD mixes two effects: samples that are not grids (nodes of degree 5, too many of
degree 3) and the *mix of sizes* among the grids (a small grid has more boundary, so more nodes of
degree 2 and 3; a sampler that draws a few training sizes over and over has a degree MMD above the
train-vs-test baseline even when every sample is a grid).  For one ``examples.graph_demo`` run this
script splits the samples into grids and non-grids and reports, against the run's own evaluation split
(``eval_split`` in its ``metrics.json``; the test split only for a reported run, never for choosing)::

    grids / non-grids: count, mean node count, degree shares (0, 1, ..., >= 6), TV MMD^2 of each group alone
    grid sides drawn:  count per "a x b", how many distinct, the largest share of one size, how many of the
                       grid samples have a training size / a size of the evaluation split
    non-grids:         nodes of degree >= 5 per graph, how many have a grid's node and edge count, distinct ones
    references:        TV MMD^2 of the training grids drawn uniformly (as many as the samples; the size mix of a
                       perfect copy of the training set), and of the samples with every non-grid replaced by
                       such a draw (what the grids' own size mix leaves)

    python -m benchmarks.graph_grid_breakdown --samples outputs/grid_preset_raw_n200_T0.4/grid \\
        --out benchmarks/results/graph/preset/breakdown_T0.4.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time
from collections.abc import Sequence

import networkx as nx
import numpy as np

from benchmarks.common import write_result_json
from modalities.graph.datasets import make_dataset, read_graphs_json
from modalities.graph.metrics import IsoSet, degree_hist, graph_stats, grid_sides, mmd_all

MAX_DEGREE_BIN = 6  # degree shares 0..5 and ">= 6"


def degree_shares(graphs: Sequence[nx.Graph]) -> list[float] | None:
    """Share of all nodes of ``graphs`` with degree 0, 1, ..., ``MAX_DEGREE_BIN - 1``, ``>= MAX_DEGREE_BIN``."""
    if not graphs:
        return None
    h = np.zeros(MAX_DEGREE_BIN + 1)
    for G in graphs:
        d = degree_hist(G)
        h[:min(len(d), MAX_DEGREE_BIN)] += d[:MAX_DEGREE_BIN]
        h[MAX_DEGREE_BIN] += d[MAX_DEGREE_BIN:].sum()
    return [float(x) for x in h / h.sum()]


def _mmd(ref_stats: dict, graphs: Sequence[nx.Graph]) -> dict[str, float] | None:
    return mmd_all(ref_stats, graphs, kernels=("tv",)) if graphs else None


def _key(sides: tuple[int, int]) -> str:
    return f"{sides[0]}x{sides[1]}"


def breakdown(samples: Sequence[nx.Graph], train: Sequence[nx.Graph], ref: Sequence[nx.Graph],
              seed: int = 0) -> dict:
    """The report of the module docstring for ``samples`` against the reference set ``ref`` (the
    evaluation split), with ``train`` the training graphs (all grids)."""
    if not samples or not ref or not train:
        raise ValueError(f"breakdown needs samples, training and reference graphs, got {len(samples)}, "
                         f"{len(train)}, {len(ref)}")
    train_sides = [grid_sides(G) for G in train]
    if any(s is None for s in train_sides):
        raise ValueError("breakdown: every training graph must be a grid")
    ref_sides = {grid_sides(G) for G in ref}
    sides = [grid_sides(G) for G in samples]
    grids = [G for G, s in zip(samples, sides) if s is not None]
    non = [G for G, s in zip(samples, sides) if s is None]
    drawn = collections.Counter(s for s in sides if s is not None)
    grid_counts = {(2 * a * b - a - b, a * b) for a, b in set(train_sides) | ref_sides}
    st = graph_stats(ref)
    rng = np.random.default_rng(seed)
    uniform = [train[i] for i in rng.integers(0, len(train), len(samples))]
    replaced = grids + [train[i] for i in rng.integers(0, len(train), len(non))]

    def group(gs: Sequence[nx.Graph]) -> dict:
        return {"count": len(gs), "share": len(gs) / len(samples),
                "mean_nodes": float(np.mean([G.number_of_nodes() for G in gs])) if gs else None,
                "degree_shares": degree_shares(gs), "mmd": _mmd(st, gs)}

    return {
        "num_samples": len(samples),
        "grids": group(grids),
        "non_grids": group(non) | {
            "mean_degree_ge5_nodes": (float(np.mean([sum(1 for _, d in G.degree() if d >= 5) for G in non]))
                                      if non else None),
            "with_grid_node_and_edge_count": sum((G.number_of_edges(), G.number_of_nodes()) in grid_counts
                                                 for G in non),
            "distinct": len(IsoSet(non)),
        },
        "all": {"mmd": _mmd(st, samples), "mean_nodes": float(np.mean([G.number_of_nodes() for G in samples])),
                "degree_shares": degree_shares(samples)},
        "sides_drawn": {_key(s): c for s, c in drawn.most_common()},
        "distinct_sides": len(drawn),
        "largest_side_share": max(drawn.values()) / len(grids) if grids else None,
        "grids_with_train_sides": sum(c for s, c in drawn.items() if s in set(train_sides)),
        "grids_with_reference_sides": sum(c for s, c in drawn.items() if s in ref_sides),
        "reference": {"mean_nodes": float(np.mean([G.number_of_nodes() for G in ref])),
                      "degree_shares": degree_shares(ref), "train_vs_reference_mmd": _mmd(st, train),
                      "train_mean_nodes": float(np.mean([G.number_of_nodes() for G in train]))},
        "uniform_training_draw": {"mmd": _mmd(st, uniform), "mean_nodes": float(np.mean(
            [G.number_of_nodes() for G in uniform]))},
        "non_grids_replaced_by_training_draw": {"mmd": _mmd(st, replaced)},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", required=True, help="dataset folder of a graph_demo grid run (metrics.json, graphs.json)")
    p.add_argument("--out", required=True, help="JSON to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the uniform training draws")
    args = p.parse_args(argv)
    started = time.time()
    for name in ("metrics.json", "graphs.json"):
        if not os.path.exists(os.path.join(args.samples, name)):
            raise SystemExit(f"--samples {args.samples}: no {name} there (expected the <out>/grid folder of a "
                             "python -m examples.graph_demo --dataset grid run)")
    with open(os.path.join(args.samples, "metrics.json")) as f:
        m = json.load(f)
    if m.get("dataset") != "grid":
        raise SystemExit(f"--samples {args.samples}: a {m.get('dataset')!r} run; this breakdown is for grid runs")
    splits = make_dataset("grid", seed=m["seed"], **m.get("data_kw", {}))
    samples = read_graphs_json(os.path.join(args.samples, "graphs.json"))
    res = breakdown(samples, splits["train"], splits[m["eval_split"]], seed=args.seed)
    res |= {"samples": args.samples, "eval_split": m["eval_split"], "sampling": m.get("sampling"),
            "samples_run": m.get("run"), "trained_by": m.get("trained_by") or m.get("run")}
    write_result_json(args.out, res, started)
    g, ng = res["grids"], res["non_grids"]
    base = res["reference"]["train_vs_reference_mmd"]
    ratio = lambda mm: (f"{mm['degree_tv'] / base['degree_tv']:.2f}x" if mm and base["degree_tv"] > 0 else "-")
    print(f"{res['num_samples']} samples: {g['count']} grids ({res['distinct_sides']} sizes, largest share "
          f"{res['largest_side_share'] or 0:.0%}), {ng['count']} not")
    print(f"degree MMD vs train-vs-{m['eval_split']}: all {ratio(res['all']['mmd'])}, grids {ratio(g['mmd'])}, "
          f"non-grids {ratio(ng['mmd'])}, non-grids replaced {ratio(res['non_grids_replaced_by_training_draw']['mmd'])}, "
          f"uniform training draw {ratio(res['uniform_training_draw']['mmd'])}")


if __name__ == "__main__":
    main()
