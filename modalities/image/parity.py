"""Check numerical parity with the reference VAR implementation on a fixture.

    python -m modalities.image.parity FIXTURE.safetensors [--json FIXTURE.json]

A fixture (format: ``shared/fixtures/var_parity/README.md``) holds reference
weights (``vae.*``, ``var.*``), inputs (``in.*``) and the reference outputs
(``out.*``); its configuration is the JSON of the same stem.  The weights go
through the same loaders users call for the released checkpoints; every
``out.*`` tensor is recomputed, its largest error printed, and the exit status
is 1 if any index differs or any float is off by more than the tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable

import torch

from msar import TransformerConfig, sample

from .checkpoint import transformer_from_state_dict, vqvae_from_state_dict
from .vqvae import VQVAEConfig

LATENT_TOL = 1e-4   # logits, latents, teacher-forcing input
IMAGE_TOL = 1e-3    # anything that went through the decoder


def configs_from_fixture(cfg: dict) -> tuple[VQVAEConfig, TransformerConfig]:
    """The fixture's JSON (VAR's argument names: ``V``, ``Cvae``, ``patch_nums`` ...) -> msar configs."""
    required = ["V", "Cvae", "ch", "share_quant_resi", "patch_nums", "depth", "embed_dim", "num_heads",
                "shared_aln", "attn_l2_norm", "num_classes"]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"fixture config is missing keys {missing}")
    pn = tuple(int(p) for p in cfg["patch_nums"])
    vae = VQVAEConfig(vocab_size=cfg["V"], z_channels=cfg["Cvae"], ch=cfg["ch"],
                      share_quant_resi=cfg["share_quant_resi"], patch_nums=pn)
    var = TransformerConfig(schedule=[(p, p) for p in pn], vocab_size=cfg["V"], latent_dim=cfg["Cvae"],
                            num_classes=cfg["num_classes"], depth=cfg["depth"], embed_dim=cfg["embed_dim"],
                            num_heads=cfg["num_heads"], shared_aln=bool(cfg["shared_aln"]),
                            attn_l2_norm=bool(cfg["attn_l2_norm"]), cond_drop_rate=0.0, drop_path_rate=0.0)
    return vae, var


def recompute(tensors: dict[str, torch.Tensor], cfg: dict,
              device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Recompute every ``out.*`` key of a fixture with msar on ``device`` (results on the CPU)."""
    vae_cfg, var_cfg = configs_from_fixture(cfg)
    vae = vqvae_from_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")}, vae_cfg).to(device)
    var = transformer_from_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("var.")}, var_cfg).to(device)
    img, labels = tensors["in.img"].float().to(device), tensors["in.labels"].long().to(device)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        f = vae.encode_latent(img)
        out["out.encoder_f"] = f
        idx = vae.quantizer.encode(f)
        for i, t in enumerate(idx):
            out[f"out.idx_{i}"] = t
        fhat = vae.quantizer.encode_progression(f)[-1]
        out["out.fhat_last"] = fhat
        out["out.recon"] = vae.decode_latent(fhat).clamp(-1, 1)
        out["out.idx_to_img_last"] = vae.decode(idx)
        x = vae.teacher_forcing_input(idx)
        out["out.teacher_input"] = x
        out["out.logits"] = var(labels, x)
        for key in tensors:
            m = re.fullmatch(r"out\.greedy_cfg([0-9.]+)", key)
            if not m:
                continue
            res = sample(var, vae, labels, cfg=float(m.group(1)), top_k=1, top_p=0.0)
            out[key] = res.data.add(1).mul(0.5)
            for i, t in enumerate(res.indices):
                out[f"{key}_idx_{i}"] = t
    return {k: v.cpu() for k, v in out.items()}


def compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
            print_fn: Callable[[str], None] = print) -> bool:
    """Print one line per ``out.*`` key of ``ref`` (indices: count differing; floats: largest
    error against :data:`LATENT_TOL` / :data:`IMAGE_TOL`); True when every key passes."""
    ok = True
    for key in sorted(k for k in ref if k.startswith("out.")):
        r = ref[key]
        if key not in got:
            print_fn(f"FAIL {key}: not recomputed")
            ok = False
            continue
        g = got[key]
        if tuple(g.shape) != tuple(r.shape):
            print_fn(f"FAIL {key}: shape {tuple(g.shape)} != reference {tuple(r.shape)}")
            ok = False
            continue
        if not r.dtype.is_floating_point:
            bad = int((g.long() != r.long()).sum())
            status = "ok  " if bad == 0 else "FAIL"
            ok &= bad == 0
            print_fn(f"{status} {key:32s} indices differing: {bad} / {r.numel()}")
        else:
            err = (g.float() - r.float()).abs().max().item() if r.numel() else 0.0
            image_like = any(s in key for s in ("recon", "img", "greedy"))
            tol = IMAGE_TOL if image_like else LATENT_TOL
            status = "ok  " if err <= tol else "FAIL"
            ok &= err <= tol
            print_fn(f"{status} {key:32s} max abs error {err:.3e} (tol {tol:g})")
    return ok


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 when every output of the fixture matches, 1 otherwise, 2 for a missing file."""
    ap = argparse.ArgumentParser(prog="python -m modalities.image.parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("fixture", help="FIXTURE.safetensors")
    ap.add_argument("--json", help="config JSON (default: same stem as the fixture)")
    args = ap.parse_args(argv)
    path = args.fixture
    cfg_path = args.json or os.path.splitext(path)[0] + ".json"
    for p in (path, cfg_path):
        if not os.path.isfile(p):
            print(f"error: file not found: {p}", file=sys.stderr)
            return 2
    from safetensors.torch import load_file
    tensors = load_file(path)
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    with torch.no_grad():  # (not set_grad_enabled(False): main() also runs inside other processes, e.g. tests)
        got = recompute(tensors, cfg)
    ok = compare(tensors, got)
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
