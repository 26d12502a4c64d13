"""Pieces every task definition shares: output features, the vocabulary, answer postprocessing.

A task's examples carry 'targets' (the whole rendered conversation) and 'loss_weights' (1 on
the assistant's answers); see unimoe_jax/data/manifest.py. For evaluation the reference is
the last answer, read from those two features; the prediction is the generated answer.

Tasks registered here also carry 'inputs_pretokenized' (the prompt text up to the last
answer, placeholders as "<image>" ...) and 'targets_pretokenized' (the last answer's text),
tf.string scalars that t5x.infer writes into each output line's "inputs"
(`preprocessors.add_pretokenized`). They are not seqio output features; the mixtures
registered here keep them (`PretokenizedMixture`).
"""

import functools
from typing import Any, Dict, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from unimoe_jax.data import feature_converter
from unimoe_jax.data import manifest as manifest_lib
from unimoe_jax.data import preprocessors
from unimoe_jax.data import vocabulary as vocabulary_lib
from unimoe_jax.modalities import MODALITIES


@gin.configurable
def vocabulary_path(path: str = gin.REQUIRED) -> str:
  """The LLaMA `tokenizer.model` of user tasks (bind `vocabulary_path.path` in gin)."""
  return path


def output_features(
    vocabulary: seqio.Vocabulary, modalities: Sequence[str] = MODALITIES
) -> Dict[str, seqio.Feature]:
  return feature_converter.output_features(vocabulary, modalities)


def last_answer(targets: np.ndarray, loss_weights: np.ndarray, vocabulary) -> str:
  """Text of the last loss-weighted run of `targets` (the final answer), without `</s>`."""
  return preprocessors.prompt_and_answer(targets, loss_weights, vocabulary)[1]


def answer_postprocessor(vocabulary):
  """seqio postprocess_fn: the reference answer from the example, the prediction stripped."""

  def postprocess(
      output: Any, example: Optional[Mapping[str, Any]] = None, is_target: bool = False
  ) -> str:
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


def register_task(
    name: str,
    source: seqio.DataSource,
    vocabulary: seqio.Vocabulary,
    metric_fns=(),
    modalities: Sequence[str] = MODALITIES,
) -> seqio.Task:
  """Registers (or replaces) a manifest-style task: examples dropped, never cut, when they
  exceed the sequence lengths (`preprocessors.drop_too_long`, gin-configurable: 'raise'
  instead for eval / infer), then the '*_pretokenized' texts added."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=source,
      output_features=output_features(vocabulary, modalities),
      preprocessors=[
          functools.partial(preprocessors.drop_too_long, task_name=name),
          preprocessors.add_pretokenized,
      ],
      postprocess_fn=answer_postprocessor(vocabulary) if metric_fns else None,
      metric_fns=list(metric_fns),
      shuffle_buffer_size=SHUFFLE_BUFFER_SIZE,
  )


def _sample_common_features(sample_fn):
  """A seqio mixture `sample_fn` that first cuts every task's examples to the features all of
  them have (tf.data samples only datasets of one structure): a '*_pretokenized' feature that
  one task lacks (e.g. one added by a user's own task) is dropped for all."""

  def sample(datasets, rates, seed):
    common = set.intersection(*(set(ds.element_spec) for ds in datasets))
    datasets = [
        ds
        if set(ds.element_spec) == common
        else ds.map(
            lambda ex: {k: v for k, v in ex.items() if k in common},
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        for ds in datasets
    ]
    return sample_fn(datasets, rates, seed)

  return sample


class PretokenizedMixture(seqio.Mixture):
  """A seqio Mixture that keeps 'inputs_pretokenized' and 'targets_pretokenized' too.

  seqio's Mixture keeps only the declared output features (plus '<feature>_pretokenized' of
  declared ones when `copy_pretokenized=True`, which t5x does not pass). The texts cannot be
  declared output features: seqio's Evaluator measures `shape[0]` of every output feature.
  """

  def __init__(self, name, tasks, default_rate=None, **kwargs):
    sample_fn = kwargs.pop(
        'sample_fn',
        functools.partial(tf.data.Dataset.sample_from_datasets, stop_on_empty_dataset=True),
    )
    super().__init__(
        name,
        tasks,
        default_rate=default_rate,
        sample_fn=_sample_common_features(sample_fn),
        **kwargs,
    )

  def get_task_dataset(self, task, output_feature_keys, *args, **kwargs) -> tf.data.Dataset:
    keys = set(output_feature_keys) | set(preprocessors.PRETOKENIZED_FEATURES)
    return super().get_task_dataset(task, keys, *args, **kwargs)


def register_mixture(name: str, tasks, default_rate=1.0) -> seqio.Mixture:
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(
      name, tasks, default_rate=default_rate, mixture_cls=PretokenizedMixture
  )


@gin.configurable
def precomputed_splits(splits: Optional[Mapping[str, str]] = None) -> Optional[Mapping[str, str]]:
  """Split -> tools/precompute_features.py output directory, bound in a task's gin scope
  (e.g. `stage3/precomputed_splits.splits = {'train': '/data/stage3_features'}`): the task
  then reads precomputed features instead of decoding media."""
  return splits


def lazy_manifest_source(
    make_config,
    splits: Mapping[str, str],
    vocabulary: vocabulary_lib.LazyVocabulary,
    make_precomputed=None,
    task_name: str = '',
) -> seqio.DataSource:
  """A manifest source whose `ManifestConfig` is built when a dataset is asked for.

  `make_config()` returns the config (e.g. reading gin or the sample-data folder); its
  `split_paths()` name the manifests. `make_precomputed()` may return split -> directory of
  precomputed features (`tools/precompute_features.py`); those splits are read from there.
  `task_name` is named in the errors of an empty or all-bad manifest.
  """

  def read_split(split, shard_info, shuffle, seed) -> tf.data.Dataset:
    precomputed = make_precomputed() if make_precomputed is not None else None
    if precomputed and split in precomputed:
      from unimoe_jax.data import precomputed as precomputed_lib  # pylint: disable=g-import-not-at-top

      return precomputed_lib.precomputed_dataset(
          precomputed[split], shard_info, shuffle=shuffle, seed=seed
      )
    config = make_config()
    paths = config.split_paths()
    if split not in paths:
      raise ValueError(f'unknown split {split!r}; this task has {sorted(paths)}')
    return manifest_lib.manifest_dataset(
        config,
        shard_info,
        manifest_path=paths[split],
        shuffle=shuffle,
        seed=seed,
        vocabulary=vocabulary.vocabulary,
        task_name=task_name,
    )

  return manifest_lib.ManifestDataSource(read_split, splits=tuple(splits))
