#!/usr/bin/env bash
# GPU smoke test: lowbit trains and runs a study on CUDA.
#
#   1. a 2-epoch cvnn1 (5-level weights, SGD, augmentation, bf16 autocast) with --device cuda;
#   2. a 4-cell study (cvnn1: fp32 and N = 2, 3, 5) with --device cuda, then its report.
#
# It checks that each run recorded the CUDA device and finished, and prints the seconds per
# epoch. Needs a CUDA build of torch in .venv (the CPU build on the project machines cannot).
# Uses CIFAR-10 when installed (see `lowbit data`), else Fashion-MNIST.
#
#   benchmarks/gpu_smoke.sh [OUT_DIR]        (default: a fresh temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-$(mktemp -d -t lowbit-gpu-smoke.XXXXXX)}
mkdir -p "$OUT"

"$BIN/python" - <<'PY'
import torch
assert torch.cuda.is_available(), f"no CUDA device visible to torch {torch.__version__}"
print("cuda:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY

DATASET=$("$BIN/python" -c "from lowbit import data; print('cifar10' if data.discover().get('cifar10', {}).get('path') else 'fashion-mnist')")
echo "dataset: $DATASET; output: $OUT"

"$BIN/lowbit" train --model cvnn1 --layer nlevel --levels 5 --dataset "$DATASET" --epochs 2 \
    --optimizer sgd --batch-size 256 --augment --val-split 0.1 --device cuda --amp \
    --out "$OUT/train" --json

cat > "$OUT/spec.toml" <<TOML
[study]
name = "gpu-smoke"
[grid]
model = "cvnn1"
layer = ["linear", "nlevel"]
levels = [2, 3, 5]
dataset = "$DATASET"
optimizer = "sgd"
batch_size = 256
epochs = 2
val_split = 0.1
TOML
"$BIN/lowbit" study "$OUT/spec.toml" --out "$OUT/study" --device cuda --workers 1 --json
"$BIN/lowbit" report "$OUT/study"

"$BIN/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from lowbit.study.store import Store
out = Path(sys.argv[1])
cfg = json.loads((out / "train" / "config.json").read_text())
assert cfg["train"]["device"] == "cuda" and cfg["train"]["amp"], cfg["train"]
res = json.loads((out / "train" / "result.json").read_text())
assert res["status"] == "finished", res["status"]
print("train: epoch seconds", [round(m["wall_s"], 2) for m in res["history"]],
      "test acc", round(res["test_acc"], 4))
with Store(out / "study" / "results.sqlite", readonly=True) as s:
    runs = s.runs()
    walls = [e["wall_s"] for e in s.epochs()]
assert len(runs) == 4 and all(r["device"] == "cuda" for r in runs), [r["device"] for r in runs]
assert all(r["status"] == "finished" for r in runs), [r["status"] for r in runs]
print(f"study: 4 cells finished on cuda; median epoch {sorted(walls)[len(walls) // 2]:.2f} s")
print("gpu smoke: OK")
PY
