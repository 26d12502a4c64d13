"""python -m unimoe_jax.score with media: text log-probs after an image equal a direct UniMoE
forward; another image changes them; placeholders are not scored."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from generate_test import make_tokenizer, save_multimodal_checkpoint, write_png
from unimoe_jax import checkpoints
from unimoe_jax import score
from unimoe_jax.serving import scoring
from unimoe_jax.media import image as image_lib
from unimoe_jax.media.errors import MediaError
from unimoe_jax.network import UniMoE

TEXT = 'the cat sat on the mat'


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('score')
  tokenizer = make_tokenizer(root)
  path, cfg, params = save_multimodal_checkpoint(root / 'ckpt', tokenizer)
  return path, cfg, params, tokenizer, root


def _direct_logprobs(cfg, params, tokenizer, png):
  """log p of each text token of "<image>\\n" + TEXT, by a forward written out here."""
  import sentencepiece  # pylint: disable=g-import-not-at-top

  sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer)
  n = cfg.num_soft_tokens('image')
  text_ids = sp.encode('\n' + TEXT)
  ids = [1] + [cfg.image_token_id] * n + text_ids
  pixels = image_lib.preprocess_image(image_lib.load_image(png), size=cfg.vision.image_size)
  batch = {
      'decoder_input_tokens': jnp.asarray([ids], jnp.int32),
      'image_features': jnp.asarray(pixels[None, None]),
      'image_mask': jnp.ones((1, 1), bool),
  }
  logits, _ = UniMoE(cfg).apply({'params': jax.tree_util.tree_map(jnp.asarray, params)}, batch)
  logp = np.asarray(jax.nn.log_softmax(logits[0]))
  return text_ids, np.array([logp[n + j, t] for j, t in enumerate(text_ids)])


def _score(capsys, path, png):
  capsys.readouterr()
  assert score.main(['--checkpoint', path, '--text', TEXT, '--image', png]) == 0
  return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_text_after_an_image_scores_like_a_direct_forward(capsys, setup):
  path, cfg, params, tokenizer, root = setup
  png_a, png_b = write_png(root / 'a.png', 0), write_png(root / 'b.png', 1)
  records = _score(capsys, path, png_a)
  assert records[0] == {'token': 1, 'piece': '<s>'}
  text_ids, expected = _direct_logprobs(cfg, params, tokenizer, png_a)
  # Only BOS and the text get lines: the 16 placeholders are not scored.
  assert [r['token'] for r in records[1:]] == text_ids
  ours = np.array([r['logprob'] for r in records[1:]])
  err = np.abs(ours - expected).max()
  assert err < 1e-5, err
  _, expected_b = _direct_logprobs(cfg, params, tokenizer, png_b)
  other = np.array([r['logprob'] for r in _score(capsys, path, png_b)[1:]])
  np.testing.assert_allclose(other, expected_b, atol=1e-5, rtol=0)
  assert np.abs(other - ours).max() > 1e-3  # The image conditions the text.


def test_explicit_placeholder_and_bad_media(capsys, setup):
  path, _, _, _, root = setup
  png = write_png(root / 'c.png', 2)
  placed = scoring.score_text(path, '<image>\n' + TEXT, media={'image': [png]})
  implicit = scoring.score_text(path, TEXT, media={'image': [png]})
  assert placed == implicit
  with pytest.raises(MediaError, match='missing.png'):
    score.main(['--checkpoint', path, '--text', TEXT, '--image', str(root / 'missing.png')])


def test_scoring_dtype_carries_a_model_dtype_router_along():
  """The official 4-expert gate runs in the model dtype (converted: router_dtype = dtype);
  scoring in float32 must route in float32 too. A router pinned to float32 stays float32."""
  from unimoe_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from unimoe_jax.network import UniMoEConfig  # pylint: disable=g-import-not-at-top

  follows = config_lib.named(
      'tiny', dtype='bfloat16', moe=config_lib.MoEConfig(router_dtype='bfloat16')
  )
  assert checkpoints.decoder_with_dtype(follows, 'float32').moe.router_dtype == 'float32'
  pinned = config_lib.named(
      'tiny', dtype='bfloat16', moe=config_lib.MoEConfig(router_dtype='float32')
  )
  assert checkpoints.decoder_with_dtype(pinned, 'bfloat16').moe.router_dtype == 'float32'
  model_cfg = checkpoints.with_dtype(UniMoEConfig(decoder=follows), 'float32')
  assert (model_cfg.decoder.dtype, model_cfg.decoder.moe.router_dtype) == ('float32', 'float32')
