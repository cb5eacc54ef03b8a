"""How predictable are a grid hierarchy's edge masks from the coarse levels?  A no-training proxy.

For every edge ``(u, v)`` of level ``k`` of a grid's hierarchy (tree order, ``u < v``) the tokenizer
writes a 4-bit mask (bit ``2 i + j``: child ``i`` of ``u`` joined to child ``j`` of ``v``).  A model can
only get a mask right if it is a function of what it sees.  This script fits a lookup
``key -> most common mask`` (and per bit, the most common bit) on the training grids and scores it on
the test grids, with two keys:

* ``direction``: ``(level, how the edge runs against u's split, against v's split)``, each ``along``
  (the two children of the endpoint lie in the edge's lattice direction), ``across`` or ``single``
  (one child), from the grid coordinates of the clusters' centroids;
* ``coarse``: ``(level, siblings, edges joining the two parents' children (1, >= 2), split token of u,
  split token of v)``: only what the coarse levels say, no coordinates.

Scores: share of masks right, share of mask bits right, and share of grids whose finest-level masks
are all right (a grid needs every one), per level (counted from the top, as the tokenizer's scales)
and split into grids whose sides are both powers of two and the others.

Next to the lookup, two measures of how regular the levels are (key ``regularity``, per level and over
all levels, on the test grids and on all 100): the share of clusters that are rectangles of the
lattice (a block of finest nodes; an L-shaped cluster is not), and the share of lattice edges between
two clusters that run *backwards*: from the cluster later in tree order to the earlier one, going away
from the corner where the tree order starts.  Along such an edge the tree order runs against the
lattice, so the masks there are the "other" one at every level below.  Also the share of grids with no
backwards edge at any level.

    python -m benchmarks.graph_mask_proxy --matching aligned --out benchmarks/results/graph/order/proxy_aligned.json

``--samples DIR`` instead scores a model: ``DIR`` is the dataset folder of an
``examples.graph_demo --expand-test 1 --load ...`` run (``metrics.json`` and ``graphs.json``), whose samples
keep every token of the real graphs but the finest level's edge masks; it reports the share of those
masks the model drew right, per direction, and the share of graphs with all of them right.

    python -m benchmarks.graph_mask_proxy --samples outputs/order/train_grid_order_x1_T0.2/grid --out ...
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time

import networkx as nx
import numpy as np

from benchmarks.common import write_result_json
from modalities.graph.coarsen import MATCHINGS, Level, assignments, coarsen, num_levels_for
from modalities.graph.datasets import make_dataset

SPLIT_TOKEN = ("single", "pair", "pair_edge")


def grid_coordinates(G: nx.Graph) -> np.ndarray:
    """``(N, 2)`` lattice coordinates of the nodes of a 2-D grid graph (up to the grid's symmetries)."""
    corners = [u for u in G if G.degree(u) == 2]
    if len(corners) != 4:
        raise ValueError(f"not a 2-D grid with both sides >= 2: {len(corners)} nodes of degree 2")
    c0 = corners[0]
    d0 = nx.single_source_shortest_path_length(G, c0)
    c1 = min(corners[1:], key=lambda c: d0[c])  # a corner on a side through c0: (side - 1, 0)
    d1 = nx.single_source_shortest_path_length(G, c1)
    s = d0[c1]
    return np.array([((d0[u] - d1[u] + s) / 2, (d0[u] + d1[u] - s) / 2) for u in range(G.number_of_nodes())])


def _axis(d: np.ndarray) -> str:
    return "x" if abs(d[0]) > abs(d[1]) else "y" if abs(d[1]) > abs(d[0]) else "diagonal"


def edge_records(G: nx.Graph, levels: list[Level]) -> list[dict]:
    """One record per edge of every level with a finer level below it: its level, both keys, its mask."""
    G = nx.convert_node_labels_to_integers(G)
    finest = levels[-1]
    # tree order of the finest level -> G's labels (the finest level is G up to that relabelling)
    iso = nx.vf2pp_isomorphism(nx.Graph(finest.edges), G) if finest.edges else {0: 0}
    xy = grid_coordinates(G)[[iso[i] for i in range(finest.n)]]
    maps = assignments(levels)
    cent = [np.stack([xy[m == c].mean(0) for c in range(lvl.n)]) for m, lvl in zip(maps, levels)]
    out = []
    for k in range(1, len(levels) - 1):
        above, coarse, fine = levels[k - 1], levels[k], levels[k + 1]
        parent = {c: p for p, cs in enumerate(above.children) for c in cs}
        joined = set(fine.edges)
        split = [0 if len(cs) == 1 else 2 if (min(cs), max(cs)) in joined else 1 for cs in coarse.children]
        between = collections.Counter(tuple(sorted((parent[a], parent[b]))) for a, b in coarse.edges
                                      if parent[a] != parent[b])

        def against(x: int, axis: str) -> str:
            cs = coarse.children[x]
            if len(cs) == 1:
                return "single"
            return "along" if _axis(cent[k + 1][cs[1]] - cent[k + 1][cs[0]]) == axis else "across"

        for u, v in coarse.edges:
            mask = sum(1 << (2 * i + j) for i, a in enumerate(coarse.children[u])
                       for j, b in enumerate(coarse.children[v]) if (min(a, b), max(a, b)) in joined)
            axis = _axis(cent[k][v] - cent[k][u])
            sib = parent[u] == parent[v]
            links = 0 if sib else min(between[tuple(sorted((parent[u], parent[v])))], 2)
            out.append(dict(level=k, mask=mask,
                            direction=(k, against(u, axis), against(v, axis)),
                            coarse=(k, sib, links, SPLIT_TOKEN[split[u]], SPLIT_TOKEN[split[v]])))
    return out


def regularity_records(G: nx.Graph, levels: list[Level]) -> list[dict]:
    """Per level with at least two nodes: its clusters, how many are rectangles of the lattice, the lattice
    edges between two of its clusters and how many of them run backwards (see the module docstring)."""
    G = nx.convert_node_labels_to_integers(G)
    finest = levels[-1]
    iso = nx.vf2pp_isomorphism(nx.Graph(finest.edges), G)
    xy = grid_coordinates(G)[[iso[i] for i in range(finest.n)]].astype(int)
    corners = xy[[G.degree(iso[i]) == 2 for i in range(finest.n)]]
    start = corners[np.abs(corners - xy[0]).sum(1).argmin()]  # the corner where the tree order starts
    pos = np.abs(xy - start)
    at = {tuple(p): i for i, p in enumerate(pos)}
    steps = [(at[tuple(p)], at[(p[0] + dx, p[1] + dy)]) for p in pos for dx, dy in ((1, 0), (0, 1))
             if (p[0] + dx, p[1] + dy) in at]  # (nearer, farther) finest nodes of every lattice edge
    out = []
    for k, (m, lvl) in enumerate(zip(assignments(levels), levels)):
        if lvl.n < 2:
            continue
        rect = 0
        for c in range(lvl.n):
            p = pos[m == c]
            rect += int(np.prod(p.max(0) - p.min(0) + 1)) == len(p)
        crossing = [(m[a], m[b]) for a, b in steps if m[a] != m[b]]
        out.append({"level": k, "clusters": lvl.n, "rectangles": rect, "crossing": len(crossing),
                    "backwards": sum(a > b for a, b in crossing)})
    return out


def regularity(records: list[list[dict]], K: int) -> dict:
    """Aggregate of :func:`regularity_records` over grids: per level and over all levels."""
    def agg(rs: list[dict]) -> dict:
        clusters, crossing = sum(r["clusters"] for r in rs), sum(r["crossing"] for r in rs)
        return {"clusters": clusters, "rectangles": sum(r["rectangles"] for r in rs) / clusters if clusters else None,
                "crossing": crossing, "backwards": sum(r["backwards"] for r in rs) / crossing if crossing else None}
    flat = [r for rs in records for r in rs]
    return {"grids": len(records), "overall": agg(flat),
            "per_level": {str(k): agg([r for r in flat if r["level"] == k]) for k in range(1, K)},
            "grids_without_backwards_edges": float(np.mean([not any(r["backwards"] for r in rs) for rs in records]))}


def fit_lookup(records: list[dict], key: str) -> tuple[dict, dict]:
    """``key -> most common mask`` and ``key -> most common value of each of the 4 bits``."""
    masks: dict = collections.defaultdict(collections.Counter)
    for r in records:
        masks[r[key]][r["mask"]] += 1
    modal = {k: c.most_common(1)[0][0] for k, c in masks.items()}
    bits = {}
    for k, c in masks.items():
        total = sum(c.values())
        bits[k] = sum(1 << b for b in range(4) if sum(n for m, n in c.items() if m >> b & 1) * 2 > total)
    return modal, bits


def score(records: list[dict], modal: dict, bits: dict, key: str) -> dict:
    """Share of masks and of mask bits the lookup gets right (an unseen key gets the mask 0: all wrong)."""
    if not records:
        return {"masks": None, "mask_right": None, "bit_right": None}
    mask_right = [modal.get(r[key], 0) == r["mask"] for r in records]
    bit_right = [4 - bin(bits.get(r[key], 0) ^ r["mask"]).count("1") for r in records]
    return {"masks": len(records), "mask_right": float(np.mean(mask_right)), "bit_right": float(np.sum(bit_right) / (4 * len(records)))}


def _pow2(n: int) -> bool:
    return n & (n - 1) == 0


def score_samples(folder: str) -> dict:
    """Finest-level masks of ``--expand-test 1`` samples against those of the graphs they expand."""
    with open(os.path.join(folder, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(folder, "graphs.json")) as f:
        samples = json.load(f)["graphs"]
    if metrics.get("dataset") != "grid" or metrics["sampling"].get("expand_test") != 1:
        raise SystemExit(f"--samples: expected a grid run with --expand-test 1 in {folder}, got dataset "
                         f"{metrics.get('dataset')!r}, expand_test {metrics['sampling'].get('expand_test')!r}")
    graphs = make_dataset("grid", seed=metrics["seed"], **metrics["data_kw"])[metrics["eval_split"]]
    tok = metrics["tokenizer"]
    K = len(tok["max_nodes"])
    right: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    all_right = []
    for i, g in enumerate(samples):  # sample i expands graph i of the split
        levels = coarsen(graphs[i], K, tok["matching"])
        coarse = levels[K - 2]
        if g["n"] != levels[-1].n:
            raise SystemExit(f"--samples: sample {i} has {g['n']} nodes, its graph {levels[-1].n}: not an --expand-test 1 run")
        drawn = {(min(u, v), max(u, v)) for u, v in g["edges"]}
        records = [r for r in edge_records(graphs[i], levels) if r["level"] == K - 2]  # in coarse.edges order
        ok = True
        for r, (u, v) in zip(records, coarse.edges):
            mask = sum(1 << (2 * a + b) for a, x in enumerate(coarse.children[u])
                       for b, y in enumerate(coarse.children[v]) if (min(x, y), max(x, y)) in drawn)
            key = "/".join(r["direction"][1:])
            total[key] += 1
            right[key] += mask == r["mask"]
            ok &= mask == r["mask"]
        all_right.append(ok)
    out = {"samples_from": metrics["run"]["command"], "model_commit": metrics["run"]["commit"],
           "temperature": metrics["sampling"]["temperature"], "graphs": len(samples),
           "finest_masks": sum(total.values()), "finest_mask_right": sum(right.values()) / sum(total.values()),
           "per_direction": {k: {"masks": total[k], "right": right[k] / total[k]} for k in sorted(total)},
           "graphs_with_all_finest_masks_right": float(np.mean(all_right))}
    print(f"{folder}: finest masks right {out['finest_mask_right']:.3f} ("
          + ", ".join(f"{k} {v['right']:.3f} of {v['masks']}" for k, v in out["per_direction"].items())
          + f"), graphs with all right {out['graphs_with_all_finest_masks_right']:.3f}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--matching", default="aligned", choices=MATCHINGS)
    p.add_argument("--seed", type=int, default=0, help="dataset seed (the demo's split)")
    p.add_argument("--samples", default=None, metavar="DIR",
                   help="score the finest masks of an `examples.graph_demo --expand-test 1` run (its dataset folder)")
    p.add_argument("--out", default=None, help="result JSON path (default: print only)")
    args = p.parse_args(argv)
    started = time.time()
    if args.samples:
        result = score_samples(args.samples)
        if args.out:
            write_result_json(args.out, result, started)
            print("wrote", args.out)
        return
    data = make_dataset("grid", seed=args.seed)
    K = num_levels_for(max(G.number_of_nodes() for s in data.values() for G in s))
    recs: dict[str, list[list[dict]]] = {}
    regs: dict[str, list[list[dict]]] = {}
    shapes: dict[str, list[tuple[int, int]]] = {}
    for split in ("train", "test"):
        recs[split], regs[split], shapes[split] = [], [], []
        for G in data[split]:
            xy = grid_coordinates(G)
            shapes[split].append(tuple(int(s) + 1 for s in xy.max(0)))
            levels = coarsen(G, K, args.matching)
            recs[split].append(edge_records(G, levels))
            regs[split].append(regularity_records(G, levels))
    train = [r for rs in recs["train"] for r in rs]
    result: dict = {"matching": args.matching, "num_levels": K,
                    "test_shapes": [list(s) for s in shapes["test"]], "keys": {}}
    pool = {"test": recs["test"], "train+test": recs["train"] + recs["test"]}
    pool_shapes = {"test": shapes["test"], "train+test": shapes["train"] + shapes["test"]}
    for key in ("direction", "coarse"):
        modal, bits = fit_lookup(train, key)
        entry: dict = {"lookup_size": len(modal)}
        # "test": the lookup's score on unseen grids; "train+test" (in-sample for the training grids) only to
        # split by side lengths, since the test split has no grid whose sides are both powers of two
        for where, name, keep in (("test", "all", lambda s: True),
                                  ("train+test", "pow2", lambda s: _pow2(s[0]) and _pow2(s[1])),
                                  ("train+test", "other", lambda s: not (_pow2(s[0]) and _pow2(s[1])))):
            idx = [i for i, s in enumerate(pool_shapes[where]) if keep(s)]
            test = [r for i in idx for r in pool[where][i]]
            per_level = {str(k): score([r for r in test if r["level"] == k], modal, bits, key) for k in range(1, K - 1)}
            finest_all = [all(modal.get(r[key], 0) == r["mask"] for r in pool[where][i] if r["level"] == K - 2)
                          for i in idx]
            entry[name if where == "test" else f"{where}/{name}"] = {
                "grids": len(idx), "overall": score(test, modal, bits, key), "per_level": per_level,
                "grids_with_all_finest_masks_right": float(np.mean(finest_all)) if idx else None}
        result["keys"][key] = entry
        o = entry["all"]
        print(f"{args.matching} key={key}, test grids: masks right {o['overall']['mask_right']:.3f}, bits right "
              f"{o['overall']['bit_right']:.3f}, grids with all finest masks right {o['grids_with_all_finest_masks_right']:.2f}")
        for k, s in o["per_level"].items():
            if s["masks"]:
                print(f"  level {k}: {s['masks']:5d} masks, right {s['mask_right']:.3f}, bits {s['bit_right']:.3f}")
        for name in ("pow2", "other"):
            e = entry[f"train+test/{name}"]
            print(f"  train+test, {name}: {e['grids']} grids, masks right {e['overall']['mask_right']:.3f}, "
                  f"bits {e['overall']['bit_right']:.3f}, all finest right {e['grids_with_all_finest_masks_right']:.2f}")
    result["regularity"] = {"test": regularity(regs["test"], K), "train+test": regularity(regs["train"] + regs["test"], K)}
    for where, r in result["regularity"].items():
        print(f"{args.matching} regularity, {where} ({r['grids']} grids): clusters that are rectangles "
              f"{r['overall']['rectangles']:.3f}, lattice edges between clusters running backwards "
              f"{r['overall']['backwards']:.3f}, grids without any {r['grids_without_backwards_edges']:.2f}")
        print("  per level (rectangles / backwards): " + ", ".join(
            f"{k}: {v['rectangles']:.2f} / {v['backwards']:.3f}" for k, v in r["per_level"].items() if v["clusters"]))
    if args.out:
        write_result_json(args.out, result, started)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
