"""A hostile workdir: links to files elsewhere and records that are not what they should be.

Each test seeds the fault, checks the one error (a `UserError`, one line, naming
the file) and that nothing outside the workdir changed.
"""

import json
import os

import pytest

from semimeta_jax import errors
from semimeta_jax import metrics
from semimeta_jax import run_dir
from semimeta_jax import workdir_files
from semimeta_jax import workdir_lock
from tests.conftest import tiny_config
from tests.fault_helpers import outside_files
from tests.fault_helpers import tree_fingerprint


def assert_one_line(error, *names):
  message = str(error.value)
  assert isinstance(error.value, errors.UserError), type(error.value)
  assert '\n' not in message, message
  for name in names:
    assert name in message, (name, message)


@pytest.fixture
def elsewhere(tmp_path):
  folder = outside_files(tmp_path)
  before = tree_fingerprint(folder)
  yield folder
  assert tree_fingerprint(folder) == before  # Nothing outside the workdir changed.


@pytest.mark.parametrize('name', ['LOCK', 'summary.json', 'metrics.jsonl.tmp', 'config.json.tmp',
                                  'checkpoints'])
def test_a_link_out_of_the_workdir_is_refused_before_anything_is_written(tmp_path, elsewhere, name):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  target = elsewhere if name == 'checkpoints' else elsewhere / 'precious.txt'
  os.symlink(target, workdir / name)
  before = tree_fingerprint(workdir)
  with pytest.raises(workdir_files.WorkdirFileError) as error:
    workdir_lock.WorkdirLock(workdir, enabled=True).acquire()
  assert_one_line(error, str(workdir / name), 'symbolic link')
  assert tree_fingerprint(workdir) == before


def test_a_link_deep_in_the_checkpoints_is_found_too(tmp_path, elsewhere):
  deep = tmp_path / 'run' / 'checkpoints' / '3' / 'state'
  deep.mkdir(parents=True)
  os.symlink(elsewhere / 'precious.txt', deep / 'manifest.ocdbt')
  with pytest.raises(workdir_files.WorkdirFileError) as error:
    workdir_files.check_workdir(tmp_path / 'run')
  assert_one_line(error, 'checkpoints/3/state/manifest.ocdbt')


@pytest.mark.parametrize('link, target', [
    ('checkpoints', '../elsewhere'),
    ('checkpoints/3/manifest.ocdbt', '../../../elsewhere/precious.txt'),
    ('checkpoints/3/x', '../../checkpoints/../../elsewhere'),
], ids=['folder', 'deep-file', 'dotdot-chain'])
def test_a_relative_link_out_is_resolved_and_refused(tmp_path, elsewhere, link, target):
  # A relative target is read from the link's folder: joined without resolving '..', it
  # would look like a path inside the workdir.
  workdir = tmp_path / 'run'
  (workdir / link).parent.mkdir(parents=True, exist_ok=True)
  os.symlink(target, workdir / link)
  before = tree_fingerprint(workdir)
  with pytest.raises(workdir_files.WorkdirFileError) as error:
    workdir_lock.WorkdirLock(workdir, enabled=True).acquire()
  assert_one_line(error, str(workdir / link), 'symbolic link', target)
  assert tree_fingerprint(workdir) == before


def test_a_relative_link_inside_the_workdir_is_accepted(tmp_path):
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '3').mkdir(parents=True)
  os.symlink('../checkpoints/./3', workdir / 'checkpoints' / 'latest')
  workdir_files.check_workdir(workdir)


def test_a_lock_hard_linked_to_a_file_elsewhere_leaves_that_file_as_it_was(tmp_path, elsewhere,
                                                                           caplog):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  os.link(elsewhere / 'LOCK', workdir / 'LOCK')
  lock = workdir_lock.WorkdirLock(workdir, enabled=True).acquire()
  try:
    assert os.stat(workdir / 'LOCK').st_nlink == 1
    assert json.loads((workdir / 'LOCK').read_text())['pid'] == os.getpid()
  finally:
    lock.release()
  assert 'hard link' in caplog.text
  assert "not the run's to write" not in caplog.text  # The other file's content is not shown.
  assert not (workdir / 'LOCK').exists()


def test_records_replaced_through_links_inside_replace_the_link_not_its_target(tmp_path, elsewhere):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('the user\'s notes\n')
  # Links that stay inside pass the check, and are never written through.
  os.symlink('notes.txt', workdir / 'summary.json')
  os.symlink('notes.txt', workdir / 'metrics.jsonl.tmp')
  (workdir / 'metrics.jsonl').write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n')
  workdir_files.check_workdir(workdir)
  metrics.write_summary(str(workdir), {'steps': 2}, enabled=True)
  metrics.drop_rows_after(str(workdir), 1, enabled=True)
  assert (workdir / 'notes.txt').read_text() == 'the user\'s notes\n'
  assert not (workdir / 'summary.json').is_symlink()
  assert json.loads((workdir / 'summary.json').read_text()) == {'steps': 2}
  assert metrics.read_rows(str(workdir)) == [{'step': 1, 'a': 1.0}]


def test_appending_to_a_metrics_file_that_is_a_link_is_refused(tmp_path, elsewhere):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'old.jsonl').write_text('')
  os.symlink('old.jsonl', workdir / 'metrics.jsonl')
  with pytest.raises(workdir_files.WorkdirFileError) as error:
    metrics.MetricWriter(str(workdir), enabled=True)
  assert_one_line(error, str(workdir / 'metrics.jsonl'), 'symbolic link')


def test_a_lock_file_that_is_a_link_inside_is_refused_and_its_target_kept(tmp_path, elsewhere):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"seed": 0}')
  os.symlink('config.json', workdir / 'LOCK')
  with pytest.raises(workdir_files.WorkdirFileError) as error:
    workdir_lock.WorkdirLock(workdir, enabled=True).acquire()
  assert_one_line(error, str(workdir / 'LOCK'))
  assert (workdir / 'config.json').read_text() == '{"seed": 0}'


@pytest.mark.parametrize('content, expected', [
    (b'\xff\xfe not utf-8', 'UTF-8'),
    (b'[1, 2, 3]', 'JSON list, not an object'),
    (b'{"seed": 0', 'not valid JSON'),
    (None, 'Is a directory'),
])
def test_a_config_record_that_cannot_be_read_is_one_line(tmp_path, content, expected):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  path = workdir / 'config.json'
  if content is None:
    path.mkdir()
  else:
    path.write_bytes(content)
  with pytest.raises(errors.UserError) as error:
    run_dir.check_config(str(workdir), tiny_config())
  assert_one_line(error, str(path), expected)


def test_a_record_that_is_a_directory_is_refused_when_the_workdir_is_taken(tmp_path):
  workdir = tmp_path / 'run'
  (workdir / 'metrics.jsonl').mkdir(parents=True)
  before = tree_fingerprint(workdir)
  with pytest.raises(workdir_files.WorkdirFileError) as error:
    workdir_lock.WorkdirLock(workdir, enabled=True).acquire()
  assert_one_line(error, str(workdir / 'metrics.jsonl'), 'not a regular file')
  assert tree_fingerprint(workdir) == before


@pytest.mark.parametrize('rows', ['5\n{"step": 1}\n', b'{"step": 1}\n\xff\n'])
def test_metrics_rows_that_are_not_objects_or_not_text_are_one_line(tmp_path, rows):
  path = tmp_path / 'metrics.jsonl'
  path.write_bytes(rows if isinstance(rows, bytes) else rows.encode())
  with pytest.raises(errors.UserError) as error:
    metrics.read_rows(str(tmp_path))
  assert_one_line(error, str(path))


def test_a_workdir_that_cannot_be_created_is_one_line():
  with pytest.raises(workdir_files.WorkdirFileError) as error:
    workdir_lock.WorkdirLock('/proc/semimeta_run', enabled=True).acquire()
  assert_one_line(error, '/proc/semimeta_run', 'cannot be created')


def test_a_kept_config_copy_is_never_written_through_a_link(tmp_path, elsewhere):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  run_dir.record_config(str(workdir), tiny_config(), 0)
  # A link inside where the copy of the replaced config would go.
  (workdir / 'mine.json').write_text('mine')
  os.symlink('mine.json', workdir / 'config.5.json')
  changed = tiny_config(log_every_steps=7)
  run_dir.record_config(str(workdir), changed, 5)  # The copy goes to config.5.1.json instead.
  assert (workdir / 'mine.json').read_text() == 'mine'
  assert json.loads((workdir / 'config.5.1.json').read_text())['log_every_steps'] != 7
  assert json.loads((workdir / 'config.json').read_text())['log_every_steps'] == 7


def test_a_refused_first_run_leaves_no_workdir_even_with_library_noise_logged(tmp_path):
  workdir = tmp_path / 'run'
  with workdir_lock.WorkdirLock(workdir, enabled=True):
    (workdir / workdir_files.LIBRARY_LOG).write_text('a library traceback\n')
  assert not workdir.exists()
  # A workdir holding the run's records keeps them all, the library log included.
  with workdir_lock.WorkdirLock(workdir, enabled=True):
    (workdir / workdir_files.LIBRARY_LOG).write_text('a library traceback\n')
    (workdir / 'config.json').write_text('{}')
  assert sorted(os.listdir(workdir)) == ['config.json', workdir_files.LIBRARY_LOG]
