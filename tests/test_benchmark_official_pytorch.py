"""Tests of the PyTorch restatement of the official step (skipped where torch is not installed)."""

import copy
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from experiments import benchmark_official_pytorch as bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.official_pytorch import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.official_pytorch import steps  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.official_pytorch import timing  # pylint: disable=g-import-not-at-top,wrong-import-position

PARITY_FILE = pathlib.Path(__file__).resolve().parent / 'data' / 'semimeta_reference_mlp.npz'
CPU = torch.device('cpu')


def _reference_mlp(data):
  """Dense(6 -> 8) -> tanh -> Dense(8 -> 4) in float64 with the reference weights."""
  first = torch.nn.Linear(6, 8, dtype=torch.float64)
  second = torch.nn.Linear(8, 4, dtype=torch.float64)
  with torch.no_grad():
    for layer, kernel, bias in ((first, 'kernel1', 'bias1'), (second, 'kernel2', 'bias2')):
      layer.weight.copy_(torch.from_numpy(data[kernel].T))  # Flax kernels are (in, out).
      layer.bias.copy_(torch.from_numpy(data[bias]))
  return torch.nn.Sequential(first, torch.nn.Tanh(), second)


@pytest.mark.parametrize('sync_free', [False, True])
def test_pseudo_labels_match_the_official_vectors(sync_free):
  data = np.load(PARITY_FILE)
  model = _reference_mlp(data)
  before = [p.detach().clone() for p in model.parameters()]
  direction, pseudo = steps.official_pseudo_labels(
      model, torch.from_numpy(data['x_labeled']), torch.from_numpy(data['y_labeled']),
      torch.from_numpy(data['x_unlabeled']), lr=float(data['lr']), epsilon=float(data['epsilon']),
      sync_free=sync_free)
  np.testing.assert_allclose(direction.numpy(), data['fd_direction'], rtol=0, atol=1e-10)
  np.testing.assert_allclose(pseudo.numpy(), data['pseudo_updated'], rtol=0, atol=1e-10)
  # The perturbed parameters are put back (up to the rounding of +eps, -2 eps, +eps).
  for old, new in zip(before, model.parameters()):
    np.testing.assert_allclose(new.detach().numpy(), old.numpy(), rtol=0, atol=1e-15)


def test_sync_free_step_matches_the_official_step():
  torch.manual_seed(0)
  model = models.build_model('convlarge', num_classes=10, width=4).to(CPU)
  twin = copy.deepcopy(model)
  batch = timing.random_batch(4, 3, 16, 10, CPU, generator=torch.Generator().manual_seed(1))
  results = []
  for net, sync_free in ((model, False), (twin, True)):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    beta = torch.distributions.Beta(torch.tensor([1.0]), torch.tensor([1.0]))
    torch.manual_seed(2)  # Same dropout masks and mix-up coefficients in both steps.
    loss = steps.semimeta_step(net, optimizer, batch, lr=0.1, weight=1.0, epsilon=1e-2,
                               num_classes=10, beta_distribution=beta, sync_free=sync_free)
    results.append((float(loss), [p.detach().clone() for p in net.parameters()]))
  (loss_a, params_a), (loss_b, params_b) = results
  assert np.isfinite(loss_a) and loss_a == pytest.approx(loss_b, rel=1e-5)
  for a, b in zip(params_a, params_b):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
  assert model.training  # The step ends in training mode, as the official loop does.


def test_models_have_the_official_sizes():
  count = lambda m: sum(p.numel() for p in m.parameters())
  assert count(models.ConvLarge(num_classes=10)) == 3_121_802
  assert count(models.ResNet18(num_classes=1000)) == 11_689_512  # torchvision's resnet18.
  logits = models.ResNet18(num_classes=5, width=8)(torch.zeros(2, 3, 32, 32))
  assert logits.shape == (2, 5)


def test_measure_case_rows_and_table(tmp_path):
  sizes = dict(model_name='convlarge', model_width=4, batch_size=4, image_size=16, num_classes=10,
               steps=2, warmup_steps=1, device=CPU)
  rows = [timing.measure_case('supervised', precision='fp32', **sizes),
          timing.measure_case('semimeta', precision='bf16', **sizes)]
  supervised, semimeta = rows
  for row in rows:
    assert row['min_step_ms'] <= row['median_step_ms'] <= row['max_step_ms']
    assert row['images_per_s'] == pytest.approx(row['images_per_step'] * 1e3 / row['median_step_ms'])
  assert (supervised['images_per_step'], semimeta['images_per_step']) == (4, 8)
  assert semimeta['case'] == 'semimeta (official, finite difference)'

  md_path, csv_path = bench.write_results(rows, str(tmp_path / 'table.md'), 'unused', notes=['A note.'])
  assert csv_path == str(tmp_path / 'table.csv')
  table = open(md_path).read().splitlines()
  assert table[0] == 'A note.'
  assert table[2] == '| case | precision | median step ms | images/s | peak MiB |'
  assert table[5].startswith('| semimeta (official, finite difference) | bf16 |')
  assert table[5].endswith('| - |')  # No device memory figure on the CPU.
  assert bench.output_paths('results', 'x')[0] == 'results/benchmark_official_pytorch_x.md'
