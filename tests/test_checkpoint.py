"""Atomic checkpoints: round trip, corruption detection and fallback, pruning, RNG capture."""
import json
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from msar.training import (CheckpointError, WarmupDecaySchedule, build_optimizer, capture_rng_state,
                           list_checkpoints, load_checkpoint, load_latest, restore_rng_state, save_checkpoint,
                           verify_checkpoint)
from msar.training import checkpoint as ckmod


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation cost (badly so on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def _trained(seed=0):
    m = _model(seed)
    opt = build_optimizer(m, lr=1e-2)
    sched = WarmupDecaySchedule(opt, peak_lr=1e-2, total_steps=10, warmup_steps=2)
    m(torch.randn(3, 4)).square().mean().backward()
    opt.step()
    sched.step()
    return m, opt, sched


def _save(d, step, seed=0, **kw):
    m, opt, sched = _trained(seed)
    return save_checkpoint(d, step, {"model": m}, optimizer=opt, scheduler=sched, extra={"pos": step * 10},
                           config={"width": 8, "sched": (1, 2)}, **kw), m, opt, sched


def test_round_trip_restores_everything(tmp_path):
    path, m, opt, sched = _save(tmp_path, 7)
    assert path.name == "step_000007"
    assert (path / "model.model.safetensors").is_file() and (path / "state.pt").is_file()
    man = json.loads((path / "manifest.json").read_text())
    assert man["step"] == 7 and man["config"] == {"width": 8, "sched": [1, 2]}
    assert man["torch_version"] == torch.__version__ and "msar_version" in man
    assert all(len(f["sha256"]) == 64 for f in man["files"].values())

    m2, opt2, sched2 = _trained(seed=1)
    ck = load_latest(tmp_path, models={"model": m2}, optimizer=opt2, scheduler=sched2)
    assert ck.step == 7 and ck.extra == {"pos": 70} and ck.skipped == []
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"])
    assert sched2.step_count == sched.step_count == 1
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_empty_dir_gives_none(tmp_path):
    assert load_latest(tmp_path) is None
    assert load_latest(tmp_path / "missing") is None


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_state", "truncate_manifest", "delete_state"])
def test_corrupt_latest_is_named_and_falls_back(tmp_path, damage):
    _, m_good, _, _ = _save(tmp_path, 1, seed=0)
    bad, _, _, _ = _save(tmp_path, 2, seed=5)
    if damage == "truncate_weights":
        target = bad / "model.model.safetensors"
        target.write_bytes(target.read_bytes()[:-17])
    elif damage == "flip_state":
        target = bad / "state.pt"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, different content
        target.write_bytes(bytes(data))
    elif damage == "truncate_manifest":
        target = bad / "manifest.json"
        target.write_bytes(target.read_bytes()[:40])
    else:
        target = bad / "state.pt"
        target.unlink()
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(bad)
    assert str(target) in str(e.value) and e.value.path == target

    m = _model(seed=3)
    with pytest.warns(UserWarning, match=str(target).replace("\\", "\\\\").replace(".", r"\.")):
        ck = load_latest(tmp_path, models={"model": m})
    assert ck.step == 1
    assert ck.skipped[0][0] == bad and str(target) in ck.skipped[0][1]
    for a, b in zip(m_good.state_dict().values(), m.state_dict().values()):
        assert torch.equal(a, b)


def test_all_corrupt_raises(tmp_path):
    p, *_ = _save(tmp_path, 3)
    (p / "manifest.json").write_text("{")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no valid checkpoint"):
            load_latest(tmp_path)


def test_keep_last_prunes_oldest(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_crash_during_save_leaves_previous_intact(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real = ckmod.atomic_write_bytes

    def failing(path, data):
        if path.name == "state.pt":
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(ckmod, "atomic_write_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]  # no temp debris
    assert load_latest(tmp_path).step == 1


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 4, seed=0)
    _, m, _, _ = _save(tmp_path, 4, seed=9)
    ck = load_checkpoint(tmp_path / "step_000004")
    assert torch.equal(ck.model_states["model"]["0.weight"], m.state_dict()["0.weight"])


def test_tied_weights_and_non_tensor_state(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

    m = Tied()
    save_checkpoint(tmp_path, 0, {"tied": m}, rng=False)
    m2 = Tied()
    load_latest(tmp_path, models={"tied": m2})
    assert torch.equal(m2.emb.weight, m.emb.weight) and m2.out.weight is m2.emb.weight


def test_restore_missing_pieces_is_an_error(tmp_path):
    save_checkpoint(tmp_path, 0, {"a": _model()}, rng=False)
    ck = load_latest(tmp_path)
    with pytest.raises(CheckpointError, match="no weights for model 'b'"):
        ck.restore(models={"b": _model()})
    with pytest.raises(CheckpointError, match="without RNG"):
        ck.restore(rng=True)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least one model"):
        save_checkpoint(tmp_path, 0, {})
    with pytest.raises(ValueError, match="model name"):
        save_checkpoint(tmp_path, 0, {"a/b": _model()})


def _draw(g):
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.rand(2, generator=g).tolist(),
            random.gauss(0, 1), float(np.random.randn()))


@given(st.integers(0, 2**31 - 1))
def test_rng_capture_restore(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = capture_rng_state({"g": g})
    first = _draw(g)
    restore_rng_state(state, {"g": g})
    assert _draw(g) == first


def test_rng_state_survives_weights_only_load(tmp_path):
    g = torch.Generator().manual_seed(3)
    save_checkpoint(tmp_path, 0, {"m": _model()}, generators={"g": g})
    first = _draw(g)
    torch.manual_seed(123)
    ck = load_latest(tmp_path)  # state.pt is read with weights_only=True
    ck.restore(rng=True, generators={"g": g})
    assert _draw(g) == first
