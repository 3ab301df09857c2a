"""Exact integer inference: chosen by train()/eval(), never by grad mode; shared by the trained
layers and the kernels through ``lowbit.integer``, which sits below both."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QATConfig, integer, quantize_
from lowbit.kernels import reference
from lowbit.packed import convert_

LEVELS = (2, 3, 4, 5, 8, 9, 16, 17)


def _absmax8_net(levels: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(levels)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).to(dtype)
    return quantize_(net, QATConfig(levels=levels, activations="absmax8"))


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("levels", LEVELS)
def test_eval_outputs_do_not_depend_on_grad_mode(levels: int) -> None:
    model = _absmax8_net(levels).eval()
    x = _x()
    with torch.no_grad():
        y_no_grad = model(x)
    y_grad = model(x)
    assert y_grad.requires_grad  # autograd is on, and yet:
    assert torch.equal(y_grad.detach(), y_no_grad)
    with torch.inference_mode():
        assert torch.equal(model(x), y_no_grad)
    # and they are the packed model's, bit for bit
    with torch.no_grad():
        assert torch.equal(convert_(model)(x), y_no_grad)


def test_train_mode_is_the_float_forward_in_every_grad_mode() -> None:
    model = _absmax8_net(3).train()
    x = _x()
    y = model(x)
    y.sum().backward()  # straight-through gradients reach the latent weights
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(model(x), y.detach())
    layer = model[3]
    assert layer.integer_inference is False
    model.eval()
    assert layer.integer_inference is True


@pytest.mark.parametrize("levels", (2, 3, 5))
def test_float64_absmax8_model_runs_in_every_mode(levels: int) -> None:
    model = _absmax8_net(levels, torch.float64)
    x = _x(torch.float64)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            y0 = model(x)
        y1 = model(x)
        assert y0.dtype == torch.float64 and y1.dtype == torch.float64
        assert torch.equal(y0, y1.detach())
        assert torch.isfinite(y0).all()
    # eval: the float64 model gives the float32 model's integer outputs up to the rounding of its
    # input (x itself is float64 here): both predict the same classes
    model32 = _absmax8_net(levels).eval()
    with torch.no_grad():
        y32 = model32(x.float())
        assert torch.equal(y32.argmax(1), y0.argmax(1))


def test_integer_module_is_the_reference_int8_mode() -> None:
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 5, (7, 40), generator=g, dtype=torch.uint8)
    scale, bias, x = (
        torch.rand(7, generator=g) + 0.1,
        torch.randn(7, generator=g),
        torch.randn(3, 40),
    )
    want = reference.linear(x, codes, scale, 5, bias, "int8")
    assert torch.equal(integer.linear(x, codes, scale, 5, bias), want)
    # hand-computed: one token, one output, levels 3 -> doubled levels -2, 0, 2
    y = integer.linear(
        torch.tensor([[1.0, -0.5]]), torch.tensor([[2, 0]], dtype=torch.uint8), torch.tensor(0.5), 3
    )
    # a = 127, x_int = [127, -64] (round half to even of -63.5), acc = 127*2 + -64*-2 = 382
    assert torch.equal(y, torch.tensor([[382 * 0.5 / (2 * 127.0)]], dtype=torch.float64).float())


def _lowbit_imports(module: str, root: Path) -> set[str]:
    """The lowbit modules ``module``'s source imports (any import statement, any depth)."""
    path = root / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = root / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowbit"):
            found.add(node.module)
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if (root / (sub.replace(".", "/") + ".py")).exists() or (
                    root / sub.replace(".", "/")
                ).is_dir():
                    found.add(sub)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lowbit"))
    return found


def test_nn_does_not_import_the_kernels() -> None:
    root = Path(lowbit.__file__).resolve().parents[1]
    seen, todo = set(), ["lowbit.nn"]
    while todo:
        mod = todo.pop()
        if mod in seen or mod == "lowbit":
            continue
        seen.add(mod)
        todo.extend(_lowbit_imports(mod, root))
    assert "lowbit.integer" in seen
    assert not any(m == "lowbit.kernels" or m.startswith("lowbit.kernels.") for m in seen), seen
    # and the kernels' reference takes its int8 arithmetic from the same module
    assert "lowbit.integer" in _lowbit_imports("lowbit.kernels.reference", root)
