"""msar's sampler against the reference VAR code, same machine, same moment, same weights.

    python -m benchmarks.vs_reference --var-dir /path/to/FoundationVision/VAR [--quick] [--configs small d16]
                                      [--thread-counts 1 2]

Needs a checkout of https://github.com/FoundationVision/VAR (nothing is downloaded here). Its
only third-party import outside torch, ``huggingface_hub`` (used for a hub mixin base class),
is replaced by an empty stub when missing.

For each configuration (see :mod:`benchmarks.sampling_throughput`) it builds the reference
``VAR`` + ``VQVAE`` with random weights, loads the *same* weights into msar through the image
modality's strict converters (``modalities.image.checkpoint``), then

* greedy equivalence: the reference ``autoregressive_infer_cfg(top_k=1)`` tokens (recorded
  from its sampling helper) against ``msar.sample(top_k=1)``, guidance 1.5;
* throughput, transformer loop only (the reference's final ``fhat_to_img`` is replaced by the
  identity; msar runs with ``decode=False``), guidance 1.5, top-k 900, top-p 0.96. Runs are
  interleaved (reference, msar, reference, ...) so that both see the same load, and both wall
  time and process CPU time are recorded: on a shared machine the CPU-time ratio is the robust
  figure. Every thread count of ``--thread-counts`` is measured in the same rounds (one row per
  configuration and thread count), so all figures of a run share the machine's state.

Goals (issue 18): 1.5x the reference for ``small`` (depth 8, width 512, batch 8), 1.3x for
``d16`` (batch 4). ``benchmarks/results/vs_reference/README.md`` has the profile of both samplers
(where the time goes, and why the fp32 matrix products bound the ratio).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import types
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

import msar
from msar import TransformerConfig

from . import common
from .sampling_throughput import CONFIGS, SAMPLING, compare

NAME = "vs_reference"
GOALS = {"small": 1.5, "d16": 1.3, "d30": 1.3}  # speed-up over the reference (issue 18)


def import_reference(var_dir: str):
    """Import the reference ``models`` package from ``var_dir`` (stubbing huggingface_hub)."""
    if not os.path.isfile(os.path.join(var_dir, "models", "var.py")):
        raise SystemExit(f"--var-dir {var_dir!r} does not look like a FoundationVision/VAR checkout (no models/var.py)")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        stub = types.ModuleType("huggingface_hub")
        stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {"__init_subclass__": classmethod(lambda cls, **kw: None)})
        sys.modules["huggingface_hub"] = stub
    sys.path.insert(0, os.path.abspath(var_dir))
    import models.helpers
    import models.var
    import models.vqvae
    return models


def build_pair(name: str, ref, seed: int):
    """Reference (vae, var) with random weights and the msar (tokenizer, model) holding the same weights."""
    from modalities.image.checkpoint import (
        transformer_from_state_dict,
        vqvae_from_state_dict,
    )
    from modalities.image.vqvae import VQVAEConfig

    c = CONFIGS[name]
    sides = tuple(c["sides"])
    depth = c.get("var_depth", c.get("depth"))
    width = 64 * depth if "var_depth" in c else c["width"]
    heads = depth if "var_depth" in c else c["heads"]
    torch.manual_seed(seed)
    vae = ref.vqvae.VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4,
                          v_patch_nums=sides).eval()
    var = ref.var.VAR(vae_local=vae, num_classes=1000, depth=depth, embed_dim=width, num_heads=heads,
                      drop_path_rate=0.1 * depth / 24, norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1,
                      attn_l2_norm=True, patch_nums=sides, flash_if_available=False, fused_if_available=False)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    var.eval()
    tok = vqvae_from_state_dict(vae.state_dict(), VQVAEConfig(patch_nums=sides))
    cfg = TransformerConfig(schedule=[(p, p) for p in sides], vocab_size=4096, latent_dim=32, num_classes=1000,
                            depth=depth, embed_dim=width, num_heads=heads, drop_path_rate=0.1 * depth / 24,
                            shared_aln=False, attn_l2_norm=True)
    model = transformer_from_state_dict(var.state_dict(), cfg).eval()
    return vae, var, tok, model


def reference_sample(ref, var, labels: torch.Tensor, seed: int, top_k: int, top_p: float, record: bool):
    """Run the reference loop; returns the per-scale tokens when ``record``. The final image
    decode is skipped (identity) so that only the transformer loop is measured."""
    tokens = []
    inner = ref.helpers.sample_with_top_k_top_p_

    def spy(logits, **kw):
        out = inner(logits, **kw)
        if record:
            tokens.append(out[:, :, 0].clone())
        return out

    ref.var.sample_with_top_k_top_p_ = spy
    vae = var.vae_proxy[0]
    saved = vae.fhat_to_img
    vae.fhat_to_img = lambda f_hat: f_hat
    try:
        with torch.inference_mode():
            var.autoregressive_infer_cfg(B=labels.shape[0], label_B=labels, g_seed=seed, cfg=SAMPLING["cfg"],
                                         top_k=top_k, top_p=top_p, more_smooth=False)
    finally:
        vae.fhat_to_img = saved
        ref.var.sample_with_top_k_top_p_ = inner
    return tokens


def run(args) -> dict:
    counts = thread_counts(args)
    common.setup_threads(counts[0])
    device = torch.device("cpu")
    info = common.machine_info(device)
    ref = import_reference(args.var_dir)
    names = args.configs or (["small"] if args.quick else ["small", "d16"])
    rounds = args.rounds or (2 if args.quick else 3)
    rows = []
    for name in names:
        vae, var, tok, model = build_pair(name, ref, args.seed)
        B = args.batch or CONFIGS[name]["batch"]
        labels = torch.arange(B) * 7 % 1000
        gl = labels[: args.greedy_batch]
        ref_greedy = reference_sample(ref, var, gl, args.seed, 1, 0.0, record=True)
        ours = msar.sample(model, tok, gl, cfg=SAMPLING["cfg"], top_k=1, decode=False).indices
        greedy = {"batch": len(gl), **compare(ref_greedy, ours)}
        kw = dict(top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"])
        runners = {  # bound now: the loop deletes its models before the next config
            "reference": functools.partial(reference_sample, ref, var, labels, args.seed, record=False, **kw),
            "msar_sample": functools.partial(msar.sample, model, tok, labels, cfg=SAMPLING["cfg"], seed=args.seed,
                                             decode=False, **kw),
        }
        timing = interleaved_timings(runners, counts, rounds, args, desc=f"{name} rounds")
        for t in counts:
            row = {"config": name, "batch": B, "threads": t, "params": model.num_parameters(),
                   "greedy_msar_vs_reference": greedy}
            row["timing"] = {k: timing[t, k] for k in runners}
            row["speedup_vs_reference"] = {k: speedup(timing[t, "reference"], timing[t, k]) for k in ("msar_sample",)}
            row["goal"] = GOALS.get(name)
            s = row["speedup_vs_reference"]["msar_sample"]
            row["goal_met"] = {m: bool(row["goal"] and s[m] >= row["goal"]) for m in ("wall", "cpu")}
            row["issue_reference_s_per_batch"] = CONFIGS[name]["reference_s_per_batch"]
            rows.append(row)
            print(f"{name}, {t} thread(s): greedy identical to reference: {greedy['identical']}; "
                  f"speed-up (cpu / wall): msar.sample {s['cpu']:.2f} / {s['wall']:.2f} (goal {row['goal']})",
                  flush=True)
        del vae, var, tok, model
    config = {"preset": "quick" if args.quick else "full", "configs": {n: CONFIGS[n] for n in names},
              "sampling": SAMPLING, "rounds": rounds, "thread_counts": counts, "seed": args.seed,
              "var_dir": os.path.abspath(args.var_dir),
              "reference_commit": _ref_commit(args.var_dir), "weights": "random (reference init_weights), shared"}
    path = common.write_result(NAME, info, config, {"rows": rows}, args.out)
    if not args.no_plot:
        plot(rows, args.out)
    print("wrote", path)
    return {"path": path, "figures": {"rows": rows}, "config": config}


def plot(rows: list, out_dir=None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.6), squeeze=False)
    for ax, r in zip(axes[0], rows):
        names = list(r["timing"])
        cpu = [r["timing"][k]["median_cpu_s"] for k in names]
        ax.bar(range(len(names)), cpu, color=["gray", "C0", "C2", "C1"][:len(names)])
        for i, k in enumerate(names[1:], 1):
            ax.text(i, cpu[i], f"{r['speedup_vs_reference'][k]['cpu']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names))); ax.set_xticklabels([n.replace("_", "\n", 1) for n in names], fontsize=7)
        ax.set_ylabel("CPU seconds per batch"); ax.set_title(f"{r['config']}, batch {r['batch']}, {r.get('threads', '?')} thr (goal {r['goal']}x)", fontsize=9)
    return common.savefig(fig, NAME, out_dir)


def _ref_commit(var_dir: str) -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=var_dir, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown (not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_reference_args(ap)
    ap.add_argument("--configs", nargs="*", choices=["small", "d16", "d30"], default=None)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds (each runs reference and msar once)")
    ap.add_argument("--greedy-batch", type=int, default=2)
    return ap.parse_args(argv)


def add_reference_args(ap: argparse.ArgumentParser) -> None:
    """The options of every comparison with the reference code: the common ones, ``--var-dir``
    and ``--thread-counts`` (read back by :func:`thread_counts`)."""
    common.add_common_args(ap)
    ap.add_argument("--var-dir", default=os.environ.get("MSAR_VAR_DIR", ""), required=not os.environ.get("MSAR_VAR_DIR"),
                    help="checkout of FoundationVision/VAR (or set MSAR_VAR_DIR)")
    ap.add_argument("--thread-counts", type=int, nargs="*", default=None,
                    help="torch thread counts measured in the same interleaved rounds (default: --threads if "
                         "given, else 1 2)")


def interleaved_timings(runners: dict[str, Callable[[], object]], counts: list[int], rounds: int,
                        args: argparse.Namespace, desc: str = "rounds") -> dict[tuple[int, str], dict]:
    """Time every runner at every thread count in interleaved rounds (after one warm-up call each
    at every count), waiting for a quiet machine before each call (``--wait-load``).

    Returns ``{(threads, name): {"wall_s": [...], "process_cpu_s": [...], "median_wall_s",
    "median_cpu_s"}}``; interleaving spreads any drift of the machine's load over every runner."""
    wall = {(t, k): [] for t in counts for k in runners}
    cpu = {(t, k): [] for t in counts for k in runners}
    for t in counts:
        torch.set_num_threads(t)
        for fn in runners.values():
            fn()
    for _ in tqdm(range(rounds), desc=desc, disable=None):
        for t in counts:
            torch.set_num_threads(t)
            for k, fn in runners.items():
                common.wait_for_quiet(args.wait_load, args.wait_timeout)
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[t, k].append(time.perf_counter() - t0)
                cpu[t, k].append(time.process_time() - c0)
    return {key: {"wall_s": wall[key], "process_cpu_s": cpu[key], "median_wall_s": float(np.median(wall[key])),
                  "median_cpu_s": float(np.median(cpu[key]))} for key in wall}


def speedup(reference: dict, ours: dict) -> dict[str, float]:
    """Median reference time over ours, in wall and process-CPU time (entries of :func:`interleaved_timings`)."""
    return {"wall": reference["median_wall_s"] / ours["median_wall_s"],
            "cpu": reference["median_cpu_s"] / ours["median_cpu_s"]}


def thread_counts(args: argparse.Namespace) -> list[int]:
    """The thread counts to measure: ``--thread-counts``, else ``--threads``, else 1 and 2."""
    return args.thread_counts or ([args.threads] if args.threads else [1, 2])


def main(argv=None) -> dict:
    return run(parse(argv))


if __name__ == "__main__":
    main()
