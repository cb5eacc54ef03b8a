"""The converter between VAR's state dicts (the released ``.pth`` files) and msar's modules.

The released files are plain state dicts: ``vae_ch160v4096z32.pth`` for the
tokenizer and ``var_d{16,20,24,30,36}.pth`` for the transformers.  msar names
its parameters readably; VAR's names live only here, in two one-to-one maps:

    transformer                          tokenizer
    VAR              msar                VAR                           msar
    word_embed       input_proj          quantize.*                    quantizer.*
    class_emb        class_embed         quantize.ema_vocab_hit_SV     quantizer.usage_ema
    pos_start        start_pos           quantize.quant_resi.<i>       quantizer.phi.convs.<i>.conv
    pos_1LC          pos_embed           (absent)                      quantizer.usage_steps = 0
    lvl_embed        level_embed
    shared_ada_lin   shared_adaln_proj   (``quant_resi.qresi_ls.<i>`` / ``.qresi`` / ``.<i>`` for
    head_nm          head_norm            partially shared / shared / per-scale phi)
    mat_qkv          qkv
    scale_mul_1H11   attn_scale
    ada_lin          adaln_proj
    ada_gss          adaln_offset

VAR's buffers ``lvl_1L`` / ``attn_bias_for_masking`` are derived from the scale
schedule: msar rebuilds them (checking their shape names a schedule mismatch).
Loading is strict: an unknown, missing or mis-shaped key raises
:class:`CheckpointError` naming it (with its VAR name).  The loaders accept
VAR's layout and msar's own (the maps leave msar names unchanged).  Files are
read with ``torch.load(weights_only=True)`` (no pickled code runs) or with
safetensors.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from msar import NextScaleTransformer, TransformerConfig
from msar.training.checkpoint import describe_load_error

from .presets import TRANSFORMER_PRESETS, VQVAE_PRESETS, transformer_config
from .vqvae import VQVAE, VQVAEConfig


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


# VAR's name -> msar's, one dotted segment each (no msar segment is a VAR segment, so the
# map is one-to-one and leaves keys that are already msar's unchanged)
TRANSFORMER_VAR_TO_MSAR = {
    "word_embed": "input_proj", "class_emb": "class_embed", "pos_start": "start_pos", "pos_1LC": "pos_embed",
    "lvl_embed": "level_embed", "shared_ada_lin": "shared_adaln_proj", "head_nm": "head_norm",
    "mat_qkv": "qkv", "scale_mul_1H11": "attn_scale", "ada_lin": "adaln_proj", "ada_gss": "adaln_offset",
}
TRANSFORMER_MSAR_TO_VAR = {v: k for k, v in TRANSFORMER_VAR_TO_MSAR.items()}
# buffers of the reference that are derived from the schedule; checked for shape, not loaded
_DERIVED_BUFFERS = ("lvl_1L", "attn_bias_for_masking")

_VAR_PHI = [  # VAR's phi layouts: partially shared, shared, one per scale
    (re.compile(r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.(weight|bias)$"), r"quantizer.phi.convs.\1.conv.\2"),
    (re.compile(r"^quantize\.quant_resi\.qresi\.(weight|bias)$"), r"quantizer.phi.convs.0.conv.\1"),
    (re.compile(r"^quantize\.quant_resi\.(\d+)\.(weight|bias)$"), r"quantizer.phi.convs.\1.conv.\2"),
]
_MSAR_PHI = re.compile(r"^quantizer\.phi\.convs\.(\d+)\.conv\.(weight|bias)$")
_VQVAE_VAR_TO_MSAR = {"quantize.ema_vocab_hit_SV": "quantizer.usage_ema"}
_VQVAE_MSAR_TO_VAR = {v: k for k, v in _VQVAE_VAR_TO_MSAR.items()}


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


# ---------------------------------------------------------------------------- key maps
def transformer_key_from_var(key: str) -> str:
    """VAR's transformer key -> msar's (``blocks.3.ada_lin.1.weight -> blocks.3.adaln_proj.1.weight``)."""
    return ".".join(TRANSFORMER_VAR_TO_MSAR.get(part, part) for part in key.split("."))


def transformer_key_to_var(key: str) -> str:
    """msar's transformer key -> VAR's (the inverse of :func:`transformer_key_from_var`)."""
    return ".".join(TRANSFORMER_MSAR_TO_VAR.get(part, part) for part in key.split("."))


def vqvae_key_from_var(key: str) -> str:
    """VAR's tokenizer key -> msar's (``quantize.quant_resi.qresi_ls.2.weight -> quantizer.phi.convs.2.conv.weight``)."""
    for pat, repl in _VAR_PHI:
        if pat.match(key):
            return pat.sub(repl, key)
    if key in _VQVAE_VAR_TO_MSAR:
        return _VQVAE_VAR_TO_MSAR[key]
    if key.startswith("quantize."):
        return "quantizer." + key[len("quantize."):]
    return key


def vqvae_key_to_var(key: str, phi_share: int) -> str:
    """msar's tokenizer key -> VAR's; ``phi_share`` (the config's ``share_quant_resi``) picks
    VAR's phi layout: 0 = one per scale, 1 = shared, n > 1 = partially shared."""
    m = _MSAR_PHI.match(key)
    if m:
        i, what = m.groups()
        if phi_share == 1:
            return f"quantize.quant_resi.qresi.{what}"
        if phi_share == 0:
            return f"quantize.quant_resi.{i}.{what}"
        return f"quantize.quant_resi.qresi_ls.{i}.{what}"
    if key in _VQVAE_MSAR_TO_VAR:
        return _VQVAE_MSAR_TO_VAR[key]
    if key.startswith("quantizer."):
        return "quantize." + key[len("quantizer."):]
    return key


def _rename(sd: Mapping[str, torch.Tensor], fn) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new = fn(k)
        if new in out:
            raise CheckpointError(f"keys {k!r} and another one both map to {new!r}: the state dict mixes "
                                  f"VAR's and msar's names")
        out[new] = v
    return out


# ---------------------------------------------------------------------------- validation
def validate_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str,
                        source_names: Mapping[str, str] | None = None) -> None:
    """Raise :class:`CheckpointError` naming every unknown or missing key and the first mis-shaped one.

    ``source_names`` maps a key of ``sd`` to its name in the file (VAR's), shown next to it."""
    def name(k: str) -> str:
        src = (source_names or {}).get(k, k)
        return repr(k) if src == k else f"{k!r} (in the file: {src!r})"

    own = model.state_dict()
    unknown = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    if unknown or missing:
        msg = [f"{what}: state dict does not match the model"]
        if unknown:
            shown = [(source_names or {}).get(k, k) for k in unknown[:8]]
            msg.append(f"unknown keys ({len(unknown)}): {shown}{' ...' if len(unknown) > 8 else ''}")
        if missing:
            msg.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        raise CheckpointError("; ".join(msg))
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{what}: key {name(k)} has shape {tuple(v.shape)} in the checkpoint but the model "
                                  f"expects {tuple(own[k].shape)} (wrong preset or scale schedule?)")


def _load_strict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str,
                 source_names: Mapping[str, str] | None = None) -> None:
    validate_state_dict(model, sd, what, source_names)
    model.load_state_dict(dict(sd), strict=True)


# ---------------------------------------------------------------------------- tokenizer
def map_vqvae_state_dict(sd: Mapping[str, torch.Tensor], model: VQVAE) -> dict[str, torch.Tensor]:
    """VAR's (or msar's) tokenizer state dict -> msar's layout for ``model``.

    Renames the keys, fills ``quantizer.usage_steps`` (VAR keeps that count in a plain
    attribute that starts at 0 after loading; so does msar) and replaces a usage EMA
    recorded with another schedule (another row count -- statistics, not weights)."""
    mapped = _rename(sd, vqvae_key_from_var)
    q = model.quantizer
    mapped.setdefault("quantizer.usage_steps", torch.zeros_like(q.usage_steps, device=q.usage_steps.device))
    ema = mapped.get("quantizer.usage_ema")
    if ema is not None and ema.shape != q.usage_ema.shape:
        mapped["quantizer.usage_ema"] = q.usage_ema.clone()
    return mapped


def vqvae_to_var_state_dict(model: VQVAE) -> dict[str, torch.Tensor]:
    """msar tokenizer -> a state dict in VAR's layout (what VAR's ``VQVAE.load_state_dict`` takes);
    ``usage_steps`` has no VAR counterpart and is left out."""
    share = model.quantizer.phi.share
    return {vqvae_key_to_var(k, share): v for k, v in model.state_dict().items() if k != "quantizer.usage_steps"}


def vqvae_from_state_dict(sd: Mapping[str, torch.Tensor], cfg: VQVAEConfig) -> VQVAE:
    """Build a :class:`VQVAE` for ``cfg`` and load a VAR-layout (or msar-layout) state dict strictly."""
    model = VQVAE(cfg)
    _load_strict(model, map_vqvae_state_dict(sd, model), "VQVAE", {vqvae_key_from_var(k): k for k in sd})
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- transformer
def strip_derived_buffers(sd: Mapping[str, torch.Tensor], model: NextScaleTransformer) -> dict[str, torch.Tensor]:
    """Drop VAR's schedule-derived buffers (``lvl_1L``, ``attn_bias_for_masking``) after
    checking that they fit the model's schedule."""
    sd = dict(sd)
    L = model.seq_len
    for name in _DERIVED_BUFFERS:
        if name in sd:
            want = (1, L) if name == "lvl_1L" else (1, 1, L, L)
            if tuple(sd[name].shape) != want:
                raise CheckpointError(f"VAR: key {name!r} has shape {tuple(sd[name].shape)} but the scale schedule "
                                      f"{model.schedule} needs {want}: the checkpoint was trained with another schedule")
            del sd[name]
    return sd


def map_transformer_state_dict(sd: Mapping[str, torch.Tensor], model: NextScaleTransformer) -> dict[str, torch.Tensor]:
    """VAR's (or msar's) transformer state dict -> msar's layout for ``model`` (keys renamed,
    schedule-derived buffers checked and dropped)."""
    return _rename(strip_derived_buffers(sd, model), transformer_key_from_var)


def transformer_to_var_state_dict(model: NextScaleTransformer) -> dict[str, torch.Tensor]:
    """msar transformer -> a state dict in VAR's layout, with VAR's derived buffers
    ``lvl_1L (1, L)`` and ``attn_bias_for_masking (1, 1, L, L)`` rebuilt from the schedule."""
    sd = {transformer_key_to_var(k): v for k, v in model.state_dict().items()}
    s, device = model.schedule, model.pos_embed.device
    sd["lvl_1L"] = s.level_ids(device).view(1, s.L)
    sd["attn_bias_for_masking"] = s.attn_mask("additive", device=device).view(1, 1, s.L, s.L)
    return sd


def transformer_from_state_dict(sd: Mapping[str, torch.Tensor], cfg: TransformerConfig) -> NextScaleTransformer:
    """Build a :class:`NextScaleTransformer` for ``cfg`` and load a VAR-layout (or msar-layout)
    state dict strictly."""
    with torch.device("meta"):  # no time spent on an initialisation that the checkpoint overwrites
        model = NextScaleTransformer(cfg)
    model.to_empty(device="cpu")
    model.build_buffers("cpu")
    _load_strict(model, map_transformer_state_dict(sd, model), "VAR", {transformer_key_from_var(k): k for k in sd})
    return model.eval()


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
