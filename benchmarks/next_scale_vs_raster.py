"""Next-scale (VAR) vs raster next-token generation with the same transformer.

    python -m benchmarks.next_scale_vs_raster [--quick] [--gpu]

One :class:`msar.NextScaleTransformer` configuration (depth, width, heads, vocabulary, codeword
size) is built twice for every final grid side N: with VAR's next-scale schedule ending in
``(N, N)`` and with ``ScaleSchedule.raster(N * N)`` (every token its own scale, so the
block-causal mask is causal and the KV-cached sampler is ordinary next-token decoding).
The raster model's teacher input for token i is the codeword of token i - 1, which at sampling
time comes from :class:`RasterCodebookState` below.

Measured for every N:

* sequential forward steps (calls of ``model.step``, counted by wrapping it);
* FLOPs of one whole generation at batch 1, counted with ``torch.utils.flop_counter`` with SDPA
  forced to its math backend (the CPU flash kernel is not registered with the counter and
  would count 0), split into attention (bmm) and linear layers (mm/addmm);
* FLOPs of raster decoding *without* a KV cache (every step re-runs the whole prefix: what the
  paper's O(N^6) assumes), counted on meta tensors for prefixes of 1, 2, 3, 4 tokens, which fixes
  the exact quadratic f(n) = a + b n + c n^2 (linear layers ~ n, attention ~ n^2), checked
  against a direct count at n = N^2, and summed over n = 1..N^2;
* wall time per sample at batch 1 and at a throughput batch, and peak memory
  (see :mod:`benchmarks.common` for the methods).

Growth exponents are least-squares slopes of log(figure) against log(N).
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import msar
from msar import GridPyramid, MultiScaleResidualQuantizer, MultiScaleVQTokenizer, NextScaleTransformer, ScaleSchedule, TransformerConfig

from . import common

NAME = "next_scale_vs_raster"

# VAR's published schedules (256px: N=16, 512px: N=32); the others follow the same pattern.
NEXT_SCALE_SIDES = {
    2: (1, 2),
    4: (1, 2, 3, 4),
    8: (1, 2, 3, 4, 5, 6, 8),
    16: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    32: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    64: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32, 40, 48, 64),
}

PRESETS = {
    # name: model + sizes. Full = the small CPU config of the sampling benchmark.
    "full": dict(depth=8, width=512, heads=8, vocab=4096, latent=32, sides=[8, 16, 32], batch=8, repeats=2,
                 uncached_time_max_side=16),
    "quick": dict(depth=4, width=256, heads=4, vocab=1024, latent=32, sides=[8, 16, 32], batch=8, repeats=1,
                  uncached_time_max_side=8),
    "smoke": dict(depth=1, width=32, heads=2, vocab=64, latent=8, sides=[2, 4], batch=2, repeats=1,
                  uncached_time_max_side=4),
}


# ---------------------------------------------------------------------------- raster decode state
class RasterCodebookState:
    """Decode state of raster next-token generation: the input of token i+1 is the codeword of
    token i. ``add_scale(k, idx (B, 1))`` returns ``(B, 1, Cvae)`` (None after the last token)."""

    def __init__(self, codebook: nn.Embedding, num_tokens: int):
        self.codebook, self.num_tokens = codebook, num_tokens
        self.indices: list[torch.Tensor] = []

    def add_scale(self, k: int, idx: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor | None:
        self.indices.append(idx)
        if k == self.num_tokens - 1:
            return None
        return self.codebook(idx)


class RasterCodebookTokenizer:
    """The tokenizer side of raster generation: a codebook, one token per scale (generation only)."""

    def __init__(self, codebook: nn.Embedding, num_tokens: int):
        self.codebook, self.num_tokens = codebook, num_tokens
        self.schedule = ScaleSchedule.raster(num_tokens)
        self.vocab_size, self.latent_dim = codebook.num_embeddings, codebook.embedding_dim

    def start(self, batch_size: int, device, context=None) -> RasterCodebookState:
        return RasterCodebookState(self.codebook, self.num_tokens)


# ---------------------------------------------------------------------------- models
def build_pair(p: dict, side: int, device: torch.device, seed: int) -> dict:
    """Next-scale and raster models of identical depth/width/vocab for final grid ``side``."""
    sides = NEXT_SCALE_SIDES[side]
    ns_sched = ScaleSchedule.square(sides)
    out = {}
    for order, sched in (("next_scale", ns_sched.to_config()), ("raster", ScaleSchedule.raster(side * side).to_config())):
        torch.manual_seed(seed)
        cfg = TransformerConfig(schedule=sched, vocab_size=p["vocab"], latent_dim=p["latent"], num_classes=0,
                                depth=p["depth"], embed_dim=p["width"], num_heads=p["heads"], init_std=0.02)
        out[order] = NextScaleTransformer(cfg).to(device).eval()
    torch.manual_seed(seed)
    quant = MultiScaleResidualQuantizer(p["vocab"], p["latent"], GridPyramid(ns_sched)).to(device).eval()
    out["tokenizer"] = MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), quant)
    out["codebook"] = nn.Embedding(p["vocab"], p["latent"]).to(device)
    return out


def count_steps(model: NextScaleTransformer) -> dict:
    """Wrap ``model.step`` (instance attribute) to count sequential forward passes."""
    counter = {"steps": 0}
    inner = model.step

    def step(*a, **kw):
        counter["steps"] += 1
        return inner(*a, **kw)

    model.step = step
    return counter


def generate(pair: dict, order: str, batch: int, seed: int, top_k: int, top_p: float):
    model = pair[order]
    if order == "next_scale":
        return msar.sample(model, pair["tokenizer"], batch_size=batch, cfg=0, top_k=top_k, top_p=top_p,
                           seed=seed, decode=False)
    return msar.sample(model, RasterCodebookTokenizer(pair["codebook"], model.seq_len), batch_size=batch, cfg=0,
                       top_k=top_k, top_p=top_p, seed=seed, decode=False)


# ---------------------------------------------------------------------------- uncached raster
def prefix_logits(model: NextScaleTransformer, codebook: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
    """Uncached raster step: run the whole prefix ``tokens (B, n)`` (n may be 0) through the
    model and return the ``(B, V)`` logits of token n. Cost grows like n (MLP) + n^2 (attention)."""
    B, n = tokens.shape
    labels = torch.full((B,), model.num_classes, dtype=torch.long, device=tokens.device)
    cond, cond_blocks = model.condition(labels)
    h = model.embed_start(cond)
    if n > 0:
        x = model.input_proj(codebook(tokens)) + model.level_pos()[:, 1:n + 1]
        h = torch.cat((h, x), dim=1)
    mask = model.attn_mask[:n + 1, :n + 1]
    for b in model.blocks:
        h = b(h, cond_blocks, attn_mask=mask)
    return model.logits(h[:, -1:], cond)[:, 0]


@torch.no_grad()
def generate_uncached(model: NextScaleTransformer, codebook: nn.Embedding, batch: int, seed: int,
                      top_k: int, top_p: float) -> torch.Tensor:
    device = model.pos_embed.device
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.zeros(batch, 0, dtype=torch.long, device=device)
    for _ in range(model.seq_len):
        logits = prefix_logits(model, codebook, tokens)
        nxt = msar.sample_tokens(logits.unsqueeze(1), top_k, top_p, generator=gen)
        tokens = torch.cat((tokens, nxt), dim=1)
    return tokens


def flops_of(fn) -> dict:
    """Counted FLOPs of ``fn()``: total, attention (bmm), linear (mm/addmm), by op."""
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        fn()
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    attn = sum(v for k, v in by_op.items() if "bmm" in k or "scaled_dot_product" in k)
    lin = sum(v for k, v in by_op.items() if k.endswith(".mm") or "addmm" in k)
    return {"total": int(fc.get_total_flops()), "attention": attn, "linear": lin, "by_op": by_op}


def uncached_raster_flops(model: NextScaleTransformer, codebook: nn.Embedding) -> dict:
    """FLOPs of a whole uncached raster generation at batch 1 (see module docstring)."""
    meta_model = copy.deepcopy(model).to("meta")
    meta_cb = copy.deepcopy(codebook).to("meta")
    T = model.seq_len

    def f(n: int) -> dict:
        toks = torch.zeros(1, n, dtype=torch.long, device="meta")
        return flops_of(lambda: prefix_logits(meta_model, meta_cb, toks))

    # the prefix before token i has n = i tokens, the forward runs n + 1 positions
    pts = [0, 1, 2, 3]
    totals = np.array([f(n)["total"] for n in pts], dtype=np.float64)
    coef = np.polyfit(pts, totals, 2)  # exact for a quadratic (4 points: also checks the fit)
    check_n = T - 1
    direct = f(check_n)["total"]
    predicted = float(np.polyval(coef, check_n))
    ns = np.arange(T, dtype=np.float64)
    total = float(np.polyval(coef, ns).sum())
    return {"total": total, "per_step_quadratic": coef.tolist(),
            "check_rel_error_at_last_step": abs(predicted - direct) / max(direct, 1)}


# ---------------------------------------------------------------------------- benchmark
def run(args) -> dict:
    p = dict(PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"])
    device = common.pick_device(args.gpu)
    common.setup_threads(args.threads)
    if args.gpu and not args.smoke:
        p["sides"] = p["sides"] + [64]
    if args.sides:
        p["sides"] = args.sides
    if args.batch:
        p["batch"] = args.batch
    info = common.machine_info(device)
    top_k, top_p = args.top_k, args.top_p
    rows = []
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (args.gpu and args.bf16) else torch.autocast("cpu", enabled=False)
    for side in p["sides"]:
        pair = build_pair(p, side, device, args.seed)
        row: dict = {"N": side, "next_scale_sides": list(NEXT_SCALE_SIDES[side]), "tokens": side * side}
        for order in ("next_scale", "raster"):
            model = pair[order]
            counter = count_steps(model)
            with amp:
                generate(pair, order, 1, args.seed, top_k, top_p)
            steps = counter["steps"]
            fl = flops_of(lambda: generate(pair, order, 1, args.seed, top_k, top_p))
            with amp:
                t1 = common.time_fn(lambda: generate(pair, order, 1, args.seed, top_k, top_p), device,
                                    repeats=p["repeats"], warmup=0)
                tb = common.time_fn(lambda: generate(pair, order, p["batch"], args.seed, top_k, top_p), device,
                                    repeats=p["repeats"], warmup=1)
                mem = common.peak_memory(lambda: generate(pair, order, p["batch"], args.seed, top_k, top_p), device)
            row[order] = {
                "L": model.seq_len, "steps": steps, "params": model.num_parameters(),
                "flops": fl["total"], "flops_attention": fl["attention"], "flops_linear": fl["linear"],
                "flops_by_op": fl["by_op"],
                "time_per_sample_b1_s": t1.median_s, "time_b1": t1.as_dict(),
                "time_per_sample_batch_s": tb.median_s / p["batch"], "time_batch": tb.as_dict(),
                "samples_per_s_batch": p["batch"] / tb.median_s,
                "peak_memory_batch": mem,
            }
        # raster without a KV cache: FLOPs always (counted on meta), time for small N
        unc = uncached_raster_flops(pair["raster"], pair["codebook"])
        row["raster_uncached"] = {"flops": unc["total"], "flops_fit": unc}
        if side <= p["uncached_time_max_side"]:
            t = common.time_fn(lambda: generate_uncached(pair["raster"], pair["codebook"], 1, args.seed, top_k, top_p),
                               device, repeats=1, warmup=0)
            row["raster_uncached"]["time_per_sample_b1_s"] = t.median_s
        ns, ra = row["next_scale"], row["raster"]
        row["ratios_raster_over_next_scale"] = {
            "steps": ra["steps"] / ns["steps"],
            "flops_cached": ra["flops"] / ns["flops"],
            "flops_uncached": unc["total"] / ns["flops"],
            "time_b1": ra["time_per_sample_b1_s"] / ns["time_per_sample_b1_s"],
            "time_batch": ra["time_per_sample_batch_s"] / ns["time_per_sample_batch_s"],
        }
        rows.append(row)
        r = row["ratios_raster_over_next_scale"]
        print(f"N={side:3d}  steps {ns['steps']:4d} vs {ra['steps']:5d}  GFLOPs {ns['flops'] / 1e9:8.3f} vs "
              f"{ra['flops'] / 1e9:8.3f} (uncached {unc['total'] / 1e9:9.2f})  time b1 "
              f"{ns['time_per_sample_b1_s']:.3f}s vs {ra['time_per_sample_b1_s']:.3f}s  "
              f"batch{p['batch']} {r['time_batch']:.1f}x", flush=True)

    sides = [r["N"] for r in rows]
    fits = {}
    for order in ("next_scale", "raster"):
        fits[order] = {
            "steps": common.fit_power_law(sides, [r[order]["steps"] for r in rows]),
            "flops": common.fit_power_law(sides, [r[order]["flops"] for r in rows]),
            "flops_attention": common.fit_power_law(sides, [r[order]["flops_attention"] for r in rows]),
            "time_b1": common.fit_power_law(sides, [r[order]["time_per_sample_b1_s"] for r in rows]),
            "time_batch": common.fit_power_law(sides, [r[order]["time_per_sample_batch_s"] for r in rows]),
        }
    fits["raster_uncached"] = {"flops": common.fit_power_law(sides, [r["raster_uncached"]["flops"] for r in rows])}
    figures = {"rows": rows, "exponents_in_N": fits, "verdict": verdict(rows, fits)}
    config = {"preset": "smoke" if args.smoke else "quick" if args.quick else "full", **p,
              "top_k": top_k, "top_p": top_p, "cfg": 0, "num_classes": 0, "seed": args.seed,
              "bf16": bool(args.gpu and args.bf16),
              "flop_counting": "torch.utils.flop_counter.FlopCounterMode, SDPA math backend, batch 1",
              "memory_method": "see benchmarks/common.py (VmHWM reset via clear_refs on CPU)"}
    path = common.write_result(NAME, info, config, figures, args.out)
    if not args.no_plot:
        plot(rows, fits, args.out)
    print("wrote", path)
    return {"path": path, "figures": figures, "config": config}


def verdict(rows: list, fits: dict) -> dict:
    """Plain-language comparison with the paper's claims."""
    e = {k: fits[k]["flops"]["exponent"] for k in ("next_scale", "raster", "raster_uncached")}
    n16 = [r for r in rows if r["N"] == 16]
    return {
        "claimed": "raster AR: O(N^2) steps and O(N^6) FLOPs; next-scale: O(N^4) FLOPs; VAR about 20x faster at N=16",
        "flops_exponent_next_scale": e["next_scale"],
        "flops_exponent_raster_kv_cache": e["raster"],
        "flops_exponent_raster_no_cache": e["raster_uncached"],
        "time_ratio_raster_over_next_scale_at_16_b1": n16[0]["ratios_raster_over_next_scale"]["time_b1"] if n16 else None,
        "time_ratio_raster_over_next_scale_at_16_batch": n16[0]["ratios_raster_over_next_scale"]["time_batch"] if n16 else None,
        "note": ("With a KV cache raster decoding costs sum_i (MLP + attention over i keys) = O(N^2 C^2 + N^4 C): "
                 "the same O(N^4) bound as next-scale, with fewer FLOPs than next-scale in fact (next-scale "
                 "processes sum_k n_k ~ 2-2.7 N^2 tokens with VAR's schedules, and every scale attends to all "
                 "earlier ones). "
                 "The O(N^6) of the paper is raster decoding without a cache (each step re-runs the prefix). "
                 "What remains of the speed-up is the number of sequential steps (K ~ log N vs N^2): "
                 "at batch 1 per-step latency dominates and next-scale wins by a large factor; at large "
                 "batch both become compute bound and the gap shrinks towards the FLOP ratio."),
    }


def plot(rows: list, fits: dict, out_dir: str | None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N = np.array([r["N"] for r in rows], float)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for key, lab, mk in (("next_scale", "next-scale", "o-"), ("raster", "raster, KV cache", "s-")):
        ax.loglog(N, [r[key]["flops"] for r in rows], mk, label=f"{lab} (slope {fits[key]['flops']['exponent']:.2f})")
    ax.loglog(N, [r["raster_uncached"]["flops"] for r in rows], "^--",
              label=f"raster, no cache (slope {fits['raster_uncached']['flops']['exponent']:.2f})")
    ref = rows[-1]["next_scale"]["flops"]
    ax.loglog(N, ref * (N / N[-1]) ** 4, ":", color="gray", label="N^4")
    ax.loglog(N, ref * (N / N[-1]) ** 6, "-.", color="gray", label="N^6")
    ax.set_xlabel("final grid side N"); ax.set_ylabel("FLOPs per sample (counted)"); ax.legend(fontsize=7)
    ax.set_title("FLOPs of one generation")
    ax = axes[1]
    for key, lab, mk in (("next_scale", "next-scale", "o-"), ("raster", "raster, KV cache", "s-")):
        ax.loglog(N, [r[key]["time_per_sample_b1_s"] for r in rows], mk,
                  label=f"{lab} b=1 (slope {fits[key]['time_b1']['exponent']:.2f})")
        ax.loglog(N, [r[key]["time_per_sample_batch_s"] for r in rows], mk.replace("-", "--"),
                  label=f"{lab} batch (slope {fits[key]['time_batch']['exponent']:.2f})")
    ax.set_xlabel("final grid side N"); ax.set_ylabel("seconds per sample"); ax.legend(fontsize=7)
    ax.set_title("wall time")
    ax = axes[2]
    ax.loglog(N, [r["next_scale"]["steps"] for r in rows], "o-", label="next-scale")
    ax.loglog(N, [r["raster"]["steps"] for r in rows], "s-", label="raster")
    ax.set_xlabel("final grid side N"); ax.set_ylabel("sequential forward steps"); ax.legend(fontsize=7)
    ax.set_title("sequential steps")
    return common.savefig(fig, NAME, out_dir)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite (seconds)")
    ap.add_argument("--sides", type=int, nargs="*", default=None, help="final grid sides N (overrides the preset)")
    ap.add_argument("--batch", type=int, default=0, help="throughput batch (overrides the preset)")
    ap.add_argument("--top-k", type=int, default=900)
    ap.add_argument("--top-p", type=float, default=0.96)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU only)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse(argv))


if __name__ == "__main__":
    main()
