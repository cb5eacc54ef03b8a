"""save_pretrained / from_pretrained: one format (config.json + model.safetensors) for every component.

Each test names the bug it catches."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sys

import networkx as nx
import pytest
import torch
from safetensors.torch import load_file, save_file

import msar
from modalities.graph import GraphPyramidTokenizer
from modalities.image.pipeline import ImagePipeline
from modalities.image.vqvae import VQVAE, VQVAEConfig
from modalities.video.data import MovingDigits
from modalities.video.schedules import FrameScaleSchedule
from modalities.video.tokenizer import VideoTokenizer, VideoTokenizerConfig
from modalities.voxel.tokenizer import VoxelTokenizer, build_voxel_tokenizer
from msar import NextScaleTransformer, Pipeline, PretrainedError, ScaleSchedule, TransformerConfig


class DyadicSchedule(ScaleSchedule):
    """A user-defined schedule type: 1D token counts doubling from 1 (its constructor takes a count)."""

    def __init__(self, num_scales):
        if isinstance(num_scales, ScaleSchedule):
            num_scales = num_scales.num_scales
        super().__init__([2 ** k for k in range(num_scales)])

    def to_dict(self) -> dict:
        return {**super().to_dict(), "num_scales": self.num_scales}

    @classmethod
    def _from_dict(cls, d: dict) -> "DyadicSchedule":
        return cls(d["num_scales"])


# ---------------------------------------------------------------------------- tiny components
def tiny_vqvae() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2),
                             share_quant_resi=2, using_sa=False, using_mid_sa=False))


def tiny_video_tokenizer(schedule: str = "frame") -> VideoTokenizer:
    torch.manual_seed(0)
    return VideoTokenizer(VideoTokenizerConfig(frames=5, height=16, width=16, channels=(4, 8, 8), latent_dim=8,
                                               vocab_size=32, time_stride=2, space_stride=4, schedule=schedule))


def tiny_voxel_tokenizer() -> VoxelTokenizer:
    torch.manual_seed(0)
    return build_voxel_tokenizer(resolution=8, latent_side=4, vocab_size=16, latent_dim=4, width=4, max_width=8)


def tiny_transformer(schedule, vocab_size: int = 32, latent_dim: int = 8, num_classes: int = 3) -> NextScaleTransformer:
    torch.manual_seed(1)
    return NextScaleTransformer(TransformerConfig(schedule=schedule, vocab_size=vocab_size, latent_dim=latent_dim,
                                                  num_classes=num_classes, depth=1, embed_dim=16, num_heads=2))


def with_usage(tok):
    """Give the quantizer usage statistics that differ from a fresh one's."""
    q = tok.quantizer
    for s in range(3):
        q.record_usage(torch.rand(q.usage_ema.shape, generator=torch.Generator().manual_seed(s)))
    return tok


def videos(n: int = 2) -> torch.Tensor:
    return MovingDigits(n, num_frames=5, size=16, digit_size=8, max_speed=2, seed=0).tensors()[0]


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def files_under(d) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("make,data", [
    (tiny_vqvae, lambda: torch.rand(2, 3, 4, 4) * 2 - 1),
    (tiny_video_tokenizer, lambda: videos()),
    (tiny_voxel_tokenizer, lambda: (torch.rand(2, 8, 8, 8) > 0.7).float()),
])
def test_tokenizer_round_trip_is_bit_identical_and_keeps_usage_statistics(tmp_path, make, data):
    """Catches: weights or a state buffer (the quantizer's usage_ema / usage_steps) left out of
    the file, a config field lost or changed on the way through JSON (a tuple that comes back a
    list and breaks an equality), a loaded model left in training mode."""
    tok = with_usage(make()).eval()
    tok.save_pretrained(tmp_path / "tok")
    back = type(tok).from_pretrained(tmp_path / "tok")
    assert type(back) is type(tok) and not back.training
    assert back.config == tok.config
    assert same_state(tok, back)
    assert int(back.quantizer.usage_steps) == 3 and torch.equal(back.quantizer.usage_ema, tok.quantizer.usage_ema)
    x = data()
    idx, idx2 = tok.encode(x), back.encode(x)
    assert all(torch.equal(a, b) for a, b in zip(idx, idx2))
    assert torch.equal(tok.decode(idx), back.decode(idx2))
    assert type(msar.from_pretrained(tmp_path / "tok")) is type(tok)  # the class comes from config.json


def test_video_tokenizer_keeps_its_frame_schedule(tmp_path):
    """Catches: a per-frame schedule rebuilt as a plain ScaleSchedule (frame_of gone)."""
    tok = tiny_video_tokenizer("frame")
    tok.save_pretrained(tmp_path)
    back = VideoTokenizer.from_pretrained(tmp_path)
    assert isinstance(back.schedule, FrameScaleSchedule) and back.schedule.frame_of == tok.schedule.frame_of


def test_graph_tokenizer_round_trip(tmp_path):
    """Catches: a weightless component that insists on model.safetensors, or a config entry lost."""
    graphs = [nx.cycle_graph(5), nx.path_graph(4), nx.star_graph(3)]
    tok = GraphPyramidTokenizer.fit(graphs, edge_chunks=2)
    tok.save_pretrained(tmp_path)
    assert files_under(tmp_path) == ["config.json"]
    back = msar.from_pretrained(tmp_path)
    assert isinstance(back, GraphPyramidTokenizer) and back.config == tok.config
    assert back.schedule == tok.schedule
    assert all(torch.equal(a, b) for a, b in zip(tok.encode(graphs), back.encode(graphs)))


def test_transformer_round_trip_with_a_custom_schedule_type(tmp_path):
    """Catches: TransformerConfig.schedule saved as a bare list (the user's schedule type lost), and
    logits that differ after reload."""
    model = tiny_transformer(DyadicSchedule(3), vocab_size=8, latent_dim=4)
    model.save_pretrained(tmp_path)
    back = NextScaleTransformer.from_pretrained(tmp_path)
    assert type(back.schedule) is DyadicSchedule and type(back.config.schedule) is DyadicSchedule
    assert back.schedule == model.schedule
    assert same_state(model, back)
    model.eval()
    labels, x = torch.tensor([0, 2]), torch.randn(2, model.seq_len - model.first_len, 4)
    with torch.no_grad():
        assert torch.equal(model(labels, x), back(labels, x))


def test_a_schedule_type_that_cannot_be_rebuilt_fails_at_saving(tmp_path):
    """Catches: a schedule subclass with its own constructor but no to_dict / _from_dict, saved
    without complaint and impossible to load."""

    class Ones(ScaleSchedule):
        def __init__(self, n: int):
            super().__init__([1] * n)

    model = tiny_transformer(Ones(3), vocab_size=8, latent_dim=4)
    with pytest.raises(TypeError, match="config field schedule: cannot rebuild a Ones .*override to_dict / _from_dict"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_pipeline_with_a_per_frame_schedule_samples_identically_after_reload(tmp_path):
    """Catches: a pipeline whose reloaded parts differ in any way that reaches sampling (weights,
    schedule type, the tokenizer's decode path); and a loader that moves the global RNG."""
    tok = tiny_video_tokenizer("frame")
    model = tiny_transformer(tok.schedule)
    pipe = Pipeline(tok, model)
    pipe.save_pretrained(tmp_path / "pipe")
    assert files_under(tmp_path / "pipe") == ["config.json", "tokenizer/config.json", "tokenizer/model.safetensors",
                                              "transformer/config.json", "transformer/model.safetensors"]
    rng = torch.get_rng_state()
    back = msar.from_pretrained(tmp_path / "pipe")
    assert torch.equal(rng, torch.get_rng_state())
    assert type(back) is Pipeline and isinstance(back.transformer.schedule, FrameScaleSchedule)
    kw = dict(cfg=2.0, top_k=8, top_p=0.9, seed=3)
    a, b = pipe.sample([0, 1, 2], **kw), back.sample([0, 1, 2], **kw)
    assert torch.equal(a.data, b.data) and all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))


def test_image_pipeline_round_trip(tmp_path):
    """Catches: ImagePipeline saved in a layout of its own, or loaded as a plain Pipeline (no edit)."""
    vq = tiny_vqvae()
    pipe = ImagePipeline(vq, tiny_transformer(vq.schedule.to_config(), vocab_size=16, latent_dim=4))
    pipe.save_pretrained(tmp_path)
    back = msar.from_pretrained(tmp_path)
    assert type(back) is ImagePipeline and back.vqvae is back.tokenizer
    assert torch.equal(pipe.sample([0, 1], top_k=4, seed=0), back.sample([0, 1], top_k=4, seed=0))


def test_state_dict_override_saves_other_weights(tmp_path):
    """Catches: save_pretrained(state_dict=...) ignored (e.g. EMA weights exported as the raw ones)."""
    model = tiny_transformer([1, 2], vocab_size=8, latent_dim=4)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=ema)
    back = NextScaleTransformer.from_pretrained(tmp_path)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ema.items())
    # weights that would not load again (a wrapper's prefix) are refused before anything is written
    with pytest.raises(PretrainedError, match=r"state_dict does not fit the NextScaleTransformer: missing keys: "
                                              r"start_pos.*unexpected keys: module.start_pos"):
        model.save_pretrained(tmp_path / "m2", state_dict={"module." + k: v for k, v in ema.items()})
    assert not (tmp_path / "m2").exists()


# ---------------------------------------------------------------------------- no pickle
def test_saved_folders_hold_json_and_safetensors_only_and_load_without_unpickling(tmp_path, monkeypatch):
    """Catches: a torch.save / pickle anywhere in saving or loading."""
    tok = tiny_video_tokenizer("space")
    Pipeline(tok, tiny_transformer(tok.schedule)).save_pretrained(tmp_path)
    for f in files_under(tmp_path):
        path = tmp_path / f
        if f.endswith(".json"):
            json.loads(path.read_text())
        else:
            assert f.endswith(".safetensors"), f
            load_file(path)
            assert not path.read_bytes().startswith(b"PK") and b"\x80\x02" not in path.read_bytes()[:16]

    def refuse(*a, **k):
        raise AssertionError("unpickling during from_pretrained")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    msar.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- bad folders
@pytest.fixture()
def saved(tmp_path):
    model = tiny_transformer([1, 2], vocab_size=8, latent_dim=4)
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_typed_schedule_dicts():
    """Catches: a plain schedule that does not survive to_dict / from_dict (ints and grids), and a
    malformed dict that surfaces as a KeyError."""
    for s in (ScaleSchedule([1, 3, 8]), ScaleSchedule([(1, 1), (2, 3)]), ScaleSchedule.square([1, 2], rank=3)):
        back = ScaleSchedule.from_dict(json.loads(json.dumps(s.to_dict())))
        assert type(back) is ScaleSchedule and back == s
    with pytest.raises(ValueError, match="a dict with a 'type' key"):
        ScaleSchedule.from_dict({"scales": [1, 2]})
    with pytest.raises(ValueError, match="unknown schedule type 'nowhere.Sched'"):
        ScaleSchedule.from_dict({"type": "nowhere.Sched", "scales": [1]})


def test_a_missing_dependency_names_the_extra(tmp_path, saved, monkeypatch):
    """Catches: a bare ImportError when a modality's dependency is not installed."""
    import builtins

    real_import = builtins.__import__

    def no_networkx(name, *a, **k):
        if name == "networkx" or name.startswith("networkx."):
            raise ImportError("No module named 'networkx'")
        return real_import(name, *a, **k)

    name = "modalities.graph.tokenizer.GraphPyramidTokenizer"
    edit_config(saved, **{"class": name})
    for mod in [m for m in sys.modules if m.startswith("modalities.graph")]:  # as if never imported
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.delitem(msar.pretrained.REGISTRY, name)
    monkeypatch.setattr(builtins, "__import__", no_networkx)
    with pytest.raises(PretrainedError, match=r"No module named 'networkx' \(install .*msar\[graph\]"):
        msar.from_pretrained(saved)


def test_missing_folder_or_config(tmp_path, saved):
    """Catches: a bare KeyError / FileNotFoundError that does not say what a saved folder is."""
    with pytest.raises(PretrainedError, match="nope: not a directory"):
        msar.from_pretrained(tmp_path / "nope")
    os.remove(saved / "config.json")
    with pytest.raises(PretrainedError, match=r"no config.json; not a folder written by save_pretrained.*model.safetensors"):
        msar.from_pretrained(saved)


@pytest.mark.parametrize("old", ["pipeline.json", "var.json", "tokenizer.json", "transformer.pt", "vqvae.json"])
def test_earlier_formats_name_the_converter(tmp_path, old):
    """Catches: old files met with a generic 'not found' instead of how to convert them."""
    (tmp_path / old).write_text("{}")
    with pytest.raises(PretrainedError, match=f"{old}.*earlier format.*python -m modalities.convert"):
        msar.from_pretrained(tmp_path)


def test_old_video_tokenizer_file_names_the_converter(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "tok.safetensors")
    (tmp_path / "tok.safetensors.json").write_text("{}")
    with pytest.raises(PretrainedError, match="VideoTokenizer.save.*python -m modalities.convert"):
        msar.from_pretrained(tmp_path / "tok.safetensors")


def edit_config(folder, **changes):
    meta = json.loads((folder / "config.json").read_text())
    meta.update(changes)
    (folder / "config.json").write_text(json.dumps(meta))
    return meta


def test_config_errors_are_named(saved):
    """Catches: unknown classes, other classes, bad JSON, newer versions and unknown config fields
    that surface as tracebacks from deep inside the loader."""
    meta = json.loads((saved / "config.json").read_text())
    edit_config(saved, **{"class": "somewhere.Else"})
    with pytest.raises(PretrainedError, match="unknown class 'somewhere.Else': import the module"):
        msar.from_pretrained(saved)
    edit_config(saved, **{"class": "msar.no_such_module.Model"})
    with pytest.raises(PretrainedError, match="unknown class 'msar.no_such_module.Model'"):
        msar.from_pretrained(saved)
    edit_config(saved, **{"class": meta["class"]})
    with pytest.raises(PretrainedError, match="holds NextScaleTransformer.*not VideoTokenizer"):
        VideoTokenizer.from_pretrained(saved)
    edit_config(saved, format_version=99)
    with pytest.raises(PretrainedError, match="format_version 99.*newer"):
        msar.from_pretrained(saved)
    edit_config(saved, format_version=1, config={**meta["config"], "depht": 3})
    with pytest.raises(PretrainedError, match=r"cannot build a NextScaleTransformer.*no field\(s\) \['depht'\]"):
        msar.from_pretrained(saved)
    (saved / "config.json").write_text('{"class": "msar.')
    with pytest.raises(PretrainedError, match="config.json: not valid JSON"):
        msar.from_pretrained(saved)


def test_weights_that_do_not_fit_the_config_name_the_keys(saved):
    """Catches: load_state_dict's wall of text (or a silent partial load) instead of the keys."""
    sd = load_file(saved / "model.safetensors")
    sd["head.weight_renamed"] = sd.pop("head.weight")
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(PretrainedError, match=r"model.safetensors does not match .*missing keys: head.weight; "
                                              r"unexpected keys: head.weight_renamed"):
        msar.from_pretrained(saved)
    meta = json.loads((saved / "config.json").read_text())
    edit_config(saved, config={**meta["config"], "vocab_size": 9})
    sd["head.weight"] = sd.pop("head.weight_renamed")
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(PretrainedError, match=r"shape mismatch: head.weight: saved \(8, 16\), model \(9, 16\)"):
        msar.from_pretrained(saved)


def test_missing_or_truncated_weights(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PretrainedError, match="model.safetensors: cannot read"):
        msar.from_pretrained(saved)
    os.remove(saved / "model.safetensors")
    with pytest.raises(PretrainedError, match="weights missing"):
        msar.from_pretrained(saved)


def test_pipeline_errors_name_the_component(tmp_path):
    """Catches: a broken sub-folder reported without saying which component, and component paths
    that escape the pipeline folder."""
    tok = tiny_video_tokenizer("space")
    Pipeline(tok, tiny_transformer(tok.schedule)).save_pretrained(tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / "transformer")
    with pytest.raises(PretrainedError, match=r"p.transformer: not a directory"):
        msar.from_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "config.json").read_text())
    edit_config(tmp_path / "p", components={**meta["components"], "transformer": "../elsewhere"})
    with pytest.raises(PretrainedError, match="must be a sub-folder name"):
        msar.from_pretrained(tmp_path / "p")


def test_unsavable_config_fails_before_writing(tmp_path):
    """Catches: a config that JSON cannot hold, discovered after the weights were written."""
    model = tiny_transformer([1, 2], vocab_size=8, latent_dim=4)
    model.config.schedule = object()
    with pytest.raises(TypeError, match="config field schedule: a object is not JSON-serialisable"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_user_component_registers_itself(tmp_path):
    """Catches: a registry that only knows msar's own classes."""

    class Scaler(msar.PretrainedMixin, torch.nn.Module):
        def __init__(self, dim: int, name: str = "s"):
            super().__init__()
            self.config = {"dim": dim, "name": name}
            self.w = torch.nn.Parameter(torch.randn(dim))
            self.register_buffer("count", torch.zeros((), dtype=torch.long))

    s = Scaler(3, name="x")
    s.count += 5
    s.save_pretrained(tmp_path)
    back = msar.from_pretrained(tmp_path)
    assert type(back) is Scaler and back.config == {"dim": 3, "name": "x"} and same_state(s, back)


# ---------------------------------------------------------------------------- converting earlier files
def old_tokenizer_sd(tok) -> dict:
    """The state dict as earlier versions saved it: ``quantize.*``, ``ema_vocab_hit_SV``, no step count."""
    out = {}
    for k, v in tok.state_dict().items():
        if k == "quantizer.usage_steps":
            continue
        k = "quantize.ema_vocab_hit_SV" if k == "quantizer.usage_ema" else k
        out["quantize." + k[len("quantizer."):] if k.startswith("quantizer.") else k] = v.contiguous()
    return out


def old_transformer_sd(model) -> dict:
    from modalities.image.checkpoint import transformer_key_to_var
    return {transformer_key_to_var(k): v.contiguous() for k, v in model.state_dict().items()}


def old_transformer_config(model) -> dict:
    c = msar.pretrained.config_to_dict(model.config)
    c["schedule"] = model.schedule.to_config()
    return {k: v for k, v in c.items() if not k.startswith("init_")}  # fields earlier versions did not have


def same_but_usage_steps(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if not k.endswith("usage_steps"))


def test_convert_an_earlier_image_pipeline_and_imagenet_output(tmp_path):
    """Catches: a converter that leaves an old key name (quantize.*, pos_1LC, ema_vocab_hit_SV) or
    a config field behind, or that loads the old files into differently shaped models."""
    from modalities.convert import convert

    vq = with_usage(tiny_vqvae())
    tr = tiny_transformer(vq.schedule.to_config(), vocab_size=16, latent_dim=4)
    old = tmp_path / "old"
    old.mkdir()
    save_file(old_tokenizer_sd(vq), old / "vqvae.safetensors")
    save_file(old_transformer_sd(tr), old / "transformer.safetensors")
    (old / "pipeline.json").write_text(json.dumps({"format": "msar-image-pipeline", "vqvae": vq.cfg.to_dict(),
                                                   "transformer": old_transformer_config(tr)}))
    with pytest.raises(PretrainedError, match="python -m modalities.convert"):
        msar.from_pretrained(old)
    convert(old, tmp_path / "new")
    pipe = msar.from_pretrained(tmp_path / "new")
    assert type(pipe) is ImagePipeline and same_state(pipe.transformer, tr)
    assert same_but_usage_steps(pipe.vqvae, vq) and torch.equal(pipe.vqvae.quantizer.usage_ema, vq.quantizer.usage_ema)
    ref = ImagePipeline(vq, tr).sample([0, 1], top_k=4, seed=0)
    assert torch.equal(pipe.sample([0, 1], top_k=4, seed=0), ref)
    # ImageNet: var.json + var.safetensors, the VQ-VAE beside it
    run = tmp_path / "run"
    run.mkdir()
    save_file(old_transformer_sd(tr), run / "var.safetensors")
    shutil.copy(old / "vqvae.safetensors", run / "vqvae.safetensors")
    (run / "var.json").write_text(json.dumps({"format": "msar-imagenet-var", "preset": "tiny", "num_classes": 3,
                                              "transformer": old_transformer_config(tr), "vqvae": vq.cfg.to_dict()}))
    convert(run, tmp_path / "run_new")
    assert torch.equal(ImagePipeline.from_pretrained(tmp_path / "run_new").sample([0, 1], top_k=4, seed=0), ref)
    # train_vqvae: vqvae.json + vqvae.safetensors
    (old / "vqvae.json").write_text(json.dumps(vq.cfg.to_dict()))
    (old / "pipeline.json").unlink()
    convert(old, tmp_path / "vq_new")
    assert same_but_usage_steps(VQVAE.from_pretrained(tmp_path / "vq_new"), vq)


def test_convert_an_earlier_video_demo_output(tmp_path):
    """Catches: the video tokenizer's .json config or the per-frame schedule type lost in conversion."""
    from modalities.convert import convert

    tok = with_usage(tiny_video_tokenizer("frame"))
    model = tiny_transformer(tok.schedule)
    old = tmp_path / "old"
    old.mkdir()
    save_file(old_tokenizer_sd(tok), old / "tokenizer.safetensors")
    cfg = msar.pretrained.config_to_dict(tok.config)
    (old / "tokenizer.safetensors.json").write_text(json.dumps(cfg))
    torch.save({"config": old_transformer_config(model), "state_dict": old_transformer_sd(model)}, old / "transformer.pt")
    convert(old / "tokenizer.safetensors", tmp_path / "tok")  # the tokenizer file alone
    assert same_but_usage_steps(VideoTokenizer.from_pretrained(tmp_path / "tok"), tok)
    convert(old, tmp_path / "new")
    pipe = msar.from_pretrained(tmp_path / "new")
    assert isinstance(pipe.transformer.schedule, FrameScaleSchedule)
    kw = dict(cfg=2.0, top_k=8, seed=3)
    assert torch.equal(pipe.sample([0, 1], **kw).data, Pipeline(tok, model).sample([0, 1], **kw).data)


def test_convert_an_earlier_graph_demo_output_from_the_command_line(tmp_path):
    """Catches: a graph run whose transformer is rebuilt with another architecture, and a command
    line whose arguments do not reach the converter."""
    from modalities.convert import main

    graphs = [nx.cycle_graph(5), nx.path_graph(4)]
    tok = GraphPyramidTokenizer.fit(graphs, edge_chunks=1)
    torch.manual_seed(0)
    model = NextScaleTransformer(TransformerConfig(schedule=tok.schedule.to_config(), vocab_size=tok.vocab_size,
                                                   latent_dim=tok.latent_dim, depth=1, embed_dim=16, num_heads=2,
                                                   cond_drop_rate=0.0))
    old = tmp_path / "planar"
    old.mkdir()
    save_file(old_transformer_sd(model), old / "model.safetensors")
    (old / "tokenizer.json").write_text(json.dumps(tok.config))
    (old / "metrics.json").write_text(json.dumps({"train_config": {"depth": 1, "width": 16, "heads": 2}}))
    assert main([str(old), str(old / "pipeline")]) == 0
    pipe = msar.from_pretrained(old / "pipeline")
    assert pipe.tokenizer.config == tok.config and same_state(pipe.transformer, model)


def test_imagenet_training_takes_a_saved_tokenizer_folder(tmp_path):
    """Catches: --vae accepting only weights files (train_vqvae writes a save_pretrained folder),
    and an earlier train_vqvae output silently loaded with the recipe's architecture."""
    from modalities.image.imagenet.recipes import get_recipe
    from modalities.image.imagenet.train import load_tokenizer

    vq = tiny_vqvae()
    vq.save_pretrained(tmp_path / "tok")
    got = load_tokenizer(get_recipe("tiny"), str(tmp_path / "tok"))
    assert same_state(got, vq) and not any(p.requires_grad for p in got.parameters())
    save_file(old_tokenizer_sd(vq), tmp_path / "vqvae.safetensors")
    (tmp_path / "vqvae.json").write_text(json.dumps(vq.cfg.to_dict()))
    with pytest.raises(ValueError, match="earlier train_vqvae output.*--vae-config .*vqvae.json.*modalities.convert"):
        load_tokenizer(get_recipe("tiny"), str(tmp_path / "vqvae.safetensors"))
