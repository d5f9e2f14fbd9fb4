"""The strong view of the unlabeled rows: the FixMatch family's augmented copy, on the devices.

A method that reads it (`Method.strong_view`) gets `batch['unlabeled']['strong_image']` beside the
weak view `'image'`: the same example, with its own crop and flip (as USB's strong transform,
which flips and crops before RandAugment, independently of the weak transform), then RandAugment
and Cutout (`randaugment.py`). Every draw comes from the unlabeled stream's key of the step with
a tag of its own, so the view is a pure function of (seed, step): a resumed run replays it, and
row i is the same however the batch is sharded.
"""

import dataclasses

import jax

from semimeta_jax.data import device_augment
from semimeta_jax.data import randaugment

# Folded into a stream's key of the step: the strong view's draws, independent of the weak view's.
STRONG_VIEW_TAG = 0x57A6


@dataclasses.dataclass(frozen=True)
class StrongView:
  """The settings of the strong view (`config.data.randaugment`), hashable for `jit`.

  Attributes:
    num_ops: RandAugment ops per image.
    magnitude: None (each op's value uniform in its range, USB) or a fixed magnitude.
    max_magnitude: the magnitude scale's top.
    cutout: largest Cutout side, a fraction of the image side.
  """
  num_ops: int = 3
  magnitude: float | None = None
  max_magnitude: float = 30.0
  cutout: float = 0.5


def from_config(data_config) -> StrongView:
  """The `StrongView` of `config.data` (its `randaugment` block; magnitude -1 = uniform)."""
  block = data_config.randaugment
  return StrongView(num_ops=int(block.num_ops),
                    magnitude=None if block.magnitude < 0 else float(block.magnitude),
                    max_magnitude=float(block.max_magnitude), cutout=float(block.cutout))


def make(images, key, view: StrongView, *, augment_kind: str, pad: int, pad_mode: str):
  """The strong view of a uint8 [B, H, W, C] batch (uint8 out): own crop/flip, then RandAugment.

  Args:
    images: the gathered training rows before any augmentation.
    key: the stream's key of the step (the weak view's); the strong view folds in its tag.
    view: its settings.
    augment_kind, pad, pad_mode: the dataset's weak augmentation, redrawn for this view.
  """
  key = jax.random.fold_in(key, STRONG_VIEW_TAG)
  crop_key, policy_key = jax.random.split(key)
  images = device_augment.augment(images, crop_key, augment_kind, pad, pad_mode)
  return randaugment.strong_view(images, policy_key, num_ops=view.num_ops, magnitude=view.magnitude,
                                 max_magnitude=view.max_magnitude, cutout=view.cutout)
