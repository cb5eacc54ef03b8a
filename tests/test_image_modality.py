"""Image modality end to end on CPU: the demo (quick), sampling, editing, CLI, tokenizer training."""
import json
import os

import numpy as np
import pytest
import torch

from modalities.image import VQVAE, VQVAEConfig
from modalities.image.demo import DemoConfig, run
from modalities.image.pipeline import ImagePipeline


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    metrics = run(str(out), DemoConfig.quick(), progress=False)
    return out, metrics


def test_demo_writes_figures_and_metrics(demo):
    out, m = demo
    for f in ("samples_per_class.png", "progression.png", "reconstructions.png", "inpainting.png", "metrics.json"):
        assert (out / f).stat().st_size > 0, f
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) >= {"vqvae", "transformer", "samples"}
    val = saved["transformer"]["val"]
    assert all(f"loss_k{k}" in val and f"acc_k{k}" in val for k in range(4))
    s = saved["samples"]
    assert 0.0 <= s["classifier_acc_on_samples"] <= 1.0 and s["frechet_classifier_features_train_vs_val"] >= 0


def test_demo_resumes_from_its_checkpoints(demo, tmp_path):
    """Running again finds the finished checkpoints and does not retrain (same weights)."""
    out, _ = demo
    before = ImagePipeline.from_pretrained(str(out / "pipeline"))
    run(str(out), DemoConfig.quick(), progress=False)
    after = ImagePipeline.from_pretrained(str(out / "pipeline"))
    for a, b in zip(before.transformer.state_dict().values(), after.transformer.state_dict().values()):
        assert torch.equal(a, b)


def test_sampling_is_reproducible(demo):
    pipe = ImagePipeline.from_pretrained(str(demo[0] / "pipeline"))
    a = pipe.sample([1, 2, 3], cfg=2.0, top_k=20, top_p=0.9, seed=5)
    b = pipe.sample([1, 2, 3], cfg=2.0, top_k=20, top_p=0.9, seed=5)
    assert torch.equal(a, b) and a.shape == (3, 1, 16, 16) and a.min() >= -1 and a.max() <= 1


def test_inpainting_preserves_unmasked_and_changes_masked(demo):
    pipe = ImagePipeline.from_pretrained(str(demo[0] / "pipeline"))
    from modalities.image.data import load_digits
    _, val = load_digits(16)
    img = val.images[:6]
    mask = torch.zeros(6, 1, 16, 16, dtype=torch.bool)
    mask[..., 8:] = True  # regenerate the right half
    out, idx, ref, known = pipe.edit(img, mask, (val.labels[:6] + 3) % 10, cfg=2.0, top_k=20, seed=0,
                                     return_indices=True)
    # every token outside the mask is the encoded image's token, at every scale
    for i, r, m in zip(idx, ref, known):
        assert torch.equal(i[m], r[m])
    assert known[-1].any() and (~known[-1]).any()
    recon = pipe.vqvae.decode(ref)
    left = (out - recon)[..., :4].abs().mean()   # far from the mask boundary
    right = (out - recon)[..., 8:].abs().mean()
    assert right > left, (float(left), float(right))
    assert any(not torch.equal(i[~m], r[~m]) for i, r, m in zip(idx, ref, known))


def test_sample_cli_writes_pngs_and_npz(demo, tmp_path):
    from modalities.cli import main
    assert main(["sample", "--model", str(demo[0] / "pipeline"), "--labels", "0,1,2", "--top-k", "10",
                 "--out", str(tmp_path)]) == 0
    arr = np.load(tmp_path / "samples.npz")["arr_0"]
    assert arr.shape == (3, 16, 16, 3) and arr.dtype == np.uint8
    assert len([f for f in os.listdir(tmp_path) if f.endswith("_class1.png")]) == 1
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(demo[0] / "pipeline"), "--labels", "a,b"])
    assert main(["no-such-command"]) == 2


def test_pipeline_load_rejects_other_components(demo):
    """A saved transformer (or any non-image pipeline) is refused by ImagePipeline, naming what it holds."""
    with pytest.raises(ValueError, match="holds NextScaleTransformer.*not ImagePipeline"):
        ImagePipeline.from_pretrained(str(demo[0] / "pipeline" / "transformer"))


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


def test_edit_cli_writes_edit_png(demo, tmp_path):
    from PIL import Image

    from modalities.cli import main
    from modalities.image.data import load_digits, to_uint8
    _, val = load_digits(16)
    Image.fromarray(to_uint8(val.images[:1])[0]).save(tmp_path / "digit.png")
    args = ["edit", "--model", str(demo[0] / "pipeline"), "--image", str(tmp_path / "digit.png"), "--label", "7",
            "--top-k", "10", "-n", "2", "--out", str(tmp_path / "e")]
    assert main(args + ["--box", "0.5,0,1,1"]) == 0
    assert (tmp_path / "e" / "edit.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(args + ["--box", "0.7,0,0.2,1"])  # x0 >= x1: a clear argparse error


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
