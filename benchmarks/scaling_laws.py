"""Scaling-law sweep: test loss of a ladder of next-scale transformers against their size.

    python -m benchmarks.scaling_laws [--quick]

Data: scikit-learn's bundled 8 x 8 digits (1797 images, no download), split 70 / 15 / 15 into
train / validation / test with a fixed seed, tokenized once by a tiny multi-scale VQ tokenizer
built from msar's core (a conv encoder to a 16-channel 4 x 4 latent,
``GridPyramid([(1,1), (2,2), (4,4)])``, 128 codewords, a conv decoder), trained here with
:class:`msar.training.VQVAETrainer` and cached under ``outputs/scaling_laws/`` (L = 21 tokens per
image). Then a ladder of class-conditional ``NextScaleTransformer`` sizes is trained on the same
tokens with the same recipe (:class:`msar.training.TransformerTrainer`: AdamW, cosine decay, a
fixed number of steps, a checkpoint every ``eval_every`` steps; a rerun resumes). As the data set
is tiny, larger models overfit, so each model is read at its best checkpoint (early stopping):
the checkpoint is **selected on the validation split**, and the test split is evaluated once, at
the selected checkpoint.

Fits ``L = (a N)^b`` (N = parameters) by least squares in log-log space, for the cross-entropy
of the last scale and of all scales, with the Pearson correlation of the log-log points (the
VAR paper reports about -0.998 on ImageNet).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.utils.data import TensorDataset

from msar import GridPyramid, MultiScaleResidualQuantizer, MultiScaleVQTokenizer, NextScaleTransformer, TransformerConfig
from msar.training import (TransformerTrainConfig, TransformerTrainer, VQVAETrainConfig, VQVAETrainer, build_loader,
                           list_checkpoints, load_checkpoint)

from . import common

NAME = "scaling_laws"
SCHEDULE = [(1, 1), (2, 2), (4, 4)]
SPLITS = ("train", "val", "test")

PRESETS = {
    # ladder: (depth, width, heads)
    "full": dict(ladder=[(1, 16, 2), (2, 24, 2), (2, 32, 4), (3, 48, 4), (4, 64, 4), (4, 96, 6), (6, 128, 8)],
                 steps=1500, eval_every=100, tok_steps=600, batch=128, vocab=128),
    "quick": dict(ladder=[(1, 16, 2), (2, 24, 2), (2, 32, 4), (3, 48, 4), (4, 64, 4)],
                  steps=400, eval_every=50, tok_steps=250, batch=128, vocab=128),
    "smoke": dict(ladder=[(1, 8, 2), (1, 16, 2), (2, 32, 2)], steps=10, eval_every=10, tok_steps=5,
                  batch=64, vocab=32, subset=300),
}


# ---------------------------------------------------------------------------- data and tokenizer
def load_digits_split(seed: int, subset: int | None = None) -> dict:
    """``{"train" | "val" | "test": (x (N, 1, 8, 8) in [-1, 1], y (N,) in [0, 10))}``, 70 / 15 / 15."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    if subset:
        perm = perm[:subset]
    n = int(round(0.15 * len(perm)))
    parts = {"test": perm[:n], "val": perm[n:2 * n], "train": perm[2 * n:]}
    return {k: (x[i], y[i]) for k, i in parts.items()}


def tiny_tokenizer(vocab: int, dim: int = 16, ch: int = 32) -> MultiScaleVQTokenizer:
    """8 x 8 image <-> 16-channel 4 x 4 latent, quantized over scales 1, 2, 4."""
    enc = nn.Sequential(nn.Conv2d(1, ch, 3, 1, 1), nn.GELU(), nn.Conv2d(ch, ch, 4, 2, 1), nn.GELU(),
                        nn.Conv2d(ch, dim, 1))
    dec = nn.Sequential(nn.Conv2d(dim, ch, 3, 1, 1), nn.GELU(), nn.ConvTranspose2d(ch, ch, 4, 2, 1), nn.GELU(),
                        nn.Conv2d(ch, 1, 3, 1, 1))
    quant = MultiScaleResidualQuantizer(vocab, dim, GridPyramid(SCHEDULE), share_phi=1, phi_ratio=0.5)
    return MultiScaleVQTokenizer(enc, dec, quant)


def train_tokenizer(tok: MultiScaleVQTokenizer, x: torch.Tensor, steps: int, batch: int, seed: int,
                    ckpt_dir: str) -> dict:
    """MSE + VQ loss, constant lr 2e-3, dead codewords re-seeded every 50 steps (tiny data set)."""
    cfg = VQVAETrainConfig(lr=2e-3, total_steps=steps, lr_schedule="const", weight_decay=0.0, betas=(0.9, 0.99),
                           grad_clip=0.0, l1_weight=0.0, l2_weight=1.0, restart_every=50, ckpt_dir=ckpt_dir,
                           keep_last=1, progress=False)
    VQVAETrainer(tok, cfg).fit(build_loader(TensorDataset(x), batch, seed=seed))
    tok.eval()
    with torch.no_grad():
        rec = tok.decode(tok.encode(x))
    return {"recon_mse": float(F.mse_loss(rec, x)), "usage_percent": tok.quantizer.usage()}


def tokenize(tok: MultiScaleVQTokenizer, x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    """Items ``(targets (L,) long, teacher input (L - 1, C), label)``."""
    with torch.no_grad():
        idx = tok.encode(x)
        return TensorDataset(torch.cat(idx, 1), tok.teacher_forcing_input(idx), y)


def cached_tokens(p: dict, seed: int, cache_dir: str) -> dict:
    """Train the tokenizer and tokenize the splits once per (preset, seed); later runs reuse the file.
    Returns ``{"train" | "val" | "test": TensorDataset (see tokenize), "tokenizer": stats, "latent_dim": C}``."""
    os.makedirs(cache_dir, exist_ok=True)
    key = f"tokens3_v{p['vocab']}_s{p['tok_steps']}_n{p.get('subset', 0)}_seed{seed}"
    path = os.path.join(cache_dir, key + ".pt")
    if not os.path.exists(path):
        splits = load_digits_split(seed, p.get("subset"))
        torch.manual_seed(seed)
        tok = tiny_tokenizer(p["vocab"])
        t0 = time.perf_counter()
        stats = train_tokenizer(tok, splits["train"][0], p["tok_steps"], p["batch"], seed,
                                os.path.join(cache_dir, key + "_tokenizer_ckpt"))
        stats["train_s"] = time.perf_counter() - t0
        data = {k: tokenize(tok, *splits[k]).tensors for k in SPLITS}
        torch.save({**data, "tokenizer": stats, "latent_dim": tok.latent_dim}, path)
    saved = torch.load(path)
    return {**{k: TensorDataset(*saved[k]) for k in SPLITS}, "tokenizer": saved["tokenizer"],
            "latent_dim": saved["latent_dim"]}


# ---------------------------------------------------------------------------- ladder
def make_model(depth: int, width: int, heads: int, vocab: int, latent: int) -> NextScaleTransformer:
    cfg = TransformerConfig(schedule=SCHEDULE, vocab_size=vocab, latent_dim=latent, num_classes=10, depth=depth,
                            embed_dim=width, num_heads=heads, cond_drop_rate=0.1, init_std=0.02)
    return NextScaleTransformer(cfg)


def train_one(spec: tuple, data: dict, p: dict, seed: int, run_dir: str) -> dict:
    """Train one ladder model with checkpoints every ``eval_every`` steps, select the checkpoint
    with the lowest validation loss (over all scales, and separately over the last scale) and
    evaluate the test split once, at the selected checkpoint."""
    depth, width, heads = spec
    torch.manual_seed(seed)
    model = make_model(depth, width, heads, p["vocab"], data["latent_dim"])
    cfg = TransformerTrainConfig(lr=2e-3, total_steps=p["steps"], warmup_steps=min(50, p["steps"] // 10),
                                 lr_schedule="cos", final_lr_ratio=0.0, weight_decay=0.05, grad_clip=0.0,
                                 ckpt_dir=os.path.join(run_dir, "ckpt"), ckpt_every=p["eval_every"], keep_last=0,
                                 log_dir=run_dir, tensorboard=False, progress=False)
    counts = list(model.schedule.token_counts)
    trainer = TransformerTrainer(model, None, cfg, prepare_batch=lambda b: (list(b[0].split(counts, 1)), b[2], b[1]))
    t0 = time.perf_counter()
    trainer.fit(build_loader(data["train"], p["batch"], seed=seed))
    train_s = time.perf_counter() - t0

    curve = []  # validation loss of every checkpoint: the only split model selection looks at
    for step, path in list_checkpoints(cfg.ckpt_dir):
        model.load_state_dict(load_checkpoint(path).model_states["model"])
        curve.append({"step": step, **{f"val_{k}": v for k, v in evaluate(trainer, data["val"]).items()}})
    row = {"depth": depth, "width": width, "heads": heads, "params": model.num_parameters(),
           "params_non_embedding": sum(p_.numel() for n, p_ in model.named_parameters()
                                       if not any(s in n for s in ("class_embed", "pos_", "start_pos", "level_embed",
                                                                   "head.", "input_proj"))),
           "train_s": train_s, "curve": curve}
    for key in ("all", "last"):
        best = min(curve, key=lambda c: c[f"val_{key}"])
        model.load_state_dict(load_checkpoint(os.path.join(cfg.ckpt_dir, f"step_{best['step']:06d}"))
                              .model_states["model"])
        row[f"selected_step_{key}"] = best["step"]
        row[f"val_loss_{key}"] = best[f"val_{key}"]
        row[f"test_loss_{key}"] = evaluate(trainer, data["test"])[key]
    return row


@torch.no_grad()
def evaluate(trainer: TransformerTrainer, split: TensorDataset) -> dict:
    """Mean cross-entropy (nats/token) over all scales and over the last scale."""
    loader = build_loader(split, 512, shuffle=False, drop_last=False)
    ev = trainer.evaluate(loader, use_ema=False, log=False)
    last = f"loss_k{len(SCHEDULE) - 1}"
    return {"all": ev["loss"], "last": ev[last]}


def fit(rows: list, key: str) -> dict:
    f = common.fit_power_law([r["params"] for r in rows], [r[key] for r in rows])
    b = f["exponent"]
    # L = (a N)^b  <=>  log L = b log N + b log a
    f["a"] = float(f["prefactor"] ** (1 / b)) if b and math.isfinite(b) and b != 0 else float("nan")
    f["form"] = "L = (a N)^b, b = exponent"
    return f


def run(args) -> dict:
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    p = dict(PRESETS[preset])
    common.setup_threads(args.threads)
    info = common.machine_info(torch.device("cpu"))
    cache_dir = args.cache or os.path.join("outputs", NAME)
    data = cached_tokens(p, args.seed, cache_dir)
    print(f"tokenizer: {data['tokenizer']}", flush=True)
    rows = []
    for spec in p["ladder"]:
        run_dir = os.path.join(cache_dir, f"{preset}_steps{p['steps']}_seed{args.seed}_d{spec[0]}_w{spec[1]}")
        r = train_one(spec, data, p, args.seed, run_dir)  # resumes from run_dir/ckpt
        rows.append(r)
        print(f"depth {r['depth']} width {r['width']:4d}: {r['params']:8d} params  test CE all {r['test_loss_all']:.4f} "
              f"last {r['test_loss_last']:.4f}  ({r['train_s']:.1f} s)", flush=True)
    figures = {"rows": rows, "fit_last_scale": fit(rows, "test_loss_last"), "fit_all_scales": fit(rows, "test_loss_all"),
               "param_span": max(r["params"] for r in rows) / min(r["params"] for r in rows),
               "tokenizer": data["tokenizer"], "paper_pearson_r": -0.998}
    config = {"preset": preset, **p, "schedule": SCHEDULE, "seed": args.seed,
              "data": "sklearn digits 8x8, 70/15/15 train/val/test split",
              "test_loss": "test split evaluated once, at the checkpoint with the lowest validation loss "
                           "(checkpoints every eval_every steps)",
              "optimizer": "msar.training AdamW lr 2e-3, warm-up 50 steps, cosine to 0, wd 0.05"}
    path = common.write_result(NAME, info, config, figures, args.out)
    if not args.no_plot:
        plot(rows, figures, args.out)
    for k in ("fit_last_scale", "fit_all_scales"):
        print(f"{k}: exponent {figures[k]['exponent']:.4f}, pearson r {figures[k]['pearson_r']:.4f}")
    print("wrote", path)
    return {"path": path, "figures": figures, "config": config}


def plot(rows: list, figures: dict, out_dir: str | None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N = np.array([r["params"] for r in rows], float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, fk, title in ((axes[0], "test_loss_last", "fit_last_scale", "last scale"),
                               (axes[1], "test_loss_all", "fit_all_scales", "all scales")):
        L = np.array([r[key] for r in rows])
        f = figures[fk]
        ax.loglog(N, L, "o", label="test loss")
        xs = np.geomspace(N.min(), N.max(), 50)
        ax.loglog(xs, f["prefactor"] * xs ** f["exponent"], "--",
                  label=f"L = (aN)^b, b = {f['exponent']:.3f}, r = {f['pearson_r']:.3f}")
        ax.set_xlabel("parameters N"); ax.set_ylabel("test cross-entropy (nats)"); ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("scaling ladder on tokenized digits")
    return common.savefig(fig, NAME, out_dir)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny ladder for the test suite")
    ap.add_argument("--cache", default=None, help="token cache folder (default outputs/scaling_laws)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse(argv))


if __name__ == "__main__":
    main()
