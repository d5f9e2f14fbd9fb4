r"""The official SemiMeta training step in PyTorch, timed for comparison with `benchmark_step.py`.

Restates one training step of the official code (github.com/Sakura03/SemiMeta) with random
on-device inputs, so that its step time and memory can be set beside those of our JAX step:
  model.py                `ConvLarge(num_classes, stochastic=True, top_bn=False)`, restated
                          below with a `width` argument (128 is the official network).
  train_meta.py           the SemiMeta step of CIFAR/SVHN, line for line: the labeled loss and
                          its gradient v in evaluation mode; ytil = softmax(f(x_u)) from an
                          evaluation-mode forward; eps = epsilon / ||v||; the two perturbed
                          forwards at theta +- eps v (in-place on the parameters, then restored);
                          d = (softmax(f+) - softmax(f-)) / eps; yhat = relu(ytil - lr d) divided
                          by its row sum (a zero row stays zero); then, in training mode, mix-up
                          (per-example lambda ~ Beta(a, a)) with the KL loss and the squared-L2
                          consistency term, two forwards, and one SGD step (momentum 0.9, no
                          Nesterov, coupled weight decay 1e-4).
  train_meta_imagenet.py  the same step on `torchvision.models.resnet18` (mix-up always on).
                          Its 8-GPU DistributedDataParallel and SyncBatchNorm are left out: on one
                          device SyncBatchNorm computes what BatchNorm2d does.
  train_baseline.py       the supervised step without `--mix-up`: cross-entropy on the labeled
                          batch in training mode, one SGD step. It is the 'supervised' row.

What a step here leaves out: the data loader (inputs are generated once, on the device) and the
per-step accuracy / loss meters of the official loop (their `.item()` calls are logging). What
it keeps: the official step's own host synchronisations. `p.data.add_(g, alpha=epsilon)` takes
a 0-dim device tensor as `alpha`, which PyTorch reads back to the host at every call: once per
parameter tensor in each of the three perturbation loops (87 times per step for ConvLarge's 29
tensors), and the mix-up coefficients are drawn on the CPU and copied with `.cuda()`. `--sync_free` adds rows of the same
step without them (epsilon kept on the device, multi-tensor `_foreach` updates, Beta sampled on
the device), i.e. what a PyTorch user could get from the same algorithm.

The learning rate and consistency weight are those after warm-up (lr 0.1, w 1), as in
`benchmark_step.py`: at lr = 0 the pseudo-label update would be a no-op. cuDNN settings follow
the official scripts unless overridden: `cudnn.benchmark = True` everywhere, and
`cudnn.deterministic = True` for ConvLarge (train_meta.py sets it; train_meta_imagenet.py does not).
TF32 stays at PyTorch's defaults (cuDNN convolutions may use it, matmuls do not); the notes above
the table record the setting.

Precisions: 'fp32', and 'bf16' = every forward and loss under
`torch.autocast(device_type, dtype=torch.bfloat16)` with float32 parameters, gradients and
optimizer state (bfloat16 needs no gradient scaler); backward passes run outside autocast, as
PyTorch recommends. `--compile` adds the same rows with the network wrapped in `torch.compile`
(the step's Python, including the finite-difference loop, stays eager; 'first step s' in the CSV
holds the compile time).

Each case runs in this process on a freshly built, seeded model. 'peak MiB' is
`torch.cuda.max_memory_allocated` over the timed steps (the peak is reset after the warm-up
steps, whose cuDNN autotuning and compilation would otherwise dominate it, and the first case
would pay for the autotuning of all): parameters, optimizer state, inputs and activations. After the warm-up steps every timed step is awaited with
`torch.cuda.synchronize` and the median is reported. images/s counts the images a step reads:
labeled + unlabeled for SemiMeta, labeled only for the supervised step. Without a GPU everything
runs on the CPU (peak MiB then shows '-').

Run on a GPU (the JAX rows to compare against come from `benchmark_step.py` on the same card;
its `finite_difference` mode is the official estimator, and its `jvp` mode the exact one at the
same cost):

  python experiments/benchmark_official_pytorch.py                # ConvLarge, 128 + 128, 32x32
  python experiments/benchmark_official_pytorch.py --compile --sync_free
  python experiments/benchmark_official_pytorch.py --model resnet18 --image_size 224 \
      --batch_size 64 --num_classes 1000                          # the ImageNet step per GPU
  python experiments/benchmark_step.py --modes=supervised,jvp,finite_difference
  python experiments/benchmark_step.py --modes=supervised,jvp,finite_difference --half_precision

and on a CPU, for a quick check: `python experiments/benchmark_official_pytorch.py --small`.
The table is printed and written to `<out>/benchmark_official_pytorch_<tag>.md` and `.csv`
(or to `--out` itself when it names a `.md` file).
"""

import argparse
import contextlib
import csv
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time

import torch
from torch import nn
from torch.distributions import Beta
import torch.nn.functional as F

try:  # torchvision is optional: the official ImageNet model is restated below when absent.
  import torchvision  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - depends on the environment
  torchvision = None

CASES = ('supervised', 'semimeta')
PRECISIONS = ('fp32', 'bf16')
# The presets of benchmark_step.py, so that the same flags give the same sizes on both sides.
SIZES = {
    'default': dict(model='convlarge', model_width=0, batch_size=128, image_size=32, channels=3,
                    num_classes=10, steps=20, warmup_steps=3),
    'small': dict(model='convlarge', model_width=32, batch_size=32, image_size=32, channels=3,
                  num_classes=10, steps=10, warmup_steps=2),
}
COLUMNS = (  # (header, row key, format)
    ('case', 'case', '{}'), ('precision', 'precision', '{}'),
    ('median step ms', 'median_step_ms', '{:.1f}'), ('images/s', 'images_per_s', '{:.0f}'),
    ('peak MiB', 'peak_mib', '{:.1f}'),
)
CSV_FIELDS = (
    'device', 'torch', 'model', 'batch', 'input', 'num_classes', 'case', 'method', 'precision',
    'compile', 'sync_free', 'mixup', 'channels_last', 'cudnn_deterministic', 'images_per_step',
    'steps', 'warmup_steps', 'first_step_s', 'median_step_ms', 'min_step_ms', 'max_step_ms',
    'steps_per_s', 'images_per_s', 'peak_mib', 'error')


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class ConvLarge(nn.Module):
  """The official `model.ConvLarge` (CNN-13), with its channel widths as w, 2w, 4w, 2w, w.

  At width 128 it is the official network layer for layer (3,121,802 parameters for 10
  classes), including PyTorch's default initialisation and the one `maxpool` Sequential
  (MaxPool2d + Dropout2d) shared by both pooling points.

  Args:
    input_dim: image channels.
    num_classes: number of logits.
    width: channels of the first stage (128 officially).
    stochastic: channel dropout (`Dropout2d`, p = 0.5) after each pool, as `stochastic=True`.
  """

  def __init__(self, input_dim: int = 3, num_classes: int = 10, width: int = 128,
               stochastic: bool = True):
    super().__init__()
    w = width
    self.block1 = self.conv_block(input_dim, w, 3, 1, 1, 0.1)
    self.block2 = self.conv_block(w, w, 3, 1, 1, 0.1)
    self.block3 = self.conv_block(w, w, 3, 1, 1, 0.1)

    self.block4 = self.conv_block(w, 2 * w, 3, 1, 1, 0.1)
    self.block5 = self.conv_block(2 * w, 2 * w, 3, 1, 1, 0.1)
    self.block6 = self.conv_block(2 * w, 2 * w, 3, 1, 1, 0.1)

    self.block7 = self.conv_block(2 * w, 4 * w, 3, 1, 0, 0.1)
    self.block8 = self.conv_block(4 * w, 2 * w, 1, 1, 0, 0.1)
    self.block9 = self.conv_block(2 * w, w, 1, 1, 0, 0.1)

    self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
    maxpool = [nn.MaxPool2d(kernel_size=2, stride=2)]
    if stochastic:
      maxpool.append(nn.Dropout2d())
    self.maxpool = nn.Sequential(*maxpool)
    self.classifier = nn.Sequential(nn.Linear(w, num_classes))

  @staticmethod
  def conv_block(input_dim, out_dim, kernel_size=3, stride=1, padding=1, lrelu_slope=0.01):
    return nn.Sequential(
        nn.Conv2d(input_dim, out_dim, kernel_size, stride, padding, bias=False),
        nn.BatchNorm2d(out_dim),
        nn.LeakyReLU(inplace=True, negative_slope=lrelu_slope),
    )

  def forward(self, x):
    out = self.block3(self.block2(self.block1(x)))
    out = self.maxpool(out)
    out = self.block6(self.block5(self.block4(out)))
    out = self.maxpool(out)
    out = self.block9(self.block8(self.block7(out)))
    feature = self.avg_pool(out).view(out.shape[0], -1)
    return self.classifier(feature)


class _BasicBlock(nn.Module):
  """torchvision's `BasicBlock`: two 3x3 convs and a 1x1 conv + BN projection where shapes change."""

  def __init__(self, inplanes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class ResNet18(nn.Module):
  """torchvision's `resnet18`, for environments without torchvision (or a non-default width).

  Same layers, paddings and initialisation (kaiming-normal fan-out convs, BN weight 1 and
  bias 0, PyTorch's default Linear), so its step costs what `torchvision.models.resnet18` does.

  Args:
    num_classes: number of logits.
    width: stem width (64 in torchvision); the stages have w, 2w, 4w, 8w channels.
    in_channels: image channels.
  """

  def __init__(self, num_classes: int = 1000, width: int = 64, in_channels: int = 3):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    stages, inplanes = [], width
    for index in range(4):
      planes = width * 2**index
      stride = 1 if index == 0 else 2
      stages.append(nn.Sequential(_BasicBlock(inplanes, planes, stride), _BasicBlock(planes, planes)))
      inplanes = planes
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(inplanes, num_classes)
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(module, nn.BatchNorm2d):
        nn.init.constant_(module.weight, 1)
        nn.init.constant_(module.bias, 0)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(name: str, *, num_classes: int, width: int = 0, channels: int = 3) -> nn.Module:
  """The official network: 'convlarge' (model.py) or 'resnet18' (torchvision, as the ImageNet script).

  Args:
    name: 'convlarge' or 'resnet18'.
    num_classes: number of logits.
    width: first-stage width; 0 keeps the official one (128 for ConvLarge, 64 for ResNet-18).
    channels: image channels.

  Returns:
    The module, on the CPU, in training mode.

  Raises:
    ValueError: for an unknown name.
  """
  if name == 'convlarge':
    return ConvLarge(input_dim=channels, num_classes=num_classes, width=width or 128, stochastic=True)
  if name == 'resnet18':
    if torchvision is not None and width in (0, 64) and channels == 3:
      return torchvision.models.resnet18(num_classes=num_classes)
    return ResNet18(num_classes=num_classes, width=width or 64, in_channels=channels)
  raise ValueError(f'Unknown model {name!r}; expected convlarge or resnet18.')


def model_source(name: str, width: int, channels: int) -> str:
  """Which implementation `build_model` uses, for the notes."""
  if name == 'resnet18' and torchvision is not None and width in (0, 64) and channels == 3:
    return f'resnet18 (torchvision {torchvision.__version__})'
  if name == 'resnet18':
    return f'resnet18 (restated torchvision layout{f", width {width}" if width else ""})'
  return f'convlarge{f" (width {width})" if width else ""}'


# ----------------------------------------------------------------------------------------------
# The official steps
# ----------------------------------------------------------------------------------------------


def _concat(xs):
  # The official helper flattens with `view(-1)`; `reshape` is the same for the contiguous
  # gradients of eager mode and also accepts the strided ones a compiled backward may return.
  return torch.cat([x.reshape(-1) for x in xs])


def official_pseudo_labels(model, label_img, label_gt, unlabel_img, *, lr, epsilon: float,
                           amp=contextlib.nullcontext, sync_free: bool = False):
  """The meta step of `train_meta.py`: the finite-difference pseudo-label update, in evaluation mode.

  Args:
    model: the network; switched to evaluation mode, its parameters restored on return.
    label_img: labeled images.
    label_gt: their integer labels.
    unlabel_img: unlabeled images.
    lr: the learning rate, which is also the official pseudo-label step size.
    epsilon: finite-difference step relative to ||v|| (1e-2 officially).
    amp: a zero-argument context-manager factory wrapped around every forward and loss
      (`torch.autocast` for bf16; a null context for fp32).
    sync_free: keep epsilon on the device and perturb the parameters with `_foreach` ops,
      instead of the official per-parameter `add_(g, alpha=epsilon)`, which reads the 0-dim
      tensor epsilon back to the host once per parameter tensor in each of its three loops.

  Returns:
    (d, yhat): the finite-difference direction and the updated, renormalised pseudo-labels.
  """
  params = list(model.parameters())

  ### First-order approximation (the official comment), in evaluation mode ###
  model.eval()
  with amp():
    label_pred = model(label_img)
    label_loss = F.cross_entropy(label_pred, label_gt, reduction='mean')
  dtheta = torch.autograd.grad(label_loss, params, only_inputs=True)

  with torch.no_grad():
    with amp():
      # The initial pseudo-labels ytil (updated in place into yhat below, as officially).
      unlabel_pred = model(unlabel_img)
      unlabel_pseudo_gt = F.softmax(unlabel_pred, dim=1)
      epsilon = epsilon / torch.norm(_concat(dtheta))

      if sync_free:
        step = torch._foreach_mul(dtheta, epsilon)  # pylint: disable=protected-access
        data = [p.data for p in params]
        torch._foreach_add_(data, step)  # pylint: disable=protected-access
        unlabel_pred_pos = model(unlabel_img)
        torch._foreach_sub_(data, step, alpha=2.0)  # pylint: disable=protected-access
        unlabel_pred_neg = model(unlabel_img)
        torch._foreach_add_(data, step)  # pylint: disable=protected-access
      else:
        # Forward finite difference.
        for p, g in zip(params, dtheta):
          p.data.add_(g, alpha=epsilon)
        unlabel_pred_pos = model(unlabel_img)
        # Backward finite difference.
        for p, g in zip(params, dtheta):
          p.data.sub_(g, alpha=2. * epsilon)
        unlabel_pred_neg = model(unlabel_img)
        # Resume the original parameters.
        for p, g in zip(params, dtheta):
          p.data.add_(g, alpha=epsilon)

      # The finite-difference direction d, and the pseudo-label step with relu + renormalising.
      unlabel_grad = F.softmax(unlabel_pred_pos, dim=1) - F.softmax(unlabel_pred_neg, dim=1)
      unlabel_grad.div_(epsilon)
      unlabel_pseudo_gt.sub_(unlabel_grad, alpha=lr)
      torch.relu_(unlabel_pseudo_gt)
      sums = torch.sum(unlabel_pseudo_gt, dim=1, keepdim=True)
      unlabel_pseudo_gt /= torch.where(sums == 0., torch.ones_like(sums), sums)
  return unlabel_grad, unlabel_pseudo_gt


def semimeta_step(model, optimizer, batch, *, lr: float, weight: float, epsilon: float,
                  num_classes: int, beta_distribution=None, amp=contextlib.nullcontext,
                  sync_free: bool = False):
  """One SemiMeta update as `train_meta.py` / `train_meta_imagenet.py` compute it.

  Args:
    model: the network; left in training mode, its parameters and running averages updated.
    optimizer: SGD over `model.parameters()`.
    batch: {'label_img', 'label_gt', 'unlabel_img'} on the model's device, B_l = B_u.
    lr: this step's learning rate (also the pseudo-label step size, as officially).
    weight: consistency weight w(t).
    epsilon: finite-difference step relative to ||v|| (1e-2 officially).
    num_classes: number of classes of the one-hot labels.
    beta_distribution: Beta(a, a) over a 1-element parameter for mix-up, or None for the
      labeled cross-entropy instead (train_meta.py without `--mix-up`). Its device decides
      where lambda is drawn: the official code draws it on the CPU and copies it over.
    amp: a zero-argument context-manager factory wrapped around every forward and loss
      (`torch.autocast` for bf16; a null context for fp32).
    sync_free: see `official_pseudo_labels`.

  Returns:
    The total loss (a device tensor; not read back, so timing sees no extra sync).
  """
  label_img, label_gt, unlabel_img = batch['label_img'], batch['label_gt'], batch['unlabel_img']
  _label_gt = F.one_hot(label_gt, num_classes=num_classes).float()
  for param_group in optimizer.param_groups:
    param_group['lr'] = lr
  _, unlabel_pseudo_gt = official_pseudo_labels(model, label_img, label_gt, unlabel_img, lr=lr,
                                                epsilon=epsilon, amp=amp, sync_free=sync_free)

  # Training mode: the real update.
  model.train()
  with amp():
    if beta_distribution is not None:
      with torch.no_grad():
        alpha = beta_distribution.sample((label_img.shape[0],))
        alpha = alpha.to(label_img.device)  # The official `.cuda()`: a blocking copy from the CPU.
        _alpha = alpha.view(-1, 1, 1, 1)
        interp_img = (label_img * _alpha + unlabel_img * (1. - _alpha)).detach()
        interp_pseudo_gt = (_label_gt * alpha + unlabel_pseudo_gt * (1. - alpha)).detach()
      interp_pred = model(interp_img)
      supervised_loss = F.kl_div(F.log_softmax(interp_pred, dim=1), interp_pseudo_gt,
                                 reduction='batchmean')
    else:
      label_pred = model(label_img)
      supervised_loss = F.cross_entropy(label_pred, label_gt, reduction='mean')
    unlabel_pred = model(unlabel_img)
    unlabel_loss = torch.norm(F.softmax(unlabel_pred, dim=1) - unlabel_pseudo_gt, p=2,
                              dim=1).pow(2).mean()
    loss = supervised_loss + weight * unlabel_loss

  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  return loss.detach()


def supervised_step(model, optimizer, batch, *, lr: float, amp=contextlib.nullcontext):
  """One labeled-only update as `train_baseline.py` without `--mix-up` computes it.

  Args:
    model: the network, in training mode.
    optimizer: SGD over `model.parameters()`.
    batch: {'label_img', 'label_gt', ...}; the unlabeled images are not read.
    lr: this step's learning rate.
    amp: a zero-argument context-manager factory wrapped around the forward and loss.

  Returns:
    The loss (a device tensor).
  """
  for param_group in optimizer.param_groups:
    param_group['lr'] = lr
  model.train()
  with amp():
    label_pred = model(batch['label_img'])
    loss = F.cross_entropy(label_pred, batch['label_gt'], reduction='mean')
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  return loss.detach()


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


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
    sync_free: the SemiMeta step without host synchronisations (see `semimeta_step`).
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
    One table row: a dict with the keys of CSV_FIELDS (except 'error').
  """
  if case not in CASES:
    raise ValueError(f'Unknown case {case!r}; expected one of {CASES}.')
  device = device or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  on_gpu = device.type == 'cuda'
  if on_gpu:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)

  torch.manual_seed(seed)
  net = build_model(model_name, num_classes=num_classes, width=model_width, channels=channels)
  net = net.to(device, memory_format=torch.channels_last) if channels_last else net.to(device)
  optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
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
    run_step = lambda: semimeta_step(model, optimizer, batch, lr=lr, weight=weight, epsilon=epsilon,
                                     num_classes=num_classes, beta_distribution=beta_distribution,
                                     amp=amp, sync_free=sync_free)
    images = 2 * batch_size
  else:
    run_step = lambda: supervised_step(model, optimizer, batch, lr=lr, amp=amp)
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
      'model': model_source(model_name, model_width, channels),
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


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _cell(row, key, fmt):
  value = row.get(key)
  if value is None or value == '' or isinstance(value, float) and not math.isfinite(value):
    return '-'
  return fmt.format(value)


def render_markdown(rows) -> str:
  """The rows as a markdown table (a failed row keeps its name and shows the error)."""
  lines = ['| ' + ' | '.join(header for header, _, _ in COLUMNS) + ' |',
           '|' + '---|' * len(COLUMNS)]
  for row in rows:
    cells = [_cell(row, key, fmt) for _, key, fmt in COLUMNS]
    if row.get('error'):
      cells[-1] = f'failed: {row["error"]}'
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def output_paths(out: str, tag: str) -> tuple[str, str]:
  """(markdown, csv) paths: `out` itself if it names a .md file, else files in directory `out`."""
  if out.endswith('.md'):
    return out, out[:-len('.md')] + '.csv'
  return (os.path.join(out, f'benchmark_official_pytorch_{tag}.md'),
          os.path.join(out, f'benchmark_official_pytorch_{tag}.csv'))


def write_results(rows, out: str, tag: str, notes=()) -> tuple[str, str]:
  """Writes the notes and the table (markdown) and all fields (CSV); returns both paths."""
  md_path, csv_path = output_paths(out, tag)
  os.makedirs(os.path.dirname(md_path) or '.', exist_ok=True)
  with open(md_path, 'w') as f:
    f.write(''.join(f'{line}\n' for line in notes) + ('\n' if notes else '') + render_markdown(rows))
  with open(csv_path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval='', extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  return md_path, csv_path


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--small', action='store_true', help='CPU-sized defaults (SIZES["small"]).')
  for name, kind in (('model', str), ('model_width', int), ('batch_size', int), ('image_size', int),
                     ('channels', int), ('num_classes', int), ('steps', int), ('warmup_steps', int)):
    parser.add_argument(f'--{name}', type=kind, default=None, help='Overrides the size preset.')
  parser.add_argument('--cases', default=','.join(CASES), help=f'Comma-separated subset of {CASES}.')
  parser.add_argument('--precisions', default=','.join(PRECISIONS),
                      help=f'Comma-separated subset of {PRECISIONS}.')
  parser.add_argument('--compile', action='store_true',
                      help='Also time every case with the network under torch.compile.')
  parser.add_argument('--sync_free', action='store_true',
                      help='Also time the SemiMeta step without its host synchronisations.')
  parser.add_argument('--no_mixup', action='store_true',
                      help='SemiMeta with the labeled cross-entropy (train_meta.py without --mix-up).')
  parser.add_argument('--mixup_alpha', type=float, default=1.0, help='a of Beta(a, a).')
  parser.add_argument('--lr', type=float, default=0.1, help='Learning rate after warm-up.')
  parser.add_argument('--weight', type=float, default=1.0, help='Consistency weight after ramp-up.')
  parser.add_argument('--epsilon', type=float, default=1e-2, help='Relative finite-difference step.')
  parser.add_argument('--momentum', type=float, default=0.9)
  parser.add_argument('--weight_decay', type=float, default=1e-4)
  parser.add_argument('--channels_last', action='store_true',
                      help='NHWC layout for inputs and network (not the official default).')
  parser.add_argument('--cudnn_deterministic', default='official', choices=('official', 'on', 'off'),
                      help="'official': on for ConvLarge (train_meta.py), off for ResNet-18.")
  parser.add_argument('--device', default=None, help="e.g. 'cuda:0' or 'cpu'; default CUDA if any.")
  parser.add_argument('--threads', type=int, default=0,
                      help='torch.set_num_threads on the CPU (0 keeps the default).')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', '--out_dir', dest='out', default='results',
                      help='Output directory, or a .md file (the .csv goes beside it).')
  parser.add_argument('--tag', default=None, help='File name tag; default from model and size.')
  args = parser.parse_args(argv)
  preset = SIZES['small' if args.small else 'default']
  for name, value in preset.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  args.cases = [c.strip() for c in args.cases.split(',') if c.strip()]
  args.precisions = [p.strip() for p in args.precisions.split(',') if p.strip()]
  if sorted(set(args.cases) - set(CASES)):
    parser.error(f'unknown cases {sorted(set(args.cases) - set(CASES))}; expected a subset of {CASES}')
  if sorted(set(args.precisions) - set(PRECISIONS)):
    parser.error(f'unknown precisions {sorted(set(args.precisions) - set(PRECISIONS))}; '
                 f'expected a subset of {PRECISIONS}')
  return args


def main(argv=None):
  args = _parse_args(argv)
  device = torch.device(args.device) if args.device else torch.device(
      'cuda' if torch.cuda.is_available() else 'cpu')
  if args.threads:
    torch.set_num_threads(args.threads)
  # The official scripts' cuDNN settings (train_meta.py sets both; the ImageNet script only benchmark).
  torch.backends.cudnn.benchmark = True
  deterministic = {'on': True, 'off': False}.get(args.cudnn_deterministic, args.model == 'convlarge')
  torch.backends.cudnn.deterministic = deterministic

  variants = [(False, False)]  # (compiled, sync_free)
  if args.sync_free:
    variants.append((False, True))
  if args.compile:
    variants += [(True, sync_free) for _, sync_free in variants]

  rows = []
  for compiled, sync_free in variants:
    for case in args.cases:
      if sync_free and case != 'semimeta':
        continue  # The supervised step has no host synchronisation to remove.
      for precision in args.precisions:
        name = case_name(case, compiled=compiled, sync_free=sync_free, mixup=not args.no_mixup)
        try:
          row = measure_case(
              case, precision=precision, model_name=args.model, model_width=args.model_width,
              batch_size=args.batch_size, image_size=args.image_size, channels=args.channels,
              num_classes=args.num_classes, steps=args.steps, warmup_steps=args.warmup_steps,
              device=device, compiled=compiled, sync_free=sync_free, mixup=not args.no_mixup,
              mixup_alpha=args.mixup_alpha, lr=args.lr, weight=args.weight, epsilon=args.epsilon,
              momentum=args.momentum, weight_decay=args.weight_decay,
              channels_last=args.channels_last, seed=args.seed)
        except Exception as error:  # pylint: disable=broad-except
          # One failing case (out of memory, a compile error) should not lose the others.
          row = {'case': name, 'precision': precision, 'error': f'{type(error).__name__}: {error}'[:200]}
          if device.type == 'cuda':
            torch.cuda.empty_cache()
        else:
          print(f'{name} [{precision}]: first step {row["first_step_s"]:.2f} s, '
                f'median step {row["median_step_ms"]:.1f} ms', file=sys.stderr, flush=True)
        rows.append(row)

  width = f'_w{args.model_width}' if args.model_width else ''
  tag = args.tag or f'{args.model}{width}_{args.image_size}px_b{args.batch_size}_{device.type}'
  command = [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))
  device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (
      f'CPU ({platform.machine()}, {torch.get_num_threads()} threads)')
  notes = [
      f'Command: `python {" ".join(shlex.quote(a) for a in command)}`',
      f'Date: {datetime.datetime.now().isoformat(timespec="seconds")}; torch {torch.__version__}; '
      f'device: {device_name}; host CPUs: {os.cpu_count()}.',
      f'Model: {model_source(args.model, args.model_width, args.channels)}; batch {args.batch_size} '
      f'labeled + {args.batch_size} unlabeled; input {args.image_size}x{args.image_size}x'
      f'{args.channels}; {args.num_classes} classes; random inputs on the device.',
      f'Official step (train_meta.py): evaluation-mode meta step, finite-difference hypergradient '
      f'(epsilon {args.epsilon}), ' + ('no mix-up' if args.no_mixup else f'mix-up Beta({args.mixup_alpha})')
      + f'; SGD lr {args.lr}, momentum {args.momentum}, weight decay {args.weight_decay}; '
      f'consistency weight {args.weight}.',
      f'cudnn.benchmark True, cudnn.deterministic {deterministic}; cudnn.allow_tf32 '
      f'{torch.backends.cudnn.allow_tf32}, cuda.matmul.allow_tf32 {torch.backends.cuda.matmul.allow_tf32}; '
      f'memory format {"channels_last" if args.channels_last else "NCHW (official)"}.',
      f'Median of {args.steps} timed steps after {args.warmup_steps} warm-up steps, each awaited '
      '(torch.cuda.synchronize); bf16 = torch.autocast(bfloat16) with float32 parameters.',
      'peak MiB = torch.cuda.max_memory_allocated over the timed steps of each case (GPU only).',
      'images/s counts the images a step reads (the supervised step reads the labeled batch only).',
  ]
  md_path, csv_path = write_results(rows, args.out, tag, notes)
  print('\n'.join(notes) + '\n\n' + render_markdown(rows))
  print(f'Wrote {md_path} and {csv_path}.')
  return rows


if __name__ == '__main__':
  main()
