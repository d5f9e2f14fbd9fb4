"""Tests for semimeta_jax.workdir_lock: one owner per run directory."""

import json
import os
import socket
import subprocess
import sys

import pytest

from semimeta_jax import errors
from semimeta_jax import workdir_lock


def test_a_second_owner_is_refused_with_the_holder_named(tmp_path):
  workdir = tmp_path / 'run'
  with workdir_lock.WorkdirLock(workdir, enabled=True):
    record = json.loads((workdir / 'LOCK').read_text())
    assert record['pid'] == os.getpid() and record['host'] == socket.gethostname()
    with pytest.raises(workdir_lock.WorkdirLockedError) as error:
      workdir_lock.WorkdirLock(workdir, enabled=True).acquire()
    assert isinstance(error.value, errors.UserError)
    assert f'pid {os.getpid()} on host {socket.gethostname()}' in str(error.value)
  # Released: the lock file is gone, and so is the directory the lock created.
  assert not workdir.exists()


def test_a_lock_held_by_another_process_is_refused(tmp_path):
  code = ('import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); '
          'os.write(fd, b\'{"host": "h", "pid": 1, "started": "t"}\'); fcntl.flock(fd, fcntl.LOCK_EX); '
          'print("locked", flush=True); time.sleep(60)')
  holder = subprocess.Popen([sys.executable, '-c', code, str(tmp_path / 'LOCK')],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir_lock.WorkdirLockedError, match='pid 1 on host h'):
      workdir_lock.WorkdirLock(tmp_path, enabled=True).acquire()
  finally:
    holder.kill()
    holder.wait()
  # Its owner was killed: the kernel dropped the flock, and the lock is taken over.
  with workdir_lock.WorkdirLock(tmp_path, enabled=True):
    assert json.loads((tmp_path / 'LOCK').read_text())['pid'] == os.getpid()
  assert sorted(os.listdir(tmp_path)) == []  # An existing workdir is kept, only the lock goes.


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  stale = {'host': socket.gethostname(), 'pid': int(dead.stdout), 'started': 'earlier'}
  (tmp_path / 'LOCK').write_text(json.dumps(stale))
  (tmp_path / 'config.json').write_text('{}')
  with workdir_lock.WorkdirLock(tmp_path, enabled=True):
    assert json.loads((tmp_path / 'LOCK').read_text())['pid'] == os.getpid()
  assert sorted(os.listdir(tmp_path)) == ['config.json']


def test_processes_other_than_the_owner_skip_the_lock(tmp_path):
  with workdir_lock.WorkdirLock(tmp_path, enabled=True):
    # Process 1 of the same job: shares the workdir, takes nothing.
    with workdir_lock.WorkdirLock(tmp_path, enabled=False):
      assert (tmp_path / 'LOCK').exists()
