"""What the fault tests share: a fingerprint of a file tree, to show that nothing outside changed,
and a small file system to fill."""

import contextlib
import hashlib
import os
import pathlib
import subprocess


def tree_fingerprint(root) -> dict[str, str]:
  """{relative path: what it is} of every entry under `root`, links not followed.

  A file is its content's SHA-256, a link its target, a folder 'dir': two equal
  fingerprints mean nothing was written, removed, created or re-pointed.
  """
  root = pathlib.Path(root)
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = pathlib.Path(dirpath) / name
      key = str(path.relative_to(root))
      if path.is_symlink():
        out[key] = 'link:' + os.readlink(path)
      elif path.is_dir():
        out[key] = 'dir'
      else:
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def outside_files(tmp_path) -> pathlib.Path:
  """A folder of files that a run must never write: what hostile links in a workdir point to."""
  elsewhere = pathlib.Path(tmp_path) / 'elsewhere'
  elsewhere.mkdir()
  for name in ('LOCK', 'summary.json', 'metrics.jsonl', 'config.json', 'precious.txt'):
    (elsewhere / name).write_text(f'{name}: not the run\'s to write\n')
  return elsewhere


@contextlib.contextmanager
def small_filesystem(directory, size: str):
  """A tmpfs of `size` (e.g. '3m') mounted at `directory`: a real full disk, with the system's
  own errors. Skips the test where mounting is not allowed (needs root, or CAP_SYS_ADMIN)."""
  import pytest  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(directory)],
                           capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip(f'cannot mount a {size} tmpfs to fill (needs root): {mounted.stderr.strip()}')
  try:
    yield directory
  finally:
    subprocess.run(['umount', '-l', str(directory)], check=False)
