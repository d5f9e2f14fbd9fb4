"""TFDS's download-and-prepare of one builder, its failures turned into one line each.

What a user can fix is an `errors.UserError` with the fix in it: no network, a
manual file missing, a manual file whose bytes are not the registered ones, a
package the TFDS builders need. Anything else is a bug and keeps its traceback.

Shared by `python -m semimeta_jax.prepare` and a run with
`config.data.download=True` (`tfds_builders.get_builder`).
"""

import importlib.util
import os
import re
import socket
import urllib.parse

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from semimeta_jax import errors


class PreparationError(errors.UserError, RuntimeError):
  """A dataset could not be prepared: the message says which file or what is missing."""


# TFDS's `NonMatchingChecksumError` message: "Artifact URL, downloaded to PATH, has wrong checksum:
# * Expected: UrlInfo(size=..., checksum='...', filename='...') * Got: UrlInfo(...)".
_WRONG_CHECKSUM = re.compile(
    r'Artifact (?P<url>\S+), downloaded to (?P<path>.+?), has wrong checksum.*?'
    r'Expected: UrlInfo\(size=(?P<size>[^,]+), checksum=\'(?P<sha>[0-9a-f]+)\'.*?'
    r'Got: UrlInfo\(size=(?P<got_size>[^,]+), checksum=\'(?P<got_sha>[0-9a-f]+)\'', re.S)
# Errors of the network stack (requests, urllib3, sockets) end up here, maybe wrapped.
_NETWORK_ERRORS = ('ConnectionError', 'NewConnectionError', 'MaxRetryError', 'NameResolutionError',
                   'gaierror', 'Timeout', 'ConnectTimeout', 'ReadTimeout', 'SSLError', 'DownloadError')


def require_builder_packages():
  """One line if a package that TFDS's built-in builders import is not installed.

  TFDS finds a builder's registered checksums through `importlib_resources` (the
  PyPI backport, not the standard library's `importlib.resources`), which it does
  not install itself; requirements.txt does.
  """
  if importlib.util.find_spec('importlib_resources') is None:
    raise PreparationError(
        "TFDS's dataset builders need the package importlib_resources, which is not installed: "
        'pip install -r requirements.txt (or pip install importlib_resources).')


def _chain(error):
  """`error` and the errors it was raised from or during."""
  while error is not None:
    yield error
    error = error.__cause__ or error.__context__


def _network_error(error) -> bool:
  return any(type(e).__name__ in _NETWORK_ERRORS or isinstance(e, (ConnectionError, TimeoutError))
             for e in _chain(error))


def _wrong_file_message(error, name) -> str:
  match = _WRONG_CHECKSUM.search(str(error))
  if not match:
    return f'{name}: a downloaded or manual file is not the registered one: {str(error).splitlines()[0]}'
  return (f'{match["path"]} is not the file TFDS registers for {name} ({match["url"]}): its sha256 is '
          f'{match["got_sha"]} ({match["got_size"]} bytes), expected {match["sha"]} ({match["size"]} '
          'bytes); replace it with the original file, or remove it to download it.')


def download_and_prepare(builder, *, manual_dir=None):
  """Prepares `builder`'s dataset in its data_dir, downloading what is not already there.

  Files in `manual_dir` (default `<data_dir>/downloads/manual`) named as a
  download's registered file name are used instead of downloading it, after
  their checksum is checked; a finished earlier download is reused.

  Args:
    builder: a TFDS builder.
    manual_dir: the folder of manually downloaded files, or None.

  Raises:
    PreparationError: a missing package, no network for a file that must be
      downloaded, a manual file missing or with other bytes than the registered ones.
  """
  require_builder_packages()
  manual = epath.Path(manual_dir).expanduser() if manual_dir else None
  config = tfds.download.DownloadConfig(
      manual_dir=manual,
      # Prepared copies on Google Cloud Storage are probed first otherwise: a network round trip
      # (a long wait where there is none) for data that is prepared locally in seconds to minutes.
      try_download_gcs=False)
  where = f' nor in {manual}' if manual else ''
  unreachable = _first_unreachable(builder, manual)
  if unreachable:
    url, reason = unreachable
    raise PreparationError(
        f'cannot download {builder.name}: {urllib.parse.urlsplit(url).hostname} cannot be reached '
        f'({reason}), and {_filename(url, builder)} is not in '
        f'{epath.Path(builder.data_dir_root) / "downloads"}{where}. Put the files in a folder and '
        'pass it as --manual_dir, or run on a machine with a network.')
  try:
    builder.download_and_prepare(download_config=config)
  except tfds.core.download.download_manager.NonMatchingChecksumError as e:
    raise PreparationError(_wrong_file_message(e, builder.name)) from None
  except AssertionError as e:  # TFDS's "Manual directory ... does not exist or is empty".
    if 'anual dir' not in str(e):
      raise
    instructions = ' '.join(str(builder.MANUAL_DOWNLOAD_INSTRUCTIONS or '').split())
    folder = manual or 'the manual folder'
    raise PreparationError(
        f'{builder.name} is prepared from files you download yourself, and {folder} has none: '
        f'{instructions or "see its TFDS catalog page"}') from None
  except Exception as e:  # pylint: disable=broad-except
    if not _network_error(e):
      raise
    logging.info('Download of %s failed: %r', builder.name, e)
    files = _registered_file_names(builder)
    raise PreparationError(
        f'cannot download {builder.name} (no network?): {type(e).__name__}, and its files '
        f'({", ".join(files) or "see its TFDS catalog page"}) are not in '
        f'{epath.Path(builder.data_dir_root) / "downloads"}{where}. Put them in a folder and '
        'pass it as --manual_dir, or run on a machine with a network.') from None


def _registered_file_names(builder) -> list[str]:
  """The file names of the builder's registered downloads (empty where TFDS does not list them)."""
  try:
    infos = builder.url_infos or {}
  except Exception:  # pylint: disable=broad-except
    return []
  return sorted({info.filename for info in infos.values() if info.filename})


def _filename(url, builder) -> str:
  info = (builder.url_infos or {}).get(url)
  return info.filename if info and info.filename else url


def _first_unreachable(builder, manual):
  """(url, reason) when none of the builder's downloads is here and its first host cannot be reached.

  TFDS retries a failed connection with a backoff of about three and a half
  minutes in total; one connection attempt says at once that there is no network.
  The check is made only when not one registered download of the builder is in
  `manual` or finished in the download cache (a builder registers the downloads of
  all its configs, so with some files given, which are needed is known only to
  it), and it is left to the download itself behind a proxy.
  """
  if any(os.environ.get(v) for v in ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy')):
    return None
  try:
    infos = builder.url_infos or {}
  except Exception:  # pylint: disable=broad-except
    return None
  downloads = epath.Path(builder.data_dir_root) / 'downloads'
  resource = tfds.core.download.resource
  for url, info in infos.items():
    if (manual and info.filename and (manual / info.filename).exists()
        or resource.is_locally_cached(downloads / resource.get_dl_fname(url, info.checksum))):
      return None
  for url in sorted(infos):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ('http', 'https') or not parts.hostname:
      continue
    try:
      socket.create_connection(
          (parts.hostname, parts.port or (443 if parts.scheme == 'https' else 80)), timeout=15).close()
    except OSError as e:
      return url, f'{type(e).__name__}: {e}'
    return None
  return None
