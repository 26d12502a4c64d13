"""Tiny random models for the tests: weights drawn in the shapes of a module's parameters."""

import flax.linen as nn
import jax
import numpy as np


def random_params(module: nn.Module, *inputs, scale: float, seed: int):
  """`module`'s params (the shapes of `module.init(key, *inputs)['params']`, computed without
  running it) as float32 numpy normals of std `scale`, drawn leaf by leaf in tree order from
  `np.random.RandomState(seed)`: larger than the init's, so that logits are far apart."""
  shapes = nn.meta.unbox(
      jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs)['params'])
  )
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_unflatten(
      tree, [(scale * rng.randn(*x.shape)).astype(np.float32) for x in leaves]
  )


def tiny_audio_towers(speech_queries: int, audio_queries: int, **whisper_overrides):
  """The tiny speech and audio towers at one layer each (compile time dominates the tests that
  use them), as `UniMoEConfig` fields: the Whisper encoder (`whisper_overrides` on its 'tiny'
  size) and its aligner over `speech_queries` queries at the encoder's width, BEATs and its
  Q-Former over `audio_queries` queries reading BEATs' output width."""
  from unimoe_jax.connectors import qformer  # pylint: disable=g-import-not-at-top
  from unimoe_jax.connectors import whisper_aligner  # pylint: disable=g-import-not-at-top
  from unimoe_jax.encoders import beats  # pylint: disable=g-import-not-at-top
  from unimoe_jax.encoders import whisper  # pylint: disable=g-import-not-at-top

  speech = whisper.named('tiny', num_layers=1, **whisper_overrides)
  audio = beats.named('tiny', encoder_layers=1)
  return dict(
      speech_encoder=speech,
      speech_aligner=whisper_aligner.named(
          'tiny', num_query_tokens=speech_queries, num_layers=1, d_model=speech.d_model
      ),
      audio_encoder=audio,
      audio_qformer=qformer.named(
          'tiny',
          num_query_tokens=audio_queries,
          num_layers=1,
          encoder_hidden_size=audio.encoder_embed_dim,
      ),
  )
