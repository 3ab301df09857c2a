"""The training loop: cross-entropy, Adam or SGD, per-epoch metrics, resumable run directories.

``fit(model, data, TrainConfig(...))`` trains ``model`` on ``data.train_x``/``train_y`` and
evaluates on ``data.test_x``/``test_y`` after every epoch. Each epoch yields one metrics dict::

    {"epoch": k (1-based), "train_loss", "train_acc", "test_loss", "test_acc", "wall_s"}
    (+ "val_loss", "val_acc" with a validation split)

Validation: ``val_split=0.1`` holds out 10% of the training images (after ``train_subset``), a
fixed split drawn with seed 1 and the same for every training seed, and evaluates on them after
every epoch. Choose hyperparameters (e.g. the N-level spread) and find the plateau on the
validation curve, never on the test set.

Devices: ``device`` is any torch device (``cpu``, ``cuda``, ``cuda:1``, ``mps``). The dataset is
moved there once, before the first epoch, so batches, shuffling indices and augmentation (whose
affine grid is sampled on the tensor's device) never cross the host bus; checkpoints are written
from CPU copies, so a run resumes on another device. ``amp=True`` runs the forward pass under
``torch.autocast`` with bfloat16 (on CPU too): matmuls and convolutions of the fp32 layers, and the
fake-quantized ones, compute in bf16; the latent weights, the optimizer and the loss stay fp32.

``train_loss``/``train_acc`` are averages over the epoch's mini-batches as they were trained (the
model changing underneath), ``test_*`` are measured after the epoch; accuracies are fractions.
Losses are recorded as they are, however large: extreme losses are a finding, not an error. A
non-finite batch loss (NaN or inf) ends the run with status ``diverged`` (its partial epoch is
recorded; JSON writes non-finite numbers as null).

Early stopping: ``patience=P`` (with a validation split) ends the run once the validation
accuracy has not risen above its best for P epochs: the plateau, found on the validation set and
recorded: ``FitResult.stopped_early`` (and ``result.json``'s) is true and the history ends there.
``epochs`` is then the budget's upper bound. A resumed run that had stopped stays stopped.

Learning-rate schedule: ``lr_schedule="constant"`` keeps ``lr`` for the whole run;
``"cosine"`` anneals it per optimizer step, ``lr_t = lr * (1 + cos(pi * t / T)) / 2`` for step
``t = 0 .. T-1`` of ``T = epochs * ceil(train_size / batch_size)`` steps (from ``lr`` to ~0 at the
end, the decayed schedule binary networks are trained with: Bi-Real Net's cosine, ReActNet's
linear decay). The rate is a function of the step alone, so a resumed run sets the same rates; but
``T`` depends on ``epochs``, so a cosine run resumes only with the same ``epochs``.

Run directory (every file written atomically: temp file + ``os.replace``)::

    config.json                the TrainConfig, the model spec, the data, versions
    metrics.jsonl              one JSON line per epoch
    checkpoint.safetensors     after each epoch: latent weights ("model.*"), optimizer state
                               ("optim.<param>.<key>"), RNG states ("rng.*"); metadata holds the
                               config, epoch and history as JSON (no pickle anywhere)
    result.json                status ("finished" | "diverged" | "interrupted") and final metrics

Given a ``run_dir`` that holds a checkpoint of epoch k made with the same config (``epochs`` may be
larger), the same model (its whole spec: kind, layer, levels, every option) and the same data
(its content digest), ``fit`` resumes at epoch k + 1 and reproduces the uninterrupted run bit for
bit: the model, the optimizer moments and steps, the global torch RNG (dropout) and the shuffling
generator are all restored. Ctrl-C (KeyboardInterrupt) stops the run, leaves the directory at its
last checkpoint and returns status ``interrupted``.

Before training, ``fit`` checks that the model takes the data: one forward pass of two training
images must give ``(2, data.classes)`` logits (a ConfigError otherwise, instead of a torch error
mid-epoch). Progress (``progress``, on by default): one line per epoch on stderr, the notes
"resuming at epoch k" / "already finished, nothing trained", and a bar within each epoch when
stderr is a terminal; ``progress=False`` is silent.

Determinism: on CPU, a fixed seed and thread count give identical metrics run after run. The
model's initialisation is the caller's (seed torch before building the model, as the CLI does);
``fit`` seeds the global torch RNG and its own shuffling generator with ``config.seed``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import pack
from lowbit.data import Augment, Dataset, batches
from lowbit.errors import ConfigError, FormatError
from lowbit.files import atomic_write

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
STATUSES = ("finished", "diverged", "interrupted")
CHECKPOINT = "checkpoint.safetensors"
_DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-3}  # PyTorch's Adam default; the Low-Resolution study's SGD
_DEFAULT_MOMENTUM = 0.92  # the Low-Resolution study


@dataclass(frozen=True)
class TrainConfig:
    """How to train; validated on construction (ValueError naming the field and valid values).

    Args:
        optimizer: ``"adam"`` (PyTorch defaults: lr 1e-3, betas (0.9, 0.999), as the sign-vs-linear
            study) or ``"sgd"`` (momentum 0.92, lr 1e-3, as the Low-Resolution study).
        lr: learning rate; None = the optimizer's default above.
        lr_schedule: ``"constant"`` or ``"cosine"`` (per-step annealing to ~0, module docstring).
        momentum: SGD momentum; None = 0.92. Not valid with Adam.
        weight_decay: L2 penalty passed to the optimizer.
        batch_size: training mini-batch size.
        epochs: number of passes over the training set.
        seed: seeds the shuffling/augmentation generator and the global torch RNG.
        augment: apply :class:`lowbit.data.Augment` (shift, zoom, flip, rotation) to each batch.
        train_subset: train on this many training images (a fixed random subset, the same for
            every seed); None = all.
        threads: torch intra-op threads during ``fit``; None = leave torch's setting.
        eval_batch_size: batch size for evaluation (does not change results).
        device: ``"cpu"`` (deterministic) or another torch device (``cuda``, ``cuda:N``,
            ``mps``); checked against the machine when ``fit`` starts.
        val_split: share of the training images held out as a validation set, in [0, 1).
        amp: bfloat16 autocast for the forward pass (see the module docstring).
        patience: early stopping (module docstring): stop after this many epochs without a new
            best validation accuracy; 0 = never. Needs ``val_split`` > 0.
    """

    optimizer: str = "adam"
    lr: float | None = None
    lr_schedule: str = "constant"
    momentum: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 5
    seed: int = 0
    augment: bool = False
    train_subset: int | None = None
    threads: int | None = None
    eval_batch_size: int = 1000
    device: str = "cpu"
    val_split: float = 0.0
    amp: bool = False
    patience: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, valid: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} must be {valid}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"one of {', '.join(OPTIMIZERS)}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise bad("lr", "a positive number or None")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"one of {', '.join(LR_SCHEDULES)}")
        if self.momentum is not None:
            if self.optimizer != "sgd":
                raise ValueError("TrainConfig.momentum is only valid with optimizer='sgd'")
            if not 0 <= self.momentum < 1:
                raise bad("momentum", "in [0, 1) or None")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise bad("weight_decay", "a number >= 0")
        for name in ("batch_size", "epochs", "eval_batch_size"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        if not is_int(self.seed) or self.seed < 0:
            raise bad("seed", "an integer >= 0")
        for name in ("augment", "amp"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if not (isinstance(self.val_split, (int, float)) and 0 <= self.val_split < 1):
            raise bad("val_split", "a share in [0, 1)")
        if not is_int(self.patience) or self.patience < 0:
            raise bad("patience", "an integer >= 0 (0: no early stopping)")
        if self.patience and not self.val_split:
            raise ValueError(
                "TrainConfig.patience needs a validation split (val_split > 0): early stopping "
                "watches the validation accuracy, never the test set"
            )
        if not isinstance(self.device, str):
            raise bad("device", "a device name such as 'cpu', 'cuda', 'cuda:1' or 'mps'")
        for name in ("train_subset", "threads"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                raise bad(name, "an integer >= 1 or None")

    @property
    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else _DEFAULT_LR[self.optimizer]

    @property
    def resolved_momentum(self) -> float | None:
        if self.optimizer != "sgd":
            return None
        return self.momentum if self.momentum is not None else _DEFAULT_MOMENTUM

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown TrainConfig fields: {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass
class FitResult:
    """What ``fit`` returns: the per-epoch ``history``, the ``status`` and the ``run_dir``.

    ``final`` is the last epoch's metrics dict ({} when no epoch completed); ``test_acc`` etc.
    read from it (NaN when absent)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "finished"
    run_dir: str | None = None
    stopped_early: bool = False

    @property
    def final(self) -> dict[str, Any]:
        return dict(self.history[-1]) if self.history else {}

    @property
    def epochs(self) -> int:
        return len(self.history)

    def _get(self, key: str) -> float:
        return float(self.final.get(key, math.nan))

    @property
    def test_acc(self) -> float:
        return self._get("test_acc")

    @property
    def test_loss(self) -> float:
        return self._get("test_loss")

    @property
    def train_acc(self) -> float:
        return self._get("train_acc")

    @property
    def train_loss(self) -> float:
        return self._get("train_loss")

    def to_dict(self) -> dict[str, Any]:
        """The summary the CLI prints: final metrics, epochs, status, run_dir (JSON-safe)."""
        keys = ("test_acc", "test_loss", "train_acc", "train_loss")
        out: dict[str, Any] = {k: _json_number(getattr(self, k)) for k in keys}
        out.update(epochs=self.epochs, status=self.status, run_dir=self.run_dir)
        out.update(stopped_early=self.stopped_early)
        return out


# --- files ---------------------------------------------------------------------------------------


def _json_number(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _json_number(v) for k, v in d.items()}


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(_jsonable(m), sort_keys=True) + "\n" for m in history)
    atomic_write(run_dir / "metrics.jsonl", lines.encode())


def _history_from_json(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (math.nan if v is None else v) for k, v in m.items()} for m in items]


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: TrainConfig,
    history: list[dict[str, Any]],
) -> None:
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().to("cpu").clone().contiguous()
        for k, v in model.state_dict().items()
    }
    extra: dict[str, dict[str, Any]] = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = v.detach().to("cpu").clone().contiguous()
            else:  # plain numbers (e.g. a float step on older torch)
                extra.setdefault(str(idx), {})[key] = v
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.shuffle"] = generator.get_state()
    metadata = {
        "format": "lowbit-checkpoint",
        "version": "1",
        "epoch": str(len(history)),
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "history": json.dumps([_jsonable(m) for m in history]),
        "optim_extra": json.dumps(extra),
        "model_spec": json.dumps(getattr(model, "lowbit_spec", None), default=str),
    }
    pack.write_tensors(path, tensors, metadata)


def _load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> list[dict[str, Any]]:
    """Restore everything ``_save_checkpoint`` wrote; returns the history."""
    try:
        meta, tensors = pack.read_tensors(path)
    except FormatError as exc:
        raise FormatError(f"{exc}; delete it to restart") from exc
    if meta.get("format") != "lowbit-checkpoint":
        raise FormatError(f"{path}: not a lowbit checkpoint; delete it or use another run dir")
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: checkpoint does not fit this model ({msg})") from exc
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    for idx, items in json.loads(meta["optim_extra"]).items():
        opt_state.setdefault(int(idx), {}).update(items)
    # param_groups come from the freshly built optimizer: same config, same hyperparameters.
    optimizer.load_state_dict(
        {"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]}
    )
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.shuffle"])
    return _history_from_json(json.loads(meta["history"]))


# --- the loop ------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, checked against this machine; ConfigError naming the fix."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"device {name!r} is not a torch device; use cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name!r}: no CUDA device here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device {name!r}: this machine has {count} CUDA device(s), "
                f"cuda:0..cuda:{count - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r}: training runs on cpu, cuda, cuda:N or mps")
    return device


def split_validation(
    x: torch.Tensor, y: torch.Tensor, share: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, val_x, val_y): ``round(share * n)`` images held out, drawn with a fixed
    generator (seed 1) so every training seed sees the same split; both parts keep their order."""
    n_val = round(share * len(y))
    if share > 0 and not 0 < n_val < len(y):
        raise ConfigError(
            f"val_split={share} of {len(y)} training images leaves an empty split; "
            "use a share between 1/n and 1 - 1/n"
        )
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    val, train = pick[:n_val].sort().values, pick[n_val:].sort().values
    return x[train], y[train], x[val], y[val]


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.resolved_lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params,
        lr=config.resolved_lr,
        momentum=config.resolved_momentum,
        weight_decay=config.weight_decay,
    )


def _autocast(device: torch.device, amp: bool) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def plateaued(history: list[dict[str, Any]], patience: int) -> bool:
    """Whether the last ``patience`` epochs of ``history`` brought no new best ``val_acc``."""
    val = [m.get("val_acc") for m in history]
    val = [v if isinstance(v, float) and math.isfinite(v) else -math.inf for v in val]
    if not patience or not val:
        return False
    best = max(range(len(val)), key=lambda i: (val[i], -i))  # the first epoch at the best value
    return len(val) - 1 - best >= patience


def scheduled_lr(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps`` (docstring)."""
    if config.lr_schedule == "cosine":
        return config.resolved_lr * (1 + math.cos(math.pi * step / total_steps)) / 2
    return config.resolved_lr


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    *,
    amp: bool = False,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode, no gradients."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for xb, yb in batches(x, y, batch_size):
            xb, yb = xb.to(device), yb.to(device)
            with _autocast(device, amp):
                logits = model(xb).float()  # (B, classes)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == yb).sum())
    model.train(was_training)
    n = max(len(y), 1)
    return loss_sum / n, correct / n


def _show_bar(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return sys.stderr.isatty() and not os.environ.get("CI")


def _say(progress: bool | None, text: str) -> None:
    if progress is not False:
        print(text, file=sys.stderr, flush=True)


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    """One epoch's metrics as the progress line ``fit`` prints."""
    return (
        f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4g} acc {m['train_acc']:.4f}  "
        f"test loss {m['test_loss']:.4g} acc {m['test_acc']:.4f}  ({m['wall_s']:.1f} s)"
    )


def model_spec(model: nn.Module) -> dict[str, Any]:
    """What identifies the model of a run: the registry spec when it has one (name and every
    argument), else a digest of its structure (module tree with the quantizers' settings)."""
    spec = getattr(model, "lowbit_spec", None)
    if spec is not None:
        return json.loads(json.dumps(spec, default=str))
    return {"structure_sha256": hashlib.sha256(repr(model).encode()).hexdigest()}


def _check_fits(model: nn.Module, data: Dataset, device: torch.device, amp: bool) -> None:
    """ConfigError unless ``model`` maps two training images to ``(2, data.classes)`` logits
    (computed as training computes them: same device, same autocast)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(device, amp):
            out = model(data.train_x[:2].to(device))
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ConfigError(
            f"the model does not take {data.name}'s images of shape {tuple(data.input_shape)} "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); build it with "
            f"input_shape={tuple(data.input_shape)}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != data.classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"the model gives logits of shape {got} but {data.name} has {data.classes} classes; "
            f"build it with classes={data.classes}"
        )


def _check_resume(
    run_dir: Path, config: TrainConfig, data: dict[str, Any], spec: dict[str, Any]
) -> None:
    """Refuse to resume a run dir made with another config, another model or other data."""
    path = run_dir / "config.json"
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
        stored = TrainConfig.from_dict(saved["train"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable run config ({exc}); use a new run dir") from exc
    for key in ("name", "train_size", "test_size", "input_shape", "classes", "digest"):
        if saved.get("data", {}).get(key) not in (None, data[key]) and data[key] is not None:
            raise ConfigError(
                f"{run_dir} holds a run on other data ({key}={saved['data'][key]!r}, not "
                f"{data[key]!r}); use a new run dir"
            )
    saved_spec = saved.get("model")
    if saved_spec is not None and saved_spec != spec:
        a, b = _first_difference(saved_spec, spec)
        raise ConfigError(
            f"{run_dir} holds a run of another model ({a}, not {b}); use a new run dir or the "
            "same model options"
        )
    a, b = stored.to_dict(), config.to_dict()
    diff = [k for k in a if k != "epochs" and a[k] != b[k]]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{run_dir} holds a run with {k}={a[k]!r}, not {b[k]!r}; use a new run dir or the "
            "same config (only epochs may grow)"
        )
    if config.lr_schedule != "constant" and a["epochs"] != b["epochs"]:
        raise ConfigError(
            f"{run_dir} holds a {config.lr_schedule} run of epochs={a['epochs']}, not "
            f"{b['epochs']}: the schedule's length is its epochs; use a new run dir or the same "
            "epochs"
        )


def _first_difference(a: Any, b: Any, where: str = "") -> tuple[str, str]:
    """``("key=old", "key=new")`` for the first place two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
    return f"{where or 'model'}={a!r}", f"{b!r}"


def fit(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    *,
    run_dir: str | os.PathLike | None = None,
    on_epoch: Callable[[dict[str, Any], nn.Module], None] | None = None,
    progress: bool | None = None,
) -> FitResult:
    """Train ``model`` on ``data`` as ``config`` says; see the module docstring.

    ``on_epoch(metrics, model)`` is called after each epoch's evaluation and before that epoch's
    checkpoint is written. ``progress``: None (default) prints a line per epoch and the resume
    notes on stderr, plus a bar within each epoch when stderr is a terminal and ``$CI`` is
    unset; True always shows the bar too; False prints nothing."""
    device = resolve_device(config.device)
    model.to(device)
    rd = None
    if run_dir is not None:
        if not str(run_dir).strip():
            raise ConfigError("run_dir must name a folder, got an empty string")
        rd = Path(run_dir)
        if rd.exists() and not rd.is_dir():
            raise ConfigError(f"{rd}: exists and is not a folder; run_dir must be a folder")
    _check_fits(model, data, device, config.amp)
    optimizer = _make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    augment = Augment() if config.augment else None

    train_x, train_y = data.train_x, data.train_y
    if config.train_subset is not None and config.train_subset < len(train_y):
        # A fixed subset (seed 0) so that different seeds train on the same images.
        pick = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))
        pick = pick[: config.train_subset].sort().values
        train_x, train_y = train_x[pick], train_y[pick]
    val_x = val_y = None
    if config.val_split:
        train_x, train_y, val_x, val_y = split_validation(train_x, train_y, config.val_split)
    # the data moves to the device once; batches, indices and augmentation then stay there
    train_x, train_y = train_x.to(device), train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    if val_x is not None:
        val_x, val_y = val_x.to(device), val_y.to(device)

    history: list[dict[str, Any]] = []
    if rd is not None:
        rd.mkdir(parents=True, exist_ok=True)
        data_info = {
            "name": data.name,
            "train_size": len(train_y),
            "val_size": 0 if val_y is None else len(val_y),
            "test_size": len(data.test_y),
            "input_shape": list(data.input_shape),
            "classes": data.classes,
            "source": data.source,
            "digest": data.digest or None,
        }
        if data.mean:  # the normalisation the model expects (lowbit pack saves it in the file)
            data_info.update(mean=list(data.mean), std=list(data.std))
        spec = model_spec(model)
        _check_resume(rd, config, data_info, spec)
        ckpt = rd / CHECKPOINT
        if ckpt.exists():
            history = _load_checkpoint(ckpt, model, optimizer, generator)
            if len(history) > config.epochs:
                raise ConfigError(
                    f"{rd} already holds {len(history)} epochs, more than epochs={config.epochs}"
                )
            # Restore the optimizer's tensors onto the training device.
            model.to(device)
        result_path = rd / "result.json"
        if result_path.exists():
            stored = json.loads(result_path.read_text())
            if stored.get("status") == "diverged":
                _say(progress, f"{rd}: the run diverged earlier; nothing trained")
                return FitResult(_history_from_json(stored["history"]), "diverged", str(rd))
        if history and (len(history) == config.epochs or plateaued(history, config.patience)):
            _say(progress, f"{rd}: already finished ({len(history)} epochs), nothing trained")
        elif history:
            _say(progress, f"{rd}: resuming at epoch {len(history) + 1}/{config.epochs}")
        _write_json(
            rd / "config.json",
            {
                "train": config.to_dict(),
                "model": spec,
                "data": data_info,
                "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
            },
        )
        _write_metrics(rd, history)

    saved = len(history)  # epochs covered by the checkpoint on disk
    status = "finished"
    old_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        for epoch in range(len(history) + 1, config.epochs + 1):
            if plateaued(history, config.patience):
                break
            metrics, diverged = _train_epoch(
                model, optimizer, train_x, train_y, config, epoch, generator, augment, progress
            )
            if val_x is not None:
                metrics["val_loss"], metrics["val_acc"] = evaluate(
                    model, val_x, val_y, config.eval_batch_size, device, amp=config.amp
                )
            metrics["test_loss"], metrics["test_acc"] = evaluate(
                model, test_x, test_y, config.eval_batch_size, device, amp=config.amp
            )
            metrics["wall_s"] = round(time.perf_counter() - metrics.pop("_t0"), 3)
            _say(progress, epoch_line(metrics, config.epochs))
            if on_epoch is not None:
                on_epoch(dict(metrics), model)
            history.append(metrics)
            if diverged:
                status = "diverged"
                break
            if rd is not None:
                _save_checkpoint(rd / CHECKPOINT, model, optimizer, generator, config, history)
                saved = len(history)
                _write_metrics(rd, history)
            else:
                saved = len(history)
    except KeyboardInterrupt:
        status = "interrupted"
        del history[saved:]
    finally:
        torch.set_num_threads(old_threads)
    stopped = len(history) < config.epochs and status == "finished"
    stopped = stopped and plateaued(history, config.patience)
    result = FitResult(history, status, str(rd) if rd is not None else None, stopped)
    if rd is not None:
        _write_metrics(rd, history)
        _write_json(
            rd / "result.json",
            {"status": status, "history": [_jsonable(m) for m in history]} | result.to_dict(),
        )
    return result


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    epoch: int,
    generator: torch.Generator,
    augment: Augment | None,
    progress: bool | None,
) -> tuple[dict[str, Any], bool]:
    """One pass over ``(x, y)`` in a shuffled order; returns (metrics, diverged).

    Images (B, C, H, W) train channels-last on the CPU: torch's CPU max-pooling, BatchNorm and
    convolutions run faster on that layout (the binary CNN's step at batch 256 takes 0.74-0.77x
    the standard layout's on one Zen 2 core: ``benchmarks/bnn_train_step.py``,
    ``docs/results/bnn-train-step.md``). The model's 4-D tensors go back to the standard
    layout when the epoch ends, so evaluation, checkpoints and packing see what they always
    did."""
    t0 = time.perf_counter()
    model.train()
    channels_last = x.dim() == 4 and x.device.type == "cpu"
    order = torch.randperm(len(y), generator=generator).to(x.device)
    n_batches = math.ceil(len(y) / config.batch_size)
    it = batches(x, y, config.batch_size, order)
    bar = None
    if _show_bar(progress):
        from tqdm import tqdm

        bar = tqdm(it, total=n_batches, desc=f"epoch {epoch}/{config.epochs}", leave=False)
        it = bar
    loss_sum, correct, seen, diverged = 0.0, 0, 0, False
    step = (epoch - 1) * n_batches  # global optimizer step of the epoch's first batch
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        for xb, yb in it:
            if config.lr_schedule != "constant":
                lr = scheduled_lr(config, step, config.epochs * n_batches)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            step += 1
            if augment is not None:
                xb = augment(xb, generator)  # on the data's device
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(x.device, config.amp):
                logits = model(xb).float()  # (B, classes)
            loss = F.cross_entropy(logits, yb)
            value = loss.item()
            loss_sum += value * len(yb)
            correct += int((logits.detach().argmax(dim=1) == yb).sum())
            seen += len(yb)
            if not math.isfinite(value):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if bar is not None:
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    metrics = {
        "epoch": epoch,
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "_t0": t0,
    }
    return metrics, diverged
