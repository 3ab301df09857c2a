"""Search vision-transformer configurations whose parameter counts match the paper's VIT1/VIT2.

Claim checked: "Low-Resolution Neural Networks" (arXiv 2502.08795) reports VIT1 = 4,766,282 and
VIT2 = 10,573,770 parameters on 32x32x3 CIFAR-10 (10 classes); its Table 2 (the hyperparameters)
was lost. The two models "differ only in the number of transformer blocks and the units in each
fully connected layer". The architecture follows the Keras ViT example the paper's description
matches (patches -> fp32 dense + learned position embedding -> blocks of [LayerNorm, multi-head
attention, residual, LayerNorm, MLP with GELU, residual] -> LayerNorm -> flatten -> MLP head ->
Dense(classes)).

The count is closed form, so for every choice of the other hyperparameters the number of blocks
is solved exactly: blocks = (target - everything else) / (parameters per block). Searched:

  image side     32 (no resize) or 72 / 64 (the Keras example resizes to 72)
  patch size     2, 4, 6, 8, 16          (VALID patches: (side // p)^2 of them)
  dim d          16 .. 256
  attention      "qkvo": q, k, v, out each d -> d (head dim d / heads), 4d^2 + 4d
                 "keras": Keras MultiHeadAttention(key_dim=d): q, k, v d -> h*d, out h*d -> d
  heads          1, 2, 4, 8 (changes the count only for "keras")
  block MLP      hidden units u, then back to d (the Keras example: [2d, d])
  head           flatten (n*d) or mean-pool (d); 0, 1 or 2 hidden layers; final LayerNorm or not
  extra          0, or +7 (a Keras Normalization layer's non-trainable mean/variance/count,
                 which Keras' "Total params" includes)

Run:  python benchmarks/vit_config_search.py [--limit 20]
Writes nothing; docs/results/vit-config.md records the outcome and the choice.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

TARGETS = {"vit1": 4_766_282, "vit2": 10_573_770}
CLASSES = 10
CHANNELS = 3

# Stage 1: a broad grid with "round" unit counts, single-model exact matches.
SIDES = (32, 64, 72)
PATCHES = (2, 4, 6, 8, 16)
DIMS = (16, 32, 48, 64, 96, 128, 192, 256)
HEADS = (1, 2, 4, 8)
UNITS = (32, 64, 128, 256, 512, 768, 1024, 2048, 3072, 4096)
EXTRAS = (0, 7)


def _head_grid(units: tuple[int, ...] | range) -> tuple[tuple[int, ...], ...]:
    """No hidden head layer, one, or two (wide to narrow)."""
    return ((), *((a,) for a in units), *((a, b) for a in units for b in units if b <= a))


HEAD_UNITS = _head_grid(UNITS)

# Stage 2: VIT1/VIT2 pairs that share everything but blocks and unit counts (the paper's
# wording), with head units on a finer grid (multiples of 64) and block MLP units D, 2D or 4D.
PAIR_SIDES = (32, 72)
PAIR_PATCHES = (4, 6, 8, 16)
PAIR_DIMS = (32, 64, 128)
PAIR_HEAD_UNITS = _head_grid(range(64, 4097, 64))


@dataclass(frozen=True)
class Config:
    side: int
    patch: int
    dim: int
    attention: str
    heads: int
    mlp_units: int
    head_units: tuple[int, ...]
    final_norm: bool
    pool: str
    extra: int
    blocks: int = 0


def _dense(a: int, b: int) -> int:
    return a * b + b


def attention_params(d: int, attention: str, heads: int) -> int:
    if attention == "qkvo":
        return 4 * _dense(d, d)
    return 3 * _dense(d, heads * d) + _dense(heads * d, d)


def block_params(c: Config) -> int:
    """Two LayerNorms, attention, MLP d -> u -> d."""
    d = c.dim
    return (
        4 * d
        + attention_params(d, c.attention, c.heads)
        + _dense(d, c.mlp_units)
        + _dense(c.mlp_units, d)
    )


def base_params(c: Config) -> int:
    """Everything but the blocks: patch embedding, position embedding, final norm, head."""
    n = (c.side // c.patch) ** 2
    d = c.dim
    total = _dense(c.patch * c.patch * CHANNELS, d) + n * d + (2 * d if c.final_norm else 0)
    width = n * d if c.pool == "flatten" else d
    for u in c.head_units:
        total += _dense(width, u)
        width = u
    return total + _dense(width, CLASSES) + c.extra


def total_params(c: Config) -> int:
    return base_params(c) + c.blocks * block_params(c)


def _solve(c: Config, found: dict[str, list[Config]]) -> None:
    """Append ``c`` with the block count that hits a target exactly, if one in 1..24 does."""
    base, per = base_params(c), block_params(c)
    for key, target in TARGETS.items():
        blocks, rest = divmod(target - base, per)
        if rest == 0 and 1 <= blocks <= 24:
            found[key].append(Config(**{**c.__dict__, "blocks": blocks}))


def _attentions(d: int, heads: tuple[int, ...]) -> Iterator[tuple[str, int]]:
    # The count of "qkvo" does not depend on the head count: report D / 16 heads (head dim 16).
    yield "qkvo", max(d // 16, 1)
    for h in heads:
        yield "keras", h


def broad() -> dict[str, list[Config]]:
    """Stage 1: exact single-model matches on the round grid."""
    found: dict[str, list[Config]] = {k: [] for k in TARGETS}
    for side, patch, d in itertools.product(SIDES, PATCHES, DIMS):
        for (attention, heads), u, head, final_norm, pool, extra in itertools.product(
            _attentions(d, HEADS),
            sorted({*UNITS, 2 * d, 4 * d}),
            HEAD_UNITS,
            (True, False),
            ("flatten", "mean"),
            EXTRAS,
        ):
            c = Config(side, patch, d, attention, heads, u, head, final_norm, pool, extra)
            _solve(c, found)
    return found


SHARED = ("side", "patch", "dim", "attention", "heads", "final_norm", "pool", "extra")


def paired() -> list[tuple[Config, Config]]:
    """Stage 2: (VIT1, VIT2) exact matches sharing the ``SHARED`` fields, VIT2 the larger in
    blocks (a "more complex" model)."""
    out = []
    for side, patch, d, (attention, heads), final_norm, pool, extra in itertools.product(
        PAIR_SIDES,
        PAIR_PATCHES,
        PAIR_DIMS,
        _attentions(4, (4,)),
        (True, False),
        ("flatten", "mean"),
        EXTRAS,
    ):
        heads = 4
        found: dict[str, list[Config]] = {k: [] for k in TARGETS}
        for u, head in itertools.product((d, 2 * d, 4 * d), PAIR_HEAD_UNITS):
            _solve(
                Config(side, patch, d, attention, heads, u, head, final_norm, pool, extra), found
            )
        out += [(a, b) for a in found["vit1"] for b in found["vit2"] if b.blocks > a.blocks]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=20, help="matches to print per target")
    args = parser.parse_args()
    found = broad()
    for key, matches in found.items():
        print(f"stage 1: {key} = {TARGETS[key]:,}: {len(matches)} exact matches on the round grid")
        for c in matches[: args.limit]:
            print("  ", c)
    both = paired()
    print(f"stage 2: {len(both)} (VIT1, VIT2) pairs sharing {', '.join(SHARED)}")
    for c1, c2 in both[: args.limit]:
        print("  vit1", c1)
        print("  vit2", c2)


if __name__ == "__main__":
    main()
