"""Bad input gets a clear error naming what was wrong and what was expected -- never an
IndexError / RuntimeError / KeyError from deep inside torch, never a hang.

Hand-written cases cover the public entry points one by one (image tokenizer, transformer,
decode state, image checkpoints and pipelines, image folders, the ``msar`` CLI);
hypothesis then throws malformed inputs at the tokenizers, schedule parsing and
checkpoint loading, accepting only success or ValueError / TypeError / CheckpointError /
FileNotFoundError with a message.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings, strategies as st

from modalities.image import VQVAE, VQVAEConfig, load_var, read_state_dict, transformer_config
from modalities.image.checkpoint import CheckpointError as ImageCheckpointError
from modalities.image.data import ImageFolder
from modalities.image.pipeline import ImagePipeline
from msar import (MultiScaleResidualQuantizer, MultiScaleVQTokenizer, NextScaleTransformer, OperatorPyramid,
                  ScaleSchedule, TransformerConfig)
from msar.training import CheckpointError, load_checkpoint, load_latest, save_checkpoint

CLEAR = (ValueError, TypeError, CheckpointError, ImageCheckpointError, FileNotFoundError)
FILE_FUZZ = settings(suppress_health_check=list(HealthCheck))  # examples: the profile (conftest)


def clear_error(fn, *args, **kwargs):
    """Run ``fn``; a clear exception (with a message) is returned, anything else propagates."""
    try:
        return fn(*args, **kwargs)
    except CLEAR as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return e


# ---------------------------------------------------------------------------- tiny models
VQ_CFG = VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2),
                     share_quant_resi=2, using_sa=False, using_mid_sa=False)
SIDE = VQ_CFG.image_size  # 4 pixels: last scale 2 x downsample 2


@pytest.fixture(scope="module")
def vq() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQ_CFG).eval()


@pytest.fixture(scope="module")
def var() -> NextScaleTransformer:
    torch.manual_seed(0)
    return NextScaleTransformer(TransformerConfig(schedule=[(1, 1), (2, 2)], vocab_size=16, latent_dim=4,
                                                  num_classes=3, depth=1, embed_dim=32, num_heads=2)).eval()


@pytest.fixture(scope="module")
def pipeline_dir(vq, var, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pipe")
    ImagePipeline(vq, var).save_pretrained(d)
    return d


# ---------------------------------------------------------------------------- tensors and indices
def test_images_of_wrong_size_channels_dtype_or_batch(vq):
    x = torch.randn(2, 3, SIDE, SIDE)
    with pytest.raises(ValueError, match=r"expected shape \(B, 3, H, W\), got \(2, 1, 4, 4\)"):
        vq.encode(x[:, :1])
    with pytest.raises(ValueError, match=r"expected 4x4 pixels .* got 8x8"):
        vq.encode(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expected shape \(B, 3, H, W\), got \(3, 4, 4\)"):
        vq.encode(x[0])
    with pytest.raises(TypeError, match="float tensor.*int64"):
        vq.encode(x.long())
    with pytest.raises(TypeError, match="dtype torch.float64 but the tokenizer's weights are torch.float32"):
        vq.encode(x.double())
    with pytest.raises(ValueError, match="at least one sample"):
        vq.encode(x[:0])
    with pytest.raises(TypeError, match="float tensor.*list"):
        vq.encode([x])
    with pytest.raises(ValueError, match="images: on meta but the tokenizer is on cpu"):
        vq.encode(x.to("meta"))


def test_indices_of_wrong_dtype_shape_or_range(vq):
    idx = vq.encode(torch.randn(2, 3, SIDE, SIDE))
    with pytest.raises(TypeError, match=r"indices\[1\]: expected an integer tensor \(int64 or int32\), got dtype torch.uint8"):
        vq.decode([idx[0], idx[1].to(torch.uint8)])
    with pytest.raises(ValueError, match=r"token index out of range \[0, 16\)"):
        vq.teacher_forcing_input([idx[0], idx[1] - 100])
    with pytest.raises(ValueError, match=r"indices\[1\]: expected shape \(B, 4\)"):
        vq.decode([idx[0], idx[1][:, :3]])
    st_ = vq.start(2, "cpu")
    with pytest.raises(ValueError, match=r"scale 0: token index out of range \[0, 16\).*max 16"):
        st_.add_scale(0, torch.full((2, 1), 16))
    with pytest.raises(TypeError, match="scale 0: expected integer indices"):
        st_.add_scale(0, torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"scale 0: expected probs of shape \(2, 1, 16\)"):
        st_.add_scale(0, idx[0], probs=torch.rand(2, 1, 15))
    with pytest.raises(ValueError, match="batch_size"):
        vq.start(-1, "cpu")


def test_transformer_labels_and_input(var, vq):
    idx = vq.encode(torch.randn(2, 3, SIDE, SIDE))
    x = vq.teacher_forcing_input(idx)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, num_classes - 1\] = \[0, 2\].*max 9"):
        var(torch.tensor([0, 9]), x)
    with pytest.raises(ValueError, match=r"labels: expected a 1-D integer tensor \(B,\), got shape \(2,\) dtype torch.float32"):
        var(torch.tensor([0.0, 1.0]), x)
    with pytest.raises(ValueError, match=r"teacher-forcing input: expected shape \(2, 4, 4\)"):
        var(torch.tensor([0, 1]), x[..., :3])


@pytest.mark.parametrize("kw, msg", [
    (dict(top_k=-1), r"top_k must be an int >= 0"), (dict(top_k=2.5), r"top_k must be an int >= 0"),
    (dict(top_p=1.5), r"top_p must be in \[0, 1\]"), (dict(cfg=float("nan")), r"cfg must be a finite number"),
    (dict(temperature=0.0), r"temperature must be > 0"), (dict(labels=None, batch_size=-2), r"batch_size must be"),
    (dict(labels=[0, 4]), r"class labels must lie in \[0, num_classes - 1\] = \[0, 2\]"),
    (dict(labels=[0, 3]), r"the null class \(3\) is used only for guidance / dropout"),
])
def test_sampling_knobs(var, vq, kw, msg):
    from msar import sample
    kw.setdefault("labels", [0, 1])
    with pytest.raises(ValueError, match=msg):
        sample(var, vq, **kw)


# ---------------------------------------------------------------------------- checkpoints of the wrong kind
def test_checkpoint_of_another_preset_or_schedule(tmp_path):
    small = dict(depth=1, embed_dim=32, num_heads=2, vocab_size=16, latent_dim=4, num_classes=3)
    torch.save(NextScaleTransformer(transformer_config("var-d16", **small)).state_dict(), tmp_path / "var_d16.pth")
    assert isinstance(load_var(tmp_path / "var_d16.pth", **small), NextScaleTransformer)
    # var-d36 uses the 512 px schedule and a shared AdaLN: another model entirely
    with pytest.raises(ImageCheckpointError, match="does not match the model|has shape"):
        load_var(tmp_path / "var_d16.pth", preset="var-d36", **small)
    with pytest.raises(ImageCheckpointError, match=r"'pos_embed' has shape \(1, 680, 32\).*expects \(1, 5, 32\)"
                                                   r".*wrong preset or scale schedule"):
        load_var(tmp_path / "var_d16.pth", schedule=[(1, 1), (2, 2)], **small)
    shutil.copy(tmp_path / "var_d16.pth", tmp_path / "weights.pth")
    with pytest.raises(ImageCheckpointError, match="cannot tell the preset.*pass preset="):
        load_var(tmp_path / "weights.pth")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_var(tmp_path / "var_d20.pth")


def test_resuming_a_training_checkpoint_of_another_schedule(tmp_path, var):
    save_checkpoint(tmp_path, 3, {"model": var})
    other = NextScaleTransformer(TransformerConfig(schedule=[(1, 1), (3, 3)], vocab_size=16, latent_dim=4,
                                                   num_classes=3, depth=1, embed_dim=32, num_heads=2))
    with pytest.raises(CheckpointError, match=r"(?s)step_000003: the weights of .model. do not fit the model .*pos_embed"):
        load_latest(tmp_path, models={"model": other})


def test_image_pipeline_load_refuses_other_checkpoints(pipeline_dir, tmp_path, var):
    # a training checkpoint directory, or one of its step directories, is not a pipeline
    save_checkpoint(tmp_path / "ck", 1, {"model": var})
    for d in (tmp_path / "ck", tmp_path / "ck" / "step_000001"):
        with pytest.raises(ValueError, match="no config.json; not a folder written by save_pretrained"):
            ImagePipeline.from_pretrained(d)
    # a transformer config that does not fit its weights (another schedule), or damaged configs
    other = tmp_path / "other"
    shutil.copytree(pipeline_dir, other)
    cfg_path = other / "transformer" / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta["config"]["schedule"] = [[1, 1], [3, 3]]
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model.safetensors does not match .*shape mismatch: pos"):
        ImagePipeline.from_pretrained(other)
    (other / "tokenizer" / "config.json").write_text(json.dumps({**meta, "config": {"bogus": 1}}))
    with pytest.raises(ValueError, match=r"tokenizer.config.json: cannot build a NextScaleTransformer.*bogus"):
        ImagePipeline.from_pretrained(other)
    (other / "config.json").write_text('{"format": "msar", "forma')
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        ImagePipeline.from_pretrained(other)


def test_image_folder_empty_or_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found.*missing"):
        ImageFolder(str(tmp_path / "missing"), size=8)
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    (tmp_path / "empty" / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images .* found under .*empty"):
        ImageFolder(str(tmp_path / "empty"), size=8)
    from PIL import Image
    good = tmp_path / "data" / "cats"
    good.mkdir(parents=True)
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(good / "a.png")
    (good / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    ds = ImageFolder(str(tmp_path / "data"), size=8)
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"cannot read image .*b\.png"):
        ds[1]


@pytest.mark.parametrize("argv", [["demo", "--bogus"], ["sample", "--model", "x", "--bogus"],
                                  ["train-vqvae", "--data", "d", "--bogus"], ["parity", "f", "--bogus"]])
def test_cli_unknown_option_exits_2_with_argparse_message(argv, capsys):
    from modalities.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error: unrecognized arguments: --bogus" in err


def test_cli_unknown_command(capsys):
    from modalities.cli import main
    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- hypothesis: tokenizers
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.uint8, torch.bool, torch.complex64]


@st.composite
def junk_tensors(draw, near: tuple[int, ...], lo: float = -3.0, hi: float = 3.0) -> torch.Tensor:
    """Tensors around the shape ``near``: its rank +-1, sides perturbed (0 included), any dtype,
    values in [lo, hi] with NaN / inf sprinkled in."""
    shape = list(near)
    if draw(st.booleans()):
        rank = draw(st.integers(0, len(near) + 1))
        shape = draw(st.lists(st.integers(0, 5), min_size=rank, max_size=rank))
    elif draw(st.booleans()) and shape:
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = draw(st.integers(0, 6))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo
    special = draw(st.sampled_from([None, float("nan"), float("inf"), -float("inf")]))
    if special is not None and x.numel():
        x.view(-1)[0] = special
    if dtype.is_floating_point or dtype.is_complex:
        return x.to(dtype)
    return torch.nan_to_num(x, nan=0.0, posinf=hi, neginf=lo).round().to(dtype)


@st.composite
def junk_indices(draw, counts: list[int], vocab: int):
    n = draw(st.sampled_from([len(counts)] * 3 + [0, len(counts) - 1, len(counts) + 1]))
    B = draw(st.integers(0, 3))
    out = []
    for k in range(n):
        kind = draw(st.sampled_from(["tensor"] * 4 + ["list", "none", "int"]))
        if kind == "tensor":
            out.append(draw(junk_tensors((B, counts[k % len(counts)]), -2, vocab + 2)))
        else:
            out.append({"list": [0] * 3, "none": None, "int": 3}[kind])
    return draw(st.sampled_from([out, tuple(out)]))


@given(junk_tensors((2, 3, SIDE, SIDE)))
def test_image_tokenizer_encode_never_crashes(vq, x):
    out = clear_error(vq.encode, x)
    if not isinstance(out, Exception):
        assert len(out) == 2 and all(t.dtype == torch.long and t.shape == (x.shape[0], n)
                                     for t, n in zip(out, (1, 4)))


@given(junk_indices([1, 4], 16), st.sampled_from(["decode", "teacher_forcing_input", "decode_progression"]))
def test_image_tokenizer_decode_never_crashes(vq, idx, method):
    out = clear_error(getattr(vq, method), idx)
    if not isinstance(out, Exception) and method == "teacher_forcing_input":
        assert out.shape == (idx[0].shape[0], 4, 4)


def _core_tokenizer(pyramid) -> MultiScaleVQTokenizer:
    torch.manual_seed(0)
    q = MultiScaleResidualQuantizer(8, 3, pyramid, phi_ratio=0.5)
    return MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), q)


CORE = {"grid3d": _core_tokenizer([(1, 1, 1), (2, 2, 2)]),
        "tokens": _core_tokenizer(OperatorPyramid.from_assignments(
            [2, 5], [torch.tensor([0, 0, 1, 1, 1]), torch.arange(5)]))}


@given(st.sampled_from(sorted(CORE)), st.data())
def test_core_tokenizer_never_crashes(name, data):
    """The shared quantizer path of every adapter: latents in, indices in, decode state."""
    tok = CORE[name]
    full = tok.schedule.shape(-1)
    f = data.draw(junk_tensors((2, 3, *full)))
    out = clear_error(tok.encode, f)
    if not isinstance(out, Exception):
        assert [t.shape[1] for t in out] == tok.schedule.token_counts
    idx = data.draw(junk_indices(tok.schedule.token_counts, 8))
    clear_error(tok.decode, idx)
    clear_error(tok.teacher_forcing_input, idx)
    st_ = tok.start(2, "cpu")
    for k, t in enumerate(idx[:2]):
        if isinstance(clear_error(st_.add_scale, k, t), Exception):
            break


# ---------------------------------------------------------------------------- hypothesis: schedules
scalars = st.one_of(st.integers(-3, 40), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.booleans(),
                    st.none(), st.text(max_size=3), st.just(np.int64(3)), st.just(np.float32(2.0)),
                    st.just(torch.tensor(2)), st.just(torch.tensor(2.5)), st.just(torch.tensor([2, 2])))
nested = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.lists(inner, max_size=4).map(tuple),
                                                       st.dictionaries(st.text(max_size=2), inner, max_size=2)),
                      max_leaves=12)


@given(nested)
def test_schedule_parsing_of_junk(spec):
    s = clear_error(ScaleSchedule, spec)
    if isinstance(s, Exception):
        return
    # accepted: a well-formed schedule that round-trips and whose sides are the given integers
    assert len(s) > 0 and s.L == sum(s.token_counts) and all(n > 0 for n in s.token_counts)
    assert ScaleSchedule(s.to_config()) == s
    for given_scale, parsed in zip(spec, s.scales):
        flat = [given_scale] if isinstance(parsed, int) else list(given_scale)
        assert [int(v) for v in flat] == ([parsed] if isinstance(parsed, int) else list(parsed))
        # v == int(v), not float(v) == int(v): a large int such as 2**53 + 1 is exact, its float is not
        assert all(v == int(v) for v in flat), f"non-integer side {given_scale!r} accepted"


# ---------------------------------------------------------------------------- hypothesis: checkpoint files
@pytest.fixture(scope="module")
def real_files(vq, var, tmp_path_factory) -> dict[str, bytes]:
    """Bytes of a real training checkpoint and of real weight files, to damage."""
    d = tmp_path_factory.mktemp("real")
    ck = save_checkpoint(d / "ck", 5, {"model": var}, optimizer=torch.optim.AdamW(var.parameters()),
                         extra={"pos": 3})
    torch.save(vq.state_dict(), d / "vae.pth")
    from safetensors.torch import save_file
    save_file(var.state_dict(), d / "var.safetensors")
    files = {f"ck/{p.name}": p.read_bytes() for p in ck.iterdir()}
    files["vae.pth"] = (d / "vae.pth").read_bytes()
    files["var.safetensors"] = (d / "var.safetensors").read_bytes()
    return files


@st.composite
def damage(draw, data: bytes) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "random", "splice"]))
    if how == "truncate":
        return data[:draw(st.integers(0, max(0, len(data) - 1)))]
    if how == "random":
        return draw(st.binary(max_size=200))
    if how == "splice":  # random bytes written over a stretch
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=64)) + data[i + 64:]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(out) - 1))
        out[i] ^= draw(st.integers(1, 255))
    return bytes(out)


def _write_checkpoint(root: Path, files: dict[str, bytes], name: str, payload: bytes, fix_manifest: bool) -> Path:
    """A copy of the real checkpoint with ``name`` replaced by ``payload``; with ``fix_manifest``
    the manifest's size and checksum are updated too (a forged or bit-rotted-and-rehashed
    file), so the loader itself has to cope with the content."""
    step = root / "step_000005"
    step.mkdir(parents=True)
    for fname, data in files.items():
        if fname.startswith("ck/"):
            (step / fname[3:]).write_bytes(data)
    (step / name).write_bytes(payload)
    if fix_manifest and name != "manifest.json":
        import hashlib
        man = json.loads((step / "manifest.json").read_text())
        man["files"][name] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
        (step / "manifest.json").write_text(json.dumps(man))
    return step


@FILE_FUZZ
@given(st.sampled_from(["manifest.json", "state.pt", "model.model.safetensors"]), st.booleans(), st.data())
def test_training_checkpoint_damage_is_reported_with_its_path(real_files, name, fix_manifest, data):
    payload = data.draw(damage(real_files[f"ck/{name}"]))
    with tempfile.TemporaryDirectory() as tmp:
        step = _write_checkpoint(Path(tmp), real_files, name, payload, fix_manifest)
        try:
            ck = load_checkpoint(step)
        except CheckpointError as e:
            assert str(step) in str(e) and e.path is not None and str(e.path).startswith(str(step))
        else:  # undamaged where it matters (or re-hashed tensor bytes): a well-formed checkpoint
            assert all(isinstance(v, torch.Tensor) for sd in ck.model_states.values() for v in sd.values())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clear_error(load_latest, tmp)


@FILE_FUZZ
@given(st.data())
def test_manifest_junk_is_a_checkpoint_error(real_files, data):
    man = json.loads(real_files["ck/manifest.json"])
    key = data.draw(st.sampled_from(["files", "models", "step", "format_version", "state"]))
    junk = data.draw(st.recursive(st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=8), st.booleans()),
                                  lambda i: st.one_of(st.lists(i, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), i, max_size=3)),
                                  max_leaves=6))
    if key == "state":  # a listed file name that tries to leave the directory, or odd entries
        man["files"][data.draw(st.sampled_from(["../state.pt", "/etc/passwd", "state.pt"]))] = junk
    else:
        man[key] = junk
    payload = json.dumps(man).encode()
    with tempfile.TemporaryDirectory() as tmp:
        step = _write_checkpoint(Path(tmp), real_files, "manifest.json", payload, False)
        try:
            load_checkpoint(step)
        except CheckpointError as e:
            assert "manifest.json" in str(e) or str(step) in str(e)


@FILE_FUZZ
@given(st.sampled_from(["vae.pth", "var.safetensors"]), st.data())
def test_weight_file_damage_is_a_clear_error(real_files, name, data):
    payload = data.draw(damage(real_files[name]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(payload)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = clear_error(read_state_dict, path)
        if isinstance(out, Exception):
            assert isinstance(out, ImageCheckpointError) and str(path) in str(out)
        else:
            assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items())


@FILE_FUZZ
@given(st.sampled_from(["config.json", "tokenizer/config.json", "tokenizer/model.safetensors",
                        "transformer/config.json", "transformer/model.safetensors"]), st.data())
def test_damaged_image_pipeline_is_a_clear_error(pipeline_dir, name, data):
    payload = data.draw(damage((pipeline_dir / name).read_bytes()))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "pipe"
        shutil.copytree(pipeline_dir, d)
        (d / name).write_bytes(payload)
        out = clear_error(ImagePipeline.from_pretrained, d)
        if isinstance(out, Exception):
            assert name.split("/")[0] in str(out)
