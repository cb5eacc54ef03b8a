"""VQ vs FSQ vs bitwise multi-scale tokenizers on the digits, at equal bits per token.

    python -m benchmarks.quantizers [--threads 1] [--quick | --smoke] [--out DIR] [--modality voxel]

What it does (one process, one seed; every variant sees the same data and the same models
apart from the quantizer and the head)::

    train, val, test = digits 16x16 (+ augmented copies of train)
    for kind in vq, fsq, bitwise:                       # V = 2^b codes each (b bits per token)
        tokenizer = VQVAE(quantizer=kind)               # same encoder, decoder, pyramid, phi
        fit it (VQVAETrainer)                           -> test reconstruction MSE, tokenizer steps/s,
                                                           codes used / perplexity / bit entropy per scale
        for head in softmax (, bitwise for bitwise tokens):
            fit a class-conditional transformer (TransformerTrainer) -> test loss, steps/s
            sample every class (msar.sample)            -> classifier accuracy, Frechet distance of
                                                           classifier features vs test digits, images/s

The classifier (``modalities.image.classifier``) is trained once on real training digits.
``--modality voxel`` compares the tokenizers alone on the voxel demo's 16^3 shapes (reconstruction
IoU, codes per scale), written to ``OUT/quantizers_voxel.json``.
Writes ``OUT/quantizers.json`` (with provenance and the load average at start and end: the
speeds are wall-clock rates on a CPU that may be shared) and prints the table of the README.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import msar
from benchmarks import common
from modalities.image.classifier import predict, train_classifier
from modalities.image.data import augment_digits, digits_splits
from modalities.image.vqvae import VQVAE, VQVAEConfig
from msar.bitwise import index_to_bits, self_correction_batch
from msar.metrics import frechet_distance_from_features
from msar.training import (TokenDataset, TransformerTrainConfig, TransformerTrainer, VQVAETrainConfig, VQVAETrainer,
                           build_loader, collate_tokens)

NAME = "quantizers"
PRESETS = {
    # bits per token; tokenizer / transformer steps; samples per class; augmented copies
    "full": dict(bits=9, vae_steps=500, var_steps=700, samples_per_class=20, copies=2, classifier_steps=300,
                 vae_ch=32, depth=3, width=96, heads=4, batch=64),
    "quick": dict(bits=9, vae_steps=200, var_steps=200, samples_per_class=10, copies=1, classifier_steps=200,
                  vae_ch=32, depth=2, width=64, heads=2, batch=64),
    "smoke": dict(bits=6, vae_steps=4, var_steps=4, samples_per_class=2, copies=0, classifier_steps=5,
                  vae_ch=32, depth=1, width=32, heads=2, batch=16),
}
PATCH_NUMS = (1, 2, 3, 4)
VARIANTS = (("vq", "softmax"), ("fsq", "softmax"), ("bitwise", "softmax"), ("bitwise", "bitwise"))
# --self-correction P adds: the bitwise head trained with a fraction P of the input bits flipped
SELF_CORRECTION = ("bitwise", "bitwise+sc")
SAMPLING = {"softmax": dict(cfg=3.0, top_k=20, top_p=0.9), "bitwise": dict(cfg=3.0, top_k=0, top_p=0.9)}


def build_tokenizer(kind: str, p: dict) -> VQVAE:
    """The digits demo's tokenizer with the quantizer ``kind`` and ``2^bits`` codes."""
    return VQVAE(VQVAEConfig(vocab_size=2 ** p["bits"], z_channels=16, ch=p["vae_ch"], ch_mult=(1, 2, 2),
                             num_res_blocks=1, in_channels=1, patch_nums=PATCH_NUMS, share_quant_resi=4,
                             using_sa=False, using_mid_sa=True, quantizer=kind))


def build_transformer(tok: VQVAE, head: str, p: dict) -> msar.NextScaleTransformer:
    bits = {"bits": p["bits"], "head": "bitwise"} if head == "bitwise" else {}
    cfg = msar.TransformerConfig(schedule=tok.schedule.to_config(), vocab_size=tok.vocab_size,
                                 latent_dim=tok.latent_dim, num_classes=10, depth=p["depth"], embed_dim=p["width"],
                                 num_heads=p["heads"], drop_rate=0.1, drop_path_rate=0.1, **bits)
    return msar.NextScaleTransformer(cfg)


def code_statistics(indices: list[torch.Tensor], vocab_size: int, bits: int) -> dict:
    """Per scale: distinct codes used, their perplexity (exp of the entropy of the code frequencies)
    and the mean binary entropy of the index bits in % (100 = every bit a fair coin)."""
    used, perplexity, bit_entropy = [], [], []
    for idx in indices:
        counts = torch.bincount(idx.flatten(), minlength=vocab_size).double()
        p = counts[counts > 0] / counts.sum()
        used.append(int((counts > 0).sum()))
        perplexity.append(float(torch.exp(-(p * p.log()).sum())))
        q = index_to_bits(idx.flatten(), bits).double().mean(0).clamp(1e-12, 1 - 1e-12)
        bit_entropy.append(float((-(q * q.log2() + (1 - q) * (1 - q).log2())).mean() * 100))
    return {"codes_used": used, "code_perplexity": perplexity, "bit_entropy_pct": bit_entropy}


def timed(fn) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run(args: argparse.Namespace) -> dict:
    info = common.machine_info(torch.device("cpu"))  # start time and load average (CPU timings depend on it)
    common.setup_threads(args.threads)
    p = dict(PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"])
    out_dir = args.out or os.path.join(common.RESULTS, NAME)
    torch.manual_seed(args.seed)
    train, val, test = digits_splits(16, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    pool = torch.cat([train.images] + [augment_digits(train.images, g) for _ in range(p["copies"])])
    pool_labels = train.labels.repeat(1 + p["copies"])
    if args.smoke:
        pool, pool_labels, test = pool[:64], pool_labels[:64], type(test)(test.images[:64], test.labels[:64])
    clf = train_classifier(train.images, train.labels, steps=p["classifier_steps"], seed=args.seed, progress=False)
    test_pred, test_feat = predict(clf, test.images)
    rows, tokenizers = [], {}
    variants = [v for v in VARIANTS if not args.only_self_correction]
    variants += [SELF_CORRECTION] if args.self_correction > 0 else []
    for kind, head in variants:
        row = {"quantizer": kind, "head": head, "bits_per_token": p["bits"]}
        if kind not in tokenizers:  # one tokenizer per quantizer, shared by its heads
            torch.manual_seed(args.seed)
            tok = build_tokenizer(kind, p)
            vt = VQVAETrainer(tok, VQVAETrainConfig(lr=1e-3, total_steps=p["vae_steps"],
                                                    warmup_steps=min(50, p["vae_steps"] // 10), lr_schedule="cos",
                                                    final_lr_ratio=0.05, weight_decay=0.0, restart_every=100,
                                                    progress=False, tensorboard=False))
            loader = build_loader(torch.utils.data.TensorDataset(pool), p["batch"], seed=args.seed)
            _, t_fit = timed(lambda: vt.fit(loader, steps=p["vae_steps"]))
            tok.eval()
            with torch.no_grad():
                rec = tok.reconstruct(test.images)
            tr_set = TokenDataset.encode(tok, pool, pool_labels, batch_size=512)
            te_set = TokenDataset.encode(tok, test.images, test.labels, batch_size=512)
            tokenizers[kind] = tok, tr_set, te_set, {
                "test_recon_mse": float((rec - test.images).pow(2).mean()),
                "tokenizer_train_steps_per_s": p["vae_steps"] / t_fit,
                "params_quantizer": sum(x.numel() for x in tok.quantizer.parameters()),
                "test_codes": code_statistics(te_set.indices, tok.vocab_size, p["bits"]),
                "usage_ema_pct_per_scale": tok.quantizer.usage(p["batch"] * PATCH_NUMS[-1] ** 2),
            }
        tok, tr_set, te_set, tok_row = tokenizers[kind]
        row.update(tok_row)
        torch.manual_seed(args.seed)
        model = build_transformer(tok, head.removesuffix("+sc"), p)
        prepare, loader = None, build_loader(tr_set, p["batch"], seed=args.seed, collate_fn=collate_tokens)
        if head.endswith("+sc"):  # self-correction re-encodes every batch of images with flipped bits
            row["self_correction_flip_prob"] = args.self_correction
            gen = torch.Generator().manual_seed(args.seed)
            prepare = lambda raw: self_correction_batch(tok, raw[0], raw[1], args.self_correction, gen)  # noqa: E731
            loader = build_loader(torch.utils.data.TensorDataset(pool, pool_labels), p["batch"], seed=args.seed)
        trainer = TransformerTrainer(model, tok, TransformerTrainConfig(
            lr=1e-3, total_steps=p["var_steps"], warmup_steps=min(100, p["var_steps"] // 10), lr_schedule="lin0",
            final_lr_ratio=0.05, weight_decay=0.05, progress=False, tensorboard=False), prepare_batch=prepare)
        _, t_fit = timed(lambda: trainer.fit(loader, steps=p["var_steps"]))
        model.eval()
        trainer.prepare_batch = None  # evaluated on the clean test tokens
        ev = trainer.evaluate(build_loader(te_set, 256, shuffle=False, drop_last=False, collate_fn=collate_tokens),
                              log=False)
        labels = torch.arange(10).repeat_interleave(p["samples_per_class"])
        s = SAMPLING[head.removesuffix("+sc")]
        out, t_sample = timed(lambda: msar.sample(model, tok, labels, seed=args.seed, **s))
        pred, feat = predict(clf, out.data)
        row.update({
            "transformer_params": model.num_parameters(),
            "transformer_train_steps_per_s": p["var_steps"] / t_fit,
            # the loss of a bitwise head is a BCE per bit, of a softmax head a CE per token
            "test_loss": ev["loss"], "test_token_acc": ev["acc"],
            "sampling": s, "samples": len(labels), "sampling_images_per_s": len(labels) / t_sample,
            "classifier_acc_on_samples": float((pred == labels).float().mean()),
            "frechet_classifier_features_vs_test": frechet_distance_from_features(feat.numpy(), test_feat.numpy()),
            "sample_codes": code_statistics(out.indices, tok.vocab_size, p["bits"]),
        })
        rows.append(row)
        print(f"{kind:8s} {head:8s} mse {row['test_recon_mse']:.4f}  acc {row['classifier_acc_on_samples']:.3f}  "
              f"fd {row['frechet_classifier_features_vs_test']:.2f}", flush=True)
    config = {"preset": "smoke" if args.smoke else "quick" if args.quick else "full", **p, "patch_nums": PATCH_NUMS,
              "seed": args.seed, "threads": torch.get_num_threads()}
    figures = {"rows": rows, "classifier_acc_on_test_reals": float((test_pred == test.labels).float().mean()),
               "table": table(rows)}
    config["self_correction"] = args.self_correction
    path = common.write_result(NAME, info, config, figures, out_dir, "self_correction" if args.only_self_correction else "")
    print(figures["table"])
    return {"path": path, "figures": figures, "config": config}


VOXEL_PRESETS = {
    "full": dict(bits=8, shapes=600, test_shapes=150, steps=300, batch=32),
    "quick": dict(bits=8, shapes=200, test_shapes=50, steps=100, batch=32),
    "smoke": dict(bits=6, shapes=8, test_shapes=4, steps=2, batch=4),
}


def run_voxel(args: argparse.Namespace) -> dict:
    """The tokenizers alone on 16^3 occupancy grids (the voxel demo's shapes and training):
    reconstruction IoU on held-out shapes, codes used and bit entropy per scale, steps/s."""
    from modalities.voxel.data import make_dataset
    from modalities.voxel.tokenizer import VoxelTokenizer, VoxelTokenizerConfig
    from modalities.voxel.train import encode_dataset, reconstruction_iou, train_tokenizer

    info = common.machine_info(torch.device("cpu"))
    common.setup_threads(args.threads)
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    p = dict(VOXEL_PRESETS[preset])
    vox, _ = make_dataset(p["shapes"] + p["test_shapes"], resolution=16, seed=args.seed)
    vox = torch.from_numpy(vox)
    train, test = vox[:p["shapes"]], vox[p["shapes"]:]
    rows = []
    for kind in ("vq", "fsq", "bitwise"):
        torch.manual_seed(args.seed)
        tok = VoxelTokenizer(VoxelTokenizerConfig(resolution=16, latent_side=4, vocab_size=2 ** p["bits"],
                                                  quantizer=kind))
        _, t_fit = timed(lambda: train_tokenizer(tok, train, steps=p["steps"], batch_size=p["batch"], seed=args.seed,
                                                 progress=False))
        rows.append({"quantizer": kind, "bits_per_token": p["bits"],
                     "test_recon_iou": float(reconstruction_iou(tok, test).mean()),
                     "tokenizer_train_steps_per_s": p["steps"] / t_fit,
                     "test_codes": code_statistics(encode_dataset(tok, test), tok.vocab_size, p["bits"])})
        print(f"voxel {kind:8s} iou {rows[-1]['test_recon_iou']:.3f}", flush=True)
    lines = ["| quantizer | recon IoU | codes used per scale (test) | bit entropy % per scale | tok. steps/s |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r["test_codes"]
        lines.append(f"| {r['quantizer']} | {r['test_recon_iou']:.3f} | {' / '.join(map(str, c['codes_used']))} | "
                     f"{' / '.join(f'{v:.0f}' for v in c['bit_entropy_pct'])} | {r['tokenizer_train_steps_per_s']:.1f} |")
    config = {"preset": preset, **p, "resolution": 16, "latent_side": 4, "seed": args.seed,
              "threads": torch.get_num_threads()}
    figures = {"rows": rows, "table": "\n".join(lines)}
    path = common.write_result(NAME, info, config, figures, args.out or os.path.join(common.RESULTS, NAME), "voxel")
    print(figures["table"])
    return {"path": path, "figures": figures, "config": config}


def table(rows: list[dict]) -> str:
    """The README's markdown table."""
    lines = ["| quantizer | head | recon MSE | codes used per scale (test) | bit entropy % per scale | "
             "classifier acc | Frechet | tok. steps/s | tr. steps/s | images/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r["test_codes"]
        lines.append(f"| {r['quantizer']} | {r['head']} | {r['test_recon_mse']:.4f} | "
                     f"{' / '.join(map(str, c['codes_used']))} | {' / '.join(f'{v:.0f}' for v in c['bit_entropy_pct'])} | "
                     f"{r['classifier_acc_on_samples']:.3f} | {r['frechet_classifier_features_vs_test']:.2f} | "
                     f"{r['tokenizer_train_steps_per_s']:.1f} | {r['transformer_train_steps_per_s']:.1f} | "
                     f"{r['sampling_images_per_s']:.0f} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite (seconds)")
    ap.add_argument("--quick", action="store_true", help="short training (its numbers are not meaningful)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default=None, help=f"output folder (default benchmarks/results/{NAME})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--self-correction", type=float, default=0.0, metavar="P",
                    help="add the bitwise head trained with bitwise self-correction (bits flipped with probability P)")
    ap.add_argument("--only-self-correction", action="store_true",
                    help="with --self-correction: run that variant alone (written to OUT/quantizers_self_correction.json)")
    ap.add_argument("--modality", choices=("digits", "voxel"), default="digits",
                    help="digits: tokenizers, transformers and samples; voxel: the tokenizers alone")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    return run_voxel(args) if args.modality == "voxel" else run(args)


if __name__ == "__main__":
    main()
