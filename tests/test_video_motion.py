"""Motion as a condition (modalities.video.motion): the feature layout, the velocity draw and the
metric that says whether a video moves at the velocity it was asked for."""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import msar
from modalities.video import MovingDigits
from modalities.video.motion import (draw_velocities, motion_condition, motion_condition_dim, motion_features,
                                     motion_following)


def test_motion_features_put_class_velocity_and_flag_in_their_slots():
    """One-hot class, velocity / max_speed, then the flag; a row whose motion is not given carries
    no velocity at all (a leak would let the class-only mode see the motion)."""
    labels = torch.tensor([3, 0, 9])
    v = torch.tensor([[2, -3], [-1, 0], [3, 1]])
    f = motion_features(labels, v, num_classes=10, max_speed=3, given=torch.tensor([True, False, True]))
    assert f.shape == (3, motion_condition_dim(10)) == (3, 13)
    assert torch.equal(f[:, :10].argmax(1), labels) and torch.equal(f[:, :10].sum(1), torch.ones(3))
    torch.testing.assert_close(f[0, 10:], torch.tensor([2 / 3, -1.0, 1.0]))
    torch.testing.assert_close(f[1, 10:], torch.zeros(3))
    torch.testing.assert_close(f[2, 10:], torch.tensor([1.0, 1 / 3, 1.0]))
    # without velocities: class only, identical to the not-given row
    assert torch.equal(motion_features(labels, num_classes=10, max_speed=3)[1], f[1])
    cond = motion_condition(labels, v, num_classes=10, max_speed=3)
    assert isinstance(cond, msar.Condition) and cond.kind == "vector" and torch.equal(cond.features[:, -1], torch.ones(3))


@pytest.mark.parametrize("kwargs, message", [
    (dict(labels=torch.tensor([0, 10])), r"labels must lie in \[0, 9\]"),
    (dict(labels=torch.tensor([0.0, 1.0])), "labels must be"),
    (dict(velocities=torch.zeros(2, 3)), r"velocities must be \(B, 2\)"),
    (dict(velocities=torch.tensor([[4, 0], [0, 1]])), "max_speed = 3"),
    (dict(velocities=torch.zeros(2, 2), given=torch.tensor([1, 0])), "given must be a"),
    (dict(given=torch.tensor([True, False])), "no velocities were passed"),
])
def test_motion_features_refuse_bad_input(kwargs, message):
    args = dict(labels=torch.tensor([0, 1]), velocities=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        motion_features(args.pop("labels"), args.pop("velocities"), num_classes=10, max_speed=3, **args)


def test_motion_following_scores_real_videos_against_their_own_trajectories():
    """Real videos move at exactly their velocity (speed error 0); the first step agrees in direction
    unless the digit bounces on it, so asking for the opposite velocities agrees exactly where the
    true ones do not (a metric that read the wrong axis or frame would break both)."""
    d = MovingDigits(64, seed=3, split="test")
    x, _ = d.tensors()
    v = torch.as_tensor(d.velocities)
    own = motion_following(x, v)
    assert own["videos"] == 64 and own["speed_error"] < 1e-4
    step = np.sign(d.positions[:, 1] - d.positions[:, 0])  # the generator's own first step (y, x)
    moving = d.velocities != 0
    assert own["direction_agreement"] == pytest.approx((step[moving] == np.sign(d.velocities[moving])).mean())
    assert own["direction_agreement"] + motion_following(x, -v)["direction_agreement"] == pytest.approx(1.0)
    other = torch.roll(v, 1, 0)  # another video's velocity: the speed error is the speed difference
    assert motion_following(x, other)["speed_error"] == pytest.approx(float((v.abs() - other.abs()).abs().float().mean()),
                                                                        abs=1e-4)
    # an empty clip has no track and is skipped
    blank = torch.cat([x[:2], -torch.ones_like(x[:1])])
    assert motion_following(blank, v[:3])["videos"] == 2
    with pytest.raises(ValueError, match=r"velocities must be \(B, 2\)"):
        motion_following(x, v[:3])


def test_draw_velocities_draws_rows_uniformly():
    """Each row of the pool is drawn with probability 1/N, so a velocity that fills half the pool
    comes out half the time (chi-square against the exact frequencies)."""
    pool = np.array([[1, 2]] * 3 + [[-3, 0]] * 2 + [[0, 1]])
    draws = draw_velocities(pool, 6000, torch.Generator().manual_seed(0))
    assert draws.shape == (6000, 2)
    keys = [tuple(r) for r in draws.long().tolist()]
    observed = [keys.count(k) for k in ((1, 2), (-3, 0), (0, 1))]
    assert sum(observed) == 6000  # nothing outside the pool
    assert chisquare(observed, [3000, 2000, 1000]).pvalue > 1e-3
    again = draw_velocities(pool, 6000, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    with pytest.raises(ValueError, match="pool must be"):
        draw_velocities(np.zeros((0, 2)), 3, torch.Generator())
