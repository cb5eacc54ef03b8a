"""What a perfect graph model scores: fresh draws of the data generator, evaluated as samples are.

The graph demo reports MMD² of its samples against the evaluation split as a ratio over the
train-vs-split MMD² ("within 2x the baseline").  That ratio is noisy: the baseline is one number from
one split, and a model's figure also carries the noise of its own few samples.  This script draws
fresh graphs from the dataset's own generator (``modalities.graph.datasets.draw_graphs``, seeds apart
from the data set's) -- samples of the true distribution -- and scores them exactly like a model's
samples, several times::

    ratio per statistic (degree, clustering, orbit, spectrum; TV kernel) of
        MMD²(evaluation split, fresh draws) / MMD²(training split, evaluation split)
    for each number of samples (--num) and, for planar, each node count (--nodes): mean, min, max over --sets

A figure a perfect model reaches only half the time is no goal for a model; a smaller node count
(planar: 62 points instead of 64) shows what a model that falls short by that much scores at best.

    python -m benchmarks.graph_reference_floor --dataset planar \\
        --out benchmarks/results/graph/floor/planar_floor.json
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from benchmarks.common import write_result_json
from modalities.graph.datasets import DATASETS, draw_graphs, make_dataset
from modalities.graph.metrics import graph_stats, mmd_all

STATS = ("degree_tv", "clustering_tv", "orbit_tv", "spectral_tv")
SEED0 = 10_000  # fresh draws use seeds SEED0 + i, far from the data set's (0 by default)


def floor(dataset: str, ref: dict, base: dict, split: str, num: int, sets: int, nodes: int | None = None) -> dict:
    """Ratios of ``sets`` fresh draws of ``num`` graphs (``nodes`` points each, planar only) against the
    split ``split`` (its :func:`graph_stats` ``ref``), over the train-vs-split MMD² ``base``."""
    kw = {"num": num} | ({"n": nodes} if nodes is not None else {})
    ratios = []
    for i in range(sets):
        m = mmd_all(ref, draw_graphs(dataset, SEED0 + 1000 * (nodes or 0) + i, **kw), kernels=("tv",))
        ratios.append({k: m[k] / base[k] if base[k] > 0 else None for k in STATS})
    out = {"split": split, "num_samples": num, "nodes": nodes, "sets": sets,
           "baseline_mmd": {k: base[k] for k in STATS}, "per_set": ratios}
    for k in STATS:
        r = [x[k] for x in ratios if x[k] is not None]
        out[k] = {"mean": float(np.mean(r)), "min": float(np.min(r)), "max": float(np.max(r)),
                  "share_within_2x": float(np.mean([x <= 2 for x in r]))} if r else None
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="planar", choices=[d for d in DATASETS if d != "grid"],
                   help="grid is left out: its generator makes the same 100 grids every time")
    p.add_argument("--num", type=int, nargs="+", default=[40, 200], help="fresh graphs per set (the demo: 40)")
    p.add_argument("--nodes", type=int, nargs="+", default=None,
                   help="planar only: points per graph (default 64, 62, 60)")
    p.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test"])
    p.add_argument("--sets", type=int, default=8, help="independent sets per setting")
    p.add_argument("--seed", type=int, default=0, help="the data set's seed (the demo's --seed)")
    p.add_argument("--out", required=True, help="JSON to write")
    args = p.parse_args(argv)
    if args.nodes is not None and args.dataset != "planar":
        raise SystemExit(f"--nodes is for planar (points per Delaunay graph); {args.dataset}'s generator has no node count")
    if min(args.num) < 1 or args.sets < 1:
        raise SystemExit(f"--num and --sets must be >= 1, got {args.num} and {args.sets}")
    nodes = (args.nodes or [64, 62, 60]) if args.dataset == "planar" else [None]
    started = time.time()
    splits = make_dataset(args.dataset, seed=args.seed)
    wanted = [s for s in args.splits if splits[s]]
    if not wanted:
        raise SystemExit(f"{args.dataset} has none of the splits {args.splits}")
    rows = []
    train = graph_stats(splits["train"])  # once: the orbit counts are the slow part
    for split in wanted:
        ref = graph_stats(splits[split])
        base = mmd_all(train, ref, kernels=("tv",))
        for n in nodes:
            for num in args.num:
                r = floor(args.dataset, ref, base, split, num, args.sets, n)
                rows.append(r)
                print(f"{split:>4} nodes {n or '-':>3} num {num:>4}: " + "  ".join(
                    f"{k.split('_')[0]} {r[k]['mean']:.2f} ({r[k]['min']:.2f}-{r[k]['max']:.2f})"
                    for k in STATS if r[k]), flush=True)
    write_result_json(args.out, {"dataset": args.dataset, "seed": args.seed, "rows": rows}, started)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
