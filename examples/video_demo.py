"""Video next-scale prediction on moving digits, end to end on CPU.

Trains a causal 3-D conv multi-scale VQ-VAE (:mod:`modalities.video`) and a next-scale
transformer (:class:`msar.NextScaleTransformer`) conditioned on the digit class and the
velocity (:mod:`modalities.video.motion`) on bouncing scikit-learn digits, then

* samples videos of every digit class, each asked to move at a velocity drawn from the
  training videos (animated GIF + PNG filmstrips; the same model from the class alone too),
* runs three zero-shot edits through known-token conditioning (:func:`msar.sample`):
  frame prediction, frame interpolation, spatial inpainting over time,
* writes ``metrics.json``: reconstruction PSNR, per-frame digit accuracy of generated
  frames (a CNN classifier trained on real frames; a stricter logistic one too), temporal consistency,
  a motion check (constant velocity between bounces), and the same numbers on real
  videos as the reference.  FVD needs I3D weights that cannot be fetched here; give a
  feature network with ``--feature-net`` to get a Frechet distance in its feature space.

Run::

    python -m examples.video_demo                      # 25 min on an idle 2-core CPU (2 threads)
    python -m examples.video_demo --quick              # ~1 min smoke run
    python -m examples.video_demo --schedule space     # all latent frames at every scale
    python -m examples.video_demo --schedule joint     # t grows with the scale (coarse tokens mix frames)
    python -m examples.video_demo --time-stride 4 --time-upsample repeat --tok-motion-weight 0   # the earlier tokenizer
    python -m examples.video_demo --tok-layout 4       # every frame's coarsest token says where the digit is
    python -m examples.video_demo --condition class --temperature 0.7 --cfg 3   # class only (the 3b56c02 default)
    python -m examples.video_demo --tokenizer out/pipeline/tokenizer   # reuse a trained tokenizer
    python -m examples.video_demo --feature-net i3d.pt # + Frechet distance (TorchScript net)

The default recipe: per-frame (frame-causal) pyramid over a 5 x 8 x 8 latent (time stride 2, 425
tokens in 20 scales: every frame is generated given the finished frames before it); tokenizer with
depth-to-time upsampling at its coarse stages and an L1 loss on frame differences, 1200 steps at batch
16; transformer depth 4 / width 128 conditioned on class and velocity (the velocity left out for 20% of the
videos), 3200 steps at batch 12 and learning rate 3e-3 on 8000 videos; sampling cfg 2 (the guidance ramp
restarts with every frame's pyramid), top-p 0.9, temperature 0.5; torch on 2 threads.  Results and
what moved them: ``benchmarks/results/video``.  Interrupted runs resume from ``<out>/ckpt_*``.

Outputs (``--out``, default ``outputs/video_demo``): ``metrics.json``, ``samples.gif``,
``samples.png``, ``reconstructions.png``, ``progression.png``, ``edit_*.png``,
``edits.gif``, ``pipeline/`` (tokenizer and transformer: ``msar.from_pretrained(out + "/pipeline")``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

import msar
from benchmarks.common import write_result_json
from msar.training import (TokenDataset, TransformerTrainConfig, TransformerTrainer, VQVAETrainConfig, VQVAETrainer,
                           build_loader, collate_tokens)
from modalities.video.schedules import FRAME_CODINGS, FRAME_INPUTS, build_schedule
from modalities.video.tokenizer import TIME_STAGES
from modalities.video import (MovingDigits, VideoTokenizerConfig, VideoTokenizer, box_mask, fill_unknown,
                              frame_prediction_mask, interpolation_mask, video_known_masks)
from modalities.video import metrics as vm
from modalities.video.motion import draw_velocities, motion_condition_dim, motion_features, motion_following
from modalities.video.viz import save_filmstrip, save_gif


def test_videos(args: argparse.Namespace) -> int:
    """Size of the held-out set (reconstructions, validation, edits)."""
    return 64 if args.quick else 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/video_demo")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (~1-2 minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="frame", choices=["joint", "space", "frame"],
                   help="space-time pyramid: joint (t grows with scale), space (time at full length), frame (per-frame, frame-causal)")
    p.add_argument("--frames", type=int, default=9, help="1 + time_stride * n (the first frame is encoded alone)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--frame-coding", default="intra", choices=list(FRAME_CODINGS),
                   help="per-frame schedule: quantize every frame from scratch (intra) or as its change from the "
                        "previous frame's reconstruction (delta; every scale's input then shows the previous frame)")
    p.add_argument("--frame-input", default=None, choices=list(FRAME_INPUTS),
                   help="per-frame intra schedule: the transformer input of frame t > 0 shows the frame's own coarse "
                        "scales (own, the default) or also the finished previous frame's finer detail (previous); "
                        "the codes are the same, so it may differ from a --tokenizer's")
    p.add_argument("--sides", type=int, nargs="+", default=None,
                   help="spatial sides of the pyramid's scales (square; default 1 2 4 ... up to the latent side), "
                        "e.g. 1 2 3 4 6 8 for VAR-like intermediate scales")
    p.add_argument("--time-stride", type=int, default=2)
    p.add_argument("--space-stride", type=int, default=4,
                   help="spatial downsampling of the tokenizer (latent side = size / space_stride); the finest scale "
                        "holds most tokens, so 8 makes every transformer step ~4x cheaper than 4")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--quantizer", default="vq", choices=["vq", "fsq", "bitwise"],
                   help="residual quantizer (msar.make_quantizer): fsq and bitwise have no codebook to collapse")
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--num-train", type=int, default=8000)
    p.add_argument("--tokenizer", default=None, help="a trained VideoTokenizer (a save_pretrained folder, e.g. OUT/pipeline/tokenizer) to use instead of training one")
    p.add_argument("--tok-channels", type=int, nargs="+", default=None,
                   help="tokenizer widths, one per stage + 1 (default 16 32 64, then 64 per extra stage)")
    p.add_argument("--tok-steps", type=int, default=1200)
    p.add_argument("--tok-batch", type=int, default=16)
    p.add_argument("--tok-lr", type=float, default=2e-3)
    p.add_argument("--time-upsample", default="depth", choices=["depth", "repeat"],
                   help="decoder time upsampling: depth (each frame of a latent group its own features) or repeat (nearest)")
    p.add_argument("--time-stages", default="coarse", choices=list(TIME_STAGES),
                   help="which tokenizer stages resample time: 'coarse' (default: the decoder upsamples time first, "
                        "so every frame of a latent group passes its space-time convs) or 'fine' (last, at full resolution)")
    p.add_argument("--tok-motion-weight", type=float, default=1.0,
                   help="weight of an L1 loss on frame differences (x[t+1] - x[t]) in the tokenizer's training loss")
    p.add_argument("--tok-layout", type=int, default=0, metavar="SIDE",
                   help="> 0: the encoder sees pixel coordinates and every latent frame's mean (its coarsest token) "
                        "is trained to predict a SIDE x SIDE thumbnail of the frame (VideoTokenizer.layout_loss), so "
                        "one token commits where the digit is; 0: off")
    p.add_argument("--tok-layout-weight", type=float, default=1.0, help="weight of the layout loss (with --tok-layout)")
    p.add_argument("--ar-steps", type=int, default=3200)
    p.add_argument("--ar-batch", type=int, default=12)
    p.add_argument("--ar-lr", type=float, default=3e-3)
    p.add_argument("--ar-scale-loss-power", type=float, default=0.0,
                   help="weight of scale k's tokens in the transformer's loss, n_k ** -POWER "
                        "(TransformerTrainConfig.scale_loss_power): 0 every token the same (VAR), 1 every scale the "
                        "same, so the few coarse tokens that place the digit count as much as the 64 of a frame's finest")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--coord-frequencies", type=int, default=4,
                   help="transformer positions: add sin/cos features of every token's (t, y, x) cell centre at this "
                        "many octaves (msar.TransformerConfig.coord_frequencies); 0 learns every position on its own")
    p.add_argument("--condition", default="motion", choices=["class", "motion"],
                   help="what the transformer is conditioned on: the digit class, or the class and the velocity "
                        "(modalities.video.motion; samples then move at velocities drawn from the training videos)")
    p.add_argument("--motion-dropout", type=float, default=0.2,
                   help="with --condition motion: share of training videos whose velocity is not given, so the model "
                        "also generates from the class alone (class-only samples and the edits use that)")
    p.add_argument("--cfg", type=float, default=2.0,
                   help="classifier-free guidance scale (stronger guidance adds velocity sign flips: benchmarks/results/video)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=0.5,
                   help="sampling temperature (samples and edits); below 1 keeps a digit's shape from frame to frame")
    p.add_argument("--classifier-steps", type=int, default=1500, help="training steps of the per-frame CNN digit classifier")
    p.add_argument("--samples-per-class", type=int, default=24,
                   help="class-conditional samples per digit that the sample metrics are measured on (sampling is "
                        "cheap; at 8 per class the temporal consistency of one model moves by +-0.03 between seeds)")
    p.add_argument("--edit-videos", type=int, default=64,
                   help="held-out videos per zero-shot edit (frame prediction, interpolation, inpainting)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the default timing: 2 on an idle 2-core CPU)")
    p.add_argument("--feature-net", default=None,
                   help="optional I3D-style video feature network (B, 3, T, H, W) in [-1, 1] -> (B, D): torch.export .pt2, TorchScript file, or a state dict with --feature-net-factory")
    p.add_argument("--feature-net-factory", default=None, help="'package.module:function' that builds the network for a state dict")
    p.add_argument("--feature-net-size", type=int, default=None, help="resize frames to this side before the feature net (I3D: 224)")
    if p.parse_args(argv).quick:  # smaller defaults; flags given explicitly still win
        p.set_defaults(num_train=400, tok_steps=40, ar_steps=40, samples_per_class=2, edit_videos=4, depth=1, width=32,
                       classifier_steps=150)
    args = p.parse_args(argv)
    if args.samples_per_class < 1 or args.edit_videos < 1:
        p.error(f"--samples-per-class and --edit-videos must be >= 1, got {args.samples_per_class}, {args.edit_videos}")
    if args.edit_videos > test_videos(args):
        p.error(f"--edit-videos {args.edit_videos}: the held-out set has {test_videos(args)} videos")
    if not 0 <= args.tok_layout <= args.size:
        p.error(f"--tok-layout must be in [0, --size={args.size}], got {args.tok_layout}")
    if args.coord_frequencies < 0:
        p.error(f"--coord-frequencies must be >= 0, got {args.coord_frequencies}")
    if not 0 <= args.ar_scale_loss_power <= 1:
        p.error(f"--ar-scale-loss-power must be in [0, 1], got {args.ar_scale_loss_power}")
    if not 0 <= args.motion_dropout < 1:
        p.error(f"--motion-dropout must be in [0, 1), got {args.motion_dropout}")
    if not args.temperature > 0:  # checked here, not after the training it would follow
        p.error(f"--temperature must be > 0, got {args.temperature}")
    if args.tok_channels is None:  # one more 64-wide stage per extra factor 2 of space_stride
        args.tok_channels = [16, 32, 64] + [64] * max(0, int(round(math.log2(max(args.space_stride, 1)))) - 2)
    return args


# ---------------------------------------------------------------------------- training
def tokenizer_config(args: argparse.Namespace) -> VideoTokenizerConfig:
    """The tokenizer the demo's flags ask for (when no trained ``--tokenizer`` is given)."""
    return VideoTokenizerConfig(frames=args.frames, height=args.size, width=args.size, vocab_size=args.vocab,
                                time_stride=args.time_stride, space_stride=args.space_stride, schedule=args.schedule,
                                quantizer=args.quantizer, latent_dim=args.latent_dim,
                                channels=tuple(args.tok_channels), time_upsample=args.time_upsample,
                                time_stages=args.time_stages, sides=args.sides, frame_coding=args.frame_coding,
                                frame_input=args.frame_input or "own", coord_input=args.tok_layout > 0,
                                layout_side=args.tok_layout)


@torch.no_grad()
def init_codebook_from_data(tok: VideoTokenizer, videos: torch.Tensor, gen: torch.Generator, n: int = 64) -> None:
    """Start every codeword at an encoder output so none begins far from the data (the usual
    cause of early collapse on a small codebook). FSQ and bitwise quantizers have no learned
    codebook (their codes are a fixed grid): nothing to do."""
    q = tok.quantizer
    if not isinstance(q, msar.MultiScaleResidualQuantizer):
        return
    f = tok.encode_latent(videos[torch.randperm(len(videos), generator=gen)[:n]])
    pool = msar.to_tokens(f).reshape(-1, q.dim)
    q.embedding.weight.data.copy_(pool[torch.randint(0, len(pool), (q.vocab_size,), generator=gen)])


def train_tokenizer(tok: VideoTokenizer, videos: torch.Tensor, args, gen: torch.Generator) -> list[dict]:
    """L1 + MSE + the quantizer's VQ loss with :class:`msar.training.VQVAETrainer`; dead
    codewords are re-seeded from encoder outputs every 25 steps.  Checkpoints go to
    ``<out>/ckpt_tokenizer`` and an interrupted run resumes from them."""
    init_codebook_from_data(tok, videos, gen)
    def recon_loss(x: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
        # the trainer's default terms (L1 + MSE), plus L1 on frame differences: motion lives there
        terms = {"l1": F.l1_loss(recon, x), "l2": F.mse_loss(recon, x),
                 "motion": args.tok_motion_weight * F.l1_loss(recon.diff(dim=2), x.diff(dim=2))}
        if tok.layout_head is not None:
            terms["layout"] = args.tok_layout_weight * tok.layout_loss(x)
        return terms

    cfg = VQVAETrainConfig(lr=args.tok_lr, total_steps=args.tok_steps, warmup_steps=min(20, args.tok_steps // 10),
                           lr_schedule="cos", final_lr_ratio=0.05, weight_decay=0.0, restart_every=25,
                           ckpt_dir=os.path.join(args.out, "ckpt_tokenizer"), ckpt_every=250,
                           log_dir=os.path.join(args.out, "logs_tokenizer"), log_every=10, tensorboard=False)
    trainer = VQVAETrainer(tok, cfg, recon_loss=recon_loss if args.tok_motion_weight or tok.layout_head is not None else None)
    log = trainer.fit(build_loader(torch.utils.data.TensorDataset(videos), args.tok_batch, seed=args.seed))
    tok.eval()
    return log


def train_transformer(model: msar.NextScaleTransformer, tok: VideoTokenizer, train_set: TokenDataset,
                      val_set: TokenDataset, val_conditions: dict[str, torch.Tensor], args) -> tuple[list[dict], dict]:
    """Teacher-forced cross-entropy over all scales at once (block-causal mask) with
    :class:`msar.training.TransformerTrainer`; checkpoints in ``<out>/ckpt_transformer``.

    Returns the training records and validation metrics, including the validation loss under
    each of ``val_conditions`` (name -> other conditions of the validation videos, e.g. wrong
    labels: the gap says how much the model uses the condition at all)."""
    cfg = TransformerTrainConfig(lr=args.ar_lr, total_steps=args.ar_steps, warmup_steps=min(100, args.ar_steps // 10),
                                 lr_schedule="lin0", final_lr_ratio=0.05, weight_decay=0.05,
                                 scale_loss_power=args.ar_scale_loss_power,
                                 ckpt_dir=os.path.join(args.out, "ckpt_transformer"), ckpt_every=250,
                                 log_dir=os.path.join(args.out, "logs_transformer"), log_every=10, tensorboard=False)
    trainer = TransformerTrainer(model, tok, cfg)
    log = trainer.fit(build_loader(train_set, args.ar_batch, seed=args.seed, collate_fn=collate_tokens))
    model.eval()

    def loader(ds):
        return build_loader(ds, 64, shuffle=False, drop_last=False, collate_fn=collate_tokens)

    val = trainer.evaluate(loader(val_set), log=False)
    for name, cond in val_conditions.items():
        val[name] = trainer.evaluate(loader(TokenDataset(val_set.indices, cond)), log=False)["loss"]
    val["loss_train_subset"] = trainer.evaluate(loader(TokenDataset([t[:len(val_set)] for t in train_set.indices],
                                                                    train_set.labels[:len(val_set)])), log=False)["loss"]
    return log, val


# ---------------------------------------------------------------------------- evaluation helpers
def condition_kwargs(cond: torch.Tensor) -> dict:
    """``msar.sample``'s condition argument: class labels ``(B,)`` long, or motion features
    ``(B, D)`` float (:func:`modalities.video.motion.motion_features`) as a vector Condition."""
    return {"condition": msar.Condition.vector(cond)} if cond.is_floating_point() else {"labels": cond}


def video_metrics(videos: torch.Tensor, labels: torch.Tensor, clf: vm.FrameDigitClassifier) -> dict:
    pred = clf.predict(videos)
    return {"frame_accuracy": vm.frame_accuracy(pred, labels),
            "temporal_consistency": vm.temporal_consistency(pred),
            "motion": vm.motion_check(videos)}


@torch.no_grad()
def zero_shot(name: str, model, tok: VideoTokenizer, videos: torch.Tensor, labels: torch.Tensor, cond: torch.Tensor,
              known_pixels: torch.Tensor, recon: torch.Tensor, args, clf, out_dir: str) -> tuple[dict, torch.Tensor]:
    """Generate the unknown part of ``videos`` (class ``labels``, conditioned on ``cond``: see
    :func:`condition_kwargs`) given ``known_pixels`` (T, H, W); figure + metrics.
    ``recon``: the tokenizer's reconstruction of ``videos`` (the reference for the known region).
    When the given frames are a prefix (frame prediction), the continuation's velocity is compared
    with the true one (:func:`modalities.video.metrics.velocity_error`), for the generated videos and
    for the tokenizer's reconstructions (the best a model can do through this tokenizer)."""
    B = len(videos)
    masks = video_known_masks(tok, known_pixels, batch_size=B)
    known = tok.encode(fill_unknown(videos, known_pixels))
    out = msar.sample(model, tok, **condition_kwargs(cond), cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                      temperature=args.temperature, seed=args.seed + 7,
                      known=known, known_mask=masks)
    gen = out.data.clamp(-1, 1)
    preserved = all(bool((o[m] == k[m]).all()) for o, k, m in zip(out.indices, known, masks))
    kp = known_pixels.unsqueeze(0).unsqueeze(0).expand_as(videos)
    err = (gen - videos).pow(2) / 4  # on the [0, 1] scale
    err_known = float(err[kp].mean()) if kp.any() else float("nan")
    err_unknown = float(err[~kp].mean()) if (~kp).any() else float("nan")
    m = video_metrics(gen, labels, clf)
    made = (~known_pixels).flatten(1).any(1).numpy()  # frames with something generated
    pred = clf.predict(gen)
    m.update({
        "generated_frames": int(made.sum()),
        "frame_accuracy_generated_frames": float((pred[:, made] == labels.numpy()[:, None]).mean()),
        "known_tokens_preserved": preserved,
        "known_token_fraction": float(torch.cat(masks, 1).float().mean()),
        "psnr_known_region": 10 * math.log10(1 / max(err_known, 1e-10)),
        "psnr_unknown_region": 10 * math.log10(1 / max(err_unknown, 1e-10)),
        "psnr_known_region_tokenizer_recon": 10 * math.log10(1 / max(float(((recon - videos).pow(2) / 4)[kp].mean()), 1e-10)),
    })
    given = known_pixels.flatten(1).all(1)  # (T,) frames given whole
    start = int(given.long().cumprod(0).sum())
    if 0 < start < len(given) and not given[start:].any():  # a prefix of frames is given: a continuation
        m["continuation"] = {"generated": vm.velocity_error(gen, videos, start),
                             "tokenizer_recon": vm.velocity_error(recon, videos, start)}
    n = min(4, B)
    shown = torch.cat([fill_unknown(videos[:n], known_pixels, 0.0), gen[:n]], 0)
    unk = (~known_pixels).unsqueeze(0).expand(2 * n, -1, -1, -1).clone()
    unk[:n] = False
    rows = [f"input {i}" for i in range(n)] + [f"output {i}" for i in range(n)]
    save_filmstrip(shown, os.path.join(out_dir, f"edit_{name}.png"), row_labels=rows, unknown=unk,
                   title=f"{name}: gray = not given; red tint = generated")
    return m, gen


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    timings = {}

    # ---------------- data
    train = MovingDigits(args.num_train, num_frames=args.frames, size=args.size, seed=args.seed, split="train")
    test = MovingDigits(test_videos(args), num_frames=args.frames, size=args.size, seed=args.seed + 1,
                        split="test")
    Xtr, Ytr = train.tensors()
    Xte, Yte = test.tensors()
    motion = args.condition == "motion"

    def conditions(labels: torch.Tensor, velocities=None, given=None) -> torch.Tensor:
        """What the transformer is conditioned on: the class labels (B,), or with --condition motion
        the class and the velocity as features (B, D) (rows with ``given`` False: class only)."""
        if not motion:
            return labels
        v = None if velocities is None else torch.as_tensor(velocities)
        return motion_features(labels, v, num_classes=10, max_speed=train.max_speed, given=given)

    # the videos whose velocity the training leaves out (fixed by the seed, so a resumed run sees the same)
    given_tr = torch.rand(len(Ytr), generator=torch.Generator().manual_seed(args.seed + 5)) >= args.motion_dropout
    C_tr, C_te = conditions(Ytr, train.velocities, given_tr), conditions(Yte, test.velocities)

    # ---------------- tokenizer
    if args.tokenizer:  # a trained tokenizer (its own config wins over the command line)
        tok = VideoTokenizer.from_pretrained(args.tokenizer)
        cfg = tok.config
        if (cfg.frames, cfg.height, cfg.width) != (args.frames, args.size, args.size):
            raise ValueError(f"--tokenizer {args.tokenizer} was trained on {cfg.frames}x{cfg.height}x{cfg.width} "
                             f"videos, but --frames/--size ask for {args.frames}x{args.size}x{args.size}")
        args.schedule, args.vocab, args.time_stride = cfg.schedule, cfg.vocab_size, cfg.time_stride
        args.space_stride, args.tok_channels = cfg.space_stride, list(cfg.channels)
        args.quantizer, args.latent_dim = cfg.quantizer, cfg.latent_dim
        args.time_upsample, args.frame_coding = cfg.time_upsample, cfg.frame_coding
        args.time_stages = cfg.time_stages
        if args.sides is not None and build_schedule(cfg.schedule, cfg.latent_shape, args.sides) != tok.schedule:
            raise ValueError(f"--sides {args.sides}: --tokenizer {args.tokenizer} was trained with other scales, "
                             f"{tok.schedule} (the scales are part of its codes)")
        args.sides = cfg.sides
        if args.frame_input not in (None, cfg.frame_input):  # only the transformer's input changes: same weights
            tok = tok.with_frame_input(args.frame_input)
            cfg = tok.config
        args.frame_input = cfg.frame_input
    else:
        cfg = tokenizer_config(args)
        tok = VideoTokenizer(cfg)
    sched = tok.schedule
    print(f"latent {cfg.latent_shape}, schedule {cfg.schedule}: {len(sched)} scales, {sched.L} tokens; "
          f"tokenizer {sum(p.numel() for p in tok.parameters()) / 1e6:.2f}M params")
    t0 = time.time()
    tok_log = train_tokenizer(tok, Xtr, args, gen) if not args.tokenizer else []
    timings["tokenizer_train_s"] = time.time() - t0
    tok.save_pretrained(os.path.join(args.out, "pipeline", "tokenizer"))
    test_set = TokenDataset.encode(tok, Xte, C_te)  # encoded once: figures, validation
    # the tokenizer's own evaluation: PSNR and motion of its reconstructions (it caps the samples' motion)
    tok_eval, rec_te = vm.reconstruction_report(tok, Xte)
    rec_psnr = tok_eval["psnr_db"]
    print(f"test reconstruction PSNR {rec_psnr:.2f} dB, velocity sign flips per video {tok_eval['velocity_flips']:.2f} "
          f"(real {tok_eval['velocity_flips_real']:.2f}), centroid track error {tok_eval['track_error']:.2f} px")
    save_filmstrip(torch.stack([v for pair in zip(Xte[:4], rec_te[:4]) for v in pair]),
                   os.path.join(args.out, "reconstructions.png"),
                   row_labels=[s for i in range(4) for s in (f"real {i}", f"recon {i}")], title="tokenizer round trip")
    with torch.no_grad():
        prog = torch.cat(tok.decode_progression([t[:1] for t in test_set.indices])).clamp(-1, 1)
    save_filmstrip(prog, os.path.join(args.out, "progression.png"),
                   row_labels=[f"<= {'x'.join(map(str, sched.shape(k)))}" for k in range(len(sched))]
                   if args.schedule != "frame" else [f"<= scale {k}" for k in range(len(sched))],
                   title="coarse-to-fine: decoded from scales <= k")

    # ---------------- transformer
    t0 = time.time()
    train_set = TokenDataset.encode(tok, Xtr, C_tr)
    usage = float(torch.cat(train_set.indices, 1).unique().numel()) / cfg.vocab_size
    cond_args = (dict(num_classes=0, cond_kind="vector", cond_dim=motion_condition_dim(10)) if motion
                 else dict(num_classes=10))
    tcfg = msar.TransformerConfig(schedule=sched, vocab_size=cfg.vocab_size, latent_dim=cfg.latent_dim,
                                  depth=args.depth, embed_dim=args.width, num_heads=max(1, args.width // 32),
                                  cond_drop_rate=0.1, coord_frequencies=args.coord_frequencies, **cond_args)
    model = msar.NextScaleTransformer(tcfg)
    print(f"transformer {model.num_parameters() / 1e6:.2f}M params, codebook use on train {usage:.0%}")
    val_conditions = {"loss_wrong_label": conditions((Yte + 1) % 10, test.velocities)}
    if motion:  # how much the velocity tells the model: the loss with the class alone, and with a wrong velocity
        val_conditions["loss_motion_not_given"] = conditions(Yte)
        val_conditions["loss_wrong_motion"] = conditions(Yte, -torch.as_tensor(test.velocities))
    ar_log, ar_val = train_transformer(model, tok, train_set, test_set, val_conditions, args)
    print("transformer validation: " + ", ".join(f"{k} {ar_val[k]:.3f}" for k in
                                                 ("loss", "acc", *val_conditions, "loss_train_subset")))
    timings["transformer_train_s"] = time.time() - t0

    # ---------------- classifier on real frames, reference metrics
    t0 = time.time()
    clf = vm.FrameDigitClassifier(crop=train.digit_size, steps=args.classifier_steps).fit(Xtr[:1000], Ytr[:1000])
    real = video_metrics(Xte, Yte, clf)
    recon = video_metrics(rec_te, Yte, clf)

    # ---------------- class-conditional samples
    n = args.samples_per_class
    labels = torch.arange(10).repeat_interleave(n)
    knobs = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, seed=args.seed)
    velocities = (draw_velocities(train.velocities, len(labels), torch.Generator().manual_seed(args.seed + 11))
                  if motion else None)  # with --condition motion: the velocities asked for, drawn from the data
    with torch.no_grad():
        out = msar.sample(model, tok, **condition_kwargs(conditions(labels, velocities)), **knobs)
    samples = out.data.clamp(-1, 1)
    gen_metrics = video_metrics(samples, labels, clf)
    if motion:  # the asked-for velocities against the samples' (real videos against their own: the floor)
        gen_metrics["motion_following"] = motion_following(samples, velocities)
        real["motion_following"] = motion_following(Xte, test.velocities)
        with torch.no_grad():  # the same model from the class alone (the velocity not given)
            class_only = msar.sample(model, tok, **condition_kwargs(conditions(labels)), **knobs).data.clamp(-1, 1)
        gen_metrics["class_only"] = video_metrics(class_only, labels, clf)
    # the stricter linear classifier (it also penalises blur), for comparison
    strict = vm.FrameDigitClassifier(crop=train.digit_size, kind="logistic").fit(Xtr[:1000], Ytr[:1000])
    strict_acc = {name: vm.frame_accuracy(strict.predict(v), y)
                  for name, v, y in (("real_test", Xte, Yte), ("reconstructed_test", rec_te, Yte),
                                     ("generated", samples, labels))}
    per_class = {}
    pred = clf.predict(samples)
    for c in range(10):
        per_class[str(c)] = float((pred[labels.numpy() == c] == c).mean())
    gen_metrics["per_class_frame_accuracy"] = per_class
    show = torch.stack([samples[labels == c][0] for c in range(10)])
    save_filmstrip(show, os.path.join(args.out, "samples.png"), row_labels=[f"class {c}" for c in range(10)],
                   title=f"{'class + velocity' if motion else 'class'}-conditional samples ({args.schedule} schedule, "
                         f"cfg {args.cfg})")
    grid = torch.cat([samples[labels == c][:min(4, n)] for c in range(10)])
    save_gif(grid, os.path.join(args.out, "samples.gif"), nrow=min(4, n) * 2 if n > 1 else 10)

    # ---------------- zero-shot edits on held-out videos
    T, S = args.frames, args.size
    ts = args.time_stride
    ne = args.edit_videos
    Xe, Ye = Xte[:ne], Yte[:ne]
    edits = {}
    tasks = {
        # given the first 5 frames (whole latent groups for time stride 1, 2 or 4): predict the rest
        "frame_prediction": frame_prediction_mask(T, S, S, given=1 + ts * max(1, 4 // ts)),
        # given frame 0 and the last 4 frames: fill in the middle
        "interpolation": interpolation_mask(T, S, S, first=1, last=ts * max(1, 4 // ts)),
        # a centre square hidden in every frame
        "inpainting": box_mask(T, S, S, (S // 4, 3 * S // 4, S // 4, 3 * S // 4)),
    }
    edit_vids = []
    for name, mask in tasks.items():
        # the edits are told the class only: the given frames carry the motion (the continuation is measured)
        edits[name], g = zero_shot(name, model, tok, Xe, Ye, conditions(Ye), mask, rec_te[:ne], args, clf, args.out)
        edit_vids.append(torch.stack([Xe[0], g[0]]))
    save_gif(torch.cat(edit_vids), os.path.join(args.out, "edits.gif"), nrow=2)

    # ---------------- optional Frechet distance in a user-supplied feature space
    fd = {"note": vm.FVD_NOTE}
    if args.feature_net:
        net = vm.load_feature_net(args.feature_net, args.feature_net_factory)
        fr = vm.video_features(net, Xte, args.feature_net_size)
        fg = vm.video_features(net, samples, args.feature_net_size)
        fd.update({"feature_net": args.feature_net, "frechet_distance_generated_vs_test": vm.frechet_distance(fr, fg)})
    timings["eval_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start

    metrics = {
        "config": {k: v for k, v in vars(args).items()},
        "tokenizer": {"config": asdict(cfg), "latent_shape": cfg.latent_shape, "schedule": sched.to_config(),
                      "num_scales": len(sched), "tokens": sched.L,
                      "params": sum(p.numel() for p in tok.parameters()),
                      "test_psnr_db": rec_psnr, "train_codebook_usage": usage, "reconstruction": tok_eval,
                      "final_train": tok_log[-1] if tok_log else None, "loaded_from": args.tokenizer},
        "transformer": {"params": model.num_parameters(), "final_train": ar_log[-1] if ar_log else None,
                        "validation": ar_val},
        "classifier": {"kind": "small CNN on digit-centred crops (shift/blur augmentation), trained on 1000 real "
                               "videos x all frames; strict_logistic_frame_accuracy: logistic regression on the crops",
                       "strict_logistic_frame_accuracy": strict_acc},
        "real_test": real,
        "reconstructed_test": recon,
        "generated": gen_metrics,
        "zero_shot": edits,
        "fvd": fd,
        "timings_s": timings,
        "torch_threads": args.threads,
    }
    # the record names the command that reproduces it (argv given: called from Python, e.g. a test)
    command = None if argv is None else shlex.join(["python", "-m", "examples.video_demo", *argv])
    write_result_json(os.path.join(args.out, "metrics.json"), metrics, t_start, command=command)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump({"tokenizer": tok_log, "transformer": ar_log}, f)
    msar.Pipeline(tok, model).save_pretrained(os.path.join(args.out, "pipeline"))
    print(json.dumps({"recon_psnr": rec_psnr, "reconstructed": recon,
                      "generated": {k: v for k, v in gen_metrics.items() if k != "per_class_frame_accuracy"},
                      "real": real, "zero_shot": {k: {kk: vv for kk, vv in v.items() if kk in
                                                      ("frame_accuracy_generated_frames", "known_tokens_preserved",
                                                       "psnr_unknown_region", "continuation")}
                                                  for k, v in edits.items()},
                      "total_s": timings["total_s"]}, indent=1, default=float))
    return metrics


if __name__ == "__main__":
    main()
