"""Training throughput of the next-scale transformer: one step = forward + backward + AdamW.

    python -m benchmarks.training_throughput [--quick] [--gpu] [--threads T]

Configuration ``small`` (depth 8, width 512, 8 heads, scales 1..16 so L = 680 tokens,
vocabulary 4096, 1000 classes) with random inputs of the right shapes (the step's cost does not
depend on the values). Variants of the block-causal mask, all of which give the same logits:

* ``bool``: the model's own ``(L, L)`` bool mask passed to SDPA (True = may attend);
* ``additive``: the same mask as a float tensor of 0 / -inf (VAR's ``attn_bias_for_masking``);
* ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built from the level ids
  (skips fully masked blocks; only fast when compiled -- in eager mode it is a reference
  implementation that materialises the scores).

Each variant is timed eager; in full mode also under ``torch.compile`` (compile time reported
separately). Figures: tokens/s (B x L per step), s/step, peak memory, and which variant is
fastest. ``--gpu`` runs on CUDA with ``--bf16`` autocast available.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from msar import NextScaleTransformer, TransformerConfig
from msar.models.transformer import SelfAttention

from . import common

NAME = "training_throughput"
SIDES_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
CONFIGS = {
    "small": dict(depth=8, width=512, heads=8, vocab=4096, latent=32, classes=1000, sides=SIDES_256),
    "smoke": dict(depth=1, width=32, heads=2, vocab=64, latent=8, classes=10, sides=(1, 2, 4)),
}


def have_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------- mask variants
def flex_forward(block_mask, compiled: bool):
    """A replacement for ``SelfAttention.forward`` that calls flex_attention with ``block_mask``
    (same projections, cosine attention and scale as the original)."""
    from torch.nn.attention.flex_attention import flex_attention
    attend = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def forward(self: SelfAttention, x: torch.Tensor, attn_mask=None, cache=None) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.l2_norm:
            scale_mul = self.attn_scale.clamp_max(self.max_log_scale).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        out = attend(q, k, v, block_mask=block_mask, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))

    return forward


def set_mask(model: NextScaleTransformer, kind: str, compiled: bool = False) -> None:
    """Switch the block-causal mask of ``model`` to ``kind`` (bool / additive / flex)."""
    device = model.pos_embed.device
    sched = model.schedule
    for b in model.blocks:  # undo a previous flex patch
        b.attn.__dict__.pop("forward", None)
    if kind == "bool":
        model.attn_mask = sched.attn_mask("bool", device=device)
    elif kind == "additive":
        model.attn_mask = sched.attn_mask("additive", device=device, dtype=model.pos_embed.dtype)
    elif kind == "flex":
        from torch.nn.attention.flex_attention import create_block_mask
        lvl = sched.level_ids(device)

        def block_causal(b, h, q_idx, kv_idx):
            return lvl[q_idx] >= lvl[kv_idx]

        bm = create_block_mask(block_causal, B=None, H=None, Q_LEN=model.seq_len, KV_LEN=model.seq_len, device=str(device))
        fwd = flex_forward(bm, compiled)
        model.attn_mask = None
        for b in model.blocks:
            b.attn.forward = fwd.__get__(b.attn)
    else:
        raise ValueError(f"mask kind must be bool, additive or flex, got {kind!r}")


# ---------------------------------------------------------------------------- step
def make_step(model, opt, batch: int, device: torch.device, amp_dtype: torch.dtype | None, fwd=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, model.seq_len - model.first_len, model.latent_dim, generator=g).to(device)
    labels = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    target = torch.randint(0, model.vocab_size, (batch, model.seq_len), generator=g).to(device)
    fwd = fwd or model

    def step() -> float:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = fwd(labels, x)
            loss = F.cross_entropy(logits.float().reshape(-1, model.vocab_size), target.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def bench_variant(cfg_name: str, kind: str, compiled: bool, args, device: torch.device, batch: int,
                  repeats: int) -> dict:
    c = CONFIGS[cfg_name]
    torch.manual_seed(args.seed)
    cfg = TransformerConfig(schedule=[(p, p) for p in c["sides"]], vocab_size=c["vocab"], latent_dim=c["latent"],
                            num_classes=c["classes"], depth=c["depth"], embed_dim=c["width"], num_heads=c["heads"])
    model = NextScaleTransformer(cfg).to(device).train()
    set_mask(model, kind, compiled)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    fwd = torch.compile(model, dynamic=False) if (compiled and kind != "flex") else model
    step = make_step(model, opt, batch, device, torch.bfloat16 if args.bf16 else None, fwd)
    common.sync(device)
    t0 = time.perf_counter()
    loss0 = step()  # first step: includes compilation when compiled
    common.sync(device)
    first = time.perf_counter() - t0
    t = common.time_fn(step, device, repeats=repeats, warmup=0)
    mem = common.peak_memory(step, device)
    tokens = batch * model.seq_len
    return {"mask": kind, "compiled": compiled, "batch": batch, "L": model.seq_len, "params": model.num_parameters(),
            "s_per_step": t.median_s, "tokens_per_s": tokens / t.median_s, "first_step_s": first,
            # load-robust on a shared CPU: tokens per second of CPU time the process consumed
            "tokens_per_cpu_s": tokens / t.as_dict()["median_process_cpu_s"],
            "timing": t.as_dict(), "peak_memory": mem, "loss_first_step": loss0}


def run(args) -> dict:
    device = common.pick_device(args.gpu)
    common.setup_threads(args.threads)
    info = common.machine_info(device)
    cfg_name = "smoke" if args.smoke else "small"
    batch = args.batch or (2 if args.smoke else 4 if args.quick else 8)
    repeats = 1 if args.smoke else 2 if args.quick else 3
    kinds = ["bool", "additive"] + (["flex"] if have_flex() and not args.no_flex else [])
    compile_modes = [False] + ([True] if (args.compile or not (args.quick or args.smoke)) and not args.no_compile else [])
    rows = []
    for compiled in compile_modes:
        for kind in kinds:
            try:
                r = bench_variant(cfg_name, kind, compiled, args, device, batch, repeats)
            except Exception as e:  # a variant this torch/platform cannot run is reported, not fatal
                r = {"mask": kind, "compiled": compiled, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(r)
            if "error" in r:
                print(f"{kind:8s} compiled={compiled}: {r['error']}", flush=True)
            else:
                print(f"{kind:8s} compiled={compiled}: {r['tokens_per_s']:9.0f} tokens/s  {r['s_per_step']:.3f} s/step  "
                      f"peak {r['peak_memory']['peak_mb']:.0f} MB  (first step {r['first_step_s']:.1f} s)", flush=True)
    ok = [r for r in rows if "error" not in r]
    # on CPU rank by CPU time (wall time on a shared machine mostly measures the neighbours)
    key = "tokens_per_s" if device.type == "cuda" else "tokens_per_cpu_s"
    best = max(ok, key=lambda r: r[key]) if ok else None
    figures = {"rows": rows, "fastest": {"mask": best["mask"], "compiled": best["compiled"], "by": key,
                                         key: best[key]} if best else None}
    config = {"preset": "smoke" if args.smoke else "quick" if args.quick else "full", "model": CONFIGS[cfg_name],
              "batch": batch, "optimizer": "AdamW(lr=1e-4, wd=0.05, betas=(0.9, 0.95)), foreach default",
              "bf16": bool(args.bf16), "seed": args.seed, "memory_method": "see benchmarks/common.py"}
    path = common.write_result(NAME, info, config, figures, args.out)
    if not args.no_plot:
        plot(rows, args.out)
    print("wrote", path, "| fastest:", figures["fastest"])
    return {"path": path, "figures": figures, "config": config}


def plot(rows: list, out_dir: str | None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [f"{r['mask']}{' +compile' if r['compiled'] else ''}" for r in ok]
    axes[0].bar(range(len(ok)), [r["tokens_per_s"] for r in ok], color=["C1" if r["compiled"] else "C0" for r in ok])
    axes[0].set_ylabel("tokens / s (fwd + bwd + AdamW)")
    axes[1].bar(range(len(ok)), [r["peak_memory"]["peak_mb"] for r in ok], color="C2")
    axes[1].set_ylabel("peak memory of a step (MB)")
    for ax in axes:
        ax.set_xticks(range(len(ok))); ax.set_xticklabels(names, fontsize=8, rotation=20)
    fig.suptitle("training step, block-causal mask variants")
    return common.savefig(fig, NAME, out_dir)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny model for the test suite")
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile in quick mode")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile in full mode")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse(argv))


if __name__ == "__main__":
    main()
