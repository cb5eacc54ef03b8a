"""FID, Inception Score, precision and recall of generated images against a reference batch.

::

    python -m modalities.image.imagenet.evaluate --samples samples/d16/samples.npz \
        --ref VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth \
        --out samples/d16/metrics.json

* ``--samples``: an ``.npz`` with ``arr_0`` uint8 ``(N, H, W, 3)`` or a folder of PNGs.
* ``--ref``: an ``.npz`` of images (``arr_0``, e.g. guided-diffusion's
  ``VIRTUAL_imagenet256_labeled.npz``), or of precomputed statistics (``mu``, ``sigma``
  and optionally ``pool`` features for precision / recall), e.g. one written by
  ``--save-ref-stats`` (computing 50k reference features once saves time later).
* FID: Fréchet distance of the pool3 features (:func:`msar.metrics.frechet_distance`).
* IS: ``exp(E_x KL(p(y|x) || p(y)))`` over 10 splits, softmax of the unbiased logits.
* Precision / recall (Kynkäänniemi et al. 2019, k = 3): the fraction of generated samples
  inside the union of k-NN balls of the reference features, and vice versa.

With the pytorch-fid weights the numbers track the TF evaluator closely but not to the
last digit (image resizing differs); report which evaluator you used.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from msar.metrics import feature_statistics, frechet_distance

from .inception import FIDInceptionV3, load_inception


# ---------------------------------------------------------------------------- inputs
def load_images(path: str) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` from an ``.npz`` (``arr_0``) or a folder of images (sorted, recursive)."""
    if os.path.isdir(path):
        from PIL import Image

        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.lower().endswith((".png", ".jpg", ".jpeg")))
        if not files:
            raise ValueError(f"no .png / .jpg images under {path}")
        out = []
        for f in files:
            try:
                with Image.open(f) as im:
                    out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            except OSError as e:
                raise ValueError(f"cannot read image {f}: {e}") from e
        return np.stack(out)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not found: {path}")
    with np.load(path) as z:
        if "arr_0" not in z:
            raise ValueError(f"{path}: expected an 'arr_0' array of uint8 images (N, H, W, 3), found {list(z.keys())}")
        arr = z["arr_0"]
    check_images(arr, path)
    return arr


def check_images(arr: np.ndarray, what: str) -> None:
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{what}: expected uint8 images (N, H, W, 3), got {arr.dtype} {arr.shape}")
    if len(arr) < 2:
        raise ValueError(f"{what}: need at least 2 images, got {len(arr)}")


@torch.no_grad()
def extract(net: FIDInceptionV3, images: np.ndarray, batch_size: int = 200, device: str | torch.device = "cpu",
            progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``(N, H, W, 3)`` -> pool features ``(N, 2048)`` float64 and softmax ``(N, classes)``."""
    from tqdm.auto import tqdm

    net = net.to(device).eval()
    pools, probs = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="inception", disable=not progress):
        x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float().div(255)
        out = net(x)
        pools.append(out.pool.double().cpu())
        probs.append(out.logits_unbiased.double().softmax(-1).cpu())
    return torch.cat(pools).numpy(), torch.cat(probs).numpy()


# ---------------------------------------------------------------------------- metrics
def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and std over ``splits`` of ``exp(mean_x KL(p(y|x) || p(y)))``; ``probs`` ``(N, C)`` rows sum to 1."""
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for part in np.array_split(probs, splits):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(py, 1e-30, None)))).sum(1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(n, m)`` (clamped at 0 against rounding)."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min_(0)


def knn_radii(feats: torch.Tensor, k: int = 3, chunk: int = 4096) -> torch.Tensor:
    """Squared distance of every row to its k-th nearest other row ``(N,)``."""
    if len(feats) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(feats)}")
    out = []
    for i in range(0, len(feats), chunk):
        d = _sq_dists(feats[i:i + chunk], feats)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself
    return torch.cat(out)


def coverage(query: torch.Tensor, ref: torch.Tensor, ref_radii: torch.Tensor, chunk: int = 4096) -> float:
    """Fraction of ``query`` rows inside at least one ball ``(ref_i, ref_radii_i)``."""
    inside = []
    for i in range(0, len(query), chunk):
        d = _sq_dists(query[i:i + chunk], ref)
        inside.append((d <= ref_radii[None]).any(1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, device: str | torch.device = "cpu",
                     chunk: int = 4096) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` w.r.t. ``real`` features."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64 if str(device) == "cpu" else torch.float32, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=r.dtype, device=device)
    precision = coverage(f, r, knn_radii(r, k, chunk), chunk)
    recall = coverage(r, f, knn_radii(f, k, chunk), chunk)
    return precision, recall


# ---------------------------------------------------------------------------- the whole evaluation
def reference_stats(ref: str, net: FIDInceptionV3, batch_size: int, device, progress: bool) -> dict:
    """``{'mu', 'sigma', 'pool' (or None)}`` from an image batch or a statistics ``.npz``."""
    if not os.path.exists(ref):
        raise FileNotFoundError(f"reference batch not found: {ref}")
    if os.path.isfile(ref):
        with np.load(ref) as z:
            keys = set(z.keys())
            if "arr_0" not in keys and {"mu", "sigma"} <= keys:
                return {"mu": z["mu"], "sigma": z["sigma"], "pool": z["pool"] if "pool" in keys else None}
            if "arr_0" not in keys:
                raise ValueError(f"{ref}: expected 'arr_0' (images) or 'mu' and 'sigma' (statistics), "
                                 f"found {sorted(keys)}")
    pool, _ = extract(net, load_images(ref), batch_size, device, progress)
    mu, sigma = feature_statistics(pool)
    return {"mu": mu, "sigma": sigma, "pool": pool}


def evaluate(samples: np.ndarray, ref: dict, net: FIDInceptionV3, batch_size: int = 200, device="cpu",
             k: int = 3, splits: int = 10, progress: bool = False) -> dict:
    """All metrics of uint8 ``samples`` against reference statistics from :func:`reference_stats`."""
    check_images(samples, "samples")
    pool, probs = extract(net, samples, batch_size, device, progress)
    mu, sigma = feature_statistics(pool)
    out = {"num_samples": int(len(samples)), "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"])}
    out["inception_score"], out["inception_score_std"] = inception_score(probs, min(splits, len(samples)))
    if ref.get("pool") is not None:
        out["precision"], out["recall"] = precision_recall(ref["pool"], pool, k, device)
    else:
        out["precision"] = out["recall"] = None  # statistics-only reference: no features to compare
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m modalities.image.imagenet.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--samples", required=True, help=".npz (arr_0 uint8 NHWC) or a folder of PNGs")
    ap.add_argument("--ref", required=True, help="reference .npz of images (arr_0) or statistics (mu, sigma[, pool])")
    ap.add_argument("--inception", required=True, help="Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    ap.add_argument("--out", help="write the metrics JSON here")
    ap.add_argument("--save-ref-stats", help="write the reference mu / sigma / pool features to this .npz")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--k", type=int, default=3, help="neighbourhood size of precision / recall")
    ap.add_argument("--splits", type=int, default=10, help="Inception Score splits")
    ap.add_argument("--resize", type=int, default=FIDInceptionV3.INPUT_SIZE, help=argparse.SUPPRESS)  # tests only
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None, net: FIDInceptionV3 | None = None) -> dict:
    """Run the evaluation; ``net`` replaces ``--inception`` (tests pass a random network)."""
    a = build_parser().parse_args(argv)
    if net is None:
        net = load_inception(a.inception, resize_to=a.resize)
    progress = not a.no_progress
    ref = reference_stats(a.ref, net, a.batch_size, a.device, progress)
    if a.save_ref_stats:
        arrays = {k: v for k, v in ref.items() if v is not None}
        np.savez(a.save_ref_stats, **arrays)
    metrics = evaluate(load_images(a.samples), ref, net, a.batch_size, a.device, a.k, a.splits, progress)
    metrics.update({"samples": os.path.abspath(a.samples), "ref": os.path.abspath(a.ref),
                    "inception": os.path.abspath(a.inception) if a.inception else None})
    print(json.dumps(metrics, indent=1))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


if __name__ == "__main__":
    main()
