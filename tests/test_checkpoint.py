"""Tests for semimeta_jax.checkpoint: save/restore, keep-N, shardings, checksums, damage, save failures."""

import chex
import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from semimeta_jax import checkpoint
from semimeta_jax import state as state_lib


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))


def _make_state(*, use_ema=False, seed=0):
  model = _MLP()
  params = model.init(jax.random.key(seed), jnp.ones((1, 4)))['params']
  return state_lib.TrainState.create(
      apply_fn=model.apply, params=params, batch_stats={},
      tx=optax.sgd(0.1, momentum=0.9), rng=jax.random.key(seed + 1),
      use_ema=use_ema)


def _advance(state, n=1):
  """Takes n optimizer steps with a fixed non-zero gradient (fills the momentum)."""
  for _ in range(n):
    grads = jax.tree.map(jnp.ones_like, state.params)
    state = state.apply_gradients(grads=grads, batch_stats=state.batch_stats, ema_decay=0.5)
  return state


def _leaves(state):
  return checkpoint._saved_fields(state)  # pylint: disable=protected-access


@pytest.mark.parametrize('use_ema', [False, True])
def test_round_trip_restores_every_field(tmp_path, use_ema):
  state = _advance(_make_state(use_ema=use_ema), 2)
  with checkpoint.Checkpointer(tmp_path, keep=2) as ckpt:
    assert ckpt.save(2, state)
    ckpt.wait_until_finished()
    fresh = _make_state(use_ema=use_ema, seed=7)
    restored = ckpt.restore(fresh)
  chex.assert_trees_all_equal(_leaves(restored), _leaves(state))
  assert (restored.ema_params is None) == (not use_ema)
  assert int(restored.step) == 2
  # Static fields come from the target, not the checkpoint.
  assert restored.tx is fresh.tx and restored.apply_fn is fresh.apply_fn


def test_keeps_last_n_and_reports_latest(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # A relative workdir, as on a command line.
  state = _make_state()
  with checkpoint.Checkpointer('run', keep=2) as ckpt:
    assert ckpt.latest_step() is None
    for step in (10, 20, 30, 40):
      state = _advance(state)
      ckpt.save(step, state)
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 40
    assert ckpt.all_steps() == [30, 40]
    chex.assert_trees_all_equal(_leaves(ckpt.restore(_make_state())), _leaves(state))
    with pytest.raises(FileNotFoundError):
      ckpt.restore(_make_state(), step=10)


def test_existing_step_is_skipped_unless_forced(tmp_path):
  first, second = _advance(_make_state()), _advance(_make_state(), 3)
  with checkpoint.Checkpointer(tmp_path, keep=3) as ckpt:
    assert ckpt.save(5, first)
    assert not ckpt.save(5, second)
    ckpt.wait_until_finished()
    chex.assert_trees_all_equal(_leaves(ckpt.restore(_make_state())), _leaves(first))
    assert ckpt.save(5, second, force=True)
    ckpt.wait_until_finished()
    chex.assert_trees_all_equal(_leaves(ckpt.restore(_make_state())), _leaves(second))
    assert ckpt.all_steps() == [5]


def test_restore_keeps_replicated_mesh_sharding(tmp_path):
  devices = jax.devices()[:2]
  assert len(devices) == 2
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = _advance(_make_state(use_ema=True), 2)
  with checkpoint.Checkpointer(tmp_path, keep=1) as ckpt:
    ckpt.save(2, state)
    ckpt.wait_until_finished()
    target = jax.device_put(_make_state(use_ema=True, seed=3), replicated)
    restored = ckpt.restore(target)
  for leaf in jax.tree.leaves(_leaves(restored)):
    assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
    assert set(leaf.sharding.device_set) == set(devices)
  chex.assert_trees_all_equal(_leaves(restored), _leaves(state))


def test_restart_after_failed_run_restores_last_good_step(tmp_path):
  state = _make_state()
  good = {}
  with checkpoint.Checkpointer(tmp_path, keep=5) as ckpt:
    for step in (1, 2):
      state = _advance(state)
      good[step] = state
      ckpt.save(step, state)
  # Step 3 went non-finite, so the loop never saved it; the process then died
  # in the middle of writing, leaving a temporary directory behind.
  unfinished = tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp-1234'
  unfinished.mkdir()
  # A reader (another run may be writing) restores without touching it.
  with checkpoint.Checkpointer(tmp_path, keep=5, read_only=True) as reader:
    assert reader.latest_step() == 2
    chex.assert_trees_all_equal(_leaves(reader.restore(_make_state())), _leaves(good[2]))
  assert unfinished.exists()
  # The writer that resumes removes it.
  with checkpoint.Checkpointer(tmp_path, keep=5) as ckpt:
    assert ckpt.latest_step() == 2
    restored = ckpt.restore(_make_state())
  assert not unfinished.exists()
  chex.assert_trees_all_equal(_leaves(restored), _leaves(good[2]))
