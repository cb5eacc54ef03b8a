"""Image modality: VAR's multi-scale VQ-VAE and transformer presets, released-checkpoint loading,
the digits demo, sampling and zero-shot editing."""
from .vqvae import VQVAE, VQVAEConfig
from .presets import PATCH_NUMS_256, PATCH_NUMS_512, TRANSFORMER_PRESETS, VQVAE_PRESETS, transformer_config
from .checkpoint import (CheckpointError, load_var, load_vqvae, read_state_dict, transformer_from_state_dict,
                         vqvae_from_state_dict)

__all__ = ["VQVAE", "VQVAEConfig", "PATCH_NUMS_256", "PATCH_NUMS_512", "TRANSFORMER_PRESETS", "VQVAE_PRESETS",
           "transformer_config", "CheckpointError", "load_var", "load_vqvae", "read_state_dict",
           "transformer_from_state_dict", "vqvae_from_state_dict"]
