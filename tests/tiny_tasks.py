"""A tiny, deterministic, text-only seqio task for the training tests: `unimoe_test_lm`.

Examples are built in Python (no files): `targets` = BOS (1), a motif of 3-5 ids repeated to
a length of 16-40 tokens, EOS (2); `loss_weights` = 1 on the second half. The motifs come from
a pool of 8 over ids [3, 67), so the data is learnable within a few steps (the loss drops from
ln(512) ~ 6.2 towards the entropy of the motif pool). Splits: train (256 examples) and
validation (32), each from its own seeded generator, so every process builds the same data.

Also: `read_scalars(model_dir)`, the TensorBoard scalars `loop.train` wrote, by step.
Importing this module registers the task (idempotent); the CLI imports it through
`--gin.MIXTURE_OR_TASK_MODULE="'tiny_tasks'"` with tests/ on PYTHONPATH.
"""

import glob
import os
from typing import Dict, Optional

import numpy as np
import seqio
import tensorflow as tf

from unimoe_jax.data.feature_converter import output_features

TASK_NAME = 'unimoe_test_lm'
VOCAB_SIZE = 512          # gin/models/tiny.gin and config.SIZES['tiny'].
BOS_ID, EOS_ID = 1, 2
VOCABULARY = seqio.PassThroughVocabulary(size=VOCAB_SIZE, eos_id=EOS_ID)
NUM_EXAMPLES = {'train': 256, 'validation': 32}
MIN_LENGTH, MAX_LENGTH = 16, 40
FEATURE_LENGTHS = {'targets': 64}   # Every example fits; ~2 examples per packed row.


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
    weights[length // 2:] = 1.0
    out.append({'targets': targets, 'loss_weights': weights})
  return out


def _dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
  del shuffle_files, seed  # One "file"; seqio shuffles examples itself.
  data = examples(split)
  return tf.data.Dataset.from_generator(
      lambda: iter(data),
      output_signature={'targets': tf.TensorSpec([None], tf.int32),
                        'loss_weights': tf.TensorSpec([None], tf.float32)})


def register() -> None:
  if TASK_NAME in seqio.TaskRegistry.names():
    return
  seqio.TaskRegistry.add(
      TASK_NAME,
      source=seqio.FunctionDataSource(_dataset_fn, splits=tuple(NUM_EXAMPLES),
                                      num_input_examples=dict(NUM_EXAMPLES)),
      preprocessors=[],
      output_features=output_features(VOCABULARY, modalities=()))


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


def tiny_model(moe: bool = False, **model_kwargs):
  """The tiny decoder (gin/models/tiny.gin), optionally with a 4-expert top-2 dropless MoE."""
  from unimoe_jax import config, models  # pylint: disable=g-import-not-at-top
  from unimoe_jax.model import UniMoEConfig  # pylint: disable=g-import-not-at-top
  moe_config = (config.MoEConfig(num_experts=4, num_experts_per_tok=2, dispatch='dropless')
                if moe else None)
  return models.UniMoEModel(UniMoEConfig(decoder=config.named('tiny', moe=moe_config)),
                            **model_kwargs)


def train_kwargs(model_dir: str, *, moe: bool = False, learning_rate: float = 3e-3,
                 mesh: Optional[tuple] = None, **overrides):
  """Keyword arguments of `loop.train` for a short run of the tiny model on `unimoe_test_lm`.

  `mesh`: (data, expert, model) for `MeshConfig`, default every device on `data`. Metrics
  are logged every step; checkpoints are written synchronously.
  """
  from unimoe_jax import partitioning  # pylint: disable=g-import-not-at-top
  from unimoe_jax.training import optimizer  # pylint: disable=g-import-not-at-top
  kwargs = dict(
      model=tiny_model(moe), model_dir=model_dir, mixture_or_task_name=TASK_NAME,
      mixture_or_task_module=('tiny_tasks',), task_feature_lengths=dict(FEATURE_LENGTHS),
      batch_size=8, train_steps=4,
      optimizer=optimizer.OptimizerConfig(learning_rate=learning_rate, warmup_steps=0),
      mesh_config=partitioning.MeshConfig(*mesh) if mesh else None,
      log_period=1, async_checkpointing=False)
  kwargs.update(overrides)
  return kwargs
