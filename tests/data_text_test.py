"""Text side of the data path: the placeholder-aware vocabulary (Python and tf.data paths) and
the Vicuna v1 conversation template with official-style loss masking."""

import re

import numpy as np
import pytest

pytest.importorskip('seqio')
spm = pytest.importorskip('sentencepiece')
tf = pytest.importorskip('tensorflow')

from unimoe_jax.data import conversation as conv_lib  # noqa: E402
from unimoe_jax.data import vocabulary as vocab_lib  # noqa: E402

from data_fixtures import llama_like_tokenizer  # noqa: E402
from official_reference import official_labels  # noqa: E402

PLACEHOLDERS = vocab_lib.DEFAULT_PLACEHOLDER_IDS

_CORPUS = [
    conv_lib.SYSTEM,
    'USER: What is in the picture? ASSISTANT: A cat on a mat.',
    'USER: What colour is the cat?\nASSISTANT: It is black and white.',
    'The quick brown fox jumps over the lazy dog 0123456789 times.',
    'image video speech audio < > ( ) : ; , . ! ?',
]


@pytest.fixture(scope='module')
def vocab(tmp_path_factory):
  return vocab_lib.get_vocabulary(llama_like_tokenizer(tmp_path_factory.mktemp('spm'), _CORPUS))


# ------------------------------------------------------------------------------------------------
# Vocabulary.

TEXTS = [
    'a<image>b',
    'USER: <image>\nWhat is  this?  ',
    'x<video><audio> y <speech>',
    '<image><image>',
    '  leading spaces and trailing\n',
    'héllo 🙂 wörld',
    '',
]


def test_special_ids(vocab):
  assert (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id) == (1, 2, 0, 0)
  assert vocab.vocab_size == 400
  assert vocab.placeholder_ids == PLACEHOLDERS


def test_placeholders_never_split(vocab):
  sp = vocab.sentencepiece.tokenizer
  # Plain SentencePiece cuts "<image>" into several pieces, so the check below can fail.
  assert len(sp.encode('a<image>b')) > 3
  for text, expected in [
      ('a<image>b', ['a', -200, 'b']),
      ('word<speech>word', ['word', -202, 'word']),
      ('x<video><audio>y', ['x', -201, -203, 'y']),
      ('<image>', [-200]),
  ]:
    want = []
    for part in expected:
      want += [part] if isinstance(part, int) else sp.encode(part)
    assert list(vocab.encode(text)) == want, text
    assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == want, text


@pytest.mark.parametrize('text', TEXTS)
def test_round_trip_and_tf_agrees(vocab, text):
  ids = list(vocab.encode(text))
  assert vocab.decode(ids) == text
  assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids
  assert vocab.decode_tf(tf.constant(ids, tf.int32)).numpy().decode('utf-8') == text
  counts = vocab_lib.placeholder_counts(ids, vocab)
  assert counts == {p: text.count(p) for p in PLACEHOLDERS}


def test_decode_batched_padded_and_after_eos(vocab):
  a, b = list(vocab.encode(TEXTS[1])), list(vocab.encode(TEXTS[2]))
  width = max(len(a), len(b)) + 2
  batch = np.zeros((2, width), np.int32)  # 0 = LLaMA's unk, used as padding
  batch[0, : len(a)] = a
  batch[1, : len(b)] = b
  decoded = vocab.decode_tf(tf.constant(batch)).numpy()
  assert [d.decode('utf-8') for d in decoded] == [TEXTS[1], TEXTS[2]]
  # seqio semantics: stop at the first EOS.
  after = a + [vocab.eos_id] + b
  assert vocab.decode(after) == TEXTS[1]
  assert vocab.decode_tf(tf.constant(after, tf.int32)).numpy().decode() == TEXTS[1]


def test_placeholder_ids_inside_vocab_are_refused(vocab):
  with pytest.raises(ValueError, match='SentencePiece id'):
    vocab_lib.MultimodalVocabulary(vocab.sentencepiece, {'<image>': 5})


# ------------------------------------------------------------------------------------------------
# Conversation template and masking.

TWO_TURNS = [
    {'from': 'human', 'value': '<image>\nWhat is in the picture?'},
    {'from': 'gpt', 'value': 'A cat on a mat.'},
    {'from': 'human', 'value': 'What colour is the cat?'},
    {'from': 'gpt', 'value': 'It is black and white.'},
]

# conv_vicuna_v1.get_prompt() for TWO_TURNS, written out.
TWO_TURNS_PROMPT = (
    'A chat between a curious user and an artificial intelligence assistant. The assistant '
    "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat "
    'is in the picture? ASSISTANT: A cat on a mat.</s>USER: What colour is the cat? '
    'ASSISTANT: It is black and white.</s>'
)


def _official_tokenize(text, vocab):
  """The legacy slow LLaMA tokenizer as official `tokenizer_image_audio_video_token` uses it:
  <s>, then each chunk between placeholders and "</s>" SentencePiece-encoded on its own."""
  sp = vocab.sentencepiece.tokenizer
  ids = [vocab.bos_id]
  for piece in re.split('(</s>|<image>|<video>|<audio>|<speech>)', text):
    if piece == '</s>':
      ids.append(vocab.eos_id)
    elif piece in PLACEHOLDERS:
      ids.append(PLACEHOLDERS[piece])
    elif piece:
      ids += sp.encode(piece)
  return ids


def _official_labels(prompt, vocab):
  """Official `preprocess_va` masking (LLaVA `preprocess_v1`): -100 where no loss."""
  input_ids, labels, whole = official_labels(prompt, lambda text: _official_tokenize(text, vocab))
  assert whole, 'official tokenization mismatch'
  return input_ids, labels


def test_render_is_the_official_vicuna_v1_prompt():
  assert conv_lib.prompt_text(TWO_TURNS) == TWO_TURNS_PROMPT
  segments = conv_lib.render(TWO_TURNS)
  assert [s for s, is_answer in segments if is_answer] == [
      'A cat on a mat.</s>',
      'It is black and white.</s>',
  ]
  assert ''.join(s for s, _ in segments) == TWO_TURNS_PROMPT


def test_two_turn_image_conversation_tokenisation_and_masking(vocab):
  """Issue requirement 1: targets only on the assistant turns, placeholders expanded to the
  right count, round trip decodes to the text."""
  soft = 7
  targets, weights = conv_lib.tokenize_conversation(TWO_TURNS, vocab, {'<image>': soft})
  assert targets.dtype == np.int32 and weights.dtype == np.float32
  assert targets.shape == weights.shape
  assert targets[0] == vocab.bos_id and weights[0] == 0

  # Placeholders: one run of `soft` copies, no loss on them.
  positions = np.nonzero(targets == PLACEHOLDERS['<image>'])[0]
  assert positions.size == soft
  np.testing.assert_array_equal(np.diff(positions), 1)
  assert not weights[positions].any()

  # Loss only on the answers and their </s>.
  assert set(np.unique(weights).tolist()) == {0.0, 1.0}
  answer_ids = targets[weights > 0]
  assert (
      conv_lib.decode_prompt(answer_ids, vocab) == 'A cat on a mat.</s>It is black and white.</s>'
  )
  assert conv_lib.answer_text(TWO_TURNS) == 'A cat on a mat.</s>It is black and white.</s>'
  assert (targets[weights > 0] == vocab.eos_id).sum() == 2
  assert targets[-1] == vocab.eos_id and weights[-1] == 1
  # The unweighted part decodes to everything else: system, USER turns, "ASSISTANT:" labels.
  unweighted = conv_lib.decode_prompt(targets[weights == 0], vocab)
  assert unweighted.startswith(conv_lib.SYSTEM + ' USER: <image>')
  assert unweighted.count('ASSISTANT:') == 2 and 'on a mat' not in unweighted
  assert '</s>' not in unweighted

  # Unexpanded tokens decode to the rendered prompt; expansion only repeats the placeholder.
  plain, plain_weights = conv_lib.tokenize_conversation(TWO_TURNS, vocab, {'<image>': 1})
  assert conv_lib.decode_prompt(plain, vocab) == TWO_TURNS_PROMPT
  collapsed = np.concatenate([targets[: positions[0] + 1], targets[positions[-1] + 1 :]])
  np.testing.assert_array_equal(collapsed, plain)

  # Same ids and the same loss positions as the official tokenisation + masking.
  official_ids, reference_labels = _official_labels(TWO_TURNS_PROMPT, vocab)
  assert plain.tolist() == official_ids
  np.testing.assert_array_equal(plain_weights > 0, np.asarray(reference_labels) != -100)


@pytest.mark.parametrize('system', ['', 'Be brief.'])
def test_system_prompt_binding_reaches_rendering_and_masking(vocab, system):
  """gin's `system_prompt.text` (the demo binds '') changes the prompt and keeps the answer
  masking exact; the default stays Vicuna v1's."""
  import gin  # pylint: disable=g-import-not-at-top

  with gin.unlock_config():
    gin.bind_parameter('system_prompt.text', system)
  try:
    prompt = conv_lib.prompt_text(TWO_TURNS)
    expected_head = system + ' USER: ' if system else 'USER: '
    assert prompt == expected_head + TWO_TURNS_PROMPT[len(conv_lib.SYSTEM + ' USER: ') :]
    targets, weights = conv_lib.tokenize_conversation(TWO_TURNS, vocab, {'<image>': 1})
    assert conv_lib.decode_prompt(targets, vocab) == prompt
    assert conv_lib.decode_prompt(targets[weights > 0], vocab) == conv_lib.answer_text(TWO_TURNS)
    official_ids, reference_labels = _official_labels(prompt, vocab)
    assert targets.tolist() == official_ids
    np.testing.assert_array_equal(weights > 0, np.asarray(reference_labels) != -100)
  finally:
    gin.clear_config()
  assert conv_lib.prompt_text(TWO_TURNS) == TWO_TURNS_PROMPT


def test_placeholders_stay_where_written(vocab):
  # Uni-MoE never calls LLaVA's preprocess_multimodal: "<image>" is not moved to the front.
  conv = [
      {'from': 'human', 'value': "What is in the motorcyclist's mouth?\n<image>"},
      {'from': 'gpt', 'value': 'cigarette'},
  ]
  prompt = conv_lib.prompt_text(conv)
  assert "USER: What is in the motorcyclist's mouth?\n<image> ASSISTANT: cigarette</s>" in prompt
  targets, _ = conv_lib.tokenize_conversation(conv, vocab, {'<image>': 1})
  assert conv_lib.decode_prompt(targets, vocab) == prompt


def test_per_occurrence_counts_and_several_modalities(vocab):
  conv = [
      {'from': 'human', 'value': '<audio>\n<video>\nDescribe. <audio>'},
      {'from': 'gpt', 'value': 'Fine.'},
  ]
  targets, weights = conv_lib.tokenize_conversation(conv, vocab, {'<audio>': [2, 6], '<video>': 3})
  audio = np.nonzero(targets == PLACEHOLDERS['<audio>'])[0]
  assert audio.size == 8 and (targets == PLACEHOLDERS['<video>']).sum() == 3
  assert audio[1] - audio[0] == 1 and audio[2] - audio[1] > 1  # runs of 2 then 6
  assert conv_lib.decode_prompt(targets[weights > 0], vocab) == 'Fine.</s>'


def test_generation_prompt_and_trailing_question(vocab):
  conv = [{'from': 'human', 'value': 'Hi?'}, {'from': 'gpt', 'value': ''}]
  assert conv_lib.prompt_text(conv).endswith('USER: Hi? ASSISTANT:')
  targets, weights = conv_lib.tokenize_conversation(conv, vocab, {})
  assert not weights.any()
  assert conv_lib.decode_prompt(targets, vocab) == conv_lib.prompt_text(conv)
  assert targets.tolist() == _official_tokenize(conv_lib.prompt_text(conv), vocab)


@pytest.mark.parametrize(
    'conv,match',
    [
        ([], 'empty'),
        ([{'from': 'gpt', 'value': 'x'}, {'from': 'human', 'value': 'y'}], 'expected .human'),
        ([{'from': 'human', 'value': 'a'}, {'from': 'human', 'value': 'b'}], 'expected .gpt'),
        ([{'from': 'human', 'value': ''}, {'from': 'gpt', 'value': 'b'}], 'human.*empty'),
        (
            [
                {'from': 'human', 'value': 'a'},
                {'from': 'gpt', 'value': ''},
                {'from': 'human', 'value': 'c'},
            ],
            'not the last',
        ),
        ([{'from': 'human', 'value': 'a</s>'}, {'from': 'gpt', 'value': 'b'}], 'separator'),
        ([{'from': 'human'}], '"from" and "value"'),
    ],
)
def test_malformed_conversations_raise(vocab, conv, match):
  with pytest.raises(ValueError, match=match):
    conv_lib.tokenize_conversation(conv, vocab, {})


def test_unlisted_placeholder_or_wrong_occurrence_count_raise(vocab):
  with pytest.raises(ValueError, match='no entry'):
    conv_lib.tokenize_conversation(TWO_TURNS, vocab, {'<video>': 4})
  with pytest.raises(ValueError, match='per-occurrence'):
    conv_lib.tokenize_conversation(TWO_TURNS, vocab, {'<image>': [1, 2]})
