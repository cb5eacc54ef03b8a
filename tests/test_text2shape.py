"""Text-to-shape on voxels: captions measured on the geometry, the checks that score generated
grids, and the example (``python -m modalities text2shape``) on tiny models."""
import json

import numpy as np
import pytest

from modalities.voxel.captions import (HELD_OUT, SPLITS, ShapeCaption, captioned_shapes, check_caption, count_boards,
                                       describe, parse_shape_caption)


def test_captioned_shapes_are_deterministic_and_keep_held_out_pairs_out_of_training():
    a, ca = captioned_shapes("train", 30, seed=2)
    b, cb = captioned_shapes("train", 30, seed=2)
    assert np.array_equal(a, b) and ca == cb
    assert captioned_shapes("train", 30, seed=3)[1] != ca
    for split in ("train", "val", "test_seen"):
        caps = captioned_shapes(split, 60)[1]
        assert not any(c.pair in HELD_OUT for c in caps), split
        assert {c.category for c in caps} >= {h[1] for h in HELD_OUT}  # the categories still appear
    assert all(c.pair in HELD_OUT for c in captioned_shapes("test_heldout", 12)[1])
    with pytest.raises(ValueError, match="unknown split"):
        captioned_shapes("training", 1)


def test_captions_parse_back_and_hold_for_their_shapes():
    """The caption's words are what check_caption measures: every real shape passes its own
    caption (a drift between describe and check_caption would fail here)."""
    for split in SPLITS:
        vox, caps = captioned_shapes(split, 24, seed=1)
        for v, c in zip(vox, caps):
            assert parse_shape_caption(c.text()) == c
            got = check_caption(v, c)
            assert got["adjective"] and got["parts"] in (True, None) and got["category"] is None and got["all"]
    for bad in ("a tall table", "a huge sphere", "a low shelf with nine boards", ""):
        with pytest.raises(ValueError, match="not a caption"):
            parse_shape_caption(bad)


def test_checks_fail_on_the_wrong_caption():
    vox, caps = captioned_shapes("train", 12, seed=0)
    for v, c in zip(vox, caps):
        other = {"tall": "low", "low": "tall", "large": "small", "small": "large"}[c.adjective]
        assert check_caption(v, ShapeCaption(c.category, other, c.boards, c.legs))["adjective"] is False
        if c.category == "shelf":
            assert check_caption(v, ShapeCaption("shelf", c.adjective, boards=c.boards + 1))["parts"] is False
        assert check_caption(v, c, category="sphere" if c.category != "sphere" else "box")["all"] is False
    table = next(v for v, c in zip(vox, caps) if c.category == "table")
    three_legs = table.copy()
    x, y, z = np.argwhere(table).T
    below = z < int(np.argmax(table.sum(axis=(0, 1)))) - 1  # under the top
    cx, cy = x.mean(), y.mean()
    gone = below & (x < cx) & (y < cy)  # the leg in one corner
    three_legs[x[gone], y[gone], z[gone]] = False
    assert check_caption(table, describe(table, "table"))["parts"] is True
    assert check_caption(three_legs, describe(table, "table"))["parts"] is False
    shelf = np.zeros((16, 16, 16), dtype=bool)
    for z in (0, 6, 12):  # (a board on the floor counts too)
        shelf[3:13, 5:11, z:z + 2] = True
    assert count_boards(shelf) == 3


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from modalities.cli import main
    out = tmp_path_factory.mktemp("text2shape")
    assert main(["text2shape", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_quick_run_writes_figures_metrics_and_a_pipeline(quick_run):
    import msar
    from modalities.voxel.text2shape import FIGURES, Text2ShapeConfig
    out, m = quick_run
    for f in FIGURES + ("metrics.json", "run_config.json"):
        assert (out / f).stat().st_size > 0, f
    c = Text2ShapeConfig.quick()
    assert set(m["guidance_sweep"]) == {f"{g:g}" for g in c.cfg_sweep}
    assert m["result"]["held_out"]["n"] == c.n_eval
    # the geometric checks read real shapes exactly (the classifier of a smoke run is untrained)
    assert m["checks"]["on_real"]["test_heldout"]["adjective"] == 1.0
    assert m["run"]["commit"] and m["run"]["command"]  # (the process's command: pytest's here)
    pipe = msar.from_pretrained(str(out / "pipeline"))
    assert pipe.sample(captions=["a low table with four legs"], cfg=2.0, seed=0).data.shape == (1, 16, 16, 16)


def test_rerun_with_other_training_settings_stops_at_start(quick_run, monkeypatch, capsys):
    import modalities.voxel.text2shape as T
    from modalities.cli import main
    out, _ = quick_run

    def too_late(*a, **k):
        raise AssertionError("the run made its data before checking the folder")

    monkeypatch.setattr(T, "captioned_shapes", too_late)
    assert main(["text2shape", "--quick", "--out", str(out), "--var-steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "var_steps: 10 there, 3 now" in err and "--fresh" in err
