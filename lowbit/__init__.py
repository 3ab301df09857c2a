"""lowbit: train, compare, pack, verify and run neural networks with few-valued weights.

    quantizers -> nn (layers) -> models -> train / study -> pack -> packed -> kernels
"""

from lowbit import quantizers
from lowbit.nn import QATConfig, QuantConv2d, QuantLinear, quantize_

__version__ = "0.1.0"

__all__ = ["QATConfig", "QuantConv2d", "QuantLinear", "__version__", "quantize_", "quantizers"]
