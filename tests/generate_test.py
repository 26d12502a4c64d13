"""python -m unimoe_jax.generate: greedy answers equal transformers' generate on the rendered
Vicuna prompt (text-only HF checkpoint); a multimodal checkpoint answers about an image; bad
media fail naming the file."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference
from tiny_models import random_params
from tool_runs import run_convert
from unimoe_jax import checkpoints, generate
from unimoe_jax.serving import answering
from unimoe_jax.data import conversation
from unimoe_jax.media.errors import MediaError

QUESTION = 'what did the cat see in the park'
NEW_TOKENS = 12
CORPUS = [
    'the cat sat on the mat',
    'a dog ran in the park',
    'the sun is hot today',
    'we like to read books',
    'birds fly over the sea',
    conversation.SYSTEM,
    'USER: what is it? ASSISTANT: a cat',
]


def make_tokenizer(directory) -> str:
  pytest.importorskip('sentencepiece')
  from unimoe_jax.data import vocabulary  # pylint: disable=g-import-not-at-top

  # SentencePiece's own normalisation and no byte fallback: a plain tokenizer, unlike LLaMA's.
  return vocabulary.train_sentencepiece(
      CORPUS * 10,
      os.path.join(str(directory), 'tokenizer.model'),
      vocab_size=90,
      byte_fallback=False,
      normalization_rule_name='nmt_nfkc',
      remove_extra_whitespaces=True,
  )


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory):
  return make_tokenizer(tmp_path_factory.mktemp('spm'))


def tiny_unimoe_config():
  """The tiny decoder at hf_reference.TINY_DECODER's vocabulary, with a 2-layer CLIP tower."""
  from unimoe_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from unimoe_jax.encoders import clip  # pylint: disable=g-import-not-at-top
  from unimoe_jax.network import UniMoEConfig  # pylint: disable=g-import-not-at-top

  return UniMoEConfig(
      decoder=config_lib.named('tiny', vocab_size=97, mlp_dim=96),
      vision=clip.named('tiny', width=32, num_layers=2, mlp_dim=64),
  )


def save_multimodal_checkpoint(directory, tokenizer):
  """A checkpoint of a tiny random UniMoE with an image tower; returns (path, config, params)."""
  from unimoe_jax.convert import llava  # pylint: disable=g-import-not-at-top
  from unimoe_jax.network import UniMoE  # pylint: disable=g-import-not-at-top

  cfg = tiny_unimoe_config()
  size = cfg.vision.image_size
  batch = {
      'decoder_input_tokens': jnp.zeros((1, 20), jnp.int32).at[0, 2:18].set(-200),
      'image_features': jnp.zeros((1, 1, size, size, 3)),
      'image_mask': jnp.ones((1, 1), bool),
  }
  params = random_params(UniMoE(cfg), batch, scale=0.15, seed=1)
  path = checkpoints.save(
      str(directory),
      params,
      llava.model_gin_text(cfg, 'test'),
      {checkpoints.TOKENIZER_FILE: tokenizer},
  )
  return path, cfg, params


def write_png(path, seed):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  pixels = np.random.RandomState(seed).randint(0, 256, size=(40, 48, 3)).astype(np.uint8)
  Image.fromarray(pixels).save(path)
  return str(path)


@pytest.fixture(scope='module')
def text_checkpoint(tmp_path_factory, tokenizer_path):
  """(checkpoint converted from a tiny random LlamaForCausalLM, the HF model)."""
  model, _ = hf_reference.tiny_llama()
  hf_reference.randomize(model)
  tmp_path = tmp_path_factory.mktemp('text')
  src = tmp_path / 'src'
  model.save_pretrained(src)
  with open(tokenizer_path, 'rb') as f, open(src / 'tokenizer.model', 'wb') as g:
    g.write(f.read())
  out = str(tmp_path / 'out')
  assert run_convert(source='hf', input=src, output=out) == 0
  return out, model


@pytest.fixture(scope='module')
def multimodal_checkpoint(tmp_path_factory, tokenizer_path):
  return save_multimodal_checkpoint(tmp_path_factory.mktemp('mm') / 'ckpt', tokenizer_path)


def test_text_checkpoint_greedy_equals_transformers(capsys, text_checkpoint):
  torch, _ = hf_reference.torch_and_transformers()
  out, model = text_checkpoint
  result = answering.answer(out, QUESTION, max_decode_steps=NEW_TOKENS)
  assert result.prompt == (conversation.SYSTEM + ' USER: ' + QUESTION + ' ASSISTANT:')
  assert result.prompt_ids[0] == 1 and len(result.prompt_ids) > 20
  with torch.no_grad():
    hf = model.generate(
        torch.tensor([result.prompt_ids]),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=2,
        pad_token_id=0,
    )[0, len(result.prompt_ids) :].tolist()
  if 2 in hf:
    hf = hf[: hf.index(2) + 1]
  assert result.tokens == hf, (result.tokens, hf)
  assert len(set(hf)) > 1
  capsys.readouterr()
  assert (
      generate.main(
          ['--checkpoint', out, '--prompt', QUESTION, '--max_decode_steps', str(NEW_TOKENS)]
      )
      == 0
  )
  assert capsys.readouterr().out == result.text + '\n'


@pytest.mark.slow
def test_text_checkpoint_beam_and_sampling(text_checkpoint):
  out, _ = text_checkpoint
  greedy = answering.answer(out, QUESTION, max_decode_steps=4)
  beam1 = answering.answer(out, QUESTION, max_decode_steps=4, num_beams=1)
  assert beam1.tokens == greedy.tokens
  beam = answering.answer(out, QUESTION, max_decode_steps=4, num_beams=3)
  sample = answering.answer(
      out, QUESTION, max_decode_steps=4, temperature=1.0, top_k=5, top_p=0.9, seed=3
  )
  assert 0 < len(beam.tokens) <= 4 and 0 < len(sample.tokens) <= 4
  # The best beam scores at least as well as the greedy answer (t5x's length penalty, the
  # length counting the prompt).
  length = len(greedy.prompt_ids) + len(greedy.tokens)
  assert beam.score >= greedy.score / ((5.0 + length) / 6.0) ** 0.6 - 1e-4


def test_multimodal_checkpoint_answers_about_an_image(tmp_path, capsys, multimodal_checkpoint):
  path, cfg, _ = multimodal_checkpoint
  image_a, image_b = write_png(tmp_path / 'a.png', 0), write_png(tmp_path / 'b.png', 1)
  a = answering.answer(path, 'what is this?', {'image': [image_a]}, max_decode_steps=6)
  assert a.prompt.startswith(conversation.SYSTEM + ' USER: <image>\nwhat is this?')
  n = cfg.num_soft_tokens('image')
  assert a.prompt_ids.count(cfg.image_token_id) == n == 16
  b = answering.answer(path, 'what is this?', {'image': [image_b]}, max_decode_steps=6)
  # The image reaches the answer: the generated tokens' log-probabilities differ.
  assert abs(a.score - b.score) > 1e-3, (a.score, b.score)
  capsys.readouterr()
  assert (
      generate.main(
          [
              '--checkpoint',
              path,
              '--prompt',
              'what is this?',
              '--image',
              image_a,
              '--max_decode_steps',
              '6',
          ]
      )
      == 0
  )
  assert capsys.readouterr().out == a.text + '\n'


def test_missing_or_corrupt_media_fails_naming_the_file(tmp_path, multimodal_checkpoint):
  path, _, _ = multimodal_checkpoint
  missing = str(tmp_path / 'nowhere.png')
  with pytest.raises(MediaError, match='nowhere.png'):
    generate.main(['--checkpoint', path, '--prompt', 'hi', '--image', missing])
  corrupt = tmp_path / 'corrupt.png'
  corrupt.write_bytes(b'not a png at all')
  with pytest.raises(MediaError, match='corrupt.png'):
    answering.answer(path, 'hi', {'image': [str(corrupt)]})
  with pytest.raises(ValueError, match='no audio encoder'):
    answering.answer(path, 'hi', {'audio': [str(corrupt)]})
  with pytest.raises(ValueError, match='one placeholder per media file'):
    answering.answer(path, '<image> <image> hi', {'image': [missing]})
