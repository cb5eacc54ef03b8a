"""Class-conditional generation, zero-shot shape completion and their evaluation."""
from __future__ import annotations


import numpy as np
import torch

import msar
from msar import NextScaleTransformer, SampleOutput

from .data import CLASSES
from .metrics import iou, pairwise_chamfer, point_clouds, set_metrics_from_distances, validity
from .tokenizer import VoxelTokenizer, known_token_masks


@torch.no_grad()
def generate(model: NextScaleTransformer, tok: VoxelTokenizer, labels: torch.Tensor, batch_size: int = 32,
             seed: int = 0, **sample_kw) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sample one shape per label ``(N,)`` in batches: ``(occupancy (N, R, R, R) bool, indices per scale)``.
    Batch b uses seed ``seed + b`` so results do not depend on anything else."""
    occ, idx = [], []
    for b, i in enumerate(range(0, len(labels), batch_size)):
        out = msar.sample(model, tok, labels[i:i + batch_size], seed=seed + b, **sample_kw)
        occ.append(tok.occupancy(out.data))
        idx.append(out.indices)
    return torch.cat(occ), [torch.cat([p[k] for p in idx]) for k in range(len(idx[0]))]


@torch.no_grad()
def complete(model: NextScaleTransformer, tok: VoxelTokenizer, voxels: torch.Tensor, voxel_mask: torch.Tensor,
             labels: torch.Tensor, **sample_kw) -> tuple[SampleOutput, list[torch.Tensor], list[torch.Tensor]]:
    """Zero-shot shape completion: only the voxels under ``voxel_mask`` ``(B, R, R, R)`` are given.

    The given part alone (the rest cleared, so nothing of the hidden part leaks
    through the encoder) is tokenized; tokens whose support lies entirely in the
    known region (:func:`known_token_masks`) are teacher-forced at every scale and
    the transformer samples the others. Returns ``(sample output, known, known_mask)``;
    ``output.data`` are occupancy logits ``(B, R, R, R)``.
    """
    if voxels.shape != voxel_mask.shape:
        raise ValueError(f"voxels {tuple(voxels.shape)} and voxel_mask {tuple(voxel_mask.shape)} must have the same shape")
    partial = voxels.float() * voxel_mask.float()
    known = tok.encode(partial)
    known_mask = known_token_masks(voxel_mask.bool(), tok.schedule)
    out = msar.sample(model, tok, labels, known=known, known_mask=known_mask, **sample_kw)
    return out, known, known_mask


def _region_iou(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> np.ndarray:
    return iou(pred & region, target & region)


@torch.no_grad()
def evaluate_completion(model: NextScaleTransformer, tok: VoxelTokenizer, voxels: torch.Tensor, labels: torch.Tensor,
                        voxel_mask: torch.Tensor, seed: int = 0, **sample_kw) -> tuple[dict, torch.Tensor]:
    """Completion quality on the hidden region: IoU of the completed shape against the truth
    there, versus the same model sampling with no known tokens (the prior alone), and how
    well the given region is kept. Returns ``(metrics, completed occupancy (B, R, R, R))``."""
    target = voxels.bool()
    hidden = ~voxel_mask.bool()
    out, known, known_mask = complete(model, tok, voxels, voxel_mask, labels, seed=seed, **sample_kw)
    done = tok.occupancy(out.data)
    free = msar.sample(model, tok, labels, seed=seed, **sample_kw)
    free_occ = tok.occupancy(free.data)
    preserved = all(bool((o[m] == k[m]).all()) for o, k, m in zip(out.indices, known, known_mask))
    metrics = {
        "hidden_iou_completion": float(_region_iou(done, target, hidden).mean()),
        "hidden_iou_unconstrained_sample": float(_region_iou(free_occ, target, hidden).mean()),
        "given_iou_kept": float(_region_iou(done, target, ~hidden).mean()),
        "full_iou_completion": float(iou(done, target).mean()),
        "known_tokens_fraction": float(torch.cat([m.float() for m in known_mask], 1).mean()),
        "known_tokens_preserved": preserved,
        "single_component": validity(done.numpy(), labels.numpy())["single_component"],
    }
    return metrics, done


class ReferenceSet:
    """Held-out shapes for MMD / COV / 1-NNA: their surface clouds and R x R Chamfer
    distances are computed once and reused for every generated set compared to them."""

    def __init__(self, voxels: np.ndarray, labels: np.ndarray, n_points: int = 256, seed: int = 0):
        self.labels = np.asarray(labels)
        self.n_points, self.seed = n_points, seed
        self.clouds = point_clouds(voxels, n_points, seed + 1)
        self.d_rr = pairwise_chamfer(self.clouds, self.clouds)

    def compare(self, gen: np.ndarray, gen_labels: np.ndarray) -> dict:
        """MMD / COV / 1-NNA (Chamfer) of ``gen (N, R, R, R)`` against the reference, pooled and
        per class, plus the % of generated shapes whose nearest reference has the requested class."""
        gen_labels = np.asarray(gen_labels)
        pg = point_clouds(gen, self.n_points, self.seed)
        d_gr, d_gg = pairwise_chamfer(pg, self.clouds), pairwise_chamfer(pg, pg)
        out = set_metrics_from_distances(d_gr, d_gg, self.d_rr)
        out["nn_class_agreement"] = float((self.labels[d_gr.argmin(1).numpy()] == gen_labels).mean() * 100)
        per_class = {}
        for c in np.unique(self.labels):
            gi = torch.from_numpy(np.nonzero(gen_labels == c)[0])
            ri = torch.from_numpy(np.nonzero(self.labels == c)[0])
            if len(gi) and len(ri):
                per_class[CLASSES[c]] = set_metrics_from_distances(d_gr[gi][:, ri], d_gg[gi][:, gi], self.d_rr[ri][:, ri])
        out["per_class"] = per_class
        return out


def distribution_metrics(gen: np.ndarray, gen_labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray,
                         n_points: int = 256, seed: int = 0) -> dict:
    """One-off :meth:`ReferenceSet.compare` (build a :class:`ReferenceSet` to compare several sets)."""
    return ReferenceSet(ref, ref_labels, n_points, seed).compare(gen, gen_labels)
