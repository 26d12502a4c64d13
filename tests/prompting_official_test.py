"""Prompts as official Uni-MoE inference builds them: placeholder order, long speech / audio."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe_jax import checkpoints
from unimoe_jax.serving import prompting
from unimoe_jax.serving import scoring
from unimoe_jax import config as config_lib
from unimoe_jax.convert import llava
from unimoe_jax.data import conversation
from unimoe_jax.media import audio as audio_lib
from unimoe_jax.network import UniMoE, UniMoEConfig

from tiny_models import tiny_audio_towers  # noqa: E402

sf = pytest.importorskip('soundfile')
spm = pytest.importorskip('sentencepiece')

WINDOW = 16000  # the tiny Whisper encoder's window: 1 s (100 log-mel frames)


def tiny_config(**overrides):
  fields = dict(
      decoder=config_lib.named(
          'tiny', vocab_size=300, embed_dim=32, num_layers=1, num_heads=2, mlp_dim=48
      ),
      **tiny_audio_towers(3, 4, max_source_positions=50),
  )
  fields.update(overrides)
  return UniMoEConfig(**fields)


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory):
  corpus = [
      'the sound of a cat',
      'what is the sound',
      'a dog barks in the park',
      conversation.SYSTEM,
      'USER: what is it? ASSISTANT: a cat',
  ]
  from unimoe_jax.data import vocabulary  # pylint: disable=g-import-not-at-top

  # LLaMA's settings (byte fallback, identity normalisation): "\n" between placeholders stays.
  return vocabulary.train_sentencepiece(
      corpus * 10,
      os.path.join(str(tmp_path_factory.mktemp('spm')), 'tokenizer.model'),
      vocab_size=300,
      add_dummy_prefix=True,
  )


def _wav(path, samples, seed=0):
  wave = 0.3 * np.random.default_rng(seed).standard_normal(samples).astype(np.float32)
  sf.write(str(path), wave, 16000, subtype='FLOAT')
  return str(path), wave


def _runs(ids, token):
  """Lengths of the runs of `token` in `ids`."""
  runs, count = [], 0
  for t in list(ids) + [None]:
    if t == token:
      count += 1
    elif count:
      runs.append(count)
      count = 0
  return runs


# ---------------------------------------------------------------------------------------------
# Placeholder order.


def test_placeholders_without_tags_follow_the_official_order():
  # Official inference_all.py: "<image>\n" + "<audio>\n" + "<video>\n" + query.
  media = {'video': ['v.mp4'], 'audio': ['a.wav'], 'image': ['i.png']}
  assert prompting.place_placeholders('What?', media) == '<image>\n<audio>\n<video>\nWhat?'
  assert prompting.place_placeholders('What?', {'video': ['v'], 'speech': ['s']}) == (
      '<speech>\n<video>\nWhat?'
  )
  # Both voice kinds (ours; an official model has one): speech, then audio, between the two.
  both = {'image': ['i'], 'speech': ['s1', 's2'], 'audio': ['a'], 'video': ['v']}
  assert prompting.place_placeholders('Q', both) == (
      '<image>\n<speech>\n<speech>\n<audio>\n<video>\nQ'
  )
  # Tags in the text stay where they are written.
  assert (
      prompting.place_placeholders('<video> then <image>', {'image': ['i'], 'video': ['v']})
      == '<video> then <image>'
  )


def test_generation_prompt_is_the_official_one(tokenizer_path):
  """The rendered generation prompt of an image + audio + video question equals official
  `initial_input`'s conversation: human "<image>\\n<audio>\\n<video>\\n" + query, empty gpt."""
  placed = prompting.place_placeholders(
      'what is it?', {'image': ['i'], 'audio': ['a'], 'video': ['v']}
  )
  official = [
      {'from': 'human', 'value': '<image>\n' + '<audio>\n' + '<video>\n' + 'what is it?'},
      {'from': 'gpt', 'value': ''},
  ]
  assert conversation.prompt_text(
      [{'from': 'human', 'value': placed}, {'from': 'gpt', 'value': ''}]
  ) == conversation.prompt_text(official)
  assert conversation.prompt_text(official).endswith(
      'USER: <image>\n<audio>\n<video>\nwhat is it? ASSISTANT:'
  )


# ---------------------------------------------------------------------------------------------
# Long speech and audio: every chunk, as the official loaders cut them.


def test_long_speech_keeps_every_chunk_and_long_audio_twenty(tmp_path, tokenizer_path):
  cfg = tiny_config()
  tokenizer = prompting.PromptTokenizer(tokenizer_path, cfg)
  # Speech: pieces of window + 1 samples (480001 for Whisper's 30 s); 3.2 windows -> 4 pieces.
  speech, speech_wave = _wav(tmp_path / 'speech.wav', int(3.2 * WINDOW), 1)
  # Audio: 480000-sample pieces, at most 20: 21 full pieces and a bit -> 20.
  audio, _ = _wav(tmp_path / 'audio.wav', 21 * 480000 + 7, 2)
  short, short_wave = _wav(tmp_path / 'short.wav', 8000, 3)
  prompt = prompting.build_prompt(
      'what is it?', {'speech': [speech], 'audio': [audio, short]}, cfg, tokenizer
  )
  batch = prompt.batch
  assert batch['speech_features'].shape == (1, 4, 100, 80)
  assert batch['audio_features'].shape == (1, 21, 2998, 128)
  assert batch['audio_feature_mask'].shape == (1, 21, 2998)
  assert batch['speech_mask'].all() and batch['audio_mask'].all()
  for k in range(4):  # each piece is its own window; the 16001st sample is dropped
    piece = speech_wave[k * (WINDOW + 1) : k * (WINDOW + 1) + WINDOW]
    np.testing.assert_array_equal(
        batch['speech_features'][0, k], audio_lib.whisper_log_mel(piece, 80, chunk_seconds=1)
    )
  # 20 full pieces, then the short file padded the official way (UniMoEConfig default).
  assert batch['audio_feature_mask'][0, :20].all()
  fbank, mask = audio_lib.beats_chunk_features(short_wave, 'official')
  np.testing.assert_array_equal(batch['audio_features'][0, 20], fbank)
  np.testing.assert_array_equal(batch['audio_feature_mask'][0, 20], mask)
  assert mask.sum() == 50
  # One placeholder per file, expanded to (its pieces) x (soft tokens per item), in file order.
  ids = batch['decoder_input_tokens'][0, : prompt.length]
  assert _runs(ids, cfg.speech_token_id) == [4 * 3]
  assert _runs(ids, cfg.audio_token_id) == [20 * 4, 1 * 4]
  assert prompt.text.endswith('USER: <speech>\n<audio>\n<audio>\nwhat is it? ASSISTANT:')
  # 'masked' padding: the zero-padded fbank of the short file.
  masked = prompting.media_features(
      dataclasses.replace(cfg, audio_padding='masked'), {'audio': [short]}
  )
  fbank, mask = audio_lib.beats_chunk_features(short_wave, 'masked')
  np.testing.assert_array_equal(masked['audio_features'][0, 0], fbank)
  assert masked['audio_feature_mask'][0, 0].sum() == audio_lib.kaldi_num_frames(8000) == 48


def test_model_check_accepts_the_chunked_prompt(tmp_path, tokenizer_path):
  from unimoe_jax.network import check_placeholders  # pylint: disable=g-import-not-at-top

  cfg = tiny_config()
  tokenizer = prompting.PromptTokenizer(tokenizer_path, cfg)
  speech, _ = _wav(tmp_path / 's.wav', 2 * WINDOW + 2, 4)  # exactly 2 pieces of window + 1
  audio, _ = _wav(tmp_path / 'a.wav', 480000, 5)  # exactly one piece
  prompt = prompting.build_prompt(
      '<audio> and <speech>', {'speech': [speech], 'audio': [audio]}, cfg, tokenizer, template=False
  )
  assert prompt.batch['speech_features'].shape[1] == 2
  assert prompt.batch['audio_features'].shape[1] == 1
  check_placeholders(cfg, prompt.batch)


def test_score_reads_every_audio_chunk(tmp_path, tokenizer_path):
  """A 40 s file through `score`: the text's log-probabilities depend on its second chunk."""
  cfg = tiny_config(speech_encoder=None, speech_aligner=None)
  batch = {
      'decoder_input_tokens': jnp.zeros((1, 12), jnp.int32).at[0, 2:10].set(-203),
      'audio_features': jnp.zeros((1, 2, 64, 128)),
      'audio_mask': jnp.ones((1, 2), bool),
  }
  shapes = nn.meta.unbox(
      jax.eval_shape(lambda: UniMoE(cfg).init(jax.random.PRNGKey(0), batch)['params'])
  )
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  rng = np.random.RandomState(1)
  params = jax.tree_util.tree_unflatten(
      tree, [(0.3 * rng.randn(*x.shape)).astype(np.float32) for x in leaves]
  )
  path = checkpoints.save(
      str(tmp_path / 'ckpt'),
      params,
      llava.model_gin_text(cfg, 'test'),
      {checkpoints.TOKENIZER_FILE: tokenizer_path},
  )
  wave = 0.3 * np.random.default_rng(6).standard_normal(40 * 16000).astype(np.float32)
  sf.write(str(tmp_path / 'a.wav'), wave, 16000, subtype='FLOAT')
  other = wave.copy()
  other[480000:] = 0.3 * np.random.default_rng(7).standard_normal(other.size - 480000)
  sf.write(str(tmp_path / 'b.wav'), other, 16000, subtype='FLOAT')
  a = scoring.score_text(path, 'the sound of a cat', media={'audio': [str(tmp_path / 'a.wav')]})
  b = scoring.score_text(path, 'the sound of a cat', media={'audio': [str(tmp_path / 'b.wav')]})
  assert [r['token'] for r in a] == [r['token'] for r in b]
  diff = max(abs(x['logprob'] - y['logprob']) for x, y in zip(a[1:], b[1:]))
  print('largest log-prob change from the second chunk:', diff)
  # Unused, the second chunk would leave every number bit-identical (measured: 2e-4).
  assert diff > 1e-6
