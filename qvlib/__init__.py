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

import importlib

# Where each public name lives (``__all__`` is these names). They load on first use (PEP 562), so a
# `qv` command imports only what it needs: `qv tables` and `qv extract` load neither timm nor torchvision.
_HOMES = {
    "checkpoints": ["broadcast_lambdas", "describe", "extract_vector", "merged_vector", "patched", "quantized",
                    "random_control"],
    "config": ["Config"],
    "models": ["ArchSpec", "build_vit", "freeze_except", "task_model"],
    "quant": ["DEFAULT_POLICY", "SCALES", "QuantPolicy", "QuantSpec", "dequantize", "fake_quant", "fake_quant_state",
              "fake_quant_ste", "quantize", "register_scale"],
    "datafree": ["LAMBDA_CRITERIA", "choose_lambda", "score_lambdas"],
    "merging": ["MERGE_METHODS", "merge", "merge_method"],
    "packing": ["load_packed", "pack_checkpoint", "unpack_checkpoint"],
    "racing": ["RaceResult", "race_lambda"],
    "stats": ["bootstrap_mean", "verdict"],
    "vectors": ["WeightVector", "patch", "quantization_vector", "random_direction"],
    "vocab": ["Control", "DonorKind", "Mode", "Precision", "Rule", "Search", "Split", "SweepMethod", "Variant", "Verdict"],
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__version__ = "0.1.0"

__all__ = [name for names in _HOMES.values() for name in names]


def __getattr__(name: str):
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'qvlib' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
