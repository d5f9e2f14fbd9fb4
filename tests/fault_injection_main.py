"""`python -m semimeta_jax.main` with one fault injected, for tests that need a process of their own.

Usage (from the repository root):
  python -m tests.fault_injection_main FAULT --config=... --workdir=... [--config.FIELD=VALUE ...]

FAULT is one of:
  none                     no fault: the command as a user runs it.
  no_space                 every checkpoint commit fails as on a full disk (ENOSPC).
  sigterm_in_final_save    SIGTERM arrives while the last checkpoint is being written.
  sigterm_before_training  SIGTERM arrives while the checkpoints are being read, before step 1.
  sigterm_in_last_save     SIGTERM arrives while the last step's checkpoint is being started,
                           with the training loop's preemption guard still installed.
  tmp_link_out             before the save of step 4, its temporary directory is planted as a
                           link to $SEMIMETA_OUTSIDE_DIR (a folder outside the workdir).
"""

import errno
import os
import signal
import sys


def _inject_no_space():
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  async def no_space(self):
    raise OSError(errno.ENOSPC, 'No space left on device', str(self.get() / 'commit_success.txt'))

  atomicity.AtomicRenameTemporaryPath.finalize = no_space


def _sigterm_self():
  os.kill(os.getpid(), signal.SIGTERM)


def _inject_sigterm_in_final_save():
  from semimeta_jax import checkpoint  # pylint: disable=g-import-not-at-top
  close = checkpoint.Checkpointer.close

  def close_after_sigterm(self):
    _sigterm_self()  # The loop is over; the last save is still being written.
    close(self)

  checkpoint.Checkpointer.close = close_after_sigterm


def _inject_sigterm_before_training():
  from semimeta_jax import checkpoint  # pylint: disable=g-import-not-at-top
  restore = checkpoint.Checkpointer.restore_newest_intact

  def restore_after_sigterm(self, target_state):
    _sigterm_self()
    return restore(self, target_state)

  checkpoint.Checkpointer.restore_newest_intact = restore_after_sigterm


def _inject_sigterm_in_last_save():
  from semimeta_jax import checkpoint  # pylint: disable=g-import-not-at-top
  save = checkpoint.Checkpointer.save

  def save_after_sigterm(self, step, state, **kwargs):
    if int(step) == 4:  # The last step of the fault tests' runs.
      _sigterm_self()
    return save(self, step, state, **kwargs)

  checkpoint.Checkpointer.save = save_after_sigterm


def _inject_tmp_link_out():
  from semimeta_jax import checkpoint  # pylint: disable=g-import-not-at-top
  save = checkpoint.Checkpointer.save

  def save_into_a_planted_link(self, step, state, **kwargs):
    if int(step) == 4:
      self.directory.mkdir(parents=True, exist_ok=True)
      os.symlink(os.environ['SEMIMETA_OUTSIDE_DIR'],
                 os.fspath(self.directory / f'{int(step)}.orbax-checkpoint-tmp'))
    return save(self, step, state, **kwargs)

  checkpoint.Checkpointer.save = save_into_a_planted_link


_FAULTS = {
    'none': lambda: None,
    'no_space': _inject_no_space,
    'sigterm_in_final_save': _inject_sigterm_in_final_save,
    'sigterm_before_training': _inject_sigterm_before_training,
    'sigterm_in_last_save': _inject_sigterm_in_last_save,
    'tmp_link_out': _inject_tmp_link_out,
}


def main():
  fault = sys.argv.pop(1)
  _FAULTS[fault]()
  from absl import app  # pylint: disable=g-import-not-at-top
  from semimeta_jax import cli  # pylint: disable=g-import-not-at-top
  from semimeta_jax import main as main_module  # pylint: disable=g-import-not-at-top
  app.run(main_module.main, flags_parser=cli.parse_flags_or_exit)


if __name__ == '__main__':
  main()
