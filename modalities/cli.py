"""The ``msar`` command line: ``msar demo | sample | edit | parity | train-vqvae``.

Lives beside the adapters (not in ``msar/``) because its commands are modality pipelines.
"""
from __future__ import annotations

import argparse
import sys


def _sample(argv: list[str]) -> int:
    import os

    import numpy as np
    import torch

    from modalities.image.data import save_grid, to_uint8
    from modalities.image.pipeline import ImagePipeline

    ap = argparse.ArgumentParser(prog="msar sample", description="class-conditional samples from a saved image pipeline")
    ap.add_argument("--model", required=True, help="pipeline directory (e.g. outputs/demo/pipeline)")
    ap.add_argument("--labels", help="comma-separated class labels (default: random)")
    ap.add_argument("-n", "--num", type=int, default=16, help="number of images when --labels is not given")
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--top-k", type=int, default=900)
    ap.add_argument("--top-p", type=float, default=0.96)
    ap.add_argument("--more-smooth", action="store_true", help="VAR's Gumbel smoothing (visual quality only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="outputs/samples")
    args = ap.parse_args(argv)
    pipe = ImagePipeline.from_pretrained(args.model, "cuda" if torch.cuda.is_available() else "cpu")
    if args.labels:
        try:
            labels = [int(x) for x in args.labels.split(",")]
        except ValueError:
            ap.error(f"--labels must be comma-separated integers, got {args.labels!r}")
    else:
        g = torch.Generator().manual_seed(args.seed)
        labels = torch.randint(0, pipe.transformer.num_classes, (args.num,), generator=g).tolist()
    os.makedirs(args.out, exist_ok=True)
    imgs = []
    for i in range(0, len(labels), args.batch_size):
        imgs.append(pipe.sample(labels[i:i + args.batch_size], cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                more_smooth=args.more_smooth, seed=args.seed + i).cpu())
    imgs = torch.cat(imgs)
    arr = to_uint8(imgs)
    from PIL import Image
    for i, (a, y) in enumerate(zip(arr, labels)):
        Image.fromarray(a).save(os.path.join(args.out, f"{i:06d}_class{y}.png"))
    np.savez(os.path.join(args.out, "samples.npz"), arr_0=arr, labels=np.asarray(labels))
    save_grid(imgs, os.path.join(args.out, "grid.png"), nrow=min(16, len(labels)), scale=max(1, 128 // imgs.shape[-1]))
    print(f"wrote {len(labels)} PNGs, samples.npz (uint8 NHWC, key arr_0) and grid.png to {args.out}")
    return 0


def _edit(argv: list[str]) -> int:
    import os

    import torch

    from modalities.image.data import load_image, save_grid
    from modalities.image.pipeline import ImagePipeline

    ap = argparse.ArgumentParser(prog="msar edit", description="zero-shot inpainting / outpainting / class-conditional editing")
    ap.add_argument("--model", required=True, help="pipeline directory")
    ap.add_argument("--image", required=True, help="input image (any PIL format)")
    ap.add_argument("--box", required=True, help="region to regenerate as x0,y0,x1,y1 in [0,1] image fractions")
    ap.add_argument("--outpaint", action="store_true", help="regenerate everything outside the box instead")
    ap.add_argument("--label", type=int, required=True, help="class to condition on")
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--top-k", type=int, default=900)
    ap.add_argument("--top-p", type=float, default=0.96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-n", "--num", type=int, default=4, help="number of edits")
    ap.add_argument("--out", default="outputs/edit")
    args = ap.parse_args(argv)
    pipe = ImagePipeline.from_pretrained(args.model)
    c = pipe.vqvae.cfg
    img = load_image(args.image, c.image_size, c.in_channels).unsqueeze(0).expand(args.num, -1, -1, -1)
    try:
        x0, y0, x1, y1 = (float(v) for v in args.box.split(","))
    except ValueError:
        ap.error(f"--box must be four comma-separated fractions x0,y0,x1,y1, got {args.box!r}")
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        ap.error(f"--box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {args.box}")
    S = c.image_size
    mask = torch.zeros(args.num, 1, S, S, dtype=torch.bool)
    mask[..., round(y0 * S):round(y1 * S), round(x0 * S):round(x1 * S)] = True
    if args.outpaint:
        mask = ~mask
    out = pipe.edit(img, mask, args.label, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    save_grid(torch.cat([img[:1], out]), os.path.join(args.out, "edit.png"), nrow=args.num + 1, scale=max(1, 128 // S))
    print(f"wrote {os.path.join(args.out, 'edit.png')} (input, then {args.num} edits)")
    return 0


COMMANDS = {
    "demo": ("VAR on the bundled digits: train tokenizer + transformer, sample, evaluate", "modalities.image.demo"),
    "parity": ("check parity with the reference VAR on a fixture", "modalities.image.parity"),
    "train-vqvae": ("train a multi-scale VQ-VAE on an image folder or the digits", "modalities.image.train_vqvae"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: msar {demo,sample,edit,parity,train-vqvae} [options]\n\n" + "\n".join(
        [f"  {k:12s} {v[0]}" for k, v in COMMANDS.items()]
        + ["  sample       class-conditional samples (PNGs + .npz) from a saved pipeline",
           "  edit         zero-shot inpainting / outpainting / class editing of an image"])
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    cmd, rest = argv[0], argv[1:]
    runners = {"sample": _sample, "edit": _edit}
    if cmd in COMMANDS:
        import importlib
        runners[cmd] = importlib.import_module(COMMANDS[cmd][1]).main
    if cmd not in runners:
        print(f"msar: unknown command {cmd!r}\n\n{usage}", file=sys.stderr)
        return 2
    try:
        return runners[cmd](rest)
    except (ValueError, TypeError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"msar {cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
