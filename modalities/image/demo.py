"""The main job: VAR end to end on scikit-learn's bundled digits, on CPU, in minutes.

    msar demo [--out outputs/demo] [--quick] [--fresh]

What it does::

    train, val, test = digits upscaled to 16x16        # test: held out from training and model selection
    pool  = train + augment(train) x copies             # small rotations, zooms, shifts
    vqvae = fit multi-scale VQ-VAE on pool               # scales 1x1, 2x2, 3x3, 4x4 over a 4x4 latent
    model = fit class-conditional transformer on tokens(pool)
            (dropout, weight decay; evaluated on val every eval_every steps,
             the best weights kept, stop after `patience` evaluations without improvement)
    report on test: per-scale loss vs the unigram baseline (train token frequencies)
    sample every class -> classifier accuracy, Frechet distance of classifier features,
                          memorisation (distance to the nearest training digit, copy rate,
                          token maps identical to a training digit's)
    class editing: regenerate the right half of test digits as another class
    write figures, a few real digits as PNG, metrics.json and the pipeline (for ``msar sample``)

Timing: the default run takes about 6 minutes on an idle 2-core CPU (measure yours: the
wall time is in ``metrics.json``), ``--quick`` (tiny models, a smoke run whose numbers mean
nothing) about a minute.

Re-runs: the run's configuration is stored in ``OUT/run_config.json``. Running again with the
same configuration resumes from the checkpoints in ``OUT`` (or only re-evaluates, when
training had finished); a different configuration is refused with the list of differences
(use another ``--out``, or ``--fresh`` to discard the old run's checkpoints).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from msar import NextScaleTransformer, TransformerConfig
from msar.metrics import copy_rate, frechet_distance_from_features, nearest_neighbour_distances
from msar.training import (TokenDataset, TransformerTrainConfig, TransformerTrainer, VQVAETrainConfig, VQVAETrainer,
                           build_loader, collate_tokens)

from .classifier import predict, train_classifier
from .data import DigitsSplit, augment_digits, digits_splits, save_labelled_grid
from .pipeline import ImagePipeline
from .vqvae import VQVAE, VQVAEConfig

RUN_CONFIG = "run_config.json"
# what a run writes into its folder and ``--fresh`` removes (nothing else is touched)
RUN_STATE = ("ckpt_vqvae", "ckpt_var", "logs_vqvae", "logs_var", "var_selection", "pipeline")
# settings that only change sampling and evaluation, not the trained models
EVALUATION_FIELDS = ("cfg", "top_k", "top_p", "samples_per_class", "edit_count", "edit_cfg", "edit_threshold",
                     "edit_keep_from_scale", "classifier_steps")
FIGURES = ("samples_per_class.png", "progression.png", "reconstructions.png", "class_edit.png", "memorisation.png")


class RunConfig:
    """Base of the examples' dataclass configs that train into a run folder
    (:func:`prepare_run_folder`): ``evaluation_fields`` are the settings a re-run may change
    without retraining."""

    evaluation_fields: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict:
        """The config as plain JSON values (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    def training_json(self) -> dict:
        """What the checkpoints depend on (stored in ``run_config.json``): everything but the
        evaluation settings, which a re-run may change without retraining."""
        return {k: v for k, v in self.to_json().items() if k not in self.evaluation_fields}


@dataclass
class DemoConfig(RunConfig):
    evaluation_fields: ClassVar[tuple[str, ...]] = EVALUATION_FIELDS

    size: int = 16
    patch_nums: tuple = (1, 2, 3, 4)   # 30 tokens over a 4x4 latent (downsample 4)
    vocab_size: int = 512
    z_channels: int = 16
    vae_ch: int = 32
    vae_ch_mult: tuple = (1, 2, 2)
    # augmentation: each training digit plus `augment_copies` randomly distorted copies
    augment_copies: int = 8
    max_shift: float = 2.0             # pixels (of 16)
    max_rotate_deg: float = 12.0
    max_scale: float = 0.1
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    depth: int = 4
    width: int = 128
    heads: int = 4
    dropout: float = 0.1
    drop_path: float = 0.1
    weight_decay: float = 0.05
    cond_drop: float = 0.1
    var_steps: int = 2000              # at most; early stopping on the validation split
    var_batch: int = 64
    var_lr: float = 1e-3
    eval_every: int = 100
    patience: int = 4                  # evaluations without improvement before stopping
    cfg: float = 3.0
    top_k: int = 20
    top_p: float = 0.9
    samples_per_class: int = 20
    edit_count: int = 100              # test digits whose right half is regenerated as another class
    edit_cfg: float = 6.0              # stronger guidance than sampling: the kept half pulls toward its own class
    edit_threshold: float = 1.0        # keep a token only when its whole area lies in the kept half
    edit_keep_from_scale: int = 2      # coarser scales are regenerated: they decide the class
    classifier_steps: int = 500
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A smoke run of about a minute: tiny models, few steps; its figures mean nothing."""
        return cls(augment_copies=1, vae_steps=60, var_steps=60, depth=2, width=64, heads=2, eval_every=20,
                   samples_per_class=4, edit_count=10, classifier_steps=60)


def build_vqvae(c: DemoConfig) -> VQVAE:
    return VQVAE(VQVAEConfig(vocab_size=c.vocab_size, z_channels=c.z_channels, ch=c.vae_ch, ch_mult=c.vae_ch_mult,
                             num_res_blocks=1, in_channels=1, patch_nums=c.patch_nums, share_quant_resi=4,
                             using_sa=False, using_mid_sa=True))


def build_transformer(c: DemoConfig) -> NextScaleTransformer:
    cfg = TransformerConfig(schedule=[(p, p) for p in c.patch_nums], vocab_size=c.vocab_size,
                            latent_dim=c.z_channels, num_classes=10, depth=c.depth, embed_dim=c.width,
                            num_heads=c.heads, cond_drop_rate=c.cond_drop, drop_rate=c.dropout,
                            drop_path_rate=c.drop_path)
    return NextScaleTransformer(cfg)


# ---------------------------------------------------------------------------- the run folder
class RunFolderError(ValueError):
    """The output folder holds a run that this one must not resume."""


def prepare_run_folder(out: str, config: dict, fresh: bool = False, state: Sequence[str] = RUN_STATE) -> None:
    """Refuse to resume a run of another training configuration; record this run's (``config``:
    :meth:`RunConfig.training_json`).

    ``state``: the folders a run keeps in ``out`` (checkpoints, logs, the pipeline; the digits
    demo's by default). ``fresh`` first removes them and ``run_config.json``; figures and other
    files are overwritten later, nothing else is deleted.
    """
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, RUN_CONFIG)
    if fresh:
        for name in state:
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        if os.path.exists(path):
            os.remove(path)
    what_to_do = (f"run with --out NEW_DIR to keep both runs, or add --fresh to discard the checkpoints "
                  f"in {out} and start over")
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise RunFolderError(f"{path} is unreadable ({e}); {what_to_do}") from e
        if saved != config:
            keys = sorted(set(saved) | set(config))
            diff = [f"{k}: {saved.get(k, '(absent)')} there, {config.get(k, '(absent)')} now"
                    for k in keys if saved.get(k) != config.get(k)]
            raise RunFolderError(f"{out} holds a run with a different configuration ({'; '.join(diff)}); {what_to_do}")
        return
    leftovers = [n for n in state if os.path.exists(os.path.join(out, n))]
    if leftovers:
        raise RunFolderError(f"{out} holds checkpoints ({', '.join(leftovers)}) but no {RUN_CONFIG}, so their "
                             f"configuration is unknown; {what_to_do}")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- metrics
def unigram_loss(train_tokens: list[torch.Tensor], eval_tokens: list[torch.Tensor], vocab_size: int) -> list[float]:
    """Per scale: cross-entropy (nats) of ``eval_tokens`` under the token frequencies of
    ``train_tokens`` at that scale (add-one smoothed) -- the loss of a model that ignores
    class, position and the coarser scales. ``*_tokens``: per scale ``(N, n_k)``."""
    out = []
    for tr, ev in zip(train_tokens, eval_tokens):
        counts = torch.bincount(tr.flatten(), minlength=vocab_size).double() + 1.0
        logp = (counts / counts.sum()).log()
        out.append(float(-logp[ev.flatten()].mean()))
    return out


def identical_fraction(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Fraction of the token maps of ``a`` (all scales) equal to some token map of ``b``."""
    ref = {tuple(row) for row in torch.cat(b, 1).tolist()}
    rows = torch.cat(a, 1).tolist()
    return sum(tuple(r) in ref for r in rows) / max(1, len(rows))


def memorisation(samples: torch.Tensor, train: torch.Tensor, val: torch.Tensor, test: torch.Tensor,
                 quantile: float = 0.05) -> tuple[dict, dict]:
    """Pixel distance (L2 over the 16x16 image in [-1, 1]) of each generated and each held-out
    real digit to its nearest training digit. A digit "copies" when it is closer than the
    ``quantile`` of the validation digits' distances (the threshold is set on val, the rates
    are measured on samples and on test). -> (metrics, distances for the histogram)."""
    flat = lambda x: x.flatten(1).double().numpy()  # noqa: E731
    d_val = nearest_neighbour_distances(flat(val), flat(train))
    d_test = nearest_neighbour_distances(flat(test), flat(train))
    d_gen = nearest_neighbour_distances(flat(samples), flat(train))
    thr = float(np.quantile(d_val, quantile))
    m = {"space": "pixels", "threshold_quantile_of_val": quantile, "threshold": thr,
         "copy_rate_samples": copy_rate(d_gen, thr), "copy_rate_test_reals": copy_rate(d_test, thr),
         "median_nn_distance_samples": float(np.median(d_gen)), "median_nn_distance_test_reals": float(np.median(d_test))}
    return m, {"samples": d_gen, "test reals": d_test, "threshold": thr}


def _histogram(dists: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo = min(dists["samples"].min(), dists["test reals"].min())
    hi = max(dists["samples"].max(), dists["test reals"].max())
    bins = np.linspace(lo, hi, 30)
    ax.hist(dists["test reals"], bins=bins, alpha=0.6, density=True, label="held-out real digits (test)")
    ax.hist(dists["samples"], bins=bins, alpha=0.6, density=True, label="generated digits")
    ax.axvline(dists["threshold"], color="k", ls="--", lw=1, label="copy threshold (5% of val)")
    ax.set_xlabel("L2 distance to the nearest training digit (pixels in [-1, 1])")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


# ---------------------------------------------------------------------------- provenance
def provenance() -> dict:
    """Command, commit, date and machine, from ``benchmarks/common.py`` of the source checkout
    this module lives in (the package itself does not depend on ``benchmarks``); a minimal
    record when that file is absent (an installed copy)."""
    import importlib.util
    import platform

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "common.py")
    if os.path.isfile(path):
        spec = importlib.util.spec_from_file_location("_msar_benchmarks_common", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # (dataclasses look their module up there)
        spec.loader.exec_module(mod)
        return mod.provenance(command=_command())
    return {"command": " ".join(sys.argv), "commit": "unknown (not a source checkout)",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads()}}


def _command() -> str | None:
    """The command as the user typed it, for ``python -m modalities`` and the ``msar`` script."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == "modalities.__main__":
        return " ".join(["python -m modalities"] + sys.argv[1:])
    if os.path.basename(sys.argv[0]) == "msar":
        return " ".join(["msar"] + sys.argv[1:])
    return None  # provenance() records the process's own command line


# ---------------------------------------------------------------------------- training
def augmented_pool(train: DigitsSplit, c: DemoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training digits followed by ``c.augment_copies`` randomly shifted / rotated / zoomed
    copies (seeded by ``c.seed``), and their labels: ``(N, 1, H, W)``, ``(N,)``."""
    g = torch.Generator().manual_seed(c.seed)
    pool = torch.cat([train.images] + [augment_digits(train.images, g, c.max_shift, c.max_rotate_deg, c.max_scale)
                                       for _ in range(c.augment_copies)])
    return pool, train.labels.repeat(1 + c.augment_copies)


def transformer_train_config(c: DemoConfig, out: str) -> TransformerTrainConfig:
    """The demo's transformer recipe, checkpoints and logs under ``out``."""
    return TransformerTrainConfig(lr=c.var_lr, total_steps=c.var_steps, warmup_steps=min(100, c.var_steps // 10),
                                  lr_schedule="lin0", final_lr_ratio=0.05, weight_decay=c.weight_decay,
                                  ckpt_dir=os.path.join(out, "ckpt_var"), keep_last=1,
                                  log_dir=os.path.join(out, "logs_var"), tensorboard=False, progress=False)


def _fit_in_chunks(trainer, loader, total: int, chunk: int, bar) -> None:
    """``trainer.fit`` up to ``total`` steps, ``chunk`` steps per call (each call ends with a
    checkpoint), advancing the phase's progress bar."""
    trainer.resume()
    bar.update(min(trainer.step, total) - bar.n)
    while trainer.step < total:
        trainer.fit(loader, steps=min(total, (trainer.step // chunk + 1) * chunk))
        bar.update(trainer.step - bar.n)


def _train_transformer(trainer: TransformerTrainer, model: NextScaleTransformer, loader, val_loader, c: DemoConfig,
                       sel_dir: str, bar) -> dict:
    """Train with early stopping on the validation split; returns the selection record.

    After every ``eval_every`` steps the validation loss is appended to
    ``sel_dir/evals.json`` and the best weights so far are written to ``sel_dir/best.safetensors``;
    training stops after ``patience`` evaluations without improvement (or at ``var_steps``).
    A re-run resumes the trainer from its checkpoint and the record from ``evals.json``.
    """
    from safetensors.torch import load_file, save_file

    os.makedirs(sel_dir, exist_ok=True)
    rec_path, best_path = os.path.join(sel_dir, "evals.json"), os.path.join(sel_dir, "best.safetensors")
    evals: list = []
    if os.path.exists(rec_path):
        with open(rec_path) as f:
            evals = json.load(f)["evals"]

    def state() -> tuple[int, float, int]:  # (best step, best loss, evaluations since the best)
        best = min(range(len(evals)), key=lambda i: evals[i]["loss"]) if evals else -1
        return (evals[best]["step"], evals[best]["loss"], len(evals) - 1 - best) if evals else (0, float("inf"), 0)

    trainer.resume()
    bar.update(min(trainer.step, c.var_steps) - bar.n)
    while trainer.step < c.var_steps and state()[2] < c.patience:
        last = evals[-1]["step"] if evals else 0
        if trainer.step == last:  # else: a run killed after its checkpoint, before evaluating it
            trainer.fit(loader, steps=min(c.var_steps, last + c.eval_every))
        bar.update(trainer.step - bar.n)
        ev = {k: round(v, 6) for k, v in trainer.evaluate(val_loader, log=False).items()}
        improved = ev["loss"] < state()[1]
        evals.append({"step": trainer.step, **ev})
        if improved:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, best_path + ".tmp")
            os.replace(best_path + ".tmp", best_path)
        with open(rec_path + ".tmp", "w") as f:
            json.dump({"evals": evals}, f, indent=1)
        os.replace(rec_path + ".tmp", rec_path)
        bar.set_postfix(val_loss=f"{ev['loss']:.3f}", best=f"{state()[1]:.3f}")
    bar.update(bar.total - bar.n)  # early stop: the phase is done
    best_step, best_loss, _ = state()
    model.load_state_dict(load_file(best_path))
    return {"best_step": best_step, "best_val_loss": best_loss, "steps_trained": trainer.step,
            "stopped_early": trainer.step < c.var_steps, "evals": [{"step": e["step"], "loss": e["loss"]} for e in evals]}


# ---------------------------------------------------------------------------- the run
def run(out: str, c: DemoConfig, progress: bool = True, fresh: bool = False, quick: bool = False) -> dict:
    """Train, evaluate and write everything to ``out``; returns the metrics (also in
    ``out/metrics.json``). ``quick`` marks the figures and metrics as a smoke run."""
    t_start, cpu_start = time.time(), time.process_time()
    prepare_run_folder(out, c.training_json(), fresh)
    run_record = provenance()  # when and how the run started
    timing: dict = {}
    smoke = "\nSMOKE RUN (--quick): tiny models, the numbers mean nothing" if quick else ""
    torch.manual_seed(c.seed)
    train, val, test = digits_splits(c.size, seed=c.seed)
    pool, pool_labels = augmented_pool(train, c)
    metrics: dict = {"smoke_run": quick, "config": c.to_json(),
                     "data": {"train": len(train.labels), "val": len(val.labels), "test": len(test.labels),
                              "train_with_augmented_copies": len(pool_labels)}}
    pbar = lambda total, desc: tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True)  # noqa: E731

    # ---- 1. multi-scale VQ-VAE on the augmented pool
    t = time.time()
    vqvae = build_vqvae(c)
    vcfg = VQVAETrainConfig(lr=c.vae_lr, total_steps=c.vae_steps, warmup_steps=min(50, c.vae_steps // 10),
                            lr_schedule="cos", final_lr_ratio=0.05, weight_decay=0.0, restart_every=100,
                            ckpt_dir=os.path.join(out, "ckpt_vqvae"), keep_last=1,
                            log_dir=os.path.join(out, "logs_vqvae"), tensorboard=False, progress=False)
    vtrainer = VQVAETrainer(vqvae, vcfg)
    with pbar(c.vae_steps, "[1/5] tokenizer (VQ-VAE)") as bar:
        _fit_in_chunks(vtrainer, build_loader(torch.utils.data.TensorDataset(pool), c.vae_batch, seed=c.seed),
                       c.vae_steps, 100, bar)
    vqvae.eval()
    with torch.no_grad():
        rec = vqvae.reconstruct(test.images)
    metrics["vqvae"] = {"test_recon_mse": float((rec - test.images).pow(2).mean()),
                        "test_recon_l1": float((rec - test.images).abs().mean()),
                        "codebook_usage_pct_per_scale": vqvae.quantizer.usage(c.vae_batch * c.patch_nums[-1] ** 2)}
    timing["tokenizer"] = time.time() - t

    # ---- 2. tokens and the class-conditional transformer, early-stopped on val
    t = time.time()
    torch.manual_seed(c.seed)
    tr_set = TokenDataset.encode(vqvae, pool, pool_labels, batch_size=512)
    train_tokens = [x[: len(train.labels)] for x in tr_set.indices]  # the un-augmented digits come first
    va_set = TokenDataset.encode(vqvae, val.images, val.labels, batch_size=512)
    te_set = TokenDataset.encode(vqvae, test.images, test.labels, batch_size=512)
    model = build_transformer(c)
    trainer = TransformerTrainer(model, vqvae, transformer_train_config(c, out))
    loader = build_loader(tr_set, c.var_batch, seed=c.seed, collate_fn=collate_tokens)
    eval_loader = lambda ds: build_loader(ds, 256, seed=c.seed, shuffle=False, drop_last=False,  # noqa: E731
                                          collate_fn=collate_tokens)
    with pbar(c.var_steps, "[2/5] transformer (early stopping on val)") as bar:
        selection = _train_transformer(trainer, model, loader, eval_loader(va_set), c,
                                       os.path.join(out, "var_selection"), bar)
    model.eval()
    K = len(c.patch_nums)
    test_loss = trainer.evaluate(eval_loader(te_set), log=False)
    uni = unigram_loss(train_tokens, te_set.indices, c.vocab_size)
    model_k = [test_loss[f"loss_k{k}"] for k in range(K)]
    metrics["transformer"] = {
        "params": model.num_parameters(), "tokens_per_digit": model.seq_len, "selection": selection,
        "test_loss": test_loss["loss"], "test_acc": test_loss["acc"],
        "test_loss_per_scale": model_k, "unigram_test_loss_per_scale": uni,
        "beats_unigram_at_every_scale": all(m < u for m, u in zip(model_k, uni)),
        "train_loss_per_scale": [trainer.evaluate(eval_loader(TokenDataset(train_tokens, train.labels)),
                                                  log=False)[f"loss_k{k}"] for k in range(K)],
    }
    pipe = ImagePipeline(vqvae, model)
    pipe.save_pretrained(os.path.join(out, "pipeline"))
    timing["transformer"] = time.time() - t

    # ---- 3. an independent classifier, trained on real training digits only
    t = time.time()
    clf = train_classifier(train.images, train.labels, steps=c.classifier_steps, seed=c.seed, progress=progress,
                           desc="[3/5] evaluation classifier")
    test_pred, test_feat = predict(clf, test.images)
    _, train_feat = predict(clf, train.images)
    timing["classifier"] = time.time() - t

    # ---- 4. samples of every class
    t = time.time()
    labels = torch.arange(10).repeat_interleave(c.samples_per_class)
    chunks, idx_chunks = [], []
    with pbar(len(labels), "[4/5] sampling") as bar:
        for i in range(0, len(labels), 100):
            s, idx, _ = pipe.sample(labels[i:i + 100], cfg=c.cfg, top_k=c.top_k, top_p=c.top_p, seed=c.seed + i,
                                    return_indices=True)
            chunks.append(s)
            idx_chunks.append(idx)
            bar.update(len(s))
    samples = torch.cat(chunks)
    indices = [torch.cat([ic[k] for ic in idx_chunks]) for k in range(K)]
    pred, feat = predict(clf, samples)
    mem, dists = memorisation(samples, train.images, val.images, test.images)
    mem["identical_token_maps_samples"] = identical_fraction(indices, train_tokens)
    mem["identical_token_maps_test_reals"] = identical_fraction(te_set.indices, train_tokens)
    mem["identical_token_maps_samples_vs_augmented_train"] = identical_fraction(indices, tr_set.indices)
    metrics["samples"] = {
        "n": len(labels), "cfg": c.cfg, "top_k": c.top_k, "top_p": c.top_p,
        "classifier_acc_on_samples": float((pred == labels).float().mean()),
        "classifier_acc_on_test_reals": float((test_pred == test.labels).float().mean()),
        "per_class_acc": [float((pred[labels == k] == k).float().mean()) for k in range(10)],
        "frechet_classifier_features_samples_vs_test": frechet_distance_from_features(feat.numpy(), test_feat.numpy()),
        "frechet_classifier_features_train_vs_test": frechet_distance_from_features(train_feat.numpy(), test_feat.numpy()),
        "memorisation": mem,
    }
    timing["sampling"] = time.time() - t

    # ---- 5. class editing and figures
    t = time.time()
    with pbar(1, "[5/5] class editing + figures") as bar:
        metrics["class_edit"], edit_fig = class_edit(pipe, clf, test, c)
        bar.update(1)
    files = write_figures(out, c, samples, labels, pred, indices, vqvae, test, rec, edit_fig, dists, smoke)
    timing["editing_and_figures"] = time.time() - t

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
    metrics["files"] = files + [path, os.path.join(out, "pipeline")]
    return metrics


@torch.no_grad()
def class_edit(pipe: ImagePipeline, clf, test: DigitsSplit, c: DemoConfig) -> tuple[dict, tuple]:
    """Regenerate the right half of ``edit_count`` test digits as another class (each digit gets
    a target class other than its own, all nine in turn). Measured with the classifier on the
    edited images, and by the pixel error on the kept (left) half, next to the same error of a
    plain VQ-VAE round trip (the floor: the kept half is re-decoded, not pasted)."""
    n = min(c.edit_count, len(test.labels))
    src, y = test.images[:n], test.labels[:n]
    target = (y + 1 + torch.arange(n) % 9) % 10
    mask = torch.zeros(n, 1, c.size, c.size, dtype=torch.bool)
    mask[..., c.size // 2:] = True
    edited = pipe.edit(src, mask, target, cfg=c.edit_cfg, top_k=c.top_k, top_p=c.top_p, seed=c.seed,
                       threshold=c.edit_threshold, keep_from_scale=c.edit_keep_from_scale)
    pred, _ = predict(clf, edited)
    rec = pipe.vqvae.reconstruct(src)
    left = slice(0, c.size // 2)
    m = {"n": n, "cfg": c.edit_cfg, "threshold": c.edit_threshold, "keep_from_scale": c.edit_keep_from_scale,
         "target_class_acc": float((pred == target).float().mean()),
         "still_original_class": float((pred == y).float().mean()),
         "kept_half_l1": float((edited - src)[..., left].abs().mean()),
         "kept_half_l1_of_reconstruction": float((rec - src)[..., left].abs().mean())}
    return m, (src, edited, y, target)


def write_figures(out, c, samples, labels, pred, indices, vqvae, test, rec, edit_fig, dists, smoke) -> list[str]:
    """The labelled PNGs and a few real test digits as PNG (inputs for ``msar edit``)."""
    from PIL import Image

    from .data import to_uint8

    paths = []
    n = min(10, c.samples_per_class)
    grid = samples.view(10, c.samples_per_class, *samples.shape[1:])[:, :n]
    ok = (pred == labels).view(10, c.samples_per_class).float().mean(1)
    p = os.path.join(out, "samples_per_class.png")
    save_labelled_grid(grid, p, row_labels=[f"class {k} ({ok[k]:.0%})" for k in range(10)],
                       title=f"generated digits, one class per row (classifier accuracy per class){smoke}")
    paths.append(p)

    first = torch.arange(10) * c.samples_per_class  # one sample per class
    prog = vqvae.decode_progression([t[first] for t in indices])
    p = os.path.join(out, "progression.png")
    save_labelled_grid(torch.stack(prog, 1), p, row_labels=[f"class {k}" for k in range(10)],
                       col_labels=[f"up to {s}x{s}" for s in c.patch_nums],
                       title=f"coarse to fine: decoded\nfrom the first scales{smoke}")
    paths.append(p)

    p = os.path.join(out, "reconstructions.png")
    save_labelled_grid(torch.stack([test.images[:10], rec[:10]]), p, row_labels=["test digit", "VQ-VAE"],
                       title=f"tokenizer round trip on held-out digits{smoke}")
    paths.append(p)

    src, edited, y, target = edit_fig
    k = min(10, len(y))
    p = os.path.join(out, "class_edit.png")
    save_labelled_grid(torch.stack([src[:k], edited[:k]]), p, row_labels=["test digit", "right half\nregenerated"],
                       col_labels=[f"{int(a)} -> {int(b)}" for a, b in zip(y[:k], target[:k])],
                       title=f"class editing: the right half regenerated as the target class (digit -> target){smoke}")
    paths.append(p)

    p = os.path.join(out, "memorisation.png")
    _histogram(dists, p, "nearest-training-digit distance: generated vs held-out real" + smoke)
    paths.append(p)

    os.makedirs(os.path.join(out, "digits"), exist_ok=True)
    arr = to_uint8(test.images)
    for cls in range(10):
        i = int((test.labels == cls).nonzero()[0])
        p = os.path.join(out, "digits", f"test{i:03d}_class{cls}.png")
        Image.fromarray(arr[i]).save(p)
        paths.append(p)
    return paths


def add_run_arguments(ap: argparse.ArgumentParser, name: str, steps: dict[str, str], seed_help: str) -> None:
    """The options of every example that trains into a run folder: ``--out`` (default
    ``outputs/NAME``, ``outputs/NAME_quick`` with ``--quick``), ``--quick``, ``--fresh``, ``--seed``,
    one ``--X-steps`` per entry of ``steps`` (config field -> help) and ``--no-progress``."""
    ap.add_argument("--out", help=f"output folder (figures, metrics.json, checkpoints, the pipeline); "
                                  f"default outputs/{name}, or outputs/{name}_quick with --quick")
    ap.add_argument("--quick", action="store_true", help="a smoke run with tiny models (numbers mean nothing)")
    ap.add_argument("--fresh", action="store_true", help="discard the checkpoints of an earlier run in --out first")
    ap.add_argument("--seed", type=int, default=0, help=seed_help)
    for field_name, help_text in steps.items():
        ap.add_argument("--" + field_name.replace("_", "-"), type=int, help=help_text)
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(ap: argparse.ArgumentParser, args: argparse.Namespace, config_class: type,
                     steps: dict[str, str]) -> RunConfig:
    """The recipe (``config_class()`` or its ``quick()``) with the seed and step counts of
    :func:`add_run_arguments`'s options; a step count below 1 is a usage error."""
    c = config_class.quick() if args.quick else config_class()
    c.seed = args.seed
    for field_name in steps:
        v = getattr(args, field_name)
        if v is not None:
            if v < 1:
                ap.error(f"--{field_name.replace('_', '-')} must be >= 1, got {v}")
            setattr(c, field_name, v)
    return c


def main(argv: list[str] | None = None) -> int:
    from modalities.cli import HelpFormatter

    ap = argparse.ArgumentParser(
        prog="msar demo", formatter_class=HelpFormatter,
        description="VAR on scikit-learn's digits, end to end on CPU: tokenizer, transformer, samples, "
                    "evaluation, class editing. The default run takes about 6 minutes on an idle 2-core CPU, "
                    "--quick about one.",
        epilog="Running again with the same options resumes (or re-evaluates) the run in --out; "
               "other options there are refused: use another --out, or --fresh.")
    steps = {"var_steps": "at most this many transformer steps (default: the recipe's)",
             "vae_steps": "VQ-VAE training steps (default: the recipe's)"}
    add_run_arguments(ap, "demo", steps, "seed of data split, augmentation, training and sampling")
    args = ap.parse_args(argv)
    c = config_from_args(ap, args, DemoConfig, steps)
    out = args.out or ("outputs/demo_quick" if args.quick else "outputs/demo")
    m = run(out, c, progress=not args.no_progress, fresh=args.fresh, quick=args.quick)
    s, t, e = m["samples"], m["transformer"], m["class_edit"]
    mem = s["memorisation"]
    print(f"\n{'SMOKE RUN (--quick): tiny models, the numbers below mean nothing' if args.quick else 'digits demo'}"
          f" -- {m['run']['wall_time_s'] / 60:.1f} min")
    print(f"  held-out loss per scale {_fmt(t['test_loss_per_scale'])} vs unigram {_fmt(t['unigram_test_loss_per_scale'])}"
          f" (best val step {t['selection']['best_step']})")
    print(f"  classifier accuracy on samples {s['classifier_acc_on_samples']:.3f} (on real test digits "
          f"{s['classifier_acc_on_test_reals']:.3f}); copy rate {mem['copy_rate_samples']:.3f} "
          f"(held-out reals {mem['copy_rate_test_reals']:.3f}); token maps identical to a training digit's "
          f"{mem['identical_token_maps_samples']:.3f}")
    print(f"  class editing: target class {e['target_class_acc']:.2f}, kept-half L1 {e['kept_half_l1']:.3f} "
          f"(round trip {e['kept_half_l1_of_reconstruction']:.3f})")
    print("wrote:")
    for p in m["files"]:
        print(f"  {p}")
    print(f"try: msar sample --model {out}/pipeline --labels 0,1,2,3 --cfg {c.cfg:g} --top-k {c.top_k}")
    return 0


def _fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"


if __name__ == "__main__":
    raise SystemExit(main())
