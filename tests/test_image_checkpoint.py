"""Loading VAR checkpoints: parity with the reference on the shared fixture, and the
presets' keys/shapes against the manifest of every released checkpoint."""
import json
import os

import pytest
import torch

from modalities.image import (CheckpointError, VQVAE, VQVAEConfig, VQVAE_PRESETS, transformer_config,
                              transformer_from_state_dict, vqvae_from_state_dict)
from modalities.image.checkpoint import (TRANSFORMER_VAR_TO_MSAR, map_transformer_state_dict, map_vqvae_state_dict,
                                        transformer_to_var_state_dict, validate_state_dict, vqvae_to_var_state_dict)
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
            sd = map_transformer_state_dict(sd, model)
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
    bad["quantizer.embedding.weight"] = torch.zeros(17, 4)
    with pytest.raises(CheckpointError, match="quantizer.embedding.weight.*\\(17, 4\\).*\\(16, 4\\)"):
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


def _fixture_parts():
    from safetensors.torch import load_file
    from modalities.image.parity import configs_from_fixture
    t = load_file(TINY)
    with open(os.path.join(FIXTURES, "tiny_a.json")) as f:
        vae_cfg, var_cfg = configs_from_fixture(json.load(f))
    vae_sd = {k[4:]: v for k, v in t.items() if k.startswith("vae.")}
    var_sd = {k[4:]: v for k, v in t.items() if k.startswith("var.")}
    return vae_sd, vae_cfg, var_sd, var_cfg


@needs_fixtures
def test_var_layout_round_trips_through_msar():
    """VAR -> msar -> VAR gives back every key, shape, dtype and value of the reference's state
    dicts (derived buffers included); catches a name missing from either direction of the map."""
    vae_sd, vae_cfg, var_sd, var_cfg = _fixture_parts()
    for ref, back in [(var_sd, transformer_to_var_state_dict(transformer_from_state_dict(var_sd, var_cfg))),
                      (vae_sd, vqvae_to_var_state_dict(vqvae_from_state_dict(vae_sd, vae_cfg)))]:
        assert sorted(back) == sorted(ref)
        for k, v in ref.items():
            # (VAR builds lvl_1L as int64; the fixture stores it as float: load_state_dict casts either way)
            assert (back[k].dtype == v.dtype or k == "lvl_1L") and torch.equal(back[k].to(v.dtype), v), k


@needs_fixtures
def test_loaded_models_use_msar_names_only():
    """VAR's names stay in the converter: none of them is a key of the loaded modules, and the
    usage counter VAR lacks is filled (0, as VAR starts after loading)."""
    vae_sd, vae_cfg, var_sd, var_cfg = _fixture_parts()
    var = transformer_from_state_dict(var_sd, var_cfg)
    for k in var.state_dict():
        assert not set(k.split(".")) & set(TRANSFORMER_VAR_TO_MSAR), k
    vae = vqvae_from_state_dict(vae_sd, vae_cfg)
    assert not any(k.startswith("quantize.") or "ema_vocab_hit_SV" in k for k in vae.state_dict())
    assert int(vae.quantizer.usage_steps) == 0
    assert torch.equal(vae.quantizer.usage_ema, vae_sd["quantize.ema_vocab_hit_SV"])
    # msar's own layout loads through the same converter
    again = transformer_from_state_dict(var.state_dict(), var_cfg)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), var.state_dict().values()))


@needs_fixtures
def test_errors_name_keys_as_the_file_spells_them():
    vae_sd, vae_cfg, var_sd, var_cfg = _fixture_parts()
    bad = dict(var_sd, pos_1LC=torch.zeros(1, 3, var_cfg.embed_dim))
    with pytest.raises(CheckpointError, match=r"'pos_embed' \(in the file: 'pos_1LC'\) has shape \(1, 3, "):
        transformer_from_state_dict(bad, var_cfg)
    bad = dict(var_sd)
    bad["blocks.0.ada_lin.2.weight"] = bad.pop("blocks.0.ada_lin.1.weight")
    with pytest.raises(CheckpointError, match=r"unknown keys \(1\): \['blocks.0.ada_lin.2.weight'\].*"
                                              r"missing keys \(1\): \['blocks.0.adaln_proj.1.weight'\]"):
        transformer_from_state_dict(bad, var_cfg)
