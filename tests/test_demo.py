"""The digits demo (``msar demo``): safe re-runs, reproducible outputs, its metrics, sampling,
editing and the command line, on the ``--quick`` configuration."""
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch

from modalities.cli import main
from modalities.image.demo import (FIGURES, RUN_CONFIG, DemoConfig, RunFolderError, identical_fraction,
                                   prepare_run_folder, run, unigram_loss)
from modalities.image.pipeline import ImagePipeline

TIMING = ("timing_s", "run")  # the fields that differ between identical runs (durations, date, machine load)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    metrics = run(str(out), DemoConfig.quick(), progress=False, quick=True)
    return out, metrics


# ---------------------------------------------------------------------------- outputs
def test_demo_writes_labelled_figures_digits_and_metrics(demo):
    out, m = demo
    for f in FIGURES + ("metrics.json", RUN_CONFIG, "pipeline/config.json"):
        assert (out / f).stat().st_size > 0, f
    assert len(os.listdir(out / "digits")) == 10  # one real test digit per class, inputs for `msar edit`
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["smoke_run"] is True and saved["config"] == DemoConfig.quick().to_json()
    t = saved["transformer"]
    assert len(t["test_loss_per_scale"]) == len(t["unigram_test_loss_per_scale"]) == 4
    assert t["beats_unigram_at_every_scale"] == all(a < b for a, b in zip(t["test_loss_per_scale"],
                                                                          t["unigram_test_loss_per_scale"]))
    assert t["selection"]["best_step"] in [e["step"] for e in t["selection"]["evals"]]
    mem = saved["samples"]["memorisation"]
    assert {"copy_rate_samples", "copy_rate_test_reals", "identical_token_maps_samples"} <= set(mem)
    run = saved["run"]
    assert run["wall_time_s"] > 0 and run["cpu_time_s"] > 0 and run["commit"] and run["command"] and run["date"]


def test_quick_run_is_reproducible(demo, tmp_path):
    """Same seed, another folder: identical metrics (timing aside) and byte-identical figures.
    Catches an unseeded draw anywhere (augmentation, initialisation, sampling, edits, classifier)."""
    out, _ = demo
    run(str(tmp_path), DemoConfig.quick(), progress=False, quick=True)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path))
    for k in TIMING:
        a.pop(k), b.pop(k)
    assert a == b
    for f in FIGURES:
        assert (out / f).read_bytes() == (tmp_path / f).read_bytes(), f


def test_rerun_resumes_without_retraining(demo, tmp_path):
    """The same command again finds the finished checkpoints and re-evaluates: same weights. Sampling
    settings (here the guidance) may change between the runs; they are not part of the checkpoints."""
    import dataclasses
    import shutil
    first = demo[1]
    out = tmp_path / "copy"
    shutil.copytree(demo[0], out)  # (the fixture's folder stays as the first run left it)
    before = ImagePipeline.from_pretrained(str(out / "pipeline"))
    again = run(str(out), dataclasses.replace(DemoConfig.quick(), cfg=1.0), progress=False, quick=True)
    after = ImagePipeline.from_pretrained(str(out / "pipeline"))
    for a, b in zip(before.transformer.state_dict().values(), after.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert again["transformer"] == first["transformer"] and again["samples"]["cfg"] == 1.0


def test_run_killed_between_checkpoint_and_evaluation_resumes_to_the_same_result(demo, tmp_path, monkeypatch):
    """Early stopping keeps its record (evaluations, best weights) beside the trainer's checkpoints;
    a run that dies after a checkpoint but before evaluating it must evaluate that step on resume
    (not skip it, not train past it), and end exactly where an uninterrupted run ends."""
    import modalities.image.demo as D
    real_evaluate, calls = D.TransformerTrainer.evaluate, []

    def dying_evaluate(self, *a, **kw):
        calls.append(self.step)
        if len(calls) == 2:  # the evaluation of the second chunk: the checkpoint of step 40 is on disk
            raise KeyboardInterrupt
        return real_evaluate(self, *a, **kw)

    monkeypatch.setattr(D.TransformerTrainer, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path), DemoConfig.quick(), progress=False, quick=True)
    assert calls == [20, 40]
    monkeypatch.setattr(D.TransformerTrainer, "evaluate", real_evaluate)
    resumed = run(str(tmp_path), DemoConfig.quick(), progress=False, quick=True)
    assert resumed["transformer"] == demo[1]["transformer"] and resumed["samples"] == demo[1]["samples"]


# ---------------------------------------------------------------------------- safe re-runs
def test_other_configuration_in_the_same_folder_is_refused_at_start(demo, capsys):
    """`demo --quick` then `demo` into the same folder used to resume the quick checkpoint and crash
    with size mismatches after minutes of training; now it stops at once, saying what differs."""
    out, _ = demo
    with pytest.raises(RunFolderError, match=r"depth: 2 there, 4 now.*--out NEW_DIR.*--fresh"):
        run(str(out), DemoConfig(), progress=False)
    assert main(["demo", "--out", str(out), "--no-progress"]) == 2  # the full command: one line, no traceback
    err = capsys.readouterr().err
    assert "different configuration" in err and "Traceback" not in err
    assert json.loads((out / RUN_CONFIG).read_text()) == DemoConfig.quick().training_json()  # the old run is intact


def test_fresh_discards_only_the_runs_own_state(tmp_path):
    a, b = DemoConfig.quick().training_json(), DemoConfig().training_json()
    prepare_run_folder(str(tmp_path), a)
    (tmp_path / "ckpt_var").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError):
        prepare_run_folder(str(tmp_path), b)
    prepare_run_folder(str(tmp_path), b, fresh=True)
    assert not (tmp_path / "ckpt_var").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / RUN_CONFIG).read_text()) == b


def test_checkpoints_of_unknown_configuration_are_refused(tmp_path):
    (tmp_path / "ckpt_vqvae").mkdir()  # e.g. written by an older version, without run_config.json
    with pytest.raises(RunFolderError, match="configuration is unknown"):
        prepare_run_folder(str(tmp_path), DemoConfig().training_json())
    (tmp_path / RUN_CONFIG).write_text("{trunc")
    with pytest.raises(RunFolderError, match="unreadable"):
        prepare_run_folder(str(tmp_path), DemoConfig().training_json())


def test_quick_and_full_runs_default_to_separate_folders(monkeypatch, tmp_path):
    """The README's order (`demo --quick`, then `demo`) must not meet the refusal at all."""
    import modalities.image.demo as D
    seen = []
    monkeypatch.setattr(D, "run", lambda out, c, **kw: seen.append(out) or (_ for _ in ()).throw(SystemExit(0)))
    for argv in (["--quick"], []):
        with pytest.raises(SystemExit):
            D.main(argv)
    assert seen == ["outputs/demo_quick", "outputs/demo"]


# ---------------------------------------------------------------------------- metrics
def test_unigram_loss_is_the_smoothed_frequency_cross_entropy():
    train = [torch.tensor([[0, 0], [1, 0]])]  # counts 3, 1, 0 -> add-one 4, 2, 1 of 7
    ev = [torch.tensor([[0, 2]])]
    want = -(math.log(4 / 7) + math.log(1 / 7)) / 2
    assert unigram_loss(train, ev, 3) == [pytest.approx(want, rel=1e-12)]


def test_identical_fraction_compares_whole_token_maps():
    train = [torch.tensor([[1], [2]]), torch.tensor([[3, 4], [5, 6]])]
    gen = [torch.tensor([[1], [1], [2]]), torch.tensor([[3, 4], [5, 6], [5, 6]])]  # only the last differs at scale 0
    assert identical_fraction(gen, train) == pytest.approx(2 / 3)


def test_nearest_neighbour_distances_and_copy_rate():
    from msar.metrics import copy_rate, nearest_neighbour_distances
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(11, 5))
    brute = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(nearest_neighbour_distances(a, b, chunk=3), brute, rtol=1e-10)
    assert nearest_neighbour_distances(b[:3], b).max() < 1e-6  # a copy is at distance 0
    assert copy_rate(np.array([0.1, 0.5, 0.9, 2.0]), 0.9) == 0.5  # strictly below


def test_frechet_distance_is_exact_and_silent_on_singular_covariances():
    """Few samples or dead features make the covariances singular: scipy's sqrtm of the product
    warned (LinAlgWarning) in every demo run; the eigen-decomposition is exact there."""
    from msar.metrics import frechet_distance, frechet_distance_from_features
    d1, d2 = np.array([4.0, 1.0, 0.0, 0.0]), np.array([1.0, 9.0, 2.0, 0.0])  # commuting, both singular
    mu1, mu2 = np.zeros(4), np.array([1.0, 0, 0, 0])
    want = 1.0 + d1.sum() + d2.sum() - 2 * np.sqrt(d1 * d2).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(want, rel=1e-12)
        feats = np.random.default_rng(0).normal(size=(5, 64))  # 5 samples in 64 dimensions: rank 4
        assert frechet_distance_from_features(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_augmentation_is_a_seeded_small_affine_distortion():
    from modalities.image.data import augment_digits, digits_splits, load_digits
    train, val, test = digits_splits(16)
    x = train.images[:8]
    assert torch.allclose(augment_digits(x, torch.Generator().manual_seed(0), 0, 0, 0), x, atol=1e-5)
    a = augment_digits(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, augment_digits(x, torch.Generator().manual_seed(1))) and not torch.allclose(a, x)
    assert a.min() >= -1 and a.max() <= 1
    # a pure shift moves the digit by the drawn number of pixels (at most max_shift)
    blob = torch.full((1, 1, 16, 16), -1.0)
    blob[..., 6:9, 5:8] = 1.0
    shifted = augment_digits(blob, torch.Generator().manual_seed(3), 2.0, 0, 0)
    u = torch.rand(1, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1  # the same draw
    com = lambda im: ((im + 1)[0, 0].sum(0) * torch.arange(16.0)).sum() / (im + 1).sum()  # noqa: E731
    assert float(com(shifted) - com(blob)) == pytest.approx(-2.0 * float(u[0, 2]), abs=1e-3)
    # the splits: disjoint, test = load_digits' held-out split
    _, held_out = load_digits(16)
    assert torch.equal(test.images, held_out.images)
    assert len(train.labels) + len(val.labels) + len(test.labels) == 1797


# ---------------------------------------------------------------------------- sampling and editing
def test_sampling_is_reproducible(demo):
    pipe = ImagePipeline.from_pretrained(str(demo[0] / "pipeline"))
    a = pipe.sample([1, 2, 3], cfg=2.0, top_k=20, top_p=0.9, seed=5)
    b = pipe.sample([1, 2, 3], cfg=2.0, top_k=20, top_p=0.9, seed=5)
    assert torch.equal(a, b) and a.shape == (3, 1, 16, 16) and a.min() >= -1 and a.max() <= 1


def test_class_edit_regenerates_the_coarse_scales_and_keeps_the_fine_tokens_of_the_kept_half(demo):
    """With keep_from_scale=2 and threshold 1.0 the coarse scales (which decide the class) are free;
    the fine tokens lying wholly in the kept half are the image's own."""
    from modalities.image.data import digits_splits
    pipe = ImagePipeline.from_pretrained(str(demo[0] / "pipeline"))
    test = digits_splits(16)[2]
    mask = torch.zeros(4, 1, 16, 16, dtype=torch.bool)
    mask[..., 8:] = True
    out, idx, ref, known = pipe.edit(test.images[:4], mask, 7, cfg=3.0, top_k=20, seed=0, threshold=1.0,
                                     keep_from_scale=2, return_indices=True)
    assert not known[0].any() and not known[1].any()  # 1x1, 2x2: regenerated
    grid = known[3].view(4, 4, 4)
    assert grid[..., :2].all() and not grid[..., 2:].any()  # 4x4: the left two columns kept
    for i, r, m in zip(idx, ref, known):
        assert torch.equal(i[m], r[m])
    default = pipe.edit(test.images[:4], mask, 7, cfg=3.0, top_k=20, seed=0, return_indices=True)[3]
    assert default[0].all()  # the old default keeps the 1x1 token that straddles both halves


def test_inpainting_keeps_the_unmasked_region_on_the_decoded_image(demo):
    from modalities.image.data import digits_splits
    pipe = ImagePipeline.from_pretrained(str(demo[0] / "pipeline"))
    test = digits_splits(16)[2]
    img = test.images[:6]
    mask = torch.zeros(6, 1, 16, 16, dtype=torch.bool)
    mask[..., 8:] = True
    out, idx, ref, known = pipe.edit(img, mask, (test.labels[:6] + 3) % 10, cfg=2.0, top_k=20, seed=0,
                                     return_indices=True)
    recon = pipe.vqvae.decode(ref)
    left = (out - recon)[..., :4].abs().mean()   # far from the mask boundary
    right = (out - recon)[..., 8:].abs().mean()
    assert right > left, (float(left), float(right))


def test_pipeline_load_rejects_other_components(demo):
    """A saved transformer (or any non-image pipeline) is refused by ImagePipeline, naming what it holds."""
    with pytest.raises(ValueError, match="holds NextScaleTransformer.*not ImagePipeline"):
        ImagePipeline.from_pretrained(str(demo[0] / "pipeline" / "transformer"))


# ---------------------------------------------------------------------------- command line
def test_sample_cli_writes_pngs_and_npz(demo, tmp_path):
    assert main(["sample", "--model", str(demo[0] / "pipeline"), "--labels", "0,1,2", "--top-k", "10",
                 "--out", str(tmp_path)]) == 0
    arr = np.load(tmp_path / "samples.npz")["arr_0"]
    assert arr.shape == (3, 16, 16, 3) and arr.dtype == np.uint8
    assert len([f for f in os.listdir(tmp_path) if f.endswith("_class1.png")]) == 1


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "-n/--num must be >= 1"),
    (["--cfg", "-3"], "--cfg must be a finite number >= 0"),
    (["--cfg", "nan"], "--cfg must be a finite number >= 0"),
    (["--labels", "3,10"], "10 is the model's null class"),
    (["--labels", "-1"], "classes 0..9, got -1"),
    (["--labels", "a,b"], "comma-separated integers"),
    (["--top-p", "1.5"], "--top-p must be in"),
])
def test_sample_cli_rejects_bad_values_with_one_line(demo, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(demo[0] / "pipeline"), "--out", str(tmp_path)] + args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_edit_cli_takes_a_written_digit_or_a_dataset_index(demo, tmp_path):
    out = demo[0]
    digit = sorted((out / "digits").iterdir())[3]
    base = ["edit", "--model", str(out / "pipeline"), "--label", "7", "-n", "2", "--box", "0.5,0,1,1"]
    assert main(base + ["--image", str(digit), "--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--index", "3", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "edit.png").stat().st_size > 0 and (tmp_path / "b" / "edit.png").stat().st_size > 0
    for bad in (["--index", "3", "--box", "0.7,0,0.2,1"], ["--index", "9999"], ["--index", "3", "--label", "10"]):
        with pytest.raises(SystemExit):
            main(base[:-2] + bad + ["--out", str(tmp_path / "c")] + ([] if "--box" in bad else ["--box", "0.5,0,1,1"]))


def test_cli_top_level(capsys):
    assert main([]) == 2  # no command: usage on stderr, failure
    assert "usage: msar" in capsys.readouterr().err
    assert main(["--version"]) == 0
    from msar import __version__
    assert capsys.readouterr().out.strip() == f"msar {__version__}"
    assert main(["no-such-command"]) == 2
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "(default: 0)" in capsys.readouterr().out  # defaults are shown


def test_missing_image_extra_is_one_clear_line(tmp_path):
    """Without the [image] extra's packages the command says which extra to install (no traceback)."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['sklearn'] = None; sys.modules['PIL'] = None\n"
            "from modalities.cli import main; raise SystemExit(main(['demo', '--quick', '--out', sys.argv[1]]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert 'pip install -e ".[image]"' in r.stderr and "Traceback" not in r.stderr
