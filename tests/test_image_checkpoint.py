"""Loading VAR checkpoints: parity with the reference on the shared fixture, and the
presets' keys/shapes against the manifest of every released checkpoint."""
import json
import os

import pytest
import torch

from modalities.image import (CheckpointError, VQVAE, VQVAEConfig, VQVAE_PRESETS, transformer_config,
                              transformer_from_state_dict, vqvae_from_state_dict)
from modalities.image.checkpoint import map_vqvae_state_dict, strip_derived_buffers, validate_state_dict
from modalities.image.presets import RELEASED_FILES
from msar import NextScaleTransformer

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "var_parity")
TINY = os.path.join(FIXTURES, "tiny_a.safetensors")
MANIFEST = os.path.join(FIXTURES, "var_checkpoint_manifest.json")
needs_fixtures = pytest.mark.skipif(not os.path.isfile(TINY), reason="shared/fixtures/var_parity not present")


@needs_fixtures
def test_parity_command_passes_on_tiny_a(capsys):
    from modalities.image.parity import main
    assert main([TINY]) == 0
    out = capsys.readouterr().out
    assert "PARITY OK" in out and "FAIL" not in out
    assert "out.greedy_cfg1.5_idx_3" in out  # sampled indices were compared, not skipped


@needs_fixtures
def test_parity_command_fails_on_perturbed_weights(tmp_path, capsys):
    """The checker must be able to fail: perturb one transformer weight and one codeword."""
    from safetensors.torch import load_file, save_file
    from modalities.image.parity import main
    t = load_file(TINY)
    t["var.head.weight"] = t["var.head.weight"] + 0.05 * torch.randn_like(t["var.head.weight"])
    t["vae.quantize.embedding.weight"] = t["vae.quantize.embedding.weight"].flip(0).contiguous()
    save_file(t, tmp_path / "bad.safetensors")
    with open(os.path.join(FIXTURES, "tiny_a.json")) as f:
        (tmp_path / "bad.json").write_text(f.read())
    assert main([str(tmp_path / "bad.safetensors")]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.isfile(MANIFEST), reason="manifest not present")
@pytest.mark.parametrize("fname", sorted(RELEASED_FILES))
def test_presets_match_released_manifest(fname):
    entry = json.load(open(MANIFEST))[fname]
    preset = RELEASED_FILES[fname]
    with torch.device("meta"):  # shapes only: d36 has 2.4B parameters
        if preset.startswith("vae"):
            model = VQVAE(VQVAEConfig(**VQVAE_PRESETS[preset]))
            sd = {k: torch.empty(s, device="meta") for k, s in entry["state_dict"].items()}
            sd = map_vqvae_state_dict(sd, model)
        else:
            model = NextScaleTransformer(transformer_config(preset))
            sd = {k: torch.empty(s, device="meta") for k, s in entry["state_dict"].items()}
            sd = strip_derived_buffers(sd, model)
    validate_state_dict(model, sd, fname)
    n_params = sum(p.numel() for p in model.parameters())
    # the manifest counts parameters (not buffers) of the reference module
    assert n_params == entry["params"], (n_params, entry["params"])


def _tiny_vae_sd():
    cfg = VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), patch_nums=(1, 2), share_quant_resi=2)
    return cfg, VQVAE(cfg).state_dict()


def test_loader_names_unknown_missing_and_misshaped_keys():
    cfg, sd = _tiny_vae_sd()
    bad = dict(sd)
    bad["encoder.not_a_layer.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unknown keys.*not_a_layer"):
        vqvae_from_state_dict(bad, cfg)
    bad = dict(sd)
    del bad["decoder.conv_out.bias"]
    with pytest.raises(CheckpointError, match="missing keys.*decoder.conv_out.bias"):
        vqvae_from_state_dict(bad, cfg)
    bad = dict(sd)
    bad["quantize.embedding.weight"] = torch.zeros(17, 4)
    with pytest.raises(CheckpointError, match="quantize.embedding.weight.*\\(17, 4\\).*\\(16, 4\\)"):
        vqvae_from_state_dict(bad, cfg)


def test_transformer_loader_rejects_other_schedule():
    cfg = transformer_config("var-d16", depth=1, embed_dim=32, num_heads=2, vocab_size=16, latent_dim=4, num_classes=3)
    sd = NextScaleTransformer(cfg).state_dict()
    sd["attn_bias_for_masking"] = torch.zeros(1, 1, 5, 5)
    with pytest.raises(CheckpointError, match="another schedule"):
        transformer_from_state_dict(sd, cfg)


def test_reference_phi_names_map_for_every_sharing_mode():
    for share, ref_key in [(4, "quantize.quant_resi.qresi_ls.3.weight"), (1, "quantize.quant_resi.qresi.weight"),
                           (0, "quantize.quant_resi.1.weight")]:
        cfg = VQVAEConfig(vocab_size=8, z_channels=4, ch=32, ch_mult=(1, 2), patch_nums=(1, 2), share_quant_resi=share)
        model = VQVAE(cfg)
        ours = map_vqvae_state_dict({ref_key: torch.zeros(1)}, model)
        assert list(ours)[0] in model.state_dict()
