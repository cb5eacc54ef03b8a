"""How a triangulation model's samples grow, level by level, against the training hierarchies.

A sample's size is the sum of many levels' split counts, and nothing in one level's draws aims at the
data's final size.  This benchmark follows the size through the levels: per level the mean and spread of
the vertex count in the training hierarchies (the run's own orderings, as the model saw them) and in
the model's samples; the growth of a level as a function of the size it starts from (the data's and the
samples' factor at the same size tells a model that splits less per level from one that is only late);
the levels each graph grows in; and where the short samples stopped (how many of them the last level
did not grow: the model stops where every training graph is complete)::

    python -m benchmarks.graph_size_trajectory --load outputs/small_d2p7 \\
        --out benchmarks/results/graph/triangulation/partial/small/trajectory_d2p7.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import numpy as np

import msar
from benchmarks.common import write_result_json
from examples.graph_demo import augment
from modalities.graph.datasets import make_dataset
from modalities.graph.triangulation import SplitShapeTemperature, TriangulationTokenizer


def level_sizes(history: Sequence[Sequence]) -> np.ndarray:
    """``(B, K)`` vertex counts (the outer vertex not counted) of a decode history (levels x graphs)."""
    return np.array([[G.number_of_nodes() for G in lvl] for lvl in history]).T


def growth_by_size(sizes: np.ndarray, full: int, bin_width: int = 8) -> dict:
    """Mean growth factor ``n_{k+1} / n_k`` of the levels that grow, by the size ``n_k`` they start from
    (bins of ``bin_width`` vertices, below the full size): ``{bin start: [factor, levels]}``."""
    out: dict = {}
    for a, b in zip(sizes[:, :-1].ravel(), sizes[:, 1:].ravel()):
        if a < full and b > a:
            out.setdefault(int(a // bin_width * bin_width), []).append(b / a)
    return {k: [float(np.mean(v)), len(v)] for k, v in sorted(out.items())}


def summary(sizes: np.ndarray, full: int) -> dict:
    grows = np.diff(sizes, axis=1) > 0
    last_growth = [int(np.nonzero(g)[0][-1]) + 1 if g.any() else 0 for g in grows]
    short = sizes[:, -1] < full
    return {"graphs": len(sizes),
            "level_mean": sizes.mean(0).round(3).tolist(), "level_sd": sizes.std(0).round(3).tolist(),
            "final_nodes": {int(n): int(c) for n, c in zip(*np.unique(sizes[:, -1], return_counts=True))},
            "mean_final_nodes": float(sizes[:, -1].mean()),
            "last_growing_level": {int(n): int(c) for n, c in zip(*np.unique(last_growth, return_counts=True))},
            "short": int(short.sum()),
            "short_and_last_level_did_not_grow": int((short & ~grows[:, -1]).sum()),
            "growth_by_size": growth_by_size(sizes, full)}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="a graph demo run of a triangulation model (its planar/pipeline)")
    p.add_argument("--num", type=int, default=96, help="samples per sampler seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1000, 2000])
    p.add_argument("--slot-temperature", type=float, default=0.5,
                   help="SplitShapeTemperature(T, slot_only=True), the reported planar sampling; 1.0: the model as is")
    p.add_argument("--data-orderings", type=int, default=4,
                   help="orderings per training graph for the data's trajectories (the run's first ones)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.num < 1 or args.data_orderings < 1 or not args.slot_temperature > 0:
        raise SystemExit("--num and --data-orderings must be >= 1 and --slot-temperature > 0")
    pipe = msar.from_pretrained(os.path.join(args.load, "planar", "pipeline"))
    tok, model = pipe.tokenizer, pipe.transformer.eval()
    if not isinstance(tok, TriangulationTokenizer):
        raise SystemExit(f"--load: expected a run with --tokenizer triangulation, got {type(tok).__name__}")
    started = time.time()
    with open(os.path.join(args.load, "planar", "metrics.json")) as f:  # the data of the run that trained it
        run = json.load(f)
    train = make_dataset("planar", seed=run.get("seed", 0), **run.get("data_kw", {}))["train"]
    full = max(G.number_of_nodes() for G in train)
    perms = min(args.data_orderings, run["train_config"]["perms"])
    # augment() puts each graph's orderings side by side; its first `perms` are the run's first ones
    items = [G for i, G in enumerate(augment(train, run["train_config"]["perms"], run.get("seed", 0)))
             if i % run["train_config"]["perms"] < perms]
    data = level_sizes(tok.decode_progression(tok.encode(items)))
    samples, refused = [], 0
    hook = tok.valid_token_hook
    if args.slot_temperature != 1.0:
        hook = SplitShapeTemperature(args.slot_temperature, slot_only=True).then(hook)
    for seed in args.seeds:
        for i in range(0, args.num, 32):
            b = min(32, args.num - i)
            res = msar.sample(model, tok, batch_size=b, cfg=0.0, top_k=0, top_p=0.0, temperature=1.0,
                              seed=seed + i, logits_hook=hook)
            samples.append(level_sizes(res.state.history))
            refused += res.state.refused
    samples = np.concatenate(samples)
    out = {"load": args.load, "slot_temperature": args.slot_temperature, "full_size": full,
           "tokenizer": tok.config, "data": summary(data, full), "samples": summary(samples, full),
           "refused_per_sample": refused / len(samples)}
    write_result_json(args.out, out, started)
    d, s = out["data"], out["samples"]
    print("level  data mean (sd)   samples mean (sd)")
    for k in range(tok.K):
        print(f"{k:5d}  {d['level_mean'][k]:6.2f} ({d['level_sd'][k]:4.2f})   {s['level_mean'][k]:6.2f} ({s['level_sd'][k]:4.2f})")
    print("growth factor by size:", {k: (round(v[0], 3), round(s["growth_by_size"].get(k, [0])[0], 3))
                                     for k, v in d["growth_by_size"].items()})
    print(f"final nodes: data {d['mean_final_nodes']:.2f}, samples {s['mean_final_nodes']:.2f}; short samples "
          f"{s['short']} of {s['graphs']}, {s['short_and_last_level_did_not_grow']} of them not grown at the last level")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
