"""The training program: mesh, data, state, restore, loop, evaluation, checkpoints, summary."""

import collections
import functools
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from semimeta_jax import checkpoint
from semimeta_jax import data
from semimeta_jax import divergence
from semimeta_jax import dispatch
from semimeta_jax import errors as errors_lib
from semimeta_jax import evaluation
from semimeta_jax import memory_fit
from semimeta_jax import methods
from semimeta_jax import metrics as metrics_lib
from semimeta_jax import models
from semimeta_jax import parallel
from semimeta_jax import preemption
from semimeta_jax import progress as progress_lib
from semimeta_jax import result_protocol
from semimeta_jax import run_dir
from semimeta_jax import run_environment
from semimeta_jax import state as state_lib
from semimeta_jax import validation
from semimeta_jax import workdir_lock
from semimeta_jax.data import eval_batches as eval_data


class NonFiniteLossError(errors_lib.UserError, FloatingPointError):
  """The training loss became NaN or infinite; nothing after the last good checkpoint was saved."""


def create_train_state(config, model, image_shape, mesh, *, num_train=0,
                       num_classes=0, method=None) -> state_lib.TrainState:
  """The step-0 state of `config.seed`, created directly replicated over `mesh`.

  It holds what the method and its options keep (per-example buffers over
  `num_train` examples and `num_classes` classes, averages of the weights).
  `method` is `methods.configure(config)`, built here when not given.
  """
  method = method or methods.configure(config)
  init = functools.partial(method.init_train_state, model, image_shape,
                           num_train=num_train, num_classes=num_classes)
  return parallel.jit_replicated_init(init, mesh)(jax.random.key(config.seed))


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Averages the per-step metrics gathered since the last report.

  One batched transfer of every step's scalars, averaged on the host: stacking
  them on the device took an eager dispatch per step and metric (a thousand per
  report at the default cadence), which a fast accelerator waits on.
  """
  host = jax.device_get(pending)
  return {name: float(np.mean([np.float64(row[name]) for row in host])) for name in host[0]}


class _Run:
  """The mutable parts of one training run, so the loop body reads as the algorithm."""

  def __init__(self, config, workdir, mesh, inp, writer, checkpointer, start_step, target_state,
               headline):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    # Shapes and shardings only: what a checkpoint check restores into.
    self.target_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target_state)
    self.inp, self.writer, self.checkpointer = inp, writer, checkpointer
    self.pending: list[dict[str, jax.Array]] = []
    self.last_checked_step = start_step
    self.headline = headline  # The prefix of the weight set whose error the run reports.
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
      last_good = self.checkpointer.newest_intact_step(self.target_state)
      kept = (f'the last good checkpoint (step {last_good}, checksums verified) is kept in '
              f'{self.workdir}/checkpoints' if last_good is not None
              else 'no intact checkpoint had been written yet')
      raise NonFiniteLossError(
          f'Training loss became non-finite between steps {self.last_checked_step} and {step} '
          f'({", ".join(f"{k}={v}" for k, v in bad.items())}). Nothing after that was saved; '
          f'{kept}. {divergence.advice(self.config.learning_rate, metrics_lib.read_rows(self.workdir))}')
    self.last_checked_step = step
    self.writer.write_scalars(step, {f'train/{k}': v for k, v in {**means, **extra}.items()})

  def _evaluate_split(self, step, prefix, num_examples, eval_step, state, batches):
    """{'<prefix>/<metric>': value} of one weight set on one evaluated split."""
    num_batches = eval_data.num_eval_batches(num_examples, jax.process_count(),
                                             self.config.eval_batch_size // jax.process_count())
    started = time.time()
    # Silent unless the pass is long: then its compile time, rate and ETA every minute.
    progress = progress_lib.Progress(num_batches, title=f'step {step}, {prefix}', unit='batch',
                                     every_seconds=60.0, quiet_seconds=20.0)
    eval_step = progress_lib.tracked(eval_step, progress, self.config.max_steps_in_flight)
    result = evaluation.evaluate(eval_step, state, batches(self.mesh), self.mesh)
    scalars = {f'{prefix}/{k}': v for k, v in result.items()}
    scalars[f'{prefix}/seconds'] = time.time() - started
    return scalars

  def evaluate(self, step: int, state, evaluators, recent_batches=()):
    """Evaluates every weight set the method and its options keep, and logs the errors.

    Each set is evaluated on the test split and, when the run holds one out, on
    the validation split (`val...` prefixes, `result_protocol.validation_prefix`).
    A set that is not ready (e.g. an average without a snapshot yet) is skipped;
    one that needs batch statistics gets them from the last of `recent_batches`
    first (skipped when there is none since a resume). Returns the state (with
    those statistics, so that a checkpoint carries them).
    """
    scalars, evaluated = {}, set()
    for weight_set, eval_step, statistics in evaluators:
      if not weight_set.ready(state):
        continue
      if weight_set.statistics_batches:
        if not recent_batches:
          continue
        batches = list(recent_batches)[-weight_set.statistics_batches:]
        state = weight_set.with_statistics(state, [statistics(state, batch) for batch in batches])
      prefix = weight_set.prefix
      scalars.update(self._evaluate_split(step, prefix, self.inp.num_eval_examples, eval_step,
                                          state, self.inp.global_eval_batches))
      if self.inp.num_validation_examples:
        scalars.update(self._evaluate_split(
            step, result_protocol.validation_prefix(prefix), self.inp.num_validation_examples,
            eval_step, state, self.inp.global_validation_batches))
      evaluated.add(prefix)
    self.writer.write_scalars(step, scalars)
    if self.headline not in evaluated:
      return state
    self.last_eval = {k.split('/', 1)[1]: v for k, v in scalars.items()
                      if k.startswith(self.headline + '/')}
    logging.info('step %d: test error %.2f%% (top-5 %.2f%%) on %d examples', step,
                 self.last_eval['error_top1'], self.last_eval['error_top5'],
                 self.last_eval['num_examples'])
    validation = f'{result_protocol.validation_prefix(self.headline)}/error_top1'
    if validation in scalars:
      logging.info('step %d: validation error %.2f%% on %d examples', step, scalars[validation],
                   self.inp.num_validation_examples)
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates `config`, resuming from `workdir`'s latest checkpoint if any.

  Everything that can be checked is, before anything is written to `workdir`:
  the workdir argument, the config fields, the presence of the dataset, batch
  sizes against the devices, the workdir's saved config (`run_dir`), then,
  holding the workdir's lock, the checkpoints, the label counts per class and
  the saved split. A run that fails a check leaves a new workdir absent.

  Args:
    config: the run configuration (configs/*.py).
    workdir: where checkpoints, metrics, the labeled split and summary.json go.

  Returns:
    The summary written to `<workdir>/summary.json`.
  """
  workdir = run_dir.check_workdir_path(workdir)
  method = validation.validate_config(config)
  info = data.dataset_info(config.data)
  models.check_image_shape(config, info.image_shape, info.num_classes)
  mesh = parallel.make_mesh()
  parallel.check_batch_sizes({name: config[name] for name in
                              ('labeled_batch_size', 'unlabeled_batch_size', 'eval_batch_size')}, mesh)
  # Evaluated with at most one batch of the largest evaluated split (padding is all a larger one adds).
  run_config = memory_fit.clamp_eval_batch(
      config, max(info.num_test, config.data.validation_size), mesh.devices.size)
  memory_fit.check_fits(run_config, method, info.image_shape, info.num_classes, info.num_train,
                        num_devices=mesh.devices.size, local_devices=jax.local_device_count(),
                        process_count=jax.process_count())
  run_dir.check_config(workdir, config)
  with workdir_lock.WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir, info, mesh, method, run_config)


def _compile_evaluators(method, mesh):
  """(weight set, its compiled eval step, its compiled batch-statistics pass or None), per set."""
  return [(weight_set,
           parallel.jit_eval_step(functools.partial(evaluation.eval_step, select=weight_set.select), mesh),
           parallel.jit_eval_step(weight_set.batch_statistics, mesh)
           if weight_set.statistics_batches else None)
          for weight_set in method.weight_sets()]


def _train_and_evaluate(config, workdir, info, mesh, method, run_config) -> dict[str, Any]:
  """`train_and_evaluate` once the cheap checks have passed and the workdir is ours.

  `run_config` is `config` with the evaluation batch the run uses (`memory_fit.clamp_eval_batch`);
  `config` is the one recorded.
  """
  logging.info('%d process(es), %d device(s) (%s); dataset %s: %d train / %d test, %d classes',
               jax.process_count(), jax.device_count(), jax.devices()[0].platform, info.name,
               info.num_train, info.num_test, info.num_classes)

  model = models.get_model(config, info.num_classes)
  state = create_train_state(config, model, info.image_shape, mesh, num_train=info.num_train,
                             num_classes=info.num_classes, method=method)
  checkpointer = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  target_state = state
  try:
    state, start_step = checkpointer.restore_newest_intact(state)
    start_step = start_step or 0
    if start_step:
      logging.info('Resumed from the checkpoint at step %d.', start_step)
    run_dir.check_run_length(workdir, start_step, config.num_train_steps)
    # Checks the label budget against the class sizes and the saved split, then
    # writes the split: the first record a new workdir gets.
    inp = data.build_input(run_config, workdir, start_step=start_step, mesh=mesh,
                           uses_unlabeled=method.uses_unlabeled, strong_view=method.strong_view)
    run_dir.record_config(workdir, config, start_step)
  except BaseException:
    checkpointer.close()
    raise
  pool_size = None if inp.unlabeled_indices is None else len(inp.unlabeled_indices)
  train_step = parallel.jit_train_step(method.make_train_step(info.num_classes, pool_size), mesh)
  evaluators = _compile_evaluators(method, mesh)
  # A weight set's statistics pass reads the last training batches: no second stream to keep in step.
  keep_batches = max(weight_set.statistics_batches for weight_set, _, _ in evaluators)
  recent_batches = collections.deque(maxlen=keep_batches)

  own = method.method
  diagnose, diagnose_every = None, own.diagnostics_every_steps(config)
  if diagnose_every and own.diagnostics is not None:
    diagnose = parallel.jit_eval_step(functools.partial(own.diagnostics, config=config), mesh)

  finished = start_step >= config.num_train_steps
  # A finished run started again is evaluated and reported, not logged again:
  # its metrics rows and TensorBoard events are already complete.
  if not finished:
    # Before the writer opens the file for appending (the rewrite replaces it).
    metrics_lib.drop_rows_after(workdir, start_step)
  writer = metrics_lib.MetricWriter(workdir, enabled=False if finished else None)
  run = _Run(run_config, workdir, mesh, inp, writer, checkpointer, start_step, target_state,
             method.headline)
  progress = progress_lib.Progress(config.num_train_steps, start_step,
                                   every_units=config.log_every_steps)
  # The host stays at most this many steps ahead of the devices: a stop or a report acts on
  # a step the devices are about to run, not on one minutes of queued work away.
  queue = dispatch.DispatchQueue(config.max_steps_in_flight, start_step)
  guard = preemption.PreemptionGuard(sync_every_steps=config.preemption_check_every_steps,
                                     finished_step=lambda: queue.finished_step)
  started, step, preempted = time.time(), start_step, False
  single_process = jax.process_count() == 1
  try:
    for step in range(start_step + 1, config.num_train_steps + 1):
      # Computed on the devices from (seed, step), or prefetched there: no host work per step.
      batch = inp.train_batch(step - 1)
      if keep_batches:
        recent_batches.append(batch)
      if diagnose and step % diagnose_every == 0:
        # On the state the step is about to update (it is donated to the step).
        values = jax.device_get(diagnose(state, batch))
        writer.write_scalars(step, {f'{own.diagnostics_prefix}/{k}': float(v) for k, v in values.items()})
      state, step_metrics = train_step(state, batch)
      run.pending.append(step_metrics)
      queue.push(step, step_metrics)
      progress.update(step, queue.finished_step)
      # A save runs in the background while training goes on; one that has failed stops the
      # run at the first step after it ends. (Several processes could see that end at different
      # steps, so they only check below, at steps they all stop at.)
      if single_process:
        checkpointer.check_save(block=False)
      preempted = guard.should_stop(step)
      is_last = step == config.num_train_steps
      must_save = is_last or preempted or step % config.checkpoint_every_steps == 0
      if step % config.log_every_steps == 0 or must_save:
        # No metrics row, evaluation or new save goes past a save that failed: wait for it here,
        # where the loop waits for the device anyway (every process at the same step).
        checkpointer.check_save(block=True)
        # Wait for the device first: dispatch runs ahead, and the rate must count finished steps.
        jax.block_until_ready(step_metrics)
        queue.mark_finished(step)
        # Also the finiteness check before a save.
        run.report_train_metrics(step, progress.row(step) or {})
      if step % config.eval_every_steps == 0 or is_last:
        state = run.evaluate(step, state, evaluators, recent_batches)
      if must_save:
        checkpointer.save(step, state)
      if preempted:
        logging.warning('Saved step %d after a preemption request; rerun the same command to resume.',
                        step)
        break
    if not run.last_eval and not preempted:
      # Nothing left to train (a finished run started again): evaluate what was restored.
      state = run.evaluate(step, state, evaluators, recent_batches)
  finally:
    guard.close()
    try:
      checkpointer.close()  # Waits for the last save, and raises if it failed.
    finally:
      writer.close()

  this_run = time.time() - started
  previous = metrics_lib.read_summary(workdir) or {}
  summary = {
      'steps': step,
      'completed': step == config.num_train_steps,
      'preempted': preempted,
      'wall_seconds_this_run': this_run,
      # Every run of this workdir, so a resumed or re-evaluated run keeps the total.
      'wall_seconds_total': previous.get('wall_seconds_total', previous.get('wall_seconds_this_run', 0.0)) + this_run,
      'final_error_top1': run.last_eval.get('error_top1'),
      'final_error_top5': run.last_eval.get('error_top5'),
      # Median of the last 20 evaluations and the test error at the best validation step, over
      # every evaluation this workdir logged; no figure chosen on the test set.
      **result_protocol.summarize(metrics_lib.read_rows(workdir), method.headline),
      'reported_prefix': method.headline,
      'num_labeled': int(len(inp.labeled_indices)),
      'num_validation_examples': inp.num_validation_examples,
      'num_eval_examples': inp.num_eval_examples,
      # Of this run (a resumed one may have moved): CPU results depend on the core count.
      'environment': run_environment.describe(),
      'config': config.to_dict(),
  }
  metrics_lib.write_summary(workdir, summary)
  return summary
