"""Text-to-image on captioned shapes, on CPU: a multi-scale VQ tokenizer and a text-conditioned
next-scale transformer, scored per attribute by a detector trained on real scenes.

    python -m modalities text2image [--out outputs/text2image] [--quick] [--fresh]

What it does::

    train, val, test_seen, test_heldout = captioned scenes        # modalities.image.captioned_shapes
        (held-out (shape, colour) pairs, e.g. every green triangle, only in test_heldout)
    vqvae   = fit multi-scale VQ-VAE on train images              # scales 1, 2, 4, 8 over an 8x8 latent
    words   = WordTokenizer.from_corpus(train captions)           # msar.text
    encoder, transformer = fit jointly on tokens(train) + caption ids (cross-attention on the
              encoder's word features, condition dropout -> learned null condition for guidance)
    detector = fit on real rendered objects                       # modalities.image.shape_detector
    for cfg in the guidance sweep: one sample per caption of val, test_seen and test_heldout,
              read back by the detector -> per-attribute accuracy (count, shape, colour, size, position)
    the guidance reported as the result is the one with the best val accuracy (val: seen pairs only;
              the test splits never choose anything)
    editing: regenerate the second object of two-object test scenes under a new caption
             (known tokens outside its box, ImagePipeline.edit), scored on the decoded image
    write PNG grids with their captions, metrics.json (with the run record) and the pipeline

Re-runs: as in the digits demo (:mod:`modalities.image.demo`), ``OUT/run_config.json`` holds the
training configuration; the same configuration resumes from the checkpoints in ``OUT`` (or only
re-evaluates), a different one is refused at start with the list of differences.

Timing: the default run takes about 25 CPU-minutes at one thread (more wall time on a shared,
loaded core; the measured times are in ``metrics.json``); ``--quick`` (tiny models,
numbers that mean nothing) a few seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

import msar
from msar.text import TextEncoder, TextEncoderConfig, WordTokenizer
from msar.training import TransformerTrainConfig, TransformerTrainer, VQVAETrainConfig, VQVAETrainer, build_loader

from .captioned_shapes import (COLOURS, HELD_OUT, CaptionedScenes, Scene, SceneObject, caption,
                               check_held_out)
from .data import save_labelled_grid
from .demo import (RunConfig, RunFolderError, _fit_in_chunks, add_run_arguments, config_from_args,  # noqa: F401
                   prepare_run_folder, provenance)  # (RunFolderError and provenance are re-exported)
from .pipeline import ImagePipeline
from .shape_detector import ATTRIBUTES, ShapeDetector, summarise
from .vqvae import VQVAE, VQVAEConfig

RUN_CONFIG = "run_config.json"
# settings that only change sampling and evaluation, not the trained models
EVALUATION_FIELDS = ("cfg_sweep", "top_k", "top_p", "n_eval", "edit_count", "edit_threshold", "edit_keep_from_scale",
                     "detector_steps", "grid_captions", "grid_samples")
FIGURES = ("samples.png", "guidance_sweep.png", "edits.png", "reconstructions.png", "progression.png")
EVAL_SETS = ("val", "test_seen", "test_heldout")


@dataclass
class Text2ImageConfig(RunConfig):
    evaluation_fields: ClassVar[tuple[str, ...]] = EVALUATION_FIELDS

    n_train: int = 12000
    n_val: int = 200                   # val scenes: validation loss and the choice of guidance
    n_eval: int = 200                  # captions per evaluation set (val, test_seen, test_heldout)
    held_out: tuple = HELD_OUT         # (shape, colour) pairs never in train / val
    patch_nums: tuple = (1, 2, 4, 8)   # 85 tokens over an 8x8 latent (downsample 4)
    vocab_size: int = 256
    z_channels: int = 16
    vae_ch: int = 32
    vae_steps: int = 4000              # 1200 steps leave small squares with rounded corners
    vae_batch: int = 16
    vae_lr: float = 2e-3
    max_length: int = 16               # words + <eos> of the longest caption (14)
    text_dim: int = 64
    text_depth: int = 2
    text_heads: int = 4
    depth: int = 4
    width: int = 128
    heads: int = 4
    dropout: float = 0.0
    cond_drop: float = 0.1             # condition dropout: trains the null condition of guidance
    var_steps: int = 2500
    var_batch: int = 32
    var_lr: float = 1e-3
    weight_decay: float = 0.05
    cfg_sweep: tuple = (0.0, 1.0, 3.0, 6.0)
    top_k: int = 0
    top_p: float = 0.8
    edit_count: int = 100
    edit_threshold: float = 1.0        # keep a token only when its whole area lies outside the edited box
    edit_keep_from_scale: int = 1      # the 1x1 scale straddles everything: regenerated
    detector_steps: int = 300
    grid_captions: int = 6             # captions per test set in samples.png
    grid_samples: int = 4              # samples per caption in samples.png
    seed: int = 0

    @classmethod
    def quick(cls) -> "Text2ImageConfig":
        """A smoke run of seconds: tiny models, few steps; its numbers mean nothing."""
        return cls(n_train=128, n_val=16, n_eval=12, vae_steps=8, var_steps=10, text_dim=16, text_depth=1,
                   text_heads=2, depth=1, width=32, heads=2, vocab_size=64, cfg_sweep=(0.0, 3.0), edit_count=4,
                   detector_steps=40, grid_captions=2, grid_samples=2)


def build_vqvae(c: Text2ImageConfig) -> VQVAE:
    """A light VAR VQ-VAE: no residual blocks in the encoder, one per decoder level, no attention
    (the full-resolution convolutions dominate the cost on a CPU)."""
    return VQVAE(VQVAEConfig(vocab_size=c.vocab_size, z_channels=c.z_channels, ch=c.vae_ch, ch_mult=(1, 1, 1),
                             num_res_blocks=0, in_channels=3, patch_nums=c.patch_nums, share_quant_resi=4,
                             using_sa=False, using_mid_sa=False))


def build_text_encoder(c: Text2ImageConfig, words: WordTokenizer) -> TextEncoder:
    return TextEncoder(TextEncoderConfig.for_tokenizer(words, dim=c.text_dim, depth=c.text_depth,
                                                       num_heads=c.text_heads))


def build_transformer(c: Text2ImageConfig, cond_dim: int) -> msar.NextScaleTransformer:
    return msar.NextScaleTransformer(msar.TransformerConfig(
        schedule=[(p, p) for p in c.patch_nums], vocab_size=c.vocab_size, latent_dim=c.z_channels, num_classes=0,
        depth=c.depth, embed_dim=c.width, num_heads=c.heads, drop_rate=c.dropout, cond_kind="sequence",
        cond_dim=cond_dim, cond_drop_rate=c.cond_drop))


class CaptionTokens(torch.utils.data.Dataset):
    """Item i: ``(token maps [(n_k,)], caption ids (T,), mask (T,))`` -- what
    :class:`~msar.training.TransformerTrainer` with a ``condition_encoder`` reads once collated."""

    def __init__(self, indices: Sequence[torch.Tensor], captions: Sequence[str], words: WordTokenizer):
        self.indices = list(indices)
        self.ids, self.mask = words(list(captions))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return [t[i] for t in self.indices], self.ids[i], self.mask[i]


# ---------------------------------------------------------------------------- sampling and scoring
@torch.no_grad()
def generate(pipe: msar.Pipeline, captions: Sequence[str], c: Text2ImageConfig, cfg: float, seed: int,
             batch_size: int = 100) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One image per caption ``(N, 3, 32, 32)`` and its tokens; batch b is seeded ``seed + b``."""
    imgs, idx = [], []
    for b, i in enumerate(range(0, len(captions), batch_size)):
        cond = pipe.text_encoder.encode(captions[i:i + batch_size])
        out = msar.sample(pipe.transformer, pipe.tokenizer, condition=cond, cfg=cfg, top_k=c.top_k, top_p=c.top_p,
                          seed=seed + b)
        imgs.append(out.data)
        idx.append(out.indices)
    return torch.cat(imgs), [torch.cat([p[k] for p in idx]) for k in range(len(idx[0]))]


def guidance_sweep(pipe: msar.Pipeline, captions: dict[str, Sequence[str]], c, bar,
                   score: Callable[[str, torch.Tensor], dict]) -> dict:
    """Per guidance strength of ``c.cfg_sweep`` and evaluation set: ``score(set name, samples)`` of
    one sample per caption (``captions``: set name -> its captions; set ``name`` is seeded
    ``c.seed + 1000 * EVAL_SETS.index(name)``).  Used by every text-conditioned example."""
    out = {}
    for cfg in c.cfg_sweep:
        row = {}
        for name, caps in captions.items():
            samples, _ = generate(pipe, caps, c, cfg, seed=c.seed + 1000 * EVAL_SETS.index(name))
            row[name] = score(name, samples)
            bar.update(1)
        out[f"{cfg:g}"] = row
    return out


def choose_guidance(sweep: dict) -> float:
    """The guidance strength of ``sweep`` (``{cfg: {set: {"all": accuracy, ...}}}``) with the best
    accuracy on ``val``, the weaker one on a tie; the test sets are never read."""
    return float(max(sweep, key=lambda g: (sweep[g]["val"]["all"], -float(g))))


# ---------------------------------------------------------------------------- editing
def edit_target(scene: Scene, i: int, held_out: Sequence[tuple[str, str]]) -> Scene:
    """``scene`` (two objects) with its second object recoloured: colour ``i``-th in turn among
    the others, skipping held-out pairs (the edit asks for seen combinations)."""
    a, b = scene.objects
    colours = [k for k in COLOURS if k != b.colour and (b.shape, k) not in set(held_out)]
    new = SceneObject(b.shape, colours[i % len(colours)], b.size, b.cx, b.cy)
    return Scene((a, new), scene.relation)


def edit_box(obj: SceneObject, canvas: int, pad: float = 2.0) -> torch.Tensor:
    """Bool ``(canvas, canvas)``: the object's bounding box grown by ``pad`` pixels."""
    y, x = torch.meshgrid(torch.arange(canvas) + 0.5, torch.arange(canvas) + 0.5, indexing="ij")
    r = obj.radius + pad
    return ((x - obj.cx).abs() <= r) & ((y - obj.cy).abs() <= r)


@torch.no_grad()
def caption_edit(pipe: ImagePipeline, detector: ShapeDetector, test: CaptionedScenes, c: Text2ImageConfig,
                 cfg: float) -> tuple[dict, tuple]:
    """Zero-shot editing with a new caption: for two-object test scenes, the second object's box is
    regenerated under a caption that recolours it; tokens whose whole area lies outside the box are
    the source's (known tokens at scales >= ``edit_keep_from_scale``). Scored by the detector on the
    decoded image against the new caption, and by the pixel error outside the box next to the error
    of a plain tokenizer round trip (the floor: the kept part is re-decoded, not pasted)."""
    pick = [i for i, s in enumerate(test.scenes) if s.count == 2][:c.edit_count]
    src = test.images[pick]
    targets = [edit_target(test.scenes[i], j, c.held_out) for j, i in enumerate(pick)]
    box = torch.stack([edit_box(test.scenes[i].objects[1], src.shape[-1]) for i in pick])  # (N, H, W)
    edited, _, _, known_mask = pipe.edit(src, box, captions=[caption(t) for t in targets], cfg=cfg, top_k=c.top_k,
                                         top_p=c.top_p, seed=c.seed + 5000, threshold=c.edit_threshold,
                                         keep_from_scale=c.edit_keep_from_scale, return_indices=True)
    rec = pipe.tokenizer.reconstruct(src)
    outside = (~box).unsqueeze(1).expand_as(src)
    m = {"n": len(pick), "cfg": cfg, "threshold": c.edit_threshold, "keep_from_scale": c.edit_keep_from_scale,
         "new_caption": summarise(detector.score(edited, [t.attributes() for t in targets])),
         "still_old_caption": summarise(detector.score(edited, [test.scenes[i].attributes() for i in pick])),
         "known_tokens_fraction": float(torch.cat([k.float() for k in known_mask], 1).mean()),
         "kept_region_l1": float((edited - src).abs()[outside].mean()),
         "kept_region_l1_of_reconstruction": float((rec - src).abs()[outside].mean())}
    return m, (src, box, edited, [caption(t) for t in targets])


# ---------------------------------------------------------------------------- the run
def run(out: str, c: Text2ImageConfig, progress: bool = True, fresh: bool = False, quick: bool = False) -> dict:
    """Train, evaluate and write everything to ``out``; returns the metrics (also in
    ``out/metrics.json``). ``quick`` marks the figures and metrics as a smoke run."""
    t_start, cpu_start = time.time(), time.process_time()
    c.held_out = check_held_out(c.held_out)
    prepare_run_folder(out, c.training_json(), fresh)
    run_record = provenance()
    timing: dict = {}
    smoke = "\nSMOKE RUN (--quick): tiny models,\nthe numbers mean nothing" if quick else ""
    pbar = lambda total, desc: tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True)  # noqa: E731

    # ---- 0. data, deterministic from the seed
    t = time.time()
    torch.manual_seed(c.seed)
    n_eval = max(c.n_eval, c.grid_captions)
    train = CaptionedScenes("train", c.n_train, c.seed, c.held_out)
    sets = {"val": CaptionedScenes("val", max(c.n_val, n_eval), c.seed, c.held_out),
            "test_seen": CaptionedScenes("test_seen", n_eval, c.seed, c.held_out),
            "test_heldout": CaptionedScenes("test_heldout", n_eval, c.seed, c.held_out)}
    metrics: dict = {"smoke_run": quick, "config": c.to_json(),
                     "data": {"train": len(train), **{k: len(v) for k, v in sets.items()},
                              "held_out_pairs": [list(h) for h in c.held_out],
                              "example_captions": train.captions[:3]}}
    timing["data"] = time.time() - t

    # ---- 1. multi-scale VQ-VAE on the training images
    t = time.time()
    vqvae = build_vqvae(c)
    vcfg = VQVAETrainConfig(lr=c.vae_lr, total_steps=c.vae_steps, warmup_steps=min(50, c.vae_steps // 10),
                            lr_schedule="cos", final_lr_ratio=0.05, weight_decay=0.0, restart_every=100,
                            ckpt_dir=os.path.join(out, "ckpt_vqvae"), keep_last=1,
                            log_dir=os.path.join(out, "logs_vqvae"), tensorboard=False, progress=False)
    vtrainer = VQVAETrainer(vqvae, vcfg)
    with pbar(c.vae_steps, "[1/5] tokenizer (VQ-VAE)") as bar:
        _fit_in_chunks(vtrainer, build_loader(torch.utils.data.TensorDataset(train.images), c.vae_batch, seed=c.seed),
                       c.vae_steps, 200, bar)
    vqvae.eval()
    timing["tokenizer"] = time.time() - t

    # ---- 2. the detector, on real rendered objects only
    t = time.time()
    with pbar(1, "[2/5] attribute detector") as bar:
        detector = ShapeDetector.fit(seed=c.seed, steps=c.detector_steps)
        bar.update(1)
    with torch.no_grad():
        recs = {k: vqvae.reconstruct(v.images[:c.n_eval]) for k, v in sets.items() if k != "val"}
    metrics["detector"] = {
        "on_real": {k: detector.accuracy_on_real(CaptionedScenes(k, c.n_eval, c.seed + 1, c.held_out))
                    for k in ("test_seen", "test_heldout")},
        # the ceiling of generated scenes: what survives the tokenizer's round trip
        "on_tokenizer_reconstructions": {k: summarise(detector.score(r, [s.attributes() for s in sets[k].scenes]))
                                         for k, r in recs.items()}}
    seen_mse = float((recs["test_seen"] - sets["test_seen"].images[:c.n_eval]).pow(2).mean())
    metrics["vqvae"] = {"test_seen_recon_mse": seen_mse,
                        "codebook_usage_pct_per_scale": vqvae.quantizer.usage(c.vae_batch * c.patch_nums[-1] ** 2)}
    timing["detector"] = time.time() - t

    # ---- 3. caption encoder + text-conditioned transformer, trained jointly
    t = time.time()
    torch.manual_seed(c.seed)
    words = WordTokenizer.from_corpus(train.captions, max_length=c.max_length)
    encoder = build_text_encoder(c, words)
    model = build_transformer(c, encoder.feature_dim)
    with torch.no_grad():
        tr_set = CaptionTokens(msar.training.TokenDataset.encode(vqvae, train.images, batch_size=512).indices,
                               train.captions, words)
        va_set = CaptionTokens(msar.training.TokenDataset.encode(vqvae, sets["val"].images, batch_size=512).indices,
                               sets["val"].captions, words)
    tcfg = TransformerTrainConfig(lr=c.var_lr, total_steps=c.var_steps, warmup_steps=min(100, c.var_steps // 10),
                                  lr_schedule="lin0", final_lr_ratio=0.05, weight_decay=c.weight_decay,
                                  ckpt_dir=os.path.join(out, "ckpt_var"), keep_last=1,
                                  log_dir=os.path.join(out, "logs_var"), tensorboard=False, progress=False)
    trainer = TransformerTrainer(model, vqvae, tcfg, condition_encoder=encoder)
    with pbar(c.var_steps, "[3/5] text encoder + transformer") as bar:
        _fit_in_chunks(trainer, build_loader(tr_set, c.var_batch, seed=c.seed), c.var_steps, 250, bar)
    model.eval()
    encoder.eval()
    val_loss = trainer.evaluate(build_loader(va_set, 256, shuffle=False, drop_last=False), log=False)
    metrics["transformer"] = {"params": model.num_parameters(), "text_encoder_params":
                              sum(p.numel() for p in encoder.parameters()), "tokens_per_image": model.seq_len,
                              "caption_vocabulary": words.vocab_size, "steps": trainer.step,
                              "val_loss": val_loss["loss"], "val_loss_per_scale":
                              [val_loss[f"loss_k{k}"] for k in range(len(c.patch_nums))]}
    pipe = ImagePipeline(vqvae, model, text_encoder=encoder)
    pipe.save_pretrained(os.path.join(out, "pipeline"))
    timing["transformer"] = time.time() - t

    # ---- 4. guidance sweep: per-attribute accuracy, seen and held-out pairs; val picks the guidance
    t = time.time()
    with pbar(len(c.cfg_sweep) * len(sets), "[4/5] sampling (guidance sweep)") as bar:
        sweep = guidance_sweep(
            pipe, {name: data.captions[:c.n_eval] for name, data in sets.items()}, c, bar,
            lambda name, imgs: summarise(detector.score(imgs, [s.attributes() for s in sets[name].scenes[:c.n_eval]])))
    best = choose_guidance(sweep)
    chosen = sweep[f"{best:g}"]
    metrics["guidance_sweep"] = sweep
    metrics["result"] = {"cfg_chosen_on_val": best, "top_k": c.top_k, "top_p": c.top_p,
                         "seen": chosen["test_seen"], "held_out": chosen["test_heldout"],
                         "goal": {"seen_all_attributes": 0.9, "held_out_all_attributes": 0.7}}
    timing["sampling"] = time.time() - t

    # ---- 5. caption editing and figures
    t = time.time()
    with pbar(1, "[5/5] editing + figures") as bar:
        metrics["caption_edit"], edit_fig = caption_edit(pipe, detector, sets["test_seen"], c, best)
        files = write_figures(out, c, pipe, sets, sweep, best, recs, edit_fig, smoke)
        bar.update(1)
    timing["editing_and_figures"] = time.time() - t

    path = write_metrics(out, metrics, run_record, timing, t_start, cpu_start)
    metrics["files"] = files + [path, os.path.join(out, "pipeline")]
    return metrics


def write_metrics(out: str, metrics: dict, run_record: dict, timing: dict, t_start: float, cpu_start: float) -> str:
    """Add the phase timings and the run record (``provenance()`` taken at start, plus wall and
    CPU time since ``t_start`` / ``cpu_start``) to ``metrics`` and write ``out/metrics.json``
    atomically; returns its path."""
    metrics["timing_s"] = {k: round(v, 1) for k, v in timing.items()}
    run_record["started"] = run_record["date"]
    run_record["wall_time_s"] = round(time.time() - t_start, 1)
    # CPU seconds of all threads: close to the wall time of an idle machine at one thread
    run_record["cpu_time_s"] = round(time.process_time() - cpu_start, 1)
    metrics["run"] = run_record
    path = os.path.join(out, "metrics.json")
    with open(path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


# ---------------------------------------------------------------------------- figures
def _wrap(text: str, width: int = 20) -> str:
    return "\n".join(textwrap.wrap(text, width))


def write_figures(out: str, c: Text2ImageConfig, pipe: msar.Pipeline, sets: dict, sweep: dict, best: float,
                  recs: dict, edit_fig: tuple, smoke: str) -> list[str]:
    paths = []
    # samples per caption: seen pairs on top, held-out below
    rows, labels, tokens = [], [], []
    for name in ("test_seen", "test_heldout"):
        for j, cap in enumerate(sets[name].captions[:c.grid_captions]):
            imgs, idx = generate(pipe, [cap] * c.grid_samples, c, best, seed=c.seed + 9000 + 10 * j + len(rows))
            rows.append(imgs)
            tokens.append([t[:1] for t in idx])
            labels.append(_wrap(("[held-out] " if name == "test_heldout" else "") + cap))
    p = os.path.join(out, "samples.png")
    save_labelled_grid(torch.stack(rows), p, row_labels=labels, cell=0.9,
                       title=f"{c.grid_samples} samples per caption (cfg {best:g}, chosen on val)\nrows marked "
                             f"[held-out] ask for a (shape, colour)\npair never seen in training{smoke}")
    paths.append(p)

    p = os.path.join(out, "progression.png")
    prog = pipe.tokenizer.decode_progression([torch.cat([tk[k] for tk in tokens]) for k in range(len(c.patch_nums))])
    save_labelled_grid(torch.stack(prog, 1), p, row_labels=labels, col_labels=[f"up to {s}x{s}" for s in c.patch_nums],
                       cell=0.9, title=f"coarse to fine: the first sample of each caption\ndecoded from the first "
                                       f"scales{smoke}")
    paths.append(p)

    p = os.path.join(out, "reconstructions.png")
    n = min(10, len(recs["test_seen"]))
    save_labelled_grid(torch.stack([sets["test_seen"].images[:n], recs["test_seen"][:n]]), p,
                       row_labels=["test scene", "tokenizer"], title=f"tokenizer round trip on test scenes{smoke}")
    paths.append(p)

    src, box, edited, caps = edit_fig
    k = min(8, len(caps))
    shown = src[:k].clone()
    shown[box[:k].unsqueeze(1).expand(-1, 3, -1, -1)] *= 0.4  # the regenerated box, dimmed
    p = os.path.join(out, "edits.png")
    save_labelled_grid(torch.stack([src[:k], shown, edited[:k]], 1), p, row_labels=[_wrap(s) for s in caps[:k]],
                       col_labels=["test scene", "box to\nregenerate", "edited"], cell=0.9,
                       title=f"editing with a new caption (row label):\nthe box is regenerated, the rest "
                             f"is kept{smoke}")
    paths.append(p)

    p = os.path.join(out, "guidance_sweep.png")
    sweep_plot(sweep, best, p, ATTRIBUTES + ("all",), smoke)
    paths.append(p)
    return paths


def sweep_plot(sweep: dict, best: float, path: str, attributes: Sequence[str], smoke: str = "") -> None:
    """Accuracy per attribute vs guidance strength, seen and held-out test sets side by side
    (``sweep[cfg][set][attribute]``; ``best``: the guidance chosen on val, dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = [float(g) for g in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, name, title in zip(axes, ("test_seen", "test_heldout"), ("seen pairs", "held-out pairs")):
        for attr in attributes:
            ys = [sweep[g][name][attr] for g in sweep]
            if all(y is None for y in ys):  # (an attribute no caption of the set asks about)
                continue
            ax.plot(cfgs, [np.nan if y is None else y for y in ys], marker="o", lw=2.5 if attr == "all" else 1,
                    label=attr)
        ax.axvline(best, color="k", ls="--", lw=0.8)
        ax.set_xlabel("guidance strength (cfg)")
        ax.set_title(f"{title} (test)", fontsize=9)
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("accuracy (detector on samples)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"per-attribute accuracy vs guidance; dashed: cfg chosen on val{smoke}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    from modalities.cli import HelpFormatter

    ap = argparse.ArgumentParser(
        prog="python -m modalities text2image", formatter_class=HelpFormatter,
        description="Text-to-image on captioned shapes, end to end on CPU: tokenizer, caption encoder + "
                    "text-conditioned transformer, attribute detector, guidance sweep, caption editing. "
                    "The default run takes about 25 CPU-minutes at one thread, --quick seconds.",
        epilog="Running again with the same options resumes (or re-evaluates) the run in --out; "
               "other training options there are refused: use another --out, or --fresh.")
    steps = {"var_steps": "transformer steps (default: the recipe's)", "vae_steps": "VQ-VAE steps (default: the recipe's)"}
    add_run_arguments(ap, "text2image", steps, "seed of data, training and sampling")
    args = ap.parse_args(argv)
    c = config_from_args(ap, args, Text2ImageConfig, steps)
    out = args.out or ("outputs/text2image_quick" if args.quick else "outputs/text2image")
    m = run(out, c, progress=not args.no_progress, fresh=args.fresh, quick=args.quick)
    r = m["result"]
    print(f"\n{'SMOKE RUN (--quick): tiny models, the numbers below mean nothing' if args.quick else 'text2image'}"
          f" -- {m['run']['wall_time_s'] / 60:.1f} min; cfg {r['cfg_chosen_on_val']:g} (chosen on val)")
    for name in ("seen", "held_out"):
        print(f"  {name:9s} " + ", ".join(f"{k} {r[name][k]:.3f}" for k in ATTRIBUTES + ("all",)))
    d = m["detector"]["on_real"]
    print(f"  detector on real test scenes: all attributes {d['test_seen']['all']:.3f} (seen), "
          f"{d['test_heldout']['all']:.3f} (held-out)")
    e = m["caption_edit"]
    print(f"  caption editing: new caption read back {e['new_caption']['all']:.3f}, kept-region L1 "
          f"{e['kept_region_l1']:.3f} (round trip {e['kept_region_l1_of_reconstruction']:.3f})")
    print("wrote:")
    for p in m["files"]:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
