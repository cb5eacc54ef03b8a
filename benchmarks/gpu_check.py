"""One GPU check: parity, sampling and training throughput of VAR d16 / d30 in one command.

    python -m benchmarks.gpu_check [--budget-s 450] [--out DIR]     # one H100/H200: about 7.5 minutes
    python -m benchmarks.gpu_check --smoke [--device cpu|cuda]      # tiny models, seconds (the tests)

Phases, in this order; each one has its own time budget, and the JSON
(``benchmarks/results/gpu/gpu_check_<device>.json``) is rewritten when each one ends::

    parity            the reference-VAR fixture (shared/fixtures/var_parity/tiny_a) on the device:
                      fp32 (TF32 off) must give identical tokens and every output within
                      modalities.image.parity's tolerances; bf16 autocast is judged by BF16_TOLERANCE
    sampling/<model>  msar.sample at batch 64, bf16 autocast, guidance 1.5, top-k 900, top-p 0.96,
                      tokens only (decode=False) and decoded to 256 x 256 images by the image VQ-VAE;
                      eager, and the whole call replayed as one CUDA graph; d30 also in the
                      setting of its published anchor (fp32 with TF32 as in VAR's demo, batch 128, decoded)
    training/<model>  forward + backward + AdamW steps through TransformerTrainer.train_step (bf16
                      autocast; d16 at batch 32, d30 at 16, halved on out-of-memory): tokens/s,
                      images/s, peak memory; d30 sharded with FSDP over a one-process group
    compile/<model>   the same sampling with every transformer block under torch.compile (the
                      first call's compile time is reported apart)

Random-init weights (VAR's initialisation; throughput does not depend on the values), 1000
classes, vocabulary 4096, scales 1,2,3,4,5,6,8,10,13,16. The published anchors stand beside the
measurements (other GPUs; the d30 anchor in another precision and batch): they are context,
not a pass mark.

Guards: a phase that would start with less than its minimum time left is skipped, one that
runs past its budget is interrupted (SIGALRM), an out-of-memory or any other error ends only
its own measurement or phase; all three are recorded in the JSON with the reason. A watchdog
writes the JSON and exits if the whole run passes the budget by 20 s (a hung CUDA or NCCL call).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import msar
from msar import NextScaleTransformer, TransformerConfig
from msar.training import TransformerTrainConfig, TransformerTrainer

from . import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(common.RESULTS, "gpu")
FIXTURE_NAME = os.path.join("fixtures", "var_parity", "tiny_a.safetensors")

SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96)

# Published sampling throughputs of the reference VAR models, quoted for context.
ANCHORS = {
    "var-d16": {"images_per_s": 123.0, "gpu": "A800", "batch": 64, "precision": "bf16", "decoder": False},
    "var-d30": {"images_per_s": 17.0, "gpu": "A100", "batch": 128, "precision": "fp32", "decoder": True},
}

# bf16 autocast cannot reproduce fp32 logits bit for bit; what it must keep:
BF16_TOLERANCE = {
    # teacher-forced logits (the reference's own teacher input): largest error relative to the
    # largest |logit| of the reference (bf16 keeps 8 significand bits: 2^-8 = 0.4 % per rounding)
    "logits_max_rel_error": 0.05,
    # positions whose teacher-forced argmax equals the reference's
    "logits_argmax_agreement": 0.95,
}


WATCHDOG_S = 20  # past the budget, the watchdog writes the JSON and exits


@dataclass
class Model:
    """One model of the check: a transformer preset (or a tiny stand-in in smoke mode)."""

    name: str
    transformer: dict           # TransformerConfig fields
    vqvae: dict                 # VQVAEConfig fields
    sample_batch: int
    train_batch: int
    fsdp: bool
    # a published anchor's setting (batch, precision, decoder) measured besides the common one
    anchor_setting: dict | None = None


def _models(smoke: bool) -> list[Model]:
    if smoke:
        vq = dict(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4))  # GroupNorm: ch % 32 == 0
        tiny = dict(schedule=[(p, p) for p in (1, 2, 3, 4)], vocab_size=64, latent_dim=8, num_classes=10)
        return [Model("smoke-a", {**tiny, "depth": 2, "embed_dim": 32, "num_heads": 2}, vq, 4, 4, fsdp=False),
                Model("smoke-b", {**tiny, "depth": 3, "embed_dim": 48, "num_heads": 3}, vq, 4, 4, fsdp=True,
                      anchor_setting={"batch": 6, "precision": "fp32", "decoder": True})]  # stands in for d30's
    from modalities.image.presets import VQVAE_PRESETS, transformer_config
    vq = VQVAE_PRESETS["vae_ch160v4096z32"]
    d30_anchor = {k: ANCHORS["var-d30"][k] for k in ("batch", "precision", "decoder")}
    return [Model("var-d16", vars(transformer_config("var-d16")), vq, 64, 32, fsdp=False),  # its anchor: batch 64, bf16
            Model("var-d30", vars(transformer_config("var-d30")), vq, 64, 16, fsdp=True, anchor_setting=d30_anchor)]


# ---------------------------------------------------------------------------- guards
class PhaseTimeout(BaseException):
    """Raised by SIGALRM when a phase exceeds its budget (a BaseException so that the
    per-measurement ``except Exception`` blocks do not swallow it)."""


OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _error(e: BaseException) -> dict:
    kind = "oom" if isinstance(e, OOM) else "error"
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return {"status": kind, "error": f"{type(e).__name__}: {str(e)[:400]}", "where": "".join(tb[-3:])[-800:]}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise :class:`PhaseTimeout` after ``seconds``, and again every second until the block is
    left: a timeout that lands in library code which turns it into another error (e.g. inside a
    CUDA-graph capture) is raised again. Main thread only; elsewhere nothing is enforced."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield False
        return
    armed = [True]

    def fire(signum, frame):
        if armed[0]:
            raise PhaseTimeout(f"phase budget of {seconds:.0f} s exceeded")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01), 1.0)
    try:
        yield True
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def attempt(rec: dict, key: str, fn: Callable[[], dict], device: torch.device) -> dict | None:
    """``rec[key] = fn()``; an exception (out-of-memory included) is recorded there instead."""
    try:
        rec[key] = {"status": "ok", **fn()}
    except Exception as e:  # noqa: BLE001 -- recorded, the check goes on
        rec[key] = _error(e)
    if rec[key]["status"] != "ok":
        _free(device)  # out here: inside `except` the traceback still holds the failed call's tensors
    return rec[key]


# ---------------------------------------------------------------------------- measurement
def _amp(device: torch.device, bf16: bool, cache: bool = True):
    """bf16 autocast (``cache=False`` inside a CUDA-graph capture, where cached casts are invalid)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=cache)


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Median wall time of ``fn()`` and the peak memory of the timed calls (CUDA: allocated by
    tensors beyond what was held before; CPU: one extra call, see ``benchmarks.common.peak_memory``)."""
    if device.type == "cuda":
        common.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t = common.time_fn(fn, device, repeats=repeats, warmup=warmup)
        peak = torch.cuda.max_memory_allocated(device)
        mem = {"peak_mb": (peak - base) / 2**20, "peak_total_mb": peak / 2**20,
               "method": "torch.cuda.max_memory_allocated minus allocated before"}
    else:
        t = common.time_fn(fn, device, repeats=repeats, warmup=warmup)
        mem = common.peak_memory(fn, device)
    return {"s_per_call": t.median_s, "timing": t.as_dict(), "peak_memory": mem}


def cuda_graph(fn: Callable[[], Any]) -> tuple[Any, Callable[[], None], float]:
    """Capture ``fn()`` as one CUDA graph: ``(static outputs, replay, capture seconds)``.
    A warm-up call on a side stream first (as ``torch.cuda.graph`` requires)."""
    t0 = time.perf_counter()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return out, graph.replay, time.perf_counter() - t0


# ---------------------------------------------------------------------------- builders
def build_transformer(m: Model, device: torch.device, seed: int) -> NextScaleTransformer:
    torch.manual_seed(seed)
    with torch.device(device):  # built in place: VAR's init of 2B parameters on the CPU takes long
        return NextScaleTransformer(TransformerConfig(**m.transformer)).to(device)


def build_vqvae(m: Model, device: torch.device, seed: int):
    from modalities.image.vqvae import VQVAE, VQVAEConfig
    torch.manual_seed(seed)
    return VQVAE(VQVAEConfig(**m.vqvae)).to(device).eval()


def find_fixture(path: str | None) -> str | None:
    if path:
        return path
    for root in (os.environ.get("MSAR_SHARED"), os.path.join(REPO, "..", "shared"), os.path.join(REPO, "shared")):
        if root and os.path.isfile(os.path.join(root, FIXTURE_NAME)):
            return os.path.normpath(os.path.join(root, FIXTURE_NAME))
    return None


# ---------------------------------------------------------------------------- phases
def phase_parity(ctx: "Check", rec: dict) -> None:
    """fp32 (TF32 off) through ``modalities.image.parity`` on the device; bf16 autocast against
    :data:`BF16_TOLERANCE`."""
    from safetensors.torch import load_file

    from modalities.image.checkpoint import transformer_from_state_dict, vqvae_from_state_dict
    from modalities.image.parity import compare, configs_from_fixture, recompute

    path = find_fixture(ctx.args.fixture)
    if path is None or not os.path.isfile(path):
        where = ctx.args.fixture or os.path.join("..", "shared", FIXTURE_NAME)
        rec.update(status="skipped", reason=f"fixture not found: {where} (pass --fixture PATH)")
        return
    cfg_path = os.path.splitext(path)[0] + ".json"
    tensors = load_file(path)
    with open(cfg_path) as f:
        cfg = json.load(f)
    rec["fixture"] = os.path.relpath(path, REPO)
    dev = ctx.device

    def fp32() -> dict:
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad():
                got = recompute(tensors, cfg, device=dev)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        lines: list[str] = []
        ok = compare(tensors, got, print_fn=lines.append)
        idx_keys = [k for k in tensors if k.startswith("out.") and not tensors[k].dtype.is_floating_point]
        differing = sum(int((got[k].long() != tensors[k].long()).sum()) for k in idx_keys)
        errors = {k: float((got[k].float() - tensors[k].float()).abs().max())
                  for k in tensors if k.startswith("out.") and tensors[k].dtype.is_floating_point}
        return {"passed": ok, "tokens_compared": sum(tensors[k].numel() for k in idx_keys),
                "tokens_differing": differing, "max_abs_error": errors,
                "failures": [ln for ln in lines if ln.startswith("FAIL")]}

    def bf16() -> dict:
        vae_cfg, var_cfg = configs_from_fixture(cfg)
        vae = vqvae_from_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")}, vae_cfg).to(dev)
        var = transformer_from_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("var.")}, var_cfg).to(dev)
        labels = tensors["in.labels"].long().to(dev)
        ref = tensors["out.logits"].float()
        with torch.no_grad(), _amp(dev, True):
            logits = var(labels, tensors["out.teacher_input"].float().to(dev)).float().cpu()
        err = float((logits - ref).abs().max())
        rel = err / float(ref.abs().max())
        agree = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
        greedy = {}
        for key in sorted(tensors):
            m = re.fullmatch(r"out\.greedy_cfg([0-9.]+)", key)
            if not m:
                continue
            with _amp(dev, True):
                res = msar.sample(var, vae, labels, cfg=float(m.group(1)), top_k=1, top_p=0.0, decode=False)
            same = [(t.cpu() == tensors[f"{key}_idx_{i}"]) for i, t in enumerate(res.indices)]
            first = next((i for i, s in enumerate(same) if not bool(s.all())), None)
            greedy[f"cfg{m.group(1)}"] = {"agreement": float(torch.cat([s.flatten() for s in same]).float().mean()),
                                          "first_scale_differing": first}
        tol = BF16_TOLERANCE
        return {"passed": rel <= tol["logits_max_rel_error"] and agree >= tol["logits_argmax_agreement"],
                "tolerance": tol, "logits_max_abs_error": err, "logits_max_rel_error": rel,
                "logits_argmax_agreement": agree, "greedy_token_agreement": greedy,
                "note": "teacher-forced logits on the reference's teacher input; greedy tokens are reported, "
                        "not judged (one flipped near-tie changes every later scale)"}

    attempt(rec, "fp32", fp32, dev)
    attempt(rec, "bf16", bf16, dev)
    rec["passed"] = {p: rec[p].get("passed", False) for p in ("fp32", "bf16")}


def phase_sampling(ctx: "Check", rec: dict, m: Model) -> None:
    dev, bf16 = ctx.device, ctx.bf16
    model = build_transformer(m, dev, ctx.args.seed).eval()
    vq = build_vqvae(m, dev, ctx.args.seed)
    B = m.sample_batch
    labels = torch.arange(B, device=dev) % model.num_classes
    rec.update(params=model.num_parameters(), batch=B, L=model.seq_len, precision="bf16 autocast" if bf16 else "fp32",
               sampling=SAMPLING, decoder=f"modalities.image.vqvae.VQVAE({m.vqvae}), random init")

    def call(decode: bool, batch_labels=labels, amp: bool = bf16, cache: bool = True):
        def run():
            with _amp(dev, amp, cache):
                return msar.sample(model, vq, batch_labels, decode=decode, **SAMPLING)
        return run

    def eager(decode: bool) -> Callable[[], dict]:
        def go() -> dict:
            r = measure(call(decode), dev, ctx.repeats)
            return {**r, "images_per_s": B / r["s_per_call"]}
        return go

    def graphed(decode: bool) -> Callable[[], dict]:
        def go() -> dict:
            before = torch.cuda.memory_allocated(dev)
            out, replay, capture_s = cuda_graph(call(decode, cache=False))
            held = torch.cuda.memory_allocated(dev) - before
            r = measure(replay, dev, ctx.repeats)
            replay()
            torch.cuda.synchronize()
            ok = all(bool(((t >= 0) & (t < model.vocab_size)).all()) for t in out.indices)
            # a replay allocates nothing: the graph's memory is held from the capture on
            return {**r, "images_per_s": B / r["s_per_call"], "capture_s": capture_s, "tokens_in_range": ok,
                    "graph_memory_mb": held / 2**20}
        return go

    attempt(rec, "eager_tokens", eager(False), dev)
    attempt(rec, "eager_decoded", eager(True), dev)
    if dev.type == "cuda":
        _free(dev)  # the graph's private pool comes on top of what the eager runs left cached
        attempt(rec, "cuda_graph_tokens", graphed(False), dev)
        _free(dev)
        attempt(rec, "cuda_graph_decoded", graphed(True), dev)
        _free(dev)
    else:
        rec["cuda_graph_tokens"] = rec["cuda_graph_decoded"] = {"status": "skipped", "reason": "needs CUDA"}
    anchor = m.anchor_setting
    if anchor is not None:
        # the anchor's own setting, for a like-for-like figure (80 GB of fp32 KV cache at batch 128 for d30)
        AB = anchor["batch"]
        alabels = torch.arange(AB, device=dev) % model.num_classes

        def anchor_setting() -> dict:
            # fp32 with TF32 matmuls and convolutions, as VAR's sampling demo sets them
            tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            try:
                r = measure(call(anchor["decoder"], alabels, amp=anchor["precision"] == "bf16"), dev, 1)
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            return {**r, "batch": AB, "precision": anchor["precision"] + " (TF32 matmul and conv)",
                    "decoder": anchor["decoder"], "images_per_s": AB / r["s_per_call"]}
        attempt(rec, "anchor_setting", anchor_setting, dev)


def phase_training(ctx: "Check", rec: dict, m: Model) -> None:
    dev = ctx.device
    fsdp_note = None
    if m.fsdp:
        fsdp_note = _init_single_process_group(dev)
        rec["fsdp"] = {"used": fsdp_note is None, "why_not": fsdp_note,
                       "how": "torch.distributed.fsdp.fully_shard per block and on the model, one-process group"}
    try:
        B = m.train_batch
        fsdp = m.fsdp and fsdp_note is None
        tries = []
        while True:
            try:
                rec.update(_train(ctx, m, B, fsdp=fsdp))
                break
            except OOM as e:  # halve the batch (twice at most) before giving up
                tries.append({"batch": B, **_error(e)})
                if B <= 1 or len(tries) > 2:
                    raise
                B //= 2
            except Exception as e:  # noqa: BLE001 -- FSDP failed: say why, measure unsharded
                if not fsdp:
                    raise
                err = _error(e)
                rec["fsdp"].update(used=False, why_not=err["error"], where=err["where"])
                fsdp = False
            # out of the `except` blocks: their tracebacks hold the failed attempt's model and optimizer
            _free(dev)
        if tries:
            rec["out_of_memory_at"] = tries
    finally:
        _free(dev)
        if m.fsdp and fsdp_note is None:
            import torch.distributed as dist
            dist.destroy_process_group()


def _init_single_process_group(device: torch.device) -> str | None:
    """Join a one-process group (NCCL on CUDA, gloo on CPU); None, or why it could not."""
    try:
        from msar.training.distributed import init_single_process_group
        init_single_process_group(device)
        return None
    except Exception as e:  # noqa: BLE001 -- the check trains without FSDP and says why
        return f"{type(e).__name__}: {str(e)[:300]}"


def _train(ctx: "Check", m: Model, B: int, fsdp: bool) -> dict:
    dev = ctx.device
    model = build_transformer(m, dev, ctx.args.seed)
    if fsdp:
        import warnings

        from modalities.image.imagenet.trainer import shard_per_block
        # the model returns its float32 logits as a view; the trainer never edits them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        shard_per_block(model, dev)
    cuda = dev.type == "cuda"
    cfg = TransformerTrainConfig(amp="bf16" if ctx.bf16 and cuda else "none", total_steps=10**6, progress=False,
                                 device=str(dev))
    trainer = TransformerTrainer(model, None, cfg)
    g = torch.Generator().manual_seed(ctx.args.seed)
    indices = [torch.randint(0, model.vocab_size, (B, n), generator=g).to(dev) for n in model.schedule.token_counts]
    x = torch.randn(B, model.seq_len - model.first_len, model.latent_dim, generator=g).to(dev)
    labels = torch.randint(0, model.num_classes, (B,), generator=g).to(dev)

    step = functools.partial(trainer.train_step, indices, labels, x)  # bound now: `trainer` is deleted below

    common.sync(dev)
    t0 = time.perf_counter()
    first = step()
    common.sync(dev)
    first_s = time.perf_counter() - t0
    r = measure(step, dev, ctx.repeats, warmup=0)
    opt = trainer.optimizers["model"]
    out = {"batch": B, "L": model.seq_len, "params": model.num_parameters(), "sharded": _is_fsdp(model),
           "precision": "bf16 autocast" if cfg.amp == "bf16" else "fp32",
           "optimizer": f"{type(opt).__name__}(fused={opt.defaults.get('fused')})",
           "path": "msar.training.TransformerTrainer.train_step (its per-step metrics included)",
           "first_step_s": first_s, "loss_first_step": first["loss"] if first else None, **r,
           "tokens_per_s": B * model.seq_len / r["s_per_call"], "images_per_s": B / r["s_per_call"]}
    del trainer, model, opt
    return out


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def phase_compile(ctx: "Check", rec: dict, m: Model) -> None:
    """Sampling with every block under ``torch.compile`` (one graph per scale shape)."""
    import torch._dynamo
    dev = ctx.device
    torch._dynamo.reset()  # compile_blocks raises the recompile limit to one graph per scale shape
    model = build_transformer(m, dev, ctx.args.seed).eval()
    vq = build_vqvae(m, dev, ctx.args.seed)
    model.compile_blocks(backend=ctx.compile_backend)
    B = m.sample_batch
    labels = torch.arange(B, device=dev) % model.num_classes
    rec.update(backend=ctx.compile_backend, batch=B, what="each transformer block compiled (dynamic=False)")

    def run(decode: bool):
        with _amp(dev, ctx.bf16):
            return msar.sample(model, vq, labels, decode=decode, **SAMPLING)

    def go(decode: bool) -> Callable[[], dict]:
        def f() -> dict:
            common.sync(dev)
            t0 = time.perf_counter()
            run(decode)  # compiles every scale's graph
            common.sync(dev)
            first = time.perf_counter() - t0
            r = measure(lambda: run(decode), dev, ctx.repeats)
            return {**r, "first_call_s": first, "images_per_s": B / r["s_per_call"]}
        return f

    from torch._dynamo.utils import counters
    graphs_before = counters["stats"]["unique_graphs"]
    try:
        attempt(rec, "compiled_tokens", go(False), dev)
        attempt(rec, "compiled_decoded", go(True), dev)
    finally:
        # one graph per scale shape is the target: more means blocks recompiled apart, and past
        # the recompile limit the rest ran eagerly (the timings above then are not compiled ones)
        rec.update(graphs_compiled=counters["stats"]["unique_graphs"] - graphs_before,
                   scales=len(m.transformer["schedule"]))
        torch._dynamo.reset()


# ---------------------------------------------------------------------------- the run
@dataclass
class Phase:
    name: str
    fn: Callable[[dict], None]
    budget_s: float      # interrupted past this
    min_s: float         # not started with less left


class Check:
    def __init__(self, args, command: str | None = None):
        self.args, self.command = args, command
        self.smoke = args.smoke
        want = args.device or ("cpu" if args.smoke else "cuda")
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("CUDA is not available: run with --smoke (CPU) on this machine")
        self.device = torch.device(want)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # bf16 autocast on the GPU; fp32 in CPU smoke runs (bf16 is slow on most CPUs)
        self.bf16 = self.device.type == "cuda"
        self.repeats = 1 if args.smoke else 3
        # smoke runs trace with dynamo only: inductor's code generation takes minutes on a small CPU
        self.compile_backend = args.compile_backend or ("eager" if args.smoke or self.device.type == "cpu" else "inductor")
        self.models = _models(args.smoke)
        self.started = time.time()
        self.deadline = self.started + args.budget_s
        self.phases: dict[str, dict] = {}
        self.lock = threading.Lock()
        tag = "smoke" if args.smoke else re.sub(r"[^a-z0-9]+", "_", self._device_name().lower()).strip("_")
        self.path = os.path.join(args.out or OUT_DIR, f"gpu_check_{tag}.json")

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def plan(self) -> list[Phase]:
        s = self.smoke
        d16, d30 = self.models
        ph = [Phase("parity", lambda rec: phase_parity(self, rec), 20 if s else 45, 2 if s else 10)]
        for m, b in ((d16, 60), (d30, 120)):
            ph.append(Phase(f"sampling/{m.name}", lambda rec, m=m: phase_sampling(self, rec, m), 20 if s else b, 2 if s else 20))
        for m, b in ((d16, 50), (d30, 80)):
            ph.append(Phase(f"training/{m.name}", lambda rec, m=m: phase_training(self, rec, m), 20 if s else b, 2 if s else 25))
        for m in (d16, d30):
            ph.append(Phase(f"compile/{m.name}", lambda rec, m=m: phase_compile(self, rec, m), 30 if s else 120, 2 if s else 40))
        return ph

    # ------------------------------------------------------------------ output
    def payload(self) -> dict:
        fastest = self.fastest()
        return {"device": self._device_name(), "smoke": self.smoke, "budget_s": self.args.budget_s,
                "config": {"models": {m.name: {"transformer": {k: (v if k != "schedule" else [list(p) for p in v])
                                                               for k, v in m.transformer.items()},
                                               "vqvae": m.vqvae, "sample_batch": m.sample_batch,
                                               "train_batch": m.train_batch, "fsdp": m.fsdp,
                                               "anchor_setting": m.anchor_setting} for m in self.models},
                           "sampling": SAMPLING, "bf16_autocast": self.bf16, "repeats": self.repeats,
                           "compile_backend": self.compile_backend, "seed": self.args.seed,
                           "weights": "random init (VAR's, at construction)"},
                "anchors": {k: {**v, "source": "published (VAR), quoted for context; other GPUs"} for k, v in ANCHORS.items()},
                "phases": self.phases, "fastest_sampling": fastest, "beside_anchors": self.beside_anchors(fastest)}

    def fastest(self) -> dict:
        """Per model, tokens only and decoded: the fastest sampling variant that ran, and its
        speed-up over eager."""
        out = {}
        for m in self.models:
            found: dict = {}
            for ph in (f"sampling/{m.name}", f"compile/{m.name}"):
                for key, r in self.phases.get(ph, {}).items():
                    if isinstance(r, dict) and r.get("status") == "ok" and "images_per_s" in r and key != "anchor_setting":
                        kind = "decoded" if key.endswith("decoded") else "tokens"
                        if r["images_per_s"] > found.get(kind, {}).get("images_per_s", 0):
                            found[kind] = {"variant": key, "images_per_s": r["images_per_s"]}
            eager = self.phases.get(f"sampling/{m.name}", {})
            for kind, best in found.items():
                e = eager.get(f"eager_{kind}", {})
                if e.get("status") == "ok":
                    best["vs_eager"] = best["images_per_s"] / e["images_per_s"]
            out[m.name] = found
        return out

    def beside_anchors(self, fastest: dict) -> dict:
        """The figure measured here in each anchor's setting (or the nearest one)."""
        out = {}
        for name, a in ANCHORS.items():
            rec = self.phases.get(f"sampling/{name}", {})
            same = rec.get("anchor_setting")
            if same is None and rec.get("batch") == a["batch"] and self.bf16 == (a["precision"] == "bf16"):
                best = fastest.get(name, {}).get("decoded" if a["decoder"] else "tokens")
                same = {"images_per_s": best["images_per_s"], "variant": best["variant"]} if best else None
            elif same is not None:
                same = {"images_per_s": same.get("images_per_s"), "variant": "anchor_setting", "status": same.get("status")}
            out[name] = {"anchor_images_per_s": a["images_per_s"], "anchor_gpu": a["gpu"],
                         "measured_here": same, "setting": {k: a[k] for k in ("batch", "precision", "decoder")}}
        return out

    def flush(self, note: str | None = None) -> str:
        with self.lock:
            payload = self.payload()
            if note:
                payload["aborted"] = note
            return common.write_result_json(self.path, payload, self.started, command=self.command, device=self.device)

    # ------------------------------------------------------------------ phases
    def run_phase(self, ph: Phase) -> None:
        rec: dict = {}
        self.phases[ph.name] = rec
        left = self.deadline - time.time()
        if left < ph.min_s:
            rec.update(status="skipped", reason=f"{max(left, 0):.0f} s left of the {self.args.budget_s:.0f} s budget, "
                                                f"the phase needs at least {ph.min_s:.0f} s")
            return
        limit = min(ph.budget_s, left)
        t0 = time.perf_counter()
        try:
            with _alarm(limit) as enforced:
                rec["budget_s"], rec["enforced"] = round(limit, 1), enforced
                ph.fn(rec)
            failed = [k for k, v in rec.items() if isinstance(v, dict) and v.get("status") not in (None, "ok", "skipped")]
            rec.setdefault("status", "partial" if failed else "ok")
        except PhaseTimeout as e:
            rec.update(status="timeout", reason=str(e))
        except Exception as e:  # noqa: BLE001 -- recorded; the next phase runs
            rec.update(_error(e))
        finally:
            rec["wall_s"] = round(time.perf_counter() - t0, 2)
            _free(self.device)

    def run(self) -> str:
        watchdog = None
        if not self.smoke:
            watchdog = threading.Timer(self.args.budget_s + WATCHDOG_S, self._abort)
            watchdog.daemon = True
            watchdog.start()
        try:
            for ph in self.plan():
                self.run_phase(ph)
                st = self.phases[ph.name]
                print(f"[{time.time() - self.started:6.1f} s] {ph.name}: {st.get('status')}"
                      f"{' (' + st.get('reason', st.get('error', '')) + ')' if st.get('status') != 'ok' else ''}",
                      flush=True)
                self.flush()
        finally:
            if watchdog is not None:
                watchdog.cancel()
        return self.path

    def _abort(self) -> None:
        try:
            self.flush(note=f"watchdog: the run passed its {self.args.budget_s:.0f} s budget by {WATCHDOG_S} s "
                            "(a call that SIGALRM cannot interrupt) and was stopped")
        finally:
            os._exit(3)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models (CPU unless --device), seconds; used by the tests")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu; --smoke defaults to cpu")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="whole-run budget in seconds (default 450; 120 with --smoke)")
    ap.add_argument("--out", default=None, help=f"output folder (default {os.path.relpath(OUT_DIR, REPO)})")
    ap.add_argument("--fixture", default=None, help=f"parity fixture (default ../shared/{FIXTURE_NAME})")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend (default: inductor; eager with --smoke or on the CPU)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 120.0 if args.smoke else 450.0
    return args


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    check = Check(parse(argv), command=" ".join(["python -m benchmarks.gpu_check", *argv]))
    path = check.run()
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
