"""Convert files of earlier msar versions to the ``save_pretrained`` format::

    python -m modalities.convert OLD NEW [--vae PATH]

``OLD`` is one of the formats msar wrote before every component saved the same way:

==================================================  ===========================================
``OLD``                                             ``NEW`` (load with ``msar.from_pretrained``)
==================================================  ===========================================
image pipeline folder (``pipeline.json`` +          :class:`~modalities.image.pipeline.ImagePipeline`
``vqvae.safetensors`` + ``transformer.safetensors``)
ImageNet training output (``var.json`` +            ``ImagePipeline`` (the VQ-VAE from
``var.safetensors``)                                ``vqvae.safetensors`` beside it or ``--vae``),
                                                    else the transformer alone
``train_vqvae`` output (``vqvae.json`` +             :class:`~modalities.image.vqvae.VQVAE`
``vqvae.safetensors``)
video tokenizer file (``X.safetensors`` +           :class:`~modalities.video.tokenizer.VideoTokenizer`
``X.safetensors.json``)
video demo output (``tokenizer.safetensors`` +      :class:`msar.Pipeline`
``transformer.pt``)
graph demo output of one dataset (``tokenizer.json``  :class:`msar.Pipeline`; ``NEW = OLD/pipeline``
+ ``model.safetensors`` + ``metrics.json``)         lets ``graph_demo --load`` read the run again
==================================================  ===========================================

State-dict keys are renamed to today's names (``quantize.*`` -> ``quantizer.*``, the
codebook usage EMA, the transformer's readable names) and every key is checked against the
model built from the old config.  ``transformer.pt`` is read with
``torch.load(weights_only=True)``: no pickled code runs.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

import msar
from msar import NextScaleTransformer, TransformerConfig
from msar.pretrained import PretrainedError, check_state_dict


def _json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path}: cannot read as JSON: {e}") from e


def _weights(path: str) -> dict[str, torch.Tensor]:
    from .image.checkpoint import read_state_dict

    return read_state_dict(path)


def tokenizer_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An earlier tokenizer state dict under today's names (``quantize.* -> quantizer.*``,
    ``ema_vocab_hit_SV -> usage_ema``, ``usage_steps`` 0 where it was not saved)."""
    from .image.checkpoint import vqvae_key_from_var

    out = {vqvae_key_from_var(k): v for k, v in sd.items()}
    if "quantizer.usage_ema" in out:
        out.setdefault("quantizer.usage_steps", torch.zeros((), dtype=torch.long))
    return out


def transformer_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An earlier transformer state dict under today's names (``pos_1LC -> pos_embed`` ...)."""
    from .image.checkpoint import transformer_key_from_var

    return {transformer_key_from_var(k): v for k, v in sd.items()}


def _filled(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    check_state_dict(model, sd, what)
    model.load_state_dict(sd)
    return model.eval()


def _transformer(config: Mapping[str, Any], sd: Mapping[str, torch.Tensor], what: str) -> NextScaleTransformer:
    cfg = dict(config)
    cfg["schedule"] = [tuple(s) if isinstance(s, list) else s for s in cfg["schedule"]]
    # an earlier config may lack today's fields (their defaults apply) but not hold unknown ones
    model = NextScaleTransformer(TransformerConfig(**cfg))
    return _filled(model, transformer_state_dict(sd), what)


# ---------------------------------------------------------------------------- the formats
def convert_image_pipeline(old: str):
    from .image.pipeline import ImagePipeline
    from .image.vqvae import VQVAE, VQVAEConfig

    meta = _json(os.path.join(old, "pipeline.json"))
    vq = _filled(VQVAE(VQVAEConfig(**meta["vqvae"])), tokenizer_state_dict(_weights(os.path.join(old, "vqvae.safetensors"))),
                 f"{old}/vqvae.safetensors")
    tr = _transformer(meta["transformer"], _weights(os.path.join(old, "transformer.safetensors")),
                      f"{old}/transformer.safetensors")
    return ImagePipeline(vq, tr)


def convert_imagenet_run(old: str, vae: str | None):
    from .image.pipeline import ImagePipeline
    from .image.vqvae import VQVAE, VQVAEConfig

    meta = _json(os.path.join(old, "var.json"))
    if not meta.get("transformer"):
        raise PretrainedError(f"{old}/var.json records no transformer config (a run under FSDP?): convert "
                              "var.safetensors with `--preset` through modalities.image.checkpoint.load_var")
    tr = _transformer(meta["transformer"], _weights(os.path.join(old, "var.safetensors")), f"{old}/var.safetensors")
    vae = vae or (os.path.join(old, "vqvae.safetensors") if os.path.isfile(os.path.join(old, "vqvae.safetensors"))
                  else None)
    if vae is None:
        print(f"{old}: no VQ-VAE weights (vqvae.safetensors or --vae): saving the transformer alone")
        return tr
    vq = _filled(VQVAE(VQVAEConfig(**meta["vqvae"])), tokenizer_state_dict(_weights(vae)), vae)
    return ImagePipeline(vq, tr)


def convert_vqvae(old: str):
    from .image.vqvae import VQVAE, VQVAEConfig

    path = os.path.join(old, "vqvae.safetensors")
    return _filled(VQVAE(VQVAEConfig(**_json(os.path.join(old, "vqvae.json")))), tokenizer_state_dict(_weights(path)),
                   path)


def convert_video_tokenizer(path: str):
    from .video.tokenizer import VideoTokenizer, VideoTokenizerConfig

    tok = VideoTokenizer(VideoTokenizerConfig(**_json(path + ".json")))
    return _filled(tok, tokenizer_state_dict(_weights(path)), path)


def convert_video_run(old: str):
    tok = convert_video_tokenizer(os.path.join(old, "tokenizer.safetensors"))
    path = os.path.join(old, "transformer.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PretrainedError(f"{path}: cannot read as a weights-only checkpoint: {e}") from e
    config = dict(ckpt["config"])
    config["schedule"] = tok.schedule  # the tokenizer's schedule, with its type
    model = NextScaleTransformer(TransformerConfig(**config))
    return msar.Pipeline(tok, _filled(model, transformer_state_dict(ckpt["state_dict"]), path))


def convert_graph_run(old: str):
    from .graph import GraphPyramidTokenizer

    tok = GraphPyramidTokenizer(**_json(os.path.join(old, "tokenizer.json")))
    train = _json(os.path.join(old, "metrics.json"))["train_config"]
    model = NextScaleTransformer(TransformerConfig(
        schedule=tok.schedule, vocab_size=tok.vocab_size, latent_dim=tok.latent_dim, num_classes=0,
        depth=train["depth"], embed_dim=train["width"], num_heads=train["heads"], cond_drop_rate=0.0))
    path = os.path.join(old, "model.safetensors")
    return msar.Pipeline(tok, _filled(model, transformer_state_dict(_weights(path)), path))


def convert(old: str, new: str, vae: str | None = None) -> Any:
    """Read ``old`` (see the module docstring), write ``new`` with ``save_pretrained``; returns
    the converted object."""
    old, new = os.fspath(old), os.fspath(new)
    has = (lambda name: os.path.isfile(os.path.join(old, name))) if os.path.isdir(old) else (lambda name: False)
    if os.path.isfile(old) and os.path.isfile(old + ".json"):
        obj = convert_video_tokenizer(old)
    elif has("config.json"):
        raise PretrainedError(f"{old} already holds config.json: it is in the save_pretrained format")
    elif has("pipeline.json"):
        obj = convert_image_pipeline(old)
    elif has("var.json"):
        obj = convert_imagenet_run(old, vae)
    elif has("vqvae.json"):
        obj = convert_vqvae(old)
    elif has("tokenizer.safetensors") and has("transformer.pt"):
        obj = convert_video_run(old)
    elif has("tokenizer.safetensors"):
        obj = convert_video_tokenizer(os.path.join(old, "tokenizer.safetensors"))
    elif has("tokenizer.json"):
        obj = convert_graph_run(old)
    else:
        raise PretrainedError(f"{old}: not a format this converter knows (see python -m modalities.convert --help)")
    obj.save_pretrained(new)
    return obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modalities.convert", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("old", help="an earlier folder or file")
    ap.add_argument("new", help="the folder to write (save_pretrained)")
    ap.add_argument("--vae", help="VQ-VAE weights for an ImageNet output without vqvae.safetensors")
    a = ap.parse_args(argv)
    obj = convert(a.old, a.new, a.vae)
    print(f"wrote {a.new}: {type(obj).__name__} (load with msar.from_pretrained)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
