"""Train VAR's multi-scale VQ-VAE (the piece the reference code never released).

    msar train-vqvae --data DIR|digits --size 256 --out runs/vqvae [--preset vae_ch160v4096z32]
                     [--perceptual-vgg vgg16.pth --perceptual-weight 1.0]
                     [--disc-weight 0.5 --disc-start 20000]

Multi-scale residual quantization in the training forward (straight-through),
L1 + L2 reconstruction, commitment/codebook loss, per-scale codebook usage with
dead-code restarts, optional LPIPS-style perceptual loss (VGG16 weights by path)
and PatchGAN hinge loss with adaptive weight and delayed start.  Resumes from
``--out/ckpt`` when run again.  The final tokenizer is written to ``--out/tokenizer/``
(``save_pretrained``: load it with ``VQVAE.from_pretrained``, or pass the folder as ``--vae``
to :mod:`modalities.image.imagenet.train`).
"""
from __future__ import annotations

import argparse
import os

import torch

from msar.training import VQVAETrainConfig, VQVAETrainer, build_loader

from .data import ImageFolder, load_digits, save_grid
from .losses import PatchDiscriminator, PerceptualLoss
from .presets import VQVAE_PRESETS
from .vqvae import VQVAE, VQVAEConfig


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="msar train-vqvae", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="image folder (root/<class>/*.png|jpg) or 'digits'")
    ap.add_argument("--out", default="runs/vqvae")
    ap.add_argument("--preset", choices=sorted(VQVAE_PRESETS), help="architecture preset (default: small)")
    ap.add_argument("--size", type=int, default=16, help="image side; must equal last scale x downsample")
    ap.add_argument("--channels", type=int, default=None, help="image channels (default 1 for digits, else 3)")
    ap.add_argument("--ch", type=int, default=32)
    ap.add_argument("--ch-mult", default="1,2,2")
    ap.add_argument("--z-channels", type=int, default=16)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--patch-nums", default="1,2,3,4")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--restart-every", type=int, default=100, help="dead-code restart period (0 = off)")
    ap.add_argument("--perceptual-vgg", help="VGG16 state dict (torchvision layout) for the perceptual loss")
    ap.add_argument("--lpips-lin", help="optional LPIPS linear-head weights")
    ap.add_argument("--perceptual-weight", type=float, default=1.0)
    ap.add_argument("--disc-weight", type=float, default=0.0, help="> 0 enables the PatchGAN hinge loss")
    ap.add_argument("--disc-start", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _ints(s: str, what: str, ap: argparse.ArgumentParser) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        ap.error(f"--{what} must be comma-separated integers, got {s!r}")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    digits = a.data == "digits"
    channels = a.channels or (1 if digits else 3)
    if a.preset:
        cfg = VQVAEConfig(**VQVAE_PRESETS[a.preset], in_channels=channels)
    else:
        cfg = VQVAEConfig(vocab_size=a.vocab_size, z_channels=a.z_channels, ch=a.ch, ch_mult=_ints(a.ch_mult, "ch-mult", ap),
                          num_res_blocks=1, in_channels=channels, patch_nums=_ints(a.patch_nums, "patch-nums", ap),
                          using_sa=False)
    if cfg.image_size != a.size:
        ap.error(f"--size {a.size} does not match the architecture: last scale {cfg.patch_nums[-1]} x downsample "
                 f"{cfg.downsample} = {cfg.image_size}")
    if digits:
        train, _ = load_digits(a.size, seed=a.seed)
        dataset = torch.utils.data.TensorDataset(train.images)
    else:
        dataset = ImageFolder(a.data, a.size, channels, hflip=True)
    model = VQVAE(cfg)
    perceptual = PerceptualLoss(a.perceptual_vgg, a.lpips_lin) if a.perceptual_vgg else None
    disc = PatchDiscriminator(channels) if a.disc_weight > 0 else None
    tcfg = VQVAETrainConfig(lr=a.lr, total_steps=a.steps, warmup_steps=min(100, a.steps // 10), lr_schedule="cos",
                            final_lr_ratio=0.05, restart_every=a.restart_every,
                            perceptual_weight=a.perceptual_weight if perceptual else 0.0,
                            disc_weight=a.disc_weight, disc_start=a.disc_start,
                            ckpt_dir=os.path.join(a.out, "ckpt"), ckpt_every=max(1, a.steps // 5),
                            log_dir=a.out, tensorboard=False, progress=not a.no_progress)
    trainer = VQVAETrainer(model, tcfg, perceptual=perceptual, discriminator=disc)
    trainer.fit(build_loader(dataset, a.batch_size, seed=a.seed, num_workers=a.workers))
    model.eval()
    model.save_pretrained(os.path.join(a.out, "tokenizer"))
    x = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))])
    save_grid(torch.cat([x, model.reconstruct(x)]), os.path.join(a.out, "reconstructions.png"), nrow=len(x),
              scale=max(1, 64 // a.size))
    last = trainer.history[-1] if trainer.history else {}
    print(f"wrote {a.out}/tokenizer; last step: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items()
                                                                      if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
