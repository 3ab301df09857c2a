"""lowbit: train, compare, pack, verify and run neural networks with few-valued weights.

    quantizers -> nn (layers) -> models -> train / study -> pack -> packed -> kernels
"""

from lowbit import models, quantizers
from lowbit.nn import (
    BitLinear8,
    MisbornLinear,
    QATConfig,
    QuantConv2d,
    QuantLinear,
    SignLinear,
    quantize_,
)

__version__ = "0.1.0"

__all__ = [
    "BitLinear8",
    "MisbornLinear",
    "QATConfig",
    "QuantConv2d",
    "QuantLinear",
    "SignLinear",
    "__version__",
    "models",
    "quantize_",
    "quantizers",
]
