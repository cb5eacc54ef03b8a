"""The worked 1-D example (examples/signal1d.py): its data, its adapter under the
conformance kit, and a tiny end-to-end run of its main()."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

from msar.testing import check_adapter, tiny_transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("signal1d_example", os.path.join(ROOT, "examples", "signal1d.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


ex = _load()


def test_waveforms_are_seeded_balanced_and_distinct():
    x, y = ex.make_waveforms(50, 64, seed=3)
    assert x.shape == (50, 1, 64) and y.shape == (50,)
    assert torch.equal(y.bincount(), torch.full((5,), 10))
    x2, _ = ex.make_waveforms(50, 64, seed=3)
    assert torch.equal(x, x2)
    assert not torch.equal(x, ex.make_waveforms(50, 64, seed=4)[0])
    assert x.abs().max() < 1.5
    # the classes are separable by the example's features (else the generated-class metric is meaningless)
    clf = ex.fit_classifier(*ex.make_waveforms(250, 64, seed=0))
    assert ex.per_class_accuracy(clf, x, y)["mean"] > 0.9


@pytest.mark.parametrize("length", [64, 128])
def test_signal_tokenizer_conforms(length):
    torch.manual_seed(0)
    tok = ex.SignalTokenizer(length, vocab_size=32, dim=8, width=16)
    assert tok.schedule.rank == 1 and tok.schedule.shape(-1) == (length // 4,)
    x, y = ex.make_waveforms(4, length)
    report = check_adapter(tok, x, model=tiny_transformer(tok, num_classes=5), labels=y)
    assert report["checks"][-2:] == ["kv_cache", "sampling"]


def test_signal_tokenizer_rejects_bad_input():
    tok = ex.SignalTokenizer(64, vocab_size=32, dim=8, width=16)
    with pytest.raises(ValueError, match=r"\(B, 1, 64\)"):
        tok.encode(torch.zeros(2, 64))
    with pytest.raises(ValueError, match=r"\(B, 1, 64\)"):
        tok.encode(torch.zeros(2, 1, 32))


def test_main_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    m = ex.main(["--out", str(out), "--n-train", "128", "--n-val", "50", "--vq-steps", "4", "--ar-steps", "4",
                 "--samples-per-class", "2", "--depth", "1", "--width", "32", "--batch-size", "32"])
    for name in ("metrics.json", "samples.png", "progression.png", "forecast.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    K = len(saved["schedule"])
    assert len(saved["val_per_scale"]["loss"]) == K == len(m["val_per_scale"]["acc"])
    assert saved["check_adapter"]["checks"][-1] == "sampling"
    assert 0 <= saved["classifier_acc_generated"]["mean"] <= 1
    assert saved["reconstruction_mse"] > 0
    # provenance: the record names the command that reproduces it
    assert saved["run"]["command"].startswith("python -m examples.signal1d --out ")
    assert saved["run"]["commit"] and saved["run"]["date"] and saved["run"]["wall_time_s"] > 0
