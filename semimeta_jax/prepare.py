"""Prepares a dataset once, into the TFDS data_dir that runs then read.

Usage:
  python -m semimeta_jax.prepare DATASET --data_dir=DIR [--manual_dir=DIR] [--source_dir=DIR]

DATASET is any name a config can give as data.name: digits, fashion_mnist,
cifar10, cifar100, svhn_cropped (svhn), stl10, imagenet2012 (imagenet), or any
TFDS dataset name. Without --manual_dir the files are downloaded (a network is
needed, except for digits, and for fashion_mnist where its idx files are in
--source_dir); with it they are taken from that folder, named as the dataset's
downloads (cifar-10-binary.tar.gz, ...), and their registered checksums
checked. ImageNet is only prepared from ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in --manual_dir (default DIR/downloads/manual).

Then train with --config.data.data_dir=DIR. A missing network, missing or wrong
files are one line on stderr and exit code 2.
"""

import argparse
import os
import sys

# Before TensorFlow loads: its C++ start-up lines say nothing a user can act on.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

from semimeta_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m semimeta_jax.prepare', description=__doc__.split('\n\n', 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('dataset', help='data.name of the config: a built-in dataset or a TFDS name.')
  parser.add_argument('--data_dir', required=True, help='TFDS data_dir to prepare it in.')
  parser.add_argument('--manual_dir', default=None,
                      help="A folder of the dataset's files, downloaded by hand.")
  parser.add_argument('--source_dir', default=None,
                      help='fashion_mnist: the folder of its four idx files (default '
                           '/usr/share/datasets/fashion-mnist).')
  args = parser.parse_args(argv)
  cli.quiet_libraries()
  cli.import_tensorflow_quietly()
  with cli.user_errors_exit():
    from semimeta_jax.data import prepare  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if not sys.stderr.isatty():  # Progress bars are for a terminal, not for a log.
      tfds.disable_progress_bar()
    if args.manual_dir and not os.path.isdir(os.path.expanduser(args.manual_dir)):
      cli.fail(f'--manual_dir={args.manual_dir}: no such folder.')
    sizes = prepare.prepare(args.dataset, os.path.expanduser(args.data_dir),
                            manual_dir=args.manual_dir, source_dir=args.source_dir)
  counts = ', '.join(f'{count} {split}' for split, count in sizes.items())
  print(f'{args.dataset} is prepared in {args.data_dir} ({counts}); train with '
        f'--config.data.data_dir={args.data_dir}.')


if __name__ == '__main__':
  main(sys.argv[1:])
