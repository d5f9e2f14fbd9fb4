"""Fashion-MNIST (28x28 grayscale, 10 classes): the benchmark whose test set can tell methods apart.

The protocol: 1000 labels (100 per class, drawn per seed), the whole training set as the
unlabeled pool (`unlabeled_includes_labeled`), 1000 training images held out as a validation
split (stratified, per seed), the 10,000 test images (a 15% error has a standard error of 0.36
points there). The idx files are read from `data.source_dir` (by default where the Debian/Ubuntu
package dataset-fashion-mnist puts them; docs/data.md says how to get them elsewhere).

The model and the schedule are chosen so that one run of any row takes at most about 12 minutes
on one of the development machine's 2 CPU cores:

  * ConvLarge at width 16 (an eighth of the official 128; 28x28 inputs keep its VALID conv):
    measured pinned to one core while the machine carried other work (load ~3.5 on 2 cores),
    64 labeled + 64 unlabeled images: SemiMeta 0.38 s a step (jvp 0.41 s), VAT+Ent 0.40 s,
    Mean Teacher 0.27 s, a supervised step 0.11 s; one evaluation of the 10,000 test and 1000
    validation images 5.4 s. Width 32 costs about 4x as much (1.6 s a SemiMeta step).
  * digits' schedule (configs/digits.py: 1000 steps, warm-up 100, decays at 700 and 900,
    ramps over 200), so that every method's digits preset carries over with only its
    image-scale fields replaced (`methods.PRESETS_FROM`): `--config=configs/fashion_mnist.py:NAME`.
  * an evaluation every 25 steps: 40 in a run, so that the median of the last 20 covers the
    second half of training (every 50 would put step 50's near-chance error into it).

So a SemiMeta run is about 1000 x 0.41 + 40 x 5.4 + 45 s of start-up (preparing and loading the
data, compiling) = about 11 minutes at that load; a heavier load stretches it (the same
fully supervised run took 9 minutes at load ~8).

Channel dropout 0.1 after each pool, not the official 0.5: at width 16 a rate of 0.5 drops half
of 16 feature maps, and the network underfits. Fully supervised (59,000 labels, about one epoch
in 1000 steps, seed 0, one core): validation error 16.70% and test error 16.68% at dropout 0.1
(training accuracy 84% at the end), against 21.00% and 21.75% at 0.5 (76%); chosen on the
validation error.

  python -m semimeta_jax.prepare fashion_mnist --data_dir=~/tensorflow_datasets    # once, offline
  python -m semimeta_jax.main --config=configs/fashion_mnist.py:vat_ent --workdir=runs/fm_vat_ent
  python -m experiments.fashion_mnist_results --out=results/fashion_mnist --seeds=0,1,2
"""

from configs import default
from semimeta_jax import methods


def get_config(preset=None):
  """Returns the Fashion-MNIST configuration, with a method's preset applied if one is named."""
  config = default.get_config()
  config.data.name = 'fashion_mnist'
  # The folder of the four idx files (the Debian/Ubuntu package's by default).
  config.data.source_dir = '/usr/share/datasets/fashion-mnist'
  config.data.num_labels = 1000
  config.data.unlabeled_includes_labeled = True
  config.data.validation_size = 1000
  config.model = 'convlarge'
  config.model_width = 16
  config.dropout_rate = 0.1  # Width 16: 0.5 underfits (above).
  config.labeled_batch_size = 64
  config.unlabeled_batch_size = 64
  config.eval_batch_size = 500  # Divides the 10,000 test and 1000 validation images.
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.num_train_steps = 1000
  config.warmup_steps = 100
  config.lr_decay_boundaries = (700, 900)
  config.consistency_rampup_steps = 200
  config.log_every_steps = 50
  config.eval_every_steps = 25
  config.checkpoint_every_steps = 250
  return methods.apply_preset(config, 'fashion_mnist', preset)
