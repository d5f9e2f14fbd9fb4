"""The Fashion-MNIST results table: each method over several seeds, on 10,000 test images.

The protocol (configs/fashion_mnist.py): 1000 labels, 100 per class, drawn per seed; the whole
training set as the unlabeled pool; 1000 training images held out as a validation split
(stratified, per seed); the 10,000 test images. Each run is `python -m semimeta_jax.main
--config=configs/fashion_mnist.py` with the variant's overrides, in its own process, into
`<out>/<variant>/seed_<k>`; a finished run of the same config is reused, so the command resumes
where it stopped. The runs' machinery and the table are the digits table's
(`experiments/digits_results.py`), on Fashion-MNIST's presets (digits', with the image-scale
fields replaced: `methods.PRESETS_FROM`). The table reports the final test error, the median of
the last 20 evaluations and the test error at the evaluation of lowest validation error, and
each run's wall time.

  python -m semimeta_jax.prepare fashion_mnist --data_dir=~/tensorflow_datasets   # once
  python -m experiments.fashion_mnist_results --out=results/fashion_mnist --seeds=0,1,2 \\
      --variants=labeled_only,fully_supervised,mean_teacher,vat_ent,semimeta,semimeta_jvp

Runs go one after the other; to use both of 2 cores, start two commands with disjoint
--variants (or --seeds) and the same --out. `--override=--config.num_train_steps=20` makes a
smoke run (give it its own --out).
"""

import sys

from experiments import digits_results

DATASET = 'fashion_mnist'
# The rows the benchmark reports first; any other variant of `digits_results.variants` works.
DEFAULT_VARIANTS = 'labeled_only,fully_supervised,mean_teacher,vat_ent,semimeta,semimeta_jvp'


def main(argv=None):
  digits_results.main(
      argv, dataset=DATASET, description=__doc__,
      defaults={'variants': DEFAULT_VARIANTS, 'seeds': '0,1,2', 'validation_size': 1000})


if __name__ == '__main__':
  main(sys.argv[1:])
