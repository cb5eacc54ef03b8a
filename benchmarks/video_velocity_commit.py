"""Which scale of a video's first generated frame commits its motion?

Frame 0 is given whole, and of latent frame 1 (the first generated one: real frames 1 and 2 with
time stride 2) the true tokens of its first ``s`` scales; the sampler draws the rest.  For every
``s`` from 0 (frame 1 drawn whole) to all of its scales, the velocity of real frames 1-2 is
compared with the truth (centroid tracks, as ``modalities.video.metrics.velocity_error``).  The
scale whose tokens bring the error down is where the model commits the digit's motion: if that is a
scale of several tokens, they are drawn independently of each other and can disagree.

It also probes the tokenizer alone: a ridge regression from the codewords of scale ``s`` of every
latent frame (concatenated over the scale's tokens) to the centroid of the frame the latent frame
ends on, fit on half of the videos and scored on the other half, says how much of the digit's
position each scale's tokens carry (next to the error of always guessing the mean centre).

Run::

    python -m benchmarks.video_velocity_commit --pipeline outputs/video/default/pipeline \\
        --out benchmarks/results/video/velocity_commit.json

Videos: the demo's held-out set (``MovingDigits(seed=1, split="test")``), as for its frame prediction.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tqdm import tqdm

import msar
from benchmarks.common import write_result_json
from modalities.video import FrameScaleSchedule, MovingDigits
from modalities.video import metrics as vm


def first_steps(videos: torch.Tensor, steps: int) -> np.ndarray:
    """Centroid velocities ``(B, steps, 2)`` of frames ``1 .. steps`` (each against the frame before)."""
    c = vm.centroids(videos)
    return c[:, 1:steps + 1] - c[:, :steps]


def position_probe(tok, known: list[torch.Tensor], videos: torch.Tensor, scale: int) -> dict:
    """Linear probe of the digit's centre from the codewords of ``scale`` of every latent frame:
    mean absolute error (px, held-out half) and the same for guessing the mean centre."""
    sched, c = tok.schedule, tok.config
    n, T = sched.scales_per_frame, len(sched) // sched.scales_per_frame
    codebook = tok.quantizer.embedding.weight.detach()
    feats = torch.cat([codebook[known[t * n + scale]].flatten(1) for t in range(T)]).double().numpy()
    centre = vm.centroids(videos[:, :, ::c.time_stride])  # (B, T', 2): frame 0, then each group's last frame
    target = np.concatenate([centre[:, t] for t in range(T)])
    ok = ~np.isnan(target).any(1)
    A, y = np.c_[feats[ok], np.ones(int(ok.sum()))], target[ok]
    half = len(A) // 2
    w = np.linalg.solve(A[:half].T @ A[:half] + 1e-2 * np.eye(A.shape[1]), A[:half].T @ y[:half])
    return {"scale": scale, "side": list(sched.shape(scale))[1:],
            "distinct_codes": int(torch.cat([known[t * n + scale].flatten() for t in range(T)]).unique().numel()),
            "centre_error_px": float(np.abs(A[half:] @ w - y[half:]).mean()),
            "centre_error_if_mean_px": float(np.abs(y[half:] - y[:half].mean(0)).mean())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="a video pipeline folder with a per-frame schedule")
    p.add_argument("--out", required=True, help="result JSON path")
    p.add_argument("--videos", type=int, default=128, help="held-out videos sampled (the probe uses all 256)")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    pipe = msar.from_pretrained(args.pipeline)
    tok, c = pipe.tokenizer, pipe.tokenizer.config
    sched = tok.schedule
    if not isinstance(sched, FrameScaleSchedule):
        raise SystemExit(f"--pipeline {args.pipeline}: needs a per-frame schedule (schedule='frame'), got {c.schedule!r}")
    X, Y = MovingDigits(256, num_frames=c.frames, size=c.height, seed=1, split="test").tensors()
    with torch.no_grad():
        known = tok.encode(X)  # every video encoded once: the probe uses all, sampling the first --videos
    probes = [position_probe(tok, known, X, s) for s in range(2)]
    print(probes)
    X, Y, known = X[:args.videos], Y[:args.videos], [k[:args.videos] for k in known]
    with torch.no_grad():
        rec = tok.decode(known).clamp(-1, 1)
    steps = c.time_stride  # the real frames latent frame 1 covers
    v_true = first_steps(X, steps)
    n = sched.scales_per_frame

    def score(v: np.ndarray) -> dict:
        speed = np.abs(v).mean(1)  # (B, 2) mean |v| per axis over the steps
        return {"velocity_error": float(np.nanmean(np.linalg.norm(v - v_true, axis=-1))),
                "mean_speed": float(np.nanmean(np.abs(v))),
                "still_axis_fraction": float(np.nanmean(speed < 0.75))}

    rows = []
    for s in tqdm(range(n + 1), desc="scales of frame 1 given"):
        masks = [torch.full(tuple(kn.shape), k < n + s) for k, kn in enumerate(known)]
        with torch.no_grad():
            out = msar.sample(pipe.transformer, tok, Y, cfg=args.cfg, top_p=args.top_p,
                              temperature=args.temperature, seed=args.seed, known=known, known_mask=masks)
        row = {"frame1_scales_given": s, "given_sides": [list(sched.shape(k))[1:] for k in range(n, n + s)],
               **score(first_steps(out.data.clamp(-1, 1), steps))}
        rows.append(row)
        print(row)
    out = {"pipeline": args.pipeline, "videos": args.videos,
           "sampling": {"cfg": args.cfg, "top_p": args.top_p, "temperature": args.temperature, "seed": args.seed},
           "real": {"mean_speed": float(np.nanmean(np.abs(v_true))),
                    "still_axis_fraction": float(np.nanmean(np.abs(v_true).mean(1) < 0.75)),
                    "velocity_error_if_static": float(np.nanmean(np.linalg.norm(v_true, axis=-1)))},
           "tokenizer_reconstruction": score(first_steps(rec, steps)),
           "position_probe": probes,
           "rows": rows}
    write_result_json(args.out, out, started)
    return out


if __name__ == "__main__":
    main()
