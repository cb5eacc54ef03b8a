"""Class-conditional samples for FID: ``per_class`` images for each ImageNet class, written as
PNGs and one ``.npz`` (``arr_0``: uint8 ``(N, H, W, 3)``, the layout of the guided-diffusion
evaluator and of :mod:`modalities.image.imagenet.evaluate`).

Published settings (VAR's FID-50k): 50 images x 1000 classes, guidance 1.5 (ramped over
scales), top-k 900, top-p 0.96, no Gumbel smoothing::

    python -m modalities.image.imagenet.generate --var var_d16.pth --vae vae_ch160v4096z32.pth \
        --preset var-d16 --out samples/d16

Resumable: every finished class leaves ``OUT/classes/<class>.npz`` (written after its PNGs,
atomically) and is skipped on a re-run; classes are seeded independently, so the images do
not depend on sharding or interruptions.  Splittable: ``--shard i --num-shards n`` (or run
under ``torchrun``, which shards by rank); the process that finds every class done writes
``OUT/samples.npz`` (or run ``--pack-only``).  ``--reject-classifier model.pt`` keeps, per
class, the ``per_class`` most confidently classified of ``--reject-pool x per_class``
candidates (VAR's "-re" rows).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from msar import NextScaleTransformer, sample

from ..checkpoint import read_state_dict, transformer_from_state_dict
from ..data import to_uint8
from ..pipeline import ImagePipeline
from ..vqvae import VQVAE
from .recipes import RECIPES, get_recipe
from .train import load_tokenizer

SETTINGS_FILE = "generate.json"


@dataclass
class SamplingSettings:
    per_class: int = 50
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False
    seed: int = 0
    batch: int = 50
    reject_pool: int = 1  # candidates per kept image (1 = no rejection)
    amp: str = "fp16"


# ---------------------------------------------------------------------------- loading
def load_models(var: str, vae: str | None = None, preset: str | None = None, num_classes: int | None = None,
                vae_config: str | None = None, random_vae: bool = False) -> tuple[NextScaleTransformer, VQVAE]:
    """The transformer and the tokenizer.

    ``var``: a saved :class:`~modalities.image.pipeline.ImagePipeline` (a training output
    folder holding ``pipeline/``, or the pipeline folder itself; ``vae`` is then not needed),
    or a released ``var_d*.pth`` / any state dict file (``.safetensors``, a trainer
    checkpoint's ``model.model.safetensors``) with ``preset`` and ``vae``.
    """
    if os.path.isdir(var):
        folder = os.path.join(var, "pipeline") if os.path.isdir(os.path.join(var, "pipeline")) else var
        pipe = ImagePipeline.from_pretrained(folder)  # an earlier var.json output: an error saying how to convert
        return pipe.transformer, pipe.vqvae.requires_grad_(False)
    if preset is None:
        raise ValueError(f"cannot tell the architecture of {var}: pass --preset (one of {sorted(RECIPES)})")
    recipe = get_recipe(preset)
    vqvae = load_tokenizer(recipe, vae, vae_config, random_vae)
    model = transformer_from_state_dict(read_state_dict(var), recipe.transformer(num_classes or 1000))
    return model.eval(), vqvae.eval()


def load_classifier(path: str, device: torch.device) -> torch.nn.Module:
    """A TorchScript classifier (``torch.jit.save``): images ``(B, 3, H, W)`` in [0, 1] -> logits
    ``(B, num_classes)``; it does its own resizing / normalisation (see docs/imagenet.md)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier not found: {path}")
    try:
        return torch.jit.load(path, map_location=device).eval()
    except Exception as e:
        raise ValueError(f"{path}: expected a TorchScript classifier saved with torch.jit.save ({e})") from e


# ---------------------------------------------------------------------------- work split
def shard_classes(classes: Sequence[int], shard: int, num_shards: int) -> list[int]:
    """Round-robin split (every shard gets early and late classes alike)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"--shard must be in [0, {num_shards}), got {shard}")
    return [c for i, c in enumerate(classes) if i % num_shards == shard]


def class_file(out: str, c: int) -> str:
    return os.path.join(out, "classes", f"{c:04d}.npz")


def _atomic_savez(path: str, **arrays) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def check_settings(out: str, settings: SamplingSettings, meta: dict) -> None:
    """Refuse to mix samples made with different settings in one output folder."""
    path = os.path.join(out, SETTINGS_FILE)
    mine = {**settings.__dict__, **meta}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in mine.items() if k != "amp" and old.get(k) != v}
        if diff:
            raise ValueError(f"{out} holds samples made with other settings {diff} (old, new): use another --out")
    else:
        os.makedirs(out, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(mine, f, indent=1)
        os.replace(tmp, path)


# ---------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_class(model: NextScaleTransformer, vqvae: VQVAE, c: int, s: SamplingSettings,
                   classifier: torch.nn.Module | None = None) -> np.ndarray:
    """``per_class`` images of class ``c`` as uint8 ``(n, H, W, 3)``; seeded by ``(seed, c)``."""
    device = model.pos_embed.device
    gen = torch.Generator(device=device).manual_seed(s.seed * 1_000_003 + c)
    n_total = s.per_class * max(1, s.reject_pool)
    images, scores = [], []
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.amp) if device.type == "cuda" else None
    for start in range(0, n_total, s.batch):
        B = min(s.batch, n_total - start)
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            x = sample(model, vqvae, torch.full((B,), c, device=device, dtype=torch.long), cfg=s.cfg, top_k=s.top_k,
                       top_p=s.top_p, more_smooth=s.more_smooth, generator=gen).data.float().clamp(-1, 1)
        if classifier is not None and s.reject_pool > 1:
            logits = classifier((x + 1) / 2).float()
            scores.append(logits.log_softmax(-1)[:, c].cpu())
        images.append(to_uint8(x))
    arr = np.concatenate(images)
    if scores:
        keep = torch.cat(scores).argsort(descending=True)[:s.per_class].sort().values.numpy()
        arr = arr[keep]
    return arr


def save_pngs(arr: np.ndarray, folder: str) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for j, im in enumerate(arr):
        Image.fromarray(im).save(os.path.join(folder, f"{j:03d}.png"))


def pack(out: str, classes: Sequence[int], name: str = "samples.npz") -> str | None:
    """Concatenate the finished classes into ``OUT/samples.npz`` (``arr_0`` uint8 NHWC,
    ``labels``); returns its path, or None while classes are missing."""
    missing = [c for c in classes if not os.path.isfile(class_file(out, c))]
    if missing:
        return None
    arrs, labels = [], []
    for c in classes:
        with np.load(class_file(out, c)) as z:
            arrs.append(z["arr_0"])
            labels.append(np.full(len(z["arr_0"]), c, dtype=np.int64))
    path = os.path.join(out, name)
    _atomic_savez(path, arr_0=np.concatenate(arrs), labels=np.concatenate(labels))
    return path


def run(model: NextScaleTransformer, vqvae: VQVAE, out: str, classes: Sequence[int], settings: SamplingSettings,
        shard: int = 0, num_shards: int = 1, png: bool = True, classifier: torch.nn.Module | None = None,
        meta: dict | None = None, progress: bool = True) -> dict:
    """Generate this shard's missing classes; pack when all are done. Returns a summary."""
    from tqdm.auto import tqdm

    if settings.reject_pool > 1 and classifier is None:
        raise ValueError("rejection sampling (--reject-pool > 1) needs --reject-classifier PATH")
    check_settings(out, settings, meta or {})
    os.makedirs(os.path.join(out, "classes"), exist_ok=True)
    mine = shard_classes(list(classes), shard, num_shards)
    todo = [c for c in mine if not os.path.isfile(class_file(out, c))]
    t0, n = time.time(), 0
    for c in tqdm(todo, desc=f"shard {shard}/{num_shards}", disable=not progress):
        arr = generate_class(model, vqvae, c, settings, classifier)
        if png:
            save_pngs(arr, os.path.join(out, "png", f"{c:04d}"))
        _atomic_savez(class_file(out, c), arr_0=arr)  # last: marks the class done
        n += len(arr)
    dt = time.time() - t0
    packed = pack(out, classes)
    return {"generated_classes": len(todo), "skipped_classes": len(mine) - len(todo), "images": n,
            "seconds": dt, "images_per_s": n / dt if dt > 0 and n else None, "npz": packed}


@torch.no_grad()
def benchmark_sampling(model: NextScaleTransformer, vqvae: VQVAE, batch: int = 64, batches: int = 5, warmup: int = 2,
                       decode: bool = True, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
                       amp: str = "fp16", seed: int = 0) -> dict:
    """Sampling throughput (images/s) at ``batch`` with guidance, the VQ-VAE decoder included
    (``decode=True``) or not (token generation only); CUDA peak memory in GiB."""
    device = model.pos_embed.device
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if cuda else None
    gen = torch.Generator(device=device).manual_seed(seed)
    labels = torch.arange(batch, device=device) % max(1, model.num_classes)

    def once():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            out = sample(model, vqvae, labels, cfg=cfg, top_k=top_k, top_p=top_p, generator=gen, decode=decode)
        if cuda:
            torch.cuda.synchronize(device)
        return out

    for _ in range(warmup):
        once()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        once()
    dt = time.perf_counter() - t0
    return {"batch": batch, "batches": batches, "decode": decode, "cfg": cfg, "amp": amp if cuda else "none",
            "seconds": dt, "images_per_s": batch * batches / dt,
            "max_mem_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu"}


def parse_classes(spec: str, num_classes: int) -> list[int]:
    """``"all"``, ``"0-9"``, ``"1,5,7"`` -> class ids."""
    if spec == "all":
        return list(range(num_classes))
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += list(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes: {bad[:5]} outside [0, {num_classes})")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m modalities.image.imagenet.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--var", help="a training OUT / saved ImagePipeline folder, or transformer weights "
                                  "(var_d16.pth, a .safetensors) with --preset and --vae")
    ap.add_argument("--vae", help="VQ-VAE weights")
    ap.add_argument("--vae-config", help="VQ-VAE preset name or JSON (default: the recipe's)")
    ap.add_argument("--random-vae", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", choices=sorted(RECIPES), help="architecture when --var is a weights file")
    ap.add_argument("--out", default="outputs/imagenet_samples")
    ap.add_argument("--num-classes", type=int, help="classes of a weights file's model (default 1000)")
    ap.add_argument("--classes", default="all", help="'all', '0-99' or '1,5,7'")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--batch", type=int, default=50, help="images per forward pass")
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--top-k", type=int, default=900)
    ap.add_argument("--top-p", type=float, default=0.96)
    ap.add_argument("--more-smooth", action="store_true", help="VAR's Gumbel smoothing (visual demos; off for FID)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--amp", choices=("fp16", "bf16", "none"), default="fp16", help="autocast on CUDA")
    ap.add_argument("--shard", type=int, help="this process's shard (default: RANK under torchrun, else 0)")
    ap.add_argument("--num-shards", type=int, help="number of shards (default: WORLD_SIZE, else 1)")
    ap.add_argument("--no-png", action="store_true", help="only the .npz files")
    ap.add_argument("--pack-only", action="store_true", help="only build OUT/samples.npz from finished classes")
    ap.add_argument("--reject-classifier", help="TorchScript classifier for rejection sampling")
    ap.add_argument("--reject-pool", type=int, default=1, help="candidates per kept image (e.g. 4)")
    ap.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")
    ap.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                    help="torch.compile every transformer block (NextScaleTransformer.compile_blocks; BACKEND "
                         "default inductor): faster on a GPU once the first batch has compiled one graph per scale, "
                         "the same samples up to kernel rounding")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--benchmark", type=int, metavar="N",
                    help="only measure sampling throughput over N timed batches of --batch (prints JSON)")
    ap.add_argument("--no-decode", action="store_true", help="--benchmark: token generation only (no VQ-VAE decoder)")
    ap.add_argument("--random-weights", action="store_true",
                    help="--benchmark: random transformer and VQ-VAE of --preset (speed does not depend on weights)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    shard = a.shard if a.shard is not None else int(os.environ.get("RANK", "0"))
    num_shards = a.num_shards if a.num_shards is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if a.device:
        device = torch.device(a.device)
    else:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if a.random_weights:
        if not a.benchmark or not a.preset:
            raise SystemExit("--random-weights is only for --benchmark, with --preset")
        recipe = get_recipe(a.preset)
        torch.manual_seed(a.seed)
        model = NextScaleTransformer(recipe.transformer(a.num_classes or 1000)).eval()
        vqvae = VQVAE(recipe.vqvae()).eval().requires_grad_(False)
    elif not a.var:
        raise SystemExit("--var PATH is required")
    else:
        model, vqvae = load_models(a.var, a.vae, a.preset, a.num_classes, a.vae_config, a.random_vae)
    if a.compile:
        model.compile_blocks(backend=a.compile)
    if a.benchmark:
        model.to(device)
        vqvae.to(device)
        res = benchmark_sampling(model, vqvae, a.batch, a.benchmark, decode=not a.no_decode, cfg=a.cfg,
                                 top_k=a.top_k, top_p=a.top_p, amp=a.amp, seed=a.seed)
        res.update({"preset": a.preset, "command": "python -m modalities.image.imagenet.generate "
                    + " ".join(argv if argv is not None else __import__("sys").argv[1:])})
        print(json.dumps(res))
        if a.out and a.out.endswith(".json"):
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    classes = parse_classes(a.classes, model.num_classes)
    if a.pack_only:
        path = pack(a.out, classes)
        if path is None:
            missing = [c for c in classes if not os.path.isfile(class_file(a.out, c))]
            raise SystemExit(f"{len(missing)} classes not generated yet, e.g. {missing[:10]}")
        print(f"wrote {path}")
        return 0
    model.to(device)
    vqvae.to(device)
    s = SamplingSettings(per_class=a.per_class, cfg=a.cfg, top_k=a.top_k, top_p=a.top_p, more_smooth=a.more_smooth,
                         seed=a.seed, batch=a.batch, reject_pool=a.reject_pool, amp=a.amp)
    clf = load_classifier(a.reject_classifier, device) if a.reject_classifier else None
    meta = {"var": os.path.abspath(a.var), "classes": a.classes, "num_classes": model.num_classes}
    summary = run(model, vqvae, a.out, classes, s, shard, num_shards, png=not a.no_png, classifier=clf, meta=meta,
                  progress=not a.no_progress)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
