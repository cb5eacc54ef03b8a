"""3-D voxel demo: train a voxel pyramid tokenizer and a class-conditional next-scale
transformer on procedural shapes, then generate, complete half shapes and measure.

    python -m examples.voxel_demo                 # full run (CPU, ~30-40 min on one heavily shared core)
    python -m examples.voxel_demo --quick         # ~2-4 minute smoke run
    python -m examples.voxel_demo --res 32 --latent 8 --vocab 512   # bigger grids (slower)

Writes to ``--out`` (default ``outputs/voxel_demo``): ``metrics.json``, PNG renders
(``data.png``, ``reconstructions.png``, ``progression.png``, ``samples.png``,
``completion.png``), ``.obj`` meshes of samples under ``meshes/``, the trained tokenizer and
transformer in ``pipeline/`` (``msar.from_pretrained``), and the training state:
``ckpt_tokenizer/``, ``ckpt_transformer/`` (checkpoints of :mod:`msar.training`) with their CSV
logs ``logs_*/train.csv``.  Rerunning the same command resumes an interrupted run exactly (or,
once training has finished, only evaluates again).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time

import numpy as np
import torch

from benchmarks.common import write_result_json
import msar
from msar import NextScaleTransformer, TransformerConfig
from modalities.voxel import (CLASSES, ReferenceSet, build_voxel_tokenizer, encode_dataset,
                              evaluate_completion, generate, half_mask, make_dataset, reconstruction_iou,
                              render_grid, save_obj, token_loss, train_tokenizer, train_transformer, validity)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/voxel_demo")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (~2-4 min on a shared CPU); sets smaller defaults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--res", type=int, default=16, help="occupancy grid side R (16, 32, 64)")
    p.add_argument("--latent", type=int, default=4, help="side of the finest token grid (R / latent = 2^n)")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--n-train", type=int, default=1800)
    p.add_argument("--n-test", type=int, default=180, help="held-out shapes (reference set of the metrics)")
    p.add_argument("--tok-steps", type=int, default=400)
    p.add_argument("--ar-steps", type=int, default=1500)
    p.add_argument("--ar-lr", type=float, default=1.5e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=96, help="transformer width")
    p.add_argument("--depth", type=int, default=3, help="transformer depth")
    p.add_argument("--gen-per-class", type=int, default=20)
    p.add_argument("--points", type=int, default=128, help="surface points per shape for Chamfer metrics")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance strength")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every that many steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    p.add_argument("--coord-frequencies", type=int, default=0,
                   help="transformer positions: add sin/cos features of every token's (x, y, z) cell centre at this "
                        "many octaves (msar.TransformerConfig.coord_frequencies); 0 learns every position on its own")
    args = p.parse_args(argv)
    if args.coord_frequencies < 0:
        p.error(f"--coord-frequencies must be >= 0, got {args.coord_frequencies}")
    if args.quick:  # smaller defaults; options given explicitly still win
        p.set_defaults(n_train=180, n_test=45, batch=16, points=64, tok_steps=60, ar_steps=60, width=64, depth=2,
                       gen_per_class=4)
        args = p.parse_args(argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    timings, t0 = {}, time.time()
    started = t0
    metrics: dict = {"config": vars(args), "classes": list(CLASSES)}

    # ---------------------------------------------------------------- data
    tic = time.time()
    train_np, train_lab = make_dataset(args.n_train, args.res, seed=args.seed)
    test_np, test_lab = make_dataset(args.n_test, args.res, seed=args.seed + 1000)
    other_np, other_lab = make_dataset(args.n_test, args.res, seed=args.seed + 2000)  # a 2nd held-out draw
    train_x, test_x = torch.from_numpy(train_np), torch.from_numpy(test_np)
    timings["data_s"] = time.time() - tic
    show = [int(np.nonzero(test_lab == c)[0][0]) for c in range(len(CLASSES))]
    render_grid([test_np[i] for i in show], f"{args.out}/data.png", [CLASSES[test_lab[i]] for i in show], cols=9)
    metrics["data"] = {"validity_heldout": validity(test_np, test_lab), "fill_fraction": float(train_np.mean())}

    # ---------------------------------------------------------------- tokenizer
    tic = time.time()
    tok = build_voxel_tokenizer(resolution=args.res, latent_side=args.latent, vocab_size=args.vocab)
    # checkpoints in <out>/ckpt_tokenizer: a rerun resumes (or, when finished, trains nothing)
    train_tokenizer(tok, train_x, steps=args.tok_steps, batch_size=args.batch, seed=args.seed, out=args.out,
                    ckpt_every=args.ckpt_every)
    timings["tokenizer_train_s"] = time.time() - tic
    hist = read_log(f"{args.out}/logs_tokenizer/train.csv")
    rec_iou = reconstruction_iou(tok, test_x)
    with torch.no_grad():
        rec = torch.cat([tok.decode(tok.encode(test_x[i:i + 64].float())) > 0 for i in range(0, len(test_x), 64)])
    metrics["tokenizer"] = {
        "schedule": tok.schedule.to_config(), "tokens_per_shape": tok.schedule.L,
        "parameters": sum(p.numel() for p in tok.parameters()),
        "heldout_iou_mean": float(rec_iou.mean()), "heldout_iou_median": float(rec_iou.median()),
        "heldout_iou_per_class": {CLASSES[c]: float(rec_iou[torch.from_numpy(test_lab == c)].mean())
                                  for c in range(len(CLASSES))},
        "train_occupancy_loss_last50": float(np.mean([h["recon"] for h in hist[-50:]])),
        "codebook_usage_last": hist[-1][f"usage_k{tok.schedule.num_scales - 1}"],
        "reconstruction_validity": validity(rec.numpy(), test_lab),
    }
    render_grid([test_np[i] for i in show] + [rec[i].numpy() for i in show], f"{args.out}/reconstructions.png",
                [f"{CLASSES[test_lab[i]]}" for i in show] + [f"rec IoU {rec_iou[i]:.2f}" for i in show], cols=9)
    with torch.no_grad():
        prog = tok.decode_progression(tok.encode(test_x[show[6:8]].float()))  # a table and a chair
    K = len(prog)
    render_grid([(p[j] > 0).numpy() for j in range(2) for p in prog], f"{args.out}/progression.png",
                [f"scales <= {k} ({tok.schedule.shape(k)[0]}^3)" for _ in range(2) for k in range(K)], cols=K)

    # ---------------------------------------------------------------- transformer
    tic = time.time()
    indices = encode_dataset(tok, train_x)
    labels = torch.from_numpy(train_lab)
    cfg = TransformerConfig(schedule=tok.schedule.to_config(), vocab_size=tok.vocab_size, latent_dim=tok.latent_dim,
                            num_classes=len(CLASSES), depth=args.depth, embed_dim=args.width,
                            num_heads=max(1, args.width // 32), cond_drop_rate=0.1,
                            coord_frequencies=args.coord_frequencies)
    torch.manual_seed(args.seed + 1)  # the same initial weights whether or not the tokenizer was resumed
    model = NextScaleTransformer(cfg)
    train_transformer(model, tok, indices, labels, steps=args.ar_steps, batch_size=args.batch, lr=args.ar_lr,
                      seed=args.seed, out=args.out, ckpt_every=args.ckpt_every)
    timings["transformer_train_s"] = time.time() - tic
    msar.Pipeline(tok, model).save_pretrained(f"{args.out}/pipeline")  # msar.from_pretrained loads both
    ar_hist = read_log(f"{args.out}/logs_transformer/train.csv")
    # teacher-forced loss on held-out shapes and on as many training shapes (no class dropout in
    # either): the gap says whether the transformer overfits
    n = len(test_x)
    heldout = token_loss(model, tok, encode_dataset(tok, test_x), torch.from_numpy(test_lab))
    train_part = token_loss(model, tok, [t[:n] for t in indices], labels[:n])
    metrics["transformer"] = {"parameters": model.num_parameters(),
                              "loss_last50": float(np.mean([h["loss"] for h in ar_hist[-50:]])),
                              "acc_last50": float(np.mean([h["acc"] for h in ar_hist[-50:]])),
                              "heldout_loss": heldout["loss"], "heldout_acc": heldout["acc"],
                              "train_subset_loss": train_part["loss"], "train_subset_acc": train_part["acc"]}

    # ---------------------------------------------------------------- class-conditional generation
    tic = time.time()
    sample_kw = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    gen_lab = torch.arange(len(CLASSES)).repeat_interleave(args.gen_per_class)
    gen_occ, _ = generate(model, tok, gen_lab, batch_size=64, seed=args.seed + 7, **sample_kw)
    timings["sampling_s"] = time.time() - tic
    gen_np = gen_occ.numpy()
    tic = time.time()
    other_rec = _reconstruct(tok, torch.from_numpy(other_np))
    ref = ReferenceSet(test_np, test_lab, n_points=args.points, seed=args.seed)
    metrics["generation"] = {
        "sampling": sample_kw, "n": len(gen_lab), "surface_points": args.points,
        "validity": validity(gen_np, gen_lab.numpy()),
        "vs_heldout": ref.compare(gen_np, gen_lab.numpy()),
        # what the same metrics give for a second draw of real data (the ideal) and for the
        # tokenizer's reconstructions of it (the ceiling the tokenizer imposes)
        "reference_real_vs_heldout": ref.compare(other_np, other_lab),
        "reference_reconstructions_vs_heldout": ref.compare(other_rec, other_lab),
        "reference_real_validity": validity(other_np, other_lab),
        "reference_reconstruction_validity": validity(other_rec, other_lab),
    }
    timings["metrics_s"] = time.time() - tic
    pick = [int(c * args.gen_per_class + j) for c in range(len(CLASSES)) for j in range(min(2, args.gen_per_class))]
    render_grid([gen_np[i] for i in pick], f"{args.out}/samples.png",
                [f"{CLASSES[gen_lab[i]]} (sample)" for i in pick], cols=6)
    for i in pick[::2]:
        save_obj(gen_np[i], f"{args.out}/meshes/sample_{i:03d}_{CLASSES[gen_lab[i]]}.obj")

    # ---------------------------------------------------------------- zero-shot completion (keep the x < R/2 half)
    tic = time.time()
    sel = np.nonzero(np.isin(test_lab, [CLASSES.index(c) for c in ("table", "chair", "shelf", "torus")]))[0][:48]
    vox, lab = test_x[sel], torch.from_numpy(test_lab[sel])
    mask = half_mask(len(sel), args.res, axis=0, keep="low")
    comp, done = evaluate_completion(model, tok, vox, lab, mask, seed=args.seed + 11, **sample_kw)
    metrics["completion"] = {"classes": ["table", "chair", "shelf", "torus"], "n": len(sel), "kept": "x < R/2",
                             **comp}
    timings["completion_s"] = time.time() - tic
    rows = [0, 1, 2, 3]
    render_grid([g for i in rows for g in ((vox[i] & mask[i]).numpy(), done[i].numpy(), vox[i].numpy())],
                f"{args.out}/completion.png",
                [t for i in rows for t in (f"given half ({CLASSES[lab[i]]})", "completion", "truth")], cols=6)

    timings["total_s"] = time.time() - t0
    metrics["timings"] = timings
    write_result_json(f"{args.out}/metrics.json", metrics, started)  # + command, commit, date, machine
    _summary(metrics)
    return metrics


def read_log(path: str) -> list[dict]:
    """The rows of a trainer's CSV log (every step once, also across a resume) as floats."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


@torch.no_grad()
def _reconstruct(tok, x: torch.Tensor) -> np.ndarray:
    return torch.cat([tok.decode(tok.encode(x[i:i + 64].float())) > 0 for i in range(0, len(x), 64)]).numpy()


def _summary(m: dict) -> None:
    g, r = m["generation"], m["generation"]["reference_real_vs_heldout"]
    print(f"tokenizer held-out IoU {m['tokenizer']['heldout_iou_mean']:.3f}")
    print(f"generated: single component {g['validity']['single_component']:.1f}%  legs ok {g['validity']['legs_ok']}")
    v = g["vs_heldout"]
    print(f"generated vs held-out: MMD-CD {v['mmd_cd']:.4f}  COV {v['cov_cd']:.1f}%  1-NNA {v['1nna_cd']:.1f}%  "
          f"NN-class agreement {v['nn_class_agreement']:.1f}%")
    print(f"real vs held-out (ideal): MMD-CD {r['mmd_cd']:.4f}  COV {r['cov_cd']:.1f}%  1-NNA {r['1nna_cd']:.1f}%")
    c = m["completion"]
    print(f"completion hidden-half IoU {c['hidden_iou_completion']:.3f} vs unconstrained "
          f"{c['hidden_iou_unconstrained_sample']:.3f}; given-half IoU {c['given_iou_kept']:.3f}")
    print(f"timings {json.dumps({k: round(v, 1) for k, v in m['timings'].items()})}")


if __name__ == "__main__":
    main()
