"""Data parallelism: one `jax.jit` program over a device mesh with a `data` axis.

The train state is replicated and every batch is sharded along its leading axis
over all devices of all processes. Steps are written for the *global* batch: XLA's
SPMD partitioner splits them and inserts the collectives, so batch-norm statistics,
the labeled-loss gradient that the hypergradient needs, and the pseudo-label update
are all computed over the global batch and the result does not depend on the
device count. (This is what `jax.pmap` itself compiles to since JAX 0.8; there is
no separate pmap path.)
"""

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from semimeta_jax import errors

DATA_AXIS = 'data'


class BatchSizeError(errors.UserError, ValueError):
  """A global batch size that does not divide over the devices."""


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named `data` over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of the train state: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The sharding of a batch: split along the leading (example) axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_sizes(batch_sizes: dict[str, int], mesh: Mesh, process_count: int | None = None):
  """Fails before any compute unless every global batch divides over the devices.

  Every process has the same number of local devices, so a batch that divides
  over all devices also gives each process a share that divides over its own.

  Args:
    batch_sizes: config field name -> global batch size.
    mesh: the device mesh.
    process_count: number of processes feeding data (default: jax.process_count()).

  Raises:
    BatchSizeError: naming the field, its value, and the counts it must divide by.
  """
  process_count = jax.process_count() if process_count is None else process_count
  num_devices = mesh.devices.size
  local_devices = num_devices // process_count
  for name, size in batch_sizes.items():
    if size <= 0:
      raise BatchSizeError(f'config.{name}={size} must be positive.')
    if size % num_devices:
      raise BatchSizeError(
          f'config.{name}={size} does not divide over the {num_devices} devices of the mesh '
          f'({process_count} process(es) x {local_devices} local device(s)); use a multiple of '
          f'{num_devices}.')


def to_global(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles the global batch from every process's host-local numpy share.

  Each process passes its own rows (its `1 / process_count` of the global batch);
  the result is one `jax.Array` per leaf, sharded `P('data')` over the mesh.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def jit_replicated_init(init_fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """Compiles `init_fn` so its outputs are created directly replicated over the mesh.

  Building the state inside `jit` with replicated outputs gives the same values on
  every process without a host round trip or an explicit broadcast.
  """
  return jax.jit(init_fn, out_shardings=replicated(mesh))


def jit_train_step(step_fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """`jax.jit` of `step_fn(state, batch) -> (state, metrics)` over the mesh.

  The state is replicated and donated (updated in place), the batch is sharded
  along examples, and the metrics come back replicated.
  """
  return jax.jit(step_fn,
                 in_shardings=(replicated(mesh), batch_sharded(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)),
                 donate_argnums=0)


def jit_eval_step(eval_fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """`jax.jit` of `eval_fn(state, batch) -> sums` with a replicated state and sharded batch."""
  return jax.jit(eval_fn,
                 in_shardings=(replicated(mesh), batch_sharded(mesh)),
                 out_shardings=replicated(mesh))
