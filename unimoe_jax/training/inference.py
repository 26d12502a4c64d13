"""Evaluation and inference from a checkpoint: what `python -m unimoe_jax.eval` / `.infer` run.

`evaluate` runs seqio's Evaluator (training/evaluation.py, the same code the training loop
evaluates with) over the tasks of a mixture that have metrics, and writes
`output_dir/metrics-<step>.json` plus seqio's TensorBoard events (`output_dir/<task>/`).
`infer` writes one JSONL file per task, `output_dir/<task>-<step>.jsonl` (`-score.jsonl` in score
mode), one line per example:

    inputs      the prompt: the example's targets before its first loss-weighted token
    targets     the reference answer: that first loss-weighted run, without EOS
    prediction  the generated answer, up to EOS (mode 'predict')
    score       sum of log p(answer tokens | prompt) (mode 'score')

decoded with the task's vocabulary (text; a `PassThroughVocabulary` gives lists of ids).
`<step>` is the training step of the checkpoint, or `ckpt` for a converted / exported one.

Only the parameters are restored (`checkpoints.read_params`: a converted checkpoint, a
MODEL_DIR's latest step or one step directory), placed on the mesh with the shardings of the
model's logical axes, as training places them. Every process runs the same batches (the mesh
may span hosts); process 0 writes the files. Wrong inputs (CHECKPOINT_PATH,
MIXTURE_OR_TASK_NAME, MIXTURE_OR_TASK_SPLIT, TASK_FEATURE_LENGTHS, BATCH_SIZE) fail with an
error naming the macro before any parameter is read or program compiled.
"""

import json
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

from absl import logging
import flax.linen as nn
import gin
import jax
import numpy as np
import seqio

from unimoe_jax import checkpoints
from unimoe_jax import models
from unimoe_jax import partitioning
from unimoe_jax.data import feature_converter
from unimoe_jax.data import iteration
from unimoe_jax.data import pipeline
from unimoe_jax.training import evaluation
from unimoe_jax.training import train_state as train_state_lib

MODES = ('predict', 'score')


def checkpoint_step(path: Optional[str]) -> Optional[int]:
  """The training step of the checkpoint at CHECKPOINT_PATH (None for a converted or exported
  one); a FileNotFoundError naming CHECKPOINT_PATH when there is none. Reads no array."""
  return checkpoints.locate(path, 'CHECKPOINT_PATH')[1]


def _step_tag(step: Optional[int]) -> str:
  return 'ckpt' if step is None else str(step)


def tasks_with_split(mixture_or_task_name: str, split: str) -> List[seqio.Task]:
  """The tasks of the mixture (or the task) that have `split`; an error naming the macros
  when none has."""
  tasks = seqio.get_subtasks(pipeline.get_mixture_or_task(mixture_or_task_name))
  found = [t for t in tasks if split in t.splits]
  if not found:
    raise ValueError(
        f'MIXTURE_OR_TASK_SPLIT={split!r}: no task of MIXTURE_OR_TASK_NAME='
        f'{mixture_or_task_name!r} has that split (they have '
        f'{sorted({s for t in tasks for s in t.splits})})'
    )
  skipped = [t.name for t in tasks if split not in t.splits]
  if skipped:
    logging.warning('tasks without split %r are skipped: %s', split, ', '.join(skipped))
  return found


class Restored(NamedTuple):
  mesh: Any
  params: Any  # the params tree, jax.Arrays on `mesh`
  shardings: Any  # NamedShardings of `params`
  step: Optional[int]


def restore(
    model,
    checkpoint_path: str,
    tasks: Sequence[seqio.Task],
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    split: str,
    mesh_config: Optional[partitioning.MeshConfig] = None,
    devices: Optional[Sequence[Any]] = None,
) -> Restored:
  """Checks the inputs (cheap checks first), then reads the params onto the mesh.

  The params' shapes come from `model.get_initial_variables` for batches of `batch_size` rows
  of TASK_FEATURE_LENGTHS (evaluated abstractly); the checkpoint must hold every one of them.
  """
  step = checkpoint_step(checkpoint_path)
  pipeline.modalities_of(task_feature_lengths)  # Unknown features: an error naming the macro.
  # Media the model has no encoder for would be ignored silently (as in training).
  feature_converter.check_model_takes_media(model, task_feature_lengths)
  mesh = partitioning.make_mesh(mesh_config, devices)
  data_parallel = mesh.shape['data'] * mesh.shape['expert']
  if batch_size % data_parallel:
    raise ValueError(
        f'BATCH_SIZE={batch_size} is not divisible by the data x expert mesh '
        f'axes ({data_parallel} devices hold batch rows)'
    )
  for task in tasks:
    pipeline.check_examples_fit(task.name, task_feature_lengths, split)
  if getattr(model, '_vocabulary', 'unset') is None:
    model._vocabulary = tasks[0].output_features['targets'].vocabulary  # pylint: disable=protected-access

  first_pass = pipeline.FirstPass(tasks[0].name, task_feature_lengths, pack=False, split=split)
  input_shapes, input_types = first_pass.batch_specs(batch_size)
  abstract = train_state_lib.abstract_params(model, input_shapes, input_types)
  shardings = partitioning.params_shardings(mesh, abstract)
  loaded, _ = checkpoints.read_params(checkpoint_path, 'CHECKPOINT_PATH')
  source = f'CHECKPOINT_PATH={checkpoint_path}'
  # Only the shapes and dtypes of the model's params are needed: the abstract tree.
  params, missing = train_state_lib.place_params(nn.meta.unbox(abstract), shardings, loaded, source)
  if missing:
    raise ValueError(
        f'{source} lacks {len(missing)} parameters of the model (is MODEL the '
        f'model it was trained as?): {", ".join(missing[:20])}'
    )
  logging.info('Restored %s (step %s)', checkpoint_path, _step_tag(step))
  return Restored(mesh, params, shardings, step)


def _import(modules) -> None:
  pipeline.import_task_modules([modules] if isinstance(modules, str) else modules)


def _write_json(path: str, value: Any) -> None:
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(value, f, indent=2, sort_keys=True, cls=seqio.TensorAndNumpyEncoder)


@gin.configurable(denylist=['devices'])
def evaluate(
    *,
    model: Any = gin.REQUIRED,
    checkpoint_path: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    output_dir: str = gin.REQUIRED,
    split: str = 'validation',
    num_examples: Optional[int] = None,
    mixture_or_task_module: Sequence[str] = ('unimoe_jax.tasks',),
    mesh_config: Optional[partitioning.MeshConfig] = None,
    devices: Optional[Sequence[Any]] = None,
) -> Dict[str, Dict[str, Any]]:
  """The seqio metrics of each task of the mixture: `{task: {metric: value}}`.

  Args (t5x's gin macros in brackets): model (MODEL); checkpoint_path (CHECKPOINT_PATH);
  mixture_or_task_name (MIXTURE_OR_TASK_NAME): tasks without metrics or without `split` are
  skipped; task_feature_lengths (TASK_FEATURE_LENGTHS); batch_size (BATCH_SIZE, global rows);
  output_dir (EVAL_OUTPUT_DIR); split (MIXTURE_OR_TASK_SPLIT); num_examples: the first N
  examples of each task (all: None); mixture_or_task_module (MIXTURE_OR_TASK_MODULE); mesh_config
  (MESH); devices: of the mesh, from Python only.
  """
  _import(mixture_or_task_module)
  checkpoint_step(checkpoint_path)
  tasks = seqio.evaluation.get_valid_eval_tasks(
      tasks_with_split(mixture_or_task_name, split), split
  )
  if not tasks:
    raise ValueError(
        f'MIXTURE_OR_TASK_NAME={mixture_or_task_name!r} has no task with metric_fns '
        f'(nothing to evaluate); `python -m unimoe_jax.infer` writes predictions '
        f'of any task'
    )
  restored = restore(
      model, checkpoint_path, tasks, task_feature_lengths, batch_size, split, mesh_config, devices
  )
  evaluator = evaluation.make_evaluator(
      mixture_or_task_name,
      task_feature_lengths,
      split=split,
      num_examples=num_examples,
      log_dir=output_dir,
  )
  model_evaluator = evaluation.ModelEvaluator(model, restored.mesh, restored.shardings, batch_size)
  results = evaluation.evaluate(evaluator, model_evaluator, restored.params, restored.step or 0)
  for task, metrics in results.items():
    logging.info('%s: %s', task, metrics)
  path = os.path.join(output_dir, f'metrics-{_step_tag(restored.step)}.json')
  _write_json(
      path,
      {
          'checkpoint_path': os.path.abspath(checkpoint_path),
          'step': restored.step,
          'split': split,
          'metrics': results,
      },
  )
  return results


def _decode(vocabulary, ids) -> Any:
  """Text of `ids` up to (without) the first EOS or padding; JSON-ready."""
  ids = [int(i) for i in ids]
  for stop in (vocabulary.eos_id, 0):
    if stop is not None and stop in ids:
      ids = ids[: ids.index(stop)]
  text = vocabulary.decode(ids)
  return text.decode('utf-8') if isinstance(text, bytes) else text


def _answer_ids(targets: np.ndarray, weights: np.ndarray, start: int) -> np.ndarray:
  """The loss-weighted run of `targets` that starts at `start` (the answer to the prompt)."""
  end = start
  while end < len(targets) and weights[end] > 0:
    end += 1
  return targets[start:end]


@gin.configurable(denylist=['devices'])
def infer(
    *,
    model: Any = gin.REQUIRED,
    checkpoint_path: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    output_dir: str = gin.REQUIRED,
    split: str = 'validation',
    mode: str = 'predict',
    num_examples: Optional[int] = None,
    mixture_or_task_module: Sequence[str] = ('unimoe_jax.tasks',),
    mesh_config: Optional[partitioning.MeshConfig] = None,
    devices: Optional[Sequence[Any]] = None,
) -> Dict[str, str]:
  """Writes the JSONL file of each task of the mixture (module docstring); returns
  `{task: path}`.

  Args: as `evaluate`, with output_dir (INFER_OUTPUT_DIR) and mode: 'predict' (greedy or
  as `UniMoEModel`'s decode_method says) or 'score'. Examples that do not fit
  TASK_FEATURE_LENGTHS are skipped, with a warning each (the converter would drop them).
  """
  if mode not in MODES:
    raise ValueError(f'infer.mode must be one of {MODES}, got {mode!r}')
  _import(mixture_or_task_module)
  checkpoint_step(checkpoint_path)
  tasks = tasks_with_split(mixture_or_task_name, split)
  restored = restore(
      model, checkpoint_path, tasks, task_feature_lengths, batch_size, split, mesh_config, devices
  )
  model_evaluator = evaluation.ModelEvaluator(model, restored.mesh, restored.shardings, batch_size)
  model_evaluator.params = restored.params
  run = model_evaluator.predict_fn if mode == 'predict' else model_evaluator.score_fn
  suffix = '' if mode == 'predict' else '-score'
  lengths = dict(task_feature_lengths)
  paths = {}
  for task in tasks:
    # A first converter only filters, with the converter's own rule: the second then drops
    # nothing, so model rows stay aligned with the task examples written next to them.
    gate = pipeline.feature_converter(lengths, pack=False)
    max_items = {m: lengths[f'{m}_features'] for m in gate.modalities}
    ds = task.get_dataset(
        sequence_length=lengths,
        split=split,
        shuffle=False,
        num_epochs=1,
        use_cached=False,
        trim_output_features=False,
    )
    if num_examples is not None:
      ds = ds.take(num_examples)
    # Cached: the examples are read (and their media decoded) once, for both passes.
    fits = gate.fits_alone_or_record_drop
    ds = ds.filter(lambda ex, fits=fits: fits(ex, lengths['targets'], max_items)).cache()
    model_ds = pipeline.feature_converter(lengths, pack=False)(ds, lengths)
    outputs = dict(run(model_ds.enumerate()))
    vocabulary = task.output_features['targets'].vocabulary
    path = os.path.join(output_dir, f'{task.name}-{_step_tag(restored.step)}{suffix}.jsonl')
    if jax.process_index() == 0:
      os.makedirs(output_dir, exist_ok=True)
      with open(path, 'w') as f:
        for index, ex in enumerate(iteration.numpy_iterator(ds)):
          targets, weights = ex['targets'], ex['loss_weights']
          start = int(
              models.prompt_lengths(
                  {'decoder_target_tokens': targets[None], 'decoder_loss_weights': weights[None]}
              )[0]
          )
          line = {
              'inputs': _decode(vocabulary, targets[:start]),
              'targets': _decode(vocabulary, _answer_ids(targets, weights, start)),
          }
          if mode == 'predict':
            line['prediction'] = _decode(vocabulary, outputs[index])
          else:
            line['score'] = outputs[index]
          f.write(json.dumps(line, cls=seqio.TensorAndNumpyEncoder) + '\n')
    logging.info(
        '%s: %d examples -> %s (%d skipped: longer than TASK_FEATURE_LENGTHS)',
        task.name,
        len(outputs),
        path,
        gate.dropped_examples.total,
    )
    paths[task.name] = path
  return paths
