"""Trainers: learning on a fixed batch, exact resume, non-finite detection, schedules, parameter groups."""
import csv
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.utils.data import Dataset

from msar import MultiScaleResidualQuantizer, MultiScaleVQTokenizer, NextScaleTransformer, TransformerConfig
from msar.training import (NonFiniteError, TokenDataset, TransformerTrainConfig, collate_tokens, TransformerTrainer, VQVAETrainConfig,
                           VQVAETrainer, WarmupDecaySchedule, build_loader, build_optimizer, list_checkpoints,
                           lr_ratio, param_groups, wd_value)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation cost (badly so on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SCHED = [(1, 1), (2, 2), (4, 4)]
V, C = 16, 8


def tiny_tokenizer(seed=0):
    torch.manual_seed(seed)
    q = MultiScaleResidualQuantizer(V, C, SCHED, phi_ratio=0.5)
    return MultiScaleVQTokenizer(nn.Conv2d(3, C, 1), nn.Conv2d(C, 3, 1), q)


def tiny_transformer(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(schedule=SCHED, vocab_size=V, latent_dim=C, num_classes=4, depth=1, embed_dim=32, num_heads=2,
               cond_drop_rate=0.2, drop_rate=0.1)
    cfg.update(kw)
    return NextScaleTransformer(TransformerConfig(**cfg)).init_weights()


def cfg(**kw):
    base = dict(lr=3e-3, total_steps=20, warmup_steps=2, progress=False, tensorboard=False)
    base.update(kw)
    return TransformerTrainConfig(**base)


class Images(Dataset):
    def __init__(self, n=20, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 4, 4, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


# ---------------------------------------------------------------------------- transformer
def test_loss_falls_on_fixed_batch_and_logs_per_scale():
    tok = tiny_tokenizer()
    tr = TransformerTrainer(tiny_transformer(drop_rate=0.0, cond_drop_rate=0.0), tok, cfg(total_steps=40))
    x, y = Images(8)[:]
    idx = tok.encode(x)
    recs = [tr.train_step(idx, y) for _ in range(25)]
    assert recs[-1]["loss"] < 0.7 * recs[0]["loss"]
    assert {"loss_k0", "loss_k1", "loss_k2", "acc_k0", "acc_k2", "lr", "grad_norm"} <= recs[0].keys()
    # the per-scale losses are token-weighted pieces of the total
    r = recs[-1]
    assert math.isclose(r["loss"], (r["loss_k0"] * 1 + r["loss_k1"] * 4 + r["loss_k2"] * 16) / 21, rel_tol=1e-5)
    ev = tr.evaluate([(idx, y)])
    assert ev["acc"] > 0.3 and set(ev) >= {"loss", "acc", "loss_k2", "acc_k1"}


def test_raw_data_and_indices_give_the_same_batch():
    tok = tiny_tokenizer()
    tr = TransformerTrainer(tiny_transformer(), tok, cfg())
    x, y = Images(4)[:]
    a, b = tr.parse_batch((x, y)), tr.parse_batch((tok.encode(x), y))
    assert all(torch.equal(i, j) for i, j in zip(a[0], b[0]))
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    # data alone: unconditional; the loss runs the null class, while a label equal to
    # num_classes given explicitly is rejected (it would silently train unconditionally)
    batch = tr.parse_batch((x,))
    assert batch[1] is None and torch.isfinite(tr.compute_loss(batch).loss)
    with pytest.raises(ValueError, match="null class"):
        tr.train_step(tok.encode(x), torch.full((4,), 4))
    with pytest.raises(ValueError, match="token index out of range"):
        tr.train_step([i + V for i in tok.encode(x)], y)


def test_token_dataset_batches_equal_encoding_on_the_fly():
    tok = tiny_tokenizer()
    x, y = Images(10)[:]
    ds = TokenDataset.encode(tok, x, y, batch_size=3)  # chunks of 3, 3, 3, 1 must concatenate in order
    assert len(ds) == 10 and [t.shape for t in ds.indices] == [(10, 1), (10, 4), (10, 16)]
    tr = TransformerTrainer(tiny_transformer(), tok, cfg())
    idx, labels = collate_tokens([ds[i] for i in (7, 2, 9)])
    a, b = tr.parse_batch((idx, labels)), tr.parse_batch((x[[7, 2, 9]], y[[7, 2, 9]]))
    assert all(torch.equal(i, j) for i, j in zip(a[0], b[0])) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    # unconditional: labels None -> the null class
    idx, labels = collate_tokens([TokenDataset(ds.indices)[i] for i in range(2)])
    assert labels is None and tr.parse_batch((idx, labels))[1] is None
    with pytest.raises(ValueError, match=r"indices\[1\] must be a long tensor"):
        TokenDataset([ds.indices[0], ds.indices[1][:5]])
    with pytest.raises(ValueError, match="labels must be"):
        TokenDataset(ds.indices, y[:3])


def test_token_dataset_carries_vector_conditions_to_the_loss():
    """(N, D) float features: a batch becomes a vector Condition with each sample's own row, so the
    loss equals the loss on the features passed directly (a shuffled or dropped row would differ)."""
    tok = tiny_tokenizer()
    x, _ = Images(6)[:]
    feats = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    ds = TokenDataset.encode(tok, x, feats)
    model = tiny_transformer(num_classes=0, cond_kind="vector", cond_dim=5, cond_drop_rate=0.0, drop_rate=0.0)
    with torch.no_grad():  # VAR's init zeroes the condition's AdaLN path: make the condition matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tr = TransformerTrainer(model, tok, cfg())
    batch = tr.parse_batch(collate_tokens([ds[i] for i in (4, 1, 3)]))
    assert batch[1].kind == "vector" and torch.equal(batch[1].features, feats[[4, 1, 3]])
    direct = tr.compute_loss(tr.parse_batch((x[[4, 1, 3]], feats[[4, 1, 3]]))).loss
    assert torch.allclose(tr.compute_loss(batch).loss, direct)
    other = tr.compute_loss(tr.parse_batch((x[[4, 1, 3]], feats[[1, 4, 3]]))).loss
    assert not torch.allclose(other, direct)
    with pytest.raises(ValueError, match="labels must be class labels"):
        TokenDataset(ds.indices, feats[:, 0])  # (N,) floats: neither labels nor features


def _run(tmp_path, steps, resume_from_fresh=False, seed=0, accum=1, **kw):
    tok = tiny_tokenizer()
    model = tiny_transformer(seed=seed)
    c = cfg(total_steps=9, ckpt_dir=str(tmp_path / "ckpt"), ckpt_every=3, keep_last=5, grad_accum=accum,
            log_dir=str(tmp_path / "log"), ema_decay=0.9, **kw)
    tr = TransformerTrainer(model, tok, c)
    loader = build_loader(Images(20), batch_size=4, shuffle=True, seed=1)  # 5 batches / epoch
    return tr, tr.fit(loader, steps)


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_reproduces_uninterrupted_run(tmp_path, accum):
    tr_full, full = _run(tmp_path / "a", 9, accum=accum)
    _, first = _run(tmp_path / "b", 4, accum=accum)   # saves at 3 and at the end (4)
    ck_dir = tmp_path / "b" / "ckpt"
    assert [s for s, _ in list_checkpoints(ck_dir)] == [3, 4]
    # a fresh process: different initial weights, RNG moved on -- everything must come from the checkpoint
    torch.manual_seed(1234)
    tr, rest = _run(tmp_path / "b", 9, seed=7, accum=accum)
    assert [r["step"] for r in rest] == [5, 6, 7, 8, 9]
    assert [r["loss"] for r in first + rest] == [r["loss"] for r in full]
    assert tr.batches_seen == 9 * accum
    for a, b in zip(tr_full.ema.module.parameters(), tr.ema.module.parameters()):  # EMA resumed too
        assert torch.equal(a, b)
    assert tr.evaluate([Images(4)[:]])["loss"] > 0  # EMA weights, logged to val.csv
    assert (tmp_path / "b" / "log" / "val.csv").is_file()
    # the CSV log has each step exactly once
    with open(tmp_path / "b" / "log" / "train.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 10))


def test_evaluating_between_fit_calls_leaves_the_training_unchanged():
    """Training paused to evaluate (``fit(steps=a)``, ``evaluate``, ``fit(steps=b)``, as the graph demo's
    ``--val-every`` does) must equal one ``fit(steps=b)``.  Catches: an evaluation loader that draws from
    the global RNG (a plain shuffling DataLoader does, on ``iter``) moving every later dropout mask."""
    tok = tiny_tokenizer()
    losses = []
    for pause in (False, True):
        tr = TransformerTrainer(tiny_transformer(drop_rate=0.2), tok, cfg(total_steps=8))
        loader = build_loader(Images(20), batch_size=4, shuffle=True, seed=1)
        torch.manual_seed(5)
        if pause:
            tr.fit(loader, 3)
            val = torch.utils.data.DataLoader(Images(8), batch_size=4, shuffle=True)  # draws the global RNG
            assert tr.evaluate(val, log=False)["loss"] > 0
        losses.append([r["loss"] for r in tr.fit(loader, 8)])
    assert losses[1] == losses[0][3:]


@pytest.mark.cuda
def test_on_a_gpu_machine_the_trainer_follows_the_model_and_resumes_on_cuda(tmp_path):
    """Catches: a trainer that moves a CPU model to the GPU when one is visible (every CPU program
    then feeds CPU tensors to CUDA weights), and a resume that fails on CUDA (the saved RNG states
    are loaded onto the GPU and must be restored from there)."""
    tr = TransformerTrainer(tiny_transformer(), tiny_tokenizer(), cfg())
    assert tr.device.type == "cpu" and next(tr.model.parameters()).device.type == "cpu"
    tr = TransformerTrainer(tiny_transformer().cuda(), tiny_tokenizer(), cfg())
    assert tr.device.type == "cuda"
    tr_full, full = _run(tmp_path / "a", 9, device="cuda")
    assert next(tr_full.model.parameters()).device.type == "cuda"
    _run(tmp_path / "b", 4, device="cuda")
    tr, rest = _run(tmp_path / "b", 9, seed=7, device="cuda")
    assert [r["step"] for r in rest] == [5, 6, 7, 8, 9]
    # the same batches and dropout draws; CUDA kernels may differ in the last bits between runs
    assert [r["loss"] for r in rest] == pytest.approx([r["loss"] for r in full[4:]], rel=1e-4)


def test_resume_skips_corrupt_latest(tmp_path):
    _run(tmp_path, 6)
    latest = tmp_path / "ckpt" / "step_000006" / "state.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    tok, model = tiny_tokenizer(), tiny_transformer()
    tr = TransformerTrainer(model, tok, cfg(total_steps=9, ckpt_dir=str(tmp_path / "ckpt"), ema_decay=0.9))
    with pytest.warns(UserWarning, match="step_000006"):
        ck = tr.resume()
    assert ck.step == 3 and tr.step == 3 and tr.batches_seen == 3


def _nan_at_scale(model, k, when):
    """Forward hook making the logits of scale k NaN while `when()` is true."""
    sl = model.schedule.slice(k)

    def hook(_, __, out):
        if when():
            out = out.clone()
            out[:, sl] = float("nan")
        return out
    model.register_forward_hook(hook)


def test_nonfinite_loss_names_step_and_scale():
    tok = tiny_tokenizer()
    model = tiny_transformer()
    tr = TransformerTrainer(model, tok, cfg(on_nonfinite="raise"))
    _nan_at_scale(model, 2, lambda: tr.step == 2)
    x, y = Images(4)[:]
    idx = tok.encode(x)
    tr.train_step(idx, y)
    tr.train_step(idx, y)
    with pytest.raises(NonFiniteError, match=r"step 2 .*scale 2 \(4, 4\)=nan.*finite: scale 0 \(1, 1\), scale 1"):
        tr.train_step(idx, y)


def test_nonfinite_loss_skip_leaves_weights_untouched():
    tok = tiny_tokenizer()
    model = tiny_transformer()
    tr = TransformerTrainer(model, tok, cfg(on_nonfinite="skip"))
    flag = {"on": True}
    _nan_at_scale(model, 1, lambda: flag["on"])
    x, y = Images(4)[:]
    idx = tok.encode(x)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match=r"step 0 .*scale 1 \(2, 2\)=nan"):
        rec = tr.train_step(idx, y)
    assert rec["skipped"] == 1 and tr.step == 1 and tr.nonfinite_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    flag["on"] = False
    assert tr.train_step(idx, y)["skipped"] == 0


def test_nonfinite_gradient_is_reported():
    tok = tiny_tokenizer()
    model = tiny_transformer()
    tr = TransformerTrainer(model, tok, cfg(on_nonfinite="raise"))
    model.head.weight.register_hook(lambda g: g * float("inf"))
    x, y = Images(4)[:]
    with pytest.raises(NonFiniteError, match=r"gradient norm .*step 0.*head\.weight"):
        tr.train_step(tok.encode(x), y)


def test_grad_accumulation_matches_big_batch():
    tok = tiny_tokenizer()
    x, y = Images(8)[:]
    idx = tok.encode(x)
    params = []
    for accum in (1, 2):
        model = tiny_transformer(drop_rate=0.0, cond_drop_rate=0.0)
        tr = TransformerTrainer(model, tok, cfg(grad_accum=accum))
        if accum == 1:
            tr.train_step(idx, y)
        else:
            assert tr.train_step([i[:4] for i in idx], y[:4]) is None
            assert tr.train_step([i[4:] for i in idx], y[4:])["step"] == 1
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="amp"):
        TransformerTrainer(tiny_transformer(), tiny_tokenizer(), cfg(amp="fp8"))
    with pytest.raises(ValueError, match="on_nonfinite"):
        TransformerTrainer(tiny_transformer(), tiny_tokenizer(), cfg(on_nonfinite="ignore"))
    with pytest.raises(ValueError, match="schedule"):
        TransformerTrainer(tiny_transformer(schedule=[(1, 1), (2, 2)]), tiny_tokenizer(), cfg())


# ---------------------------------------------------------------------------- optimizer and schedule
def test_var_no_decay_groups():
    model = tiny_transformer(shared_aln=True)
    decay, no_decay = param_groups(model, 0.05)
    nd = set(no_decay["names"])
    for name in ("pos_embed", "start_pos", "level_embed.weight", "head.bias", "blocks.0.attn.q_bias",
                 "blocks.0.attn.attn_scale", "blocks.0.adaln_offset"):
        assert name in nd, name
    for name in ("class_embed.weight", "blocks.0.attn.qkv.weight", "head.weight", "input_proj.weight"):
        assert name in decay["names"], name
    assert decay["wd_scale"] == 1.0 and no_decay["wd_scale"] == 0.0
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_lr_schedule_values():
    T, W = 101, 10
    assert lr_ratio(0, T, W) == pytest.approx(0.005)
    assert lr_ratio(5, T, W) == pytest.approx(0.005 + 0.995 * 0.5)
    assert lr_ratio(W, T, W) == 1.0
    assert lr_ratio(W + 4, T, W) == 1.0                      # lin0 holds 5% of the decay phase
    assert lr_ratio(T - 1, T, W) == pytest.approx(0.01)      # ends at final_ratio
    assert lr_ratio(T - 1, T, W, "cos") == pytest.approx(0.01)
    assert lr_ratio(W + 45, T, W, "cos") == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_ratio(W + 45, T, W, "lin00") == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_ratio(50, T, W, "const") == 1.0
    with pytest.raises(ValueError, match="lr schedule"):
        lr_ratio(50, T, W, "linear")
    assert wd_value(0, T, 0.05, 0.5) == pytest.approx(0.05) and wd_value(T - 1, T, 0.05, 0.5) == pytest.approx(0.5)

    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    opt = build_optimizer(model, lr=1.0, weight_decay=0.1)
    s = WarmupDecaySchedule(opt, peak_lr=2.0, total_steps=T, warmup_steps=W, wd_end=0.3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    for _ in range(W):
        s.step()
    assert [g["lr"] for g in opt.param_groups] == [2.0, 2.0]
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] > 0.1
    s2 = WarmupDecaySchedule(opt, peak_lr=2.0, total_steps=T, warmup_steps=W)
    s2.load_state_dict(s.state_dict())
    assert s2.step_count == W and s2.get_last_lr() == [2.0, 2.0]


@given(st.integers(2, 300), st.data())
def test_lr_schedule_shape(total, data):
    warm = data.draw(st.integers(0, total - 1))
    kind = data.draw(st.sampled_from(["lin0", "lin", "lin00", "cos"]))
    r = [lr_ratio(s, total, warm, kind) for s in range(total)]
    assert all(0.0 < v <= 1.0 for v in r)
    assert all(a <= b + 1e-12 for a, b in zip(r[:warm], r[1:warm + 1]))            # warm-up rises
    assert all(a >= b - 1e-12 for a, b in zip(r[warm:], r[warm + 1:]))             # then never rises
    if total - 1 > warm:
        assert r[-1] == pytest.approx(0.01)


# ---------------------------------------------------------------------------- VQ-VAE
def smooth_images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 2, 2, generator=g), size=(8, 8), mode="bilinear", align_corners=False)


def conv_tokenizer(seed=0):
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, C, 3, stride=2, padding=1))
    dec = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(C, 16, 3, padding=1), nn.GELU(),
                        nn.Conv2d(16, 3, 3, padding=1))
    return MultiScaleVQTokenizer(enc, dec, MultiScaleResidualQuantizer(32, C, SCHED))


def test_vqvae_reconstruction_falls():
    x = smooth_images()
    tr = VQVAETrainer(conv_tokenizer(), VQVAETrainConfig(lr=3e-3, total_steps=60, warmup_steps=3, restart_every=10,
                                                         progress=False, tensorboard=False))
    before = tr.evaluate([x])
    recs = tr.fit([x, x], steps=40)
    after = tr.evaluate([x])
    assert after["mse"] < 0.5 * before["mse"]
    assert {"l1", "l2", "vq", "usage_k0", "usage_k2"} <= recs[0].keys()
    assert any("restarted" in r for r in recs)


def test_vqvae_gan_and_perceptual_terms(tmp_path):
    x = smooth_images(8)
    calls = []

    def perceptual(a, b):
        calls.append(1)
        return (a - b).abs().mean()

    disc = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3, padding=1))
    c = VQVAETrainConfig(lr=1e-3, total_steps=10, perceptual_weight=0.5, disc_start=2, progress=False,
                         tensorboard=False, ckpt_dir=str(tmp_path / "ck"), log_dir=str(tmp_path / "log"))
    tr = VQVAETrainer(conv_tokenizer(), c, perceptual=perceptual, discriminator=disc)
    d0 = [p.detach().clone() for p in disc.parameters()]
    recs = [tr.train_step(x) for _ in range(4)]
    assert "g_loss" not in recs[1] and "g_loss" in recs[2]           # delayed start
    assert all(torch.equal(a, b) for a, b in zip(d0, [p for p in disc.parameters()])) is False
    assert math.isfinite(recs[3]["d_weight"]) and recs[3]["d_weight"] > 0 and "grad_norm_disc" in recs[3]
    assert len(calls) == 4 and "perceptual" in recs[0]
    with open(tmp_path / "log" / "train.csv") as f:  # GAN columns appear late: the header widens
        rows = list(csv.DictReader(f))
    assert [r["g_loss"] == "" for r in rows] == [True, True, False, False]
    tr.save()
    tr2 = VQVAETrainer(conv_tokenizer(seed=3), c, perceptual=perceptual, discriminator=nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3, padding=1)))
    tr2.resume()
    assert tr2.step == 4
    for a, b in zip(disc.parameters(), tr2.discriminator.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- DDP (2 CPU processes, gloo)
def _ddp_worker(rank, world, out_dir):
    import os
    import torch.distributed as dist
    import warnings
    tok = tiny_tokenizer()
    tr = TransformerTrainer(tiny_transformer(), tok, cfg(total_steps=3, ckpt_dir=os.path.join(out_dir, "ck")))
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    _nan_at_scale(tr.model, 2, lambda: rank == 1 and tr.step == 1)  # one rank goes NaN: all must skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(build_loader(Images(16), batch_size=2, seed=3), 3)
    vq = VQVAETrainer(conv_tokenizer(), VQVAETrainConfig(lr=1e-3, total_steps=4, restart_every=2, progress=False,
                                                         tensorboard=False))
    vq.fit(build_loader(torch.utils.data.TensorDataset(smooth_images(16)), batch_size=2, seed=3), 4)
    flat = torch.cat([p.detach().flatten() for m in (tr.model, vq.model) for p in m.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    torch.save({"same": all(torch.equal(gathered[0], g) for g in gathered), "step": tr.step,
                "skipped": [r["skipped"] for r in tr.history],
                "usage_total": float(vq.quantizer.usage_ema[-1].sum())},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_cpu_processes_stay_in_sync(tmp_path):
    from _distributed import run_ranks
    run_ranks(_ddp_worker, str(tmp_path))
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["same"] and res["step"] == 3 and res["skipped"] == [0, 1, 0]
        # codebook usage counts the global batch: 2 ranks x 2 images x 16 finest tokens
        # (without the trainer's all_reduce it would count one rank's 32)
        assert res["usage_total"] == pytest.approx(64, abs=0.5)
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [3]  # written once, by rank 0


def test_training_package_imports_no_modality():
    import pathlib
    import re
    import msar.training
    root = pathlib.Path(msar.training.__file__).parent
    for f in root.glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+modalities", f.read_text(), re.M), f


def test_empty_or_exhausted_loader_is_a_clear_error():
    tr = TransformerTrainer(tiny_transformer(), tiny_tokenizer(), cfg())
    with pytest.raises(ValueError, match="no batches"):
        tr.fit([], 2)
    x, y = Images(4)[:]
    with pytest.raises(ValueError, match="one-shot iterator"):
        tr.fit(iter([(x, y)]), 3)
    assert tr.step == 1


def test_ignore_index_leaves_padding_out_of_loss_and_metrics():
    """Padded positions (a PAD token in a fixed schedule) count neither in the loss nor in the
    per-scale metrics; without ignore_index they do."""
    PAD = V - 1
    model = tiny_transformer(cond_drop_rate=0.0, drop_rate=0.0).eval()
    torch.manual_seed(1)
    idx = [torch.randint(0, V - 1, (3, n)) for n in (1, 4, 16)]
    idx[2][:, 10:] = PAD  # the last 6 tokens of the finest scale are padding
    labels = torch.tensor([0, 1, 2])
    tok = tiny_tokenizer()
    masked = TransformerTrainer(model, tok, cfg(ignore_index=PAD))
    batch = masked.make_batch(idx, labels)
    out = masked.compute_loss(batch)
    ce, correct, _ = masked.token_losses(model, batch)
    keep = torch.cat(idx, 1) != PAD
    torch.testing.assert_close(out.loss, ce[keep].mean())
    torch.testing.assert_close(out.metrics["loss_k2"], ce[:, 5:][keep[:, 5:]].mean())
    ev = masked.evaluate([(idx, labels)], log=False)
    assert ev["loss_k2"] == pytest.approx(float(ce[:, 5:][keep[:, 5:]].mean()), rel=1e-5)
    assert ev["loss"] == pytest.approx(float(ce[keep].mean()), rel=1e-5)
    plain = TransformerTrainer(model, tok, cfg())
    assert not torch.allclose(plain.compute_loss(plain.make_batch(idx, labels)).loss, out.loss)


def test_extra_pos_reaches_the_model_in_training():
    """Adapter positions given to the trainer are added in every training forward: the trainer's
    loss equals the model's loss with the same positions (and differs from the loss without)."""
    model = tiny_transformer(cond_drop_rate=0.0, drop_rate=0.0).eval()
    torch.manual_seed(2)
    idx = [torch.randint(0, V, (3, n)) for n in (1, 4, 16)]
    labels = torch.tensor([0, 1, 2])
    tok = tiny_tokenizer()
    pos = torch.randn(1, model.seq_len, model.embed_dim)
    with_pos = TransformerTrainer(model, tok, cfg(), extra_pos=pos)
    plain = TransformerTrainer(model, tok, cfg())
    x = tok.teacher_forcing_input(idx)
    with torch.no_grad():
        want = F.cross_entropy(model(labels, x, extra_pos=pos).flatten(0, 1), torch.cat(idx, 1).flatten())
        got = with_pos.compute_loss(with_pos.make_batch(idx, labels)).loss
        other = plain.compute_loss(plain.make_batch(idx, labels)).loss
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, other)
    with pytest.raises(ValueError, match=r"extra_pos: expected adapter positions \(1, L, embed_dim\)"):
        TransformerTrainer(model, tok, cfg(), extra_pos=pos.expand(3, -1, -1))


def test_build_loader_leaves_the_global_random_stream_alone():
    """iter(loader) must not draw from the global RNG: otherwise a run resumed between epochs or after
    an evaluation loop replays a different dropout stream than an uninterrupted one."""
    loader = build_loader(Images(8), batch_size=4, seed=3)
    torch.manual_seed(0)
    for _ in range(3):
        list(iter(loader))
    after_iterating = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_iterating, torch.rand(3))


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_scale_loss_power_weighs_each_scale_by_its_token_count(power):
    """The optimized loss is sum_k n_k^(1-p) * mean_k / sum_k n_k^(1-p) over the per-scale mean
    cross-entropies: p = 0 the plain token mean (VAR), p = 1 the plain mean over scales (a weight on
    the wrong axis, or left unnormalized, changes the value); the logged loss stays the token mean."""
    tok = tiny_tokenizer()
    x, y = Images(4)[:]
    tr = TransformerTrainer(tiny_transformer(drop_rate=0.0, cond_drop_rate=0.0), tok, cfg(scale_loss_power=power))
    batch = tr.parse_batch((x, y))
    out = tr.compute_loss(batch)
    ce = tr.token_losses(tr.forward_model, batch)[0].detach()
    counts = torch.tensor([h * w for h, w in SCHED], dtype=torch.float32)
    means = torch.stack([part.mean() for part in ce.split(counts.long().tolist(), dim=1)])
    expected = (counts.pow(1 - power) * means).sum() / counts.pow(1 - power).sum()
    torch.testing.assert_close(out.loss.detach(), expected)
    torch.testing.assert_close(out.metrics["loss"], ce.mean())
    if power == 1.0:
        torch.testing.assert_close(out.loss.detach(), means.mean())
    with pytest.raises(ValueError, match="scale_loss_power must be in"):
        cfg(scale_loss_power=1.5).validate()
