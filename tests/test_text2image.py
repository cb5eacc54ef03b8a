"""Text-to-image on captioned shapes: the scenes and their captions, the attribute detector that
scores generated scenes, and the example (``python -m modalities text2image``) on tiny models."""
import json

import pytest
import torch

from modalities.image.captioned_shapes import (HELD_OUT, SPLITS, CaptionAttributes, CaptionedScenes, Scene,
                                               SceneObject, caption, parse_caption, relation_of, render, scene_at)
from modalities.image.shape_detector import ShapeDetector, score_detections


# ---------------------------------------------------------------------------- scenes and captions
def test_scenes_are_deterministic_from_the_seed_and_independent_of_the_set_size():
    """Catches an unseeded draw, or a shared RNG stream (item i would depend on n or on earlier items)."""
    a, b = CaptionedScenes("train", 40, seed=3), CaptionedScenes("train", 40, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    short = CaptionedScenes("train", 10, seed=3)
    assert short.captions == a.captions[:10] and torch.equal(short.images, a.images[:10])
    assert CaptionedScenes("train", 40, seed=4).captions != a.captions
    assert CaptionedScenes("val", 40, seed=3).captions != a.captions  # splits draw their own scenes


def test_held_out_combinations_never_reach_training_and_fill_the_held_out_split():
    held = set(HELD_OUT)
    for split in ("train", "val", "test_seen"):
        d = CaptionedScenes(split, 400)
        assert not any(o.combo in held for s in d.scenes for o in s.objects), split
        # every shape and every colour of the held-out pairs still appears (just not together)
        assert {o.shape for s in d.scenes for o in s.objects} >= {h[0] for h in held}
        assert {o.colour for s in d.scenes for o in s.objects} >= {h[1] for h in held}
    heldout = CaptionedScenes("test_heldout", 200)
    assert all(s.has_combo(HELD_OUT) for s in heldout.scenes)
    custom = (("square", "red"),)
    assert not any(o.combo in custom for s in CaptionedScenes("train", 200, held_out=custom).scenes for o in s.objects)
    with pytest.raises(ValueError, match="every scene with"):
        CaptionedScenes("train", 1, held_out=[("circle", c) for c in ("red", "green", "blue", "yellow")])
    with pytest.raises(ValueError, match="unknown split"):
        scene_at(0, "training", 0)


def test_captions_parse_back_to_the_scene_and_placement_makes_them_true():
    for split in SPLITS:
        for s in CaptionedScenes(split, 150, seed=1).scenes:
            assert parse_caption(caption(s)) == s.attributes()
            if s.count == 2:  # the relation holds for the centres, along an axis twice as long as the other
                a, b = s.objects
                assert relation_of((a.cx, a.cy), (b.cx, b.cy)) == s.relation
                dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
                assert max(dx, dy) >= 2 * min(dx, dy)
            if s.count == 3:
                assert s.objects[0].cx < s.objects[1].cx < s.objects[2].cx
                assert all(o.size == "small" for o in s.objects)
    counts = {s.count for s in CaptionedScenes("train", 100).scenes}
    assert counts == {1, 2, 3}
    for bad in ("a red circle", "a large purple circle", "a small red circle near a small blue square", ""):
        with pytest.raises(ValueError, match="not a caption"):
            parse_caption(bad)


def test_render_draws_each_object_in_its_colour_without_overlap():
    s = Scene((SceneObject("square", "red", "large", 8.0, 16.0), SceneObject("circle", "blue", "small", 24.0, 16.0)),
              "left of")
    img = (render(s) + 1) / 2  # (3, 32, 32) in [0, 1]
    red = (img[0] == 1) & (img[1] == 0) & (img[2] == 0)
    blue = (img[2] == 1) & (img[0] == 0)
    assert red[:, 16:].sum() == 0 and blue[:, :16].sum() == 0  # the square left, the circle right
    ys, xs = red.nonzero(as_tuple=True)  # the large square: half-side 0.85 * 6.5 = 5.525 px -> 12 x 12 pixels, full
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 13, 10, 21) and red.sum() == 144
    ys, xs = blue.nonzero(as_tuple=True)  # the small circle: radius 4 -> an 8 x 8 box, about pi / 4 of it filled
    assert (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (8, 8) and 0.75 < blue.sum() / 64 < 0.85
    assert ((img.sum(0) > 0) == (red | blue)).all()  # nothing else drawn


# ---------------------------------------------------------------------------- the detector
@pytest.fixture(scope="module")
def detector():
    return ShapeDetector.fit(seed=0)


def test_detector_reads_real_held_out_scenes(detector):
    """The metric is only as good as the detector: on real scenes it must read every attribute."""
    for split in ("test_seen", "test_heldout"):
        acc = detector.accuracy_on_real(CaptionedScenes(split, 150, seed=7))
        assert acc["n"] == 150
        assert all(acc[k] == 1.0 for k in ("count", "shape", "colour", "size", "position", "all")), (split, acc)


def test_detector_scores_a_scene_against_a_wrong_caption_as_wrong(detector):
    """Each attribute fails alone when only that part of the caption is wrong (a metric that
    ignored an attribute, or matched objects loosely, would pass these)."""
    s = Scene((SceneObject("triangle", "yellow", "large", 9.0, 12.0),
               SceneObject("square", "green", "small", 25.0, 14.0)), "left of")
    dets = detector.detect(render(s))
    right = s.attributes()
    assert all(v for v in score_detections(dets, right).values())
    (s0, c0, z0), (s1, c1, z1) = right.objects
    cases = {
        "shape": CaptionAttributes(((s0, c0, z0), ("circle", c1, z1)), "left of"),
        "colour": CaptionAttributes(((s0, "red", z0), (s1, c1, z1)), "left of"),
        "size": CaptionAttributes(((s0, c0, "small"), (s1, c1, z1)), "left of"),
        "position": CaptionAttributes(right.objects, "right of"),
    }
    for attr, wrong in cases.items():
        got = score_detections(dets, wrong)
        assert got[attr] is False and got["all"] is False, attr
        assert all(v for k, v in got.items() if k not in (attr, "all")), (attr, got)
    one = score_detections(dets, CaptionAttributes(((s0, c0, z0),)))  # a second object that was not asked for
    assert one["count"] is False and one["shape"] and one["position"] is None
    assert score_detections(detector.detect(-torch.ones(3, 32, 32)), right) == {
        "count": False, "shape": False, "colour": False, "size": False, "position": False, "all": False}


# ---------------------------------------------------------------------------- the example
def test_guidance_is_chosen_on_val_only():
    """Model selection must not read the test sets: here they prefer another guidance than val."""
    from modalities.image.text2image import choose_guidance
    sweep = {"0": {"val": {"all": 0.2}, "test_seen": {"all": 0.9}, "test_heldout": {"all": 0.9}},
             "3": {"val": {"all": 0.6}, "test_seen": {"all": 0.1}, "test_heldout": {"all": 0.1}},
             "6": {"val": {"all": 0.6}, "test_seen": {"all": 0.5}, "test_heldout": {"all": 0.5}}}
    assert choose_guidance(sweep) == 3.0  # the best val accuracy; the weaker guidance on a tie


def test_edit_targets_recolour_the_second_object_into_a_seen_pair():
    from modalities.image.text2image import edit_target
    scenes = [s for s in CaptionedScenes("test_seen", 60).scenes if s.count == 2]
    for j, s in enumerate(scenes):
        t = edit_target(s, j, HELD_OUT)
        assert t.objects[0] == s.objects[0] and t.relation == s.relation
        b, nb = s.objects[1], t.objects[1]
        assert (nb.shape, nb.size, nb.cx, nb.cy) == (b.shape, b.size, b.cx, b.cy) and nb.colour != b.colour
        assert nb.combo not in HELD_OUT


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from modalities.cli import main
    out = tmp_path_factory.mktemp("text2image")
    assert main(["text2image", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_quick_run_writes_figures_metrics_and_a_pipeline_that_samples_from_captions(quick_run):
    import msar
    from modalities.image.text2image import ATTRIBUTES, FIGURES, Text2ImageConfig
    out, m = quick_run
    for f in FIGURES + ("metrics.json", "run_config.json"):
        assert (out / f).stat().st_size > 0, f
    c = Text2ImageConfig.quick()
    assert m["smoke_run"] is True and m["config"] == c.to_json()
    assert set(m["guidance_sweep"]) == {f"{g:g}" for g in c.cfg_sweep}
    for row in m["guidance_sweep"].values():
        for name in ("val", "test_seen", "test_heldout"):
            assert row[name]["n"] == c.n_eval and set(ATTRIBUTES) < set(row[name])
    best = m["result"]["cfg_chosen_on_val"]
    assert m["result"]["seen"] == m["guidance_sweep"][f"{best:g}"]["test_seen"]
    assert m["detector"]["on_real"]["test_heldout"]["all"] == 1.0
    # the command is this process's (pytest's here): only its presence is checked
    assert m["run"]["commit"] and m["run"]["command"] and m["run"]["wall_time_s"] > 0
    pipe = msar.from_pretrained(str(out / "pipeline"))
    x = pipe.sample(captions=["a large red circle above a small blue square"], cfg=3.0, seed=0).data
    assert x.shape == (1, 3, 32, 32)


def test_rerun_with_other_training_settings_stops_at_start(quick_run, monkeypatch, capsys):
    """A second run into the folder with another recipe must refuse before any work (and say why),
    not train over the first run's checkpoints."""
    import modalities.image.text2image as T
    from modalities.cli import main
    out, _ = quick_run

    def too_late(*a, **k):
        raise AssertionError("the run made its data before checking the folder")

    monkeypatch.setattr(T, "CaptionedScenes", too_late)
    assert main(["text2image", "--quick", "--out", str(out), "--var-steps", "7", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "var_steps: 10 there, 7 now" in err and "--fresh" in err
