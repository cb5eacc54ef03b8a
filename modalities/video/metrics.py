"""Video metrics that need no downloaded weights.

* :func:`psnr` -- reconstruction quality (videos in ``[-1, 1]``, PSNR on the ``[0, 1]`` scale);
* :class:`FrameDigitClassifier` -- a per-frame digit classifier trained on real frames
  (a small CNN, or logistic regression, on a crop centred on the digit), for the accuracy of generated
  frames and :func:`temporal_consistency`;
* :func:`motion_check` -- does the digit's centre move at constant velocity between bounces,
  and how often does its velocity flip sign (real clips: ~1.7 per 9-frame video)?
* :func:`velocity_error` -- does a predicted continuation keep the velocity of the true one?
* :func:`reconstruction_report` -- a tokenizer's own evaluation: PSNR and the motion of its
  reconstructions next to the real videos' (a tokenizer whose frames stand still and jump
  caps the motion of everything generated through it);
* :func:`frechet_distance` / :func:`load_feature_net` -- FVD needs I3D weights that cannot be
  fetched here; pass any I3D-style feature network by path to get a Frechet distance
  in its feature space.
"""
from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable

import numpy as np

from msar.metrics import frechet_distance_from_features
import torch
import torch.nn.functional as F


def _to_unit(videos: torch.Tensor) -> torch.Tensor:
    """``(B, 1, T, H, W)`` in [-1, 1] -> ``(B, T, H, W)`` in [0, 1]."""
    if videos.dim() != 5 or videos.shape[1] != 1:
        raise ValueError(f"expected grayscale videos (B, 1, T, H, W), got {tuple(videos.shape)}")
    return ((videos[:, 0].float() + 1) / 2).clamp(0, 1)


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """Mean over videos of the PSNR (dB) on the [0, 1] scale; inputs ``(B, C, T, H, W)`` in [-1, 1]."""
    if reference.shape != estimate.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(reference.shape)} vs {tuple(estimate.shape)}")
    a = ((reference.float() + 1) / 2).clamp(0, 1)
    b = ((estimate.float() + 1) / 2).clamp(0, 1)
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def centroids(videos: torch.Tensor) -> np.ndarray:
    """Intensity-weighted centre ``(B, T, 2)`` (y, x) of every frame; NaN for empty frames."""
    v = _to_unit(videos)
    B, T, H, W = v.shape
    mass = v.sum(dim=(2, 3))
    ys = torch.arange(H, dtype=v.dtype)
    xs = torch.arange(W, dtype=v.dtype)
    cy = (v.sum(3) * ys).sum(2) / mass.clamp_min(1e-6)
    cx = (v.sum(2) * xs).sum(2) / mass.clamp_min(1e-6)
    c = torch.stack((cy, cx), dim=-1).numpy().astype(np.float64)
    c[mass.numpy() < 1e-3] = np.nan
    return c


def centred_crops(videos: torch.Tensor, crop: int = 16) -> np.ndarray:
    """Crops ``(B * T, crop * crop)`` centred on each frame's centroid (zero padded), so a
    position-free classifier sees the digit."""
    v = _to_unit(videos)
    B, T, H, W = v.shape
    c = np.nan_to_num(centroids(videos), nan=H / 2)
    pad = crop
    padded = F.pad(v, (pad, pad, pad, pad)).numpy()
    out = np.zeros((B, T, crop, crop), dtype=np.float32)
    for b in range(B):
        for t in range(T):
            y0 = int(round(c[b, t, 0] - (crop - 1) / 2)) + pad
            x0 = int(round(c[b, t, 1] - (crop - 1) / 2)) + pad
            out[b, t] = padded[b, t, y0:y0 + crop, x0:x0 + crop]
    return out.reshape(B * T, crop * crop)


class _CropCNN(torch.nn.Module):
    """``(N, 1, crop, crop) -> (N, 10)``: two conv stages and a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(2 * width * 16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random shifts (the centroid of a generated frame is off by a pixel or two) and, on
    half the crops, a 3x3 box blur (judge the digit's identity, not its sharpness: PSNR
    measures sharpness)."""
    N, _, H, W = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2,), generator=gen)).tolist()
    x = pad[:, :, dy:dy + H, dx:dx + W]
    blur = torch.rand(N, generator=gen) < 0.5
    if blur.any():
        x = x.clone()
        x[blur] = F.avg_pool2d(x[blur], 3, stride=1, padding=1, count_include_pad=False)
    return x


class FrameDigitClassifier:
    """Per-frame digit classifier trained on real frames, applied to crops centred on each
    frame's intensity centroid (so it is position-free).

    ``kind="cnn"`` (default): a small CNN trained with shift and blur augmentation -- it
    reads blurry but recognisable digits, which the tokenizer's reconstructions are;
    ``kind="logistic"``: scikit-learn logistic regression on the raw crops (stricter: it
    also penalises blur).  Both are deterministic given ``seed``.
    """

    def __init__(self, crop: int = 16, kind: str = "cnn", steps: int = 1500, batch_size: int = 128,
                 lr: float = 2e-3, C: float = 1.0, max_iter: int = 300, seed: int = 0):
        if kind not in ("cnn", "logistic"):
            raise ValueError(f"FrameDigitClassifier kind must be 'cnn' or 'logistic', got {kind!r}")
        self.crop, self.kind, self.seed = crop, kind, seed
        self.steps, self.batch_size, self.lr = steps, batch_size, lr
        if kind == "logistic":
            from sklearn.linear_model import LogisticRegression
            self.clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        else:
            with torch.random.fork_rng():  # seeded init without touching the caller's RNG
                torch.manual_seed(seed)
                self.net = _CropCNN()

    def fit(self, videos: torch.Tensor, labels: torch.Tensor) -> "FrameDigitClassifier":
        """``videos (B, 1, T, H, W)`` in [-1, 1], ``labels (B,)``: every frame is a sample."""
        T = videos.shape[2]
        X = centred_crops(videos, self.crop)
        y = np.repeat(labels.numpy(), T)
        if self.kind == "logistic":
            self.clf.fit(X, y)
            return self
        x = torch.from_numpy(X).view(-1, 1, self.crop, self.crop)
        yt = torch.from_numpy(y)
        gen = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=1e-4)
        self.net.train()
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)  # dropout
            for step in range(self.steps):
                b = torch.randint(0, len(x), (self.batch_size,), generator=gen)
                for grp in opt.param_groups:
                    grp["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * step / self.steps))
                loss = F.cross_entropy(self.net(_augment(x[b], gen)), yt[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.net.eval()
        return self

    @torch.no_grad()
    def predict(self, videos: torch.Tensor) -> np.ndarray:
        """Per-frame predicted digits ``(B, T)``."""
        B, T = videos.shape[0], videos.shape[2]
        X = centred_crops(videos, self.crop)
        if self.kind == "logistic":
            return self.clf.predict(X).reshape(B, T)
        x = torch.from_numpy(X).view(-1, 1, self.crop, self.crop)
        pred = torch.cat([self.net(c).argmax(1) for c in x.split(1024)])
        return pred.numpy().reshape(B, T)


def frame_accuracy(pred: np.ndarray, labels: torch.Tensor) -> float:
    """Fraction of frames ``pred (B, T)`` whose predicted digit is the video's label."""
    return float((pred == labels.numpy()[:, None]).mean())


def temporal_consistency(pred: np.ndarray) -> float:
    """Fraction of videos whose per-frame predicted digit is the same in every frame."""
    return float((pred == pred[:, :1]).all(axis=1).mean())


def motion_check(videos: torch.Tensor, tol: float = 1.0, min_speed: float = 0.5, still_speed: float = 0.75) -> dict:
    """Constant velocity between bounces, from the digit's centroid track.

    Velocities ``v_t = c_{t+1} - c_t`` per axis; a step ``v_t -> v_{t+1}`` on an axis is a
    *bounce* when the velocity's sign changes (speeds below ``min_speed`` count as 0); the bounce and
    its neighbouring steps (partial because the reflection happens between frames) are
    skipped, every other step should keep the velocity within ``tol`` pixels/frame.  A bounce
    just outside the clip still leaves one partial step at its start or end, so real
    moving-digit clips score ~0.99, not 1: compare generated videos with that reference.
    Read it together with ``bounces_per_video``: erratic motion hides behind many sign
    flips, so a good generator has both a high fraction and about the real bounce rate.

    Returns the mean over videos of ``constant_velocity_fraction`` (steps that keep the
    velocity / non-bounce steps), ``mean_abs_accel`` (px/frame^2 on non-bounce steps)
    and the mean number of bounces per video; and where the flips come from: an axis is
    *still* when its median speed is below ``still_speed`` (between 0 and the slowest real
    speed, 1 px/frame), ``still_axes_per_video`` counts them and ``flips_on_still_axes``
    the flips on them (centroid jitter around a standstill), ``mean_speed`` is the mean
    ``|v|`` per axis and step (px/frame).
    """
    c = centroids(videos)  # (B, T, 2)
    v = np.diff(c, axis=1)  # (B, T-1, 2)
    a = np.diff(v, axis=1)  # (B, T-2, 2)
    sgn = np.where(np.abs(v) < min_speed, 0, np.sign(v))  # dead zone: jitter around 0 is "still"
    flip = sgn[:, 1:] != sgn[:, :-1]  # -2, 0, 2 is a bounce through a stop, two flips
    # a reflection inside a frame interval makes the steps next to the flip partial
    # (e.g. +3, +1, -3): exclude the accelerations adjacent to a flip as well
    near = flip.copy()
    near[:, 1:] |= flip[:, :-1]
    near[:, :-1] |= flip[:, 1:]
    valid = ~np.isnan(a)
    steady = valid & ~near
    frac, acc = [], []
    for b in range(c.shape[0]):
        n = steady[b].sum()
        if n == 0:
            continue
        frac.append(float((np.abs(a[b][steady[b]]) <= tol).mean()))
        acc.append(float(np.abs(a[b][steady[b]]).mean()))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an empty track has no median
        still = np.nanmedian(np.abs(v), axis=1) < still_speed  # (B, 2); NaN (no track) is not still
    counted = flip & valid  # (B, T-2, 2)
    return {
        "constant_velocity_fraction": float(np.mean(frac)) if frac else float("nan"),
        "mean_abs_accel": float(np.mean(acc)) if acc else float("nan"),
        "bounces_per_video": float(counted.sum(axis=(1, 2)).mean()),
        "videos_with_track": len(frac),
        "still_axes_per_video": float(still.sum(axis=1).mean()),
        "flips_on_still_axes": float((counted.sum(axis=1) * still).sum(axis=1).mean()),
        "mean_speed": float(np.nanmean(np.abs(v))) if np.isfinite(v).any() else float("nan"),
    }


def velocity_error(generated: torch.Tensor, reference: torch.Tensor, start: int) -> dict:
    """Velocity error of a continuation: frames ``>= start`` of ``generated`` against the true
    continuation ``reference`` (both ``(B, 1, T, H, W)`` in [-1, 1], frames ``< start`` given).

    With centroid tracks ``c`` and steps ``v_t = c_t - c_{t-1}`` for ``t = start .. T-1`` (the
    first one leaves the last given frame), returns the mean over steps and videos of
    ``|v_gen - v_true|`` (Euclidean, px/frame) as ``velocity_error``, next to
    ``velocity_error_if_static`` = mean ``|v_true|`` (what a continuation that stands still
    scores) and ``position_error`` (mean centroid distance on the generated frames).
    Steps where either track is empty (NaN) are skipped.
    """
    if generated.shape != reference.shape:
        raise ValueError(f"velocity_error: shapes differ, {tuple(generated.shape)} vs {tuple(reference.shape)}")
    T = generated.shape[2]
    if not 1 <= start < T:
        raise ValueError(f"velocity_error: start must be in [1, {T - 1}] (frames before it are given), got {start}")
    cg, cr = centroids(generated), centroids(reference)  # (B, T, 2)
    vg = cg[:, start:] - cg[:, start - 1:-1]
    vr = cr[:, start:] - cr[:, start - 1:-1]
    err = np.linalg.norm(vg - vr, axis=-1)  # (B, T - start)
    ok = ~np.isnan(err)
    pos = np.linalg.norm(cg[:, start:] - cr[:, start:], axis=-1)
    return {"velocity_error": float(err[ok].mean()) if ok.any() else float("nan"),
            "velocity_error_if_static": float(np.linalg.norm(vr, axis=-1)[ok].mean()) if ok.any() else float("nan"),
            "position_error": float(np.nanmean(pos)) if (~np.isnan(pos)).any() else float("nan"),
            "steps": int(ok.sum())}


@torch.no_grad()
def reconstruction_report(tokenizer, videos: torch.Tensor, batch_size: int = 64) -> tuple[dict, torch.Tensor]:
    """The tokenizer's own evaluation on ``videos (B, 1, T, H, W)``: round trip through its
    tokens, then PSNR, and :func:`motion_check` of the reconstructions and of the real videos.

    Returns ``(report, reconstructions)``; ``report["velocity_flips"]`` and
    ``report["velocity_flips_real"]`` are the sign flips per video (``bounces_per_video``),
    ``report["track_error"]`` the mean centroid distance (px) between reconstruction and video.
    """
    rec = torch.cat([tokenizer.decode(tokenizer.encode(videos[i:i + batch_size]))
                     for i in range(0, len(videos), batch_size)]).clamp(-1, 1)
    m_rec, m_real = motion_check(rec), motion_check(videos)
    track = np.linalg.norm(centroids(rec) - centroids(videos), axis=-1)
    return {"psnr_db": psnr(videos, rec),
            "velocity_flips": m_rec["bounces_per_video"], "velocity_flips_real": m_real["bounces_per_video"],
            "track_error": float(np.nanmean(track)),
            "motion": m_rec, "motion_real": m_real}, rec


# ---------------------------------------------------------------------------- optional feature network (FVD-style)
FVD_NOTE = ("FVD needs the I3D (Kinetics-400) weights, which cannot be fetched in this environment; "
            "no FVD is reported. Pass --feature-net PATH (TorchScript, or a state dict with "
            "--feature-net-factory module:function) to get a Frechet distance in that network's feature space.")


def load_feature_net(path: str, factory: str | None = None) -> torch.nn.Module:
    """Load a video feature network ``(B, 3, T, H, W) in [-1, 1] -> (B, D)``.

    * ``factory is None``: ``path`` is a ``torch.export`` program (``.pt2``, ``torch.export.save``)
      or a TorchScript file (``torch.jit.save``), e.g. an exported I3D whose forward returns
      pooled features.
    * ``factory = "package.module:function"``: ``function()`` builds the module and
      ``path`` holds its state dict (``.safetensors``, or a ``torch.save`` dict of tensors,
      loaded with ``weights_only=True``).
    """
    if factory is None and path.endswith(".pt2"):
        return torch.export.load(path).module()
    if factory is None:
        net = torch.jit.load(path, map_location="cpu")
    else:
        if ":" not in factory:
            raise ValueError(f"feature-net factory must be 'package.module:function', got {factory!r}")
        mod, fn = factory.split(":", 1)
        net = getattr(importlib.import_module(mod), fn)()
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(sd)
    return net.eval()


@torch.no_grad()
def video_features(net: Callable, videos: torch.Tensor, size: int | None = None, batch: int = 16) -> np.ndarray:
    """Features ``(B, D)``: grayscale videos are repeated to 3 channels and, with ``size``,
    resized to ``size x size`` per frame (I3D expects 224)."""
    out = []
    for i in range(0, videos.shape[0], batch):
        v = videos[i:i + batch].float()
        if v.shape[1] == 1:
            v = v.repeat(1, 3, 1, 1, 1)
        if size is not None:
            v = F.interpolate(v, size=(v.shape[2], size, size), mode="trilinear", align_corners=False)
        f = net(v)
        out.append(f.reshape(f.shape[0], -1).float().cpu().numpy())
    return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``(N, D)`` and ``(M, D)``."""
    return frechet_distance_from_features(a, b)
