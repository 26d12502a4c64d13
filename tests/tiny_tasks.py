"""A tiny, deterministic, text-only seqio task for the training tests: `unimoe_test_lm`.

Examples are built in Python (no files): `targets` = BOS (1), a motif of 3-5 ids repeated to
a length of 16-40 tokens, EOS (2); `loss_weights` = 1 on the second half. The motifs come from
a pool of 8 over ids [3, 67), so the data is learnable within a few steps (the loss drops from
ln(512) ~ 6.2 towards the entropy of the motif pool). Splits: train (256 examples) and
validation (32), each from its own seeded generator, so every process builds the same data.

`unimoe_test_lm_indexed`: the same train examples, built the way a manifest source builds
them (record indices, sharded by process, shuffled, then one `tf.numpy_function` call per
example in a parallel deterministic map, seqio's shuffle buffer 16 as tasks/common.py), so its
tf.data iterator can be checkpointed (`from_generator`'s cannot). `DECODED` counts the calls,
the stand-in for media decoding: `DECODED['stream']` those of datasets built with a
`seqio.ShardInfo` (the training stream, `pipeline.train_batches`), `DECODED['other']` the rest
(`pipeline.check_examples_fit`'s sample).

Also: `generator_dataset(data)`, text examples as a dataset that cannot be checkpointed;
`read_scalars(model_dir)`, the TensorBoard scalars `loop.train` wrote, by step;
`parse_cli_gin(argv, description)`, a CLI's flags and gin configuration parsed in this process.
Importing this module registers the task (idempotent); the CLI imports it through
`--gin.MIXTURE_OR_TASK_MODULE="'tiny_tasks'"` with tests/ on PYTHONPATH.
"""

import collections
import glob
import os
import threading
from typing import Dict, Optional

import numpy as np
import seqio
import tensorflow as tf

from unimoe_jax.data.feature_converter import output_features

TASK_NAME = 'unimoe_test_lm'
VOCAB_SIZE = 512  # gin/models/tiny.gin and config.SIZES['tiny'].
BOS_ID, EOS_ID = 1, 2
VOCABULARY = seqio.PassThroughVocabulary(size=VOCAB_SIZE, eos_id=EOS_ID)
NUM_EXAMPLES = {'train': 256, 'validation': 32}
MIN_LENGTH, MAX_LENGTH = 16, 40
FEATURE_LENGTHS = {'targets': 64}  # Every example fits; ~2 examples per packed row.


def examples(split: str):
  """The split's examples as a list of numpy dicts (deterministic)."""
  rng = np.random.RandomState({'train': 0, 'validation': 1}[split])
  pool = [rng.randint(3, 67, size=rng.randint(3, 6)).astype(np.int32) for _ in range(8)]
  out = []
  for _ in range(NUM_EXAMPLES[split]):
    length = rng.randint(MIN_LENGTH, MAX_LENGTH + 1)
    motif = pool[rng.randint(len(pool))]
    body = np.resize(motif, length - 2)
    targets = np.concatenate([[BOS_ID], body, [EOS_ID]]).astype(np.int32)
    weights = np.zeros(length, np.float32)
    weights[length // 2 :] = 1.0
    out.append({'targets': targets, 'loss_weights': weights})
  return out


TEXT_SIGNATURE = {
    'targets': tf.TensorSpec([None], tf.int32),
    'loss_weights': tf.TensorSpec([None], tf.float32),
}


def generator_dataset(data) -> tf.data.Dataset:
  """`data`, numpy dicts of `targets` int32 [length] and `loss_weights` float32 [length], as a
  `from_generator` dataset (whose iterator state cannot be checkpointed)."""
  return tf.data.Dataset.from_generator(lambda: iter(data), output_signature=TEXT_SIGNATURE)


def _dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
  del shuffle_files, seed  # One "file"; seqio shuffles examples itself.
  return generator_dataset(examples(split))


INDEXED_TASK_NAME = 'unimoe_test_lm_indexed'
DECODED = collections.Counter()
_DECODED_LOCK = threading.Lock()


def _read_indexed(
    split: str, shard_info: Optional[seqio.ShardInfo], shuffle: bool, seed: Optional[int]
) -> tf.data.Dataset:
  """`manifest.ReadSplit` of the indexed task."""
  data = examples(split)
  kind = 'stream' if shard_info is not None else 'other'

  def decode(index):
    with _DECODED_LOCK:
      DECODED[kind] += 1
    example = data[int(index)]
    return example['targets'], example['loss_weights']

  def decode_tf(index):
    targets, weights = tf.numpy_function(decode, [index], [tf.int32, tf.float32], stateful=False)
    targets.set_shape([None])
    weights.set_shape([None])
    return {'targets': targets, 'loss_weights': weights}

  ds = tf.data.Dataset.range(len(data))
  if shard_info is not None and shard_info.num_shards > 1:
    ds = ds.shard(shard_info.num_shards, shard_info.index)
  if shuffle:
    ds = ds.shuffle(len(data), seed=seed, reshuffle_each_iteration=True)
  return ds.map(decode_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def register() -> None:
  if TASK_NAME not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        TASK_NAME,
        source=seqio.FunctionDataSource(
            _dataset_fn, splits=tuple(NUM_EXAMPLES), num_input_examples=dict(NUM_EXAMPLES)
        ),
        preprocessors=[],
        output_features=output_features(VOCABULARY, modalities=()),
    )
  if INDEXED_TASK_NAME not in seqio.TaskRegistry.names():
    from unimoe_jax.data import manifest  # pylint: disable=g-import-not-at-top
    # No num_input_examples: seqio would cache a source that small in memory (and put the
    # whole cache into every iterator state); manifest sources declare none either.
    seqio.TaskRegistry.add(
        INDEXED_TASK_NAME,
        source=manifest.ManifestDataSource(_read_indexed, splits=tuple(NUM_EXAMPLES)),
        preprocessors=[],
        output_features=output_features(VOCABULARY, modalities=()),
        shuffle_buffer_size=16,
    )


register()


def read_scalars(model_dir: str, subdir: str = 'train') -> Dict[int, Dict[str, float]]:
  """{step: {tag: value}} from the TensorBoard event files of `model_dir/subdir`."""
  out: Dict[int, Dict[str, float]] = {}
  for path in sorted(glob.glob(os.path.join(model_dir, subdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('simple_value'):
          number = value.simple_value
        else:
          number = float(tf.make_ndarray(value.tensor))
        out.setdefault(int(event.step), {})[value.tag] = number
  return out


def parse_cli_gin(argv, description: str):
  """Parses `argv` as the CLIs parse their flags (`train.parse_flags`), then their gin files and
  bindings into a cleared gin config, importing the task modules the bindings name, as
  `train.setup` does (without its logging and `jax.distributed` set-up). Returns the flags; the
  caller clears gin's config when done."""
  import gin  # pylint: disable=g-import-not-at-top
  from unimoe_jax import train  # pylint: disable=g-import-not-at-top

  args = train.parse_flags(argv, description)
  gin.clear_config()
  train.parse_gin(args)
  return args


def tiny_model(moe: bool = False, **model_kwargs):
  """The tiny decoder (gin/models/tiny.gin), optionally with a 4-expert top-2 dropless MoE."""
  from unimoe_jax import config, models  # pylint: disable=g-import-not-at-top
  from unimoe_jax.network import UniMoEConfig  # pylint: disable=g-import-not-at-top

  moe_config = (
      config.MoEConfig(num_experts=4, num_experts_per_tok=2, dispatch='dropless') if moe else None
  )
  return models.UniMoEModel(
      UniMoEConfig(decoder=config.named('tiny', moe=moe_config)), **model_kwargs
  )


def train_kwargs(
    model_dir: str,
    *,
    moe: bool = False,
    learning_rate: float = 3e-3,
    mesh: Optional[tuple] = None,
    **overrides
):
  """Keyword arguments of `loop.train` for a short run of the tiny model on `unimoe_test_lm`.

  `mesh`: (data, expert, model) for `MeshConfig`, default every device on `data`. Metrics
  are logged every step; checkpoints are written synchronously.
  """
  from unimoe_jax import partitioning  # pylint: disable=g-import-not-at-top
  from unimoe_jax.training import optimizer  # pylint: disable=g-import-not-at-top

  kwargs = dict(
      model=tiny_model(moe),
      model_dir=model_dir,
      mixture_or_task_name=TASK_NAME,
      mixture_or_task_module=('tiny_tasks',),
      task_feature_lengths=dict(FEATURE_LENGTHS),
      batch_size=8,
      train_steps=4,
      optimizer=optimizer.OptimizerConfig(learning_rate=learning_rate, warmup_steps=0),
      mesh_config=partitioning.MeshConfig(*mesh) if mesh else None,
      log_period=1,
      async_checkpointing=False,
  )
  kwargs.update(overrides)
  return kwargs
