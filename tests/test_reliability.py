"""Reliability: training killed with SIGKILL resumes exactly, checkpoints refuse pickled code,
non-finite VQ-VAE steps are caught, and seeded sampling is bit-identical.

The kill-and-resume tests run real training in child processes (``fork``: no second
torch import, so they stay cheap) and kill them with SIGKILL from outside at a step
drawn from a seeded RNG.  The resumed child deliberately starts from other initial
weights and other global RNG states: everything that makes the continuation exact
(weights, optimizer, lr schedule, EMA, data position, RNG of every rank) must come
from the checkpoint.  What the existing trainer tests already prove in-process
(tests/test_training.py, tests/test_checkpoint.py) is not repeated here.
"""
from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import random
import signal
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from msar import MultiScaleResidualQuantizer, MultiScaleVQTokenizer, NextScaleTransformer, TransformerConfig, sample
from msar.training import (CheckpointError, NonFiniteError, TransformerTrainConfig, TransformerTrainer,
                           VQVAETrainConfig, VQVAETrainer, build_loader, list_checkpoints, load_checkpoint,
                           load_latest)
from msar.training import checkpoint as ckmod

SCHED = [(1, 1), (2, 2), (4, 4)]
V, C = 16, 8
STEPS = 12          # 3 epochs of 4 batches: kills land mid-epoch and across epoch boundaries
ITEMS = 16
TIMEOUT = 120.0     # a child that has not finished by then is hung: fail, never wait forever
FORK = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
needs_fork = pytest.mark.skipif(FORK is None, reason="needs the fork start method (POSIX)")
# Training in a forked child: with a GPU visible, torch's autograd runs device threads, and a child
# forked after any backward pass (earlier tests in this process) refuses to run autograd. These tests
# prove CPU resume semantics; on such a machine the GPU path is covered by the CUDA tests.
needs_fork_training = pytest.mark.skipif(FORK is None or torch.cuda.is_available(),
                                         reason="trains in forked children: needs fork, and no visible GPU")


# ---------------------------------------------------------------------------- the training job
class SlowData(torch.utils.data.Dataset):
    """Images + labels; ``delay`` seconds per item (timing only, never numerics) and an
    optional stall at item ``stall_at`` so a killed child can never finish first."""

    def __init__(self, kind: str, delay: float = 0.0, stall_at: int | None = None):
        g = torch.Generator().manual_seed(0)
        if kind == "vqvae":  # smooth images the tiny conv tokenizer can learn
            self.x = F.interpolate(torch.randn(ITEMS, 3, 2, 2, generator=g), size=(8, 8), mode="bilinear",
                                   align_corners=False)
        else:
            self.x = torch.randn(ITEMS, 3, 4, 4, generator=g)
        self.y = torch.randint(0, 4, (ITEMS,), generator=g)
        self.delay, self.stall_at, self.served = delay, stall_at, 0

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, i: int):
        self.served += 1
        if self.stall_at is not None and self.served >= self.stall_at:
            time.sleep(3600)  # wait for the SIGKILL
        if self.delay:
            time.sleep(self.delay)
        return self.x[i], self.y[i]


def _frozen_tokenizer() -> MultiScaleVQTokenizer:
    torch.manual_seed(0)
    return MultiScaleVQTokenizer(nn.Conv2d(3, C, 1), nn.Conv2d(C, 3, 1),
                                 MultiScaleResidualQuantizer(V, C, SCHED, phi_ratio=0.5))


def _conv_tokenizer(seed: int) -> MultiScaleVQTokenizer:
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, C, 3, stride=2, padding=1))
    dec = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(C, 16, 3, padding=1), nn.GELU(),
                        nn.Conv2d(16, 3, 3, padding=1))
    return MultiScaleVQTokenizer(enc, dec, MultiScaleResidualQuantizer(32, C, SCHED))


def _disc(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3, padding=1))


def _digest(modules) -> str:
    h = hashlib.sha256()
    for m in modules:
        for k, v in m.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_job(kind: str, out: str, tag: str, fresh_seed: int = 0, delay: float = 0.0, stall_at: int | None = None,
              rank: int = 0, world: int = 1, port: int = 0, kill_in_save: int | None = None) -> None:
    """One training process: builds everything, resumes from ``out/ckpt`` when it holds a
    checkpoint, trains to ``STEPS`` and writes its step records to ``out/<tag>.rank<r>.json``.

    ``fresh_seed`` seeds the initial weights and global RNGs: a resumed run passes another
    value than the original, so only the checkpoint can make it continue exactly.
    Global RNGs are also offset by ``rank`` (ranks draw different dropout masks), which
    DDP resume must respect.  ``kill_in_save=k`` makes the process SIGKILL itself halfway
    through writing ``state.pt`` of step k.
    """
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if kill_in_save is not None:
        real = ckmod.atomic_write_bytes

        def dying_write(path, data):
            if path.name == ckmod.STATE_FILE and path.parent.name.startswith(f".tmp-step_{kill_in_save:06d}-"):
                with open(path.with_suffix(".partial"), "wb") as f:  # half a file, then the power goes
                    f.write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, data)
        ckmod.atomic_write_bytes = dying_write
    seed = fresh_seed * 1000 + rank
    random.seed(seed)
    np.random.seed(seed)
    common = dict(total_steps=STEPS, warmup_steps=3, ckpt_dir=os.path.join(out, "ckpt"), ckpt_every=1, keep_last=3,
                  log_dir=os.path.join(out, "log"), tensorboard=False, progress=False, ema_decay=0.9)
    if kind == "transformer":
        torch.manual_seed(fresh_seed)
        model = NextScaleTransformer(TransformerConfig(schedule=SCHED, vocab_size=V, latent_dim=C, num_classes=4,
                                                       depth=1, embed_dim=32, num_heads=2, cond_drop_rate=0.2,
                                                       drop_rate=0.1)).init_weights()
        trainer = TransformerTrainer(model, _frozen_tokenizer(), TransformerTrainConfig(lr=3e-3, **common))
        modules = [trainer.model, trainer.ema.module]
    else:
        trainer = VQVAETrainer(_conv_tokenizer(fresh_seed), VQVAETrainConfig(lr=3e-3, grad_accum=2, restart_every=3,
                                                                             disc_start=4, **common),
                               discriminator=_disc(fresh_seed + 1))
        modules = [trainer.model, trainer.ema.module, trainer.discriminator]
    torch.manual_seed(seed)  # after building: the global RNG state of this process is arbitrary
    loader = build_loader(SlowData(kind, delay, stall_at), batch_size=4 // world if kind == "transformer" else 2,
                          seed=1)
    records = trainer.fit(loader)
    result = {"records": records, "digest": _digest(modules), "step": trainer.step}
    with open(os.path.join(out, f"{tag}.rank{rank}.json"), "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------- process plumbing
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, **kw) -> list:
    port = _free_port() if world > 1 else 0
    procs = [FORK.Process(target=train_job, kwargs=dict(kw, rank=r, world=world, port=port)) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def _join(procs, timeout: float = TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} training process(es) hung for {timeout} s"
    return [p.exitcode for p in procs]


def _run(world: int, **kw) -> None:
    assert _join(_launch(world, **kw)) == [0] * world


def _reference(world: int, out: Path, kind: str) -> list[dict]:
    """The uninterrupted run. A single process trains right here (it also warms up the lazy
    imports and kernels every forked child then inherits); DDP needs its ranks forked."""
    if world > 1:
        _run(world, kind=kind, out=str(out), tag="ref")
    else:
        rng = ckmod.capture_rng_state()
        with warnings.catch_warnings():
            train_job(kind, str(out), "ref")
        ckmod.restore_rng_state(rng)
    return _results(out, "ref", world)


def _kill_after_checkpoint(world: int, out: Path, kill_step: int, **kw) -> int:
    """Start a run, wait until the checkpoint of ``kill_step`` exists, SIGKILL every rank
    (wherever it is: mid-step, mid-checkpoint-write); returns the newest step on disk."""
    per_step = 4 // world  # items one rank reads per optimizer step
    procs = _launch(world, out=str(out), stall_at=(kill_step + 2) * per_step + 1, **kw)
    deadline = time.monotonic() + TIMEOUT
    while not any(s >= kill_step for s, _ in list_checkpoints(out / "ckpt")):
        assert all(p.is_alive() for p in procs), "training died before it was killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.002)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    assert _join(procs) == [-signal.SIGKILL] * world
    return max(s for s, _ in list_checkpoints(out / "ckpt"))


def _results(out: Path, tag: str, world: int) -> list[dict]:
    return [json.loads((out / f"{tag}.rank{r}.json").read_text()) for r in range(world)]


def _losses(res: dict) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in res["records"]]


def _check_exact_resume(tmp_path: Path, kind: str, world: int, kill_seed: int) -> int:
    kill_step = random.Random(kill_seed).randint(2, STEPS - 4)
    ref = _reference(world, tmp_path / "ref", kind)

    run = tmp_path / "run"
    last = _kill_after_checkpoint(world, run, kill_step, kind=kind, tag="killed")
    assert kill_step <= last < STEPS
    assert not list(run.glob("killed.rank*.json"))  # it really died before finishing
    _run(world, kind=kind, out=str(run), tag="resumed", fresh_seed=7)
    resumed = _results(run, "resumed", world)
    for r in range(world):
        got = _losses(resumed[r])
        start = got[0][0] - 1
        assert start == last  # the newest checkpoint on disk is complete (written atomically) and used
        assert got == _losses(ref[r])[start:], f"rank {r}: loss after resuming at step {start} differs"
        assert resumed[r]["digest"] == ref[r]["digest"], f"rank {r}: final weights / EMA differ"
    with open(run / "log" / "train.csv") as f:  # each step logged exactly once despite the kill
        assert [int(row["step"]) for row in csv.DictReader(f)] == list(range(1, STEPS + 1))
    return kill_step


# ---------------------------------------------------------------------------- 1. kill and resume
@needs_fork_training
def test_transformer_killed_with_sigkill_resumes_exactly(tmp_path):
    _check_exact_resume(tmp_path, "transformer", world=1, kill_seed=0)


@needs_fork_training
def test_vqvae_killed_mid_checkpoint_write_falls_back_and_resumes_exactly(tmp_path):
    """The VQ-VAE run (generator + discriminator optimizers, dead-code restarts, grad
    accumulation) dies halfway through writing the checkpoint of step k: step k never
    appears, its temp directory is ignored; the newest complete checkpoint is then
    corrupted on disk too, so resume must name it and fall back one more."""
    k = random.Random(1).randint(4, STEPS - 2)
    ref = _reference(1, tmp_path / "ref", "vqvae")[0]

    run = tmp_path / "run"
    assert _join(_launch(1, kind="vqvae", out=str(run), tag="killed", kill_in_save=k)) == [-signal.SIGKILL]
    ckpt = run / "ckpt"
    assert [s for s, _ in list_checkpoints(ckpt)] == [k - 3, k - 2, k - 1]
    assert [p.name for p in ckpt.iterdir() if p.name.startswith(f".tmp-step_{k:06d}")]  # debris of the kill
    bad = ckpt / f"step_{k - 1:06d}" / "model.model.safetensors"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.warns(UserWarning, match=str(bad).replace(".", r"\.")):
        assert load_latest(ckpt).step == k - 2

    _run(1, kind="vqvae", out=str(run), tag="resumed", fresh_seed=7)
    got = _losses(_results(run, "resumed", 1)[0])
    assert got[0][0] == k - 1
    assert got == _losses(ref)[k - 2:]
    assert _results(run, "resumed", 1)[0]["digest"] == ref["digest"]


@needs_fork_training
def test_ddp_two_ranks_killed_with_sigkill_resume_exactly(tmp_path):
    """2 CPU processes, gloo; ranks draw different dropout masks (different RNG states),
    so each rank must get its own RNG state back."""
    _check_exact_resume(tmp_path, "transformer", world=2, kill_seed=2)


# ---------------------------------------------------------------------------- 1b. the demos resume after a kill
def _demo_child(main, argv: list, trainer: str, kill_step: int) -> None:
    """Run a demo's ``main(argv)`` and SIGKILL this process right after ``trainer`` (a class
    name) has written its checkpoint of ``kill_step``."""
    from msar.training import base
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    real = base.Trainer.save

    def save(self, ckpt_dir=None):
        path = real(self, ckpt_dir)
        if type(self).__name__ == trainer and self.step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path
    base.Trainer.save = save
    main(argv)


def _csv_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _check_demo_resumes(tmp_path: Path, main, argv, metrics: str, logs: list[str], trainer: str, kill_step: int,
                        volatile: set) -> None:
    """An uninterrupted demo run and one killed after ``trainer``'s checkpoint of ``kill_step``,
    then rerun with the same command, agree exactly: every logged step, every metric."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(argv(ref))
    child = FORK.Process(target=_demo_child, args=(main, argv(run), trainer, kill_step))
    child.start()
    assert _join([child]) == [-signal.SIGKILL]
    assert not (run / metrics).exists()  # it died before finishing
    from msar.training import base
    steps, real = [], base.Trainer.optimizer_step

    def counting_step(self, batch):
        steps.append((type(self).__name__, self.step + 1))
        return real(self, batch)
    base.Trainer.optimizer_step = counting_step
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main(argv(run))
    finally:
        base.Trainer.optimizer_step = real
    first = next(s for name, s in steps if name == trainer)
    assert first == kill_step + 1, f"the rerun trained {trainer} from step {first}, not from its checkpoint"
    for log in logs:  # each step once, with the uninterrupted run's numbers
        assert _csv_rows(run / log) == _csv_rows(ref / log), log
    got, want = (json.loads((d / metrics).read_text()) for d in (run, ref))
    assert {k: v for k, v in got.items() if k not in volatile} == {k: v for k, v in want.items() if k not in volatile}


@needs_fork_training
def test_voxel_demo_killed_during_tokenizer_training_resumes_exactly(tmp_path):
    """Killed after the tokenizer's checkpoint of step 2 of 4, the rerun resumes the tokenizer,
    then trains the transformer: logs, reconstructions, samples and completions equal those of
    a run that never stopped (catches e.g. a transformer initialised from an RNG state that
    depends on whether the tokenizer was resumed)."""
    from examples.voxel_demo import main

    def argv(out):
        return ["--quick", "--out", str(out), "--n-train", "16", "--n-test", "9", "--tok-steps", "4", "--ar-steps",
                "3", "--batch", "4", "--gen-per-class", "1", "--points", "16", "--ckpt-every", "1"]
    _check_demo_resumes(tmp_path, main, argv, "metrics.json",
                        ["logs_tokenizer/train.csv", "logs_transformer/train.csv"], "VQVAETrainer", 2,
                        volatile={"config", "timings", "run"})


@needs_fork_training
def test_graph_demo_killed_during_training_resumes_exactly(tmp_path):
    from examples.graph_demo import main

    def argv(out):
        return ["--dataset", "community-small", "--quick", "--out", str(out), "--steps", "4", "--batch", "4",
                "--perms", "1", "--num-samples", "4", "--ckpt-every", "1"]
    _check_demo_resumes(tmp_path / "x", main, argv, "community-small/metrics.json",
                        ["community-small/logs/train.csv"], "TransformerTrainer", 2,
                        volatile={"seconds", "run"})


# ---------------------------------------------------------------------------- 2. no pickled code runs
class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rehash(step_dir: Path, fname: str) -> None:
    """Make the manifest vouch for a replaced file (a forged checkpoint, not a corrupted one)."""
    man = json.loads((step_dir / "manifest.json").read_text())
    data = (step_dir / fname).read_bytes()
    man["files"][fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (step_dir / "manifest.json").write_text(json.dumps(man))


def test_pickled_code_in_a_training_checkpoint_is_refused(tmp_path):
    model = nn.Linear(2, 2)
    ckmod.save_checkpoint(tmp_path, 1, {"model": model})
    forged = ckmod.save_checkpoint(tmp_path, 2, {"model": model})
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "extra": _Payload(marker)}, forged / "state.pt")
    _rehash(forged, "state.pt")
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot read training state: refused: .*pickled objects "
                                              r"other than tensors.*GLOBAL posix\.system") as e:
        load_checkpoint(forged)
    assert e.value.path == forged / "state.pt" and "weights_only=False" not in str(e.value)
    with pytest.warns(UserWarning, match="step_000002.*refused"):
        assert load_latest(tmp_path).step == 1  # resume falls back to the previous good checkpoint
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["zip", "raw_pickle"])
def test_pickled_code_in_a_weights_file_is_refused(tmp_path, fmt):
    from modalities.image import read_state_dict
    from modalities.image.checkpoint import CheckpointError as ImageCheckpointError
    marker, path = tmp_path / "pwned", tmp_path / "var_d16.pth"
    sd = {"head.weight": torch.zeros(2, 2), "head.bias": _Payload(marker)}
    if fmt == "zip":
        torch.save(sd, path)
    else:
        path.write_bytes(pickle.dumps(sd))
    with pytest.raises(ImageCheckpointError, match=r"var_d16\.pth as a weights-only torch checkpoint: refused"):
        read_state_dict(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- 3. numerics (VQ-VAE trainer)
def _vq_trainer(on_nonfinite: str, disc_start: int = 0) -> VQVAETrainer:
    cfg = VQVAETrainConfig(lr=1e-3, total_steps=10, disc_start=disc_start, on_nonfinite=on_nonfinite,
                           progress=False, tensorboard=False)
    return VQVAETrainer(_conv_tokenizer(0), cfg, discriminator=_disc(1))


def test_vqvae_nonfinite_loss_names_step_and_term():
    x = SlowData("vqvae").x[:4]
    tr = _vq_trainer("raise")
    tr.train_step(x)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 1 \(batch 1\): non-finite in l1=nan, l2=nan, vq=nan"):
        tr.train_step(bad)

    tr = _vq_trainer("skip")
    tr.train_step(x)
    before = [p.detach().clone() for m in (tr.model, tr.discriminator) for p in m.parameters()]
    with pytest.warns(UserWarning, match=r"step 1 .*l1=nan.*skipping this step"):
        rec = tr.train_step(bad)
    after = [p for m in (tr.model, tr.discriminator) for p in m.parameters()]
    assert rec["skipped"] == 1 and tr.nonfinite_steps == 1 and tr.step == 2
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # generator and discriminator untouched
    assert tr.train_step(x)["skipped"] == 0


def test_vqvae_nonfinite_gradient_names_the_parameter_or_the_gan_weight():
    x = SlowData("vqvae").x[:4]
    tr = _vq_trainer("raise", disc_start=100)
    tr.model.decoder[-1].weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match=r"gradient norm of \['model'\] at step 0.*decoder\.3\.weight"):
        tr.train_step(x)
    # with the GAN on, the same gradient first poisons the adaptive weight ||grad nll|| / ||grad G||
    tr = _vq_trainer("raise", disc_start=0)
    tr.model.decoder[-1].weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match=r"step 0 .*non-finite in d_weight=nan \(finite: l1, l2, vq, g_loss"):
        tr.train_step(x)


# ---------------------------------------------------------------------------- 5. determinism
def _sampler_setup():
    torch.manual_seed(0)
    sched = [(1, 1), (2, 2), (3, 3)]
    tok = MultiScaleVQTokenizer(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 3, 1), MultiScaleResidualQuantizer(32, 4, sched))
    model = NextScaleTransformer(TransformerConfig(schedule=sched, vocab_size=32, latent_dim=4, num_classes=3,
                                                   depth=2, embed_dim=32, num_heads=2)).init_weights(init_head=1.0)
    return model.eval(), tok.eval()


def _draw(model, tok, seed: int):
    out = sample(model, tok, [0, 1, 2, 1], cfg=2.0, top_k=12, top_p=0.9, more_smooth=True, seed=seed)
    return out.indices, out.data


def _sample_in_child(path: str, seed: int) -> None:
    torch.manual_seed(999)  # another global RNG state, another process
    model, tok = _sampler_setup()
    torch.save(_draw(model, tok, seed), path)


@needs_fork
def test_same_seed_gives_bit_identical_samples_on_cpu(tmp_path):
    """top-k + top-p + Gumbel smoothing: the seeded generator is the only randomness, so the
    samples are bit-identical whatever the global RNG state, in this process or another."""
    model, tok = _sampler_setup()
    torch.manual_seed(1)
    idx, data = _draw(model, tok, seed=11)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    idx2, data2 = _draw(model, tok, seed=11)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not consumed (training stays exact)
    child = FORK.Process(target=_sample_in_child, args=(str(tmp_path / "child.pt"), 11))
    child.start()
    assert _join([child]) == [0]
    idx3, data3 = torch.load(tmp_path / "child.pt")
    for other_idx, other_data in ((idx2, data2), (idx3, data3)):
        assert all(torch.equal(a, b) for a, b in zip(idx, other_idx))
        assert torch.equal(data, other_data)  # bit-identical, not merely close
    idx4, _ = _draw(model, tok, seed=12)
    assert any(not torch.equal(a, b) for a, b in zip(idx, idx4))
