"""The Method seam: the loop reads methods and options only through the interface."""

import pathlib
import re

import chex
import pytest

from semimeta_jax import methods
from tests.conftest import tiny_config

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'semimeta_jax'
# The loop and the modules beneath it: no method and no option is named there.
LOOP_FILES = ('train.py', 'evaluation.py', 'state.py', 'schedules.py', 'plan.py', 'validation.py')


@pytest.mark.parametrize('name', LOOP_FILES)
def test_the_loop_names_no_method_and_no_option(name):
  text = (PACKAGE / name).read_text()
  names = set(methods.METHOD_NAMES) | {option.name for option in methods.OPTIONS}
  quoted = [n for n in names if re.search(rf"""['"]{n}['"]""", text) or f'.{n}' in text]
  assert not quoted, f'{name} names {quoted}'
  words = set(re.split(r'[^a-z]+', text.lower()))
  assert not words & {'ema', 'swa'}, f'{name} names an average of the weights'


def _configured(**overrides):
  return methods.configure(tiny_config(**overrides))


SWA = {'num_train_steps': 20, 'fast_swa.cycles': 1, 'fast_swa.cycle_steps': 4,
       'fast_swa.average_every_steps': 2, 'fast_swa.lr_max': 0.05, 'fast_swa.bn_update_batches': 2}


@pytest.mark.parametrize('overrides, prefixes, headline', [
    ({'method': 'supervised'}, ['eval'], 'eval'),
    ({'method': 'supervised', 'ema.decay': 0.9}, ['eval', 'eval_ema'], 'eval'),
    ({'method': 'mean_teacher', 'ema.decay': 0.9, 'ema.headline': True}, ['eval', 'eval_ema'], 'eval_ema'),
    ({'method': 'mean_teacher', 'ema.decay': 0.9, 'ema.headline': True, **SWA},
     ['eval', 'eval_ema', 'eval_swa'], 'eval_swa'),
    ({'method': 'mean_teacher', 'ema.decay': 0.9, 'ema.headline': True, **SWA, 'fast_swa.headline': False},
     ['eval', 'eval_ema', 'eval_swa'], 'eval_ema'),
])
def test_the_options_bring_their_weight_sets_and_the_headline(overrides, prefixes, headline):
  configured = _configured(**overrides)
  assert [weight_set.prefix for weight_set in configured.weight_sets()] == prefixes
  assert configured.headline == headline


def test_a_step_keeps_what_its_options_keep():
  import jax  # pylint: disable=g-import-not-at-top
  from semimeta_jax import models  # pylint: disable=g-import-not-at-top
  configured = _configured(method='supervised', **{'ema.decay': 0.5}, **SWA)
  config = configured.config
  state = configured.init_train_state(models.get_model(config, 10), (8, 8, 1), jax.random.key(0))
  assert set(state.extra) == {'ema', 'fast_swa'}
  # The average starts at the initial weights; fast-SWA's holds no snapshot yet.
  chex.assert_trees_all_equal(state.extra['ema']['params'], state.params)
  assert int(state.extra['fast_swa']['count']) == 0


def test_a_method_builds_state_from_the_model_with_a_key_of_its_own():
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from semimeta_jax import models  # pylint: disable=g-import-not-at-top

  def second_network(config, *, model, image_shape, rng, params, batch_stats, num_classes):
    del config, batch_stats
    variables = model.init(rng, jnp.zeros((1, *image_shape)), train=False)
    return {'second': variables['params'], 'num_classes': num_classes,
            'first_head_width': params['head']['fc']['kernel'].shape[0]}

  configured = _configured(method='supervised')
  configured = dataclasses.replace(
      configured, method=dataclasses.replace(configured.method, init_model_state=second_network))
  model = models.get_model(configured.config, 10)
  state = configured.init_train_state(model, (8, 8, 1), jax.random.key(0), num_classes=10)
  assert state.extra['num_classes'] == 10
  assert state.extra['first_head_width'] == state.params['head']['fc']['kernel'].shape[0]
  chex.assert_trees_all_equal_shapes(state.extra['second'], state.params)
  # Same architecture, another draw: every random weight starts apart (batch norm's
  # scales and offsets start at ones and zeros in both).
  kernels = lambda params: [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                            if 'kernel' in jax.tree_util.keystr(path)]
  assert all(bool(jnp.any(a != b))
             for a, b in zip(kernels(state.extra['second']), kernels(state.params), strict=True))
