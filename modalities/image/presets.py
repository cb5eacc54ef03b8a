"""Presets of the released VAR models (and the small demo models).

Transformers follow VAR's recipe: width = 64 x depth, heads = depth, cosine
attention, drop-path 0.1 x depth / 24; d16-d30 generate 256 px images with
scales 1,2,3,4,5,6,8,10,13,16, d36 512 px with scales 1,2,3,4,6,9,13,18,24,32
and one AdaLN projection shared by all blocks.
"""
from __future__ import annotations

from msar import TransformerConfig

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)

VQVAE_PRESETS: dict[str, dict] = {
    "vae_ch160v4096z32": dict(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4, patch_nums=PATCH_NUMS_256),
    "vae_ch160v4096z32-512": dict(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4, patch_nums=PATCH_NUMS_512),
}

TRANSFORMER_PRESETS: dict[str, dict] = {
    "var-d16": dict(depth=16, patch_nums=PATCH_NUMS_256, shared_aln=False),
    "var-d20": dict(depth=20, patch_nums=PATCH_NUMS_256, shared_aln=False),
    "var-d24": dict(depth=24, patch_nums=PATCH_NUMS_256, shared_aln=False),
    "var-d30": dict(depth=30, patch_nums=PATCH_NUMS_256, shared_aln=False),
    "var-d36": dict(depth=36, patch_nums=PATCH_NUMS_512, shared_aln=True),
}

# released file name -> preset
RELEASED_FILES = {
    "vae_ch160v4096z32.pth": "vae_ch160v4096z32",
    "var_d16.pth": "var-d16", "var_d20.pth": "var-d20", "var_d24.pth": "var-d24",
    "var_d30.pth": "var-d30", "var_d36.pth": "var-d36",
}


def square_schedule(patch_nums) -> list[tuple[int, int]]:
    """VAR's ``patch_nums`` (side of each square scale) -> the schedule ``[(p, p), ...]``."""
    return [(int(p), int(p)) for p in patch_nums]


def transformer_config(preset: str, num_classes: int = 1000, vocab_size: int = 4096, latent_dim: int = 32,
                       **overrides) -> TransformerConfig:
    """The :class:`TransformerConfig` of a released VAR preset (``"var-d16"`` ... ``"var-d36"``)."""
    if preset not in TRANSFORMER_PRESETS:
        raise ValueError(f"unknown transformer preset {preset!r}; known: {sorted(TRANSFORMER_PRESETS)}")
    p = TRANSFORMER_PRESETS[preset]
    cfg = TransformerConfig.var(p["depth"], square_schedule(p["patch_nums"]), vocab_size=vocab_size,
                                latent_dim=latent_dim, num_classes=num_classes, shared_aln=p["shared_aln"])
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown TransformerConfig field {k!r}")
        setattr(cfg, k, v)
    return cfg
