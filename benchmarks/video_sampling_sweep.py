"""Sampling settings of a trained video pipeline: per-frame accuracy, temporal consistency and motion
of class-conditional samples for several (cfg, top-p, temperature) settings and seeds.

Run::

    python -m benchmarks.video_sampling_sweep --pipeline outputs/video/default/pipeline \
        --out benchmarks/results/video/sampling_sweep_default.json

The classifier is the demo's (trained on 1000 training videos); no test video is read.  A pipeline
trained with ``--condition motion`` is sampled at velocities drawn from the training videos (one draw
per seed) and also scored on how its samples follow them (:func:`modalities.video.motion.motion_following`).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tqdm import tqdm

import msar
from benchmarks.common import write_result_json
from examples.video_demo import video_metrics
from modalities.video import MovingDigits
from modalities.video import metrics as vm
from modalities.video.motion import draw_velocities, motion_condition, motion_following

SETTINGS = {  # name -> msar.sample keyword arguments
    "cfg3_T1": dict(cfg=3.0, top_p=0.9),
    "cfg3_T0.85": dict(cfg=3.0, top_p=0.9, temperature=0.85),
    "cfg3_T0.7": dict(cfg=3.0, top_p=0.9, temperature=0.7),
    "cfg3_T0.5": dict(cfg=3.0, top_p=0.9, temperature=0.5),
    "cfg3_T0.35": dict(cfg=3.0, top_p=0.9, temperature=0.35),
    "cfg5_T0.5": dict(cfg=5.0, top_p=0.9, temperature=0.5),
    "cfg1.5_T0.7": dict(cfg=1.5, top_p=0.9, temperature=0.7),
    "cfg1.5_T0.5": dict(cfg=1.5, top_p=0.9, temperature=0.5),
    "cfg2_T0.5": dict(cfg=2.0, top_p=0.9, temperature=0.5),
    "cfg2_T0.35": dict(cfg=2.0, top_p=0.9, temperature=0.35),
    "cfg1.5_T0.35": dict(cfg=1.5, top_p=0.9, temperature=0.35),
    "cfg1_T0.5": dict(cfg=1.0, top_p=0.9, temperature=0.5),
    "cfg1_T0.7": dict(cfg=1.0, top_p=0.9, temperature=0.7),
    "cfg6_T0.7": dict(cfg=6.0, top_p=0.9, temperature=0.7),
    "cfg2_T1": dict(cfg=2.0, top_p=0.9),
    "cfg4_T1": dict(cfg=4.0, top_p=0.9),
    "unguided_unfiltered": dict(cfg=0.0),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="a video pipeline folder (the demo's <out>/pipeline)")
    p.add_argument("--out", required=True, help="result JSON path")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="settings to measure")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples-per-class", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    pipe = msar.from_pretrained(args.pipeline)
    c = pipe.tokenizer.config
    train = MovingDigits(8000, num_frames=c.frames, size=c.height, seed=0, split="train")
    X, Y = train.tensors()
    clf = vm.FrameDigitClassifier(crop=train.digit_size, steps=1500).fit(X[:1000], Y[:1000])
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    motion = pipe.transformer.cond_kind == "vector"  # a --condition motion pipeline: class + velocity

    def draw(seed: int) -> tuple[dict, torch.Tensor]:
        """The sample's condition keyword and the velocities asked for (None: class labels only)."""
        if not motion:
            return {"labels": labels}, None
        v = draw_velocities(train.velocities, len(labels), torch.Generator().manual_seed(1000 + seed))
        return {"condition": motion_condition(labels, v, num_classes=10, max_speed=train.max_speed)}, v
    rows = {}
    for name, kw in tqdm([(n, SETTINGS[n]) for n in args.settings], desc="settings"):
        per_seed = []
        for seed in args.seeds:
            cond, asked = draw(seed)
            with torch.no_grad():
                v = pipe.sample(**cond, seed=seed, **kw).data.clamp(-1, 1)
            m = video_metrics(v, labels, clf)
            follow = {} if asked is None else {f"motion_{k}": x for k, x in motion_following(v, asked).items()
                                                if k != "videos"}
            per_seed.append({"seed": seed, "frame_accuracy": m["frame_accuracy"],
                             "temporal_consistency": m["temporal_consistency"], **m["motion"], **follow})
        keys = [k for k in per_seed[0] if k != "seed"]
        rows[name] = {"sample_kwargs": kw, "mean": {k: float(np.mean([r[k] for r in per_seed])) for k in keys},
                      "per_seed": per_seed}
        print(name, {k: round(rows[name]["mean"][k], 3) for k in ("frame_accuracy", "temporal_consistency",
                                                                   "bounces_per_video", "still_axes_per_video",
                                                                   *(["motion_speed_error"] if motion else []))})
    out = {"pipeline": args.pipeline, "condition": "class + velocity" if motion else "class", "seeds": args.seeds,
           "samples_per_class": args.samples_per_class, "settings": rows}
    write_result_json(args.out, out, started)
    return out


if __name__ == "__main__":
    main()
