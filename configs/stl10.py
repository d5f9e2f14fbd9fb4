"""STL-10: 5,000 labeled 96x96 images and the 100,000 of its `unlabelled` split, WRN-28-2.

The standard benchmark with a truly unlabeled pool: the labeled stream reads the
train split (every label: `num_labels=-1`), the unlabeled stream reads only the
`unlabelled` split. STL-10 has no statistics registered here, so the labeled
images' are computed when the run starts and saved in the workdir. At 2.9 GB
(uint8) the training images stay on every device (`data.max_in_memory_gb`).
Random 12-pixel translations and flips (an eighth of the side, as usual for
STL-10), the official SemiMeta optimizer and meta step, 200k steps.

  python -m semimeta_jax.prepare stl10 --data_dir=~/tensorflow_datasets   # downloads it, once
  python -m semimeta_jax.main --config=configs/stl10.py --workdir=runs/stl10
"""

from configs import default
from semimeta_jax import methods


def get_config(preset=None):
  """Returns the STL-10 configuration."""
  config = default.get_config()
  config.data.name = 'stl10'  # Any TFDS image-classification name works (data/tfds_by_name.py).
  config.data.unlabeled_split = 'unlabelled'
  config.data.num_labels = -1  # The 5,000 labeled images; a class-balanced budget hides some.
  config.data.image_size = 96  # The stored size: no resize.
  config.data.augment_kind = 'pad_crop_flip'
  config.model = 'wrn28_2'
  config.labeled_batch_size = 64
  config.unlabeled_batch_size = 64  # Mix-up pairs labeled and unlabeled examples one to one.
  config.eval_batch_size = 256
  config.num_train_steps = 200_000
  config.lr_decay_boundaries = (150_000, 175_000)
  config.weight_decay = 5e-4
  return methods.apply_preset(config, 'stl10', preset)
