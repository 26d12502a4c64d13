"""The slow LlamaTokenizer's `legacy` flag, read from tokenizer_config.json, in our tokenisation.

Official Uni-MoE loads `AutoTokenizer.from_pretrained(..., use_fast=False)`: transformers 4.x's
slow `LlamaTokenizer`, whose `legacy` comes from the checkpoint's tokenizer_config.json (LLaVA-1.5
descendants write `"legacy": false`). `SlowLlamaTokenizer` below transcribes that class
(`tokenize`, `_tokenize`, the sentencepiece model loaded without the dummy prefix when legacy is
False, special tokens split out first); the official prompt tokenisation
(`tokenizer_image_audio_video_token`) and masking (`preprocess_va`) run on it. transformers 5,
installed here, no longer has the slow class; where its SentencePiece backend shares the code
(`_tokenize` and the special-token split), the transcription is checked against it.
"""

import json
import re

import numpy as np
import pytest

spm = pytest.importorskip('sentencepiece')
pytest.importorskip('tensorflow')

from data_text_test import _CORPUS  # noqa: E402
from unimoe_jax.data import conversation as conv_lib  # noqa: E402
from unimoe_jax.data import vocabulary as vocab_lib  # noqa: E402

from data_fixtures import llama_like_tokenizer as _train  # noqa: E402
from official_reference import official_labels  # noqa: E402

PLACEHOLDERS = {'<image>': -200, '<audio>': -203, '<video>': -201}
SPECIAL = ('<unk>', '<s>', '</s>')
UNDERLINE = '\u2581'

CONVERSATIONS = [
    [
        {'from': 'human', 'value': '<image>\nWhat is in the picture?'},
        {'from': 'gpt', 'value': 'A cat on a mat.'},
        {'from': 'human', 'value': 'What colour is the cat?'},
        {'from': 'gpt', 'value': 'It is black and white.'},
    ],
    [
        {'from': 'human', 'value': 'What is it?'},
        {'from': 'gpt', 'value': 'A sound.'},
        {'from': 'human', 'value': '<audio>\nAnd this one?'},
        {'from': 'gpt', 'value': 'A dog.'},
        {'from': 'human', 'value': 'Describe <video> briefly'},
        {'from': 'gpt', 'value': 'The quick brown fox.'},
    ],
    [
        {'from': 'human', 'value': 'Hi?'},
        {'from': 'gpt', 'value': '  leading spaces'},
        {'from': 'human', 'value': ' spaced'},
        {'from': 'gpt', 'value': 'Done.'},
    ],
]


def _without_dummy_prefix(path):
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  with open(path, 'rb') as f:
    model = sentencepiece_model_pb2.ModelProto.FromString(f.read())
  model.normalizer_spec.add_dummy_prefix = False
  sp = spm.SentencePieceProcessor()
  sp.LoadFromSerializedProto(model.SerializeToString())
  return sp


class SlowLlamaTokenizer:
  """transformers 4.x `LlamaTokenizer` (add_bos_token, add_prefix_space: the defaults)."""

  def __init__(self, path, legacy):
    self.legacy = legacy
    self.sp = spm.SentencePieceProcessor(model_file=path) if legacy else _without_dummy_prefix(path)

  def _tokenize(self, text):
    if self.legacy or not text.startswith((UNDERLINE, ' ')):
      return self.sp.encode(text, out_type=str)
    tokens = self.sp.encode('<unk>' + text, out_type=str)
    return tokens[len(self.sp.encode('<unk>', out_type=str)) :]

  def _split(self, text):
    """`PreTrainedTokenizer.tokenize`: special tokens out first (no strip), the rest through
    `_tokenize`."""
    tokens = []
    for piece in re.split('(' + '|'.join(map(re.escape, SPECIAL)) + ')', text):
      if piece in SPECIAL:
        tokens.append(piece)
      elif piece:
        tokens += self._tokenize(piece)
    return tokens

  def tokenize(self, text):
    if self.legacy or not text:
      return self._split(text)
    tokens = self._split(UNDERLINE + text.replace(UNDERLINE, ' '))
    if len(tokens) > 1 and tokens[0] == UNDERLINE and tokens[1] in SPECIAL:
      tokens = tokens[1:]
    return tokens

  def __call__(self, text):
    return [1] + [self.sp.piece_to_id(t) for t in self.tokenize(text)]


def official_tokenize(prompt, tokenizer):
  """`tokenizer_image_audio_video_token`: each chunk between placeholders through the
  tokenizer, BOS kept once, each placeholder its id."""
  chunks = [tokenizer(c) for c in re.split('<image>|<audio>|<video>', prompt)]
  marks = re.findall('<image>|<audio>|<video>', prompt)
  ids = [chunks[0][0]]
  for i, chunk in enumerate(chunks):
    ids += chunk[1:]
    if i < len(marks):
      ids.append(PLACEHOLDERS[marks[i]])
  return ids


def official_labels_of(prompt, tokenizer):
  """`preprocess_va` masking; None where it reports a tokenization mismatch."""
  ids, labels, whole = official_labels(prompt, lambda text: official_tokenize(text, tokenizer))
  return ids, (labels if whole else None)


@pytest.fixture(scope='module')
def model_paths(tmp_path_factory):
  """'plain': data_text_test's model, where "▁USER" is one piece but "USER" two ("US", "ER").
  'llama_like': trained with "</s>USER:" in context too, so that, as in LLaMA's vocabulary
  ("▁US" "ER" / "US" "ER"), "USER" is as many pieces with the prefix as without."""
  plain = _train(tmp_path_factory.mktemp('plain'), _CORPUS)
  llama_like = _train(
      tmp_path_factory.mktemp('llama_like'),
      _CORPUS
      + [
          'ASSISTANT: A cat on a mat.</s>USER: What colour is the cat? ASSISTANT: It is.</s>USER: '
          'Why?'
      ],
  )
  return {'plain': plain, 'llama_like': llama_like}


@pytest.fixture(scope='module')
def model_path(model_paths):
  return model_paths['plain']


def _vocab_dir(tmp_path, model_path, config):
  directory = tmp_path / 'tok'
  directory.mkdir(exist_ok=True)
  (directory / 'tokenizer.model').write_bytes(open(model_path, 'rb').read())
  if config is not None:
    (directory / vocab_lib.TOKENIZER_CONFIG_FILE).write_text(
        config if isinstance(config, str) else json.dumps(config)
    )
  return str(directory / 'tokenizer.model')


@pytest.mark.parametrize(
    'config,legacy',
    [
        (None, True),
        ({'legacy': None}, True),
        ({'legacy': True}, True),
        ({'legacy': False, 'add_bos_token': True}, False),
    ],
)
def test_legacy_flag_is_read_from_tokenizer_config(tmp_path, model_path, config, legacy):
  path = _vocab_dir(tmp_path, model_path, config)
  assert vocab_lib.read_legacy_flag(path) is legacy
  assert vocab_lib.get_vocabulary(path).legacy is legacy
  assert vocab_lib.get_vocabulary(path, legacy=not legacy).legacy is (not legacy)


@pytest.mark.parametrize(
    'config,match',
    [
        ('{"legacy": "no"}', 'true, false or null'),
        ('{"legacy": fals', 'not valid JSON'),
        ('[1]', 'JSON object'),
    ],
)
def test_bad_tokenizer_config_names_the_file(tmp_path, model_path, config, match):
  path = _vocab_dir(tmp_path, model_path, config)
  with pytest.raises(ValueError, match=match) as info:
    vocab_lib.get_vocabulary(path)
  assert vocab_lib.TOKENIZER_CONFIG_FILE in str(info.value)


@pytest.mark.parametrize('kind', ['plain', 'llama_like'])
@pytest.mark.parametrize('legacy', [True, False])
@pytest.mark.parametrize('index', range(len(CONVERSATIONS)))
def test_conversations_tokenise_as_the_slow_llama_tokenizer(
    tmp_path, model_paths, kind, legacy, index
):
  conversation = CONVERSATIONS[index]
  path = _vocab_dir(tmp_path, model_paths[kind], {'legacy': legacy})
  vocab = vocab_lib.get_vocabulary(path)
  ids, weights = conv_lib.tokenize_conversation(conversation, vocab, {p: 1 for p in PLACEHOLDERS})
  prompt = conv_lib.prompt_text(conversation)
  official_ids, labels = official_labels_of(prompt, SlowLlamaTokenizer(path, legacy))
  assert ids.tolist() == official_ids
  assert conv_lib.decode_prompt(ids, vocab) == prompt
  answers = conv_lib.answer_text(conversation)
  assert conv_lib.decode_prompt(ids[weights > 0], vocab) == (answers or '')
  if labels is None:
    # The official per-round count (each round tokenised alone, with the prefix) disagrees
    # with the tokens in context: official training drops this example's loss. Only when
    # "USER" is fewer pieces with the prefix than without, and only with legacy=False.
    assert kind == 'plain' and not legacy
  else:
    np.testing.assert_array_equal(weights > 0, np.asarray(labels) != -100)


def test_the_flags_differ_by_the_prefix_after_each_eos(tmp_path, model_path):
  conversation = CONVERSATIONS[1]
  soft = {p: 1 for p in PLACEHOLDERS}
  legacy = vocab_lib.get_vocabulary(_vocab_dir(tmp_path, model_path, {'legacy': True}))
  modern = vocab_lib.get_vocabulary(_vocab_dir(tmp_path, model_path, {'legacy': False}))
  a, _ = conv_lib.tokenize_conversation(conversation, legacy, soft)
  b, _ = conv_lib.tokenize_conversation(conversation, modern, soft)
  sp = legacy.sentencepiece.tokenizer
  eos_a, eos_b = np.nonzero(a == 2)[0], np.nonzero(b == 2)[0]
  assert len(eos_a) == len(eos_b) == 3
  # Up to the first </s> the two agree; after each of the first two, the legacy tokenizer
  # writes "▁USER" and the other "USER" without the dummy-prefix space.
  np.testing.assert_array_equal(a[: eos_a[0] + 1], b[: eos_b[0] + 1])
  for i, j in zip(eos_a[:2], eos_b[:2]):
    after_a, after_b = sp.id_to_piece(int(a[i + 1])), sp.id_to_piece(int(b[j + 1]))
    assert after_a.startswith(UNDERLINE) and not after_b.startswith(UNDERLINE), (after_a, after_b)
  # Both decode to the same prompt.
  assert conv_lib.decode_prompt(a, legacy) == conv_lib.decode_prompt(b, modern)
  # Pieces after a placeholder start a new official tokenizer call: prefix in both.
  assert modern.encode_after_special('<audio>\nx') == modern.encode('<audio>\nx')
  assert legacy.encode_after_special('USER: hi') == legacy.encode('USER: hi')
  assert modern.encode_after_special('USER: hi') != modern.encode('USER: hi')


def test_transcription_agrees_with_transformers_sentencepiece_backend(model_path):
  """transformers 5's SentencePieceBackend keeps the 4.x `_tokenize` and special-token split
  (not the 4.x `tokenize` override that adds the leading "▁" with legacy=False)."""
  pytest.importorskip('transformers')
  try:
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip('this transformers has no SentencePieceBackend')
  text = conv_lib.prompt_text(CONVERSATIONS[1]).replace('<audio>', 'x').replace('<video>', 'y')
  for legacy in (True, False):
    hf = SentencePieceBackend(
        vocab_file=model_path, legacy=legacy, bos_token='<s>', eos_token='</s>', unk_token='<unk>'
    )
    ours = SlowLlamaTokenizer(model_path, legacy)
    expected = hf.tokenize(text if legacy else UNDERLINE + text)
    assert ours.tokenize(text) == expected, legacy
