"""A new modality in one file: class-conditional next-scale generation of 1-D signals.

The worked example of ``docs/adapter_guide.md``. It uses only the public API
(``import msar``, ``msar.editing``, ``msar.training``, ``msar.testing``) and walks the whole path:

1. data      -- synthetic waveforms of 5 classes (sine, square, sawtooth, chirp, damped sine),
                random frequency / phase / amplitude / noise, generated from a seed (no download);
2. adapter   -- a 1-D conv encoder / decoder around the shared residual quantizer on a
                rank-1 ``GridPyramid`` (area pooling down, linear interpolation up);
3. training  -- ``VQVAETrainer`` for the tokenizer, ``TransformerTrainer`` for the
                class-conditional ``NextScaleTransformer``;
4. checks    -- ``msar.testing.check_adapter`` on the trained adapter and model;
5. sampling  -- ``msar.sample`` with classifier-free guidance and top-k / top-p, and a
                zero-shot *forecast*: the first half of a signal is given as known tokens.

Metrics (``metrics.json``): reconstruction MSE, the accuracy of a classifier trained on
real signals (features: FFT magnitude + amplitude envelope, logistic regression) on
generated signals of each class, per-scale validation loss / accuracy of the
transformer, and the forecast error on the known half.

Run::

    python -m examples.signal1d            # full run, a few minutes on CPU
    python -m examples.signal1d --quick    # ~1 minute smoke run (on an idle CPU)

Outputs (``--out``, default ``outputs/signal1d``): ``metrics.json``, ``samples.png``
(real vs generated, one row per class), ``progression.png`` (coarse-to-fine),
``forecast.png``, checkpoints under ``ckpt_*``.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import msar
from benchmarks.common import write_result_json
from msar.editing import grid_known_masks
from msar.testing import check_adapter
from msar.training import (TransformerTrainConfig, TransformerTrainer, VQVAETrainConfig, VQVAETrainer,
                           build_loader)

CLASSES = ["sine", "square", "sawtooth", "chirp", "damped"]


# ---------------------------------------------------------------------------- 1. data
def make_waveforms(n: int, length: int = 64, seed: int = 0, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` signals ``(n, 1, length)`` in about [-1, 1] and their labels ``(n,)``, balanced over classes.

    Each signal: ``amplitude * wave(2 pi f t + phase) + noise``, f in [1.5, 4] cycles per window.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    t = torch.linspace(0, 1, length).expand(n, length)
    f = 1.5 + 2.5 * torch.rand(n, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    amp = 0.6 + 0.4 * torch.rand(n, 1, generator=g)
    cyc = f * t + phase / (2 * math.pi)                      # phase in cycles
    waves = torch.stack([
        torch.sin(2 * math.pi * cyc),                                         # sine
        torch.sign(torch.sin(2 * math.pi * cyc)),                             # square
        2 * (cyc - torch.floor(cyc + 0.5)),                                   # sawtooth
        torch.sin(2 * math.pi * (f * t + 1.5 * f * t ** 2) + phase),          # chirp: frequency rises x4
        torch.exp(-3 * t) * torch.sin(2 * math.pi * 1.5 * cyc),               # damped sine
    ])                                                                        # (5, n, length)
    x = amp * waves[labels, torch.arange(n)] + noise * torch.randn(n, length, generator=g)
    return x.unsqueeze(1), labels


# ---------------------------------------------------------------------------- 2. the adapter
class Encoder(nn.Module):
    """``(B, 1, T) -> (B, C, T / 4)``: two stride-2 convs."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2), nn.GELU(),
            nn.Conv1d(width, width, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(width, width, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(width, dim, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """``(B, C, T / 4) -> (B, 1, T)``: the mirror image with transposed convs."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(dim, width, 3, padding=1), nn.GELU(),
            nn.ConvTranspose1d(width, width, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose1d(width, width, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(width, 1, 5, padding=2),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class SignalTokenizer(msar.MultiScaleVQTokenizer):
    """The whole adapter: encoder, decoder, a rank-1 schedule, and a clear input check."""

    def __init__(self, length: int = 64, vocab_size: int = 128, dim: int = 16, width: int = 64):
        full = length // 4
        # sides grow roughly geometrically up to the encoder's output length (VAR uses 1..16 for 256px)
        sides = sorted({max(1, round(full * r)) for r in (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1)})
        schedule = msar.ScaleSchedule([(s,) for s in sides])
        quantizer = msar.MultiScaleResidualQuantizer(vocab_size, dim, msar.GridPyramid(schedule),
                                                     share_phi=4, phi_ratio=0.5)
        super().__init__(Encoder(dim, width), Decoder(dim, width), quantizer)
        self.length = length

    def check_data(self, data: torch.Tensor) -> None:
        if not isinstance(data, torch.Tensor) or data.dim() != 3 or data.shape[1:] != (1, self.length):
            got = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
            raise ValueError(f"signals must be a tensor (B, 1, {self.length}), got {got}")


# ---------------------------------------------------------------------------- metrics
def features(x: torch.Tensor) -> np.ndarray:
    """Phase-invariant features of ``(B, 1, T)`` signals: FFT magnitudes + an 8-window amplitude envelope."""
    x = x[:, 0].float()
    spec = torch.fft.rfft(x, dim=-1).abs() / x.shape[-1]
    env = x.abs().unflatten(-1, (8, -1)).mean(-1)
    return torch.cat([spec, env], -1).numpy()


def fit_classifier(x: torch.Tensor, y: torch.Tensor):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(features(x), y.numpy())


def per_class_accuracy(clf, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    pred = clf.predict(features(x))
    acc = {c: float((pred[y.numpy() == i] == i).mean()) for i, c in enumerate(CLASSES)}
    acc["mean"] = float((pred == y.numpy()).mean())
    return acc


# ---------------------------------------------------------------------------- plots
def plot_samples(real: torch.Tensor, real_y: torch.Tensor, gen: torch.Tensor, gen_y: torch.Tensor, path: str,
                 per_class: int = 4) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(CLASSES), 2, figsize=(9, 1.6 * len(CLASSES)), sharex=True, sharey=True)
    for i, name in enumerate(CLASSES):
        for j, (x, y, title) in enumerate(((real, real_y, "real"), (gen, gen_y, "generated"))):
            ax = axes[i, j]
            for s in x[y == i][:per_class]:
                ax.plot(s[0].numpy(), lw=1)
            ax.set_ylim(-1.4, 1.4)
            if i == 0:
                ax.set_title(title)
            if j == 0:
                ax.set_ylabel(name)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_progression(steps: list[torch.Tensor], schedule: msar.ScaleSchedule, path: str) -> None:
    """``steps[k]`` ``(n_classes, 1, T)``: data decoded from scales <= k."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    K, n = len(steps), steps[0].shape[0]
    fig, axes = plt.subplots(n, 1, figsize=(7, 1.3 * n), sharex=True)
    cmap = plt.get_cmap("viridis")
    for i in range(n):
        for k, s in enumerate(steps):
            axes[i].plot(s[i, 0].numpy(), color=cmap(k / max(1, K - 1)), lw=1.5 if k == K - 1 else 0.8,
                         label=f"<= {schedule.shape(k)[0]} tokens" if i == 0 else None)
        axes[i].set_ylabel(CLASSES[i])
    axes[0].legend(fontsize=6, ncol=4, loc="upper right")
    fig.suptitle("coarse-to-fine: a generated signal decoded after each scale", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_forecast(real: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = real.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2), sharey=True)
    T = real.shape[-1]
    for i in range(n):
        axes[i].plot(real[i, 0].numpy(), color="k", lw=1, label="real")
        axes[i].plot(range(T // 2, T), pred[i, 0, T // 2:].numpy(), color="C3", lw=1.2, label="forecast")
        axes[i].axvline(T // 2, color="gray", ls=":")
        axes[i].set_title(CLASSES[int(labels[i])], fontsize=8)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/signal1d")
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length", type=int, default=64, help="samples per signal (multiple of 32)")
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--vq-steps", type=int, default=800)
    p.add_argument("--ar-steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--width", type=int, default=96, help="transformer embed dim")
    p.add_argument("--samples-per-class", type=int, default=40)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_val = 1000, 250
        args.vq_steps, args.ar_steps, args.samples_per_class = 200, 300, 10
        args.depth, args.width = 2, 64
    if args.length % 32:
        p.error(f"--length must be a multiple of 32, got {args.length}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    # 1. data: train / val from different seeds
    x_tr, y_tr = make_waveforms(args.n_train, args.length, seed=args.seed)
    x_va, y_va = make_waveforms(args.n_val, args.length, seed=args.seed + 10_000)

    # 2.-3a. the adapter and its VQ-VAE training
    tok = SignalTokenizer(args.length)
    vq = VQVAETrainer(tok, VQVAETrainConfig(lr=1e-3, total_steps=args.vq_steps, warmup_steps=args.vq_steps // 20,
                                            lr_schedule="cos", restart_every=100,
                                            ckpt_dir=os.path.join(args.out, "ckpt_vqvae"), log_every=10,
                                            log_dir=os.path.join(args.out, "logs_vqvae"), tensorboard=False))
    vq_steps_now = len(vq.fit(build_loader(TensorDataset(x_tr), args.batch_size, seed=args.seed)))  # 0 when resumed done
    tok.eval()
    with torch.no_grad():
        recon = torch.cat([tok.decode(tok.encode(x)) for x in x_va.split(256)])
    recon_mse = float((recon - x_va).square().mean())
    print(f"[vqvae] val reconstruction MSE {recon_mse:.4f} (signal variance {float(x_va.var()):.3f})")

    # 3b. the transformer on the frozen tokenizer's tokens (encoded on the fly by the trainer)
    schedule = tok.schedule
    model = msar.NextScaleTransformer(msar.TransformerConfig(
        schedule=schedule.to_config(), vocab_size=tok.vocab_size, latent_dim=tok.latent_dim,
        num_classes=len(CLASSES), depth=args.depth, embed_dim=args.width, num_heads=4, cond_drop_rate=0.1,
        init_std=0.02,
    ))
    ar = TransformerTrainer(model, tok, TransformerTrainConfig(
        lr=1e-3, total_steps=args.ar_steps, warmup_steps=args.ar_steps // 20, lr_schedule="cos", weight_decay=0.05,
        ckpt_dir=os.path.join(args.out, "ckpt_transformer"), log_every=10,
        log_dir=os.path.join(args.out, "logs_transformer"), tensorboard=False))
    ar_steps_now = len(ar.fit(build_loader(TensorDataset(x_tr, y_tr), args.batch_size, seed=args.seed)))
    val = ar.evaluate(build_loader(TensorDataset(x_va, y_va), 250, shuffle=False, drop_last=False), log=False)
    model.eval()

    # 4. the conformance checks on the trained adapter (the same call the tests make)
    report = check_adapter(tok, x_va[:8], model=model, labels=y_va[:8], atol=1e-4)
    print(f"[check_adapter] passed: {', '.join(report['checks'])}")

    # 5a. sampling: every class, guidance + nucleus
    n = args.samples_per_class
    labels = torch.arange(len(CLASSES)).repeat_interleave(n)
    gen = msar.sample(model, tok, labels, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    clf = fit_classifier(x_tr, y_tr)
    acc_real = per_class_accuracy(clf, x_va, y_va)
    acc_gen = per_class_accuracy(clf, gen.data, labels)
    print(f"[classifier] accuracy on real val {acc_real['mean']:.3f}, on generated {acc_gen['mean']:.3f}")
    # guidance comes free with the shared sampler: the same model at other strengths
    acc_by_cfg = {}
    for cfg in (0.0, 1.0, args.cfg, 2 * args.cfg):
        s = msar.sample(model, tok, labels, cfg=cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        acc_by_cfg[str(cfg)] = per_class_accuracy(clf, s.data, labels)["mean"]
    print(f"[classifier] accuracy on generated by guidance strength: {acc_by_cfg}")

    # 5b. zero-shot forecast: at every scale, the tokens lying wholly in the first half are known
    m = min(len(x_va), 20 * len(CLASSES))
    idx = tok.encode(x_va[:m])
    full = schedule.shape(-1)[0]
    keep = (torch.arange(full) < full // 2).expand(m, full)         # on the latent grid of the last scale
    known_mask = grid_known_masks(schedule, keep, threshold=1.0)
    fc = msar.sample(model, tok, y_va[:m], cfg=args.cfg, top_p=args.top_p, seed=args.seed,
                     known=idx, known_mask=known_mask)
    T = args.length
    second = x_va[:m, :, T // 2:]
    forecast = {"num_signals": m,
                "known_half_mse": float((fc.data[..., :T // 2] - x_va[:m, :, :T // 2]).square().mean()),
                "forecast_half_mse": float((fc.data[..., T // 2:] - second).square().mean()),
                # references: predicting zero, and an unrelated real signal of the same class
                "zero_baseline_mse": float(second.square().mean()),
                "same_class_random_signal_mse": float((x_va[m:2 * m, :, T // 2:] - second).square().mean())
                if len(x_va) >= 2 * m else None,
                "forecast_class_acc": per_class_accuracy(clf, fc.data, y_va[:m])["mean"]}

    # plots
    plot_samples(x_va, y_va, gen.data, labels, os.path.join(args.out, "samples.png"))
    first = torch.tensor([int(torch.nonzero(labels == c)[0]) for c in range(len(CLASSES))])
    prog = tok.decode_progression([i[first] for i in gen.indices])
    plot_progression(prog, schedule, os.path.join(args.out, "progression.png"))
    plot_forecast(x_va[:len(CLASSES)], fc.data[:len(CLASSES)], y_va[:len(CLASSES)],
                  os.path.join(args.out, "forecast.png"))

    metrics = {
        "config": {k: v for k, v in vars(args).items()},
        "schedule": schedule.to_config(), "tokens_per_signal": schedule.L,
        "tokenizer_params": sum(p.numel() for p in tok.parameters()),
        "transformer_params": model.num_parameters(),
        "reconstruction_mse": recon_mse, "signal_variance": float(x_va.var()),
        "codebook_usage_pct_per_scale": tok.quantizer.usage(),
        "val_per_scale": {"loss": [val[f"loss_k{k}"] for k in range(len(schedule))],
                          "acc": [val[f"acc_k{k}"] for k in range(len(schedule))]},
        "val_loss": val["loss"], "val_acc": val["acc"],
        "classifier_acc_real_val": acc_real, "classifier_acc_generated": acc_gen,
        "classifier_acc_generated_by_cfg": acc_by_cfg,
        "generated_amplitude_rms": float(gen.data.square().mean().sqrt()),
        "real_amplitude_rms": float(x_va.square().mean().sqrt()),
        "forecast": forecast, "check_adapter": {k: v for k, v in report.items() if k != "schedule"},
        "seconds": time.time() - t0,
        "steps_trained_this_run": {"vqvae": vq_steps_now, "transformer": ar_steps_now},  # 0: resumed from ckpt_*
    }
    # the record names the command that reproduces it (argv given: called from Python, e.g. a test)
    command = None if argv is None else shlex.join(["python", "-m", "examples.signal1d", *argv])
    write_result_json(os.path.join(args.out, "metrics.json"), metrics, t0, command=command)
    print(f"[done] {metrics['seconds']:.0f}s -> {args.out}/metrics.json, samples.png, progression.png, forecast.png")
    return metrics


if __name__ == "__main__":
    main()
