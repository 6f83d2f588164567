"""Structured one-shot baselines: scores for layers, heads and MLP groups, and the
keep-sets they give at any size (experiments/BENCHMARK.md, "structured baselines").

Methods (`STRUCTURED_METHODS`):

- "block_influence": ShortGPT (Men et al. 2024). Block l's Block Influence is
  BI_l = 1 - mean over calibration tokens of cos(x_in, x_out), the cosine
  between the residual stream entering and leaving the block, measured on the
  unpruned model (`BlockStats.block_influence`). Whole blocks, attention and MLP
  together, are removed in increasing BI order.
- "flap": FLAP (An et al. 2024). For every input channel j of o (N*H, head-major)
  and of down (F), the fluctuation metric Var_tokens(X_j) * ||W_{:,j}||^2, with
  W in the (out, in) view. FLAP's adaptive structure search: each layer's
  channel scores are standardised (mean 0, sd 1 over that layer's o channels,
  and likewise its down channels), a head scores the mean of its H standardised
  channels and an MLP group the mean of its channels, and all units of all
  layers are ranked together. Per-layer standardisation matters: raw scores grow
  with depth as the residual stream grows, and a global ranking of raw (or
  model-wide standardised) scores removes every head of the early layers first
  (measured on SmolLM2-135M: perplexity 16,000 at size 0.9). FLAP's bias
  compensation is `prune_compensated`: the removed channels' mean contribution
  W_{:,removed} mean(X_removed) goes into o's and down's output biases.
- "wanda_structured": Wanda-sp, the structured Wanda of FLAP's comparisons:
  channel score ||X_j||_2 * sum_i |W_ij|, standardised and averaged into heads
  and groups like FLAP's and searched the same way, so the two differ only in
  the channel metric.
- "random": standard-normal scores per unit, seeded: the floor any method
  should beat at the same size.

`structured_scores` computes a method's scores once (from the calibration
statistics, the expensive part); `structured_keep` turns them into a keep-set
at one size. Resizing only re-runs the cheap budget fill. `ppn.prune` cuts the
model to a keep-set; "flap" cuts it with `prune_compensated` instead.
"""

from __future__ import annotations

import numpy as np

from ppn.harness.baselines.calibration import BlockStats
from ppn.hf_format import build_model, hf_tensors
from ppn.units import KeepSet, Units
from ppn.models.llama import Llama
from ppn.plan import fill_budget
from ppn.prune import keep_set, prune

STRUCTURED_METHODS = ("block_influence", "flap", "wanda_structured", "random")
_NEEDS_STATS = ("block_influence", "flap", "wanda_structured")


def structured_scores(model: Llama, method: str, *, stats: list[BlockStats] | None = None,
                      units: Units | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A method's importance scores, shaped like the logits `ppn.plan.fill_budget` ranks.

    Args:
        model: the dense model the scores are for.
        method: one of `STRUCTURED_METHODS`.
        stats: `ppn.harness.baselines.calibration.layerwise(model, windows)` of the dense
            model (no visit); required by every method but "random".
        units: the unit registry; `Units(model.config)` (MLP groups of 64) by default.
        seed: the seed of "random"'s scores.

    Returns:
        {"attn_layer": (L,), "mlp_layer": (L,), "head": (L, N), "mlp_group": (L, M)},
        higher = more important. For "block_influence" both layer entries are BI_l
        and every unit of block l also scores BI_l (a unit is worth its block).
        For the other methods the layer entries are +inf, so a sub-layer goes only
        when all its units have, and the unit entries are the method's scores.

    Raises:
        ValueError: unknown method, missing or mismatched stats, or units of another model.
    """
    units = _check(model, method, stats, units)
    L, N, M = units.num_layers, units.num_heads, units.num_groups
    if method == "block_influence":
        bi = np.array([s.block_influence for s in stats], np.float64)
        return {"attn_layer": bi, "mlp_layer": bi.copy(), "head": np.repeat(bi[:, None], N, 1),
                "mlp_group": np.repeat(bi[:, None], M, 1)}
    if method == "random":
        rng = np.random.default_rng(seed)
        scores = {"head": rng.standard_normal((L, N)), "mlp_group": rng.standard_normal((L, M))}
    else:
        o_ch, down_ch = _channel_scores(model, method, stats, units)
        scores = _into_units(_standardise(o_ch), _standardise(down_ch), units, np.mean)
    return {"attn_layer": np.full(L, np.inf), "mlp_layer": np.full(L, np.inf)} | scores


def structured_keep(model: Llama, method: str, size: float | int, *, stats: list[BlockStats] | None = None,
                    units: Units | None = None, seed: int = 0) -> KeepSet:
    """The keep-set of `method` at `size`.

    "flap", "wanda_structured" and "random" fill the budget greedily, best unit
    first (`fill_budget`): the kept size is at most the budget and within one
    unit's cost of it. "block_influence" removes whole blocks, lowest BI first,
    until the kept size is at most the budget (`remove_blocks`): a coarse
    granularity, the kept size can fall up to one block's cost short of it.

    Args:
        model, method, stats, units, seed: as for `structured_scores`.
        size: a fraction of prunable parameters in (0, 1], or an absolute count of them;
            of FLOPs when `units.currency` is "flops" (a fit's units), except for
            "block_influence", whose whole blocks are counted in parameters.

    Raises:
        ValueError: as `structured_scores`, or an invalid size.
    """
    units = units or Units(model.config)
    scores = structured_scores(model, method, stats=stats, units=units, seed=seed)
    if method == "block_influence":
        return remove_blocks(units, scores["attn_layer"], units.budget(size))
    if units.currency == "params":
        return fill_budget(units, scores, units.budget(size))
    return fill_budget(units, scores, units.size_costs.budget(units, size), units.size_costs)


def remove_blocks(units: Units, influence: np.ndarray, budget: int) -> KeepSet:
    """ShortGPT's layer removal: drops whole blocks (attention and MLP together) in
    increasing `influence` (L,) order, ties by index, until the kept prunable size
    is at most `budget`. The fewest blocks that fit are removed, so the kept size
    is the largest whole-block size within the budget."""
    L = units.num_layers
    block_cost = units.total // L  # every block of a dense model has the same shape
    n_remove = min(L, max(0, -(-(units.total - budget) // block_cost)))
    kept = np.ones(L, bool)
    kept[np.argsort(influence, kind="stable")[:n_remove]] = False
    return KeepSet(units, kept, kept, np.repeat(kept[:, None], units.num_heads, 1),
                   np.repeat(kept[:, None], units.num_groups, 1))


def prune_compensated(dense: Llama, keep: KeepSet, stats: list[BlockStats]) -> Llama:
    """`ppn.prune(dense, keep)` with FLAP's bias compensation.

    Removing input channels of a linear layer W (out, in) shifts the mean of its
    output over the calibration tokens by W_{:,removed} mean(X_removed); FLAP adds
    that shift to the layer's output bias, so the mean is kept. Here, in every
    block l whose sub-layer is kept:
        o bias    += sum over removed heads n of o[:, n, :] @ mean(o_in)[n, :]   (D,)
        down bias += down[:, removed channels] @ mean(down_in)[removed]           (D,)
    with the means of the dense model's calibration inputs (`InputStats.mean`).
    A removed sub-layer (every head or channel cut) is dropped whole, norm
    included, and its mean output is not compensated: FLAP would keep it as a
    constant bias, but our blocks have no bias outside a sub-layer to hold it.

    The pruned config turns on `o_bias` when some kept attention lost a head and
    `mlp_bias` when some kept MLP lost a channel, and for a llama `qkv_bias` with
    `o_bias`, since its `config.json` has one `attention_bias` for q, k, v and o
    (Mistral and Qwen2 checkpoints hold no o or MLP biases: such a model runs,
    but `ppn.save_model` refuses it). Biases that compensate nothing (q, k, v,
    gate, up, and o or down where nothing was removed) are the dense model's, or
    zeros when it had none. The prunable parameter count grows by exactly the
    biases turned on (`LlamaConfig.num_prunable_params`).

    Args:
        dense: the dense model.
        keep: the keep-set to cut it to (`structured_keep`).
        stats: `ppn.harness.baselines.calibration.layerwise(dense, windows)` (no visit).

    Raises:
        ValueError: the keep-set or stats belong to another model.
    """
    keep = keep_set(keep, None, dense.config)
    units = _check(dense, "flap", stats, keep.units)
    pruned = prune(dense, keep)
    eff, channels = keep.effective(), keep.channels()
    lost_head = bool((eff.attn[:, None] & ~eff.heads).any())
    lost_channel = bool((eff.mlp[:, None] & ~channels).any())
    c = pruned.config
    o_bias = c.o_bias or lost_head
    config = c.replace(o_bias=o_bias, qkv_bias=c.qkv_bias or (o_bias and c.model_type == "llama"),
                       mlp_bias=c.mlp_bias or lost_channel)
    tensors = dict(hf_tensors(pruned))

    def shift(name: str, by: np.ndarray) -> None:  # the dense model's bias, or zeros, plus `by`
        tensors[name] = np.asarray(tensors.get(name, 0.0), np.float64) + by

    n, h = units.num_heads, units.config.head_dim
    for l, (block, s) in enumerate(zip(dense.blocks, stats)):
        if eff.attn[l] and config.o_bias:
            gone = ~eff.heads[l]
            o = np.asarray(block.attn.o[...], np.float64)[:, gone]  # (D, removed, H)
            shift(f"model.layers.{l}.self_attn.o_proj.bias",
                  np.einsum("DNH,NH->D", o, s.inputs["o_in"].mean.reshape(n, h)[gone]))
        if eff.mlp[l] and config.mlp_bias:
            gone = ~channels[l]
            down = np.asarray(block.mlp.down[...], np.float64)[:, gone]  # (D, removed)
            shift(f"model.layers.{l}.mlp.down_proj.bias", down @ s.inputs["down_in"].mean[gone])
    return build_model(config, lambda name, spec: tensors[name] if name in tensors else np.zeros(spec.hf_shape),
                       dtype=dense.dtype)


def unit_scores(model: Llama, method: str, stats: list[BlockStats], units: Units) -> dict[str, np.ndarray]:
    """Raw (unstandardised) channel metrics of "flap" or "wanda_structured", summed into units.

    Returns:
        {"head": (L, N) sum over each head's H channels,
         "mlp_group": (L, M) sum over each group's channels}.
    """
    return _into_units(*_channel_scores(model, method, stats, units), units, np.sum)


def _channel_scores(model: Llama, method: str, stats: list[BlockStats], units: Units):
    """Each layer's score of every input channel of o and of down: (L, N*H) and (L, F).

    Channel j of o (j = n*H + h) and of down (j = f) is scored from the weight
    column W_{:,j} (o: o[:, n, h] of the (D, N, H) array; down: down[:, f]) and the
    calibration inputs X_j of that layer:
        flap:              Var(X_j) * ||W_{:,j}||_2^2
        wanda_structured:  ||X_j||_2 * sum_i |W_ij|
    """
    o_ch, down_ch = [], []
    for block, s in zip(model.blocks, stats):
        o = np.asarray(block.attn.o[...], np.float64).reshape(units.config.hidden_size, -1)  # (D, N*H)
        o_ch.append(_channel_metric(method, o, s.inputs["o_in"]))
        down_ch.append(_channel_metric(method, np.asarray(block.mlp.down[...], np.float64), s.inputs["down_in"]))
    return np.stack(o_ch), np.stack(down_ch)


def _into_units(o_ch: np.ndarray, down_ch: np.ndarray, units: Units, reduce) -> dict[str, np.ndarray]:
    """Channel scores (L, N*H) and (L, F) reduced (np.sum or np.mean) over each head's
    and each MLP group's channels: {"head": (L, N), "mlp_group": (L, M)}."""
    edges = np.cumsum(units.group_widths)[:-1]
    groups = np.stack([reduce(g, axis=1) for g in np.split(down_ch, edges, axis=1)], axis=1)
    return {"head": reduce(o_ch.reshape(units.num_layers, units.num_heads, -1), axis=2), "mlp_group": groups}


def _channel_metric(method: str, weight: np.ndarray, x) -> np.ndarray:
    """(I,) score of each input channel of `weight` (out, I) given its input statistics."""
    if method == "flap":
        return x.variance * (weight ** 2).sum(0)
    return np.sqrt(x.sq_norm) * np.abs(weight).sum(0)


def _standardise(scores: np.ndarray) -> np.ndarray:
    """(L, C) scores standardised within each layer (row): mean 0, sd 1 (an all-equal
    row maps to zeros), so that every layer's channels rank on one scale."""
    sd = scores.std(axis=1, keepdims=True)
    return (scores - scores.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def _check(model: Llama, method: str, stats: list[BlockStats] | None, units: Units | None) -> Units:
    """Validates the arguments of `structured_scores`; returns the units to use."""
    if method not in STRUCTURED_METHODS:
        raise ValueError(f"unknown structured method {method!r}; choose one of {STRUCTURED_METHODS}")
    units = units or Units(model.config)
    if units.config != model.config:
        raise ValueError(f"units describe another architecture than the model's: {units.config} vs {model.config}")
    if method not in _NEEDS_STATS:
        return units
    if stats is None:
        raise ValueError(f"method {method!r} needs calibration stats: pass stats=layerwise(model, windows)")
    if len(stats) != units.num_layers:
        raise ValueError(f"stats cover {len(stats)} blocks, the model has {units.num_layers}")
    if method != "block_influence" and any({"o_in", "down_in"} - set(s.inputs) for s in stats):
        raise ValueError(f"method {method!r} needs the o_in and down_in statistics of every block "
                         "(calibrate the dense model)")
    return units
