"""qvlib: zero-shot quantization vectors for Vision Transformers.

rho_D = theta_QAT(D) - theta_FT(D); a receiver's FT model patched with lambda * rho_D survives
low-bit post-training quantization better, with no receiver data and no training.
"""

__version__ = "0.1.0"
