"""Your own images: `--config.data.folder=ROOT` (ROOT/train/<class>/*, ROOT/test/<class>/*,
optional ROOT/unlabeled/*).

The classes are the folder names of ROOT/train (sorted). Images are resized to
`data.image_size` x `data.image_size` (32 here; 0 keeps their size, which must then
be the same for all). Normalisation statistics are computed from the labeled images
and saved in the workdir (`normalization.json`). When ROOT/unlabeled/ exists, the
unlabeled stream draws from it alone, and `data.num_labels=-1` labels every train
image. A half-width ConvLarge (input-size agnostic) and the official SemiMeta recipe
shortened to 20k steps; for larger images try `--config.model=wrn28_2` or `resnet18`.

  python -m semimeta_jax.main --config=configs/folder.py --config.data.folder=ROOT \
      --config.data.num_labels=-1 --workdir=runs/mine
"""

from configs import default


def get_config():
  """Returns the image-folder configuration."""
  config = default.get_config()
  config.data.name = 'folder'  # Informational: data.folder selects the dataset.
  config.data.image_size = 32
  config.data.num_labels = -1  # Every train image labeled (set a class-balanced budget to hide some).
  config.data.augment_kind = 'pad_crop'
  config.model = 'convlarge'
  config.model_width = 64
  config.labeled_batch_size = 64
  config.unlabeled_batch_size = 64
  config.eval_batch_size = 256
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.num_train_steps = 20_000
  config.warmup_steps = 500
  config.lr_decay_boundaries = (15_000, 18_000)
  config.consistency_rampup_steps = 2000
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 2000
  return config
