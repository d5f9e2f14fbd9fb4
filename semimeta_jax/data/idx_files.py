"""The idx format of MNIST-style datasets (gzip-compressed), read and checked against known contents.

An idx file is a 4-byte magic (two zero bytes, the element type 0x08 = uint8,
the number of dimensions), one big-endian uint32 size per dimension, then the
elements in C order (LeCun's MNIST page). A file is identified by the sha256 of
its decompressed bytes, which stays the same whichever way it was compressed
(`zcat FILE | sha256sum` prints it).
"""

import gzip
import hashlib
import os
import zlib

import numpy as np

from semimeta_jax import errors

_UINT8 = 0x08


class IdxFileError(errors.UserError, ValueError):
  """An idx file is missing, damaged, or not the file expected: the message names it."""


def decompressed_bytes(path) -> bytes:
  """The decompressed content of the gzip file at `path`.

  Raises:
    IdxFileError: the file is missing, unreadable or not a complete gzip stream.
  """
  if not os.path.isfile(path):
    raise IdxFileError(f'{path}: no such file.')
  try:
    with gzip.open(path, 'rb') as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
    raise IdxFileError(f'{path} is damaged: not a complete gzip file ({type(e).__name__}: {e}).') from None


def parse(content: bytes, path='<bytes>') -> np.ndarray:
  """The uint8 array of an idx file's decompressed `content`.

  Raises:
    IdxFileError: the header is not a uint8 idx header or the size does not match it.
  """
  if len(content) < 4 or content[:2] != b'\0\0' or content[2] != _UINT8 or not content[3]:
    raise IdxFileError(f'{path} is not a uint8 idx file (magic {content[:4].hex() or "missing"}, '
                       'expected 0000 08 and a dimension count).')
  ndim = content[3]
  header = 4 + 4 * ndim
  if len(content) < header:
    raise IdxFileError(f'{path} is damaged: its header is cut short.')
  shape = tuple(int.from_bytes(content[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  expected = header + int(np.prod(shape))
  if len(content) != expected:
    raise IdxFileError(f'{path} is damaged: {len(content)} bytes, its header {shape} says {expected}.')
  return np.frombuffer(content, np.uint8, offset=header).reshape(shape)


def read_checked(path, sha256: str | None = None, shape=None) -> np.ndarray:
  """Reads a gzip idx file, checking its decompressed sha256 and its shape when given.

  Args:
    path: the .gz file.
    sha256: the hex sha256 its decompressed bytes must have, or None.
    shape: the array shape it must have, or None.

  Raises:
    IdxFileError: one line naming the file: missing, damaged, or other contents.
  """
  content = decompressed_bytes(path)
  array = parse(content, path)
  if shape is not None and array.shape != tuple(shape):
    raise IdxFileError(f'{path} holds an array of shape {array.shape}, expected {tuple(shape)}: '
                       'not the expected file.')
  if sha256 is not None:
    digest = hashlib.sha256(content).hexdigest()
    if digest != sha256:
      raise IdxFileError(f'{path} is not the expected file: its decompressed sha256 is {digest}, '
                         f'expected {sha256}.')
  return array


def write(path, array: np.ndarray):
  """Writes a uint8 array as a gzip idx file (for tests and tools)."""
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, _UINT8, array.ndim]) + b''.join(
      int(n).to_bytes(4, 'big') for n in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())
