"""Scaling-law sweep: test loss of a ladder of next-scale transformers against their size.

    python -m benchmarks.scaling_laws [--quick]

Data: scikit-learn's bundled 8 x 8 digits (1797 images, no download), split 85 / 15 with a fixed
seed, tokenized once by a tiny multi-scale VQ tokenizer built from msar's core (a conv encoder to
a 16-channel 4 x 4 latent, ``GridPyramid([(1,1), (2,2), (4,4)])``, 128 codewords, a conv
decoder), trained briefly here and cached under ``outputs/scaling_laws/`` (L = 21 tokens per
image). Then a ladder of class-conditional ``NextScaleTransformer`` sizes is trained on the same
tokens with the same recipe (AdamW, cosine decay, fixed number of steps) and evaluated on the
held-out tokens. As the data set is tiny, larger models overfit; the reported test loss of a
model is the best of its periodic evaluations (early stopping), the usual way to read off the
capacity-limited loss when data is fixed.

Fits ``L = (a N)^b`` (N = parameters) by least squares in log-log space, for the cross-entropy
of the last scale and of all scales, with the Pearson correlation of the log-log points (the
VAR paper reports about -0.998 on ImageNet).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from msar import GridPyramid, MultiScaleResidualQuantizer, MultiScaleVQTokenizer, NextScaleTransformer, TransformerConfig

from . import common

NAME = "scaling_laws"
SCHEDULE = [(1, 1), (2, 2), (4, 4)]

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
def load_digits_split(seed: int, subset: Optional[int] = None):
    """``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 8, 8)`` in [-1, 1], labels in [0, 10)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    if subset:
        perm = perm[:subset]
    n_test = int(round(0.15 * len(perm)))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def tiny_tokenizer(vocab: int, dim: int = 16, ch: int = 32) -> MultiScaleVQTokenizer:
    """8 x 8 image <-> 16-channel 4 x 4 latent, quantized over scales 1, 2, 4."""
    enc = nn.Sequential(nn.Conv2d(1, ch, 3, 1, 1), nn.GELU(), nn.Conv2d(ch, ch, 4, 2, 1), nn.GELU(),
                        nn.Conv2d(ch, dim, 1))
    dec = nn.Sequential(nn.Conv2d(dim, ch, 3, 1, 1), nn.GELU(), nn.ConvTranspose2d(ch, ch, 4, 2, 1), nn.GELU(),
                        nn.Conv2d(ch, 1, 3, 1, 1))
    quant = MultiScaleResidualQuantizer(vocab, dim, GridPyramid(SCHEDULE), share_phi=1, phi_ratio=0.5)
    return MultiScaleVQTokenizer(enc, dec, quant)


def train_tokenizer(tok: MultiScaleVQTokenizer, x: torch.Tensor, steps: int, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    tok.train()
    for it in range(steps):
        xb = x[torch.randint(0, len(x), (batch,), generator=g)]
        rec, q = tok(xb)
        loss = F.mse_loss(rec, xb) + q.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 50 == 49:  # keep the codebook alive on this tiny data set
            with torch.no_grad():
                tok.quantize.restart_dead_codes(tok.encode_latent(xb), generator=g)
    tok.eval()
    with torch.no_grad():
        rec = tok.decode(tok.encode(x))
    return {"recon_mse": float(F.mse_loss(rec, x)), "usage_percent": tok.quantize.usage()}


def tokenize(tok: MultiScaleVQTokenizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets (N, L) long, teacher input (N, L - 1, C))``."""
    with torch.no_grad():
        idx = tok.encode(x)
        return torch.cat(idx, 1), tok.teacher_forcing_input(idx)


def cached_tokens(p: dict, seed: int, cache_dir: str) -> dict:
    """Train the tokenizer and tokenize the split once per (preset, seed); later runs reuse the file."""
    os.makedirs(cache_dir, exist_ok=True)
    key = f"tokens_v{p['vocab']}_s{p['tok_steps']}_n{p.get('subset', 0)}_seed{seed}.pt"
    path = os.path.join(cache_dir, key)
    if os.path.exists(path):
        return torch.load(path)
    xtr, ytr, xte, yte = load_digits_split(seed, p.get("subset"))
    torch.manual_seed(seed)
    tok = tiny_tokenizer(p["vocab"])
    t0 = time.perf_counter()
    stats = train_tokenizer(tok, xtr, p["tok_steps"], p["batch"], seed)
    stats["train_s"] = time.perf_counter() - t0
    tr_t, tr_x = tokenize(tok, xtr)
    te_t, te_x = tokenize(tok, xte)
    data = {"train": (tr_t, tr_x, ytr), "test": (te_t, te_x, yte), "tokenizer": stats,
            "latent_dim": tok.latent_dim}
    torch.save(data, path)
    return data


# ---------------------------------------------------------------------------- ladder
def make_model(depth: int, width: int, heads: int, vocab: int, latent: int) -> NextScaleTransformer:
    cfg = TransformerConfig(schedule=SCHEDULE, vocab_size=vocab, latent_dim=latent, num_classes=10, depth=depth,
                            embed_dim=width, num_heads=heads, cond_drop_rate=0.1)
    return NextScaleTransformer(cfg).init_weights()


@torch.no_grad()
def evaluate(model: NextScaleTransformer, split) -> dict:
    """Mean cross-entropy (nats/token) over all scales and over the last scale."""
    targets, x, y = split
    model.eval()
    logits = model(y, x)
    ce = F.cross_entropy(logits.reshape(-1, model.V), targets.reshape(-1), reduction="none").view(targets.shape)
    model.train()
    last = model.schedule.slice(len(model.schedule) - 1)
    return {"all": float(ce.mean()), "last": float(ce[:, last].mean())}


def train_one(spec: tuple, data: dict, p: dict, seed: int) -> dict:
    depth, width, heads = spec
    torch.manual_seed(seed)
    model = make_model(depth, width, heads, p["vocab"], data["latent_dim"])
    tr_t, tr_x, tr_y = data["train"]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, p["steps"]) / p["steps"])))
    g = torch.Generator().manual_seed(seed)
    best = {"all": float("inf"), "last": float("inf")}
    curve = []
    t0 = time.perf_counter()
    model.train()
    for it in range(1, p["steps"] + 1):
        b = torch.randint(0, len(tr_t), (p["batch"],), generator=g)
        logits = model(tr_y[b], tr_x[b])
        loss = F.cross_entropy(logits.reshape(-1, model.V), tr_t[b].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if it % p["eval_every"] == 0 or it == p["steps"]:
            ev = evaluate(model, data["test"])
            curve.append({"step": it, "train": loss.item(), **ev})
            best = {k: min(best[k], ev[k]) for k in best}
    return {"depth": depth, "width": width, "heads": heads, "params": model.num_parameters(),
            "params_non_embedding": sum(p_.numel() for n, p_ in model.named_parameters()
                                        if not any(s in n for s in ("class_emb", "pos_", "lvl_embed", "head.", "word_embed"))),
            "test_loss_all": best["all"], "test_loss_last": best["last"],
            "final_test_loss_all": curve[-1]["all"], "final_test_loss_last": curve[-1]["last"],
            "train_s": time.perf_counter() - t0, "curve": curve}


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
        r = train_one(spec, data, p, args.seed)
        rows.append(r)
        print(f"depth {r['depth']} width {r['width']:4d}: {r['params']:8d} params  test CE all {r['test_loss_all']:.4f} "
              f"last {r['test_loss_last']:.4f}  ({r['train_s']:.1f} s)", flush=True)
    figures = {"rows": rows, "fit_last_scale": fit(rows, "test_loss_last"), "fit_all_scales": fit(rows, "test_loss_all"),
               "param_span": max(r["params"] for r in rows) / min(r["params"] for r in rows),
               "tokenizer": data["tokenizer"], "paper_pearson_r": -0.998}
    config = {"preset": preset, **p, "schedule": SCHEDULE, "seed": args.seed, "data": "sklearn digits 8x8, 85/15 split",
              "test_loss": "min over periodic evaluations (early stopping)", "optimizer": "AdamW lr 2e-3 cosine, wd 0.05"}
    path = common.write_result(NAME, info, config, figures, args.out)
    if not args.no_plot:
        plot(rows, figures, args.out)
    for k in ("fit_last_scale", "fit_all_scales"):
        print(f"{k}: exponent {figures[k]['exponent']:.4f}, pearson r {figures[k]['pearson_r']:.4f}")
    print("wrote", path)
    return {"path": path, "figures": figures, "config": config}


def plot(rows: list, figures: dict, out_dir: Optional[str]) -> str:
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
