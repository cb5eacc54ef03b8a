"""Where a triangulation model's samples lose their nodes and their degree histogram: the last level.

Each training graph's own hierarchy is kept up to its last split level, and only the chunks of that
level from chunk ``c`` on are sampled by the model (``msar.sample`` with known tokens).  Resampling
only the last chunk shows the model's per-vertex choices in the data's context; resampling more chunks
lets each chunk see the model's own earlier chunks.  Per setting it reports the node count, the degree
MMD² against fresh draws of the data generator, and per chunk of the last level the split, blocked
(allowed only ``NO_SPLIT``) and splittable vertices, of the data and of the samples; and once, the
teacher-forced expected split count per level against the data's::

    python -m benchmarks.graph_last_level --load outputs/tri \\
        --out benchmarks/results/graph/triangulation/node_count/last_level.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

import msar
from msar.tokenizer import candidate_features
from benchmarks.common import write_result_json
from benchmarks.graph_vs_generator import degrees_by_position
from modalities.graph.datasets import draw_graphs, graphs_from, make_dataset
from modalities.graph.metrics import degree_hist, mmd2
from modalities.graph.triangulation import SplitPlacementTemperature, SplitShapeTemperature, TriangulationTokenizer


def last_split_level(tok: TriangulationTokenizer, idx: Sequence[torch.Tensor]) -> list[int]:
    """Per graph of the batch, the level of its last split token."""
    is_split = [(t > 0) & (t != tok.pad_token) for t in idx]
    return [max(tok.kinds[s][0] for s, t in enumerate(is_split) if t[i].any()) for i in range(idx[0].shape[0])]


def chunk_counts(tok: TriangulationTokenizer, idx: Sequence[torch.Tensor], last: Sequence[int]) -> dict:
    """Per chunk of each graph's last split level, summed over the batch: splits, and the vertices the
    valid-token mask leaves only ``NO_SPLIT`` (blocked) or more (splittable) when the chunk is drawn."""
    C = tok.chunks
    out = {key: np.zeros(C) for key in ("splits", "blocked", "splittable")}
    st = tok.start(idx[0].shape[0])
    for s, (k, c) in enumerate(tok.kinds):
        ok = st.allowed(s)  # (B, n, V)
        real = ~ok[..., tok.pad_token]
        only_none = real & ok[..., 0] & (ok.sum(-1) == 1)
        split = (idx[s] > 0) & (idx[s] != tok.pad_token)
        for i, lvl in enumerate(last):
            if k == lvl:
                out["splits"][c] += int(split[i].sum())
                out["blocked"][c] += int(only_none[i].sum())
                out["splittable"][c] += int((real[i] & ~only_none[i]).sum())
        st.add_scale(s, idx[s])
    return out


def expected_splits(model, tok: TriangulationTokenizer, idx: Sequence[torch.Tensor], last: Sequence[int],
                    back: int = 4) -> list[dict]:
    """Teacher-forced: the model's summed split probability on levels ``last - r`` against the data's
    split count there (r = 0 .. back - 1), mean per graph; ``model_expected_valid`` after the valid-token
    mask (the probabilities the sampler draws from)."""
    # one pass of the decode state over the data's tokens gives the teacher input (the outputs of
    # add_scale, as tok.teacher_forcing_input) and what the valid-token hook leaves at each scale
    st = tok.start(idx[0].shape[0])
    allowed, pieces = [], []
    for s, t in enumerate(idx):
        allowed.append(st.allowed(s))
        pieces.append(st.add_scale(s, t))
    teacher_input = torch.cat([p for p in pieces if p is not None], 1)
    with torch.no_grad():
        logits = model(torch.zeros(idx[0].shape[0], dtype=torch.long), teacher_input,
                       candidates=candidate_features(tok, model.config.candidate_dim, teacher_input))
    x = torch.cat(list(idx), 1)
    real = x != tok.pad_token
    p_split = (1 - logits.softmax(-1)[..., 0]) * real
    p_valid = logits.masked_fill(~torch.cat(allowed, 1), float("-inf")).softmax(-1)
    p_valid = (1 - p_valid[..., 0] - p_valid[..., tok.pad_token]) * real
    level = torch.cat([torch.full((t.shape[1],), k) for t, (k, _) in zip(idx, tok.kinds)])
    rows = []
    for r in range(back):
        sel = torch.stack([level == lvl - r for lvl in last])
        rows.append({"levels_before_last": r, "data_splits": float(((x > 0) & real & sel).sum(1).float().mean()),
                     "model_expected": float((p_split * sel).sum(1).mean()),
                     "model_expected_valid": float((p_valid * sel).sum(1).mean())})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="a graph demo run of a triangulation model (its planar/pipeline)")
    p.add_argument("--from-chunks", type=int, nargs="+", default=None,
                   help="resample the last level from these chunks on (default: the last chunk, 3, 6, all; "
                        "the chunk count itself resamples nothing, which reproduces the data)")
    p.add_argument("--slot-temperatures", type=float, nargs="+", default=[1.0, 0.5],
                   help="1.0: the model as is; T < 1: SplitShapeTemperature(T, slot_only=True)")
    p.add_argument("--placement-temperatures", type=float, nargs="+", default=[1.0],
                   help="1.0: the model's split placement; P != 1: SplitPlacementTemperature(P) after the slot temperature")
    p.add_argument("--reference", type=int, default=1000, help="fresh graphs for the degree MMD²")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    pipe = msar.from_pretrained(os.path.join(args.load, "planar", "pipeline"))
    tok, model = pipe.tokenizer, pipe.transformer.eval()
    if not isinstance(tok, TriangulationTokenizer):
        raise SystemExit(f"--load: expected a run with --tokenizer triangulation, got {type(tok).__name__}")
    C = tok.chunks
    starts = args.from_chunks or [C - 1, C - 3, C - 6, 0]
    if any(not 0 <= c <= C for c in starts):
        raise SystemExit(f"--from-chunks must lie in 0..{C}, got {starts}")
    started = time.time()
    with open(os.path.join(args.load, "planar", "metrics.json")) as f:  # the data of the run that trained it
        run = json.load(f)
    train = make_dataset("planar", seed=run.get("seed", 0), **run.get("data_kw", {}))["train"]
    ref = [degree_hist(G) for G in draw_graphs("planar", 50_000, num=args.reference)]
    degree = lambda gs: mmd2(ref, [degree_hist(G) for G in gs], "tv", 1.0)  # noqa: E731
    full_size = max(G.number_of_nodes() for G in train)
    known = tok.encode(train)
    batches = [[t[b:b + 32] for t in known] for b in range(0, len(train), 32)]
    lasts = [last_split_level(tok, kn) for kn in batches]
    data = {key: np.zeros(C) for key in ("splits", "blocked", "splittable")}
    for kn, last in zip(batches, lasts):
        for key, v in chunk_counts(tok, kn, last).items():
            data[key] += v / len(train)
    rows = []
    for T, P in [(T, P) for T in args.slot_temperatures for P in args.placement_temperatures]:
        hook = tok.valid_token_hook if T == 1.0 else SplitShapeTemperature(T, slot_only=True).then(tok.valid_token_hook)
        if P != 1.0:
            hook = SplitPlacementTemperature(P).then(hook)
        for c0 in starts:
            graphs, counts, refused = [], {key: np.zeros(C) for key in data}, 0
            for b, (kn, last) in enumerate(zip(batches, lasts)):
                mask = [torch.stack([torch.full((t.shape[1],), tok.kinds[s][0] < lvl
                                                or (tok.kinds[s][0] == lvl and tok.kinds[s][1] < c0), dtype=torch.bool)
                                     for lvl in last]) for s, t in enumerate(kn)]
                res = msar.sample(model, tok, batch_size=kn[0].shape[0], cfg=0.0, top_k=0, top_p=0.0,
                                  temperature=1.0, seed=args.seed + 7 + 32 * b, logits_hook=hook, known=kn,
                                  known_mask=mask)
                graphs += graphs_from(res.data)
                refused += res.state.refused
                for key, v in chunk_counts(tok, res.indices, last).items():
                    counts[key] += v / len(train)
            rows.append({"slot_temperature": T, "placement_temperature": P, "from_chunk": c0,
                         "mean_nodes": float(np.mean([G.number_of_nodes() for G in graphs])),
                         "nodes": {int(n): int(c) for n, c in zip(*np.unique([G.number_of_nodes() for G in graphs],
                                                                             return_counts=True))},
                         "refused_per_graph": refused / len(graphs),
                         # the samples that reached the largest training size: is the degree gap only the size?
                         "degree_mmd_full_size": degree(full) if (full := [G for G in graphs
                                                                            if G.number_of_nodes() == full_size]) else None,
                         "degree_mmd": degree(graphs), "degrees": degrees_by_position(graphs),
                         **{f"sampled_{k}": v.tolist() for k, v in counts.items()}})
            where = rows[-1]["degrees"]
            print(f"slot T {T}, placement {P}: last level from chunk {c0:>2}: {rows[-1]['mean_nodes']:.2f} nodes, degree MMD² "
                  f"{rows[-1]['degree_mmd']:.2e}, splits {counts['splits'].sum():.2f} (data {data['splits'].sum():.2f}), "
                  f"outer cycle {where['boundary_length']:.2f} at degree {where['boundary']['mean']:.2f}", flush=True)
    calib = [r for kn, last in zip(batches, lasts) for r in expected_splits(model, tok, kn, last)]
    calibration = [{"levels_before_last": r, **{key: float(np.mean([c[key] for c in calib if c["levels_before_last"] == r]))
                                                 for key in ("data_splits", "model_expected", "model_expected_valid")}}
                   for r in range(4)]
    write_result_json(args.out, {"load": args.load, "graphs": len(train), "reference": args.reference,
                                 "training_graphs_degree_mmd": degree(train),
                                 "training_graphs_degrees": degrees_by_position(train),
                                 "data": {k: v.tolist() for k, v in data.items()}, "rows": rows,
                                 "teacher_forced_calibration": calibration}, started)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
