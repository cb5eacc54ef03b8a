"""Image modality on CPU: tokenizer training, image folders, losses, CLI errors
(the digits demo, sampling and editing: tests/test_demo.py)."""

import numpy as np
import pytest
import torch

from modalities.image import VQVAE, VQVAEConfig


def test_vqvae_training_reduces_reconstruction_error(tmp_path):
    from modalities.image.train_vqvae import main
    out = tmp_path / "vq"
    assert main(["--data", "digits", "--steps", "40", "--batch-size", "32", "--out", str(out), "--no-progress"]) == 0
    import csv
    rows = list(csv.DictReader(open(out / "train.csv")))
    first = np.mean([float(r["l1"]) for r in rows[:5]])
    last = np.mean([float(r["l1"]) for r in rows[-5:]])
    assert last < 0.8 * first, (first, last)
    assert (out / "reconstructions.png").exists()
    assert VQVAE.from_pretrained(out / "tokenizer").cfg.patch_nums[-1] > 1  # the trained tokenizer, loadable


def test_vqvae_rejects_bad_images():
    v = VQVAE(VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), patch_nums=(1, 2), in_channels=3))
    with pytest.raises(ValueError, match=r"expected 4x4 pixels.*got 5x5"):
        v.encode(torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"expected shape \(B, 3, H, W\)"):
        v.encode(torch.zeros(1, 1, 4, 4))
    with pytest.raises(TypeError, match="float tensor"):
        v.encode(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_image_folder_errors_name_the_path(tmp_path):
    from modalities.image.data import ImageFolder, load_image
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolder(str(tmp_path / "nope"), 16)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(str(tmp_path / "empty"), 16)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(str(bad), 16)


def test_perceptual_and_discriminator_plug_in():
    from modalities.image.losses import PatchDiscriminator, PerceptualLoss
    p = PerceptualLoss()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert float(p(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(p(x, -x)) > 0
    d = PatchDiscriminator(1, ch=8, n_layers=2)
    assert d(x).shape[1] == 1


def test_image_tokenizer_passes_conformance_kit():
    from msar.testing import check_adapter, tiny_transformer
    torch.manual_seed(0)
    v = VQVAE(VQVAEConfig(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 4), in_channels=1,
                          num_res_blocks=1, using_sa=False)).eval()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    report = check_adapter(v, x, model=tiny_transformer(v, num_classes=3), labels=torch.tensor([0, 2]), atol=1e-4)
    assert report


def test_cli_reports_bad_paths_without_traceback(tmp_path, capsys):
    from modalities.cli import main
    assert main(["sample", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "msar sample: error:" in err and "missing" in err and "Traceback" not in err
