"""The ImageNet pipeline on CPU with a tiny synthetic image folder: data, the training entry
point (steps, exact resume), generation (PNG + npz, resume, shards, rejection), evaluation
with random networks, FSDP construction with gloo."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from msar.metrics import frechet_distance
from modalities.image.imagenet import data as D
from modalities.image.imagenet import evaluate as E
from modalities.image.imagenet import generate as G
from modalities.image.imagenet import train as T
from modalities.image.imagenet.inception import FIDInceptionV3, InceptionOutput, load_inception
from modalities.image.imagenet.recipes import RECIPES, get_recipe, progressive_stage
from modalities.image.vqvae import VQVAE

CLASSES = ("n001", "n002", "n003")


def _make_folder(root, n_train=6, n_val=2, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in CLASSES:
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(n):  # odd sizes, both formats, portrait and landscape
                h, w = (20 + i, 24) if i % 2 else (26, 19 + i)
                arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
                ext, fmt = (".JPEG", "JPEG") if i % 2 else (".png", "PNG")
                Image.fromarray(arr).save(os.path.join(d, f"img{i}{ext}"), format=fmt)
    return root


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """A tiny ImageNet folder and a random tiny VQ-VAE saved to a file."""
    from safetensors.torch import save_file

    root = _make_folder(str(tmp_path_factory.mktemp("imagenet")))
    torch.manual_seed(0)
    vae = VQVAE(get_recipe("tiny").vqvae())
    path = os.path.join(root, "vae.safetensors")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, path)
    return root, path


def _train_args(root, vae, out, *extra):
    return ["--data", root, "--preset", "tiny", "--vae", vae, "--out", out, "--steps", "4", "--workers", "0",
            "--val-every", "2", "--val-batches", "1", "--ckpt-every", "2", "--log-every", "1", "--no-progress",
            "--no-tensorboard", "--device", "cpu", *extra]  # bit-exact resume is a CPU property


def _losses(out):
    with open(os.path.join(out, "train.csv")) as f:
        return [(int(r["step"]), float(r["loss"]), float(r["loss_k2"])) for r in csv.DictReader(f)]


# ---------------------------------------------------------------------------- data
def test_augmentation_shapes_range_and_determinism(imagenet):
    root, _ = imagenet
    ds = D.ImageNetFolder(root, "train", size=16, hflip=True, seed=1)
    assert ds.classes == list(CLASSES) and len(ds) == 18
    x, y = ds[(0, 5)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert y == 0
    assert torch.equal(ds[(0, 5)][0], x)  # same (epoch, index) -> same crop and flip
    assert any(not torch.equal(ds[(e, 5)][0], x) for e in range(1, 6))  # other epochs -> other crops
    val = D.ImageNetFolder(root, "val", size=16, classes=ds.classes)
    assert not val.train and torch.equal(val[(0, 1)][0], val[(7, 1)][0])  # centre crop ignores the epoch
    # the skip marker (fast-forward on resume) returns a placeholder without decoding
    assert torch.equal(ds[(0, 5, True)][0], torch.zeros(3, 16, 16))


def test_transforms_follow_torchvision_rules():
    from PIL import Image

    im = Image.fromarray(np.zeros((20, 24, 3), np.uint8))  # w=24, h=20
    assert D.resize_shorter(im, 18).size == (int(18 * 24 / 20), 18)
    assert D.crop_box(21, 18, 16, train=False, gen=None) == (2, 1, 18, 17)  # round((21-16)/2)=2, round(1)=1
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        l, t, r, b = D.crop_box(21, 18, 16, train=True, gen=g)
        assert 0 <= l <= 5 and 0 <= t <= 2 and r - l == 16 and b - t == 16
    x = D.pil_to_pm1(Image.fromarray(np.array([[[0, 255, 51]]], np.uint8)))
    assert torch.allclose(x.flatten(), torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))


def test_matches_torchvision_when_available(imagenet):
    tv = pytest.importorskip("torchvision.transforms")
    root, _ = imagenet
    path = os.path.join(root, "val", "n001", "img1.JPEG")
    ref = tv.Compose([tv.Resize(18, interpolation=tv.InterpolationMode.LANCZOS), tv.CenterCrop(16), tv.ToTensor()])
    ours = D.augment(D.load_rgb(path), 16, train=False, hflip=False, gen=None)
    assert torch.allclose(ours, ref(D.load_rgb(path)) * 2 - 1, atol=1e-6)


def test_clear_errors(tmp_path, imagenet):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        D.ImageNetFolder(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders in .*empty"):
        D.ImageNetFolder(str(tmp_path / "empty"))
    (tmp_path / "empty" / "train" / "n001").mkdir()
    with pytest.raises(ValueError, match="no images .* found under .*empty"):
        D.ImageNetFolder(str(tmp_path / "empty"))
    bad = tmp_path / "empty" / "train" / "n001" / "broken.JPEG"
    bad.write_bytes(b"not a jpeg at all")
    ds = D.ImageNetFolder(str(tmp_path / "empty"), size=16)
    with pytest.raises(ValueError, match="cannot read image .*broken.JPEG"):
        ds[0]
    with pytest.raises(FileNotFoundError, match="missing_root"):  # through the training entry point
        T.main(_train_args(str(tmp_path / "missing_root"), imagenet[1], str(tmp_path / "o")))


def test_epoch_sampler_order_and_skip():
    ds = D.SyntheticImageNet(10, size=8, num_classes=3)
    s = D.EpochSampler(ds, shuffle=True, seed=3)
    s.set_epoch(2)
    first = list(s)
    assert [e for e, _, _ in first] == [2] * 10 and not any(k for _, _, k in first)
    assert sorted(i for _, i, _ in first) == list(range(10))
    s.skip_next(4)
    again = list(s)
    assert [i for _, i, _ in again] == [i for _, i, _ in first] and [k for _, _, k in again] == [True] * 4 + [False] * 6
    assert not any(k for _, _, k in s)  # one-shot


# ---------------------------------------------------------------------------- recipes
def test_recipes_follow_the_paper():
    for name in ("var-d16", "var-d20", "var-d24", "var-d30", "var-d36"):
        r = RECIPES[name]
        assert r.betas == (0.9, 0.95) and r.weight_decay == 0.05 and r.grad_clip == 2.0 and r.cond_drop_rate == 0.1
        assert r.base_lr == (1e-4 if name in ("var-d16", "var-d20") else 8e-5)
        assert r.warmup_epochs_frac == 1 / 50 and r.warmup_start == 0.005 and r.lr_schedule == "lin0"
    assert RECIPES["var-d16"].peak_lr() == pytest.approx(1e-4 * 768 / 256)
    assert RECIPES["var-d30"].peak_lr(512) == pytest.approx(8e-5 * 2)
    assert RECIPES["var-d30"].fsdp and RECIPES["var-d36"].fsdp and not RECIPES["var-d16"].fsdp
    cfg = RECIPES["var-d36"].transformer()
    assert cfg.depth == 36 and cfg.embed_dim == 2304 and cfg.shared_aln and cfg.schedule[-1] == (32, 32)
    assert RECIPES["var-d36"].vqvae().image_size == 512
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("var-d99")


@given(st.integers(0, 999))
def test_progressive_stage_is_monotone(step):
    r = get_recipe("var-d16", progressive=0.5)
    s = progressive_stage(step, 1000, 20, r, 10)
    assert 4 <= s <= 9 and s <= progressive_stage(step + 1, 1000, 20, r, 10)
    assert progressive_stage(step, 1000, 20, RECIPES["var-d16"], 10) == 9  # off in the published recipe
    assert progressive_stage(999, 1000, 20, r, 10) == 9 and progressive_stage(20, 1000, 20, r, 10) == 4


# ---------------------------------------------------------------------------- training entry point
def test_train_two_steps_and_exact_resume(imagenet, tmp_path):
    root, vae = imagenet
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert T.main(_train_args(root, vae, a, "--stop-at", "2")) == 0  # two steps through the entry point
    first = _losses(a)
    assert [s for s, _, _ in first] == [1, 2] and all(np.isfinite(l) for _, l, _ in first)
    assert os.path.isdir(os.path.join(a, "ckpt", "step_000002"))
    run = json.load(open(os.path.join(a, "run.json")))
    assert run["per_rank_batch"] == 8 and run["steps_per_epoch"] == 2 and run["total_steps"] == 4
    with open(os.path.join(a, "val.csv")) as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["2"]
    # b: an uninterrupted 4-step run; a: killed after step 3 (a mid-epoch checkpoint) and continued
    T.main(_train_args(root, vae, b))
    T.main(_train_args(root, vae, a, "--stop-at", "3", "--ckpt-every", "3"))
    T.main(_train_args(root, vae, a, "--ckpt-every", "3"))
    assert _losses(a) == _losses(b)
    assert {"loss_k0", "acc_k2", "lr", "grad_norm"} <= set(csv.DictReader(open(os.path.join(a, "train.csv"))).fieldnames)
    assert os.path.isfile(os.path.join(a, "pipeline", "transformer", "model.safetensors"))


def test_progressive_loss_weights(imagenet):
    from msar import NextScaleTransformer
    from msar.training import TransformerTrainConfig
    from modalities.image.imagenet.trainer import ImageNetTrainer

    r = get_recipe("tiny", progressive=0.5, progressive_start_scale=0, progressive_warmup_epochs_frac=1.0, epochs=4)
    model = NextScaleTransformer(r.transformer(3))
    t = ImageNetTrainer(model, None, TransformerTrainConfig(total_steps=20, warmup_steps=2, progress=False), r,
                        steps_per_epoch=1)
    L = t.schedule.L  # scales 1, 2x2, 4x4 -> L = 21, ends 1, 5, 21
    t.step = 0
    assert t.stage() == 0 and torch.allclose(t.loss_weights("cpu"), torch.tensor([1 / L] + [0.0] * (L - 1)))
    t.step = 6  # stage 1 starts at step 5; the ramp lasts progressive_warmup = 4 steps
    w = t.loss_weights("cpu")
    assert t.stage() == 1 and t.stage_start(1) == 5 and (w[5:] == 0).all() and w[0] == pytest.approx(1 / L)
    assert w[1:5].tolist() == pytest.approx([0.5 / L] * 4)  # the newest scale ramping in
    t.step = 19
    assert t.stage() == 2 and (t.loss_weights("cpu") > 0).all()


def test_fsdp_constructs_trains_and_resumes_on_cpu(tmp_path):
    import torch.distributed as dist
    from msar import NextScaleTransformer
    from msar.training import TransformerTrainConfig
    from modalities.image.imagenet.trainer import ImageNetTrainer

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    r = get_recipe("tiny")
    vq = VQVAE(r.vqvae()).eval()
    x, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 0])

    def make():
        torch.manual_seed(0)
        m = NextScaleTransformer(r.transformer(3))
        cfg = TransformerTrainConfig(lr=1e-3, total_steps=4, ckpt_dir=str(tmp_path / "ck"), progress=False,
                                     tensorboard=False, grad_accum=2)
        return ImageNetTrainer(m, vq, cfg, r, steps_per_epoch=2, fsdp=True)

    def step(t):  # one optimizer step = two micro-batches (gradient sync only on the second)
        assert t.train_step(x[:2], y[:2]) is None
        return t.train_step(x[2:], y[2:])["loss"]

    try:
        t = make()
        assert type(t.model).__name__.startswith("FSDP") and t.ddp_model is t.model
        assert all(type(b).__name__.startswith("FSDP") for b in t.model.blocks)
        step(t)
        t.save()
        after = [step(t) for _ in range(2)]
        t2 = make()
        t2.resume()
        assert t2.step == 1 and [step(t2) for _ in range(2)] == after
        sd = t2.full_state_dict()
        assert set(sd) == set(NextScaleTransformer(r.transformer(3)).state_dict())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def trained(imagenet, tmp_path_factory):
    root, vae = imagenet
    out = str(tmp_path_factory.mktemp("run"))
    T.main(_train_args(root, vae, out, "--steps", "2", "--val-every", "0"))
    return out, vae


def test_generate_png_npz_shards_resume(trained, tmp_path):
    run, vae = trained
    out = str(tmp_path / "gen")
    args = ["--var", run, "--vae", vae, "--out", out, "--per-class", "3", "--batch", "2", "--top-k", "10",
            "--no-progress", "--num-shards", "2", "--device", "cpu"]  # compared with a CPU regeneration
    G.main(args + ["--shard", "1"])
    assert sorted(os.listdir(os.path.join(out, "classes"))) == ["0001.npz"]  # round-robin: shard 1 of 2
    assert not os.path.exists(os.path.join(out, "samples.npz"))  # not all classes yet
    G.main(args + ["--shard", "0"])
    with np.load(os.path.join(out, "samples.npz")) as z:
        arr, labels = z["arr_0"], z["labels"]
    assert arr.shape == (9, 16, 16, 3) and arr.dtype == np.uint8 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert sorted(os.listdir(os.path.join(out, "png", "0002"))) == ["000.png", "001.png", "002.png"]
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(os.path.join(out, "png", "0002", "001.png"))), arr[7])
    # resume: everything done -> nothing generated; the same class regenerates identically
    model, vqvae = G.load_models(run, vae)
    s = G.SamplingSettings(per_class=3, batch=2, top_k=10)
    summary = G.run(model, vqvae, out, range(3), s, meta={"var": os.path.abspath(run), "classes": "all",
                                                        "num_classes": 3}, progress=False)
    assert summary["generated_classes"] == 0 and summary["skipped_classes"] == 3
    assert np.array_equal(G.generate_class(model, vqvae, 1, s), arr[3:6])
    with pytest.raises(ValueError, match="other settings"):
        G.main(args[:-4] + ["--device", "cpu", "--cfg", "2.0"])
    bench = G.benchmark_sampling(model, vqvae, batch=2, batches=1, warmup=0, top_k=10, decode=False)
    assert bench["images_per_s"] > 0 and bench["decode"] is False


def test_generate_compile_gives_the_same_samples(trained, tmp_path):
    # --compile puts the blocks under torch.compile (eager backend here: dynamo's tracing without a C++
    # toolchain). catches: the flag not reaching the model, compiled blocks that change the samples
    import torch._dynamo
    run, vae = trained
    args = ["--var", run, "--vae", vae, "--per-class", "2", "--batch", "2", "--top-k", "10", "--classes", "1",
            "--no-progress", "--no-png", "--device", "cpu"]
    counts = torch._dynamo.utils.counters["stats"]
    try:
        torch._dynamo.reset()
        before = counts["unique_graphs"]
        G.main(args + ["--out", str(tmp_path / "eager")])
        assert counts["unique_graphs"] == before
        G.main(args + ["--out", str(tmp_path / "compiled"), "--compile", "eager"])
        assert counts["unique_graphs"] > before
    finally:
        torch._dynamo.reset()
    eager, compiled = (np.load(str(tmp_path / d / "samples.npz"))["arr_0"] for d in ("eager", "compiled"))
    assert np.array_equal(eager, compiled)


def test_rejection_sampling_with_classifier_path(trained, tmp_path):
    run, vae = trained
    torch.manual_seed(0)
    clf = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3)))
    path = str(tmp_path / "clf.pt")
    clf.save(path)
    model, vqvae = G.load_models(run, vae)
    s = G.SamplingSettings(per_class=2, batch=4, top_k=10, reject_pool=3)
    kept = G.generate_class(model, vqvae, 2, s, G.load_classifier(path, torch.device("cpu")))
    pool = G.generate_class(model, vqvae, 2, G.SamplingSettings(per_class=6, batch=4, top_k=10))
    scores = clf(torch.from_numpy(pool).permute(0, 3, 1, 2).float() / 255).log_softmax(-1)[:, 2]
    best = scores.argsort(descending=True)[:2].sort().values.numpy()
    assert np.array_equal(kept, pool[best])  # the most confident 2 of 6 candidates, in order
    with pytest.raises(ValueError, match="needs --reject-classifier"):
        G.run(model, vqvae, str(tmp_path / "g"), [0], s, progress=False)


# ---------------------------------------------------------------------------- evaluation
def test_frechet_distance_matches_scipy():
    from scipy import linalg

    rng = np.random.default_rng(0)
    d = 12
    a, b = rng.normal(size=(40, d)), rng.normal(size=(40, d)) @ rng.normal(size=(d, d)) * 0.5 + 1
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)


def test_inception_score_and_precision_recall_reference_values():
    assert E.inception_score(np.full((20, 5), 0.2), splits=2)[0] == pytest.approx(1.0)
    assert E.inception_score(np.eye(4)[np.arange(20) % 4], splits=1)[0] == pytest.approx(4.0)
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(30, 4)), rng.normal(size=(25, 4)) + 0.7
    p, r = E.precision_recall(real, fake, k=3)

    def brute(ref, query):  # direct numpy: k-NN radius of every ref point, is each query inside any ball?
        dr = ((ref[:, None] - ref[None]) ** 2).sum(-1)
        radii = np.sort(dr, axis=1)[:, 3]
        dq = ((query[:, None] - ref[None]) ** 2).sum(-1)
        return (dq <= radii[None]).any(1).mean()

    assert p == pytest.approx(brute(real, fake)) and r == pytest.approx(brute(fake, real))
    assert E.precision_recall(real, real, k=3) == (1.0, 1.0)


def _random_inception_init(net):
    # the default init shrinks activations through 40+ layers; He init keeps the features informative
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net


def test_inception_architecture_and_loading(tmp_path):
    net = _random_inception_init(FIDInceptionV3(resize_to=75)).eval()
    # torchvision's inception_v3 has 27,161,264 parameters; without the aux head and with 1008 classes: 23,850,960
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    with torch.no_grad():
        out = net(torch.rand(2, 3, 32, 32))
    assert out.pool.shape == (2, 2048) and out.logits.shape == (2, 1008) and (out.pool >= 0).all()
    assert torch.allclose(out.logits, out.logits_unbiased + net.fc.bias)
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}  # as pytorch-fid's file
    sd["AuxLogits.fc.weight"] = torch.zeros(1)  # torchvision's aux head is dropped
    path = str(tmp_path / "inc.pth")
    torch.save(sd, path)
    loaded = load_inception(path, resize_to=75)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x).pool, net(x).pool)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items() if not k.startswith("AuxLogits"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_inception(str(tmp_path / "absent.pth"))
    del sd["Mixed_7c.branch_pool.conv.weight"]
    torch.save(sd, path)
    with pytest.raises(ValueError, match="Mixed_7c.branch_pool.conv.weight"):
        load_inception(path)


class _TinyFeatureNet(torch.nn.Module):
    """A random stand-in with Inception's interface (16-d features, 10 classes): the full
    metric path at a size whose 2048-d sqrtm would not take a minute on a CPU."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                        torch.nn.Flatten(), torch.nn.Linear(32, 16), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        pool = self.body(2 * x - 1)
        return InceptionOutput(pool, self.fc(pool), pool @ self.fc.weight.T)


def test_evaluate_end_to_end_with_random_networks(tmp_path):
    rng = np.random.default_rng(0)
    samples = (rng.random((24, 16, 16, 3)) * 255).astype(np.uint8)
    ref = (rng.random((30, 16, 16, 3)) * 160).astype(np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    net = _TinyFeatureNet().eval()
    args = ["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception", "unused",
            "--out", str(tmp_path / "m.json"), "--save-ref-stats", str(tmp_path / "stats.npz"), "--no-progress",
            "--splits", "2", "--device", "cpu"]  # compared with CPU features below
    m = E.main(args, net=net)
    fs, _ = E.extract(net, samples)
    fr, _ = E.extract(net, ref)
    from msar.metrics import frechet_distance_from_features
    assert m["fid"] == pytest.approx(frechet_distance_from_features(fs, fr), rel=1e-9) and m["fid"] > 0
    assert (m["precision"], m["recall"]) == pytest.approx(E.precision_recall(fr, fs))
    assert 1.0 <= m["inception_score"] <= 10 and json.load(open(tmp_path / "m.json"))["fid"] == m["fid"]
    # precomputed statistics as the reference give the same numbers
    m2 = E.main(args[:2] + ["--ref", str(tmp_path / "stats.npz")] + args[4:6] + ["--no-progress", "--splits", "2", "--device", "cpu"],
                net=net)
    assert m2["fid"] == pytest.approx(m["fid"]) and m2["precision"] == m["precision"]
    # a folder of PNGs is read like the npz; the same images -> FID 0, precision = recall = 1
    from PIL import Image
    (tmp_path / "png").mkdir()
    for i, im in enumerate(ref):
        Image.fromarray(im).save(tmp_path / "png" / f"{i:03d}.png")
    m3 = E.main(["--samples", str(tmp_path / "png"), "--ref", str(tmp_path / "ref.npz"), "--inception", "unused",
                 "--no-progress", "--splits", "2", "--device", "cpu"], net=net)
    assert m3["fid"] == pytest.approx(0, abs=1e-6) and m3["precision"] == m3["recall"] == 1.0
    with pytest.raises(ValueError, match="arr_0"):
        np.savez(tmp_path / "bad.npz", images=samples)
        E.load_images(str(tmp_path / "bad.npz"))
