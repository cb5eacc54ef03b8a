"""Speed and quality of the approximate sampling modes (``msar.acceleration``) on digits.

    python -m benchmarks.acceleration [--out outputs/acceleration] [--smoke]

Training (once, resumed from ``OUT``): the digits demo's pipeline (its default config: the
draft model) and a small refiner transformer on the same tokenizer and tokens. Then every
mode samples the same labels with the same seeds; speed is measured interleaved (mode after
mode, round after round; wall and process CPU time), quality on the decoded digits with the
demo's independent classifier (accuracy, Fréchet distance of its features to the test digits).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace

import torch

from benchmarks.common import RESULTS, savefig, write_result_json
from modalities.image import demo as digits_demo
from modalities.image.classifier import predict, train_classifier
from modalities.image.data import digits_splits
from modalities.image.pipeline import ImagePipeline
from msar import sample
from msar.acceleration import Acceleration, quantize_int8
from msar.metrics import frechet_distance_from_features
from msar.training import TokenDataset, TransformerTrainer, build_loader, collate_tokens


REFINERS = {"refiner": dict(depth=2, width=64, heads=2), "refiner_d1": dict(depth=1, width=64, heads=2)}


def train_models(out: str, smoke: bool = False, progress: bool = False) -> tuple[ImagePipeline, dict]:
    """The demo's pipeline (``OUT/demo/pipeline``) and the small refiners of :data:`REFINERS`
    (``OUT/<name>``, early-stopped on the validation split as the demo's model), trained once;
    a second call loads them. Returns ``(pipeline, {name: refiner})``."""
    c = digits_demo.DemoConfig.quick() if smoke else digits_demo.DemoConfig(edit_count=10)
    demo_out = os.path.join(out, "demo")
    if not os.path.exists(os.path.join(demo_out, "metrics.json")):
        digits_demo.run(demo_out, c, progress=progress, quick=smoke)
    pipe = ImagePipeline.from_pretrained(os.path.join(demo_out, "pipeline"))
    pipe.transformer.eval()
    return pipe, {name: _train_refiner(os.path.join(out, name), pipe, replace(c, **size), progress)
                  for name, size in REFINERS.items()}


def _train_refiner(ref_dir: str, pipe: ImagePipeline, c, progress: bool) -> torch.nn.Module:
    from safetensors.torch import load_file

    refiner = digits_demo.build_transformer(c)
    best = os.path.join(ref_dir, "var_selection", "best.safetensors")
    done = os.path.join(ref_dir, "done")
    if not os.path.exists(done):
        torch.manual_seed(c.seed)
        train, val, _ = digits_splits(c.size, seed=c.seed)
        pool, pool_labels = digits_demo.augmented_pool(train, c)
        tr_set = TokenDataset.encode(pipe.vqvae, pool, pool_labels, batch_size=512)
        va_set = TokenDataset.encode(pipe.vqvae, val.images, val.labels, batch_size=512)
        trainer = TransformerTrainer(refiner, pipe.vqvae, digits_demo.transformer_train_config(c, ref_dir))
        loader = build_loader(tr_set, c.var_batch, seed=c.seed, collate_fn=collate_tokens)
        val_loader = build_loader(va_set, 256, shuffle=False, drop_last=False, collate_fn=collate_tokens)
        from tqdm.auto import tqdm
        with tqdm(total=c.var_steps, disable=not progress) as bar:
            digits_demo._train_transformer(trainer, refiner, loader, val_loader, c,
                                           os.path.join(ref_dir, "var_selection"), bar)
        open(done, "w").close()
    refiner.load_state_dict(load_file(best))
    return refiner.eval()


# ---------------------------------------------------------------------------- the modes
def build_modes(model, refiner, names=None, refiner_d1=None) -> dict:
    """Name -> (transformer, Acceleration or None, description). ``model`` draws the coarse scales;
    ``refiner_d1``: an optional second, smaller refiner."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice of its quantised tensor constructors
        q, q_ref = quantize_int8(model), quantize_int8(refiner)
    K = len(model.schedule)
    modes = {
        "exact": (model, None, "msar.sample, no approximation"),
        "int8": (q, None, "int8 dynamic quantisation of every linear layer"),
        "cfg_off_last1": (model, Acceleration(guidance_off_last=1), "guidance off at the last scale"),
        "cfg_off_last2": (model, Acceleration(guidance_off_last=2), "guidance off at the last 2 scales"),
        "prune_last1_keep50": (model, Acceleration(prune_last=1, prune_keep=0.5),
                               "pruning: half the tokens of the last scale recomputed"),
        "prune_last1_keep75": (model, Acceleration(prune_last=1, prune_keep=0.75),
                               "pruning: three quarters of the tokens of the last scale recomputed"),
        "prune_last2_keep50": (model, Acceleration(prune_last=2, prune_keep=0.5),
                               "pruning: half the tokens of the last 2 scales recomputed"),
        "refine_last1": (model, Acceleration(refiner=refiner, refine_last=1), "small refiner draws the last scale"),
        "refine_last2": (model, Acceleration(refiner=refiner, refine_last=2),
                         "small refiner draws the last 2 scales"),
        "refine_last2+cfg_off_last1": (model, Acceleration(refiner=refiner, refine_last=2, guidance_off_last=1),
                                       "refiner for the last 2 scales, guidance off at the last"),
        "refine_last2+cfg_off_last2": (model, Acceleration(refiner=refiner, refine_last=2, guidance_off_last=2),
                                       "refiner for the last 2 scales, guidance off there"),
        "int8+refine_last1": (q, Acceleration(refiner=q_ref, refine_last=1), "int8 draft and refiner, refiner for the last scale"),
        "int8+refine_last2": (q, Acceleration(refiner=q_ref, refine_last=2),
                              "int8 draft and refiner, refiner for the last 2 scales"),
        "int8+refine_last2+cfg_off_last1": (q, Acceleration(refiner=q_ref, refine_last=2, guidance_off_last=1),
                                            "int8 draft and refiner, refiner for the last 2, guidance off at the last"),
        "int8+refine_last2+cfg_off_last2": (q, Acceleration(refiner=q_ref, refine_last=2, guidance_off_last=2),
                                            "int8 draft and refiner, refiner and no guidance for the last 2"),
        "all": (q, Acceleration(refiner=q_ref, refine_last=2, guidance_off_last=2, prune_last=1, prune_keep=0.5),
                "int8, refiner + no guidance for the last 2 scales, half the last scale pruned"),
    }
    if K < 3:
        raise ValueError("the modes above need a schedule of at least 3 scales")
    if refiner_d1 is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q_d1 = quantize_int8(refiner_d1)
        modes["refine_d1_last2"] = (model, Acceleration(refiner=refiner_d1, refine_last=2),
                                    "depth-1 refiner draws the last 2 scales")
        modes["int8+refine_d1_last2"] = (q, Acceleration(refiner=q_d1, refine_last=2),
                                         "int8 draft and depth-1 refiner, refiner for the last 2 scales")
    return modes if names is None else {k: modes[k] for k in names}


SMOKE_MODES = ("exact", "int8", "cfg_off_last1", "prune_last1_keep50", "refine_last2", "all")
VOXEL_MODES = ("exact", "int8", "cfg_off_last1", "cfg_off_last2", "prune_last1_keep50", "prune_last1_keep75",
               "refine_last1", "refine_last2", "refine_last2+cfg_off_last1", "int8+refine_last2",
               "int8+refine_last2+cfg_off_last1", "all")


# ---------------------------------------------------------------------------- voxels
def voxel_models(src: str, work: str, progress: bool = False):
    """The voxel demo's tokenizer and transformer (resumed from the checkpoints of ``src``, copied to
    ``work`` first so nothing is written into ``src``) and a small refiner trained on the same
    tokens (``work/refiner``). Returns ``(tokenizer, model, refiner, (test voxels, labels))``."""
    import shutil

    from modalities.voxel import (CLASSES, build_voxel_tokenizer, encode_dataset, make_dataset, train_tokenizer,
                                  train_transformer)
    from msar import NextScaleTransformer, TransformerConfig

    with open(os.path.join(src, "metrics.json")) as f:
        a = json.load(f)["config"]
    for d in ("ckpt_tokenizer", "ckpt_transformer"):
        if not os.path.exists(os.path.join(work, d)):
            shutil.copytree(os.path.join(src, d), os.path.join(work, d))
    train_np, train_lab = make_dataset(a["n_train"], a["res"], seed=a["seed"])
    test_np, test_lab = make_dataset(a["n_test"], a["res"], seed=a["seed"] + 1000)
    train_x = torch.from_numpy(train_np)
    tok = build_voxel_tokenizer(resolution=a["res"], latent_side=a["latent"], vocab_size=a["vocab"])
    train_tokenizer(tok, train_x, steps=a["tok_steps"], batch_size=a["batch"], seed=a["seed"], out=work,
                    progress=progress)
    indices, labels = encode_dataset(tok, train_x), torch.from_numpy(train_lab)

    def build(depth, width, seed):
        cfg = TransformerConfig(schedule=tok.schedule.to_config(), vocab_size=tok.vocab_size,
                                latent_dim=tok.latent_dim, num_classes=len(CLASSES), depth=depth, embed_dim=width,
                                num_heads=max(1, width // 32), cond_drop_rate=0.1)
        torch.manual_seed(seed)
        return NextScaleTransformer(cfg)

    model = build(a["depth"], a["width"], a["seed"] + 1)
    train_transformer(model, tok, indices, labels, steps=a["ar_steps"], batch_size=a["batch"], lr=a["ar_lr"],
                      seed=a["seed"], out=work, progress=progress)
    refiner = build(1, 64, a["seed"] + 2)
    train_transformer(refiner, tok, indices, labels, steps=800, batch_size=a["batch"], lr=a["ar_lr"],
                      seed=a["seed"], out=os.path.join(work, "refiner"), progress=progress)
    return tok.eval(), model.eval(), refiner.eval(), (test_np, test_lab), a


def measure_voxel_quality(modes: dict, tok, knobs: dict, ref, per_class: int, num_classes: int,
                          batch: int = 64) -> dict:
    """Per mode: validity of the generated shapes (one connected component; four legs for tables
    and chairs), Chamfer MMD / COV / 1-NNA against held-out shapes and the % whose nearest held-out
    shape has the requested class; tokens equal to the exact sampler's."""
    from modalities.voxel import validity

    labels = torch.arange(num_classes).repeat_interleave(per_class)
    out, exact_idx = {}, None
    for name, mode in modes.items():
        occ, idx = [], []
        for i in range(0, len(labels), batch):
            o = _run(mode, tok, labels[i:i + batch], knobs, 2000 + i, True)
            occ.append(tok.occupancy(o.data))
            idx.append(o.indices)
        idx = [torch.cat([c[k] for c in idx]) for k in range(len(idx[0]))]
        exact_idx = idx if name == "exact" else exact_idx
        gen = torch.cat(occ).numpy()
        v, cmp = validity(gen, labels.numpy()), ref.compare(gen, labels.numpy())
        out[name] = {"single_component_pct": v["single_component"], "legs_ok_pct": v["legs_ok"],
                     "nn_class_agreement_pct": cmp["nn_class_agreement"], "mmd_cd": cmp["mmd_cd"],
                     "cov_cd_pct": cmp["cov_cd"], "1nna_cd_pct": cmp["1nna_cd"],
                     "tokens_equal_to_exact_per_scale": [round(float((x == y).float().mean()), 4)
                                                          for x, y in zip(idx, exact_idx)]}
    return out


def voxel_section(src: str, work: str, rounds: int, per_class: int) -> dict:
    from modalities.voxel import CLASSES, ReferenceSet

    tok, model, refiner, (test_np, test_lab), a = voxel_models(src, work, progress=False)
    knobs = {"cfg": a["cfg"], "top_k": a["top_k"], "top_p": a["top_p"]}
    modes = build_modes(model, refiner, VOXEL_MODES)
    ref = ReferenceSet(test_np, test_lab, n_points=a["points"], seed=a["seed"])
    quality = measure_voxel_quality(modes, tok, knobs, ref, per_class, len(CLASSES))
    speed = measure_speed(modes, tok, knobs, 64, rounds, num_classes=len(CLASSES))
    return {"what": (f"the voxel demo's transformer (depth {model.depth}, width {model.embed_dim}) as the draft, a "
                     f"refiner of depth {refiner.depth}, width {refiner.embed_dim} trained 800 steps on the same "
                     f"tokens; schedule {list(model.schedule)}; {per_class} shapes per class ({len(CLASSES)} "
                     f"classes); sampling {knobs}; timing batch 64"),
            "modes": [{"mode": n, "description": modes[n][2], "speed": speed[n], **quality[n]} for n in modes]}


def _run(mode, vqvae, labels, knobs, seed, decode):
    model, accel, _ = mode
    return sample(model, vqvae, labels, seed=seed, accel=accel, decode=decode, **knobs)


def measure_speed(modes: dict, vqvae, knobs: dict, batch: int, rounds: int, num_classes: int = 10) -> dict:
    """Interleaved timing: every round runs every mode once (tokens only, then with decoding);
    per mode the median wall and process-CPU milliseconds over the rounds."""
    labels = torch.arange(batch) % num_classes
    times = {name: {"tokens": ([], []), "decode": ([], [])} for name in modes}
    for name, mode in modes.items():  # warm-up
        _run(mode, vqvae, labels, knobs, 0, True)
    for r in range(rounds):
        for kind, decode in (("tokens", False), ("decode", True)):
            for name, mode in modes.items():
                w, c = time.perf_counter(), time.process_time()
                _run(mode, vqvae, labels, knobs, r, decode)
                times[name][kind][0].append(time.perf_counter() - w)
                times[name][kind][1].append(time.process_time() - c)
    out = {}
    for name in modes:
        rec = {}
        for kind in ("tokens", "decode"):
            wall, cpu = (statistics.median(v) * 1000 for v in times[name][kind])
            base = statistics.median(times["exact"][kind][1]) * 1000
            rec[kind] = {"wall_ms": round(wall, 2), "cpu_ms": round(cpu, 2), "speedup_cpu": round(base / cpu, 3),
                         "speedup_wall": round(statistics.median(times["exact"][kind][0]) * 1000 / wall, 3)}
        out[name] = rec
    return out


def measure_quality(modes: dict, vqvae, knobs: dict, clf, test_feat, per_class: int, batch: int = 100,
                    seed_offset: int = 1000) -> dict:
    """Per mode: classifier accuracy on ``per_class`` samples of every class, Fréchet distance of
    the classifier features to the test digits, and the fraction of tokens equal to the exact
    sampler's (same labels, same seeds)."""
    labels = torch.arange(10).repeat_interleave(per_class)
    out, exact_idx = {}, None
    for name, mode in modes.items():
        imgs, idx = [], []
        for i in range(0, len(labels), batch):
            o = _run(mode, vqvae, labels[i:i + batch], knobs, seed_offset + i, True)
            imgs.append(o.data)
            idx.append(o.indices)
        idx = [torch.cat([c[k] for c in idx]) for k in range(len(idx[0]))]
        exact_idx = idx if name == "exact" else exact_idx
        pred, feat = predict(clf, torch.cat(imgs))
        same = [float((a == b).float().mean()) for a, b in zip(idx, exact_idx)]
        out[name] = {"classifier_acc": float((pred == labels).float().mean()),
                     "frechet_classifier_features": frechet_distance_from_features(feat.numpy(), test_feat.numpy()),
                     "tokens_equal_to_exact_per_scale": [round(v, 4) for v in same]}
    return out


def write_report(res_dir: str, rows: list[dict], header: dict, voxel: dict | None = None) -> list[str]:
    """README.md table and the speed-vs-quality PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = next(r for r in rows if r["mode"] == "exact")
    lines = [f"# Approximate sampling modes on digits{' (SMOKE RUN: untrained models, numbers mean nothing)' if header['smoke'] else ''}",
             "",
             f"`python -m benchmarks.acceleration` -- {header['what']}",
             "",
             "Speed-up: process CPU time of `msar.sample` for one batch of "
             f"{header['batch']}, median of {header['rounds']} interleaved rounds, over the exact sampler "
             "(tokens only | with VQ-VAE decoding). Quality: the demo's classifier on "
             f"{header['per_class']} samples per class (same labels and seeds for every mode); Fréchet distance "
             "of its features to the held-out test digits; tokens equal to the exact sampler's at the last scale.",
             "",
             "| mode | what is approximated | speed-up tokens | speed-up with decode | classifier acc | Δ acc (points) | Fréchet | same last-scale tokens |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| `{r['mode']}` | {r['description']} | {r['speed']['tokens']['speedup_cpu']:.2f}x | "
                     f"{r['speed']['decode']['speedup_cpu']:.2f}x | {r['classifier_acc']:.3f} | "
                     f"{100 * (r['classifier_acc'] - ex['classifier_acc']):+.1f} | {r['frechet_classifier_features']:.2f} | "
                     f"{r['tokens_equal_to_exact_per_scale'][-1]:.2f} |")
    if voxel is not None:
        lines += ["", "## Voxels (second modality)", "", voxel["what"] + ". Speed-ups are CPU time as above.", "",
                  "With 20 shapes per class these metrics are noisy: int8 alone moves the nearest-neighbour class "
                  "agreement and the 1-NNA by several points in either direction, so only differences well "
                  "beyond that (the refiner's lower class agreement) are signal.", "",
                  "| mode | speed-up tokens | speed-up with decode | single component % | NN class agreement % "
                  "| 1-NNA % (50 ideal) | MMD-CD | same last-scale tokens |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in voxel["modes"]:
            lines.append(f"| `{r['mode']}` | {r['speed']['tokens']['speedup_cpu']:.2f}x | "
                         f"{r['speed']['decode']['speedup_cpu']:.2f}x | {r['single_component_pct']:.1f} | "
                         f"{r['nn_class_agreement_pct']:.1f} | {r['1nna_cd_pct']:.1f} | {r['mmd_cd']:.4f} | "
                         f"{r['tokens_equal_to_exact_per_scale'][-1]:.2f} |")
    n = 10 * header["per_class"]
    se = 100 * (ex["classifier_acc"] * (1 - ex["classifier_acc"]) / n) ** 0.5
    within = [r for r in rows if r["classifier_acc"] >= ex["classifier_acc"] - 0.01]
    best = max(within, key=lambda r: r["speed"]["tokens"]["speedup_cpu"])
    lines[6:6] = [f"**Fastest within 1 point of the exact accuracy: `{best['mode']}`, "
                  f"{best['speed']['tokens']['speedup_cpu']:.2f}x tokens only, "
                  f"{best['speed']['decode']['speedup_cpu']:.2f}x with decoding** (accuracy "
                  f"{best['classifier_acc']:.3f} vs {ex['classifier_acc']:.3f}; Fréchet "
                  f"{best['frechet_classifier_features']:.1f} vs {ex['frechet_classifier_features']:.1f}). "
                  f"Noise: one accuracy over {n} samples has a binomial standard error of about {se:.1f} points; "
                  "the modes' samples share labels and seeds with the exact run, so differences are less noisy "
                  "than that, but a change of a point or less is within noise. Decoding (the VQ-VAE's "
                  "convolutions) is the same work in every mode, which caps the speed-up with decoding. "
                  "The exact sampler with two other seed sets gives accuracy "
                  + ", ".join(f"{r['classifier_acc']:.3f}" for r in header["exact_other_seeds"])
                  + " and Fréchet " + ", ".join(f"{r['frechet_classifier_features']:.1f}"
                                                for r in header["exact_other_seeds"])
                  + ": the seed noise of both metrics.", ""]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key, scale, label in ((axes[0], "classifier_acc", 100, "classifier accuracy on samples (%), higher is better"),
                                  (axes[1], "frechet_classifier_features", 1, "Fréchet distance to test digits (classifier features), lower is better")):
        for r in rows:
            x, y = r["speed"]["tokens"]["speedup_cpu"], scale * r[key]
            ax.scatter(x, y, color="k" if r["mode"] == "exact" else "C0")
            ax.annotate(r["mode"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(3, color="C2", ls=":", lw=1, label="3x")
        ax.set_xlabel("speed-up over exact msar.sample (CPU time, tokens only)")
        ax.set_ylabel(label)
    axes[0].axhline(100 * ex["classifier_acc"] - 1, color="C3", ls="--", lw=1, label="exact - 1 point")
    axes[0].legend(fontsize=8)
    fig.suptitle("digits: speed vs quality of the approximate modes" + (" (SMOKE)" if header["smoke"] else ""))
    png = savefig(fig, "acceleration", res_dir)
    readme = os.path.join(res_dir, "README.md")
    with open(readme, "w") as f:
        f.write("\n".join(lines + ["", "![speed vs quality](acceleration.png)", ""]))
    return [png, readme]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="outputs/acceleration", help="folder of the trained models")
    p.add_argument("--out", default=os.path.join(RESULTS, "acceleration"), help="results folder")
    p.add_argument("--smoke", action="store_true",
                   help="untrained tiny models, few samples and rounds: a test of the script (< 20 s)")
    p.add_argument("--train-only", action="store_true", help="train (or load) the models and stop")
    p.add_argument("--per-class", type=int, default=200, help="samples per class for the quality metrics")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--batch", type=int, default=100, help="batch of a timed sample() call")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--voxel", default="outputs/voxel_demo",
                   help="a finished voxel demo run (its checkpoints are copied, not written to); '' skips voxels")
    p.add_argument("--voxel-per-class", type=int, default=20, help="voxel shapes per class for the quality metrics")
    a = p.parse_args(argv)
    started = time.time()
    torch.set_num_threads(a.threads)
    c = digits_demo.DemoConfig.quick() if a.smoke else digits_demo.DemoConfig(edit_count=10)
    if a.smoke:  # untrained models: the script's mechanics only
        torch.manual_seed(0)
        vqvae = digits_demo.build_vqvae(c).eval()
        model = digits_demo.build_transformer(c).eval()
        refiner = digits_demo.build_transformer(replace(c, depth=1, width=32, heads=2)).eval()
        refiner_d1 = None
        a.per_class, a.rounds, a.batch, clf_steps = 2, 1, 10, 5
    else:
        pipe, refiners = train_models(a.models, progress=True)
        if a.train_only:
            return {}
        refiner, refiner_d1 = refiners["refiner"], refiners["refiner_d1"]
        vqvae, model, clf_steps = pipe.vqvae, pipe.transformer, c.classifier_steps
    train, _, test = digits_splits(c.size, seed=c.seed)
    clf = train_classifier(train.images, train.labels, steps=clf_steps, seed=c.seed, progress=False)
    _, test_feat = predict(clf, test.images)
    knobs = {"cfg": c.cfg, "top_k": c.top_k, "top_p": c.top_p}
    modes = build_modes(model, refiner, SMOKE_MODES if a.smoke else None, refiner_d1)
    load_start = list(os.getloadavg())
    quality = measure_quality(modes, vqvae, knobs, clf, test_feat, a.per_class)
    # the seed noise of the metrics: the exact sampler again with other seeds
    reseeded = [{"seed_offset": o, **measure_quality({"exact": modes["exact"]}, vqvae, knobs, clf, test_feat,
                                                     a.per_class, seed_offset=o)["exact"]} for o in (50000, 90000)]
    speed = measure_speed(modes, vqvae, knobs, a.batch, a.rounds)
    rows = [{"mode": name, "description": modes[name][2], "speed": speed[name], **quality[name]} for name in modes]
    header = {"smoke": a.smoke, "exact_other_seeds": reseeded, "batch": a.batch, "rounds": a.rounds, "per_class": a.per_class, "threads": a.threads,
              "what": (f"the digits demo's transformer (depth {model.depth}, width {model.embed_dim}, "
                       f"{model.num_parameters()} parameters) as the draft, a refiner of depth {refiner.depth}, "
                       f"width {refiner.embed_dim} ({refiner.num_parameters()} parameters) trained on the same tokens"
                       + ("" if refiner_d1 is None else f" (`refine_d1`: depth 1, {refiner_d1.num_parameters()} parameters)")
                       + "; "
                       f"schedule {list(model.schedule)}; sampling cfg={c.cfg}, top_k={c.top_k}, top_p={c.top_p}; "
                       f"{a.threads} thread(s)")}
    files = write_report(a.out, rows, header)
    ex = rows[0]
    best = [r for r in rows if r["classifier_acc"] >= ex["classifier_acc"] - 0.01]
    fastest = max(best, key=lambda r: r["speed"]["tokens"]["speedup_cpu"])
    payload = {**header, "modes": rows, "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()),
               "fastest_within_1_point": {"mode": fastest["mode"],
                                          "speedup_tokens": fastest["speed"]["tokens"]["speedup_cpu"],
                                          "speedup_with_decode": fastest["speed"]["decode"]["speedup_cpu"]},
               "figures": files}
    if not a.smoke and a.voxel and os.path.exists(os.path.join(a.voxel, "metrics.json")):
        payload["voxel"] = voxel_section(a.voxel, os.path.join(a.models, "voxel"), max(3, a.rounds // 2),
                                         a.voxel_per_class)
        payload["figures"] = files = write_report(a.out, rows, header, payload["voxel"])
    path = write_result_json(os.path.join(a.out, "acceleration.json"), payload, started)
    with open(files[1]) as f:
        print(f.read())
    return {"path": path, **payload}


if __name__ == "__main__":
    main()
