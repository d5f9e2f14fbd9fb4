"""The official networks: `model.ConvLarge` and the ResNet-18 of `train_meta_imagenet.py`.

ConvLarge is restated from the official `model.py` with a `width` argument (128 is the official
network). ResNet-18 is torchvision's when it is installed, else a restatement of the same layout,
so that the ImageNet step can be timed without torchvision (or at a non-default width).
"""

import torch
from torch import nn

try:  # torchvision is optional: the official ImageNet model is restated below when absent.
  import torchvision  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - depends on the environment
  torchvision = None


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
