"""The main job: VAR end to end on scikit-learn's bundled digits, on CPU, in minutes.

    msar demo [--out outputs/demo] [--quick]

1. trains a small multi-scale VQ-VAE on the digits (upscaled to 16x16),
2. tokenizes the data and trains a small class-conditional next-scale transformer,
3. samples every class, evaluates with an independent classifier trained on real digits,
4. writes PNGs (samples per class, coarse-to-fine progression, reconstructions, an
   inpainting edit) and ``metrics.json``; the trained pipeline is saved for ``msar sample``.

Checkpoints resume: run the same command again after an interruption.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from msar import NextScaleTransformer, TransformerConfig
from msar.metrics import frechet_distance_from_features
from msar.training import (TokenDataset, TransformerTrainConfig, TransformerTrainer, VQVAETrainConfig, VQVAETrainer,
                           build_loader, collate_tokens)

from .classifier import predict, train_classifier
from .data import load_digits, save_grid
from .pipeline import ImagePipeline
from .vqvae import VQVAE, VQVAEConfig


@dataclass
class DemoConfig:
    size: int = 16
    patch_nums: tuple = (1, 2, 3, 4)   # 30 tokens over a 4x4 latent (downsample 4)
    vocab_size: int = 512
    z_channels: int = 16
    vae_ch: int = 32
    vae_ch_mult: tuple = (1, 2, 2)
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    depth: int = 4
    width: int = 128
    heads: int = 4
    var_steps: int = 2000
    var_batch: int = 64
    var_lr: float = 1e-3
    cond_drop: float = 0.1
    cfg: float = 3.0
    top_k: int = 20
    top_p: float = 0.9
    samples_per_class: int = 20
    classifier_steps: int = 500
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(vae_steps=60, var_steps=60, depth=2, width=64, heads=2, samples_per_class=4, classifier_steps=60)


def build_vqvae(c: DemoConfig) -> VQVAE:
    return VQVAE(VQVAEConfig(vocab_size=c.vocab_size, z_channels=c.z_channels, ch=c.vae_ch, ch_mult=c.vae_ch_mult,
                             num_res_blocks=1, in_channels=1, patch_nums=c.patch_nums, share_quant_resi=4,
                             using_sa=False, using_mid_sa=True))


def build_transformer(c: DemoConfig) -> NextScaleTransformer:
    cfg = TransformerConfig(schedule=[(p, p) for p in c.patch_nums], vocab_size=c.vocab_size,
                            latent_dim=c.z_channels, num_classes=10, depth=c.depth, embed_dim=c.width,
                            num_heads=c.heads, cond_drop_rate=c.cond_drop, drop_path_rate=0.0)
    return NextScaleTransformer(cfg).init_weights(init_std=-1)


def run(out: str, c: DemoConfig, progress: bool = True) -> dict:
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(c.seed)
    t0 = time.time()
    train, val = load_digits(c.size, seed=c.seed)
    metrics: dict = {"config": asdict(c), "torch": torch.__version__, "machine": platform.machine(),
                     "num_threads": torch.get_num_threads(), "train_images": len(train.labels),
                     "val_images": len(val.labels)}

    # ---- 1. multi-scale VQ-VAE
    vqvae = build_vqvae(c)
    vcfg = VQVAETrainConfig(lr=c.vae_lr, total_steps=c.vae_steps, warmup_steps=min(50, c.vae_steps // 10),
                            lr_schedule="cos", final_lr_ratio=0.05, weight_decay=0.0, restart_every=100,
                            ckpt_dir=os.path.join(out, "ckpt_vqvae"), ckpt_every=500, log_dir=os.path.join(out, "logs_vqvae"),
                            tensorboard=False, progress=progress)
    vtrainer = VQVAETrainer(vqvae, vcfg)
    vtrainer.fit(build_loader(torch.utils.data.TensorDataset(train.images), c.vae_batch, seed=c.seed))
    vqvae.eval()
    with torch.no_grad():
        rec = torch.cat([vqvae.reconstruct(x) for x in val.images.split(256)])
    metrics["vqvae"] = {"val_recon_mse": float((rec - val.images).pow(2).mean()),
                        "val_recon_l1": float((rec - val.images).abs().mean()),
                        "codebook_usage_pct_per_scale": vqvae.quantize.usage(c.vae_batch * c.patch_nums[-1] ** 2),
                        "seconds": round(time.time() - t0, 1)}
    save_grid(torch.cat([val.images[:16], rec[:16]]), os.path.join(out, "reconstructions.png"), nrow=16, scale=4)

    # ---- 2. tokens and the class-conditional transformer
    t1 = time.time()
    tr_set = TokenDataset.encode(vqvae, train.images, train.labels, batch_size=256)
    va_set = TokenDataset.encode(vqvae, val.images, val.labels, batch_size=256)
    model = build_transformer(c)
    tcfg = TransformerTrainConfig(lr=c.var_lr, total_steps=c.var_steps, warmup_steps=min(100, c.var_steps // 10),
                                  lr_schedule="lin0", final_lr_ratio=0.05, weight_decay=0.05, label_smoothing=0.0,
                                  ckpt_dir=os.path.join(out, "ckpt_var"), ckpt_every=500,
                                  log_dir=os.path.join(out, "logs_var"), tensorboard=False, progress=progress)
    trainer = TransformerTrainer(model, vqvae, tcfg)
    trainer.fit(build_loader(tr_set, c.var_batch, seed=c.seed, collate_fn=collate_tokens))
    val_loader = build_loader(va_set, 128, shuffle=False, drop_last=False, collate_fn=collate_tokens)
    metrics["transformer"] = {"params": model.num_parameters(), "L": model.L,
                              "val": trainer.evaluate(val_loader), "seconds": round(time.time() - t1, 1)}
    model.eval()
    pipe = ImagePipeline(vqvae, model)
    pipe.save_pretrained(os.path.join(out, "pipeline"))

    # ---- 3. samples and evaluation with an independent classifier
    t2 = time.time()
    clf = train_classifier(train.images, train.labels, steps=c.classifier_steps, seed=c.seed, progress=progress)
    val_pred, val_feat = predict(clf, val.images)
    labels = torch.arange(10).repeat_interleave(c.samples_per_class)
    samples, idx, _ = pipe.sample(labels, cfg=c.cfg, top_k=c.top_k, top_p=c.top_p, seed=c.seed, return_indices=True)
    pred, feat = predict(clf, samples)
    _, train_feat = predict(clf, train.images)
    metrics["samples"] = {
        "n": len(labels), "cfg": c.cfg, "top_k": c.top_k, "top_p": c.top_p,
        "classifier_acc_on_samples": float((pred == labels).float().mean()),
        "classifier_acc_on_real_val": float((val_pred == val.labels).float().mean()),
        "per_class_acc": [float((pred[labels == k] == k).float().mean()) for k in range(10)],
        "frechet_classifier_features_samples_vs_val": frechet_distance_from_features(feat.numpy(), val_feat.numpy()),
        "frechet_classifier_features_train_vs_val": frechet_distance_from_features(train_feat.numpy(), val_feat.numpy()),
        "seconds": round(time.time() - t2, 1),
    }
    order = torch.arange(len(labels)).view(10, c.samples_per_class)[:, :min(10, c.samples_per_class)].flatten()
    save_grid(samples[order], os.path.join(out, "samples_per_class.png"), nrow=min(10, c.samples_per_class), scale=4)
    prog = vqvae.decode_progression([t[:: c.samples_per_class] for t in idx])  # one sample per class
    save_grid(torch.stack(prog, 1).flatten(0, 1), os.path.join(out, "progression.png"), nrow=len(prog), scale=4)

    # ---- 4. zero-shot inpainting: regenerate the right half of real digits as another class
    mask = torch.zeros(10, 1, c.size, c.size, dtype=torch.bool)
    mask[..., c.size // 2:] = True
    src = val.images[:10]
    target = (val.labels[:10] + 1) % 10
    edited = pipe.edit(src, mask, target, cfg=c.cfg, top_k=c.top_k, top_p=c.top_p, seed=c.seed)
    save_grid(torch.cat([src, edited]), os.path.join(out, "inpainting.png"), nrow=10, scale=4)

    metrics["total_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="msar demo", description="VAR on scikit-learn digits, end to end on CPU")
    ap.add_argument("--out", default="outputs/demo", help="output directory (PNGs, metrics.json, checkpoints)")
    ap.add_argument("--quick", action="store_true", help="a one-minute smoke run with tiny models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--var-steps", type=int, help="override transformer training steps")
    ap.add_argument("--vae-steps", type=int, help="override VQ-VAE training steps")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    c = DemoConfig.quick() if args.quick else DemoConfig()
    c.seed = args.seed
    if args.var_steps:
        c.var_steps = args.var_steps
    if args.vae_steps:
        c.vae_steps = args.vae_steps
    m = run(args.out, c, progress=not args.no_progress)
    s = m["samples"]
    print(f"\nwrote {args.out}/: samples_per_class.png progression.png reconstructions.png inpainting.png metrics.json")
    print(f"VQ-VAE val recon MSE {m['vqvae']['val_recon_mse']:.4f} | transformer val loss {m['transformer']['val'].get('loss', float('nan')):.3f} "
          f"| classifier acc on samples {s['classifier_acc_on_samples']:.3f} (real val {s['classifier_acc_on_real_val']:.3f}) "
          f"| Frechet {s['frechet_classifier_features_samples_vs_val']:.2f} (train-vs-val {s['frechet_classifier_features_train_vs_val']:.2f}) "
          f"| {m['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
