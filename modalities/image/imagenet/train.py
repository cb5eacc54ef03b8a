"""Train a VAR transformer on ImageNet with the published recipe.

Single GPU / CPU::

    python -m modalities.image.imagenet.train --data /data/imagenet --preset var-d16 \
        --vae vae_ch160v4096z32.pth --out runs/d16

Eight GPUs (DDP; ``var-d30`` / ``var-d36`` shard with FSDP by default)::

    torchrun --nproc_per_node=8 -m modalities.image.imagenet.train --data /data/imagenet \
        --preset var-d16 --vae vae_ch160v4096z32.pth --out runs/d16 --workers 8

Re-running the same command after a kill resumes from the newest good checkpoint in
``OUT/ckpt`` on exactly the batches and random numbers the run would have used.
Logs: ``OUT/train.csv`` (loss, accuracy and per-scale ``loss_k*`` / ``acc_k*``, lr, grad
norm), ``OUT/val.csv`` (periodic validation), ``OUT/tb`` (TensorBoard, when installed).
The final model goes to ``OUT/pipeline/`` (an :class:`~modalities.image.pipeline.ImagePipeline`
saved with ``save_pretrained``: the VQ-VAE and the transformer, EMA weights when EMA is on), which
:mod:`modalities.image.imagenet.generate` and ``ImagePipeline.from_pretrained`` load.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings

import torch

from msar import NextScaleTransformer
from msar.training import TransformerTrainConfig
from msar.training import distributed as D

from ..checkpoint import vqvae_from_state_dict, read_state_dict
from ..vqvae import VQVAE, VQVAEConfig
from .data import ImageNetFolder, SyntheticImageNet, build_imagenet_loader
from .recipes import RECIPES, Recipe, get_recipe
from .trainer import ImageNetTrainer


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m modalities.image.imagenet.train", description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="ImageNet root with train/<wnid>/*.JPEG (and val/<wnid>/*.JPEG)")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="train on N synthetic ImageNet-shaped images instead of --data (throughput checks)")
    ap.add_argument("--preset", default="var-d16", choices=sorted(RECIPES))
    ap.add_argument("--vae", help="VQ-VAE: a saved tokenizer folder (train_vqvae's OUT/tokenizer) or weights "
                                  "(.pth released layout or .safetensors)")
    ap.add_argument("--vae-config", help="VQ-VAE architecture of a weights file: a preset name or a JSON file "
                                         "(default: the recipe's)")
    ap.add_argument("--random-vae", action="store_true", help="randomly initialised VQ-VAE (smoke / speed tests only)")
    ap.add_argument("--out", default="outputs/imagenet_train")
    # optimisation (defaults: the recipe)
    ap.add_argument("--global-batch", type=int, help="images per optimizer step over all GPUs (recipe: 768 / 1024)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--epochs", type=int, help="training epochs (recipe: 200-350)")
    ap.add_argument("--steps", type=int, help="total optimizer steps (overrides --epochs; the schedule spans them)")
    ap.add_argument("--stop-at", type=int, help="stop (with a checkpoint) after this step; re-run to continue")
    ap.add_argument("--base-lr", type=float, help="lr per 256 images (recipe: 1e-4, 8e-5 for d24+)")
    ap.add_argument("--amp", choices=("fp16", "bf16", "none"), help="mixed precision on CUDA (recipe: fp16)")
    ap.add_argument("--fsdp", choices=("auto", "on", "off"), default="auto",
                    help="shard the model per block with FSDP (auto: on for var-d30 / var-d36)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    ap.add_argument("--progressive", type=float, help="progressive training: fraction of the run until all scales "
                                                      "are trained (VAR's --pg; recipe: 0 = off)")
    ap.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0 = off, as VAR)")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    # data
    ap.add_argument("--hflip", action="store_true", help="random horizontal flips (VAR: off)")
    ap.add_argument("--workers", type=int, default=4, help="data loading processes per GPU")
    ap.add_argument("--max-per-class", type=int, help="use only the first N images of every class")
    ap.add_argument("--index-cache", help="JSON file caching the training file list (default: OUT/train_index.json)")
    ap.add_argument("--num-classes", type=int, help="default: the number of class folders (1000)")
    # bookkeeping
    ap.add_argument("--val-every", type=int, default=0, help="validation loss every N steps (0 = at the end only)")
    ap.add_argument("--val-batches", type=int, default=50, help="validation batches per evaluation")
    ap.add_argument("--ckpt-every", type=int, default=1000)
    ap.add_argument("--keep-last", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--no-tensorboard", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def load_tokenizer(recipe: Recipe, path: str | None, config: str | None = None,
                   random_init: bool = False) -> VQVAE:
    """The frozen VQ-VAE: a ``save_pretrained`` folder (e.g. ``train_vqvae``'s ``OUT/tokenizer``),
    or weights from ``path`` (strict) with the architecture from ``config`` (preset name or
    JSON file) or the recipe."""
    from ..presets import VQVAE_PRESETS

    if path and os.path.isdir(path):
        if config is not None:
            raise ValueError(f"--vae {path} is a saved tokenizer with its own config; drop --vae-config")
        return VQVAE.from_pretrained(path).requires_grad_(False)
    side = os.path.join(os.path.dirname(os.path.abspath(path)), "vqvae.json") if path else ""
    if config is None and os.path.isfile(side):
        raise ValueError(f"{path}: an earlier train_vqvae output (vqvae.json beside it); pass --vae-config {side}, "
                         f"or convert it once: python -m modalities.convert {os.path.dirname(path) or '.'} NEW_DIR")
    if config is None:
        cfg = recipe.vqvae()
    elif config in VQVAE_PRESETS:
        cfg = VQVAEConfig(**VQVAE_PRESETS[config])
    elif os.path.isfile(config):
        with open(config) as f:
            cfg = VQVAEConfig(**json.load(f))
    else:
        raise ValueError(f"--vae-config {config!r} is neither a preset ({sorted(VQVAE_PRESETS)}) nor a JSON file")
    if random_init:
        return VQVAE(cfg).eval().requires_grad_(False)
    if not path:
        raise ValueError("--vae PATH is required (the VQ-VAE weights, e.g. vae_ch160v4096z32.pth); "
                         "--random-vae only for smoke tests")
    return vqvae_from_state_dict(read_state_dict(path), cfg)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if not a.data and not a.synthetic:
        ap.error("pass --data DIR (ImageNet root) or --synthetic N")
    over = {k: v for k, v in dict(base_lr=a.base_lr, amp=a.amp, progressive=a.progressive, epochs=a.epochs,
                                  global_batch=a.global_batch).items() if v is not None}
    recipe = get_recipe(a.preset, **over)
    torch.manual_seed(a.seed)
    device = D.init_distributed(a.device)
    ws = D.world_size()
    if recipe.global_batch % (ws * a.grad_accum):
        ap.error(f"--global-batch {recipe.global_batch} is not divisible by world size {ws} x grad-accum "
                 f"{a.grad_accum}")
    per_rank = recipe.global_batch // (ws * a.grad_accum)

    vqvae = load_tokenizer(recipe, a.vae, a.vae_config, a.random_vae)
    size = vqvae.cfg.image_size
    if size != recipe.image_size:
        warnings.warn(f"the VQ-VAE makes {size} px images; the {recipe.name} recipe was published at "
                      f"{recipe.image_size} px")
    val_ds = None
    if a.synthetic:
        train_ds = SyntheticImageNet(a.synthetic, size, num_classes=a.num_classes or 1000, seed=a.seed)
    else:
        cache = a.index_cache or os.path.join(a.out, "train_index.json")
        os.makedirs(a.out, exist_ok=True)
        train_ds = ImageNetFolder(a.data, "train", size, hflip=a.hflip, seed=a.seed, max_per_class=a.max_per_class,
                                  index_cache=cache)
        if os.path.isdir(os.path.join(a.data, "val")):
            val_ds = ImageNetFolder(a.data, "val", size, classes=train_ds.classes, max_per_class=a.max_per_class)
    num_classes = a.num_classes or train_ds.num_classes
    steps_per_epoch = len(train_ds) // recipe.global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"the training set has {len(train_ds)} images, fewer than one global batch "
                         f"({recipe.global_batch}); lower --global-batch")
    total = a.steps or recipe.epochs * steps_per_epoch
    warmup = round(total * recipe.warmup_epochs_frac)  # VAR: ep / 50 epochs of warm-up

    model = NextScaleTransformer(recipe.transformer(num_classes))  # VAR's init with the recipe's scales
    if ws > 1:  # identical initial weights everywhere, but each rank its own dropout / class-dropout stream
        torch.manual_seed(a.seed * ws + D.rank())
    fsdp = recipe.fsdp if a.fsdp == "auto" else a.fsdp == "on"
    if fsdp and a.fsdp == "auto" and ws == 1:
        fsdp = False  # nothing to shard over
    cfg = TransformerTrainConfig(
        lr=recipe.peak_lr(), weight_decay=recipe.weight_decay, weight_decay_end=recipe.weight_decay_end,
        betas=tuple(recipe.betas), total_steps=total, warmup_steps=warmup, lr_schedule=recipe.lr_schedule,
        warmup_start=recipe.warmup_start, final_lr_ratio=recipe.final_lr_ratio, grad_clip=recipe.grad_clip,
        grad_accum=a.grad_accum, amp=recipe.amp, compile=a.compile, ema_decay=a.ema, device=str(device),
        ckpt_dir=os.path.join(a.out, "ckpt"), ckpt_every=a.ckpt_every, keep_last=a.keep_last, resume=True,
        log_dir=a.out, log_every=a.log_every, tensorboard=not a.no_tensorboard, progress=not a.no_progress,
        label_smoothing=a.label_smoothing)
    pin = device.type == "cuda"
    val_loader = (build_imagenet_loader(val_ds, per_rank, shuffle=False, drop_last=False, num_workers=a.workers,
                                        pin_memory=pin) if val_ds is not None else None)
    trainer = ImageNetTrainer(model, vqvae, cfg, recipe, steps_per_epoch, val_loader=val_loader,
                              val_every=a.val_every, val_batches=a.val_batches, fsdp=fsdp,
                              global_batch=recipe.global_batch)
    if D.is_main():
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "run.json"), "w") as f:
            json.dump({"recipe": recipe.to_dict(), "argv": list(argv) if argv is not None else None,
                       "world_size": ws, "per_rank_batch": per_rank, "steps_per_epoch": steps_per_epoch,
                       "total_steps": total, "warmup_steps": warmup, "peak_lr": cfg.lr, "fsdp": fsdp,
                       "train_images": len(train_ds), "num_classes": num_classes}, f, indent=1, default=str)
    loader = build_imagenet_loader(train_ds, per_rank, shuffle=True, seed=a.seed, num_workers=a.workers,
                                   pin_memory=pin)
    trainer.fit(loader, steps=min(a.stop_at, total) if a.stop_at else None)
    if trainer.step >= total:
        if val_loader is not None and not (a.val_every and total % a.val_every == 0):  # else just done
            val = trainer.evaluate(val_loader, max_batches=a.val_batches)
            if D.is_main():
                print("validation: " + ", ".join(f"{k}={v:.4g}" for k, v in val.items() if "_k" not in k))
        export(trainer, model, vqvae, a.out)
    return 0


def export(trainer: ImageNetTrainer, model: NextScaleTransformer, vqvae: VQVAE, out: str) -> None:
    """``OUT/pipeline/``: ``ImagePipeline(vqvae, model).save_pretrained`` with the trained weights
    (the EMA weights when EMA is on; gathered from every rank under FSDP)."""
    from ..pipeline import ImagePipeline

    sd = ({k: v.detach().cpu() for k, v in trainer.ema.module.state_dict().items()} if trainer.ema is not None
          else trainer.full_state_dict())  # collective under FSDP
    if D.is_main():
        path = os.path.join(out, "pipeline")
        ImagePipeline(vqvae, model).save_pretrained(path, state_dicts={"transformer": sd})
        print(f"wrote {path} (step {trainer.step})")
    D.barrier()


if __name__ == "__main__":
    raise SystemExit(main())
