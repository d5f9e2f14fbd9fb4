"""Trains the VAE that TNAR-VAE (methods/tnar.py) loads frozen.

Usage:
  python -m semimeta_jax.vae_main --config=configs/digits.py:tnar_vae --workdir=runs/vae_digits
  python -m semimeta_jax.main --config=configs/digits.py:tnar_vae --workdir=runs/tnar_digits \
      --config.tnar.vae_dir=runs/vae_digits

It maximises the ELBO (`models/vae.py`) on the run's training images, the unlabeled
stream of the same data layer, split, normalisation and augmentation as the
classifier's, in `vae.batch_size` images per step for `vae.num_train_steps` Adam
steps at `vae.learning_rate`. The step is jit-compiled over the classifier's mesh
(`parallel.py`); the state is the framework's `TrainState` saved by its
`Checkpointer` (rerunning the command resumes), and `vae.json` describes the
finished network (image shape, dataset, architecture fields).

A separate entry point rather than a method of the classifier's loop: that loop
evaluates a classifier, reports its test error and keeps a classifier's weight
sets, none of which a VAE has; what the two share (data, mesh, checkpoints, lock,
metrics) is reused from the same modules.
"""

import functools
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from semimeta_jax import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import run_dir  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import validation  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax import workdir_lock  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax.methods import tnar  # pylint: disable=g-import-not-at-top,wrong-import-position
from semimeta_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training configuration file, e.g. configs/digits.py:tnar_vae; the `vae` block '
    'sets the network and its training.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the VAE (checkpoints and vae.json).')

NOISE_TAG = 0  # Folded into the step key for the reparameterisation noise.


def train_step(state, batch, *, model, decoder_std):
  """One Adam step on -ELBO of the unlabeled images. Pure: (state, batch) -> (state, metrics)."""
  x = batch['unlabeled']['image']
  noise = jax.random.normal(state.step_key(NOISE_TAG), (x.shape[0], model.latent_dim), x.dtype)
  loss_fn = functools.partial(vae_lib.negative_elbo, model, x=x, noise=noise, decoder_std=decoder_std)
  (loss, (nll, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'negative_elbo': loss, 'reconstruction_nll': nll, 'kl': kl,
             'grad_norm': optax.tree.norm(grads)}
  return state.apply_gradients(grads=grads, batch_stats={}), metrics


def train_vae(config, workdir: str) -> dict:
  """Trains (or resumes) the VAE of `config` in `workdir`; returns its `vae.json` description.

  Every check (fields, dataset, batch size against the devices) runs before the
  workdir is written; the description is written last, once the final
  checkpoint is saved, so its presence marks a finished VAE.
  """
  workdir = run_dir.check_workdir_path(workdir)
  vae_lib.validate(config)
  run_config = tnar.vae_input_config(config)
  validation.validate_config(run_config)
  info = data.dataset_info(run_config.data)
  mesh = parallel.make_mesh()
  parallel.check_batch_sizes({'vae.batch_size': config.vae.batch_size}, mesh)
  num_steps = config.vae.num_train_steps
  model = vae_lib.from_fields(config.vae, info.image_shape)
  init = functools.partial(vae_lib.init_train_state, config.vae, info.image_shape,
                           learning_rate=config.vae.learning_rate)
  jax.eval_shape(init, jax.random.key(0))  # The architecture's own checks, before anything is written.
  with workdir_lock.WorkdirLock(workdir):
    state = parallel.jit_replicated_init(init, mesh)(jax.random.key(config.seed))
    with checkpoint.Checkpointer(workdir, keep=1) as checkpointer:
      state, start_step = checkpointer.restore_newest_intact(state)
      start_step = start_step or 0
      errors.require(start_step <= num_steps, 'vae.num_train_steps', num_steps,
                     f'{workdir} holds a VAE already trained {start_step} steps; pass at least that '
                     'or use a new --workdir')
      inp = data.build_input(run_config, workdir, start_step=start_step, mesh=mesh,
                             uses_unlabeled=True)
      step_fn = parallel.jit_train_step(
          functools.partial(train_step, model=model, decoder_std=config.vae.decoder_std), mesh)
      with metrics_lib.MetricWriter(workdir) as writer:
        for step in range(start_step + 1, num_steps + 1):
          state, step_metrics = step_fn(state, inp.train_batch(step - 1))
          if step % run_config.log_every_steps == 0 or step == num_steps:
            values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            writer.write_scalars(step, {f'vae/{k}': v for k, v in values.items()})
          if step % run_config.checkpoint_every_steps == 0 or step == num_steps:
            checkpointer.save(step, state)
  description = vae_lib.describe(config, info.image_shape, run_config.data.name, num_steps)
  if jax.process_index() == 0:
    vae_lib.write_description(workdir, description)
  return description


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; every option is a --flag (see --help).')
  cli.quiet_libraries()
  cli.import_tensorflow_quietly()
  with cli.user_errors_exit():
    workdir = cli.check_workdir(_WORKDIR.value)
    cli.route_library_noise(workdir)
    description = train_vae(_CONFIG.value, workdir)
  print(f'VAE trained: {workdir}/{vae_lib.DESCRIPTION_FILE} '
        f'(latent {description["latent_dim"]}, {description["architecture"]}); use it with '
        f'--config.tnar.vae_dir={workdir}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_or_exit)
