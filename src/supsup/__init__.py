"""supsup: Supermasks in Superposition (Wortsman et al., NeurIPS 2020) as a library."""

from supsup.architectures import build_model
from supsup.bank import MaskBank
from supsup.convert import ConversionReport, convert_to_supermask
from supsup.inference import Inference, alpha_gradient, infer_tasks
from supsup.layers import (MultitaskBatchNorm, Superposition, SupermaskConv1d, SupermaskConv2d, SupermaskConv3d,
                           SupermaskEmbedding, SupermaskLinear)
from supsup.model import SupermaskModel

__all__ = [
    "ConversionReport", "Inference", "MaskBank", "MultitaskBatchNorm", "Superposition", "SupermaskConv1d",
    "SupermaskConv2d", "SupermaskConv3d", "SupermaskEmbedding", "SupermaskLinear", "SupermaskModel",
    "alpha_gradient", "build_model", "convert_to_supermask", "infer_tasks",
]
__version__ = "0.1.0"
