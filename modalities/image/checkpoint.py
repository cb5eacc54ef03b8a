"""Loading VAR state dicts (the released ``.pth`` files or any dict of the same layout).

The released files are plain state dicts: ``vae_ch160v4096z32.pth`` for the
tokenizer and ``var_d{16,20,24,30,36}.pth`` for the transformers.  Our module
names follow the reference, except the phi convolutions (``quant_resi``) which
live in the core's :class:`msar.PhiBank`, and the buffers ``lvl_1L`` /
``attn_bias_for_masking`` which we rebuild from the schedule.  Loading is
strict: an unknown, missing or mis-shaped key raises :class:`CheckpointError`
naming it.  Files are read with ``torch.load(weights_only=True)`` (no pickled
code runs) or with safetensors.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import torch

from msar import NextScaleTransformer, TransformerConfig
from msar.training.checkpoint import describe_load_error

from .presets import TRANSFORMER_PRESETS, VQVAE_PRESETS, transformer_config
from .vqvae import VQVAE, VQVAEConfig


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


_PHI_PATTERNS = [
    (re.compile(r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.(weight|bias)$"), r"quantize.phi.convs.\1.conv.\2"),
    (re.compile(r"^quantize\.quant_resi\.qresi\.(weight|bias)$"), r"quantize.phi.convs.0.conv.\1"),
    (re.compile(r"^quantize\.quant_resi\.(\d+)\.(weight|bias)$"), r"quantize.phi.convs.\1.conv.\2"),
]
# buffers of the reference that are derived from the schedule; checked for shape, not loaded
_DERIVED_BUFFERS = ("lvl_1L", "attn_bias_for_masking")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt`` (weights only, no pickled code) or ``.safetensors`` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # SafetensorError: truncated or not a safetensors file
            raise CheckpointError(f"could not read {path} as safetensors (truncated or corrupt?): {e}") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle with code, ...
        raise CheckpointError(f"could not read {path} as a weights-only torch checkpoint: "
                              f"{describe_load_error(e)}") from e
    for key in ("state_dict", "model", "trainer"):  # tolerate a wrapped dict
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict) and not isinstance(sd[key], torch.Tensor):
            inner = sd[key]
            if any(isinstance(v, torch.Tensor) for v in inner.values()):
                sd = inner
                break
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    odd = next((k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise CheckpointError(f"{path}: expected a state dict of named tensors, but entry {odd!r} holds "
                              f"{type(sd[odd]).__name__}")
    return sd


def vae_key_to_msar(key: str) -> str:
    for pat, repl in _PHI_PATTERNS:
        if pat.match(key):
            return pat.sub(repl, key)
    return key


def validate_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` naming every unknown or missing key and the first mis-shaped one."""
    own = model.state_dict()
    unknown = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    if unknown or missing:
        msg = [f"{what}: state dict does not match the model"]
        if unknown:
            msg.append(f"unknown keys ({len(unknown)}): {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        if missing:
            msg.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        raise CheckpointError("; ".join(msg))
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{what}: key {k!r} has shape {tuple(v.shape)} in the checkpoint but the model "
                                  f"expects {tuple(own[k].shape)} (wrong preset or scale schedule?)")


def _load_strict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    validate_state_dict(model, sd, what)
    model.load_state_dict(dict(sd), strict=True)


def vqvae_from_state_dict(sd: Mapping[str, torch.Tensor], cfg: VQVAEConfig) -> VQVAE:
    """Build a :class:`VQVAE` for ``cfg`` and load a reference-layout state dict strictly."""
    model = VQVAE(cfg)
    _load_strict(model, map_vqvae_state_dict(sd, model), "VQVAE")
    return model.eval().requires_grad_(False)


def map_vqvae_state_dict(sd: Mapping[str, torch.Tensor], model: VQVAE) -> dict[str, torch.Tensor]:
    """Reference VQVAE layout -> msar layout (phi names; usage buffer of another schedule replaced)."""
    mapped = {vae_key_to_msar(k): v for k, v in sd.items()}
    # the reference keeps a usage buffer per scale; a checkpoint trained with another schedule
    # has another row count (the reference replaces it too) -- usage statistics only, not weights
    ema = mapped.get("quantize.ema_vocab_hit_SV")
    if ema is not None and ema.shape != model.quantize.ema_vocab_hit_SV.shape:
        mapped["quantize.ema_vocab_hit_SV"] = model.quantize.ema_vocab_hit_SV.clone()
    return mapped


def transformer_from_state_dict(sd: Mapping[str, torch.Tensor], cfg: TransformerConfig) -> NextScaleTransformer:
    """Build a :class:`NextScaleTransformer` for ``cfg`` and load a reference-layout state dict strictly."""
    model = NextScaleTransformer(cfg)
    _load_strict(model, strip_derived_buffers(sd, model), "VAR")
    return model.eval()


def strip_derived_buffers(sd: Mapping[str, torch.Tensor], model: NextScaleTransformer) -> dict[str, torch.Tensor]:
    """Drop the reference's schedule-derived buffers after checking they fit the model's schedule."""
    sd = dict(sd)
    L = model.L
    for name in _DERIVED_BUFFERS:
        if name in sd:
            want = (1, L) if name == "lvl_1L" else (1, 1, L, L)
            if tuple(sd[name].shape) != want:
                raise CheckpointError(f"VAR: key {name!r} has shape {tuple(sd[name].shape)} but the scale schedule "
                                      f"{model.schedule} needs {want}: the checkpoint was trained with another schedule")
            del sd[name]
    return sd


def load_vqvae(path: str | os.PathLike, preset: str = "vae_ch160v4096z32", **overrides) -> VQVAE:
    """Load the released tokenizer (or one of the same layout) from a file path."""
    if preset not in VQVAE_PRESETS:
        raise CheckpointError(f"unknown VQVAE preset {preset!r}; known: {sorted(VQVAE_PRESETS)}")
    cfg = VQVAEConfig(**{**VQVAE_PRESETS[preset], **overrides})
    return vqvae_from_state_dict(read_state_dict(path), cfg)


def load_var(path: str | os.PathLike, preset: str | None = None, **overrides) -> NextScaleTransformer:
    """Load a released VAR transformer (``var_d16.pth`` ...) from a file path.

    The preset is read from the file name (``var_d16.pth -> var-d16``) unless given.
    """
    if preset is None:
        m = re.search(r"d(\d+)", os.path.basename(os.fspath(path)))
        preset = f"var-d{m.group(1)}" if m else None
    if preset not in TRANSFORMER_PRESETS:
        raise CheckpointError(f"cannot tell the preset of {path}; pass preset= one of {sorted(TRANSFORMER_PRESETS)}")
    return transformer_from_state_dict(read_state_dict(path), transformer_config(preset, **overrides))
