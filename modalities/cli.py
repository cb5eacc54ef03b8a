"""The ``msar`` command line: ``msar demo | sample | edit | parity | train-vqvae | text2image | text2shape``.

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

    ap = argparse.ArgumentParser(prog="msar sample", description="class-conditional samples from a saved image pipeline",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="pipeline directory (e.g. outputs/demo/pipeline)")
    ap.add_argument("--labels", help="comma-separated class labels (default: random)")
    ap.add_argument("-n", "--num", type=int, default=16, help="number of images when --labels is not given")
    _sampling_options(ap)
    ap.add_argument("--more-smooth", action="store_true", help="VAR's Gumbel smoothing (visual quality only)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    ap.add_argument("--out", default="outputs/samples", help="output folder")
    args = ap.parse_args(argv)
    _check_sampling_options(ap, args)
    if args.num < 1:
        ap.error(f"-n/--num must be >= 1, got {args.num}")
    if args.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
    labels = _parse_labels(ap, args.labels) if args.labels else None
    pipe = ImagePipeline.from_pretrained(args.model, "cuda" if torch.cuda.is_available() else "cpu")
    if labels is not None:
        _check_labels(ap, labels, pipe.transformer.num_classes)
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

    ap = argparse.ArgumentParser(prog="msar edit", description="zero-shot inpainting / outpainting / class-conditional editing",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="pipeline directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="input image (any PIL format; the digits demo writes a few to OUT/digits/)")
    src.add_argument("--index", type=int, help="input: digit number INDEX of the digits demo's test split")
    ap.add_argument("--box", required=True, help="region to regenerate as x0,y0,x1,y1 in [0,1] image fractions")
    ap.add_argument("--outpaint", action="store_true", help="regenerate everything outside the box instead")
    ap.add_argument("--label", type=int, required=True, help="class to condition on")
    _sampling_options(ap, cfg=6.0)
    ap.add_argument("--threshold", type=float, default=1.0,
                    help="a token is kept when at least this fraction of its area lies outside the box")
    ap.add_argument("--keep-from-scale", type=int, default=2,
                    help="keep tokens of this scale and finer only; the coarser scales are regenerated (they decide "
                         "the class); 0 keeps every scale")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("-n", "--num", type=int, default=4, help="number of edits")
    ap.add_argument("--out", default="outputs/edit", help="output folder")
    args = ap.parse_args(argv)
    _check_sampling_options(ap, args)
    if args.num < 1:
        ap.error(f"-n/--num must be >= 1, got {args.num}")
    if not 0 <= args.threshold <= 1:
        ap.error(f"--threshold must be in [0, 1], got {args.threshold}")
    try:
        x0, y0, x1, y1 = (float(v) for v in args.box.split(","))
    except ValueError:
        ap.error(f"--box must be four comma-separated fractions x0,y0,x1,y1, got {args.box!r}")
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        ap.error(f"--box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {args.box}")
    pipe = ImagePipeline.from_pretrained(args.model)
    _check_labels(ap, [args.label], pipe.transformer.num_classes, "--label")
    c = pipe.vqvae.cfg
    if args.image is not None:
        img = load_image(args.image, c.image_size, c.in_channels)
    else:
        from modalities.image.data import digits_splits
        test = digits_splits(c.image_size)[2]
        if not 0 <= args.index < len(test.labels):
            ap.error(f"--index must be in [0, {len(test.labels)}) (the digits demo's test split), got {args.index}")
        img = test.images[args.index]
    img = img.unsqueeze(0).expand(args.num, -1, -1, -1)
    S = c.image_size
    mask = torch.zeros(args.num, 1, S, S, dtype=torch.bool)
    mask[..., round(y0 * S):round(y1 * S), round(x0 * S):round(x1 * S)] = True
    if args.outpaint:
        mask = ~mask
    out = pipe.edit(img, mask, args.label, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    threshold=args.threshold, keep_from_scale=args.keep_from_scale)
    os.makedirs(args.out, exist_ok=True)
    save_grid(torch.cat([img[:1], out]), os.path.join(args.out, "edit.png"), nrow=args.num + 1, scale=max(1, 128 // S))
    print(f"wrote {os.path.join(args.out, 'edit.png')} (input, then {args.num} edits)")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in its help, except where there is none (None, or an off flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _sampling_options(ap: argparse.ArgumentParser, cfg: float = 3.0) -> None:
    # the digits demo's settings (the demo's pipeline is what these commands are first used with)
    ap.add_argument("--cfg", type=float, default=cfg, help="classifier-free guidance strength (>= 0; 0 = off)")
    ap.add_argument("--top-k", type=int, default=20, help="sample among the k most likely tokens (0 = all)")
    ap.add_argument("--top-p", type=float, default=0.9, help="nucleus: the smallest set holding this mass (0 = off)")


def _check_sampling_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 <= args.cfg < float("inf"):  # (False for NaN too)
        ap.error(f"--cfg must be a finite number >= 0 (0 = no guidance), got {args.cfg}")
    if args.top_k < 0:
        ap.error(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 <= args.top_p <= 1:
        ap.error(f"--top-p must be in [0, 1] (0 = off), got {args.top_p}")


def _parse_labels(ap: argparse.ArgumentParser, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        ap.error(f"--labels must be comma-separated integers, got {text!r}")


def _check_labels(ap: argparse.ArgumentParser, labels: list[int], num_classes: int, flag: str = "--labels") -> None:
    """Labels must name a real class: ``num_classes`` itself is the null (unconditional) class."""
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        null = f" ({num_classes} is the model's null class, not a label)" if num_classes in bad else ""
        ap.error(f"{flag}: the model has classes 0..{num_classes - 1}, got {bad[0]}{null}")


COMMANDS = {
    "demo": ("VAR on the bundled digits: train tokenizer + transformer, sample, evaluate", "modalities.image.demo"),
    "parity": ("check parity with the reference VAR on a fixture", "modalities.image.parity"),
    "train-vqvae": ("train a multi-scale VQ-VAE on an image folder or the digits", "modalities.image.train_vqvae"),
    "text2image": ("text-to-image on captioned shapes: train, sample per caption, score attributes",
                   "modalities.image.text2image"),
    "text2shape": ("text-to-shape on captioned voxel shapes: train, sample per caption, check geometry",
                   "modalities.voxel.text2shape"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: msar [-h] [--version] {demo,sample,edit,parity,train-vqvae,text2image,text2shape} [options]\n\n"
             + "\n".join(
        [f"  {k:12s} {v[0]}" for k, v in COMMANDS.items()]
        + ["  sample       class-conditional samples (PNGs + .npz) from a saved pipeline",
           "  edit         zero-shot inpainting / outpainting / class editing of an image"]
        + ["", "msar COMMAND --help lists the options of COMMAND with their defaults."]))
    if not argv:  # a command is required
        print(usage, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] in ("-V", "--version"):
        from msar import __version__
        print(f"msar {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    runners = {"sample": _sample, "edit": _edit}
    try:
        if cmd in COMMANDS:
            import importlib
            runners[cmd] = importlib.import_module(COMMANDS[cmd][1]).main
        if cmd not in runners:
            print(f"msar: unknown command {cmd!r}\n\n{usage}", file=sys.stderr)
            return 2
        return runners[cmd](rest)
    except ModuleNotFoundError as e:  # the image commands need the [image] extra
        print(f"msar {cmd}: error: {e}; the image commands need the image extra: pip install -e \".[image]\"",
              file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"msar {cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
