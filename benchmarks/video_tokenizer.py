"""The video tokenizer alone: train it with the demo's recipe, then score its reconstructions.

The transformer can only draw what the tokenizer decodes, so a tokenizer whose reconstructions
lose the digit's identity caps the samples' temporal consistency (a digit read as the same class in
every frame).  This trains one tokenizer exactly as ``examples.video_demo`` does (its flags, e.g.
``--tok-steps``, ``--time-stages``, ``--latent-dim``) and reports on the demo's 256 held-out videos:
PSNR, the motion of the reconstructions (velocity sign flips, centroid track error) and their
identity as the demo's per-frame CNN classifier reads it (per-frame accuracy, per frame index, and
temporal consistency), next to the real videos' scores.

Run::

    python -m benchmarks.video_tokenizer --out benchmarks/results/video/tokenizer/steps600.json -- --tok-steps 600

Everything after ``--`` goes to the demo's argument parser (``--threads`` sets torch's threads).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import write_result_json
from examples import video_demo as vd
from modalities.video import MovingDigits, VideoTokenizer
from modalities.video import metrics as vm


def identity_report(pred: np.ndarray, labels: torch.Tensor) -> dict:
    """Per-frame predictions ``(B, T)`` against the videos' labels ``(B,)``."""
    hit = pred == labels.numpy()[:, None]
    return {"frame_accuracy": float(hit.mean()), "frame_accuracy_per_frame": hit.mean(0).round(4).tolist(),
            "temporal_consistency": vm.temporal_consistency(pred)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--save", default=None, help="also save the trained tokenizer here (save_pretrained folder)")
    p.add_argument("demo_args", nargs=argparse.REMAINDER, help="after --: the demo's tokenizer flags")
    args = p.parse_args(argv)
    demo_argv = args.demo_args[1:] if args.demo_args[:1] == ["--"] else args.demo_args
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:  # the trainer's checkpoints: not kept
        d = vd.parse_args(["--out", tmp, *demo_argv])
        torch.set_num_threads(d.threads)
        torch.manual_seed(d.seed)
        np.random.seed(d.seed)
        gen = torch.Generator().manual_seed(d.seed)
        train = MovingDigits(d.num_train, num_frames=d.frames, size=d.size, seed=d.seed, split="train")
        test = MovingDigits(vd.test_videos(d), num_frames=d.frames, size=d.size, seed=d.seed + 1, split="test")
        Xtr, Ytr = train.tensors()
        Xte, Yte = test.tensors()
        cfg = vd.tokenizer_config(d)
        tok = VideoTokenizer(cfg)
        t0 = time.time()
        vd.train_tokenizer(tok, Xtr, d, gen)
        train_s = time.time() - t0
    if args.save:
        tok.save_pretrained(args.save)
    report, rec = vm.reconstruction_report(tok, Xte)
    clf = vm.FrameDigitClassifier(crop=train.digit_size, steps=d.classifier_steps).fit(Xtr[:1000], Ytr[:1000])
    with torch.no_grad():
        codes = torch.cat(tok.encode(Xte), 1)
    result = {
        "tokenizer": {"config": vars(cfg) | {"channels": list(cfg.channels)},
                      "parameters_M": sum(p.numel() for p in tok.parameters()) / 1e6,
                      "train_steps": d.tok_steps, "train_s": train_s,
                      "codebook_use_test": float(codes.unique().numel()) / cfg.vocab_size},
        "reconstruction": {k: report[k] for k in ("psnr_db", "velocity_flips", "velocity_flips_real", "track_error")}
                          | {"still_axes_per_video": report["motion"]["still_axes_per_video"],
                             "flips_on_still_axes": report["motion"]["flips_on_still_axes"]},
        "identity": {"reconstructed_test": identity_report(clf.predict(rec), Yte),
                     "real_test": identity_report(clf.predict(Xte), Yte)},
        "videos": {"train": len(Xtr), "test": len(Xte)},
    }
    rid = result["identity"]["reconstructed_test"]
    print(f"PSNR {report['psnr_db']:.2f} dB, flips {report['velocity_flips']:.2f} (real {report['velocity_flips_real']:.2f}), "
          f"reconstructions: per-frame accuracy {rid['frame_accuracy']:.3f}, consistency {rid['temporal_consistency']:.3f}; "
          f"tokenizer trained in {train_s / 60:.1f} min")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_result_json(args.out, result, started)
    return result


if __name__ == "__main__":
    main()
