"""lowbit: train, compare, pack, verify and run neural networks with few-valued weights.

quantizers -> nn (layers) -> models -> train / study -> pack -> packed -> kernels
"""

from lowbit import data, kernels, models, quantizers, train
from lowbit.export import export_onnx
from lowbit.fileformat import load, save
from lowbit.meta import ModelMeta, preprocess
from lowbit.nn import (
    BitLinear8,
    MisbornLinear,
    QATConfig,
    QuantConv2d,
    QuantLinear,
    SignLinear,
    quantize_,
)
from lowbit.packed import PackedConv2d, PackedLinear, convert_
from lowbit.summary import summary

__version__ = "0.1.0"

__all__ = [
    "BitLinear8",
    "MisbornLinear",
    "ModelMeta",
    "QATConfig",
    "QuantConv2d",
    "QuantLinear",
    "PackedConv2d",
    "PackedLinear",
    "SignLinear",
    "__version__",
    "convert_",
    "data",
    "export_onnx",
    "kernels",
    "load",
    "models",
    "preprocess",
    "quantize_",
    "quantizers",
    "save",
    "train",
    "summary",
]
