"""The prunable units of a model, their exact parameter costs, and keep-sets.

Units form a two-level hierarchy per block l:

    attn_layer[l]  ->  head[l, n]       (n < N query heads)
    mlp_layer[l]   ->  mlp_group[l, m]  (m < M groups of `group_width` SwiGLU channels)

Each of these is a gate. A key/value head (`kv_group`) is not gated: it is kept
exactly when at least one of its query heads is, since its keys and values are
then still read. A sub-layer counts as kept only if its layer gate is on and at
least one of its units is, because a layer with every unit closed computes zero
and is removed by pruning, norm included.

Costs are exact parameter counts, so `KeepSet.num_params()` equals the
parameter count of the model `ppn.prune` builds from it.

A keep-set may carry rescaling factors (`RESCALE_KINDS`): multipliers of each
kept unit's output, each sub-layer's output and each dimension of a sub-layer's
normalised input, which `ppn.prune` folds into the kept weights.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from ppn.models.config import LayerShape, LlamaConfig

KINDS = ("attn_layer", "mlp_layer", "head", "mlp_group")
# What a size can be measured in (`Units.costs`).
CURRENCIES = ("params", "flops", "bytes")
# What a fit's size can measure (`Units.currency`): bytes are parameters times a constant.
SIZE_CURRENCIES = ("params", "flops")
# Rescaled quantities: every gate, and the D dimensions of each sub-layer's normalised input.
RESCALE_KINDS = KINDS + ("attn_in", "mlp_in")


@dataclasses.dataclass(frozen=True)
class Units:
    """The gates of a dense model and what each one costs.

    Attributes:
        config: the dense architecture (its `layers` must be None).
        group_width: SwiGLU channels per MLP group (the last group may be narrower).
        currency: what a fit's size rho measures, "params" or "flops" (per token
            at `context` keys): the push offset holds the expected cost in it at
            rho times the dense blocks', and a plan reads sizes in it by default.
        context: the keys at which "flops" are counted.
    """

    config: LlamaConfig
    group_width: int = 64
    currency: str = "params"
    context: int = 2048

    def __post_init__(self):
        if self.config.layers is not None:
            raise ValueError("units are defined on a dense config; this one is already pruned")
        if not 1 <= self.group_width <= self.config.intermediate_size:
            raise ValueError(f"group_width must be in [1, {self.config.intermediate_size}], got {self.group_width}")
        if self.currency not in SIZE_CURRENCIES:
            raise ValueError(f"a fit's size is measured in {' or '.join(SIZE_CURRENCIES)}, got {self.currency!r}")
        if self.context < 1:
            raise ValueError(f"context must be a positive number of keys, got {self.context}")

    # ------------------------------------------------------------- structure
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def num_groups(self) -> int:
        """M, MLP groups per block."""
        return -(-self.config.intermediate_size // self.group_width)

    @property
    def group_widths(self) -> np.ndarray:
        """(M,) channels in each MLP group."""
        f, w = self.config.intermediate_size, self.group_width
        return np.minimum(w, f - w * np.arange(self.num_groups))

    @property
    def head_kv(self) -> np.ndarray:
        """(N,) the KV head each query head reads in the dense model."""
        return np.arange(self.num_heads) // self.config.group_size

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes by kind: gates (`KINDS`) and input scales (`RESCALE_KINDS`)."""
        L, D = self.num_layers, self.config.hidden_size
        return {"attn_layer": (L,), "mlp_layer": (L,), "head": (L, self.num_heads),
                "mlp_group": (L, self.num_groups), "attn_in": (L, D), "mlp_in": (L, D)}

    def gate_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the gates by kind (`KINDS`)."""
        return {k: v for k, v in self.shapes().items() if k in KINDS}

    @property
    def num_gates(self) -> int:
        return self.num_layers * (2 + self.num_heads + self.num_groups)

    # ----------------------------------------------------------------- costs
    @property
    def head_cost(self) -> int:
        """Parameters of one query head: its rows of q and columns of o (plus q bias)."""
        c = self.config
        return 2 * c.hidden_size * c.head_dim + (c.head_dim if c.qkv_bias else 0)

    @property
    def kv_cost(self) -> int:
        """Parameters of one KV head: its rows of k and v (plus biases)."""
        c = self.config
        return 2 * c.hidden_size * c.head_dim + (2 * c.head_dim if c.qkv_bias else 0)

    @property
    def attn_fixed_cost(self) -> int:
        """Parameters an attention sub-layer keeps whatever its heads: norm, o bias."""
        c = self.config
        return c.hidden_size * (2 if c.o_bias else 1)

    @property
    def group_costs(self) -> np.ndarray:
        """(M,) parameters of each MLP group: rows of gate and up, columns of down (plus gate and up biases)."""
        c = self.config
        return (3 * c.hidden_size + (2 if c.mlp_bias else 0)) * self.group_widths

    @property
    def mlp_fixed_cost(self) -> int:
        """Parameters an MLP sub-layer keeps whatever its channels: norm, down bias."""
        c = self.config
        return c.hidden_size * (2 if c.mlp_bias else 1)

    @property
    def total(self) -> int:
        """S_total: parameters of all blocks, the denominator of a size fraction."""
        return self.config.num_prunable_params()

    @functools.cached_property
    def size_costs(self) -> Costs:
        """What each unit costs in the currency of the fit's size (`currency`)."""
        return self.costs(self.currency, self.context)

    @functools.cached_property
    def size_total(self) -> float:
        """The dense blocks' cost in `currency`: a fit's size rho targets rho times this."""
        return self.size_costs.of(self.full())

    def full(self) -> KeepSet:
        """The keep-set of the dense model."""
        L, N, M = self.num_layers, self.num_heads, self.num_groups
        return KeepSet(self, np.ones(L, bool), np.ones(L, bool), np.ones((L, N), bool), np.ones((L, M), bool))

    def costs(self, currency: str = "params", context: int = 2048, dtype="bfloat16") -> Costs:
        """What each unit costs in `currency`:

        - "params": parameters (the attributes above);
        - "flops": floating-point operations per token when the model decodes at
          `context` keys: 2 per weight of a matrix product (norms too), plus each
          query head's 4 * context * head_dim for its scores and weighted sum;
          elementwise operations (softmax, SwiGLU, residuals) are left out;
        - "bytes": the weights' bytes at `dtype` (as a fraction, the same as "params";
          as an amount, a file or memory size).
        """
        c = self.config
        base = c.num_params() - c.num_prunable_params()
        if currency == "params" or currency == "bytes":
            per = 1 if currency == "params" else np.dtype(jnp.dtype(dtype)).itemsize
            return Costs(currency, per * self.head_cost, per * self.kv_cost, per * self.attn_fixed_cost,
                         per * self.group_costs.astype(np.float64), per * self.mlp_fixed_cost, per * base)
        if currency == "flops":
            if context < 1:
                raise ValueError(f"context must be a positive number of keys, got {context}")
            head_out = c.vocab_size * c.hidden_size  # the output head; the embedding lookup multiplies nothing
            return Costs(currency, 2 * self.head_cost + 4 * context * c.head_dim, 2 * self.kv_cost,
                         2 * self.attn_fixed_cost, 2 * self.group_costs.astype(np.float64), 2 * self.mlp_fixed_cost,
                         2 * (head_out + c.hidden_size))
        raise ValueError(f"unknown cost currency {currency!r}; choose one of {', '.join(CURRENCIES)}")

    def budget(self, size: float | int) -> int:
        """A target size in parameters: a fraction in (0, 1] of `total`, or an
        absolute count of prunable parameters (an int above 1)."""
        if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
            raise TypeError(f"size must be a number, got {size!r}")
        if not np.isfinite(size) or size <= 0:
            raise ValueError(f"size must be a fraction in (0, 1] or a parameter count, got {size}")
        if size <= 1:
            return int(round(float(size) * self.total))
        if float(size) != int(size):
            raise ValueError(f"a size above 1 is a parameter count and must be whole, got {size}")
        if size > self.total:
            raise ValueError(f"size {int(size):,} exceeds the model's {self.total:,} prunable parameters")
        return int(size)


@dataclasses.dataclass(frozen=True, eq=False)
class Costs:
    """What each unit of a model costs in one currency (`Units.costs`).

    Attributes:
        currency: "params", "flops" (per token) or "bytes".
        head, kv: one query head; one KV head (paid once its first query head is kept).
        attn_fixed, mlp_fixed: what a kept attention / MLP sub-layer costs whatever its units (norm, biases).
        groups: (M,) each MLP group.
        base: what the model costs outside its blocks (embeddings, final norm, output head).
    """

    currency: str
    head: float
    kv: float
    attn_fixed: float
    groups: np.ndarray
    mlp_fixed: float
    base: float

    def of(self, keep: KeepSet) -> float:
        """The blocks' cost of the model `keep` describes (its prunable part)."""
        eff = keep.effective()
        return float(eff.heads.sum() * self.head + keep.kv_kept().sum() * self.kv + eff.attn.sum() * self.attn_fixed
                     + (eff.groups * self.groups).sum() + eff.mlp.sum() * self.mlp_fixed)

    def budget(self, units: Units, size: float) -> float:
        """A target in this currency for the blocks: a fraction in (0, 1] of the dense
        blocks' cost, or (above 1) an amount for the whole model, `base` included.
        Milliseconds (currency "ms", a latency table's) are always an amount: a
        model can decode in under a millisecond per token."""
        total = self.of(units.full())
        if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
            raise TypeError(f"size must be a number, got {size!r}")
        if not np.isfinite(size) or size <= 0:
            raise ValueError(f"size must be a fraction in (0, 1] or an amount of {self.currency}, got {size}")
        if size <= 1 and self.currency != "ms":
            return float(size) * total
        if not self.base < size <= self.base + total:
            raise ValueError(f"a model of {size:,.0f} {self.currency}: the dense model has {self.base + total:,.0f} "
                             f"and its parts outside the blocks alone {self.base:,.0f}")
        return float(size) - self.base


@dataclasses.dataclass(frozen=True, eq=False)
class KeepSet:
    """Which gates are open.

    Attributes:
        units: the registry these masks index.
        attn: (L,) attention sub-layer gates.
        mlp: (L,) MLP sub-layer gates.
        heads: (L, N) query-head gates.
        groups: (L, M) MLP-group gates.
        scales: optional float factors by `RESCALE_KINDS` kind (`Units.shapes`),
            folded into the kept weights by `ppn.prune`; None = no rescaling.
    """

    units: Units
    attn: np.ndarray
    mlp: np.ndarray
    heads: np.ndarray
    groups: np.ndarray
    scales: dict[str, np.ndarray] | None = None

    def __post_init__(self):
        u = self.units
        expected = {"attn": (u.num_layers,), "mlp": (u.num_layers,),
                    "heads": (u.num_layers, u.num_heads), "groups": (u.num_layers, u.num_groups)}
        for name, shape in expected.items():
            value = np.asarray(getattr(self, name), bool)
            if value.shape != shape:
                raise ValueError(f"keep-set {name} has shape {value.shape}, expected {shape}")
            object.__setattr__(self, name, value)
        if self.scales is not None:
            shapes = u.shapes()
            if set(self.scales) != set(RESCALE_KINDS):
                raise ValueError(f"keep-set scales have kinds {sorted(self.scales)}, expected {sorted(RESCALE_KINDS)}")
            scales = {k: np.asarray(v, np.float32) for k, v in self.scales.items()}
            for k, v in scales.items():
                if v.shape != shapes[k] or not np.all(np.isfinite(v)):
                    raise ValueError(f"keep-set scales {k!r} have shape {v.shape} (expected {shapes[k]}) "
                                     "or non-finite values")
            object.__setattr__(self, "scales", scales)

    def __eq__(self, other):
        if not (isinstance(other, KeepSet) and self.units == other.units and all(
                np.array_equal(getattr(self, f), getattr(other, f)) for f in ("attn", "mlp", "heads", "groups"))):
            return False
        if self.scales is None or other.scales is None:
            return self.scales is other.scales
        return all(np.array_equal(self.scales[k], other.scales[k]) for k in RESCALE_KINDS)

    def effective(self) -> KeepSet:
        """The same model with the hierarchy resolved: units of a closed layer are
        closed, and a layer whose units are all closed is closed."""
        heads = self.heads & self.attn[:, None]
        groups = self.groups & self.mlp[:, None]
        return KeepSet(self.units, heads.any(1), groups.any(1), heads, groups, self.scales)

    def kv_kept(self) -> np.ndarray:
        """(L, K) which KV heads remain: those with at least one kept query head."""
        eff = self.effective()
        k = self.units.config.num_kv_heads
        return np.stack([np.bincount(self.units.head_kv[h], minlength=k) > 0 for h in eff.heads])

    def layer_shapes(self) -> tuple[LayerShape, ...]:
        """The `LayerShape` of every block of the pruned model."""
        eff, kv = self.effective(), self.kv_kept()
        shapes = []
        for l in range(self.units.num_layers):
            kept_kv = np.flatnonzero(kv[l])
            remap = {int(k): i for i, k in enumerate(kept_kv)}
            q_to_kv = tuple(remap[int(self.units.head_kv[n])] for n in np.flatnonzero(eff.heads[l]))
            width = int(self.units.group_widths[eff.groups[l]].sum())
            shapes.append(LayerShape(q_to_kv=q_to_kv, num_kv_heads=len(kept_kv), intermediate_size=width))
        return tuple(shapes)

    def config(self) -> LlamaConfig:
        """The pruned model's config, in `LlamaConfig.canonical` form: a keep-set with the
        same whole KV groups and channel count in every block (`Plan.keep(size, uniform=True)`,
        or the full set) gives a plain dense config that Hugging Face can load."""
        return self.units.config.replace(layers=self.layer_shapes()).canonical()

    def num_params(self) -> int:
        """Prunable parameters kept: exactly those of the pruned model's blocks."""
        return self.config().num_prunable_params()

    def channels(self) -> np.ndarray:
        """(L, F) kept SwiGLU channels, each group's mask repeated over its width."""
        return np.repeat(self.effective().groups, self.units.group_widths, axis=1)
