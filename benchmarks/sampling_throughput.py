"""Sampling throughput of msar's KV-cached next-scale sampler against the reference VAR code.

    python -m benchmarks.sampling_throughput [--quick] [--gpu] [--threads T]

Configurations (random-init weights, 1000 classes, vocabulary 4096, codewords of 32 channels,
scales 1,2,3,4,5,6,8,10,13,16, guidance 1.5 with VAR's linear ramp, top-k 900, top-p 0.96):

* ``small``: depth 8, width 512, 8 heads, batch 8 -- reference VAR: 6.9 s per batch on the
  2-core development CPU (transformer loop only);
* ``d16``: ``TransformerConfig.var(16, ...)`` (width 1024, 16 heads), batch 4 -- reference
  18.3 s per batch on the same CPU; run in full mode only;
* ``d30``: ``TransformerConfig.var(30, ...)``, GPU only (no CPU reference).

Figures per configuration:

* images/s of :func:`msar.sample` with the decoder excluded (``decode=False``: a core quantizer
  over a :class:`GridPyramid` with identity encoder/decoder holds the decode state, so the
  quantizer's per-scale upsampling is included, as in VAR's loop) and included (the image
  modality's VQ-VAE, random init, decoding 256 x 256 images; its per-image time is measured on
  ``--decoder-batch`` images and added to the loop's per-image time);
* peak memory of a generation; ratio of throughput to the reference (goal >= 1.5x on CPU);
* greedy equivalence: ``msar.sample(top_k=1)`` (KV cache, one scale per step) against an
  uncached greedy decoder that re-runs the full teacher-forced forward (block-causal mask)
  once per scale.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

import msar
from msar import GridPyramid, MultiScaleResidualQuantizer, MultiScaleVQTokenizer, NextScaleTransformer, TransformerConfig

from . import common

NAME = "sampling_throughput"
SIDES_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

CONFIGS = {
    "small": dict(depth=8, width=512, heads=8, batch=8, reference_s_per_batch=6.9, sides=SIDES_256, vocab=4096),
    "d16": dict(var_depth=16, batch=4, reference_s_per_batch=18.3, sides=SIDES_256, vocab=4096),
    "d30": dict(var_depth=30, batch=4, reference_s_per_batch=None, sides=SIDES_256, vocab=4096),
    "smoke": dict(depth=1, width=32, heads=2, batch=2, reference_s_per_batch=None, sides=(1, 2, 4), vocab=64),
}
SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96)


def build(name: str, device: torch.device, seed: int) -> tuple[NextScaleTransformer, MultiScaleVQTokenizer]:
    c = CONFIGS[name]
    sched = [(p, p) for p in c["sides"]]
    torch.manual_seed(seed)
    if "var_depth" in c:
        cfg = TransformerConfig.var(c["var_depth"], schedule=sched, vocab_size=c["vocab"], latent_dim=32, num_classes=1000)
    else:
        cfg = TransformerConfig(schedule=sched, vocab_size=c["vocab"], latent_dim=32 if name != "smoke" else 8,
                                num_classes=1000 if name != "smoke" else 10, depth=c["depth"],
                                embed_dim=c["width"], num_heads=c["heads"])
    model = NextScaleTransformer(cfg).to(device).eval()
    quant = MultiScaleResidualQuantizer(cfg.vocab_size, cfg.latent_dim, GridPyramid(sched)).to(device).eval()
    return model, MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), quant).eval()


def image_decoder_tokenizer(device: torch.device, seed: int):
    """The image modality's VQ-VAE (VAR's vae_ch160v4096z32, random init) or None if absent."""
    try:
        from modalities.image.vqvae import VQVAE
    except ImportError:
        return None
    torch.manual_seed(seed)
    return VQVAE().to(device).eval()


# ---------------------------------------------------------------------------- greedy equivalence
@torch.no_grad()
def greedy_uncached(model: NextScaleTransformer, tokenizer, labels: torch.Tensor, cfg: float) -> list[torch.Tensor]:
    """Greedy next-scale decoding without a KV cache: for every scale k, one full teacher-forced
    forward over all L positions (future scales filled with token 0 -- the block-causal mask
    keeps them from influencing scale k) and argmax of the guided logits of scale k."""
    sched, K, B = model.schedule, len(model.schedule), labels.shape[0]
    guided = cfg != 0 and model.num_classes > 0
    run_labels = torch.cat((labels, torch.full_like(labels, model.num_classes))) if guided else labels
    indices: list[torch.Tensor] = []
    for k in range(K):
        full = indices + [torch.zeros(B, sched.token_counts[j], dtype=torch.long, device=labels.device)
                          for j in range(k, K)]
        x = tokenizer.teacher_forcing_input(full)
        if guided:
            x = x.repeat(2, 1, 1)
        logits = model(run_labels, x, allow_null=True)[:, sched.slice(k)]
        if guided:
            logits = msar.sampling.apply_guidance(logits[:B], logits[B:], msar.guidance_strength(cfg, model.schedule.progress(k)))
        indices.append(logits.argmax(-1))
    return indices


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    same = torch.cat([(x == y).flatten() for x, y in zip(a, b)])
    return {"identical": bool(same.all()), "fraction_equal": float(same.float().mean()), "tokens": int(same.numel())}


# ---------------------------------------------------------------------------- benchmark
def bench_config(name: str, args, device: torch.device, repeats: int, with_decoder: bool) -> dict:
    c = CONFIGS[name]
    model, tok = build(name, device, args.seed)
    B = args.batch or c["batch"]
    labels = torch.arange(B, device=device) % model.num_classes
    kw = dict(cfg=SAMPLING["cfg"], top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"])
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16))
    if args.compile:
        compile_blocks(model)

    def run_msar():
        with amp:
            return msar.sample(model, tok, labels, seed=args.seed, decode=False, **kw)

    row: dict = {"config": name, "params": model.num_parameters(), "batch": B, "L": model.seq_len,
                 "reference_s_per_batch": c["reference_s_per_batch"]}
    t = common.time_fn(run_msar, device, repeats=repeats, warmup=1)
    row["msar_sample"] = {"s_per_batch": t.median_s, "images_per_s": B / t.median_s, "timing": t.as_dict(),
                        "cpu_s_per_batch": t.as_dict()["median_process_cpu_s"]}
    row["msar_sample"]["peak_memory"] = common.peak_memory(run_msar, device)
    if c["reference_s_per_batch"] and device.type == "cpu":
        ref = c["reference_s_per_batch"]
        row["speedup_vs_reference"] = {"msar_sample": ref / row["msar_sample"]["s_per_batch"], "goal": 1.5,
                                       "note": "wall time here vs the issue's idle 2-core reference time"}
    if with_decoder:
        vq = image_decoder_tokenizer(device, args.seed)
        if vq is None or vq.schedule.token_counts != model.schedule.token_counts:
            row["decoder_included"] = None  # no image modality, or not this schedule
        else:
            # the decoder's cost does not depend on the tokens: time it on `decoder_batch` images of a
            # sampled batch and add its per-image time to the loop's (a 256 x 256 decode is heavy on CPU)
            DB = min(B, args.decoder_batch or B)
            idx = [i[:DB] for i in run_msar().indices]

            def run_dec():
                with amp, torch.no_grad():
                    return vq.decode(idx)
            t = common.time_fn(run_dec, device, repeats=1, warmup=0)
            dec_img = t.median_s / DB
            dec_cpu = t.as_dict()["median_process_cpu_s"] / DB
            loop_img = row["msar_sample"]["s_per_batch"] / B
            loop_cpu = row["msar_sample"]["cpu_s_per_batch"] / B
            row["decoder_included"] = {
                "decoder": "modalities.image.vqvae.VQVAE() (vae_ch160v4096z32, 256x256), random init",
                "decoder_batch": DB, "decoder_s_per_image": dec_img, "decoder_cpu_s_per_image": dec_cpu,
                "s_per_batch": (loop_img + dec_img) * B, "images_per_s": 1 / (loop_img + dec_img),
                "images_per_cpu_s": 1 / (loop_cpu + dec_cpu), "timing": t.as_dict()}
    # greedy equivalence (fp32, no autocast): KV-cached vs uncached
    gb = min(B, args.greedy_batch)
    glabels = labels[:gb]
    cached = msar.sample(model, tok, glabels, cfg=SAMPLING["cfg"], top_k=1, seed=args.seed, decode=False).indices
    row["greedy_cached_vs_uncached"] = {"batch": gb, **compare(cached, greedy_uncached(model, tok, glabels, SAMPLING["cfg"]))}
    return row


def compile_blocks(model: NextScaleTransformer) -> None:
    """``torch.compile`` every block (GPU path; one graph per scale shape, hence the larger cache)."""
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for i, b in enumerate(model.blocks):
        model.blocks[i] = torch.compile(b, dynamic=False)


def run(args) -> dict:
    device = common.pick_device(args.gpu)
    common.setup_threads(args.threads)
    info = common.machine_info(device)
    if args.configs:
        names = args.configs
    elif args.smoke:
        names = ["smoke"]
    elif args.quick:
        names = ["small"]
    else:
        names = ["small", "d16"] + (["d30"] if args.gpu else [])
    repeats = 1 if args.smoke else 2 if args.quick else 3
    if args.quick and not args.decoder_batch:
        args.decoder_batch = 2
    rows = []
    for name in names:
        row = bench_config(name, args, device, repeats if name != "d16" or args.gpu else 2,
                           with_decoder=not args.smoke and not args.no_decoder)
        rows.append(row)
        s = row.get("speedup_vs_reference", {})
        print(f"{name}: msar.sample {row['msar_sample']['s_per_batch']:.2f} s/batch of {row['batch']} "
              f"({row['msar_sample']['images_per_s']:.2f} img/s, x{s.get('msar_sample', float('nan')):.2f} vs ref); "
              f"greedy cached==uncached {row['greedy_cached_vs_uncached']['identical']}", flush=True)
    config = {"preset": "smoke" if args.smoke else "quick" if args.quick else "full", "configs": {n: CONFIGS[n] for n in names},
              "sampling": SAMPLING, "seed": args.seed, "bf16": bool(args.bf16), "compile": bool(args.compile),
              "weights": "random init (VAR's, at construction)", "memory_method": "see benchmarks/common.py"}
    figures = {"rows": rows}
    path = common.write_result(NAME, info, config, figures, args.out)
    if not args.no_plot:
        plot(rows, args.out)
    print("wrote", path)
    return {"path": path, "figures": figures, "config": config}


def plot(rows: list, out_dir: str | None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(rows), 3.8))
    labels, vals, colors = [], [], []
    for r in rows:
        B = r["batch"]
        if r["reference_s_per_batch"]:
            labels.append(f"{r['config']}\nVAR ref"); vals.append(B / r["reference_s_per_batch"]); colors.append("gray")
        labels.append(f"{r['config']}\nmsar.sample"); vals.append(r["msar_sample"]["images_per_s"]); colors.append("C0")
        if r.get("decoder_included"):
            labels.append(f"{r['config']}\n+decoder"); vals.append(r["decoder_included"]["images_per_s"]); colors.append("C1")
    ax.bar(range(len(vals)), vals, color=colors)
    ax.set_xticks(range(len(vals))); ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("images / s"); ax.set_title("sampling throughput (transformer loop; +decoder = VQ-VAE decode)")
    return common.savefig(fig, NAME, out_dir)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny model for the test suite")
    ap.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), default=None)
    ap.add_argument("--batch", type=int, default=0, help="override the batch size of every config")
    ap.add_argument("--greedy-batch", type=int, default=2, help="batch of the greedy equivalence check")
    ap.add_argument("--no-decoder", action="store_true", help="skip the decoder-included measurement")
    ap.add_argument("--decoder-batch", type=int, default=0,
                    help="images decoded to time the decoder (default: the batch; quick mode: 2)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU; slower on this CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks (GPU path)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse(argv))


if __name__ == "__main__":
    main()
