"""The training program: mesh, data, state, restore, loop, evaluation, checkpoints, summary."""

import functools
import json
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from semimeta_jax import checkpoint
from semimeta_jax import data
from semimeta_jax import evaluation
from semimeta_jax import methods
from semimeta_jax import metrics as metrics_lib
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax import state as state_lib
from semimeta_jax import validation
from semimeta_jax.methods import semimeta


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; nothing after the last good checkpoint was saved."""


def create_train_state(config, model, image_shape, mesh) -> state_lib.TrainState:
  """The step-0 state of `config.seed`, created directly replicated over `mesh`."""
  init = functools.partial(state_lib.init_train_state, config, model, image_shape,
                           use_ema=methods.uses_ema(config))
  return parallel.jit_replicated_init(init, mesh)(jax.random.key(config.seed))


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Averages the per-step metrics gathered since the last report: one host transfer."""
  stacked = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *pending)
  return {name: float(value) for name, value in jax.device_get(stacked).items()}


def _earlier_evaluations(workdir: str, up_to_step: int, key: str) -> list[float]:
  """The `key` errors this workdir logged at or before `up_to_step` (for best-so-far on resume)."""
  path = epath.Path(workdir) / metrics_lib.METRICS_FILE
  if not path.exists():
    return []
  errors = []
  with path.open() as f:
    for line in f:
      row = json.loads(line)
      if row.get('step', up_to_step + 1) <= up_to_step and row.get(key) is not None:
        errors.append(row[key])
  return errors


class _Run:
  """The mutable parts of one training run, so the loop body reads as the algorithm."""

  def __init__(self, config, workdir, mesh, inp, writer, checkpointer, start_step):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.inp, self.writer, self.checkpointer = inp, writer, checkpointer
    self.pending: list[dict[str, jax.Array]] = []
    self.last_checked_step = start_step
    self.headline = 'eval_ema' if config.eval_with_ema else 'eval'
    self.errors = _earlier_evaluations(workdir, start_step, f'{self.headline}/error_top1')
    self.last_eval: dict[str, float] = {}

  def report_train_metrics(self, step: int, extra: dict[str, float]):
    """Averages the pending step metrics, stops on a non-finite loss, writes them."""
    if not self.pending:
      return
    means = _mean_metrics(self.pending)
    self.pending = []
    bad = {k: v for k, v in means.items() if k.endswith('loss') and not np.isfinite(v)}
    if bad:
      self.checkpointer.wait_until_finished()
      last_good = self.checkpointer.latest_step()
      kept = (f'the last good checkpoint (step {last_good}) is kept in {self.workdir}/checkpoints'
              if last_good is not None else 'no checkpoint had been written yet')
      raise NonFiniteLossError(
          f'Training loss became non-finite between steps {self.last_checked_step} and {step} '
          f'({", ".join(f"{k}={v}" for k, v in bad.items())}). Nothing after that was saved; '
          f'{kept}. Lower config.learning_rate or check the input data, then rerun the same '
          f'command to resume from the last checkpoint.')
    self.last_checked_step = step
    self.writer.write_scalars(step, {f'train/{k}': v for k, v in {**means, **extra}.items()})

  def evaluate(self, step: int, state, compiled_eval_steps):
    """Evaluates every weight set (raw, and EMA when kept) and logs the errors."""
    scalars = {}
    for prefix, eval_step in compiled_eval_steps.items():
      started = time.time()
      result = evaluation.evaluate(eval_step, state, self.inp.global_eval_batches(self.mesh),
                                   self.mesh)
      scalars.update({f'{prefix}/{k}': v for k, v in result.items()})
      scalars[f'{prefix}/seconds'] = time.time() - started
    self.last_eval = {k.split('/', 1)[1]: v for k, v in scalars.items()
                      if k.startswith(self.headline + '/')}
    self.errors.append(self.last_eval['error_top1'])
    self.writer.write_scalars(step, scalars)
    logging.info('step %d: test error %.2f%% (top-5 %.2f%%) on %d examples', step,
                 self.last_eval['error_top1'], self.last_eval['error_top5'],
                 self.last_eval['num_examples'])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates `config`, resuming from `workdir`'s latest checkpoint if any.

  Everything that can be checked before compute is: the config fields, the
  presence of the dataset, batch sizes against the devices, and the workdir's
  saved config.

  Args:
    config: the run configuration (configs/*.py).
    workdir: where checkpoints, metrics, the labeled split and summary.json go.

  Returns:
    The summary written to `<workdir>/summary.json`.
  """
  validation.validate_config(config)
  info = data.dataset_info(config.data)
  mesh = parallel.make_mesh()
  parallel.check_batch_sizes({name: config[name] for name in
                              ('labeled_batch_size', 'unlabeled_batch_size', 'eval_batch_size')}, mesh)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # Local or remote (gs://...).
  checkpoint.check_workdir_config(workdir, config, allow_change=config.allow_config_change)
  logging.info('%d process(es), %d device(s) (%s); dataset %s: %d train / %d test, %d classes',
               jax.process_count(), jax.device_count(), jax.devices()[0].platform, info.name,
               info.num_train, info.num_test, info.num_classes)

  model = models.get_model(config, info.num_classes)
  state = create_train_state(config, model, info.image_shape, mesh)
  checkpointer = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    state = checkpointer.restore(state, start_step)
    logging.info('Resumed from the checkpoint at step %d.', start_step)

  inp = data.build_input(config, workdir, start_step=start_step, mesh=mesh)
  train_step = parallel.jit_train_step(methods.make_train_step(config, info.num_classes), mesh)
  compiled_eval_steps = {'eval': parallel.jit_eval_step(evaluation.eval_step, mesh)}
  if state.ema_params is not None:
    compiled_eval_steps['eval_ema'] = parallel.jit_eval_step(
        functools.partial(evaluation.eval_step, use_ema=True), mesh)

  diagnose = None
  if config.hypergrad_diagnostics_every_steps and config.method == 'semimeta':
    diagnose = parallel.jit_eval_step(
        functools.partial(semimeta.hypergradient_fidelity, config=config), mesh)

  writer = metrics_lib.MetricWriter(workdir)
  run = _Run(config, workdir, mesh, inp, writer, checkpointer, start_step)
  progress = metrics_lib.Progress(config.num_train_steps, start_step, every_steps=config.log_every_steps)
  guard = checkpoint.PreemptionGuard()
  started, step, preempted = time.time(), start_step, False
  try:
    for step in range(start_step + 1, config.num_train_steps + 1):
      # Computed on the devices from (seed, step), or prefetched there: no host work per step.
      batch = inp.train_batch(step - 1)
      if diagnose and step % config.hypergrad_diagnostics_every_steps == 0:
        # On the state the step is about to update (it is donated to the step).
        fidelity = jax.device_get(diagnose(state, batch))
        writer.write_scalars(step, {f'hypergrad/{k}': float(v) for k, v in fidelity.items()})
      state, step_metrics = train_step(state, batch)
      run.pending.append(step_metrics)
      preempted = guard.should_stop(step)
      is_last = step == config.num_train_steps
      must_save = is_last or preempted or step % config.checkpoint_every_steps == 0
      if step % config.log_every_steps == 0 or must_save:
        # Wait for the device first: dispatch runs ahead, and the rate must count finished steps.
        jax.block_until_ready(step_metrics)
        run.report_train_metrics(step, progress(step) or {})  # Also the finiteness check before a save.
      if step % config.eval_every_steps == 0 or is_last:
        run.evaluate(step, state, compiled_eval_steps)
      if must_save:
        checkpointer.save(step, state)
      if preempted:
        logging.warning('Saved step %d after a preemption request; rerun the same command to resume.',
                        step)
        break
    if not run.last_eval and not preempted:
      # Nothing left to train (a finished run started again): evaluate what was restored.
      run.evaluate(step, state, compiled_eval_steps)
  finally:
    guard.close()
    checkpointer.wait_until_finished()
    checkpointer.close()
    writer.close()

  summary = {
      'steps': step,
      'completed': step == config.num_train_steps,
      'preempted': preempted,
      'wall_seconds_this_run': time.time() - started,
      'final_error_top1': run.last_eval.get('error_top1'),
      'final_error_top5': run.last_eval.get('error_top5'),
      'best_error_top1': min(run.errors) if run.errors else None,
      'num_labeled': int(len(inp.labeled_indices)),
      'num_eval_examples': inp.num_eval_examples,
      'config': config.to_dict(),
  }
  metrics_lib.write_summary(workdir, summary)
  return summary
