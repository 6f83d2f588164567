"""Where a fit starts: the guide's starting locations and the frozen teacher.

By default (`FitConfig.init="taylor"`) each unit's hierarchical latents start at
its first-order importance: |dNLL/dz| at all gates open, per parameter the unit
costs, on a few training batches. Pruning then begins from a ranking the
network's own gradients give, not from all units equal (`init="prior"`: the
prior medians). `init="activation"` ranks by what each unit writes into the
residual stream on those batches instead (`output_energies`), a calibration
score in the spirit of Wanda-sp and FLAP that needs no gradient.
"""

from __future__ import annotations

import functools
import itertools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from flax import nnx
from jax.sharding import Mesh
from numpyro.infer.initialization import init_to_median

from ppn import bayes, data, gates, sharding
from ppn.models.llama import Llama
from ppn.units import KINDS, Units

if TYPE_CHECKING:
    from ppn.fit import FitConfig


def guide_start(model: Llama, units: Units, tokens: np.ndarray, cfg: FitConfig,
                mesh: Mesh | None = None) -> dict[str, np.ndarray]:
    """The guide's starting locations by latent site name: with `init="taylor"` or
    "activation", `importance_start`'s (for the `independent` prior, the intercepts they imply:
    `independent_start`), else {} (every site at its prior median, see
    `init_to_values`). Non-finite importances give {} too: such a network fails
    the fit's finiteness check at its first step."""
    if cfg.init == "prior":
        return {}
    start = importance_start(model, units, tokens, cfg, mesh=mesh, importance=cfg.init)
    if not all(np.isfinite(v).all() for v in start.values()):
        return {}
    return independent_start(start) if cfg.prior == "independent" else start


def independent_start(start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The intercepts that `importance_start`'s hierarchical start implies with both spreads
    at their prior median (HalfNormal(1): 0.6745), as the `independent` prior's sites
    `alpha_<kind>`: both priors then start from the same ranking of units."""
    tau = 0.6745
    level = tau * start["delta"]  # (L, 2): attention, MLP
    return {"alpha_attn_layer": level[:, 0], "alpha_mlp_layer": level[:, 1],
            "alpha_head": level[:, 0, None] + tau * start["eps_head"],
            "alpha_mlp_group": level[:, 1, None] + tau * start["eps_mlp_group"]}


def init_to_values(site=None, values=None):
    """numpyro init strategy: `values[name]` where given, the prior median
    elsewhere (not numpyro's default uniform draw in (-2, 2)): exact for the
    priors' Normal, HalfNormal and Laplace sites (HalfNormal(1): 0.6745), else
    the median of 15 draws."""
    if site is None:
        return functools.partial(init_to_values, values=values)
    if site["name"] in values:
        return jnp.asarray(values[site["name"]], jnp.float32)
    base = site.get("fn")
    while isinstance(base, (dist.Independent, dist.ExpandedDistribution)):
        base = base.base_dist
    if site["type"] == "sample" and isinstance(base, (dist.Normal, dist.HalfNormal, dist.Laplace)):
        return jnp.broadcast_to(base.icdf(jnp.float32(0.5)), site["fn"].shape()).astype(jnp.float32)
    return init_to_median(site, num_samples=15)


def gate_gradients(model: Llama, units: Units, batches, mesh: Mesh | None = None) -> dict[str, np.ndarray]:
    """Mean |d NLL / d z_g| over `batches` (each int (B, T+1)) at all gates open, by
    gate kind ("head" (L, H), "mlp_group" (L, G), ...): the first-order change of
    the loss when a unit is removed (Taylor importance). With a `mesh`, batches are
    split over it and weights FSDP-sharded as in `ppn.fit`."""
    graphdef, state = nnx.split(model)
    ones = {k: jnp.ones(units.shapes()[k]) for k in KINDS}
    if mesh is not None:
        state = sharding.on_mesh(state, mesh)

    @jax.jit
    def grad(state, z, batch):
        state = sharding.gather(state, mesh)

        def loss(z):
            net = nnx.merge(graphdef, state)
            logits = net(batch[:, :-1], gates=gates.block_gates(units, z))
            return bayes.token_nll(logits, batch[:, 1:]) / batch[:, 1:].size
        return jax.grad(loss)(z)

    total = {k: np.zeros(v.shape) for k, v in ones.items()}
    count = 0
    for batch in batches:
        g = grad(state, ones, jnp.asarray(batch) if mesh is None else sharding.global_batch(batch, mesh))
        total = {k: total[k] + np.abs(sharding.to_host(g[k])) for k in total}
        count += 1
    return {k: v / count for k, v in total.items()}


def output_energies(model: Llama, units: Units, batches) -> dict[str, np.ndarray]:
    """Mean over `batches` (each int (B, T+1)) of the energy each unit writes into the
    residual stream of the unpruned model, by kind "head" (L, N) and "mlp_group" (L, M):
    sum over tokens of ||o_h head_h(x)||^2 for a query head (its output through its
    slice of o), and of hidden_c(x)^2 ||down_{:,c}||^2 summed over a group's channels."""
    graphdef, state = nnx.split(model)
    gather = np.concatenate([np.full(w, g) for g, w in enumerate(units.group_widths)])  # channel -> group

    @jax.jit
    def energies(state, batch):
        net = nnx.merge(graphdef, state)
        ids = batch[:, :-1]
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        x, heads, groups = net.embed[...][ids], [], []
        for block in net.blocks:
            heads_out, _ = block.attn.head_outputs(block.input_norm(x), positions)
            per_head = jnp.einsum("BTNH,DNH->BTND", heads_out, block.attn.o[...]).astype(jnp.float32)
            heads.append((per_head ** 2).sum((0, 1, 3)))
            mid = x + block.attn(block.input_norm(x), positions)[0]  # the MLP reads the attention's output too
            normed = block.post_attention_norm(mid)
            hidden = block.mlp.hidden(normed).astype(jnp.float32)
            channel = (hidden ** 2).sum((0, 1)) * (block.mlp.down[...].astype(jnp.float32) ** 2).sum(0)
            groups.append(jax.ops.segment_sum(channel, gather, units.num_groups))
            x = mid + block.mlp(normed)
        return jnp.stack(heads), jnp.stack(groups)

    total, count = {"head": 0.0, "mlp_group": 0.0}, 0
    for batch in batches:
        h, g = energies(state, jnp.asarray(batch))
        total = {"head": total["head"] + np.asarray(h, np.float64), "mlp_group": total["mlp_group"] + np.asarray(g)}
        count += 1
    return {k: v / count for k, v in total.items()}


def importance_start(model: Llama, units: Units, tokens: np.ndarray, cfg: FitConfig, num_batches: int = 4,
                     mesh: Mesh | None = None, importance: str = "taylor") -> dict[str, np.ndarray]:
    """Initial guide locations from unit importances, in the hierarchy's coordinates.

    A unit's score is log(importance / cost) (cost in `units.currency`), on
    `num_batches` batches of the fit's shape drawn with their own seed; the
    importance is |dNLL/dz| (`gate_gradients`, "taylor") or the unit's output
    energy (`output_energies`, "activation", on one device). A (layer, kind) cell's
    score is the mean of its units'; `delta` (L, 2) starts at the standardised
    cell scores, `eps_head` (L, H) and `eps_mlp_group` (L, G) at the standardised
    deviations of units from their cell (all clipped to +-3).
    """
    batches = itertools.islice(data.train_batches(tokens, cfg.batch_size, cfg.seqlen + 1, cfg.seed + 7919),
                               num_batches)
    imp = (output_energies(model, units, batches) if importance == "activation"
           else gate_gradients(model, units, batches, mesh))
    unit = units.size_costs  # per parameter, or per FLOP for a fit in FLOPs
    costs = {"head": np.full((units.num_layers, units.num_heads), unit.head),
             "mlp_group": np.broadcast_to(unit.groups, (units.num_layers, units.num_groups))}
    score = {k: np.log(imp[k] / costs[k] + 1e-20) for k in costs}
    cells = np.stack([score["head"].mean(1), score["mlp_group"].mean(1)], axis=1)  # (L, 2)

    def standard(x):
        return np.clip((x - x.mean()) / (x.std() + 1e-12), -3, 3)

    deviations = {k: score[k] - cells[:, i, None] for i, k in enumerate(("head", "mlp_group"))}
    spread = np.concatenate([d.reshape(-1) for d in deviations.values()]).std() + 1e-12
    return {"delta": standard(cells),
            **{f"eps_{k}": np.clip(d / spread, -3, 3) for k, d in deviations.items()}}


def load_teacher(model: Llama, cfg: FitConfig) -> Llama | None:
    """The frozen teacher of a fit: None, a copy of `model`'s starting weights
    ("start"), or the model at `cfg.teacher`, in `cfg.teacher_dtype`.

    Raises:
        ValueError: the teacher's vocabulary size differs from the student's.
        MemoryError: the teacher's weights do not fit in the memory available
            (the message says how much they need).
    """
    if cfg.teacher is None:
        return None
    dtype = jnp.dtype(cfg.teacher_dtype) if cfg.teacher_dtype else model.dtype
    if cfg.teacher == "start":
        graphdef, state = nnx.split(model)
        # A copy: the fit donates its state, whose weights may share buffers with `model`.
        return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, dtype=dtype if jnp.issubdtype(
            x.dtype, jnp.floating) else x.dtype, copy=True), state))
    from ppn.checkpoint import load_model, safetensors_dir
    from ppn.hf_format import read_config

    source = safetensors_dir(cfg.teacher)
    config = read_config(source)
    if config.vocab_size != model.config.vocab_size:
        raise ValueError(f"teacher {cfg.teacher!r} has a vocabulary of {config.vocab_size:,} tokens, the model "
                         f"{model.config.vocab_size:,}: a teacher must share the student's tokenizer")
    need = config.num_params() * jnp.dtype(dtype).itemsize
    import psutil

    available = psutil.virtual_memory().available
    if need > available:
        raise MemoryError(f"teacher {cfg.teacher!r} needs {need / 2**30:.1f} GiB for its weights in {dtype.name}, "
                          f"and {available / 2**30:.1f} GiB are available; try teacher_dtype='bfloat16'")
    return load_model(source, dtype=dtype.name)
