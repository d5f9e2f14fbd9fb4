"""Faults in what a run reads: image-folder links, an edited split, a divergence, a stop request.

Unit-level: each seeds the fault in a temporary folder or workdir and checks the
one error or the behaviour, without training.
"""

import io
import json
import logging as std_logging
import os
import signal
import sys

import numpy as np
import pytest

from semimeta_jax import cli
from semimeta_jax import divergence
from semimeta_jax import errors
from semimeta_jax import library_log
from semimeta_jax import preemption
from semimeta_jax.data import folder
from semimeta_jax.data import splits
from tests.fault_helpers import outside_files
from tests.fault_helpers import tree_fingerprint

# --- Image folders: links followed only inside the dataset, never in a loop.


def _image(path, value):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((4, 4), value, np.uint8), mode='L').save(path)


def _small_folder(root):
  for split, count in (('train', 3), ('test', 2)):
    for label in ('a', 'b'):
      for i in range(count):
        _image(root / split / label / f'{i}.png', 10 * i + (label == 'b') * 100)
  return root


def _load(root):
  folder._CACHE.clear()  # pylint: disable=protected-access
  config = type('DataConfig', (), {'folder': str(root), 'image_size': 0, 'max_in_memory_gb': 1.0})
  return folder.load(config)


def test_a_class_folder_linking_back_to_its_split_is_a_loop_not_a_class(tmp_path):
  root = _small_folder(tmp_path / 'data')
  os.symlink('.', root / 'train' / 'loop')
  with pytest.raises(folder.FolderDataError) as error:
    _load(root)
  message = str(error.value)
  assert 'train/loop is a symbolic link' in message and 'loop' in message and '\n' not in message


@pytest.mark.parametrize('link, target', [
    ('train/a/again', '.'),  # A class folder holding a link to itself.
    ('train/a/sub/again', '.'),
    ('train/a/sub/up', '..'),
    ('unlabeled/again', '.'),
], ids=['class-to-itself', 'subfolder-to-itself', 'subfolder-to-parent', 'unlabeled-to-itself'])
def test_a_folder_linking_to_itself_or_a_folder_above_is_a_loop(tmp_path, link, target):
  root = _small_folder(tmp_path / 'data')
  _image(root / 'unlabeled' / 'u.png', 5)
  (root / link).parent.mkdir(parents=True, exist_ok=True)
  os.symlink(target, root / link)
  with pytest.raises(folder.FolderDataError) as error:
    _load(root)
  message = str(error.value)
  assert f'{link} is a symbolic link' in message and 'loop' in message and '\n' not in message


@pytest.mark.parametrize('where', ['train/a/deeper', 'train/a/x.png', 'unlabeled'])
def test_a_link_out_of_the_dataset_is_refused_naming_it(tmp_path, where):
  root = _small_folder(tmp_path / 'data')
  elsewhere = outside_files(tmp_path)
  _image(elsewhere / 'stray.png', 7)
  before = tree_fingerprint(elsewhere)
  os.symlink(elsewhere / 'stray.png' if where.endswith('.png') else elsewhere, root / where)
  with pytest.raises(folder.FolderDataError, match=f'{where} is a symbolic link .* leads out'):
    _load(root)
  assert tree_fingerprint(elsewhere) == before


def test_links_inside_the_dataset_are_followed(tmp_path):
  root = _small_folder(tmp_path / 'data')
  plain = _load(root)
  os.makedirs(root / 'pool')
  os.rename(root / 'train' / 'b' / '2.png', root / 'pool' / '2.png')
  os.symlink(os.path.join('..', '..', 'pool', '2.png'), root / 'train' / 'b' / '2.png')
  linked = _load(root)
  np.testing.assert_array_equal(linked.train_images, plain.train_images)
  np.testing.assert_array_equal(linked.train_labels, plain.train_labels)


def test_an_empty_class_folder_is_named_in_a_warning(tmp_path, caplog):
  root = _small_folder(tmp_path / 'data')
  (root / 'train' / 'c').mkdir()
  with caplog.at_level(std_logging.WARNING):
    data = _load(root)
  assert data.class_names == ('a', 'b')
  assert any('train/c' in r.getMessage() and 'empty' in r.getMessage() for r in caplog.records)


def test_an_empty_train_class_that_test_has_is_refused(tmp_path):
  root = _small_folder(tmp_path / 'data')
  (root / 'train' / 'c').mkdir()
  _image(root / 'test' / 'c' / '0.png', 50)
  with pytest.raises(folder.FolderDataError, match=r"train/ class folder\(s\) \['c'\] hold no images"):
    _load(root)


# --- The labeled split: verified on every resume.


def _labels():
  return np.random.default_rng(0).permutation(np.repeat(np.arange(10), 30))


def _load_split(workdir, labels):
  return splits.load_or_draw(str(workdir), labels, dataset='d', num_classes=10, num_labels=50,
                             label_fraction=0.0, seed=3, num_train=300)


@pytest.mark.parametrize('labels_at_hand', [True, False])
def test_an_edited_split_file_is_refused_on_resume(tmp_path, labels_at_hand):
  labels = _labels()
  drawn = _load_split(tmp_path, labels)
  path = tmp_path / splits.SPLIT_FILENAME
  saved = json.loads(path.read_text())
  swapped = next(i for i in range(300) if i not in set(drawn.tolist()))
  saved['indices'] = sorted(saved['indices'][1:] + [swapped])  # One labeled example swapped.
  path.write_text(json.dumps(saved))
  with pytest.raises(splits.SplitMismatchError) as error:
    _load_split(tmp_path, labels if labels_at_hand else (lambda: labels))
  message = str(error.value)
  assert str(path) in message and 'edited or damaged' in message and '\n' not in message


def test_an_unchanged_split_resumes_and_one_without_checksum_is_drawn_again_to_check(tmp_path):
  labels = _labels()
  drawn = _load_split(tmp_path, labels)
  np.testing.assert_array_equal(_load_split(tmp_path, lambda: labels), drawn)
  path = tmp_path / splits.SPLIT_FILENAME
  saved = json.loads(path.read_text())
  del saved['sha256']  # A file from before checksums: checked by drawing again.
  path.write_text(json.dumps(saved))
  calls = []
  np.testing.assert_array_equal(_load_split(tmp_path, lambda: calls.append(1) or labels), drawn)
  assert calls == [1]


def test_a_split_file_that_is_not_json_is_one_line(tmp_path):
  (tmp_path / splits.SPLIT_FILENAME).write_bytes(b'\x00\xff')
  with pytest.raises(errors.UserError, match='labeled_indices.json cannot be read as UTF-8'):
    _load_split(tmp_path, _labels())


# --- The advice after a divergence.


def test_a_learning_rate_orders_of_magnitude_too_large_is_said_plainly():
  rate, why = divergence.advised_learning_rate(1e4, [])
  assert rate <= 1.0  # Not 1e3: that diverges again.
  assert '5 orders of magnitude' in why
  assert f'--config.learning_rate={rate:g} ' in divergence.advice(1e4, [])


def _rows(losses, norms):
  return [{'step': 10 * (i + 1), 'train/loss': loss, 'train/grad_norm': norm}
          for i, (loss, norm) in enumerate(zip(losses, norms))]


@pytest.mark.parametrize('losses, norms, factor', [
    ([2.3, 1.9, 1.5], [1.0, 1.1, 0.9], 10),  # Falling, then one jump: a tenth.
    ([2.3, 3.5, 9.0], [1.0, 2.0, 5.0], 100),  # Rising before the end: an instability.
    ([2.3, 2.2, 2.1], [1.0, 30.0, 500.0], 100),  # Gradients blowing up.
    ([], [], 100),  # Never finite.
])
def test_the_advice_follows_where_the_run_diverged(losses, norms, factor):
  rows = _rows(losses, norms) + [{'step': 99, 'train/loss': None}]
  rate, why = divergence.advised_learning_rate(0.1, rows)
  assert rate == pytest.approx(0.1 / factor)
  assert why


# --- A stop request outside the training loop.


def test_a_sigterm_before_the_loop_is_remembered_and_honoured_at_the_first_step():
  previous = signal.getsignal(signal.SIGTERM)
  try:
    preemption.remember_termination()
    os.kill(os.getpid(), signal.SIGTERM)  # Would kill the test process without the handler.
    assert preemption.termination_requested()
    with preemption.PreemptionGuard() as guard:
      assert guard.should_stop(1)
    assert not preemption.termination_requested()  # Consumed by the guard.
    os.kill(os.getpid(), signal.SIGTERM)  # After the loop: remembered again, still not fatal.
    assert preemption.termination_requested()
  finally:
    signal.signal(signal.SIGTERM, previous)
    preemption._TERMINATION_REQUESTED['value'] = False  # pylint: disable=protected-access


def test_a_sigterm_after_the_last_check_is_passed_on_when_the_guard_closes():
  # E.g. while the final checkpoint is written: the loop asks the guard no more.
  previous = signal.getsignal(signal.SIGTERM)
  try:
    preemption.remember_termination()
    with preemption.PreemptionGuard() as guard:
      assert not guard.should_stop(4)
      os.kill(os.getpid(), signal.SIGTERM)
      assert not preemption.termination_requested()  # The guard's to report while it watches.
    assert preemption.termination_requested()
    preemption._TERMINATION_REQUESTED['value'] = False  # pylint: disable=protected-access
    with preemption.PreemptionGuard() as guard:  # Acted on: the stop is already reported.
      os.kill(os.getpid(), signal.SIGTERM)
      assert guard.should_stop(2)
    assert not preemption.termination_requested()
  finally:
    signal.signal(signal.SIGTERM, previous)
    preemption._TERMINATION_REQUESTED['value'] = False  # pylint: disable=protected-access


# --- One line for a full disk; library noise off the terminal.


def test_a_full_disk_anywhere_is_one_line_and_exit_code_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    with cli.user_errors_exit():
      raise OSError(28, 'No space left on device', '/runs/x/events.out.tfevents')
  assert exit_info.value.code == 2
  lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error: ')]
  assert lines == ['error: No space left on device writing /runs/x/events.out.tfevents: free '
                   'space (or fix the cause) and rerun the same command; it resumes from the '
                   'last checkpoint.']


def test_other_os_errors_stay_tracebacks():
  with pytest.raises(FileNotFoundError):
    with cli.user_errors_exit():
      raise FileNotFoundError(2, 'No such file or directory', 'x')


def test_the_router_sends_noise_to_the_workdir_log_and_the_run_s_lines_to_the_terminal(tmp_path):
  terminal = io.StringIO()
  workdir = tmp_path / 'run'
  router = library_log._Router(str(workdir), terminal)  # pylint: disable=protected-access
  router.write('early noise\n')  # No workdir yet: kept.
  workdir.mkdir()
  router.write('Traceback (most recent call last):\nRuntimeError: Event loop is closed\n')
  with library_log.to_terminal():
    router.write('error: the one line\n')
  router.finish()
  assert terminal.getvalue() == 'error: the one line\n'
  assert (workdir / library_log.LOG_FILE).read_text() == (
      'early noise\nTraceback (most recent call last):\nRuntimeError: Event loop is closed\n')


def test_the_router_writes_kept_noise_to_a_workdir_that_appeared_without_more_noise(tmp_path):
  terminal = io.StringIO()
  workdir = tmp_path / 'run'
  router = library_log._Router(str(workdir), terminal)  # pylint: disable=protected-access
  router.write('a progress bar while the data set is built\n')
  workdir.mkdir()
  router.finish()
  assert terminal.getvalue() == ''
  assert (workdir / library_log.LOG_FILE).read_text() == 'a progress bar while the data set is built\n'


def test_the_router_shows_kept_noise_at_exit_when_no_workdir_appeared(tmp_path):
  terminal = io.StringIO()
  router = library_log._Router(str(tmp_path / 'never'), terminal)  # pylint: disable=protected-access
  router.write('noise of a run refused before its workdir\n')
  router.finish()
  assert terminal.getvalue() == 'noise of a run refused before its workdir\n'
  assert not (tmp_path / 'never').exists()
  assert sys.stderr is not router
