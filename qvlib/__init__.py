"""qvlib: zero-shot quantization vectors for Vision Transformers.

rho_D = theta_QAT(D) - theta_FT(D); a receiver's FT model patched with lambda * rho_D survives
low-bit post-training quantization better, with no receiver data and no training.

The public API, for Python users (the ``qv`` command wraps the same functions)::

    import qvlib
    ft, qat = qvlib.WeightVector.load("ft.safetensors"), qvlib.WeightVector.load("qat.safetensors")
    rho = qvlib.extract_vector(qat, ft)                       # the block linear weights (DEFAULT_POLICY)
    patched = qvlib.patched(qvlib.WeightVector.load("receiver.safetensors"), [(1.0, rho)])
    w3 = qvlib.quantized(patched, qvlib.QuantSpec(bits=3))    # the paper's Eq. 1-3, per output channel
"""

from .checkpoints import broadcast_lambdas, describe, extract_vector, merged_vector, patched, quantized, random_control
from .config import Config
from .models import ArchSpec, build_vit, freeze_except, task_model
from .quant import (
    DEFAULT_POLICY,
    SCALES,
    QuantPolicy,
    QuantSpec,
    dequantize,
    fake_quant,
    fake_quant_state,
    fake_quant_ste,
    quantize,
    register_scale,
)
from .datafree import LAMBDA_CRITERIA, choose_lambda, score_lambdas
from .merge import MERGE_METHODS, merge, merge_method
from .packing import load_packed, pack_checkpoint, unpack_checkpoint
from .racing import RaceResult, race_lambda
from .stats import bootstrap_mean, verdict
from .vectors import WeightVector, patch, quantization_vector, random_direction
from .vocab import Control, DonorKind, Mode, Precision, Rule, Search, Split, SweepMethod, Variant, Verdict

__version__ = "0.1.0"

__all__ = [
    # quantizer
    "QuantSpec", "QuantPolicy", "DEFAULT_POLICY", "SCALES", "register_scale", "quantize", "dequantize", "fake_quant", "fake_quant_ste",
    "fake_quant_state",
    # vectors and patching
    "WeightVector", "quantization_vector", "random_direction", "patch",
    "describe", "extract_vector", "patched", "broadcast_lambdas", "quantized", "random_control",
    "merge", "merge_method", "MERGE_METHODS", "merged_vector", "score_lambdas", "choose_lambda", "LAMBDA_CRITERIA",
    "race_lambda", "RaceResult",
    # packed export
    "pack_checkpoint", "unpack_checkpoint", "load_packed",
    # models and runs
    "ArchSpec", "build_vit", "task_model", "freeze_except", "Config",
    # statistics and names
    "bootstrap_mean", "verdict", "Mode", "Variant", "Control", "Split", "Search", "Rule", "Verdict",
    "DonorKind", "Precision", "SweepMethod",
]
