"""Every device of a process, and many processes: the one place that knows the device mesh.

    parallel.initialize()            join a multi-process run (jax.distributed): from SLURM's
                                     variables, or an explicit coordinator / process count / id
    parallel.activate("auto" | N)    a 1-D Mesh ("data") over all devices (auto) or the first N;
                                     returns it (None for a single device: nothing is sharded)
    parallel.describe()              what results.json records about the devices used
    parallel.rows(tree) / replicated(tree) / fetch(tree) / is_writer()

Training shards the vmapped cross-validation jobs (folds x learning rates) over the mesh, or, for a
single convolutional job on the host driver, its batch (engine.py); parameters and the cached
training pool are replicated, which is what fits (a depth-0/1 pool is tens of MB). Dataset passes
(`batching.map_chunks`) shard each chunk's rows over the process's own devices. Nothing is
hand-written collective code: jit places each computation where its inputs are sharded (GSPMD),
and a gradient over a sharded batch is summed across devices by XLA.

The mesh is process-wide (like JAX's own device list): `activate` sets it, everything reads it.
Only process 0 writes run files (`is_writer`); every process computes the same results.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
_MESH: Mesh | None = None


# ----------------------------------------------------------------------------- many processes

def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process run once, before any JAX computation. Explicit arguments win; else a
    SLURM job step with more than one task (srun: SLURM_STEP_NUM_TASKS > 1; the batch script itself,
    a one-task step, is not one) is joined by JAX itself from the SLURM_* variables; else (one
    process) nothing happens. Returns whether the process is part of a multi-process run.

    CPU processes exchange collectives through gloo (ships with jaxlib; XLA:CPU needs one named)."""
    explicit = coordinator is not None
    if explicit and (num_processes is None or process_id is None):
        raise ValueError("parallel.initialize: a coordinator needs num_processes and process_id too")
    if not explicit and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return False
    if jax.distributed.is_initialized():
        return True
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # a JAX without the option: its default transport
        pass
    if explicit:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()      # JAX's SlurmCluster reads SLURM_* (coordinator: first node)
    return True


def is_writer() -> bool:
    """Process 0 writes run files, checkpoints and results; the others compute the same and
    write nothing (one file, one writer, whatever the file system)."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- the mesh

def _devices(spec) -> list:
    devs = jax.devices()
    if spec in (None, "auto"):
        return devs
    try:
        n = int(spec)
    except (TypeError, ValueError):
        raise ValueError(f"devices must be auto or a positive number, got {spec!r}") from None
    if not 1 <= n <= len(devs):
        raise ValueError(f"devices={n}: this run has {len(devs)} device(s) "
                         f"({devs[0].platform}; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                         "gives N)")
    if jax.process_count() > 1 and n != len(devs):
        raise ValueError(f"devices={n}: a multi-process run uses every device ({len(devs)}); use auto")
    return devs[:n]


def activate(spec="auto") -> Mesh | None:
    """Use `spec` devices ("auto": all, or a count) from now on; returns the Mesh (None for one)."""
    global _MESH
    devs = _devices(spec)
    _MESH = Mesh(np.array(devs), (AXIS,)) if len(devs) > 1 else None
    return _MESH


def mesh() -> Mesh | None:
    return _MESH


def size() -> int:
    return 1 if _MESH is None else _MESH.devices.size


def local_mesh() -> Mesh | None:
    """The active mesh's devices of this process (dataset passes run per process)."""
    if _MESH is None:
        return None
    local = [d for d in _MESH.devices.flat if d.process_index == jax.process_index()]
    return Mesh(np.array(local), (AXIS,)) if len(local) > 1 else None


def describe() -> dict:
    devs = list(_MESH.devices.flat) if _MESH is not None else jax.devices()[:1]
    return dict(count=len(devs), processes=jax.process_count(), platform=devs[0].platform,
                kind=devs[0].device_kind)


# ----------------------------------------------------------------------------- placing and fetching

def _put(tree, m: Mesh, spec: P):
    sharding = NamedSharding(m, spec)

    def one(a):
        if sharding.is_fully_addressable:
            return jax.device_put(a, sharding)
        # several processes: each supplies its own devices' parts of the (identical) host value
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree)


def rows(tree, m: Mesh | None = None):
    """The leading axis of every leaf sharded over the mesh (its length a multiple of its size)."""
    m = m or _MESH
    return tree if m is None else _put(tree, m, P(AXIS))


def replicated(tree, m: Mesh | None = None):
    m = m or _MESH
    return tree if m is None else _put(tree, m, P())


def fetch(tree):
    """numpy copies of device arrays, gathered from every process where they are spread over
    several (jax.device_get reads only what this process holds)."""
    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(one, tree)
