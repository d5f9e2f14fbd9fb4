"""Times one case of the official step: a fresh seeded model, warm-up steps, then timed steps.

The inputs are random and made once on the device, so a timed step is the official step without
its data loader; every timed step is awaited, so each time is one step's latency.
"""

import contextlib
import platform
import statistics
import time

import torch
from torch.distributions import Beta

from experiments.official_pytorch import models
# `steps` is also measure_case's count of timed steps; the module gets a distinct name.
from experiments.official_pytorch import steps as steps_lib

CASES = ('supervised', 'semimeta')
PRECISIONS = ('fp32', 'bf16')


def _synchronize(device: torch.device):
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def autocast_factory(precision: str, device: torch.device):
  """A zero-argument factory of the autocast context of `precision` ('fp32' or 'bf16')."""
  if precision == 'fp32':
    return contextlib.nullcontext
  if precision == 'bf16':
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
  raise ValueError(f'Unknown precision {precision!r}; expected one of {PRECISIONS}.')


def random_batch(batch_size: int, channels: int, image_size: int, num_classes: int,
                 device: torch.device, *, channels_last: bool = False, generator=None) -> dict:
  """Labeled + unlabeled batches of normal NCHW images and uniform labels, made on `device`."""
  def images():
    x = torch.randn(batch_size, channels, image_size, image_size, device=device, generator=generator)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
  labels = torch.randint(0, num_classes, (batch_size,), device=device, generator=generator)
  return {'label_img': images(), 'label_gt': labels, 'unlabel_img': images()}


def case_name(case: str, *, compiled: bool, sync_free: bool, mixup: bool = True) -> str:
  """The row label: 'supervised' or 'semimeta (official ...)', plus the variant."""
  if case == 'supervised':
    name = 'supervised'
  else:
    name = ('semimeta (finite difference, sync-free)' if sync_free
            else 'semimeta (official, finite difference)')
    if not mixup:
      name += ', no mix-up'
  return name + (' + torch.compile' if compiled else '')


def measure_case(case: str, *, precision: str, model_name: str = 'convlarge', model_width: int = 0,
                 batch_size: int = 128, image_size: int = 32, channels: int = 3,
                 num_classes: int = 10, steps: int = 20, warmup_steps: int = 3,
                 device=None, compiled: bool = False, sync_free: bool = False, mixup: bool = True,
                 mixup_alpha: float = 1.0, lr: float = 0.1, weight: float = 1.0,
                 epsilon: float = 1e-2, momentum: float = 0.9, weight_decay: float = 1e-4,
                 channels_last: bool = False, seed: int = 0) -> dict:
  """Builds a fresh model and optimizer, runs warm-up steps, then times `steps` steps.

  Args:
    case: 'supervised' or 'semimeta'.
    precision: 'fp32' or 'bf16' (autocast).
    model_name: 'convlarge' or 'resnet18'.
    model_width: first-stage width; 0 for the official one.
    batch_size: labeled batch size, and the unlabeled one (B_l = B_u, as mix-up pairs them).
    image_size: height = width of the square inputs.
    channels: image channels.
    num_classes: number of classes.
    steps: timed steps (the median is reported).
    warmup_steps: untimed steps first (cuDNN autotuning, torch.compile).
    device: a torch.device; default CUDA when available, else the CPU.
    compiled: wrap the network in `torch.compile`.
    sync_free: the SemiMeta step without host synchronisations (see
      `steps.official_pseudo_labels`).
    mixup: the official mix-up loss; False for the labeled cross-entropy instead.
    mixup_alpha: a of Beta(a, a) (1.0 for CIFAR and ImageNet, 0.1 for SVHN).
    lr: learning rate (and pseudo-label step size).
    weight: consistency weight.
    epsilon: relative finite-difference step.
    momentum: SGD momentum.
    weight_decay: coupled L2 weight decay of SGD.
    channels_last: NHWC memory layout for the inputs and the network (the official code uses
      PyTorch's default NCHW).
    seed: seed of the parameters, inputs and dropout.

  Returns:
    One table row: a dict with the keys of `CSV_FIELDS` of
    `experiments/benchmark_official_pytorch.py` (except 'error').
  """
  if case not in CASES:
    raise ValueError(f'Unknown case {case!r}; expected one of {CASES}.')
  device = device or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  on_gpu = device.type == 'cuda'
  if on_gpu:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)

  torch.manual_seed(seed)
  net = models.build_model(model_name, num_classes=num_classes, width=model_width, channels=channels)
  net = net.to(device, memory_format=torch.channels_last) if channels_last else net.to(device)
  optimizer = steps_lib.official_sgd(net.parameters(), lr=lr, momentum=momentum,
                                      weight_decay=weight_decay)
  model = torch.compile(net) if compiled else net
  generator = torch.Generator(device=device).manual_seed(seed)
  batch = random_batch(batch_size, channels, image_size, num_classes, device,
                       channels_last=channels_last, generator=generator)
  amp = autocast_factory(precision, device)

  if case == 'semimeta':
    beta_distribution = None
    if mixup:
      # Officially built once, on the CPU: `Beta(torch.tensor([a]), torch.tensor([a]))`.
      beta_device = device if sync_free else torch.device('cpu')
      concentration = torch.tensor([mixup_alpha], device=beta_device)
      beta_distribution = Beta(concentration, concentration.clone())
    run_step = lambda: steps_lib.semimeta_step(
        model, optimizer, batch, lr=lr, weight=weight, epsilon=epsilon, num_classes=num_classes,
        beta_distribution=beta_distribution, amp=amp, sync_free=sync_free)
    images = 2 * batch_size
  else:
    run_step = lambda: steps_lib.supervised_step(model, optimizer, batch, lr=lr, amp=amp)
    images = batch_size

  # Every step is awaited, so each time is one step's latency, Python dispatch included.
  times, first_step_s = [], float('nan')
  for index in range(warmup_steps + steps):
    if on_gpu and index == warmup_steps:
      # cuDNN autotuning and torch.compile allocate scratch memory in the first steps only;
      # the peak is taken over the timed steps (live parameters, state and inputs still count).
      torch.cuda.reset_peak_memory_stats(device)
    tick = time.perf_counter()
    run_step()
    _synchronize(device)
    elapsed = time.perf_counter() - tick
    if index == 0:
      first_step_s = elapsed
    if index >= warmup_steps:
      times.append(elapsed)

  peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else float('nan')
  median = statistics.median(times)
  row = {
      'device': torch.cuda.get_device_name(device) if on_gpu else f'CPU ({platform.machine()})',
      'torch': torch.__version__,
      'model': models.model_source(model_name, model_width, channels),
      'batch': f'{batch_size}+{batch_size if case == "semimeta" else 0}',
      'input': f'{image_size}x{image_size}x{channels}',
      'num_classes': num_classes,
      'case': case_name(case, compiled=compiled, sync_free=sync_free and case == 'semimeta',
                        mixup=mixup),
      'method': case,
      'precision': precision,
      'compile': compiled,
      'sync_free': sync_free and case == 'semimeta',
      'mixup': mixup and case == 'semimeta',
      'channels_last': channels_last,
      'cudnn_deterministic': torch.backends.cudnn.deterministic,
      'images_per_step': images,
      'steps': steps,
      'warmup_steps': warmup_steps,
      'first_step_s': first_step_s,
      'median_step_ms': 1e3 * median,
      'min_step_ms': 1e3 * min(times),
      'max_step_ms': 1e3 * max(times),
      'steps_per_s': 1.0 / median,
      'images_per_s': images / median,
      'peak_mib': peak,
  }
  del model, net, optimizer, batch
  if on_gpu:
    torch.cuda.empty_cache()
  return row
