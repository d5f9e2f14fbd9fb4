"""Tests for semimeta_jax.checkpoint: save/restore, keep-N, shardings, checksums, damage, save failures."""

import errno
import os
import pathlib
import shutil
import threading
import time

import chex
import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity
import pytest

from semimeta_jax import checkpoint
from tests import conftest
from tests import fault_helpers
from semimeta_jax import state as state_lib
from semimeta_jax.methods import ema


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
      extra={'ema': ema.init_state(None, params, {})} if use_ema else None)


def _advance(state, n=1):
  """Takes n optimizer steps with a fixed non-zero gradient (fills the momentum)."""
  for _ in range(n):
    grads = jax.tree.map(jnp.ones_like, state.params)
    state = state.apply_gradients(grads=grads, batch_stats=state.batch_stats)
    if 'ema' in state.extra:
      state = state.replace(extra={'ema': ema.update(state.extra['ema'], state.params, {}, 0.5)})
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
  assert ('ema' in restored.extra) == use_ema
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
  devices = conftest.cpu_devices(2)
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


class _WideMLP(nn.Module):
  """Big enough (a 64x256 kernel) that overwritten bytes land in raw array data."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(256)(x)))


def _wide_state(seed=0):
  model = _WideMLP()
  params = model.init(jax.random.key(seed), jnp.ones((1, 64)))['params']
  return state_lib.TrainState.create(
      apply_fn=model.apply, params=params, batch_stats={},
      tx=optax.sgd(0.1, momentum=0.9), rng=jax.random.key(seed + 1))


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / 'state').rglob('*') if p.parent.name == 'd'),
             key=lambda p: p.stat().st_size)


def _overwrite_random_bytes(step_dir):
  path = _largest_data_file(step_dir)
  size = path.stat().st_size
  with open(path, 'r+b') as f:
    f.seek(size // 2)
    f.write(np.random.default_rng(0).bytes(64))
  assert path.stat().st_size == size


def _truncate(path):
  os.truncate(path, path.stat().st_size // 2)


def _empty(path):
  shutil.rmtree(path)
  path.mkdir()


_FAULTS = {
    # (damage, what the one-line report says)
    'random bytes in a data file': (_overwrite_random_bytes, 'does not match its checksum'),
    'truncated data file': (lambda d: _truncate(_largest_data_file(d)), 'arrays are unreadable'),
    'truncated _METADATA': (lambda d: _truncate(d / 'state' / '_METADATA'), 'arrays are unreadable'),
    'emptied item directory': (lambda d: _empty(d / 'state'), 'arrays are unreadable'),
    'truncated checksum record': (lambda d: _truncate(d / 'checksums' / 'metadata'),
                                  'checksum record is unreadable'),
}


def _tree_files(directory):
  return {p.relative_to(directory): p.read_bytes() for p in directory.rglob('*') if p.is_file()}


@pytest.mark.parametrize('fault', sorted(_FAULTS))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_restored(tmp_path, fault, caplog):
  damage, report = _FAULTS[fault]
  states = {1: _advance(_wide_state(), 1), 2: _advance(_wide_state(), 2)}
  with checkpoint.Checkpointer(tmp_path, keep=3) as ckpt:
    for step, state in states.items():
      ckpt.save(step, state)
  directory = tmp_path / 'checkpoints'
  intact = _tree_files(directory / '1')
  damage(directory / '2')
  damaged = _tree_files(directory / '2')
  with checkpoint.Checkpointer(tmp_path, keep=3) as ckpt:
    with pytest.raises(checkpoint.CorruptCheckpointError, match=f'Checkpoint 2 .*{report}'):
      ckpt.restore(_wide_state(seed=5), step=2)
    restored, step = ckpt.restore_newest_intact(_wide_state(seed=5))
    assert step == 1 and ckpt.all_steps() == [1]
  chex.assert_trees_all_equal(_leaves(restored), _leaves(states[1]))
  lines = [r.getMessage() for r in caplog.records if 'Checkpoint 2' in r.getMessage()]
  assert len(lines) == 1 and report in lines[0] and '\n' not in lines[0], lines
  # Nothing is deleted: the damaged checkpoint is kept aside as it was, the intact one untouched.
  assert sorted(p.name for p in directory.iterdir()) == ['1', 'corrupt.2']
  assert _tree_files(directory / 'corrupt.2') == damaged
  assert _tree_files(directory / '1') == intact


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
  with checkpoint.Checkpointer(tmp_path, keep=3) as ckpt:
    ckpt.save(1, _wide_state())
  _overwrite_random_bytes(tmp_path / 'checkpoints' / '1')
  with checkpoint.Checkpointer(tmp_path, keep=3) as ckpt:
    with pytest.raises(checkpoint.NoIntactCheckpointError,
                       match=r'No intact checkpoint .*1 \(damaged: .*checksum\).*starts this run over'):
      ckpt.restore_newest_intact(_wide_state())
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['corrupt.1']


def test_a_state_of_another_structure_is_a_config_error_not_damage(tmp_path):
  with checkpoint.Checkpointer(tmp_path, keep=3) as ckpt:
    ckpt.save(1, _make_state())
    with pytest.raises(checkpoint.CheckpointMismatchError, match='model or optimizer config changed'):
      ckpt.restore_newest_intact(_wide_state())
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']  # Not set aside: it is intact.


def _fail_writes(monkeypatch):
  """Makes the commit of every save fail as on a full disk, once its arrays are written."""
  async def no_space(self):
    raise OSError(errno.ENOSPC, 'No space left on device', str(self.get() / 'commit_success.txt'))
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', no_space)


@pytest.mark.parametrize('async_save', [True, False])
def test_a_failed_save_names_its_step_and_cause_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, async_save):
  first = _advance(_make_state(), 1)
  ckpt = checkpoint.Checkpointer(tmp_path, keep=1, async_save=async_save)
  ckpt.save(1, first)
  ckpt.check_save(block=True)
  _fail_writes(monkeypatch)
  with pytest.raises(checkpoint.CheckpointSaveError) as error:
    ckpt.save(2, _advance(first))
    ckpt.check_save(block=True)
  ckpt.close()  # Does not raise the same error again.
  message = str(error.value)
  assert message.startswith('Saving checkpoint 2 ') and '\n' not in message
  assert 'No space left on device' in message and 'checkpoint 1 is intact' in message
  monkeypatch.undo()
  # Space freed: a rerun removes the unfinished save and resumes from the last complete one.
  with checkpoint.Checkpointer(tmp_path, keep=1) as ckpt:
    restored, step = ckpt.restore_newest_intact(_make_state())
  assert step == 1
  chex.assert_trees_all_equal(_leaves(restored), _leaves(first))
  assert os.listdir(tmp_path / 'checkpoints') == ['1']


def _lingering_threads(before):
  """Live non-daemon threads started since `before`: each would keep the process from exiting."""
  return [t for t in threading.enumerate() if t.is_alive() and not t.daemon and t not in before]


@pytest.mark.parametrize('async_save', [True, False])
def test_a_save_whose_directory_cannot_be_made_fails_leaving_no_thread_behind(tmp_path,
                                                                             async_save):
  # A link planted where the save's temporary directory goes (to a folder elsewhere): created in
  # a background thread, orbax's writer threads waited 300 s for that directory's signal.
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  before = set(threading.enumerate())
  ckpt = checkpoint.Checkpointer(tmp_path / 'run', keep=1, async_save=async_save)
  os.symlink(elsewhere, tmp_path / 'run' / 'checkpoints' / '2.orbax-checkpoint-tmp')
  started = time.monotonic()
  with pytest.raises(checkpoint.CheckpointSaveError, match='Saving checkpoint 2 .*symbolic link'):
    ckpt.save(2, _advance(_make_state()))
    ckpt.check_save(block=True)
  ckpt.close()
  deadline = time.monotonic() + 10
  while _lingering_threads(before) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert _lingering_threads(before) == []
  assert time.monotonic() - started < 30
  assert os.listdir(elsewhere) == []


def test_a_full_disk_puts_the_system_s_reason_first(tmp_path):
  # Orbax's own error on a real full disk: a ValueError naming every path before the reason,
  # which a message cut at 300 characters lost.
  model = _MLP()
  params = model.init(jax.random.key(0), jnp.ones((1, 100_000)))['params']  # 2 MB of kernel.
  state = state_lib.TrainState.create(apply_fn=model.apply, params=params, batch_stats={},
                                      tx=optax.sgd(0.1, momentum=0.9), rng=jax.random.key(1))
  with fault_helpers.small_filesystem(tmp_path / 'disk', '1m') as disk:
    ckpt = checkpoint.Checkpointer(disk / 'run', keep=1)
    with pytest.raises(checkpoint.CheckpointSaveError) as error:
      ckpt.save(1, state)
      ckpt.check_save(block=True)
    ckpt.close()
  message = str(error.value)
  assert '\n' not in message, message
  assert message.startswith(f'Saving checkpoint 1 in {disk / "run" / "checkpoints"} failed: '
                            'No space left on device ('), message


def test_a_checkpoint_from_before_checksums_still_restores(tmp_path):
  state = _advance(_make_state(), 2)
  # The layout of the previous version: one unnamed item, no checksums.
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    manager.save(2, args=ocp.args.StandardSave(_leaves(state)))
  with checkpoint.Checkpointer(tmp_path, keep=3) as ckpt:
    restored, step = ckpt.restore_newest_intact(_make_state(seed=4))
    assert step == 2
    chex.assert_trees_all_equal(_leaves(restored), _leaves(state))
    ckpt.save(3, _advance(restored))  # The run goes on in the new layout.
    ckpt.wait_until_finished()
    assert ckpt.restore_newest_intact(_make_state())[1] == 3
