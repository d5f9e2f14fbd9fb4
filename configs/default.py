"""Defaults shared by every configuration: the official SemiMeta CIFAR-10 recipe.

Dataset configs import this file and override a few fields. Any field can be changed
on the command line, e.g. `--config.hypergrad.mode=exact --config.seed=3`. A method's own
fields come from its module (`semimeta_jax/methods/`), as one block per method.
"""

import ml_collections

from semimeta_jax import methods


def get_config():
  """Returns the default configuration (official CIFAR-10 hyperparameters)."""
  config = ml_collections.ConfigDict()

  # One of semimeta_jax.methods.METHOD_NAMES (semimeta_jax/methods/). `supervised` with
  # data.num_labels=-1 is the fully-supervised baseline.
  config.method = 'semimeta'
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = 'cifar10'
  # TFDS data_dir; None = TFDS's default (~/tensorflow_datasets). A placeholder, so
  # that `--config.data.data_dir=PATH` can set it.
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  config.data.download = False  # True lets TFDS download and prepare (needs internet).
  config.data.num_labels = 4000  # Total labeled examples, class-balanced; -1 = every label.
  config.data.label_fraction = 0.0  # If > 0, overrides num_labels with a per-class fraction.
  config.data.unlabeled_includes_labeled = False  # Whether the unlabeled pool keeps the labeled examples.
  # Examples held out of the training pool (neither labeled nor unlabeled) and evaluated at every
  # evaluation as val/ metrics, for choosing a step without looking at the test set; 0 = none.
  config.data.validation_size = 0
  config.data.augment = True  # Per-dataset training augmentation (data/device_augment.py; ImageNet: data/augment.py).
  config.data.prefetch_batches = 2
  # The strong view of the unlabeled rows (data/randaugment.py), built only for a method that reads
  # it (FixMatch family, MPL's UDA): RandAugment as USB uses it, then Cutout.
  config.data.randaugment = ml_collections.ConfigDict()
  config.data.randaugment.num_ops = 3  # Ops per image, drawn with replacement from the 14.
  # -1: each op's value uniform in its range (USB); m in [0, max_magnitude]: every op at magnitude m (UDA, MPL).
  config.data.randaugment.magnitude = -1.0
  config.data.randaugment.max_magnitude = 30.0
  config.data.randaugment.cutout = 0.5  # Largest Cutout side, a fraction of the image side (0 = none).
  config.data.pad_mode = 'constant'  # Pad-and-crop padding: constant (zeros, official) | reflect.
  config.data.image_size = 224  # ImageNet crop size; data.folder: resize to NxN (0 = keep, sizes must match).
  # A folder of images replaces data.name: ROOT/train/<class>/*, ROOT/test/<class>/* and an optional
  # ROOT/unlabeled/* that the unlabeled stream then draws from alone (data/folder.py). A
  # placeholder, so that `--config.data.folder=PATH` can set it.
  config.data.folder = ml_collections.config_dict.placeholder(str)
  # Training augmentation of a folder or of a TFDS dataset by name (the named datasets have their
  # own): pad_crop | pad_crop_flip (mirror-symmetric classes) | none. A dataset too large to keep
  # on the devices is streamed with ImageNet's random-resized crops instead.
  config.data.augment_kind = 'pad_crop'
  # Any TFDS image-classification dataset can be named in data.name (data/tfds_by_name.py). Its
  # features and splits ('' = the dataset's own: train and test; ImageNet: validation):
  config.data.image_key = 'image'
  config.data.label_key = 'label'
  config.data.train_split = ''  # Any TFDS split expression, e.g. 'train[:90%]'.
  config.data.test_split = ''  # e.g. 'train[90%:]' for a held-out validation share.
  config.data.unlabeled_split = ''  # A split of unlabeled images (STL-10: 'unlabelled', SVHN: 'extra').
  # Training images (uint8, the unlabeled split's included) up to this size are kept on every
  # device and batched there; a larger dataset is streamed from its TFDS records.
  config.data.max_in_memory_gb = 4.0
  config.data.shuffle_buffer = 16384  # ImageNet record shuffle buffer (in-memory sets need none).

  # Global batch sizes (over all devices of all processes).
  config.labeled_batch_size = 128
  config.unlabeled_batch_size = 128
  config.eval_batch_size = 256

  config.model = 'convlarge'  # convlarge | convlarge_digits | resnet18 | resnet50 | wrn28_2
  config.model_width = 0  # Base channel count; 0 = the model's own default.
  config.dropout_rate = 0.5  # Channel dropout of ConvLarge (PyTorch Dropout2d).
  config.half_precision = False  # bfloat16 activations (TPU/GPU); parameters stay float32.
  # What a training forward keeps for its backward pass: none (every activation) | batch_norm
  # (each batch norm's input only; the normalisation is recomputed). Same values, less memory.
  config.remat = 'none'
  config.zero_init_residual = False  # ResNets: zero the last BN scale of each residual block.

  # SGD with momentum and coupled L2 weight decay, as the official optimizer.
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.lr_schedule = 'step'  # step (warm-up, then x lr_decay_factor at each boundary) | cosine
  config.warmup_steps = 4000
  config.lr_decay_boundaries = (300_000, 350_000)
  config.lr_decay_factor = 0.1
  config.num_train_steps = 400_000

  # The consistency weight of the semi-supervised methods.
  config.consistency_weight = 1.0  # w in w(t) = w * min(1, t / rampup).
  config.consistency_rampup_steps = 4000
  config.consistency_rampup = 'linear'  # linear (SemiMeta) | sigmoid (Pi-model / Mean Teacher papers)

  # Every registered method's and option's own block (e.g. config.vat.epsilon), its defaults
  # and their meaning beside its math in semimeta_jax/methods/.
  for name, block in methods.config_blocks().items():
    config[name] = block

  # Loop.
  config.log_every_steps = 100
  config.eval_every_steps = 400
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  # Several processes without JAX's preemption service compare their SIGTERM flags every N
  # steps: an all-gather that waits for the devices, so not every step.
  config.preemption_check_every_steps = 10
  # Steps the host may dispatch ahead of the devices: enough to keep them busy, few enough that
  # a preemption's save and the progress reports follow the devices closely.
  config.max_steps_in_flight = 2
  config.allow_config_change = False  # Resume a workdir whose saved config differs.
  return config
