"""ImageNet (ILSVRC 2012), 10% of the labels per class, ResNet-18, as the official ImageNet run.

The official run used 8 GPUs x 64 labeled + 64 unlabeled images with synchronised
batch norm; here the same global batch (512 + 512) is sharded over every device of
every host, and batch norm is global by construction.

The rows of the ImageNet table are presets declared beside each method
(`PRESETS['imagenet']` in semimeta_jax/methods/): `--config=configs/imagenet.py:co_training`.
`labeled_only`, `mean_teacher`, `co_training`, `semimeta` and `fully_supervised`
share this file's schedule unless their preset says otherwise. Epoch counts are in
passes over the unlabeled pool (90% of the train split, 2253 steps at batch 512);
a preset may set `num_epochs`, `warmup_epochs` and `rampup_epochs` (the ramp of the
consistency weight) in those units, and the step counts follow.

Memory of the two-network rows (ResNet-18, 224x224, 1000 classes): the compiled step's
temp + argument + output - alias bytes under XLA:CPU's buffer assignment, fitted as
fixed + per (labeled + unlabeled) pair from per-device batches 8+8 and 16+16 (a GPU's
figure will differ by its convolution workspaces):
  co_training   0.48 GiB + 0.279 GiB per pair: 18.3 GiB at the official 64+64 per
                device; the whole 512+512 on one device is about 143 GiB and does NOT
                fit 80 GB (about 270+270 does, as do 8 devices; `remat` untried).
  dual_student  0.27 GiB + 0.132 GiB per pair: 8.7 GiB at 64+64; about 68 GiB for
                512+512 on one device, within 80 GB but with little room.
"""

import math

from configs import default
from semimeta_jax import methods

NUM_TRAIN = 1_281_167  # ILSVRC 2012 train split.


def get_config(preset=None):
  """Returns the ImageNet configuration (paper: 44.87% top-1, 18.88% top-5 error), with a row's preset."""
  config = default.get_config()
  config.data.name = 'imagenet2012'
  config.data.label_fraction = 0.1
  config.model = 'resnet18'
  config.labeled_batch_size = 512
  config.unlabeled_batch_size = 512
  config.eval_batch_size = 1024

  # The official schedule is in epochs over the unlabeled pool: cosine decay with
  # 5 warm-up epochs, 600 epochs (the official script's default). The step counts
  # are references to the epoch fields, so `--config.num_epochs=90` updates them.
  config.num_epochs = 600
  config.warmup_epochs = 5
  config.rampup_epochs = 0  # The official ImageNet loss adds L_u at full weight.
  steps_per_epoch = math.ceil(NUM_TRAIN * (1 - config.data.label_fraction) / config.unlabeled_batch_size)
  config.steps_per_epoch = steps_per_epoch  # At the default batch; informative.
  config.lr_schedule = 'cosine'
  config.learning_rate = 0.1
  config.weight_decay = 1e-4
  config.num_train_steps = config.get_ref('num_epochs') * steps_per_epoch
  config.warmup_steps = config.get_ref('warmup_epochs') * steps_per_epoch
  config.consistency_rampup_steps = config.get_ref('rampup_epochs') * steps_per_epoch
  config.semimeta.mixup_alpha = 1.0

  config.eval_every_steps = 5 * steps_per_epoch
  config.checkpoint_every_steps = steps_per_epoch
  config.log_every_steps = 500
  config.half_precision = False  # True for bfloat16 activations on TPU / recent GPUs.
  return methods.apply_preset(config, 'imagenet', preset)
