"""Video modality: space-time schedules, known-token masks, causal tokenizer, editing, data, metrics."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import msar
from msar.testing import assert_block_causal, check_adapter, tiny_transformer
from modalities.video import (FramePyramid, FrameScaleSchedule, MovingDigits, VideoTokenizer, VideoTokenizerConfig,
                              bounce_trajectory, box_mask, build_schedule, fill_unknown, frame_prediction_mask,
                              frame_schedule, interpolation_mask, joint_schedule, make_pyramid,
                              pixel_to_latent_known, space_schedule, token_known_masks, video_known_masks)
from modalities.video import metrics as vm
from modalities.video.tokenizer import CausalUpsample


def tiny_tokenizer(schedule: str = "joint", seed: int = 0, **kw) -> VideoTokenizer:
    torch.manual_seed(seed)
    cfg = dict(frames=5, height=16, width=16, channels=(8, 16, 16), latent_dim=8, vocab_size=32, time_stride=2,
               space_stride=4, schedule=schedule)
    cfg.update(kw)
    return VideoTokenizer(VideoTokenizerConfig(**cfg)).eval()  # latent (3, 4, 4)


def tiny_videos(n: int = 2, seed: int = 0) -> torch.Tensor:
    return MovingDigits(n, num_frames=5, size=16, digit_size=8, max_speed=2, seed=seed).tensors()[0]


# ---------------------------------------------------------------------------- schedules
latent_shapes = st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 8))


@st.composite
def shape_and_sides(draw):
    T, H, W = draw(latent_shapes)
    K = draw(st.integers(1, 4))
    hs = sorted(draw(st.lists(st.integers(1, H), min_size=K - 1, max_size=K - 1))) + [H]
    ws = sorted(draw(st.lists(st.integers(1, W), min_size=K - 1, max_size=K - 1))) + [W]
    return (T, H, W), list(zip(hs, ws))


@given(shape_and_sides())
def test_joint_and_space_schedules_count_tokens_and_are_block_causal(case):
    (T, H, W), sides = case
    for s in (joint_schedule((T, H, W), sides), space_schedule((T, H, W), sides)):
        assert s.shape(-1) == (T, H, W)
        assert len(s) == len(sides)
        assert s.token_counts == [math.prod(sc) for sc in s.scales]
        assert s.L == sum(s.token_counts)
        assert [sc[1:] for sc in s.scales] == [tuple(hw) for hw in sides]
        ts = [sc[0] for sc in s.scales]
        assert all(1 <= a <= b <= T for a, b in zip(ts, ts[1:]))
        assert_block_causal(s)
    assert all(sc[0] == T for sc in space_schedule((T, H, W), sides).scales)


@given(shape_and_sides())
def test_frame_schedule_is_frame_causal(case):
    (T, H, W), sides = case
    s = frame_schedule((T, H, W), sides)
    K = len(sides)
    assert len(s) == T * K and s.L == T * sum(h * w for h, w in sides)
    assert s.full_shape == (T, H, W) and s.shape(-1) == s.shape(len(s) - 1) == (1, H, W)
    assert make_pyramid(s).full == (T, H, W)
    assert s.frame_of == [t for t in range(T) for _ in range(K)]
    assert_block_causal(s)
    # frame causality: a token of frame t attends to no token of a later frame
    frame_of_pos = torch.tensor(s.frame_of).repeat_interleave(torch.tensor(s.token_counts))
    mask = s.attn_mask("bool")
    later = frame_of_pos[None, :] > frame_of_pos[:, None]
    assert not (mask & later).any()
    assert (mask | later).any(dim=1).all()


def test_schedule_errors_are_clear():
    with pytest.raises(ValueError, match="last spatial side"):
        joint_schedule((2, 8, 8), [1, 2, 4])
    with pytest.raises(ValueError, match="shrink"):
        space_schedule((2, 8, 8), [4, 2, 8])
    with pytest.raises(ValueError, match="schedule kind"):
        build_schedule("spiral", (2, 8, 8))
    with pytest.raises(ValueError, match="latent_shape"):
        joint_schedule((8, 8), None)
    with pytest.raises(ValueError, match="time_sides"):
        joint_schedule((3, 4, 4), [1, 4], time_sides=[2, 1])
    with pytest.raises(ValueError, match="frames must be 1 \\+ time_stride"):
        VideoTokenizerConfig(frames=8, time_stride=4)


# ---------------------------------------------------------------------------- pyramids and known masks
@given(shape_and_sides(), st.integers(0, 2 ** 16))
def test_known_masks_match_area_windows(case, seed):
    """For the grid pyramids a token is known iff every cell of its area-pooling window is."""
    (T, H, W), sides = case
    g = torch.Generator().manual_seed(seed)
    known = torch.rand(2, T, H, W, generator=g) < 0.7
    for s in (joint_schedule((T, H, W), sides), space_schedule((T, H, W), sides)):
        masks = token_known_masks(make_pyramid(s), known)
        for k, m in enumerate(masks):
            t, h, w = s.shape(k)
            want = torch.zeros(2, t, h, w, dtype=torch.bool)
            for a in range(t):
                for b in range(h):
                    for c in range(w):
                        win = known[:, a * T // t: -(-(a + 1) * T // t), b * H // h: -(-(b + 1) * H // h),
                                    c * W // w: -(-(c + 1) * W // w)]
                        want[:, a, b, c] = win.flatten(1).all(1)
            assert torch.equal(m, want.flatten(1)), (s, k)


@given(shape_and_sides())
def test_frame_pyramid_known_frames_known_at_every_scale(case):
    (T, H, W), sides = case
    s = frame_schedule((T, H, W), sides)
    given_frames = T // 2
    known = torch.zeros(1, T, H, W, dtype=torch.bool)
    known[:, :given_frames] = True
    for k, m in enumerate(token_known_masks(FramePyramid(s), known)):
        assert bool(m.all()) == (s.frame_of[k] < given_frames) and bool(m.any()) == (s.frame_of[k] < given_frames)


def test_frame_pyramid_restrict_prolong_stay_in_frame():
    s = frame_schedule((3, 4, 4), [1, 2, 4])
    p = FramePyramid(s)
    f = torch.randn(2, 5, 3, 4, 4)
    for k in range(len(s)):
        t = s.frame_of[k]
        r = p.restrict(f, k)
        assert r.shape == (2, 5, 1) + s.spatial[k]
        assert torch.allclose(r[:, :, 0], F.adaptive_avg_pool2d(f[:, :, t], s.spatial[k]))
        up = p.prolong(r, k)
        others = [u for u in range(3) if u != t]
        assert up.shape == f.shape and (up[:, :, others] == 0).all()
    with pytest.raises(ValueError, match="expected a latent"):
        p.restrict(torch.randn(2, 5, 2, 4, 4), 0)


def test_previous_frame_input_shows_the_finished_previous_frame_at_every_scale():
    """frame_input='previous': where frame t's scales so far equal frame t-1's coarse content (nothing
    moved), the input of every scale of frame t is the finished frame t-1 pooled to that scale -- its
    finest detail included, which the 'own' input never shows; frames other than t-1 and t never
    reach the input, and the codes (restrict / prolong) are the same as 'own'."""
    s = frame_schedule((3, 8, 8), [1, 2, 4, 8])
    own, prev = FramePyramid(s), FramePyramid(s, frame_input="previous")
    x = torch.randn(2, 5, 8, 8)  # frame 0's finished latent
    for k in range(s.first_scale_of(1) + 1, s.first_scale_of(2)):
        f = torch.zeros(2, 5, 3, 8, 8)
        f[:, :, 0] = x
        coarse = F.interpolate(F.adaptive_avg_pool2d(x, s.spatial[k - 1]), size=(8, 8), mode="bicubic")
        f[:, :, 1] = coarse  # frame 1 so far: frame 0's content down to scale k-1
        assert torch.allclose(prev.resample(f, k)[:, :, 0], F.adaptive_avg_pool2d(x, s.spatial[k]), atol=1e-5)
        assert torch.allclose(own.resample(f, k)[:, :, 0], F.adaptive_avg_pool2d(coarse, s.spatial[k]), atol=1e-5)
        g = f.clone()
        g[:, :, 2] = torch.randn(2, 5, 8, 8)  # the future
        assert torch.equal(prev.resample(g, k), prev.resample(f, k))
    f = torch.randn(2, 5, 3, 8, 8)
    for k in range(len(s)):  # frame 0 and the first scale of every frame: as 'own'; codes: as 'own'
        if s.frame_of[k] == 0 or k == s.first_scale_of(s.frame_of[k]):
            assert torch.equal(prev.resample(f, k), own.resample(f, k))
        assert torch.equal(prev.restrict(f, k), own.restrict(f, k))
        assert torch.equal(prev.prolong(prev.restrict(f, k), k), own.prolong(own.restrict(f, k), k))
    tok = tiny_tokenizer("frame", frames=5, height=32, width=32)  # latent (3, 8, 8): scales 1, 2, 4, 8 per frame
    carried = tok.with_frame_input("previous")
    x = MovingDigits(2, num_frames=5, size=32, seed=0).tensors()[0]
    idx = tok.encode(x)
    assert all(torch.equal(a, b) for a, b in zip(carried.encode(x), idx))  # same weights, same codes
    k = tok.schedule.first_scale_of(1) + 1  # frame 1's second scale: the first input where the two differ
    n = sum(tok.schedule.token_counts[1:k])
    x_own, x_prev = tok.teacher_forcing_input(idx), carried.teacher_forcing_input(idx)
    assert torch.equal(x_own[:, :n], x_prev[:, :n]) and not torch.allclose(x_own[:, n:], x_prev[:, n:])
    with pytest.raises(ValueError, match="frame_input"):
        FramePyramid(s, frame_input="next")
    with pytest.raises(ValueError, match="for intra coding"):
        FramePyramid(s, frame_coding="delta", frame_input="previous")
    with pytest.raises(ValueError, match="frame_input='previous' needs schedule='frame'"):
        tiny_tokenizer("space", frame_input="previous")


def test_delta_frame_pyramid_carries_each_frame_into_the_next():
    """Delta coding: a scale of frame t writes its code map into frames >= t (never the past),
    and the transformer input of every scale is a plain pool of its own frame, which already
    holds the finished previous frame."""
    s = frame_schedule((3, 4, 4), [1, 2, 4])
    p = FramePyramid(s, frame_coding="delta")
    f = torch.randn(2, 5, 3, 4, 4)
    for k in range(len(s)):
        t = s.frame_of[k]
        up = p.prolong(p.restrict(f, k), k)
        assert (up[:, :, :t] == 0).all()
        assert all(torch.equal(up[:, :, u], up[:, :, t]) for u in range(t, 3))
        assert torch.allclose(p.resample(f, k)[:, :, 0], F.adaptive_avg_pool2d(f[:, :, t], s.spatial[k]))
    intra = FramePyramid(s)  # intra coding shows the previous frame at a frame's first scale instead
    assert torch.allclose(intra.resample(f, 3)[:, :, 0], f[:, :, 0].mean((-2, -1), keepdim=True))
    with pytest.raises(ValueError, match="frame_coding"):
        FramePyramid(s, frame_coding="p-frames")
    with pytest.raises(ValueError, match="needs schedule='frame'"):
        tiny_tokenizer("space", frame_coding="delta")


def test_delta_coding_decodes_the_running_sum_of_frame_changes():
    """The same tokens read as changes: with linear phi, the delta latent of frame t is the sum
    over frames <= t of the intra latents, and a frame's scales quantize its change from the
    previous frame's reconstruction."""
    delta = tiny_tokenizer("frame", frame_coding="delta")
    intra = tiny_tokenizer("frame")
    intra.load_state_dict(delta.state_dict())
    for m in delta.quantizer.phi.modules():  # phi's bias is added to every frame: drop it to compare
        if getattr(m, "bias", None) is not None:
            torch.nn.init.zeros_(m.bias)
    intra.load_state_dict(delta.state_dict())
    idx = delta.encode(tiny_videos(2))
    f_delta, f_intra = delta.quantizer.indices_to_fhat(idx), intra.quantizer.indices_to_fhat(idx)
    assert torch.allclose(f_delta, f_intra.cumsum(dim=2), atol=1e-5)
    assert not torch.allclose(f_delta, f_intra, atol=1e-3)
    # frame 1's scales quantize frame 1 minus the reconstruction of frame 0 (closed loop: the
    # change also corrects frame 0's quantization error): intra coding of that change agrees
    f = delta.encode_latent(tiny_videos(2))
    change = f.clone()
    change[:, :, 1] -= f_delta[:, :, 0]
    n = 2 * delta.schedule.scales_per_frame
    assert all(torch.equal(a, b) for a, b in zip(idx[:n], intra.quantizer.encode(change)[:n]))


def test_pixel_to_latent_known_groups_first_frame_alone():
    m = frame_prediction_mask(9, 8, 8, given=5)
    lat = pixel_to_latent_known(m, time_stride=4, space_stride=4)
    assert lat.shape == (1, 3, 2, 2) and lat[0, :2].all() and not lat[0, 2].any()
    lat = pixel_to_latent_known(frame_prediction_mask(9, 8, 8, given=4), 4, 4)  # group 1 incomplete
    assert lat[0, 0].all() and not lat[0, 1:].any()
    lat = pixel_to_latent_known(interpolation_mask(9, 8, 8, first=1, last=4), 4, 4)
    assert lat[0, 0].all() and not lat[0, 1].any() and lat[0, 2].all()
    lat = pixel_to_latent_known(box_mask(9, 8, 8, (0, 4, 0, 3)), 4, 4)
    assert not lat[0, :, 0, 0].any() and lat[0, :, 1].all() and lat[0, :, 0, 1].all()
    with pytest.raises(TypeError, match="bool"):
        pixel_to_latent_known(m.float(), 4, 4)
    with pytest.raises(ValueError, match="tile"):
        pixel_to_latent_known(frame_prediction_mask(8, 8, 8, 2), 4, 4)


# ---------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("kind", ["joint", "space", "frame", "frame-delta"])
def test_tokenizer_round_trip_and_conformance(kind):
    tok = tiny_tokenizer("frame", frame_coding="delta") if kind == "frame-delta" else tiny_tokenizer(kind)
    x = tiny_videos(2)
    idx = tok.encode(x)
    assert len(idx) == len(tok.schedule)
    for k, t in enumerate(idx):
        assert t.shape == (2, tok.schedule.token_counts[k]) and t.dtype == torch.long
        assert 0 <= int(t.min()) and int(t.max()) < tok.vocab_size
    assert tok.decode(idx).shape == x.shape
    check_adapter(tok, x, model=tiny_transformer(tok, num_classes=3), labels=torch.tensor([0, 2]))


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_coarser_latent_cuts_the_finest_scale_and_round_trips(quantizer):
    """``--space-stride 8`` adds one 64-wide stage and quarters the finest scale (the bulk of the
    tokens); the tokenizer still round-trips and meets the adapter contract with either quantizer."""
    from examples.video_demo import parse_args
    assert parse_args(["--space-stride", "8"]).tok_channels == [16, 32, 64, 64]
    assert parse_args(["--space-stride", "8", "--tok-channels", "8", "8", "8", "8"]).tok_channels == [8, 8, 8, 8]
    fine = tiny_tokenizer("space", quantizer=quantizer)
    coarse = tiny_tokenizer("space", space_stride=8, channels=(8, 16, 16, 16), quantizer=quantizer)
    assert coarse.latent_shape == (3, 2, 2)
    assert 4 * coarse.schedule.token_counts[-1] == fine.schedule.token_counts[-1]
    x = tiny_videos(2)
    idx = coarse.encode(x)
    assert [t.shape[1] for t in idx] == coarse.schedule.token_counts and coarse.decode(idx).shape == x.shape
    check_adapter(coarse, x, model=tiny_transformer(coarse, num_classes=3), labels=torch.tensor([0, 2]))


@pytest.mark.parametrize("coding,stages", [("intra", "fine"), ("delta", "fine"), ("intra", "coarse")])
def test_tokenizer_is_causal_in_time(coding, stages):
    """Changing frames >= 3 changes neither the latent frames covering frames <= 2 nor,
    with the per-frame pyramid, their tokens and decoded frames."""
    tok = tiny_tokenizer("frame", frame_coding=coding, time_stages=stages)
    x = tiny_videos(2)
    y = x.clone()
    y[:, :, 3:] = torch.rand_like(y[:, :, 3:]) * 2 - 1
    fx, fy = tok.encode_latent(x), tok.encode_latent(y)
    assert torch.allclose(fx[:, :, :2], fy[:, :, :2], atol=1e-6) and not torch.allclose(fx[:, :, 2], fy[:, :, 2])
    ix, iy = tok.encode(x), tok.encode(y)
    per_frame = tok.schedule.scales_per_frame
    for k in range(2 * per_frame):
        assert torch.equal(ix[k], iy[k])
    assert torch.allclose(tok.decode(ix)[:, :, :3], tok.decode(ix[:2 * per_frame] + iy[2 * per_frame:])[:, :, :3],
                          atol=1e-5)


def test_time_stages_say_where_time_is_resampled(tmp_path):
    """``time_stages="coarse"`` keeps every frame through the encoder's full-resolution stage and
    has the decoder upsample time before its space-time convs; ``"fine"`` the other way round.
    Either way the latent and the round trip have the same shapes, and the setting is saved."""
    x = tiny_videos(2)
    frames_after_first_stage = {}
    for stages in ("fine", "coarse"):
        tok = tiny_tokenizer("frame", time_stages=stages)
        seen = []
        hook = tok.encoder.stages[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[2]))
        assert tok.encode_latent(x).shape[2:] == (3, 4, 4)
        hook.remove()
        frames_after_first_stage[stages] = seen[0]
        dec = [m for m in tok.decoder.stages if isinstance(m, CausalUpsample)]
        assert [m.time_factor for m in dec] == ([1, 2] if stages == "fine" else [2, 1])
        assert tok.decode(tok.encode(x)).shape == x.shape
        tok.save_pretrained(tmp_path / stages)
        assert VideoTokenizer.from_pretrained(tmp_path / stages).config.time_stages == stages
    assert frames_after_first_stage == {"fine": 3, "coarse": 5}
    with pytest.raises(ValueError, match="time_stages"):
        tiny_tokenizer("frame", time_stages="middle")


def test_tokenizer_rejects_bad_input():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"expected shape \(B, C=1, T=5"):
        tok.encode(torch.zeros(1, 1, 4, 16, 16))
    with pytest.raises(TypeError, match="floating point"):
        tok.encode(torch.zeros(1, 1, 5, 16, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="float tensor"):
        tok.encode(np.zeros((1, 1, 5, 16, 16)))


def test_tokenizer_save_load(tmp_path):
    tok = tiny_tokenizer("frame")
    tok.save_pretrained(tmp_path / "tok")
    tok2 = VideoTokenizer.from_pretrained(tmp_path / "tok")
    x = tiny_videos(1)
    assert isinstance(tok2.schedule, FrameScaleSchedule)
    assert all(torch.equal(a, b) for a, b in zip(tok.encode(x), tok2.encode(x)))


def test_layout_loss_targets_the_last_frame_of_each_latent_group():
    """The layout head reads latent frame t's spatial mean (what frame t's coarsest scale
    quantizes) and is scored against an area thumbnail of frame t * time_stride, the last frame
    latent frame t covers.  A target taken from another frame of the group, another latent
    frame's, or the group's mean gives another number."""
    tok = tiny_tokenizer("frame", coord_input=True, layout_side=2)  # frames 5, time stride 2: targets 0, 2, 4
    B, H = 3, 16
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(B, 1, 5, H, H, generator=gen) * 2 - 1
    with torch.no_grad():
        mean = tok.encode_latent(x).mean(dim=(3, 4)).transpose(1, 2)  # (B, 3, D)
    thumbs = F.avg_pool2d(x[:, 0, [0, 2, 4]].reshape(-1, 1, H, H), H // 2).reshape(B, 3, 4)
    want = (tok.layout_head(mean) - thumbs).pow(2).mean()
    assert torch.allclose(tok.layout_loss(x), want, atol=1e-6)
    # the loss reaches the encoder (through the mean latent), not only the head
    tok.layout_loss(x).backward()
    assert tok.encoder.conv_in.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="layout_side > 0"):
        tiny_tokenizer("frame").layout_loss(x)
    with pytest.raises(ValueError, match="layout_side"):
        VideoTokenizerConfig(frames=5, height=16, width=16, layout_side=17)
    with pytest.raises(ValueError, match="coord_input must be True or False"):
        VideoTokenizerConfig(frames=5, height=16, width=16, coord_input=2)


def test_layout_tokenizer_saves_and_loads(tmp_path):
    tok = tiny_tokenizer("frame", coord_input=True, layout_side=2)
    tok.save_pretrained(tmp_path / "tok")
    tok2 = VideoTokenizer.from_pretrained(tmp_path / "tok")
    x = tiny_videos(2)
    assert tok2.config.coord_input and tok2.config.layout_side == 2
    assert all(torch.equal(a, b) for a, b in zip(tok.encode(x), tok2.encode(x)))
    assert torch.equal(tok.layout_loss(x), tok2.layout_loss(x))


def test_training_steps_reduce_losses():
    torch.manual_seed(0)
    tok = tiny_tokenizer("space").train()
    x = tiny_videos(2)
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        rec, q = tok(x)
        loss = (rec - x).pow(2).mean() + q.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]

    tok.eval()
    idx = tok.encode(x)
    labels = torch.tensor([0, 2])
    model = msar.NextScaleTransformer(msar.TransformerConfig(
        schedule=tok.schedule.to_config(), vocab_size=tok.vocab_size, latent_dim=tok.latent_dim, num_classes=3,
        depth=1, embed_dim=32, num_heads=2, cond_drop_rate=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inp, target = tok.teacher_forcing_input(idx), torch.cat(idx, 1)
    ce = []
    for _ in range(6):
        logits = model(labels, inp)
        loss = F.cross_entropy(logits.reshape(-1, tok.vocab_size), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ce.append(loss.item())
    assert ce[-1] < ce[0] - 0.3


# ---------------------------------------------------------------------------- editing and sampling
@pytest.mark.parametrize("kind", ["frame", "frame-delta", "joint"])
def test_frame_prediction_preserves_given_frames(kind):
    tok = tiny_tokenizer("frame", frame_coding="delta") if kind == "frame-delta" else tiny_tokenizer(kind)
    model = tiny_transformer(tok, num_classes=3)
    x = tiny_videos(2, seed=3)
    given = frame_prediction_mask(5, 16, 16, given=3)  # latent frames 0 and 1
    masks = video_known_masks(tok, given, batch_size=2)
    known = tok.encode(fill_unknown(x, given))
    assert any(m.any() for m in masks) and not all(m.all() for m in masks)
    out = msar.sample(model, tok, torch.tensor([0, 1]), cfg=1.0, top_k=8, seed=0, known=known, known_mask=masks)
    for o, k, m in zip(out.indices, known, masks):
        assert torch.equal(o[m], k[m])
    if kind != "joint":  # causal tokenizer + per-frame pyramid: the given frames decode exactly as encoded
        assert torch.allclose(out.data[:, :, :3], tok.decode(known)[:, :, :3], atol=1e-5)
        free = sum(int((~m).sum()) for m in masks)
        assert free == 2 * sum(tok.schedule.token_counts[2 * tok.schedule.scales_per_frame:])


def test_guidance_ramp_restarts_with_every_frame():
    """VAR's linear guidance ramps over one pyramid; the per-frame schedule lays out one pyramid per
    frame, so its ramp restarts with each frame.  Greedy guided samples equal the argmax of
    ``(1 + t_k) cond - t_k uncond`` from teacher-forced passes with ``t_k = cfg * level / (n - 1)``
    (catches a sampler that ramps once over the whole video: frame 0 barely guided)."""
    tok = tiny_tokenizer("frame")
    s = tok.schedule
    assert [s.progress(k) for k in range(len(s))] == [0.0, 0.5, 1.0] * 3
    assert msar.ScaleSchedule(s.scales).progress(1) == 1 / 8  # the plain schedule: one ramp
    with pytest.raises(IndexError, match="out of range"):
        s.progress(len(s))
    model = tiny_transformer(tok, num_classes=3)
    labels, cfg = torch.tensor([0, 2]), 4.0
    out = msar.sample(model, tok, labels, cfg=cfg, top_k=1)
    x = tok.teacher_forcing_input(out.indices)
    with torch.no_grad():
        c = model(labels, x)
        u = model(torch.full_like(labels, model.null_label), x, allow_null=True)
    t = torch.tensor([cfg * s.progress(k) for k in range(len(s))]).repeat_interleave(torch.tensor(s.token_counts))
    guided = (1 + t)[:, None] * c - t[:, None] * u
    assert torch.equal(torch.cat(out.indices, 1), guided.argmax(-1))


def test_every_frame_refines_its_scales_with_the_phi_of_their_place_in_its_pyramid():
    """The quantizer picks scale k's phi by ``schedule.progress(k)``: with one pyramid per frame,
    frame t's coarsest scale is refined like frame 0's coarsest (catches phi picked by ``k / (K - 1)``
    over the whole video, which gave each frame one phi for all of its scales)."""
    tok = tiny_tokenizer("frame")
    s, phi = tok.schedule, tok.quantizer.phi
    n = s.scales_per_frame
    first = [phi.index(k) for k in range(n)]
    assert len(set(first)) == n
    assert [phi.index(k) for k in range(len(s))] == first * (len(s) // n)


def test_sampling_is_reproducible_with_a_seed():
    tok = tiny_tokenizer("joint")
    model = tiny_transformer(tok, num_classes=3)
    labels = torch.tensor([0, 1, 2])
    a = msar.sample(model, tok, labels, cfg=1.5, top_k=10, top_p=0.9, seed=11)
    b = msar.sample(model, tok, labels, cfg=1.5, top_k=10, top_p=0.9, seed=11)
    c = msar.sample(model, tok, labels, cfg=1.5, top_k=10, top_p=0.9, seed=12)
    assert all(torch.equal(p, q) for p, q in zip(a.indices, b.indices))
    assert torch.equal(a.data, b.data) and a.data.shape == (3, 1, 5, 16, 16)
    assert any(not torch.equal(p, q) for p, q in zip(a.indices, c.indices))


# ---------------------------------------------------------------------------- data and metrics
@given(st.integers(0, 20), st.integers(-4, 4), st.integers(5, 24))
def test_bounce_trajectory_stays_in_bounds_and_keeps_speed(start, v, steps):
    hi = 20
    p = bounce_trajectory(start, v, 0, hi, steps)
    assert p.min() >= 0 and p.max() <= hi and p[0] == start
    assert (np.abs(np.diff(p)) <= abs(v)).all()


def test_moving_digits_is_deterministic_and_labelled():
    a = MovingDigits(6, seed=5)
    b = MovingDigits(6, seed=5)
    xa, ya = a.tensors()
    xb, yb = b.tensors()
    assert xa.shape == (6, 1, 9, 32, 32) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.min() >= -1 and xa.max() <= 1 and set(ya.tolist()) <= set(range(10))
    assert not torch.equal(xa, MovingDigits(6, seed=6).tensors()[0])
    # the first frame shows the labelled digit image at its start position
    img = a.images[a.image_ids[0]]
    y, x = a.positions[0, 0]
    assert torch.allclose((xa[0, 0, 0, y:y + 16, x:x + 16] + 1) / 2, torch.from_numpy(img), atol=1e-6)
    assert a.all_labels[a.image_ids[0]] == ya[0]


def test_metrics_on_real_videos():
    ds = MovingDigits(48, seed=0)
    x, y = ds.tensors()
    assert vm.psnr(x, x) > 90
    m = vm.motion_check(x)
    # real clips score ~0.99, not 1: a bounce just outside the clip leaves one partial step at its end
    assert m["constant_velocity_fraction"] > 0.95 and m["videos_with_track"] > 40 and m["bounces_per_video"] > 0.5
    c = vm.centroids(x)
    off = c - ds.centres()  # intensity centroid = box centre + a per-digit constant offset
    assert np.allclose(off, off[:, :1], atol=1e-3)
    # a shuffled-frame video breaks constant velocity
    shuffled = x[:, :, torch.tensor([0, 5, 2, 7, 1, 8, 3, 6, 4])]
    ms = vm.motion_check(shuffled)
    assert ms["bounces_per_video"] > 2 * m["bounces_per_video"] and ms["mean_abs_accel"] > 5 * m["mean_abs_accel"]
    pred = np.stack([np.full(9, 3), np.r_[np.full(8, 3), 4]])
    assert vm.temporal_consistency(pred) == 0.5
    assert vm.frame_accuracy(pred, torch.tensor([3, 3])) == pytest.approx(17 / 18)


def _square_video(xs, size: int = 40, side: int = 4, y: int = 10) -> torch.Tensor:
    """``(1, 1, T, size, size)`` in [-1, 1]: a bright square whose left edge is at ``xs[t]``."""
    v = -torch.ones(1, 1, len(xs), size, size)
    for t, x in enumerate(xs):
        v[0, 0, t, y:y + side, x:x + side] = 1.0
    return v


def test_motion_check_counts_velocity_sign_flips_exactly():
    """Catches a flip count that misses sign changes, counts a still axis, or ignores the dead
    zone: x velocities +2 +2 -2 -2 +2 +2 +2 -2 flip 3 times, y never moves."""
    flips = lambda xs: vm.motion_check(_square_video(xs))["bounces_per_video"]
    assert flips([4, 6, 8, 6, 4, 6, 8, 10, 8]) == 3
    assert flips([10] * 9) == 0  # a static video
    assert flips([4, 6, 8, 10, 12, 14, 16, 18, 20]) == 0  # constant velocity
    # stand still, jump, stand still (a decoder that repeats frames inside a latent group): 7 flips
    assert flips([4, 7, 7, 13, 13, 19, 19, 25, 25]) == 7
    # where the flips come from: 1 px jitter around a standstill on x (median speed 0.5) is a
    # still axis with 5 flips (y never moves: still, no flips); a real bounce is a moving axis
    m = vm.motion_check(_square_video([10, 11, 10, 10, 11, 10, 10, 10, 10]))
    assert (m["still_axes_per_video"], m["flips_on_still_axes"], m["bounces_per_video"]) == (2, 5, 5)
    m = vm.motion_check(_square_video([4, 6, 8, 6, 4, 6, 8, 10, 8]))
    assert (m["still_axes_per_video"], m["flips_on_still_axes"], m["mean_speed"]) == (1, 0, 1.0)


def test_velocity_error_of_a_continuation():
    """Catches a velocity error measured on positions, from the wrong frame, or with the
    given frames: the true continuation scores 0, a still one its speed, a reversed one 2x."""
    true = _square_video([4, 6, 8, 10, 12, 14, 16, 18, 20])
    still = _square_video([4, 6, 8, 10, 12, 12, 12, 12, 12])
    back = _square_video([4, 6, 8, 10, 12, 10, 8, 6, 4])
    off_before = _square_video([0, 0, 0, 0, 12, 14, 16, 18, 20])  # given frames differ: not scored
    assert vm.velocity_error(true, true, 5)["velocity_error"] == 0
    r = vm.velocity_error(still, true, 5)
    assert r["velocity_error"] == pytest.approx(2.0) == r["velocity_error_if_static"] and r["steps"] == 4
    assert r["position_error"] == pytest.approx((2 + 4 + 6 + 8) / 4)
    assert vm.velocity_error(back, true, 5)["velocity_error"] == pytest.approx(4.0)  # every step -2 instead of +2
    assert vm.velocity_error(off_before, true, 5)["velocity_error"] == 0
    with pytest.raises(ValueError, match="start must be in"):
        vm.velocity_error(true, true, 0)


def test_depth_to_time_upsampling_lets_frames_of_a_latent_group_differ():
    """Catches the stand-still-and-jump decoder: with nearest time repetition before a
    spatial-only conv, the two frames of a latent group decode identically whatever the
    latent; depth-to-time gives each its own features (and stays causal, see above)."""
    z = torch.randn(2, 8, 3, 4, 4)
    rep = tiny_tokenizer("space", time_upsample="repeat").decoder(z)
    dep = tiny_tokenizer("space", time_upsample="depth").decoder(z)
    assert torch.equal(rep[:, :, 1], rep[:, :, 2]) and torch.equal(rep[:, :, 3], rep[:, :, 4])
    assert (dep[:, :, 1] - dep[:, :, 2]).abs().max() > 1e-3 and (dep[:, :, 3] - dep[:, :, 4]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="time_upsample"):
        VideoTokenizerConfig(time_upsample="linear")


def test_reconstruction_report_scores_a_perfect_and_a_stuttering_tokenizer():
    """The tokenizer's own evaluation: an identity round trip keeps the real motion, one that
    repeats frames in pairs shows the flips (catches a report that measures the input twice)."""
    x = MovingDigits(8, seed=0).tensors()[0]

    class Identity:
        def encode(self, v):
            return [v]

        def decode(self, idx):
            return idx[0]

    class Stutter(Identity):
        def decode(self, idx):
            v = idx[0]
            return torch.cat((v[:, :, :1], v[:, :, 1::2].repeat_interleave(2, dim=2)), dim=2)

    same, rec = vm.reconstruction_report(Identity(), x, batch_size=3)
    assert torch.equal(rec, x) and same["psnr_db"] > 90 and same["track_error"] == 0
    assert same["velocity_flips"] == same["velocity_flips_real"] == vm.motion_check(x)["bounces_per_video"]
    bad, _ = vm.reconstruction_report(Stutter(), x)
    assert bad["velocity_flips"] > 3 * bad["velocity_flips_real"] and bad["track_error"] > 0.5


@pytest.mark.parametrize("kind", ["cnn", "logistic"])
def test_frame_classifier_reads_real_and_blurred_digits_and_is_seeded(kind):
    x, y = MovingDigits(150, seed=0, split="train").tensors()
    xt, yt = MovingDigits(60, seed=1, split="test").tensors()
    clf = vm.FrameDigitClassifier(kind=kind, steps=120, seed=3).fit(x, y)
    pred = clf.predict(xt)
    assert pred.shape == (60, 9)
    assert vm.frame_accuracy(pred, yt) > 0.7  # chance is 0.1
    blurred = F.avg_pool3d(xt, (1, 3, 3), 1, (0, 1, 1), count_include_pad=False)
    assert vm.frame_accuracy(clf.predict(blurred), yt) > 0.6
    again = vm.FrameDigitClassifier(kind=kind, steps=120, seed=3).fit(x, y)
    assert np.array_equal(again.predict(xt), pred)
    with pytest.raises(ValueError, match="kind must be"):
        vm.FrameDigitClassifier(kind="svm")


class _TinyVideoNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)

    def forward(self, v: torch.Tensor) -> torch.Tensor:  # (B, 3, T, H, W) -> (B, 4)
        return self.proj(v.mean(dim=(2, 3, 4)))


def test_feature_net_by_path_torchscript_and_state_dict(tmp_path):
    """FVD proper needs I3D weights; any feature network given by path plugs in."""
    torch.manual_seed(0)
    net = _TinyVideoNet()
    ts_path = str(tmp_path / "net.pt")
    torch.jit.script(net).save(ts_path)
    sd_path = str(tmp_path / "net.safetensors")
    from safetensors.torch import save_file
    save_file(net.state_dict(), sd_path)
    x = torch.rand(12, 1, 5, 8, 8) * 2 - 1
    fa = vm.video_features(vm.load_feature_net(ts_path), x, size=4)
    fb = vm.video_features(vm.load_feature_net(sd_path, "tests.test_video:_TinyVideoNet"), x)
    assert fa.shape == (12, 4) and np.allclose(fa, fb, atol=1e-5)
    assert abs(vm.frechet_distance(fa, fa)) < 1e-4
    assert vm.frechet_distance(fa, fa + 1.0) == pytest.approx(4.0, rel=1e-3)
    with pytest.raises(ValueError, match="module:function"):
        vm.load_feature_net(sd_path, "no_colon")


# ---------------------------------------------------------------------------- the example
def test_demo_runs_end_to_end_and_a_rerun_resumes_from_its_checkpoints(tmp_path):
    """``python -m examples.video_demo`` at toy size: every output is written, edits keep
    their known tokens, and a second run finds finished checkpoints, trains nothing and
    reproduces the same samples."""
    from examples.video_demo import main
    argv = ["--quick", "--out", str(tmp_path), "--num-train", "96", "--tok-steps", "6", "--ar-steps", "6",
            "--samples-per-class", "1", "--classifier-steps", "20", "--schedule", "space", "--condition", "class"]
    first = main(argv)
    for name in ("metrics.json", "samples.gif", "samples.png", "reconstructions.png", "progression.png",
                 "edit_frame_prediction.png", "edit_interpolation.png", "edit_inpainting.png", "edits.gif",
                 "pipeline/config.json", "pipeline/tokenizer/model.safetensors",
                 "pipeline/transformer/model.safetensors"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert all(e["known_tokens_preserved"] for e in first["zero_shot"].values())
    assert first["transformer"]["final_train"]["step"] == 6
    v = first["transformer"]["validation"]
    assert {"loss", "acc", "loss_wrong_label", "loss_train_subset"} <= v.keys()
    # frame prediction (a prefix of 5 frames given) is scored as a continuation, the other edits are not
    cont = first["zero_shot"]["frame_prediction"]["continuation"]
    assert cont["tokenizer_recon"]["steps"] <= 4 * 4 and "velocity_error" in cont["generated"]
    assert "continuation" not in first["zero_shot"]["interpolation"] and "continuation" not in first["zero_shot"]["inpainting"]
    rec = first["tokenizer"]["reconstruction"]  # the tokenizer's own evaluation, on the same test videos
    assert rec["velocity_flips_real"] == first["real_test"]["motion"]["bounces_per_video"]
    assert rec["velocity_flips"] == first["reconstructed_test"]["motion"]["bounces_per_video"]
    second = main(argv)
    assert second["tokenizer"]["final_train"] is None and second["transformer"]["final_train"] is None
    # compared as JSON text: a toy model's motion figures can be NaN (no trackable frame), and NaN != NaN
    same = lambda key: json.dumps(second[key], sort_keys=True) == json.dumps(first[key], sort_keys=True)
    assert same("generated") and same("zero_shot")
    assert second["tokenizer"]["test_psnr_db"] == first["tokenizer"]["test_psnr_db"]


def test_demo_with_motion_condition_reports_how_samples_follow_it(tmp_path):
    """``--condition motion`` (the default): the transformer takes class + velocity vectors, the samples are scored
    against the velocities they were asked for (and real videos against theirs), the same model also
    samples from the class alone, and the saved pipeline loads as that vector-conditioned model (run with
    ``--frame-input previous`` and VAR-like intermediate ``--sides``, which the saved tokenizer keeps)."""
    from examples.video_demo import main
    from modalities.video.motion import motion_condition
    first = main(["--quick", "--out", str(tmp_path), "--num-train", "64", "--tok-steps", "4", "--ar-steps", "4",
                  "--samples-per-class", "1", "--edit-videos", "2", "--classifier-steps", "10",
                  "--frame-input", "previous", "--sides", "1", "2", "3", "4", "6", "8"])
    follow = first["generated"]["motion_following"]
    assert {"speed_error", "direction_agreement", "videos"} <= follow.keys()
    assert first["real_test"]["motion_following"]["speed_error"] < 1e-4  # real videos move at their velocity
    assert "temporal_consistency" in first["generated"]["class_only"]
    v = first["transformer"]["validation"]
    assert {"loss_wrong_label", "loss_motion_not_given", "loss_wrong_motion"} <= v.keys()
    assert all(e["known_tokens_preserved"] for e in first["zero_shot"].values())
    pipe = msar.from_pretrained(str(tmp_path / "pipeline"))
    assert pipe.transformer.cond_kind == "vector" and pipe.transformer.cond_dim == 13
    assert pipe.tokenizer.config.frame_input == "previous" and pipe.tokenizer.quantizer.pyramid.frame_input == "previous"
    assert pipe.tokenizer.schedule.frame_sides == [(s, s) for s in (1, 2, 3, 4, 6, 8)]
    cond = motion_condition(torch.tensor([1, 7]), torch.tensor([[2, -1], [0, 3]]), num_classes=10, max_speed=3)
    assert pipe.sample(condition=cond, seed=0).data.shape == (2, 1, 9, 32, 32)


@given(shape_and_sides())
def test_frame_schedule_coordinates_sit_in_their_frame(case):
    """A per-frame scale's (t, y, x) coordinates are where FramePyramid pools it from: frame
    ``frame_of[k]`` of a centre map of the whole latent (catches a time coordinate that runs
    over the scales instead of the frames, as the plain grid formula would give)."""
    (T, H, W), sides = case
    s = frame_schedule((T, H, W), sides)
    pyr = make_pyramid(s)
    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n for n in (T, H, W)]
    centres = torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)  # (1, 3, T, H, W)
    for k in range(len(s)):
        h, w = s.spatial[k]
        if H % h or W % w:  # area pooling averages whole cells only when the side divides
            continue
        pooled = pyr.restrict(centres, k).flatten(2).transpose(1, 2)[0]  # (n_k, 3)
        torch.testing.assert_close(s.coordinates(k), pooled)


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--coord-frequencies", "-1"], "--coord-frequencies must be >= 0"),
    (["--ar-scale-loss-power", "2"], "--ar-scale-loss-power must be in [0, 1]"),
    (["--motion-dropout", "1"], "--motion-dropout must be in [0, 1)"),
    (["--tok-layout", "-1"], "--tok-layout must be in [0, --size=32]"),
    (["--tok-layout", "33"], "--tok-layout must be in [0, --size=32]"),
    (["--samples-per-class", "0"], "must be >= 1"),
    (["--edit-videos", "257"], "the held-out set has 256 videos"),
    (["--quick", "--edit-videos", "65"], "the held-out set has 64 videos"),
])
def test_video_demo_refuses_bad_settings_before_training(argv, message, capsys):
    """Settings that would fail (or be silently cut) after minutes of training are refused at parse time."""
    from examples.video_demo import parse_args
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err
    assert parse_args(["--edit-videos", "256"]).edit_videos == 256


def test_velocity_commit_benchmark_given_every_scale_reproduces_the_tokenizer(tmp_path):
    """benchmarks.video_velocity_commit: with all of frame 1's scales given, the sampled frames 1-2
    are the tokenizer's reconstruction, so the last row scores exactly what the tokenizer does (a
    wrong scale offset in the known masks breaks this); with none given they are drawn (an
    untrained model: another velocity)."""
    from benchmarks import video_velocity_commit as vc
    tok = tiny_tokenizer("frame", frames=5, height=32, width=32)  # latent (3, 8, 8): scales 1, 2, 4, 8 per frame
    model = tiny_transformer(tok, num_classes=10)
    msar.Pipeline(tok, model).save_pretrained(tmp_path / "pipe")
    out = vc.main(["--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "vc.json"), "--videos", "8",
                   "--threads", "1"])
    rows = out["rows"]
    assert [r["frame1_scales_given"] for r in rows] == list(range(tok.schedule.scales_per_frame + 1))
    assert rows[-1]["velocity_error"] == pytest.approx(out["tokenizer_reconstruction"]["velocity_error"], abs=1e-9)
    assert rows[0]["velocity_error"] != pytest.approx(rows[-1]["velocity_error"], abs=1e-6)
    assert [p["side"] for p in out["position_probe"]] == [[1, 1], [2, 2]]
    assert json.load(open(tmp_path / "vc.json"))["run"]["command"]
