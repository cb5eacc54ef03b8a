"""Video modality: causal 3-D conv multi-scale VQ-VAE over space-time pyramids.

* :mod:`.schedules` -- joint / space-only / per-frame (t, h, w) schedules and their pyramids;
* :mod:`.tokenizer` -- :class:`VideoTokenizer`, a :class:`msar.MultiScaleVQTokenizer`;
* :mod:`.masks`     -- known-token masks for frame prediction, interpolation, inpainting;
* :mod:`.data`      -- :class:`MovingDigits`, bouncing scikit-learn digits;
* :mod:`.metrics`   -- PSNR, per-frame digit classifier, temporal consistency, motion check;
* :mod:`.viz`       -- animated GIFs and PNG filmstrips.
"""
from .data import MovingDigits, bounce_trajectory
from .masks import (box_mask, fill_unknown, frame_prediction_mask, interpolation_mask, pixel_to_latent_known,
                    token_known_masks, video_known_masks)
from .schedules import (SCHEDULE_KINDS, FramePyramid, FrameScaleSchedule, build_schedule, frame_schedule,
                        joint_schedule, make_pyramid, space_schedule)
from .tokenizer import VideoTokenizer, VideoTokenizerConfig, build_video_tokenizer

__all__ = [
    "MovingDigits", "bounce_trajectory",
    "box_mask", "fill_unknown", "frame_prediction_mask", "interpolation_mask", "pixel_to_latent_known",
    "token_known_masks", "video_known_masks",
    "SCHEDULE_KINDS", "FramePyramid", "FrameScaleSchedule", "build_schedule", "frame_schedule", "joint_schedule",
    "make_pyramid", "space_schedule",
    "VideoTokenizer", "VideoTokenizerConfig", "build_video_tokenizer",
]
