"""VAR's published ImageNet training recipes (arXiv 2404.02905, the reference README) as presets.

Every preset trains with AdamW (betas 0.9 / 0.95), peak lr = ``base_lr x global_batch / 256``
(base 1e-4, 8e-5 from d24 on), a linear warm-up over ``epochs / 50`` epochs from
``0.005 x`` the peak, VAR's ``lin0`` decay to ``final_lr_ratio x`` the peak (the
reference's ``--wpe``), weight decay 0.05 (cosine to ``wd_end``, the reference's
``--twde``; no decay on biases, norms and embeddings), gradient clipping at 2.0,
class dropout 0.1 for classifier-free guidance, and the AdaLN initialisation
``init_adaln=0.5``, gates ``init_adaln_gamma`` (the reference's ``--alng``, which the
README sets per depth), head ``0.02``, other weights ``std = sqrt(1 / 3C)``.

=======  =====  =====  ======  =======  =====  =====  =====  ====
preset   px     batch  epochs  base lr  alng   wpe    twde   amp
=======  =====  =====  ======  =======  =====  =====  =====  ====
var-d16  256    768    200     1e-4     1e-3   0.1    0.05   fp16
var-d20  256    768    250     1e-4     1e-3   0.1    0.05   fp16
var-d24  256    768    350     8e-5     1e-4   0.01   0.05   fp16
var-d30  256    1024   350     8e-5     1e-5   0.01   0.08   fp16
var-d36  512    768    350     8e-5     5e-6   0.01   0.08   fp16
=======  =====  =====  ======  =======  =====  =====  =====  ====

``tiny`` is a CPU-sized preset (16 px, three scales, a 2-block width-32 model) for tests
and smoke runs; it is not a recipe.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from msar import TransformerConfig

from ..presets import VQVAE_PRESETS, square_schedule, transformer_config
from ..vqvae import VQVAEConfig


@dataclass(frozen=True)
class Recipe:
    """One training recipe: the transformer preset, the tokenizer it expects and the optimisation."""

    name: str
    image_size: int
    global_batch: int
    epochs: int
    base_lr: float = 1e-4                # peak lr = base_lr * global_batch / 256
    warmup_epochs_frac: float = 1 / 50   # warm-up over epochs / 50 epochs
    warmup_start: float = 0.005          # from 0.005 x peak
    lr_schedule: str = "lin0"
    final_lr_ratio: float = 0.1          # the reference's --wpe
    weight_decay: float = 0.05
    weight_decay_end: float = 0.05       # the reference's --twde (cosine from weight_decay)
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 2.0
    cond_drop_rate: float = 0.1
    label_smoothing: float = 0.0
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5       # the reference's --alng
    init_head: float = 0.02
    init_std: float = -1.0               # -1: sqrt(1 / 3C)
    amp: str = "fp16"                    # the reference trains with --fp16=1 (fp16 + loss scaling)
    fsdp: bool = False                   # shard parameters/gradients/optimizer state per block
    vqvae_preset: str | None = "vae_ch160v4096z32"
    # progressive training (off in the published runs): the reference's --pg, --pg0, --pgwp
    progressive: float = 0.0
    progressive_start_scale: int = 4
    progressive_warmup_epochs_frac: float = 1 / 300
    # only for presets that are not released VAR models (tiny): explicit architectures
    transformer_overrides: dict = field(default_factory=dict)
    vqvae_config: dict | None = None

    def peak_lr(self, global_batch: int | None = None) -> float:
        return self.base_lr * (global_batch or self.global_batch) / 256

    def vqvae(self) -> VQVAEConfig:
        if self.vqvae_config is not None:
            return VQVAEConfig(**self.vqvae_config)
        return VQVAEConfig(**VQVAE_PRESETS[self.vqvae_preset])

    def transformer(self, num_classes: int = 1000) -> TransformerConfig:
        """The transformer config; its schedule / vocabulary / width come from :meth:`vqvae`."""
        v = self.vqvae()
        if self.name in _RELEASED:
            cfg = transformer_config(self.name, num_classes=num_classes, vocab_size=v.vocab_size,
                                     latent_dim=v.z_channels)
        else:
            cfg = TransformerConfig(schedule=square_schedule(v.patch_nums), vocab_size=v.vocab_size,
                                    latent_dim=v.z_channels, num_classes=num_classes, **self.transformer_overrides)
        cfg.cond_drop_rate = self.cond_drop_rate
        cfg.init_adaln, cfg.init_adaln_gamma = self.init_adaln, self.init_adaln_gamma
        cfg.init_head, cfg.init_std = self.init_head, self.init_std
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


_RELEASED = ("var-d16", "var-d20", "var-d24", "var-d30", "var-d36")

RECIPES: dict[str, Recipe] = {
    "var-d16": Recipe("var-d16", 256, 768, 200, base_lr=1e-4, init_adaln_gamma=1e-3, final_lr_ratio=0.1),
    "var-d20": Recipe("var-d20", 256, 768, 250, base_lr=1e-4, init_adaln_gamma=1e-3, final_lr_ratio=0.1),
    "var-d24": Recipe("var-d24", 256, 768, 350, base_lr=8e-5, init_adaln_gamma=1e-4, final_lr_ratio=0.01),
    "var-d30": Recipe("var-d30", 256, 1024, 350, base_lr=8e-5, init_adaln_gamma=1e-5, final_lr_ratio=0.01,
                      weight_decay_end=0.08, fsdp=True),
    "var-d36": Recipe("var-d36", 512, 768, 350, base_lr=8e-5, init_adaln_gamma=5e-6, final_lr_ratio=0.01,
                      weight_decay_end=0.08, fsdp=True, vqvae_preset="vae_ch160v4096z32-512"),
    "tiny": Recipe("tiny", 16, 8, 1, base_lr=1e-3 * 256 / 8, amp="none", init_adaln_gamma=1e-3, vqvae_preset=None,
                   transformer_overrides=dict(depth=2, embed_dim=32, num_heads=2, drop_path_rate=0.0),
                   vqvae_config=dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1,
                                     patch_nums=(1, 2, 4), using_sa=False, using_mid_sa=False)),
}


def get_recipe(name: str, **overrides) -> Recipe:
    """The recipe ``name`` with fields replaced by ``overrides`` (e.g. ``epochs=1``)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    bad = [k for k in overrides if k not in Recipe.__dataclass_fields__]
    if bad:
        raise ValueError(f"unknown recipe fields {bad}; known: {sorted(Recipe.__dataclass_fields__)}")
    return replace(RECIPES[name], **overrides)


def progressive_stage(step: int, total_steps: int, warmup_steps: int, recipe: Recipe, num_scales: int) -> int:
    """Index of the last scale trained at ``step`` under progressive training (VAR's ``prog_si``).

    Until the end of warm-up only scales ``0..progressive_start_scale`` are trained; the
    number grows linearly until ``progressive x total_steps`` and is then all scales.
    ``recipe.progressive == 0`` (the published runs) always returns the last scale.
    """
    last = num_scales - 1
    if recipe.progressive <= 0:
        return last
    start = min(recipe.progressive_start_scale, last)
    end_step = recipe.progressive * total_steps
    if step <= warmup_steps:
        return start
    if step >= end_step:
        return last
    frac = min(max((step - warmup_steps) / max(1e-9, end_step - warmup_steps), 0.0), 1.0)
    return start + round(frac * (last - start))
