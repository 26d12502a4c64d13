"""Pieces every task definition shares: output features, the vocabulary, answer postprocessing.

A task's examples carry 'targets' (the whole rendered conversation) and 'loss_weights' (1 on
the assistant's answers); see unimoe_jax/data/manifest.py. For evaluation the reference is
the last answer, read from those two features; the prediction is the generated answer.
"""

from typing import Any, Dict, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from unimoe_jax.data import feature_converter
from unimoe_jax.data import manifest as manifest_lib
from unimoe_jax.data import vocabulary as vocabulary_lib

MODALITIES = manifest_lib.MODALITIES


@gin.configurable
def vocabulary_path(path: str = gin.REQUIRED) -> str:
  """The LLaMA `tokenizer.model` of user tasks (bind `vocabulary_path.path` in gin)."""
  return path


def output_features(vocabulary: seqio.Vocabulary, modalities: Sequence[str] = MODALITIES
                    ) -> Dict[str, seqio.Feature]:
  return feature_converter.output_features(vocabulary, modalities)


def last_answer(targets: np.ndarray, loss_weights: np.ndarray, vocabulary) -> str:
  """Text of the last loss-weighted run of `targets` (the final answer), without `</s>`."""
  targets, weights = np.asarray(targets), np.asarray(loss_weights)
  on = np.nonzero(weights > 0)[0]
  if on.size == 0:
    return ''
  # Runs are separated by unweighted tokens; the last run starts after the last gap.
  gaps = np.nonzero(np.diff(on) > 1)[0]
  start = on[gaps[-1] + 1] if gaps.size else on[0]
  ids = [int(t) for t in targets[start:on[-1] + 1] if int(t) != vocabulary.eos_id]
  return vocabulary.decode(ids).strip()


def answer_postprocessor(vocabulary):
  """seqio postprocess_fn: the reference answer from the example, the prediction stripped."""

  def postprocess(output: Any, example: Optional[Mapping[str, Any]] = None,
                  is_target: bool = False) -> str:
    if is_target and example is not None and 'loss_weights' in example:
      return last_answer(example['targets'], example['loss_weights'], vocabulary)
    if isinstance(output, bytes):
      output = output.decode('utf-8')
    return str(output).replace('</s>', '').strip()

  return postprocess


# Manifest sources already shuffle every record index each epoch (and precomputed ones shuffle
# files, then a buffer): seqio's own 1,000-example buffer after them only delays the first batch
# by decoding a thousand examples' media per task.
SHUFFLE_BUFFER_SIZE = 16


def register_task(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary,
                  metric_fns=(), modalities: Sequence[str] = MODALITIES) -> seqio.Task:
  """Registers (or replaces) a manifest-style task: examples dropped, never cut, when they
  exceed the sequence lengths (`preprocessors.drop_too_long`)."""
  from unimoe_jax.data import preprocessors  # pylint: disable=g-import-not-at-top
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source, output_features=output_features(vocabulary, modalities),
      preprocessors=[preprocessors.drop_too_long],
      postprocess_fn=answer_postprocessor(vocabulary) if metric_fns else None,
      metric_fns=list(metric_fns), shuffle_buffer_size=SHUFFLE_BUFFER_SIZE)


def register_mixture(name: str, tasks, default_rate=1.0) -> seqio.Mixture:
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, tasks, default_rate=default_rate)


@gin.configurable
def precomputed_splits(splits: Optional[Mapping[str, str]] = None
                       ) -> Optional[Mapping[str, str]]:
  """Split -> tools/precompute_features.py output directory, bound in a task's gin scope
  (e.g. `stage3/precomputed_splits.splits = {'train': '/data/stage3_features'}`): the task
  then reads precomputed features instead of decoding media."""
  return splits


def lazy_manifest_source(make_config, splits: Mapping[str, str],
                         vocabulary: vocabulary_lib.LazyVocabulary,
                         make_precomputed=None) -> seqio.DataSource:
  """A manifest source whose `ManifestConfig` is built when a dataset is asked for.

  `make_config()` returns the config (e.g. reading gin or the sample-data folder); its
  `split_paths()` name the manifests. `make_precomputed()` may return split -> directory of
  precomputed features (`tools/precompute_features.py`); those splits are read from there.
  """

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None,
                 shard_info: Optional[seqio.ShardInfo] = None) -> tf.data.Dataset:
    precomputed = make_precomputed() if make_precomputed is not None else None
    if precomputed and split in precomputed:
      from unimoe_jax.data import precomputed as precomputed_lib  # pylint: disable=g-import-not-at-top
      return precomputed_lib.precomputed_dataset(precomputed[split], shard_info,
                                                 shuffle=shuffle_files, seed=seed)
    config = make_config()
    paths = config.split_paths()
    if split not in paths:
      raise ValueError(f'unknown split {split!r}; this task has {sorted(paths)}')
    return manifest_lib.manifest_dataset(config, shard_info, manifest_path=paths[split],
                                         shuffle=shuffle_files, seed=seed,
                                         vocabulary=vocabulary.vocabulary)

  return manifest_lib.ManifestDataSource(dataset_fn, splits=tuple(splits))
