"""Peers in the same run: lowbit's packed ternary linear against onnxruntime and ggml.

Claim checked (issue 12): lowbit's int8 mode is >= 1.2x faster than the fastest peer at batch 1
and batch 8, on 1 and 2 threads, for ternary 4096x4096 and 11008x4096 (N_out x K) weights;
lowbit's weight-only mode (fp32 activations, the lookup-table kernel) is shown beside them.

Contenders, all holding the same ternary weight W = s * (c - 1), c in {0, 1, 2}:

* ``lowbit-int8`` / ``lowbit-fp32``: ``lowbit.kernels.linear`` with int8 activations (per-token
  absmax, exact integer dot products) / with fp32 activations (lookup tables, no quantization);
* ``torch-fp32``: ``F.linear`` with the dequantized fp32 weight (the baseline of the ratios);
* ``ort-q<bits>-b<block>-a<level>``: onnxruntime's ``com.microsoft.MatMulNBits`` with 2- or 4-bit
  weights (q = c - 1 + 2^(bits-1), the default zero point), block 32 or 128 along K (one scale a
  block, all = s), accuracy level 0 (fp32 activations) or 4 (activations quantized to int8 per
  block, onnxruntime's fastest CPU path); one InferenceSession each, ``intra_op_num_threads`` =
  the threads of the row, workers that do not spin between calls (below), default session
  options otherwise;
* ``ggml-tq1_0`` / ``ggml-tq2_0`` (optional): ``ggml_mul_mat`` on ggml's CPU backend with the
  weight in ggml's ternary formats (TQ1_0: 1.69 bits a weight, TQ2_0: 2.06; one fp16 scale per
  256 weights; activations quantized to 8 bits (Q8_K) inside the call), through our harness
  ``benchmarks/ggml_peer.c`` on a ggml threadpool of the row's threads. It needs ggml built from
  a local checkout (nothing is downloaded): ``sh benchmarks/ggml_peer_build.sh GGML_DIR``, then
  ``--ggml-peer build/ggml_peer/libggml_peer.so`` (the default path); without it the run says
  so and goes on.

No runtime's workers spin while idle: onnxruntime's ``session.intra_op.allow_spinning`` is 0
and the ggml threadpool's ``poll`` is 0 (torch's OpenMP team, which lowbit's kernels share, waits
passively after a short spin by default). As shipped, both peers keep their workers spinning
after a call so that the next call finds them awake; with a dozen such pools in one process on
two cores, the spinning threads took a core from whichever contender came next (measured on the
2-core AMD EPYC, 4096x4096 batch 1, 2 threads: torch fp32 8.2 ms interleaved against 3.8 ms
alone, ggml TQ2_0 8.0 ms against 0.17 ms; without spinning, 3.6 and 0.18 ms).

Timing: per (shape, batch, threads) every contender runs once per round in a fresh random order,
so none inherits a fixed predecessor's cache traffic; median over rounds. Two regimes: `evicted`
(the fp32 weights, 64-180 MB, evict the L3 between the packed calls: weights, and the code and
Python state of the call, come from memory) and `resident` (each timed call right after an
untimed call of the same contender: weights and code in the caches). Every
contender's output is checked against the float64 product before timing (max |error| listed).
Clock: on one thread, the calling thread's CPU time (every contender computes on the calling
thread there, so time the OS gave to other jobs is not counted); on more threads, wall-clock
time (the work of other threads is the point), with the load average beside each row set.

    .venv/bin/pip install 'lowbit[onnx]'   # onnx, onnxruntime
    python benchmarks/peers.py [--quick] [--rounds 25] [--threads 1,2] [--ggml-peer LIB]

writes ``docs/results/peers.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowbit.files import atomic_write

sys.path.insert(0, str(Path(__file__).parent))
import environment  # noqa: E402

from lowbit import kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((4096, 4096), (11008, 4096))  # (N_out, K)
ORT_CONFIGS = tuple((b, bs, a) for b in (2, 4) for bs in (32, 128) for a in (0, 4))
GGML_TYPES = {"tq1_0": 34, "tq2_0": 35}  # enum ggml_type values (ggml.h)
PEERS = ("ort-", "ggml-")
GGML_DEFAULT = ROOT / "build" / "ggml_peer" / "libggml_peer.so"


class _GgmlPeer:
    """One ggml_mul_mat contender of benchmarks/ggml_peer.c: weight quantized once, its own
    threadpool; called with x (m, k) float32 C-contiguous, returns y (m, n)."""

    def __init__(self, lib: ctypes.CDLL, kind: int, w: np.ndarray, m: int, threads: int):
        n, k = w.shape
        self._lib, self._y = lib, np.empty((m, n), dtype=np.float32)
        self._h = lib.gp_new(kind, n, k, m, w.ctypes.data, threads)
        if not self._h:
            raise RuntimeError(f"ggml_peer: gp_new failed for {n}x{k}, batch {m}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._lib.gp_run(self._h, x.ctypes.data, self._y.ctypes.data) != 0:
            raise RuntimeError("ggml_peer: graph compute failed")
        return self._y

    def close(self) -> None:
        if self._h:
            self._lib.gp_free(self._h)
            self._h = None


def _load_ggml(path: Path) -> ctypes.CDLL | None:
    """The harness library, or None when it is not built (the run then says so)."""
    if not path.is_file():
        return None
    lib = ctypes.CDLL(str(path))
    lib.gp_new.restype = ctypes.c_void_p
    lib.gp_new.argtypes = [ctypes.c_int, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_int]
    lib.gp_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.gp_free.argtypes = [ctypes.c_void_p]
    return lib


def _ort_model(codes: np.ndarray, scale: float, bits: int, block: int, accuracy: int):
    """A one-node ONNX model y = x W^T with W = scale * (codes - 1) as MatMulNBits weights.

    B (N, blocks, block * bits / 8) uint8: element i of a block at bits (i % (8/bits)) * bits of
    byte i // (8/bits), low bits first; scales (N * blocks,) float32; default zero point."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n, k = codes.shape
    blocks = -(-k // block)
    q = np.zeros((n, blocks * block), dtype=np.uint8)
    q[:, :k] = codes.astype(np.uint8) - 1 + (1 << (bits - 1))
    per = 8 // bits
    q = q.reshape(n, blocks, block // per, per)
    packed = np.zeros(q.shape[:3], dtype=np.uint8)
    for j in range(per):
        packed |= q[..., j] << (j * bits)
    scales = np.full(n * blocks, scale, dtype=np.float32)
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "scales"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy,
    )
    graph = helper.make_graph(
        [node],
        "peer",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[
            numpy_helper.from_array(packed, "B"),
            numpy_helper.from_array(scales, "scales"),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _contenders(n: int, k: int, batch: int, threads: int, quick: bool, ggml) -> tuple:
    """Contenders by name (each a call of no arguments), their max |error| against the float64
    product, and the ggml handles to close after timing."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 3, (n, k), generator=g, dtype=torch.uint8)
    scale = 0.02
    x = torch.randn(batch, k, generator=g)
    w32 = (codes.to(torch.float32) - 1) * scale
    exact = x.double() @ w32.double().T
    prepared = kernels.prepare(codes, torch.tensor(scale), 3)
    _ = prepared.lut  # the lookup-table layout is built on first use: not timed
    out = {
        "torch-fp32": lambda: F.linear(x, w32),
        "lowbit-int8": lambda: kernels.linear(x, prepared, None, "int8", threads=threads),
        "lowbit-fp32": lambda: kernels.linear(x, prepared, None, "fp32", threads=threads),
    }
    xn = x.numpy()
    for bits, block, acc in ORT_CONFIGS if not quick else ((2, 32, 4), (4, 32, 4)):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = _ort_model(codes.numpy(), scale, bits, block, acc)
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        out[f"ort-q{bits}-b{block}-a{acc}"] = lambda s=sess: s.run(None, {"A": xn})[0]
    handles = []
    if ggml is not None:
        w32n = w32.numpy()
        for kind, value in GGML_TYPES.items():
            handles.append(_GgmlPeer(ggml, value, w32n, batch, threads))
            out[f"ggml-{kind}"] = lambda h=handles[-1]: h(xn)
    errors = {}
    for name, fn in out.items():
        y = fn()
        y = torch.from_numpy(y) if isinstance(y, np.ndarray) else y
        errors[name] = float((y.double() - exact).abs().max())
    return out, errors, handles


def _time(fns: dict, rounds: int, timer, resident: bool) -> dict[str, float]:
    """Median seconds a call, every contender once a round in a fresh random order; with
    `resident`, each timed call follows an untimed call of the same contender (its weights
    and code in the caches)."""
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(names)
        for name in names:
            if resident:
                fns[name]()
            t = timer()
            fns[name]()
            samples[name].append(timer() - t)
    return {name: statistics.median(s) for name, s in samples.items()}


def _threads(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(t) for t in text.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"--threads wants counts like 1,2, got {text!r}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4096x4096 only, two ORT variants")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--threads", type=_threads, default=(1, 2), help="thread counts (1,2)")
    p.add_argument(
        "--clock",
        choices=("auto", "wall"),
        default="auto",
        help="auto: the calling thread's CPU time on one thread, wall-clock time on more; "
        "wall: wall-clock time everywhere",
    )
    p.add_argument(
        "--regime",
        choices=("evicted", "resident", "both"),
        default="both",
        help="evicted: each call after other contenders' traffic (weights from memory); "
        "resident: each timed call right after an untimed one of the same contender",
    )
    p.add_argument(
        "--ggml-peer",
        default=str(GGML_DEFAULT),
        help="benchmarks/ggml_peer.c built by benchmarks/ggml_peer_build.sh (skipped if absent)",
    )
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "peers.md"))
    args = p.parse_args()
    try:
        import onnxruntime
    except ImportError:
        print("peers.py needs onnxruntime: pip install 'lowbit[onnx]'", file=sys.stderr)
        return 2
    ggml = _load_ggml(Path(args.ggml_peer))
    if ggml is None:
        print(
            f"peers.py: no ggml harness at {args.ggml_peer}: ggml not measured "
            "(build it: sh benchmarks/ggml_peer_build.sh GGML_DIR)",
            file=sys.stderr,
        )
    info = environment.describe()
    default_threads = torch.get_num_threads()
    rows, targets = [], []
    regimes = ("evicted", "resident") if args.regime == "both" else (args.regime,)
    for n, k in SHAPES[:1] if args.quick else SHAPES:
        for batch in (1, 8):
            for threads in args.threads:
                thread_clock = args.clock == "auto" and threads == 1
                timer = time.thread_time if thread_clock else time.perf_counter
                torch.set_num_threads(threads)
                handles, meds = [], {}
                try:
                    fns, errors, handles = _contenders(n, k, batch, threads, args.quick, ggml)
                    for fn in fns.values():  # warm-up
                        fn()
                    for regime in regimes:
                        load0 = environment.load()
                        med = _time(fns, args.rounds, timer, regime == "resident")
                        meds[regime] = (med, load0, environment.load())
                finally:
                    torch.set_num_threads(default_threads)
                    for h in handles:
                        h.close()
                for regime, (med, load0, load1) in meds.items():
                    peers = {name: t for name, t in med.items() if name.startswith(PEERS)}
                    best = min(peers, key=peers.get)
                    label = f"{n}x{k} b{batch} t{threads} {regime}"
                    print(label, {k_: round(v * 1e6, 1) for k_, v in med.items()}, file=sys.stderr)
                    for name, t in sorted(med.items(), key=lambda kv: kv[1]):
                        rows.append(
                            f"| {n}x{k} | {batch} | {threads} | {regime} | {name} | "
                            f"{t * 1e6:.1f} | {med['torch-fp32'] / t:.2f}x | "
                            f"{peers[best] / t:.2f}x | {errors[name]:.2e} |"
                        )
                    int8 = peers[best] / med["lowbit-int8"]
                    fp32 = peers[best] / med["lowbit-fp32"]
                    targets.append(
                        f"| {label} | {'thread CPU' if thread_clock else 'wall'} | "
                        f"{load0} -> {load1} | {best} {peers[best] * 1e6:.1f} us | "
                        f"{med['lowbit-int8'] * 1e6:.1f} us, {int8:.2f}x | "
                        f"{'yes' if int8 >= 1.2 else 'no'} | "
                        f"{med['lowbit-fp32'] * 1e6:.1f} us, {fp32:.2f}x |"
                    )
    versions = f"onnxruntime {onnxruntime.__version__}; ggml: " + (
        f"{args.ggml_peer} (TQ1_0, TQ2_0)" if ggml else "not measured (harness not built)"
    )
    lines = [
        "# Peers: lowbit's packed ternary linear vs onnxruntime MatMulNBits and ggml, one process",
        "",
        environment.markdown(info) + f"- load average at end: {environment.load()}",
        f"- {versions}",
        f"- {args.rounds} rounds, contenders in a fresh random order each round; medians of the "
        "calling thread's CPU time on one thread and of wall-clock time on more (column "
        "'clock'). Regimes: `evicted`, each call after the other contenders' calls (the fp32 "
        "torch weight alone is 64-180 MB: weights, and code, come from memory); `resident`, each "
        "timed call right after an untimed call of the same contender. The machine is shared "
        "with other jobs (see the load): ratios within a row set are the comparable figures.",
        "",
        "## Target: lowbit int8 >= 1.2x the fastest peer",
        "",
        "| shape, batch, threads | clock | load average (1/5/15 min) before -> after "
        "| fastest peer | lowbit int8 (speed-up over it) | met "
        "| lowbit weight-only (speed-up over it) |",
        "|---|---|---|---|---|---|---|",
        *targets,
        "",
        "## All contenders",
        "",
        "| shape | batch | threads | regime | contender | median us | vs torch fp32 "
        "| vs fastest peer | max abs error vs float64 |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    out = Path(args.out)
    atomic_write(out, "\n".join(lines) + "\n")
    print("\n".join(lines[: 12 + len(targets)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
