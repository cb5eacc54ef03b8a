"""msar: modality-agnostic multiscale autoregressive (next-scale prediction) generation.

The core never imports a modality. A modality supplies a scale schedule and a
latent pyramid (restriction / prolongation); the residual quantizer, the
block-causal transformer, KV-cached sampling, guidance and editing are shared.
"""
from .schedule import ScaleSchedule
from .pyramid import GridPyramid, LatentPyramid, OperatorPyramid
from .quantizer import (MultiScaleResidualQuantizer, PhiBank, QuantizerOutput, ResidualQuantizer, from_tokens,
                        make_quantizer, to_tokens)
from .fsq import FSQQuantizer
from .bitwise import BitwiseQuantizer
from .tokenizer import CandidateFeatures, DecodeState, MultiScaleVQTokenizer, PyramidTokenizer, ResidualDecodeState
from .conditioning import Condition
from .models.transformer import NextScaleTransformer, TransformerConfig
from .pretrained import Pipeline, PretrainedError, PretrainedMixin, from_pretrained
from .sampling import SampleOutput, filter_top_k_top_p, guidance_strength, sample, sample_tokens
from .acceleration import Acceleration, quantize_int8
from .editing import known_masks
from .diagnostics import ScaleDiagnostic, scale_diagnostic

__version__ = "0.1.0"

__all__ = [
    "ScaleSchedule", "GridPyramid", "LatentPyramid", "OperatorPyramid",
    "MultiScaleResidualQuantizer", "PhiBank", "QuantizerOutput", "to_tokens", "from_tokens",
    "ResidualQuantizer", "FSQQuantizer", "BitwiseQuantizer", "make_quantizer",
    "PyramidTokenizer", "DecodeState", "CandidateFeatures", "MultiScaleVQTokenizer", "ResidualDecodeState",
    "NextScaleTransformer", "TransformerConfig", "Condition",
    "PretrainedMixin", "Pipeline", "PretrainedError", "from_pretrained",
    "sample", "SampleOutput", "sample_tokens", "filter_top_k_top_p", "guidance_strength",
    "Acceleration", "quantize_int8",
    "known_masks", "scale_diagnostic", "ScaleDiagnostic",
]
