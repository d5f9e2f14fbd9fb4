"""Device-resident training input: the split on the devices, batches made inside `jit`.

For in-memory datasets (digits, CIFAR-10/100, SVHN, registered arrays) the uint8
training split, its labels and the streams' index pools are placed once on
every device of the mesh (replicated: CIFAR's split is 150 MB). A compiled
function then computes the global batch at any step from (seed, step) alone:
indices (`sampling.py`), gather, augmentation (`device_augment.py`) and
normalisation, with the rows sharded `P('data')` so that each device gathers and
augments only its own rows. Nothing crosses the host-device link per step but
the step number, and nothing here imports TensorFlow.

Streamed datasets (ImageNet) arrive as host-local uint8 batches; `Prefetcher`
ships them to the devices a few steps ahead and normalises them there.
"""

import collections
import dataclasses
import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from semimeta_jax import parallel
from semimeta_jax.data import device_augment
from semimeta_jax.data import sampling
from semimeta_jax.data import strong_view as strong_view_lib


@dataclasses.dataclass(frozen=True)
class Stream:
  """One training stream of an in-memory dataset.

  Attributes:
    pool: train indices the stream draws from (at least one).
    global_batch: examples per step over all processes.
    order_seed: seed of the per-epoch permutations.
    augment_seed: seed of the augmentation draws.
    has_labels: whether the batches carry 'label' (False for a truly unlabeled
      pool, whose rows have none: methods then compute no accuracy on them).
  """
  pool: np.ndarray
  global_batch: int
  order_seed: int
  augment_seed: int
  has_labels: bool = True


def put_replicated(array: np.ndarray, mesh) -> jax.Array:
  """A full copy of a host array on every device of `mesh` (all processes pass the same array)."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, parallel.replicated(mesh),
                                      lambda index: array[index])


def _make_batch(arrays, orders, step, *, streams, augment_kind, pad, pad_mode, mean, std, rows,
                strong_view):
  """The global batch at `step` of every stream (traced inside `jit`).

  `orders[name]` holds the epoch orders the stream's batch reads (`EpochOrders`).
  `strong_view` (a `StrongView` or None) adds the unlabeled rows' 'strong_image'.
  """
  out = {}
  for name, stream in streams.items():
    index = sampling.batch_indices_from_orders(jnp.stack(orders[name]), step, stream.global_batch)
    # Each device gathers and augments only its own rows of the batch.
    index = jax.lax.with_sharding_constraint(index, rows)
    key = jax.random.fold_in(jax.random.key(stream.augment_seed), step)
    gathered = arrays['images'][index]
    images = device_augment.augment(gathered, key, augment_kind, pad, pad_mode)
    # 'index' (the train-split index) lets a method keep per-example state (Temporal Ensembling).
    out[name] = {'image': device_augment.normalize(images, mean, std),
                 'index': index.astype(jnp.int32)}
    if name == 'unlabeled' and strong_view is not None:
      strong = strong_view_lib.make(gathered, key, strong_view, augment_kind=augment_kind, pad=pad,
                                    pad_mode=pad_mode)
      out[name]['strong_image'] = device_augment.normalize(strong, mean, std)
    if stream.has_labels:
      out[name]['label'] = arrays['labels'][index]
  return out


def device_batches(images, labels, streams: dict[str, Stream], mesh, *, spec, augment_kind: str,
                   pad_mode: str, strong_view=None) -> Callable[[int], dict]:
  """Places the split on the mesh; returns `batch(step)`, the global batch at `step`.

  Args:
    images: uint8 [N, H, W, C] training split (the same in every process).
    labels: int [N] training labels.
    streams: {'labeled': Stream, ('unlabeled': Stream)}.
    mesh: the device mesh.
    spec: the `DatasetSpec` (normalisation, padding).
    augment_kind: 'pad_crop_flip', 'pad_crop' or 'none'.
    pad_mode: 'constant' or 'reflect'.
    strong_view: a `strong_view.StrongView`, or None: the unlabeled stream's batches then carry
      no 'strong_image'.

  Returns:
    `batch(step) -> {stream: {'image': float32 [B, H, W, C], 'label': int32 [B],
    'index': int32 [B]}}` ('index': each example's train-split index; the unlabeled
    stream's 'strong_image' float32 [B, H, W, C] when `strong_view` is given)
    of jax.Arrays sharded `P('data')`; step 0 is the first batch of a run.
  """
  arrays = {
      'images': put_replicated(np.asarray(images, np.uint8), mesh),
      'labels': put_replicated(np.asarray(labels, np.int32), mesh),
      'pools': {name: put_replicated(np.asarray(s.pool, np.int32), mesh)
                for name, s in streams.items()},
  }
  sharded = parallel.batch_sharded(mesh)
  make = functools.partial(
      _make_batch, streams=streams, augment_kind=augment_kind, pad=spec.pad, pad_mode=pad_mode,
      mean=tuple(spec.mean), std=tuple(spec.std), rows=sharded, strong_view=strong_view)
  compiled = jax.jit(make, out_shardings=sharded)
  orders = {name: EpochOrders(arrays['pools'][name], stream, mesh) for name, stream in streams.items()}
  # A Python int is a weakly typed int32 argument: one compilation serves every step.
  return lambda step: compiled(arrays, {name: o.for_step(int(step)) for name, o in orders.items()},
                               int(step))


class EpochOrders:
  """The per-epoch orders of one stream, each computed once on the devices and kept while read.

  A batch reads at most `epochs_touched` consecutive epochs; permuting them at
  every step (a sort of the whole pool) cost a GPU more than the rest of the
  batch. The orders are `sampling.epoch_order`'s, a function of (seed, epoch), so
  a batch is still a pure function of (seed, step).
  """

  def __init__(self, pool: jax.Array, stream: Stream, mesh):
    self._pool, self._batch = pool, stream.global_batch
    self._size = pool.shape[0]
    self._touched = sampling.epochs_touched(self._size, self._batch)
    key = jax.random.key(stream.order_seed)
    self._order = jax.jit(functools.partial(sampling.epoch_order, key),
                          out_shardings=parallel.replicated(mesh))
    self._cache: dict[int, jax.Array] = {}

  def for_step(self, step: int) -> tuple[jax.Array, ...]:
    """The orders of epochs first .. first + epochs_touched - 1 of the batch at `step`."""
    first = step * self._batch // self._size
    for epoch in [e for e in self._cache if e < first]:
      del self._cache[epoch]  # Positions only move forward, except on a new run.
    wanted = range(first, first + self._touched)
    for epoch in wanted:
      if epoch not in self._cache:
        self._cache[epoch] = self._order(self._pool, epoch)
    return tuple(self._cache[epoch] for epoch in wanted)


def _normalize_batch(batch, step, *, mean, std, strong_view, seed):
  out = {name: {**part, 'image': device_augment.normalize(part['image'], mean, std)}
         for name, part in batch.items()}
  if strong_view is not None and 'unlabeled' in batch:
    # The host's crop is already in the image: the strong view adds RandAugment to it, with no
    # crop of its own ('none').
    key = jax.random.fold_in(jax.random.key(seed), step)
    strong = strong_view_lib.make(batch['unlabeled']['image'], key, strong_view, augment_kind='none',
                                  pad=0, pad_mode='constant')
    out['unlabeled']['strong_image'] = device_augment.normalize(strong, mean, std)
  return out


class Prefetcher:
  """Streamed batches shipped as uint8 to the devices ahead of the step, normalised there.

  `prefetcher(step)` returns the global batch at `step`; steps must be asked for
  in order from `start_step` (a stream is read sequentially). Keeping `size`
  batches in flight lets the host-to-device copies overlap the running steps.
  With a `strong_view`, the unlabeled rows' 'strong_image' is made there too: RandAugment
  of the host's crop, from (`strong_seed`, step).
  """

  def __init__(self, host_batches: Iterator[dict], mesh, *, spec, start_step: int, size: int = 2,
               strong_view=None, strong_seed: int = 0):
    self._host = host_batches
    self._mesh = mesh
    self._size = max(1, size)
    self._next_step = start_step
    self._queue = collections.deque()
    sharded = parallel.batch_sharded(mesh)
    self._normalize = jax.jit(
        functools.partial(_normalize_batch, mean=tuple(spec.mean), std=tuple(spec.std),
                          strong_view=strong_view, seed=strong_seed),
        in_shardings=(sharded, None), out_shardings=sharded)

  def _fill(self):
    while len(self._queue) < self._size:
      self._queue.append(parallel.to_global(next(self._host), self._mesh))

  def __call__(self, step: int) -> dict:
    if step != self._next_step:
      raise ValueError(f'Streamed input is sequential: asked for step {step}, the next one is '
                       f'{self._next_step}; build the input again to start elsewhere.')
    self._fill()
    batch = self._queue.popleft()
    self._next_step += 1
    self._fill()  # Starts the next copies before this batch's step runs.
    return self._normalize(batch, step)
