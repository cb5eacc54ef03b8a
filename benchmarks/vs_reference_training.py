"""msar's training step against the reference VAR code, same machine, same moment, same weights.

    python -m benchmarks.vs_reference_training --var-dir /path/to/FoundationVision/VAR [--quick]
                                               [--batch 4] [--thread-counts 1 2]

One step = forward (teacher forcing over all scales under the block-causal mask) + cross-entropy
over all ``B x L`` tokens + backward + ``torch.optim.AdamW``, for both:

* the reference: ``VAR.forward(label_B, x_BLCv_wo_first_l)`` (its own additive ``-inf`` mask,
  ``attn_bias_for_masking``);
* msar: ``NextScaleTransformer.forward(labels, x)`` (its bool block-causal mask).

Both models hold the same weights (the reference ``VAR`` with VAR's ``init_weights``, loaded into
msar through the image modality's strict converter, as in :mod:`benchmarks.vs_reference`), both
are in training mode (condition dropout 0.1 and stochastic depth as configured), and both see the
same batch: class labels, teacher-forcing input ``(B, L - 1, 32)`` and targets ``(B, L)``.
Before timing, one step from the same weights and the same dropout draws checks that the two
losses agree. Steps are interleaved (reference, msar, reference, ...) at every thread count of
``--thread-counts``; wall and process CPU time are recorded; tokens/s = ``B x L`` / median
seconds per step. Goal (issue 18): msar >= 1.2x the reference's tokens/s.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from . import common
from .sampling_throughput import CONFIGS
from .vs_reference import (_ref_commit, add_reference_args, build_pair, import_reference, interleaved_timings, speedup,
                           thread_counts)

NAME = "vs_reference_training"
GOAL = 1.2
ADAMW = dict(lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))


def make_batch(model, B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels ``(B,)``, teacher-forcing input ``(B, L - n_0, latent)`` and targets ``(B, L)`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, model.num_classes, (B,), generator=g)
    x = torch.randn(B, model.seq_len - model.first_len, model.latent_dim, generator=g)
    target = torch.randint(0, model.vocab_size, (B, model.seq_len), generator=g)
    return labels, x, target


def make_step(forward, params, labels, x, target):
    """One training step of ``forward(labels, x) -> (B, L, V)`` logits; returns a function -> loss."""
    opt = torch.optim.AdamW(params, **ADAMW)

    def step() -> float:
        logits = forward(labels, x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def first_losses(var, model, labels, x, target, seed: int) -> dict:
    """The loss of one forward of each model from the same weights and the same dropout draws."""
    out = {}
    for name, fwd in (("reference", var), ("msar", model)):
        torch.manual_seed(seed)
        with torch.no_grad():
            logits = fwd(labels, x)
        out[name] = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1)).item()
    return out


def run(args) -> dict:
    counts = thread_counts(args)
    common.setup_threads(counts[0])
    info = common.machine_info(torch.device("cpu"))
    ref = import_reference(args.var_dir)
    name = "small"
    B = args.batch or (2 if args.quick else 4)
    rounds = args.rounds or (2 if args.quick else 3)
    _, var, _, model = build_pair(name, ref, args.seed)
    var.train()
    model.train()
    labels, x, target = make_batch(model, B, args.seed)
    losses = first_losses(var, model, labels, x, target, args.seed)
    steps = {"reference": make_step(var, var.parameters(), labels, x, target),
             "msar": make_step(model, model.parameters(), labels, x, target)}
    timing = interleaved_timings(steps, counts, rounds, args)  # the warm-up allocates AdamW's state
    tokens = B * model.seq_len
    rows = []
    for t in counts:
        row_timing = {k: {**timing[t, k], "tokens_per_s_wall": tokens / timing[t, k]["median_wall_s"]} for k in steps}
        speed = speedup(timing[t, "reference"], timing[t, "msar"])
        rows.append({"config": name, "batch": B, "threads": t, "tokens_per_step": tokens, "timing": row_timing,
                     "speedup_vs_reference": speed, "goal": GOAL,
                     "goal_met": {m: bool(s >= GOAL) for m, s in speed.items()}})
        print(f"{name}, batch {B}, {t} thread(s): reference {row_timing['reference']['tokens_per_s_wall']:.0f} tok/s, "
              f"msar {row_timing['msar']['tokens_per_s_wall']:.0f} tok/s; speed-up (cpu / wall) "
              f"{speed['cpu']:.2f} / {speed['wall']:.2f} (goal {GOAL})", flush=True)
    payload = {
        "config": {"preset": "quick" if args.quick else "full", "model": CONFIGS[name], "batch": B,
                   "seq_len": model.seq_len, "rounds": rounds, "thread_counts": counts, "seed": args.seed,
                   "optimizer": f"AdamW({ADAMW}), foreach default", "loss": "cross-entropy over all B x L tokens",
                   "masks": {"reference": "additive float (1, 1, L, L), 0 / -inf", "msar": "bool (L, L)"},
                   "var_dir": os.path.abspath(args.var_dir), "reference_commit": _ref_commit(args.var_dir),
                   "weights": "random (reference init_weights), shared"},
        "figures": {"first_step_loss": losses, "rows": rows},
    }
    path = os.path.join(args.out or os.path.join(common.RESULTS, "vs_reference"), f"{NAME}.json")
    common.write_result_json(path, payload, info["started_at"])
    print("wrote", path)
    return {"path": path, **payload}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_reference_args(ap)
    ap.add_argument("--batch", type=int, default=0, help="batch size (default 4; 2 with --quick)")
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds (each runs one step of both)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse(argv))


if __name__ == "__main__":
    main()
