"""Evaluation with seqio's Evaluator: the model's predict / score functions over a mixture.

Every process builds the same (unsharded) evaluation batches and places its own shards of them
(`make_array_from_callback`), so the jitted predict step runs collectively on a multi-host mesh
and its replicated outputs are read on every host; process 0 computes the metrics.
"""

import time
from typing import Dict, Mapping, Optional

from absl import logging
import jax
import numpy as np
import seqio
from jax.sharding import NamedSharding, PartitionSpec

from unimoe_jax import partitioning
from unimoe_jax.data import pipeline
from unimoe_jax.data.feature_converter import MultimodalDecoderFeatureConverter
from unimoe_jax.training import routing_report


def global_batch(mesh, batch: Mapping[str, np.ndarray]) -> Dict[str, jax.Array]:
  """A host-complete numpy batch -> global arrays split on the batch axes of the mesh."""
  return {
      key: jax.make_array_from_callback(
          value.shape, partitioning.batch_sharding(mesh, value.ndim), lambda i, v=value: v[i]
      )
      for key, value in batch.items()
  }


class ModelEvaluator:
  """Runs `model.predict_batch_with_aux` / `score_batch` for a seqio Evaluator."""

  def __init__(self, model, mesh, params_shardings, batch_size: int):
    self.model, self.mesh, self.batch_size = model, mesh, batch_size
    replicated = NamedSharding(mesh, PartitionSpec())
    with partitioning.mesh_context(mesh):
      self._predict = jax.jit(
          lambda params, batch: model.predict_batch_with_aux(params, batch),
          in_shardings=(params_shardings, None),
          out_shardings=replicated,
      )
      self._score = jax.jit(
          model.score_batch, in_shardings=(params_shardings, None), out_shardings=replicated
      )
    self.params = None
    self._intermediates = None  # routing_counts' program, built on its first call.
    self._num_examples: Dict[str, int] = {}  # By task: the evaluation data do not change.

  def _batches(self, ds):
    # Enumerated datasets hold (index, features) pairs; make them one dict for batching.
    ds = ds.map(lambda index, features: dict(features, _index=index))
    for batch, n in pipeline.batched_with_padding(ds, self.batch_size):
      self.model.check_batch(batch, 'evaluation batch')
      yield batch, n

  def predict_fn(self, ds, model_feature_shapes=None):
    del model_feature_shapes
    out, started, done = [], time.time(), 0
    for batch, n in self._batches(ds):
      index = batch.pop('_index')
      with partitioning.mesh_context(self.mesh):
        decodes, _ = self._predict(self.params, global_batch(self.mesh, batch))
      decodes = np.asarray(decodes)
      out.extend((int(index[i]), decodes[i].tolist()) for i in range(n))
      done += n
      logging.info(
          'predict: %d examples, %.1f examples/s', done, done / max(time.time() - started, 1e-9)
      )
    return out

  def score_fn(self, ds, model_feature_shapes=None):
    del model_feature_shapes
    out = []
    for batch, n in self._batches(ds):
      index = batch.pop('_index')
      with partitioning.mesh_context(self.mesh):
        scores = np.asarray(self._score(self.params, global_batch(self.mesh, batch)))
      out.extend((int(index[i]), float(scores[i])) for i in range(n))
    return out

  def routing_counts(self, ds) -> Dict[str, np.ndarray]:
    """`{'text' | 'media': counts [moe_layers, experts]}` of the router's top-k choices over an
    (enumerated) evaluation dataset, teacher-forced on prompt and reference answer
    (training/routing_report.py)."""
    cfg = self.model.module.config.decoder
    if self._intermediates is None:
      with partitioning.mesh_context(self.mesh):
        self._intermediates = jax.jit(
            lambda params, batch: self.model.module.apply(
                {'params': params}, batch, deterministic=True, mutable=['intermediates']
            )[1]['intermediates'],
            out_shardings=NamedSharding(self.mesh, PartitionSpec()),
        )
    total: Dict[str, np.ndarray] = {}
    for batch, n in self._batches(ds):
      batch.pop('_index')
      with partitioning.mesh_context(self.mesh):
        sown = self._intermediates(self.params, global_batch(self.mesh, batch))
      indices = routing_report.router_choices(jax.device_get(sown), cfg.scan_period() or 1)
      groups = routing_report.token_groups({k: v[:n] for k, v in batch.items()})
      routing_report.add_counts(
          total, routing_report.count_choices(indices[:, :n], groups, cfg.moe.num_experts)
      )
    return total

  def num_examples(self, task: str, ds) -> int:
    """How many examples `task`'s (enumerated) evaluation dataset holds, counted once."""
    if task not in self._num_examples:
      self._num_examples[task] = int(ds.reduce(np.int64(0), lambda count, *_: count + 1))
    return self._num_examples[task]


class _EvalFeatureConverter(MultimodalDecoderFeatureConverter):
  """seqio's Evaluator passes a length for every output feature it measured (loss_weights,
  audio_feature_mask ...); the converter takes only its task features' lengths."""

  def __call__(self, ds, task_feature_lengths):
    lengths = {k: v for k, v in task_feature_lengths.items() if k in self.TASK_FEATURES}
    return super().__call__(ds, lengths)


def make_evaluator(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    split: str = 'validation',
    num_examples: Optional[int] = None,
    log_dir: Optional[str] = None,
) -> seqio.Evaluator:
  converter = _EvalFeatureConverter(
      pack=False, modalities=pipeline.modalities_of(task_feature_lengths)
  )
  loggers = (seqio.TensorBoardLoggerV1,) if log_dir else ()
  return seqio.Evaluator(
      mixture_or_task_name,
      feature_converter=converter,
      eval_split=split,
      use_cached=False,
      sequence_length=dict(task_feature_lengths),
      num_examples=num_examples,
      logger_cls=loggers,
      log_dir=log_dir,
      async_compute_metrics=False,
  )


def evaluate(
    evaluator: seqio.Evaluator, model_evaluator: ModelEvaluator, params, step: int
) -> Dict[str, Dict[str, float]]:
  """{task: {metric: value}} for the params given; metrics are computed on process 0 only."""
  model_evaluator.params = params
  started = time.time()
  metrics, _ = evaluator.evaluate(
      compute_metrics=jax.process_index() == 0,
      step=step,
      predict_fn=model_evaluator.predict_fn,
      score_fn=model_evaluator.score_fn,
  )
  result = metrics.result() if metrics is not None else {}
  logging.info('evaluation at step %d took %.1f s', step, time.time() - started)
  out = {task: {k: _scalar(v) for k, v in m.items()} for task, m in (result or {}).items()}
  for task, m in out.items():  # What each score rests on.
    m['num_examples'] = float(
        model_evaluator.num_examples(task, evaluator.cached_model_datasets[task])
    )
  return out


def _scalar(value):
  value = getattr(value, 'value', value)
  try:
    return float(value)
  except (TypeError, ValueError):
    return value
