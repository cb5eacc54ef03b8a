"""3-D voxel modality: coarse-to-fine generation of occupancy grids.

* :mod:`.data`      procedural labelled shapes (primitives, CSG unions, furniture), seeded
* :mod:`.tokenizer` 3-D conv multi-scale VQ-VAE (``msar.MultiScaleVQTokenizer`` over a rank-3 ``GridPyramid``)
* :mod:`.train`     training with msar.training (BCE occupancy loss; checkpoints, exact resume)
* :mod:`.generate`  class-conditional sampling and zero-shot shape completion
* :mod:`.metrics`   IoU, validity (components, legs), MMD / COV / 1-NNA with Chamfer distance
* :mod:`.export`    ``.obj`` meshes (marching cubes) and PNG renders
"""
from .data import CLASSES, VoxelShapes, make_dataset, make_shape, shape_at
from .export import render_grid, render_projections, save_obj, voxel_mesh
from .generate import ReferenceSet, complete, distribution_metrics, evaluate_completion, generate
from .metrics import (chamfer, count_legs, iou, mmd_cov_1nna, num_components, pairwise_chamfer, point_clouds,
                      set_metrics_from_distances, surface_points, validity)
from .tokenizer import (VoxelTokenizer, VoxelTokenizerConfig, build_voxel_tokenizer, half_mask, known_token_masks,
                        occupancy_loss)
from .train import encode_dataset, reconstruction_iou, token_loss, train_tokenizer, train_transformer

__all__ = [
    "CLASSES", "VoxelShapes", "make_dataset", "make_shape", "shape_at",
    "render_grid", "render_projections", "save_obj", "voxel_mesh",
    "ReferenceSet", "complete", "distribution_metrics", "evaluate_completion", "generate",
    "chamfer", "count_legs", "iou", "mmd_cov_1nna", "num_components", "pairwise_chamfer", "point_clouds",
    "set_metrics_from_distances", "surface_points", "validity",
    "VoxelTokenizer", "VoxelTokenizerConfig", "build_voxel_tokenizer", "half_mask", "known_token_masks",
    "occupancy_loss", "encode_dataset", "reconstruction_iou", "token_loss", "train_tokenizer", "train_transformer",
]
