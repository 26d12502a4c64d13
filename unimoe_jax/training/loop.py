"""The training loop that `python -m unimoe_jax.train` runs (t5x's `train` arguments, in gin).

One call trains `train_steps` steps of `model` (t5x's model interface, models.py) on a seqio
mixture, evaluates every `eval_period` steps with seqio's Evaluator, writes metrics to
TensorBoard and the console through clu, and checkpoints to `model_dir` with orbax. It resumes
from the latest checkpoint in `model_dir` if there is one (same params, optimizer state, step
and data position: the input iterator state saved with it, or else skipping the batches
already read), otherwise starts from `initial_checkpoint_path` (any subset of the params;
the rest keep their initialisation) or from scratch.
"""

import os
import time
from typing import Any, Dict, Mapping, Optional, Sequence

from absl import logging
import gin
import jax
import numpy as np

from unimoe_jax import checkpoints
from unimoe_jax import partitioning
from unimoe_jax.data import feature_converter
from unimoe_jax.data import pipeline
from unimoe_jax.training import evaluation
from unimoe_jax.training import interrupts
from unimoe_jax.training import optimizer as optimizer_lib
from unimoe_jax.training import routing_report as routing_report_lib
from unimoe_jax.training import state_checkpoints
from unimoe_jax.training import train_state as train_state_lib


def _scalars(metrics) -> Dict[str, float]:
  return {k: float(np.asarray(v.compute())) for k, v in metrics.items()}


def _merge(a, b):
  if a is None:
    return b
  return {k: a[k].merge(b[k]) for k in a}


def _write_operative_config(model_dir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
      f.write(gin.config_str())


@gin.configurable(denylist=['crash_after_step', 'devices'])
def train(
    *,
    model: Any = gin.REQUIRED,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    mixture_or_task_module: Sequence[str] = ('unimoe_jax.tasks',),
    initial_checkpoint_path: Optional[str] = None,
    optimizer: optimizer_lib.OptimizerConfig = optimizer_lib.OptimizerConfig(),
    trainable_patterns: Sequence[str] = ('.*',),
    frozen_patterns: Sequence[str] = (),
    mesh_config: Optional[partitioning.MeshConfig] = None,
    seed: int = 0,
    shuffle_train_examples: bool = True,
    pack: bool = True,
    use_cached_tasks: bool = False,
    checkpoint_period: Optional[int] = None,
    keep_checkpoints: Optional[int] = 3,
    async_checkpointing: bool = True,
    log_period: int = 10,
    eval_period: int = 0,
    eval_mixture_or_task_name: Optional[str] = None,
    eval_task_feature_lengths: Optional[Mapping[str, int]] = None,
    eval_batch_size: Optional[int] = None,
    eval_num_examples: Optional[int] = None,
    eval_split: str = 'validation',
    routing_report: bool = False,
    crash_after_step: Optional[int] = None,
    devices: Optional[Sequence[Any]] = None,
) -> Dict[str, Any]:
  """Trains; returns `{'step', 'train': last logged metrics, 'eval': last eval metrics,
  'state', 'routing' (with routing_report), 'loss_history': [(step, loss)] of each logging
  window of this run}`.

  Args (gin macros of t5x in brackets):
    model: t5x model interface (MODEL).
    model_dir: checkpoints, TensorBoard events and config.gin (MODEL_DIR).
    mixture_or_task_name / task_feature_lengths / batch_size / train_steps
      (MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, BATCH_SIZE global, TRAIN_STEPS).
    mixture_or_task_module: modules that register tasks (MIXTURE_OR_TASK_MODULE).
    initial_checkpoint_path: params to start from (INITIAL_CHECKPOINT_PATH), ignored when
      `model_dir` already has a checkpoint.
    optimizer: AdamW settings (`OptimizerConfig`).
    trainable_patterns / frozen_patterns: regular expressions over parameter paths; a path
      is trained when it matches a trainable pattern and no frozen one.
    mesh_config: mesh shape (default: every device on `data`).
    checkpoint_period: steps between checkpoints (default `eval_period` or `train_steps`).
    eval_period: steps between evaluations of `eval_mixture_or_task_name` (EVAL_PERIOD;
      0: only at the end when an eval mixture is given).
    routing_report: after the final evaluation, count where the router sends each evaluation
      task's text and media tokens (training/routing_report.py): written to
      MODEL_DIR/routing.json and returned as 'routing' (needs an MoE model and an eval
      mixture).
    crash_after_step: testing only: exit the process abruptly after this step (after any
      checkpoint of that step has been written), to test resumption.
    devices: the devices of the mesh (default: all), from Python only.
  """
  started = time.time()
  pipeline.import_task_modules(
      [mixture_or_task_module]
      if isinstance(mixture_or_task_module, str)
      else mixture_or_task_module
  )
  if train_steps < 0:
    raise ValueError(f'TRAIN_STEPS must be >= 0, got {train_steps}')
  mesh = partitioning.make_mesh(mesh_config, devices)
  data_parallel = mesh.shape['data'] * mesh.shape['expert']
  if batch_size % data_parallel:
    raise ValueError(
        f'BATCH_SIZE={batch_size} is not divisible by the data x expert mesh '
        f'axes ({data_parallel} devices hold batch rows)'
    )
  if routing_report and (not eval_mixture_or_task_name or model.config.decoder.moe is None):
    # Checked here, not after training: the report runs once the steps are done.
    raise ValueError(
        'train.routing_report needs an MoE model (DecoderConfig.moe) and an '
        'evaluation mixture (EVAL_MIXTURE_OR_TASK_NAME)'
    )
  task = pipeline.get_mixture_or_task(mixture_or_task_name)
  # Media the model has no encoder for would be dropped silently: refuse before any compute.
  feature_converter.check_model_takes_media(model, task_feature_lengths)
  if getattr(model, '_vocabulary', 'unset') is None:
    model._vocabulary = task.output_features['targets'].vocabulary  # pylint: disable=protected-access
  first_pass = pipeline.FirstPass(mixture_or_task_name, task_feature_lengths, pack)
  input_shapes, input_types = first_pass.batch_specs(batch_size)
  # The data's soft tokens per item against the model's, before any compute (every batch is
  # checked again below: this row holds only the first examples of the mixture).
  first = first_pass.first_row()
  if first is not None:
    model.check_batch(first, f'MIXTURE_OR_TASK_NAME={mixture_or_task_name!r}, first row')

  abstract = train_state_lib.abstract_params(model, input_shapes, input_types)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  mask = optimizer_lib.trainable_mask(nn.meta.unbox(abstract), trainable_patterns, frozen_patterns)
  tx, schedule = optimizer_lib.make_optimizer(optimizer, max(train_steps, 1))
  rng = jax.random.PRNGKey(seed)
  init_rng, step_rng = jax.random.split(rng)

  manager = state_checkpoints.CheckpointManager(model_dir, keep_checkpoints, async_checkpointing)
  latest = None
  if manager.latest_step() is not None:
    abstract_state, shardings = train_state_lib.create_train_state(
        model, tx, mask, mesh, init_rng, input_shapes, input_types, abstract_only=True
    )
    # The newest readable step; unreadable newer ones are named and set aside.
    latest, state = manager.restore_latest(abstract_state)
    logging.info('Resuming from %s step %d', manager.directory, latest)
  else:
    state, shardings = train_state_lib.create_train_state(
        model, tx, mask, mesh, init_rng, input_shapes, input_types
    )
    if initial_checkpoint_path:
      loaded, _ = checkpoints.read_params(initial_checkpoint_path)
      state, missing = train_state_lib.load_params_into(
          state, shardings, loaded, initial_checkpoint_path
      )
      logging.info(
          'Restored %s; %d parameters keep their initialisation: %s',
          initial_checkpoint_path,
          len(missing),
          ', '.join(missing[:20]),
      )
  _write_operative_config(model_dir)
  start_step = int(jax.device_get(state.step))
  num_trainable = sum(
      int(np.prod(x.shape))
      for x in jax.tree_util.tree_leaves(optimizer_lib.split_params(state.params, mask)[0])
  )
  logging.info(
      '%d trainable parameters of %d',
      num_trainable,
      sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params)),
  )

  step_fn = train_state_lib.make_train_step(model, tx, mask, schedule, optimizer.grad_accum_steps)
  with partitioning.mesh_context(mesh):
    jit_step, batch_shardings = train_state_lib.jit_train_step(
        step_fn, mesh, shardings, input_shapes
    )

  writer = _writer(model_dir)
  evaluator = model_evaluator = None
  if eval_mixture_or_task_name:
    evaluator = evaluation.make_evaluator(
        eval_mixture_or_task_name,
        eval_task_feature_lengths or task_feature_lengths,
        split=eval_split,
        num_examples=eval_num_examples,
    )
    model_evaluator = evaluation.ModelEvaluator(
        model, mesh, shardings.params, eval_batch_size or batch_size
    )
  checkpoint_period = checkpoint_period or eval_period or train_steps

  # Resume the data stream from the checkpoint's input iterator state; without one (logged
  # by input_state), by skipping the batches already read (state_checkpoints.py).
  input_state = manager.input_state(start_step) if latest is not None else None
  batches = pipeline.train_batches(
      mixture_or_task_name,
      task_feature_lengths,
      batch_size,
      seed=seed,
      shuffle=shuffle_train_examples,
      pack=pack,
      use_cached=use_cached_tasks,
      skip_batches=0 if input_state else start_step,
  )
  if input_state:
    manager.restore_input(start_step, input_state, batches)
  logging.info(
      'Setup took %.1f s; training steps %d -> %d', time.time() - started, start_step, train_steps
  )
  tokens_per_batch = batch_size * input_shapes['decoder_target_tokens'][1]
  last_train, last_eval, window = {}, {}, None
  loss_history = []  # (step, mean loss of the logging window) of this run.
  window_start, window_steps, window_tokens = time.time(), 0, 0
  # From here a stop signal saves before exiting (interrupts.py); before, nothing is unsaved.
  with interrupts.StopSignals() as stop:
    for step in range(start_step, train_steps):
      try:
        local = next(batches)
      except StopIteration:
        # The stream repeats forever: it ends only when an epoch of the split yields nothing.
        raise ValueError(
            f'the training data of MIXTURE_OR_TASK_NAME={mixture_or_task_name!r} ended at '
            f'step {step} (BATCH_SIZE={batch_size}): an epoch of its train split yielded no '
            'example. Every example was dropped as longer than '
            f'TASK_FEATURE_LENGTHS={dict(task_feature_lengths)} (preprocessors.drop_too_long, '
            'the feature converter) or skipped as bad, or the split is empty.'
        ) from None
      model.check_batch(local, f'MIXTURE_OR_TASK_NAME={mixture_or_task_name!r}, step {step}')
      batch = {
          k: jax.make_array_from_process_local_data(batch_shardings[k], v) for k, v in local.items()
      }
      with partitioning.mesh_context(mesh):
        state, metrics = jit_step(state, batch, step_rng)
      window = _merge(window, metrics)
      window_steps += 1
      window_tokens += tokens_per_batch
      done = step + 1
      if done % log_period == 0 or done == train_steps:
        last_train = _scalars(jax.device_get(window))
        elapsed = max(time.time() - window_start, 1e-9)
        last_train['timing/steps_per_second'] = window_steps / elapsed
        last_train['timing/tokens_per_second'] = window_tokens / elapsed
        remaining = (train_steps - done) * elapsed / window_steps
        writer.write_scalars(done, last_train)
        loss_history.append((done, last_train['loss']))
        logging.info(
            'step %d/%d  loss %.4f  lr %.3g  %.2f steps/s  ETA %.0f s',
            done,
            train_steps,
            last_train['loss'],
            last_train['learning_rate'],
            last_train['timing/steps_per_second'],
            remaining,
        )
        window, window_start, window_steps, window_tokens = None, time.time(), 0, 0
      saved = done % checkpoint_period == 0 or done == train_steps
      if saved:
        manager.save(done, state, batches, force=True)
      if done != train_steps and stop.requested(done):
        if not saved:
          manager.save(done, state, batches, force=True)
        manager.wait()  # The save of this step, and any still in flight before it.
        manager.close()
        writer.flush()
        logging.warning(
            'Stopped at step %d of %d: checkpoint %s/%d written; rerun the same '
            'command to resume',
            done,
            train_steps,
            manager.directory,
            done,
        )
        raise interrupts.TrainingInterrupted(stop.signum, done)
      if evaluator is not None and eval_period and done % eval_period == 0 and done != train_steps:
        last_eval = _run_eval(evaluator, model_evaluator, state, done, writer)
      if crash_after_step is not None and done == crash_after_step:
        manager.wait()
        logging.warning('crash_after_step=%d: exiting abruptly (testing resumption)', done)
        os._exit(3)  # pylint: disable=protected-access
    if evaluator is not None:
      last_eval = _run_eval(
          evaluator, model_evaluator, state, int(jax.device_get(state.step)), writer
      )
    routing = None
    if routing_report:
      routing = _routing_report(evaluator, model_evaluator, model, state, model_dir)
    if manager.latest_step() != train_steps and train_steps > 0:
      manager.save(train_steps, state, batches, force=True)
    manager.wait()
    manager.close()
    writer.flush()
  return {
      'step': int(jax.device_get(state.step)),
      'train': last_train,
      'eval': last_eval,
      'state': state,
      'routing': routing,
      'loss_history': loss_history,
  }


def _run_eval(evaluator, model_evaluator, state, step, writer):
  results = evaluation.evaluate(evaluator, model_evaluator, state.params, step)
  flat = {
      f'eval/{task}/{name}': value
      for task, metrics in results.items()
      for name, value in metrics.items()
      if isinstance(value, (int, float))
  }
  if flat:
    writer.write_scalars(step, flat)
  for task, metrics in results.items():
    logging.info('eval step %d %s: %s', step, task, metrics)
  return results


def _routing_report(evaluator, model_evaluator, model, state, model_dir):
  """`{'layers': MoE layer indices, 'tasks': {task: {'text' | 'media': counts [moe_layers,
  experts]}}}` over the evaluation tasks."""
  started = time.time()
  model_evaluator.params = state.params
  counts = {
      task: model_evaluator.routing_counts(ds)
      for task, ds in sorted(evaluator.cached_model_datasets.items())
  }
  layers = model.config.decoder.moe_layer_indices()
  if jax.process_index() == 0:
    import json  # pylint: disable=g-import-not-at-top

    with open(os.path.join(model_dir, routing_report_lib.REPORT_FILE), 'w') as f:
      json.dump({'layers': list(layers), 'tasks': routing_report_lib.to_json(counts)}, f, indent=1)
  logging.info('routing report of %d tasks took %.1f s', len(counts), time.time() - started)
  return {'layers': list(layers), 'tasks': counts}


def _writer(model_dir: str):
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top

    return metric_writers.create_default_writer(
        os.path.join(model_dir, 'train'), just_logging=jax.process_index() > 0
    )
  except ImportError as e:  # tensorboard missing: console only, and say so.
    logging.warning('TensorBoard writer unavailable (%s); logging metrics to the console only', e)
    from clu.metric_writers import logging_writer  # pylint: disable=g-import-not-at-top

    return logging_writer.LoggingWriter()
