"""Meshes and array placement for data-parallel, fully sharded fits and evaluations.

    mesh = ppn.sharding.make_mesh("data=2,fsdp=4")   # 8 devices
    result = ppn.fit(model, tokens, config, mesh=mesh)
    ppn.perplexity(result.model, valid, mesh=mesh)

A mesh has two named axes (either may have size 1):

    data   pure data parallelism: replicas of the whole training state.
    fsdp   fully sharded data parallelism (ZeRO-3): each network weight, its
           gradient and its Adam moments are split along one dimension over
           this axis, and gathered by the compiler where a layer needs them.

Both axes are data-parallel: a batch (B, T) is split along B over data x fsdp
devices together, so every device reads its own rows (the fsdp axis would
otherwise compute the same rows several times). Gate and guide parameters are
tiny and replicated. The single-device code path (mesh=None) never touches
this module's placements.

Multi-host: every process runs the same program on the global mesh
(`jax.distributed.initialize()` first). A training batch is a function of
(seed, step) alone; each process materialises only the rows its own devices
hold (`global_batch`), so results do not depend on the number of processes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_AXES = AXES
"""Mesh axes a batch's leading dimension is split over (both are data-parallel)."""


def parse_mesh(spec: str) -> dict[str, int]:
    """{axis: size} from "data=D,fsdp=F" (either part may be left out: size 1).

    Raises:
        ValueError: for a malformed spec, an axis name other than data/fsdp, or a
            size below 1.
    """
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
        if m is None:
            raise ValueError(f"mesh {spec!r}: expected AXIS=SIZE[,AXIS=SIZE], e.g. data=2,fsdp=4")
        name, size = m.group(1), int(m.group(2))
        if name not in AXES:
            raise ValueError(f"mesh {spec!r}: unknown axis {name!r}; the axes are {', '.join(AXES)}")
        if name in sizes or size < 1:
            raise ValueError(f"mesh {spec!r}: axis {name!r} given twice or with a size below 1")
        sizes[name] = size
    if not sizes:
        raise ValueError(f"mesh {spec!r} names no axis; e.g. data=2,fsdp=4")
    return sizes


def make_mesh(spec: str | Mapping[str, int], devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over the first data x fsdp devices.

    Axis types are `AxisType.Auto` on purpose (`jax.make_mesh` defaults to
    Explicit): the NumPyro model, the guide and the NNX network know nothing of
    sharding, and with Auto axes the GSPMD partitioner propagates the shardings
    of the jitted step's inputs and outputs through them, inserting the
    all-gathers and reduce-scatters of FSDP itself. Explicit axes would make
    every jnp operation inside those libraries resolve its output sharding by
    the sharding-in-types rules, which their code was never written for.

    Args:
        spec: "data=D,fsdp=F" or {"data": D, "fsdp": F}; a missing axis has size 1.
        devices: the devices to use (default `jax.devices()`, all processes').

    Raises:
        ValueError: for a bad spec, or a mesh larger than the devices available.
    """
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axis {sorted(unknown)[0]!r}; the axes are {', '.join(AXES)}")
    shape = tuple(int(sizes.get(a, 1)) for a in AXES)
    devices = list(jax.devices() if devices is None else devices)
    need = int(np.prod(shape))
    if min(shape) < 1 or need > len(devices):
        raise ValueError(f"mesh data={shape[0]},fsdp={shape[1]} needs {need} devices; "
                         f"{len(devices)} available ({devices[0].platform})")
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices[:need])


def check_mesh(mesh: Mesh) -> None:
    """Raises ValueError unless `mesh` has only data/fsdp axes, all of type Auto."""
    unknown = [a for a in mesh.axis_names if a not in AXES]
    if unknown:
        raise ValueError(f"mesh axis {unknown[0]!r} does not exist here; a ppn mesh has axes "
                         f"{', '.join(AXES)} (build one with ppn.sharding.make_mesh)")
    if any(t != AxisType.Auto for t in mesh.axis_types):
        raise ValueError("mesh axes must be AxisType.Auto so the partitioner can propagate shardings through "
                         "NumPyro and Flax code; build the mesh with ppn.sharding.make_mesh")


def axis_size(mesh: Mesh, name: str) -> int:
    return int(mesh.shape.get(name, 1))


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch is split: data x fsdp."""
    return axis_size(mesh, "data") * axis_size(mesh, "fsdp")


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest whole."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def gather(tree, mesh: Mesh | None):
    """Inside a jitted function: FSDP-sharded weights gathered whole where they are
    read (ZeRO-3's forward; the gradients flow back reduce-scattered through the
    constraint's transpose). Unchanged without a mesh.

    Without it the partitioner, seeing weights split along a layer's input or
    output dimension, may keep them in place and move activations instead, and
    fall back to replicating tensors it cannot reshard (XLA's "involuntary full
    rematerialization")."""
    return tree if mesh is None else jax.lax.with_sharding_constraint(tree, replicated(mesh))


def fsdp_spec(shape: tuple[int, ...], size: int) -> PartitionSpec:
    """Splits the largest dimension divisible by `size` over "fsdp" (the first
    such on ties); replicates when none is, or when size is 1."""
    dims = [i for i, n in enumerate(shape) if size > 1 and n % size == 0]
    if not dims:
        return PartitionSpec()
    best = max(dims, key=lambda i: (shape[i], -i))
    return PartitionSpec(*(("fsdp" if i == best else None) for i in range(len(shape))))


def weight_shardings(tree, mesh: Mesh):
    """A NamedSharding per array of `tree` (arrays or ShapeDtypeStructs): FSDP over "fsdp"."""
    size = axis_size(mesh, "fsdp")
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, size)), tree)


def state_shardings(tree, mesh: Mesh, weights_key: str):
    """Shardings of a training state: every array under the dict key `weights_key`
    (the network's weights, and the Adam moments that mirror them) FSDP-sharded,
    everything else (gate/guide parameters, counters, the PRNG key) replicated."""
    size = axis_size(mesh, "fsdp")

    def layout(path, x):
        is_weight = any(isinstance(k, jax.tree_util.DictKey) and k.key == weights_key for k in path)
        return NamedSharding(mesh, fsdp_spec(x.shape, size) if is_weight else PartitionSpec())

    return jax.tree_util.tree_map_with_path(layout, tree)


def place(tree, shardings):
    """`tree`'s arrays laid out as `shardings` (one sharding, or a tree of `tree`'s structure).

    Every process must hold the same values (true of a state built from the same
    seed): with several processes each one transfers only the shards its own
    devices hold, read from its host copy.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x[i])),
                        tree, shardings)


def on_mesh(tree, mesh: Mesh):
    """Network weights ready for `mesh`: arrays already laid out on it are kept as
    they are; the others are FSDP-sharded (as a fit would hold them)."""
    def keep(x):
        return isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh

    targets = jax.tree.map(lambda x, s: x.sharding if keep(x) else s, tree, weight_shardings(tree, mesh))
    return place(tree, targets)


def global_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """The global batch (B, ...) split over data x fsdp, each process supplying only its rows.

    Every process computes the same `batch` (a function of (seed, step) only);
    the rows its devices hold are cut out and handed to
    `jax.make_array_from_process_local_data`, so a process transfers B / processes
    rows, never the whole batch.
    """
    sharding = batch_sharding(mesh, batch.ndim)
    slices = {idx[0].indices(batch.shape[0])[:2]
              for idx in sharding.addressable_devices_indices_map(batch.shape).values()}
    local = np.concatenate([batch[start:stop] for start, stop in sorted(slices)])
    return jax.make_array_from_process_local_data(sharding, local, batch.shape)


def to_host(x) -> np.ndarray:
    """A numpy copy of a (possibly multi-host) array; a collective when it spans processes."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def addressable(tree):
    """`tree` with every array this process can read whole: arrays that span other
    processes are gathered to host numpy (a collective: every process must call
    it); the others, the only kind a single process has, are returned as they are."""
    return jax.tree.map(lambda x: x if getattr(x, "is_fully_addressable", True) else to_host(x), tree)


def is_main_process() -> bool:
    """True on the process that writes files and logs (process 0)."""
    return jax.process_index() == 0


def initialize_distributed(requested: bool = False) -> bool:
    """Calls `jax.distributed.initialize()` when `requested` or env PPN_DISTRIBUTED=1.

    It must run before any other JAX call. On Cloud TPU pod slices and under
    Slurm (one process per GPU, srun) it finds the coordinator, the process
    count and this process's id by itself; elsewhere set JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID.

    Returns:
        Whether it initialised.
    """
    if not (requested or os.environ.get("PPN_DISTRIBUTED") == "1"):
        return False
    jax.distributed.initialize()
    return True
