"""How far planar samples are from the data distribution itself, not from one small split.

The demo's ratios compare samples with 32 validation or 40 test graphs, and a ratio over one
train-vs-split number is noisy (``benchmarks.graph_reference_floor``).  The planar data set has a
generator (64 uniform points, Delaunay), so the distribution can be drawn as often as wanted.  This
scores sample sets (the ``graphs.json`` of demo runs) against a large fresh draw of the generator, and
beside them fresh draws of the same number of graphs (what a perfect model scores at that sample size)
and of fewer points (a perfect model that falls short of 64 nodes)::

    MMD² (TV kernels, as the demo) of each set against --reference fresh 64-point graphs
    --by-size: also each node count's subset of a set against fresh graphs of that node count
    every set: the degrees of the outer cycle's vertices and of the inner ones apart (mean, sd), and the
    outer cycle's length: a histogram that is off can be off on the boundary, inside, or both

    python -m benchmarks.graph_vs_generator --samples slot0.5=RUN_s0/planar/graphs.json,RUN_s1000/planar/graphs.json \\
        --out benchmarks/results/graph/triangulation/node_count/vs_generator.json

The reference and the perfect-model draws use seeds far from the data set's and the floor script's.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from benchmarks.common import write_result_json
from modalities.graph.datasets import draw_graphs, read_graphs_json
from modalities.graph.metrics import graph_stats, mmd_all
from modalities.graph.triangulation import boundary_vertices

STATS = ("degree_tv", "clustering_tv", "orbit_tv", "spectral_tv")
SEED_REF, SEED_PERFECT = 50_000, 60_000  # the floor script's fresh draws start at 10_000


def degrees_by_position(graphs: list) -> dict:
    """Degree mean and sd over the vertices of the graphs' outer cycles (``boundary``) and over the
    others (``inner``), and the mean outer-cycle length.  In a triangulated disc of ``n`` vertices and an
    outer cycle of ``b`` the edge count is ``3n - 3 - b``: the node count and the cycle fix the mean degree,
    and these say whether the rest of a histogram's error sits on the cycle or inside."""
    outer, inner, length = [], [], []
    for G in graphs:
        ring = set(boundary_vertices(G))
        length.append(len(ring))
        for v, d in G.degree():
            (outer if v in ring else inner).append(d)
    stat = lambda x: {"mean": float(np.mean(x)), "sd": float(np.std(x))} if x else None  # noqa: E731
    return {"boundary": stat(outer), "inner": stat(inner), "boundary_length": float(np.mean(length))}


def score(ref: dict, graphs: list) -> dict:
    """MMD² of ``graphs`` against the reference statistics, with the set's size, node count and degrees
    by position (:func:`degrees_by_position`)."""
    m = mmd_all(ref, graphs, kernels=("tv",))
    return {"num": len(graphs), "mean_nodes": float(np.mean([G.number_of_nodes() for G in graphs])),
            **{k: m[k] for k in STATS}, "degrees": degrees_by_position(graphs)}


def parse_samples(specs: Sequence[str]) -> dict[str, list[str]]:
    """``NAME=PATH[,PATH...]`` -> ``{NAME: [PATH, ...]}`` (the files' graphs are pooled into one set)."""
    out = {}
    for spec in specs:
        name, sep, paths = spec.partition("=")
        if not sep or not name or not paths:
            raise SystemExit(f"--samples takes NAME=PATH[,PATH...], got {spec!r}")
        out[name] = paths.split(",")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", nargs="+", required=True, metavar="NAME=PATH[,PATH...]",
                   help="sample sets: graphs.json files of demo runs, pooled per name")
    p.add_argument("--reference", type=int, default=1000, help="fresh 64-point graphs to score against")
    p.add_argument("--short", type=int, nargs="*", default=[62], help="perfect models with these fewer points")
    p.add_argument("--by-size", action="store_true",
                   help="also score each node count's subset (>= --min-subset graphs) against fresh draws of "
                        "that count, beside a perfect model's set of the same size")
    p.add_argument("--min-subset", type=int, default=30)
    p.add_argument("--out", required=True, help="JSON to write")
    args = p.parse_args(argv)
    sets = parse_samples(args.samples)
    if args.reference < 10:
        raise SystemExit(f"--reference needs at least 10 graphs, got {args.reference}")
    graphs = {name: [G for path in paths for G in read_graphs_json(path)] for name, paths in sets.items()}
    started = time.time()
    ref = graph_stats(draw_graphs("planar", SEED_REF, num=args.reference))
    rows = []
    for i, (name, gs) in enumerate(graphs.items()):
        rows.append({"set": name, "files": sets[name], **score(ref, gs)})
        rows.append({"set": f"perfect, {len(gs)} graphs", **score(ref, draw_graphs("planar", SEED_PERFECT + i,
                                                                                        num=len(gs)))})
        for j, n in enumerate(args.short):
            rows.append({"set": f"perfect {n} points, {len(gs)} graphs",
                         **score(ref, draw_graphs("planar", SEED_PERFECT + 100 * (j + 1) + i, num=len(gs), n=n))})
    by_size = []
    if args.by_size:
        for name, gs in graphs.items():
            counts = np.bincount([G.number_of_nodes() for G in gs])
            for n in np.flatnonzero(counts >= args.min_subset)[::-1]:
                n = int(n)
                sub = [G for G in gs if G.number_of_nodes() == n]
                ref_n = ref if n == 64 else graph_stats(draw_graphs("planar", SEED_REF + n, num=args.reference, n=n))
                by_size.append({"set": name, "nodes": n, "model": score(ref_n, sub),
                                "perfect": score(ref_n, draw_graphs("planar", SEED_PERFECT + 1000 + n, num=len(sub),
                                                                    n=n))})
    for r in rows:
        d = r["degrees"]
        where = "  ".join(f"{k} {d[k]['mean']:.2f} (sd {d[k]['sd']:.2f})" for k in ("boundary", "inner") if d[k])
        print(f"{r['set']:>40s} ({r['num']:>4d} graphs, {r['mean_nodes']:.1f} nodes): "
              + "  ".join(f"{k.split('_')[0]} {r[k]:.2e}" for k in STATS)
              + f"  degree {where}, boundary length {d['boundary_length']:.2f}")
    for r in by_size:
        print(f"{r['set']:>30s}, {r['nodes']} nodes ({r['model']['num']} graphs): degree {r['model']['degree_tv']:.2e} "
              f"(perfect {r['perfect']['degree_tv']:.2e}), clustering {r['model']['clustering_tv']:.2e} "
              f"(perfect {r['perfect']['clustering_tv']:.2e})")
    write_result_json(args.out, {"dataset": "planar", "reference": args.reference, "rows": rows, "by_size": by_size},
                      started)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
