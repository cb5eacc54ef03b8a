"""Text-to-shape on procedural voxel shapes, on CPU, through the same condition API as
text-to-image: a voxel pyramid tokenizer, a caption encoder and a text-conditioned next-scale
transformer, scored by geometric checks and a category classifier trained on real shapes.

    python -m modalities text2shape [--out outputs/text2shape] [--quick] [--fresh]

What it does::

    train, val, test_seen, test_heldout = captioned shapes        # modalities.voxel.captions
        ("a low table with four legs", "a tall shelf with two boards", "a large sphere";
         every tall table and every small sphere only in test_heldout)
    tokenizer = fit the voxel tokenizer on train (16^3 grids, scales 1, 2, 3, 4)  # voxel.train
    words     = WordTokenizer.from_corpus(train captions)         # msar.text
    encoder, transformer = fit jointly (cross-attention on the caption's word features)
    classifier = a small 3-D CNN on real shapes of every category and size -> category of a generated grid
    for cfg in the guidance sweep: one sample per caption of val, test_seen and test_heldout,
              scored per attribute: category (classifier), adjective (tall / low, large / small:
              the caption's own measurement), parts (boards of a shelf, legs of a table or chair)
    the reported guidance is the one with the best val accuracy (val: seen pairs only)
    write renders with their captions, metrics.json (with the run record) and the pipeline

Re-runs resume from the checkpoints in ``OUT`` (same training configuration) or are refused at
start (another one), as in :mod:`modalities.image.text2image`.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import msar
from modalities.image.demo import (RunConfig, _fit_in_chunks, add_run_arguments, config_from_args, prepare_run_folder,
                                   provenance)
from modalities.image.text2image import (CaptionTokens, choose_guidance, generate, guidance_sweep, sweep_plot,
                                         write_metrics)
from msar.text import TextEncoder, TextEncoderConfig, WordTokenizer
from msar.training import TokenDataset, TransformerTrainConfig, TransformerTrainer, build_loader

from .captions import CATEGORIES, HELD_OUT, captioned_shapes, check_caption, reference_shapes
from .export import render_grid
from .tokenizer import build_voxel_tokenizer
from .train import reconstruction_iou, train_tokenizer

RUN_CONFIG = "run_config.json"
STATE = ("ckpt_tokenizer", "logs_tokenizer", "ckpt_transformer", "logs_transformer", "pipeline")
EVALUATION_FIELDS = ("cfg_sweep", "top_k", "top_p", "n_eval", "classifier_steps", "classifier_shapes", "grid_captions",
                     "grid_samples")
ATTRIBUTES = ("category", "adjective", "parts", "all")
FIGURES = ("samples.png", "guidance_sweep.png", "reconstructions.png")
EVAL_SETS = ("val", "test_seen", "test_heldout")


@dataclass
class Text2ShapeConfig(RunConfig):
    evaluation_fields: ClassVar[tuple[str, ...]] = EVALUATION_FIELDS

    resolution: int = 16
    latent_side: int = 4               # scales 1^3, 2^3, 3^3, 4^3: 100 tokens
    vocab_size: int = 256
    n_train: int = 3000
    n_val: int = 120
    n_eval: int = 120                  # captions per evaluation set
    held_out: tuple = HELD_OUT         # (adjective, category) pairs never in train / val
    tok_steps: int = 400
    tok_batch: int = 16
    max_length: int = 10
    text_dim: int = 48
    text_depth: int = 1
    text_heads: int = 4
    depth: int = 3
    width: int = 96
    heads: int = 4
    cond_drop: float = 0.1
    var_steps: int = 1500
    var_batch: int = 32
    var_lr: float = 1.5e-3
    cfg_sweep: tuple = (0.0, 2.0, 4.0)
    top_k: int = 0
    top_p: float = 0.9
    classifier_steps: int = 300
    classifier_shapes: int = 1200
    grid_captions: int = 4
    grid_samples: int = 3
    seed: int = 0

    @classmethod
    def quick(cls) -> "Text2ShapeConfig":
        """A smoke run of seconds: tiny models, few steps; its numbers mean nothing."""
        return cls(n_train=48, n_val=12, n_eval=8, tok_steps=3, tok_batch=8, var_steps=10, vocab_size=32,
                   text_dim=16, text_heads=2, depth=1, width=32, heads=2, cfg_sweep=(0.0, 2.0), classifier_steps=20,
                   classifier_shapes=60, grid_captions=2, grid_samples=2)


class CategoryClassifier(nn.Module):
    """A small 3-D CNN: occupancy ``(B, R, R, R)`` -> category logits ``(B, len(CATEGORIES))``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
                                 nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(2), nn.Flatten(),
                                 nn.Linear(256, len(CATEGORIES)))

    def forward(self, vox: torch.Tensor) -> torch.Tensor:
        return self.net(vox.float().unsqueeze(1))

    @torch.no_grad()
    def predict(self, vox: torch.Tensor | np.ndarray) -> list[str]:
        x = torch.as_tensor(np.asarray(vox, dtype=np.float32))
        return [CATEGORIES[i] for i in torch.cat([self(b).argmax(-1) for b in x.split(256)]).tolist()]


def train_classifier(vox: np.ndarray, categories: list[str], steps: int, seed: int) -> CategoryClassifier:
    """Fit on real shapes (random flips along x and y and quarter turns: the shapes' yaw is random)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CategoryClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    x = torch.from_numpy(vox).float()
    y = torch.tensor([CATEGORIES.index(c) for c in categories])
    for _ in range(steps):
        i = torch.randint(0, len(y), (64,), generator=g)
        b = torch.rot90(x[i], int(torch.randint(0, 4, (1,), generator=g)), dims=(1, 2))
        loss = F.cross_entropy(model(b), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def score(vox: np.ndarray, caps: list, classifier: CategoryClassifier) -> dict:
    """Mean per attribute (over the captions it applies to) of :func:`check_caption`, and ``n``."""
    pred = classifier.predict(vox)
    checks = [check_caption(v, w, p) for v, w, p in zip(vox, caps, pred)]
    out = {"n": len(checks)}
    for k in ATTRIBUTES:
        vals = [c[k] for c in checks if c[k] is not None]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def run(out: str, c: Text2ShapeConfig, progress: bool = True, fresh: bool = False, quick: bool = False) -> dict:
    """Train, evaluate and write everything to ``out``; returns the metrics (also in ``out/metrics.json``)."""
    t_start, cpu_start = time.time(), time.process_time()
    c.held_out = tuple(tuple(h) for h in c.held_out)
    prepare_run_folder(out, c.training_json(), fresh, state=STATE)
    run_record = provenance()
    timing: dict = {}
    smoke = "\nSMOKE RUN (--quick): tiny models, the numbers mean nothing" if quick else ""
    pbar = lambda total, desc: tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True)  # noqa: E731

    t = time.time()
    n_eval = max(c.n_eval, c.grid_captions)
    train_v, train_c = captioned_shapes("train", c.n_train, c.seed, c.resolution, c.held_out)
    sets = {"val": captioned_shapes("val", max(c.n_val, n_eval), c.seed, c.resolution, c.held_out),
            "test_seen": captioned_shapes("test_seen", n_eval, c.seed, c.resolution, c.held_out),
            "test_heldout": captioned_shapes("test_heldout", n_eval, c.seed, c.resolution, c.held_out)}
    train_text = [x.text() for x in train_c]
    metrics: dict = {"smoke_run": quick, "config": c.to_json(),
                     "data": {"train": len(train_c), **{k: len(v[1]) for k, v in sets.items()},
                              "train_captions": {s: train_text.count(s) for s in sorted(set(train_text))}}}
    timing["data"] = time.time() - t

    # ---- 1. voxel tokenizer (modalities.voxel.train: msar.training with the occupancy loss)
    t = time.time()
    torch.manual_seed(c.seed)
    tok = build_voxel_tokenizer(resolution=c.resolution, latent_side=c.latent_side, vocab_size=c.vocab_size)
    train_x = torch.from_numpy(train_v)
    train_tokenizer(tok, train_x, steps=c.tok_steps, batch_size=c.tok_batch, seed=c.seed, out=out,
                    ckpt_every=100, progress=progress)
    iou = reconstruction_iou(tok, torch.from_numpy(sets["test_seen"][0]))
    metrics["tokenizer"] = {"tokens_per_shape": tok.schedule.L, "test_iou_mean": float(iou.mean())}
    timing["tokenizer"] = time.time() - t

    # ---- 2. category classifier on real shapes; the checks on real shapes
    t = time.time()
    # real shapes of every category at every size (held-out pairs too: the classifier only scores)
    classifier = train_classifier(*reference_shapes(c.classifier_shapes, c.seed, c.resolution), c.classifier_steps,
                                  c.seed)
    with torch.no_grad():
        recs = {k: (tok.occupancy(tok.decode(tok.encode(torch.from_numpy(v[0][:c.n_eval]).float())))).numpy()
                for k, v in sets.items() if k != "val"}
    metrics["checks"] = {
        "on_real": {k: score(v[0][:c.n_eval], v[1][:c.n_eval], classifier) for k, v in sets.items() if k != "val"},
        "on_tokenizer_reconstructions": {k: score(r, sets[k][1][:c.n_eval], classifier) for k, r in recs.items()}}
    timing["classifier"] = time.time() - t

    # ---- 3. caption encoder + text-conditioned transformer, trained jointly
    t = time.time()
    torch.manual_seed(c.seed)
    words = WordTokenizer.from_corpus(train_text, max_length=c.max_length)
    encoder = TextEncoder(TextEncoderConfig.for_tokenizer(words, dim=c.text_dim, depth=c.text_depth,
                                                          num_heads=c.text_heads))
    model = msar.NextScaleTransformer(msar.TransformerConfig(
        schedule=tok.schedule.to_config(), vocab_size=tok.vocab_size, latent_dim=tok.latent_dim, num_classes=0,
        depth=c.depth, embed_dim=c.width, num_heads=c.heads, cond_kind="sequence", cond_dim=encoder.feature_dim,
        cond_drop_rate=c.cond_drop))
    tr_set = CaptionTokens(TokenDataset.encode(tok, train_x.float(), batch_size=256).indices, train_text, words)
    tcfg = TransformerTrainConfig(lr=c.var_lr, total_steps=c.var_steps, warmup_steps=min(100, c.var_steps // 10),
                                  lr_schedule="cos", final_lr_ratio=0.1, weight_decay=0.05, grad_clip=2.0,
                                  ckpt_dir=os.path.join(out, "ckpt_transformer"), keep_last=1,
                                  log_dir=os.path.join(out, "logs_transformer"), tensorboard=False, progress=False)
    trainer = TransformerTrainer(model, tok, tcfg, condition_encoder=encoder)
    with pbar(c.var_steps, "[3/4] text encoder + transformer") as bar:
        _fit_in_chunks(trainer, build_loader(tr_set, c.var_batch, seed=c.seed), c.var_steps, 250, bar)
    model.eval()
    encoder.eval()
    pipe = msar.Pipeline(tok, model, text_encoder=encoder)
    pipe.save_pretrained(os.path.join(out, "pipeline"))
    metrics["transformer"] = {"params": model.num_parameters(), "steps": trainer.step,
                              "caption_vocabulary": words.vocab_size}
    timing["transformer"] = time.time() - t

    # ---- 4. guidance sweep, chosen on val
    t = time.time()
    with pbar(len(c.cfg_sweep) * len(sets), "[4/4] sampling (guidance sweep)") as bar:
        sweep = guidance_sweep(
            pipe, {name: [x.text() for x in caps[:c.n_eval]] for name, (_, caps) in sets.items()}, c, bar,
            lambda name, logits: score(tok.occupancy(logits).numpy(), sets[name][1][:c.n_eval], classifier))
    best = choose_guidance(sweep)
    metrics["guidance_sweep"] = sweep
    metrics["result"] = {"cfg_chosen_on_val": best, "top_k": c.top_k, "top_p": c.top_p,
                         "seen": sweep[f"{best:g}"]["test_seen"], "held_out": sweep[f"{best:g}"]["test_heldout"]}
    timing["sampling"] = time.time() - t

    t = time.time()
    files = _figures(out, c, pipe, sets, recs, sweep, best, smoke)
    timing["figures"] = time.time() - t
    path = write_metrics(out, metrics, run_record, timing, t_start, cpu_start)
    metrics["files"] = files + [path, os.path.join(out, "pipeline")]
    return metrics


def _figures(out, c, pipe, sets, recs, sweep, best, smoke) -> list[str]:
    paths = []
    shown, titles = [], []
    for name in ("test_seen", "test_heldout"):
        for j, cap in enumerate(sets[name][1][:c.grid_captions]):
            logits, _ = generate(pipe, [cap.text()] * c.grid_samples, c, best, seed=c.seed + 9000 + 10 * j + len(shown))
            for v in pipe.tokenizer.occupancy(logits).numpy():
                shown.append(v)
                titles.append(("[held-out] " if name == "test_heldout" else "") + cap.text().replace(" with", "\nwith"))
    p = os.path.join(out, "samples.png")
    render_grid(shown, p, titles, cols=c.grid_samples, size=2.4)
    paths.append(p)
    p = os.path.join(out, "reconstructions.png")
    k = min(6, len(recs["test_seen"]))
    render_grid(list(sets["test_seen"][0][:k]) + list(recs["test_seen"][:k]), p,
                [x.text().replace(" with", "\nwith") for x in sets["test_seen"][1][:k]] + ["tokenizer"] * k, cols=k)
    paths.append(p)
    p = os.path.join(out, "guidance_sweep.png")
    sweep_plot(sweep, best, p, ATTRIBUTES, smoke)
    paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    from modalities.cli import HelpFormatter

    ap = argparse.ArgumentParser(
        prog="python -m modalities text2shape", formatter_class=HelpFormatter,
        description="Text-to-shape on captioned procedural voxel shapes, end to end on CPU: voxel tokenizer, "
                    "caption encoder + text-conditioned transformer, geometric checks, guidance sweep.",
        epilog="Running again with the same options resumes (or re-evaluates) the run in --out; "
               "other training options there are refused: use another --out, or --fresh.")
    steps = {"var_steps": "transformer steps (default: the recipe's)"}
    add_run_arguments(ap, "text2shape", steps, "seed of data, training and sampling")
    args = ap.parse_args(argv)
    c = config_from_args(ap, args, Text2ShapeConfig, steps)
    out = args.out or ("outputs/text2shape_quick" if args.quick else "outputs/text2shape")
    m = run(out, c, progress=not args.no_progress, fresh=args.fresh, quick=args.quick)
    r = m["result"]
    print(f"\n{'SMOKE RUN (--quick): the numbers below mean nothing' if args.quick else 'text2shape'}"
          f" -- {m['run']['wall_time_s'] / 60:.1f} min; cfg {r['cfg_chosen_on_val']:g} (chosen on val)")
    for name in ("seen", "held_out"):
        print(f"  {name:9s} " + ", ".join(f"{k} {r[name][k]:.3f}" for k in ATTRIBUTES if r[name][k] is not None))
    print("wrote:")
    for p in m["files"]:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
