"""A SentencePiece vocabulary (LLaMA's `tokenizer.model`) that knows the media placeholders.

Text is split on the placeholder strings (`<image>`, `<video>`, `<speech>`, `<audio>`) before
SentencePiece sees it, so a placeholder is never split, even glued to a word ("a<image>b"), and
becomes its one reserved id (LLaVA style: -200 ... -203, outside the vocabulary). Each text piece
between placeholders is encoded on its own, exactly as the official `tokenizer_image_token` /
`tokenizer_image_audio_video_token` do (`tokenizer(chunk)` per chunk), so every piece gets
SentencePiece's dummy-prefix space of its own and the ids equal the official ones.

Decoding renders placeholder ids back as their strings and SentencePiece-decodes the runs
between them. seqio's `decode`/`decode_tf` cut after the first EOS (and `decode_tf` overwrites
what follows with pad_id 0); id 0 is LLaMA's `<unk>` and doubles as padding (the official
trainer sets `pad_token = unk_token`), so decoding drops id 0 instead of rendering " ⁇ ".

The `legacy` flag of Hugging Face's slow `LlamaTokenizer` (the tokenizer the official code
loads, `use_fast=False`) is read from `tokenizer_config.json` beside `tokenizer.model`; absent or
null means True, as there. The two settings differ only in text that directly follows a special
token inside one tokenizer call, which in Uni-MoE's prompts is the "USER:" after each "</s>":
legacy SentencePiece-encodes it with the dummy-prefix space ("▁US"...), legacy=False without
("US"...). `encode` is the text at the start of a call (both settings agree);
`encode_after_special` is text right after a special token.
"""

import json
import os
import re
import tempfile
import threading
from typing import Dict, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from unimoe_jax.data.sentencepiece_files import (  # noqa: F401  (this module's API too)
    LLAMA_TRAINER_SETTINGS,
    TOKENIZER_JSON_FILE,
    sentencepiece_from_tokenizer_json,
    sentencepiece_without_dummy_prefix,
    train_sentencepiece,
)

DEFAULT_PLACEHOLDER_IDS = {'<image>': -200, '<video>': -201, '<speech>': -202, '<audio>': -203}
TOKENIZER_CONFIG_FILE = 'tokenizer_config.json'


def read_legacy_flag(model_path: str) -> bool:
  """The slow LlamaTokenizer's `legacy` for the `tokenizer.model` at `model_path`: the
  `legacy` field of `tokenizer_config.json` in the same folder; True when the file or the field
  is absent or null (transformers' default).

  Raises:
    ValueError naming the file for unreadable JSON or a `legacy` that is not a boolean.
  """
  path = os.path.join(os.path.dirname(model_path), TOKENIZER_CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    return True
  with tf.io.gfile.GFile(path, 'r') as f:
    text = f.read()
  try:
    config = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from None
  if not isinstance(config, dict):
    raise ValueError(f'{path}: expected a JSON object, got {type(config).__name__}')
  legacy = config.get('legacy')
  if legacy is None:
    return True
  if not isinstance(legacy, bool):
    raise ValueError(f'{path}: "legacy" must be true, false or null, got {legacy!r}')
  return legacy


def sentencepiece_from_tokenizer_json_file(path: str) -> bytes:
  """`sentencepiece_from_tokenizer_json` of a file; errors name it."""
  with tf.io.gfile.GFile(path, 'r') as f:
    text = f.read()
  try:
    return sentencepiece_from_tokenizer_json(json.loads(text))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path} wraps no SentencePiece model: {e}') from None


class MultimodalVocabulary(seqio.Vocabulary):
  """`seqio.Vocabulary` = a `seqio.SentencePieceVocabulary` + placeholder strings with fixed ids.

  Attributes:
    sentencepiece: the wrapped vocabulary; everything but placeholders delegates to it.
    placeholder_ids: placeholder string -> id (negative, or a reserved id >= the SentencePiece
      size; an id inside the SentencePiece range would be ambiguous and is refused).
    legacy: the slow LlamaTokenizer's `legacy` (module docstring); only
      `encode_after_special` depends on it.
  """

  def __init__(
      self,
      sentencepiece: seqio.SentencePieceVocabulary,
      placeholder_ids: Optional[Mapping[str, int]] = None,
      legacy: bool = True,
  ):
    placeholder_ids = dict(DEFAULT_PLACEHOLDER_IDS if placeholder_ids is None else placeholder_ids)
    if len(set(placeholder_ids.values())) != len(placeholder_ids):
      raise ValueError(f'placeholder_ids must be distinct, got {placeholder_ids}')
    for text, token in placeholder_ids.items():
      if not text:
        raise ValueError('placeholder strings must be non-empty')
      if 0 <= token < sentencepiece.vocab_size:
        raise ValueError(
            f'placeholder {text!r} has id {token}, which is a SentencePiece id '
            f'(vocab_size {sentencepiece.vocab_size}); use a negative id'
        )
    if not isinstance(legacy, bool):
      raise ValueError(f'legacy must be a bool, got {legacy!r}')
    self.sentencepiece = sentencepiece
    self.placeholder_ids: Dict[str, int] = placeholder_ids
    self.legacy = legacy
    self._no_prefix = None  # built on first use (legacy=False only)
    self._id_to_placeholder = {v: k for k, v in placeholder_ids.items()}
    # Longest first so a placeholder that contains another one wins.
    ordered = sorted(placeholder_ids, key=len, reverse=True)
    self._split_pattern = '(' + '|'.join(re.escape(p) for p in ordered) + ')'
    self._split_regex = re.compile(self._split_pattern)
    super().__init__(extra_ids=0)

  # ------------------------------------------------------------------------------------------
  # Special ids.

  @property
  def bos_id(self) -> int:
    """<s>, which LLaMA puts before every sequence (the vocabulary never adds it itself)."""
    return self.sentencepiece.bos_id

  @property
  def eos_id(self) -> int:
    return self.sentencepiece.eos_id

  @property
  def unk_id(self) -> int:
    return self.sentencepiece.unk_id

  @property
  def _base_vocab_size(self) -> int:
    """seqio's `vocab_size` is this plus `extra_ids` (0): the SentencePiece size."""
    return self.sentencepiece.vocab_size

  def placeholder_id(self, placeholder: str) -> int:
    try:
      return self.placeholder_ids[placeholder]
    except KeyError:
      raise ValueError(
          f'unknown placeholder {placeholder!r}; known: ' f'{sorted(self.placeholder_ids)}'
      ) from None

  def split_placeholders(self, text: str) -> Sequence[str]:
    """`text` cut into pieces, each either a placeholder string or text without one."""
    return [piece for piece in self._split_regex.split(text) if piece]

  # ------------------------------------------------------------------------------------------
  # Python.

  def _encode(self, s: str) -> Sequence[int]:
    ids = []
    for piece in self.split_placeholders(s):
      if piece in self.placeholder_ids:
        ids.append(self.placeholder_ids[piece])
      else:
        ids.extend(self.sentencepiece.encode(piece))
    return ids

  def encode_after_special(self, s: str) -> Sequence[int]:
    """Ids of `s` where it directly follows a special token ("</s>") in one slow
    LlamaTokenizer call. legacy: the same as `encode`. legacy=False: the first text piece
    (before any placeholder) is encoded as that tokenizer's `_tokenize` does, without the
    dummy-prefix space (a piece that starts with a space keeps it as "▁"); pieces after a
    placeholder start a new official tokenizer call and keep it."""
    if self.legacy:
      return self.encode(s)
    pieces = self.split_placeholders(s)
    if not pieces or pieces[0] in self.placeholder_ids:
      return self.encode(s)
    return list(self._encode_without_prefix(pieces[0])) + list(self.encode(s[len(pieces[0]) :]))

  def _encode_without_prefix(self, text: str) -> Sequence[int]:
    if self._no_prefix is None:  # two threads may both build it: the same processor
      self._no_prefix = sentencepiece_without_dummy_prefix(self.sentencepiece.tokenizer)
    sp = self._no_prefix
    if not text.startswith(('\u2581', ' ')):
      return sp.encode(text)
    unk = sp.id_to_piece(sp.unk_id())
    return sp.encode(unk + text)[len(sp.encode(unk)) :]

  def _decode(self, ids) -> str:
    out, run = [], []
    for token in ids:
      token = int(token)
      if token in self._id_to_placeholder:
        out.append(self.sentencepiece.decode(run) if run else '')
        out.append(self._id_to_placeholder[token])
        run = []
      elif token != self.pad_id:
        run.append(token)
    out.append(self.sentencepiece.decode(run) if run else '')
    return ''.join(out)

  # ------------------------------------------------------------------------------------------
  # TensorFlow (graph mode, for tf.data).

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """Scalar string -> `[ids]` int32."""
    import tensorflow_text as tf_text

    s = tf.convert_to_tensor(s, tf.string)
    if s.shape.rank != 0:
      raise ValueError(f'encode_tf takes a scalar string, got shape {s.shape}')
    # regex_split keeps the placeholders as pieces; it returns one ragged row per input.
    pieces = tf_text.regex_split(s[None], self._split_pattern, self._split_pattern).flat_values
    strings = tf.constant(list(self.placeholder_ids), tf.string)
    ids = tf.constant(list(self.placeholder_ids.values()), tf.int32)
    matches = tf.equal(pieces[:, None], strings[None, :])  # [pieces, placeholders]
    is_placeholder = tf.reduce_any(matches, axis=1)
    placeholder_of_piece = tf.gather(ids, tf.argmax(tf.cast(matches, tf.int32), axis=1))
    # Placeholder pieces tokenize as "" (no ids) and get their one id from a second ragged
    # tensor; concatenating the two per piece keeps the order.
    text_ids = self.sentencepiece.tf_tokenizer.tokenize(
        tf.where(is_placeholder, tf.constant(''), pieces)
    )
    text_ids = tf.cast(text_ids, tf.int32)
    placeholder_rows = tf.RaggedTensor.from_row_lengths(
        tf.boolean_mask(placeholder_of_piece, is_placeholder), tf.cast(is_placeholder, tf.int64)
    )
    return tf.concat([text_ids, placeholder_rows], axis=1).flat_values

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """`[ids]` -> scalar string, or `[batch, ids]` -> `[batch]` strings."""
    ids = tf.convert_to_tensor(ids)
    if ids.shape.rank == 2:
      return tf.map_fn(self._decode_tf_row, ids, fn_output_signature=tf.string)
    if ids.shape.rank != 1:
      raise ValueError(f'decode_tf takes [ids] or [batch, ids], got shape {ids.shape}')
    return self._decode_tf_row(ids)

  def _decode_tf_row(self, ids: tf.Tensor) -> tf.Tensor:
    ids = tf.cast(ids, tf.int32)
    ids = tf.boolean_mask(ids, tf.not_equal(ids, self.pad_id))
    strings = tf.constant(list(self.placeholder_ids), tf.string)
    table = tf.constant(list(self.placeholder_ids.values()), tf.int32)
    matches = tf.equal(ids[:, None], table[None, :])
    is_placeholder = tf.reduce_any(matches, axis=1)
    # Text run k holds the tokens after the k-th placeholder (run 0: before the first).
    run = tf.cumsum(tf.cast(is_placeholder, tf.int64), exclusive=True)
    num_placeholders = tf.reduce_sum(tf.cast(is_placeholder, tf.int64))
    is_text = tf.logical_not(is_placeholder)
    text_runs = tf.RaggedTensor.from_value_rowids(
        tf.boolean_mask(ids, is_text), tf.boolean_mask(run, is_text), nrows=num_placeholders + 1
    )
    # tf_text's detokenize drops every leading space of a row, Python SentencePiece only the
    # dummy prefix. A sentinel piece before each row keeps the spaces; cutting the sentinel
    # and then one leading space gives what Python gives.
    sentinel_id, sentinel_text = self._decode_sentinel()
    sentinel = tf.fill(tf.stack([num_placeholders + 1, 1]), tf.constant(sentinel_id, tf.int32))
    texts = self.sentencepiece.tf_tokenizer.detokenize(
        tf.concat([tf.RaggedTensor.from_tensor(sentinel), text_runs], axis=1)
    )
    texts = tf.strings.substr(texts, len(sentinel_text.encode('utf-8')), -1)
    texts = tf.strings.regex_replace(texts, '^ ', '')  # [placeholders + 1]
    placeholder_text = tf.gather(
        strings, tf.argmax(tf.cast(tf.boolean_mask(matches, is_placeholder), tf.int32), axis=1)
    )
    interleaved = tf.reshape(tf.stack([texts[:-1], placeholder_text], axis=1), [-1])
    return tf.strings.reduce_join(tf.concat([interleaved, texts[-1:]], axis=0))

  def _decode_sentinel(self):
    """(id, text) of a piece that decodes to fixed text with no leading space."""
    if getattr(self, '_sentinel', None) is None:
      tokenizer = self.sentencepiece.tokenizer
      candidates = [tokenizer.piece_to_id('<0x41>')] + list(range(tokenizer.get_piece_size()))
      for token in candidates:
        piece = tokenizer.id_to_piece(token)
        if (
            token != tokenizer.unk_id()
            and not tokenizer.is_control(token)
            and not tokenizer.is_unknown(token)
            and not piece.startswith('\u2581')
        ):
          text = tokenizer.decode([token])
          if text and not text[0].isspace():
            self._sentinel = (token, text)
            break
      else:
        raise ValueError('the SentencePiece model has no piece usable as a decoding sentinel')
    return self._sentinel

  # ------------------------------------------------------------------------------------------

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_no_prefix'] = None  # a SentencePieceProcessor; rebuilt on first use
    return state

  def __eq__(self, other):
    return (
        isinstance(other, MultimodalVocabulary)
        and self.sentencepiece == other.sentencepiece
        and self.placeholder_ids == other.placeholder_ids
        and self.legacy == other.legacy
    )

  def __hash__(self):
    return hash(
        (
            self.sentencepiece.sentencepiece_model_file,
            tuple(sorted(self.placeholder_ids.items())),
            self.legacy,
        )
    )

  def __str__(self) -> str:
    return (
        f'MultimodalVocabulary({self.sentencepiece}, placeholders={self.placeholder_ids}, '
        f'legacy={self.legacy})'
    )


@gin.configurable
def get_vocabulary(
    path: str, placeholder_ids: Optional[Mapping[str, int]] = None, legacy: Optional[bool] = None
) -> MultimodalVocabulary:
  """The project's vocabulary: LLaMA's `tokenizer.model` at `path` + placeholders.

  Args:
    path: a SentencePiece model file (gs:// works through tf.io.gfile, as seqio reads it), or
      a Hugging Face `tokenizer.json` that wraps one (`sentencepiece_from_tokenizer_json`).
    placeholder_ids: placeholder string -> id; default {'<image>': -200, '<video>': -201,
      '<speech>': -202, '<audio>': -203}, the ids UniMoEConfig uses.
    legacy: the slow LlamaTokenizer's `legacy`; None reads it from the tokenizer_config.json
      beside `path` (`read_legacy_flag`).
  """
  if legacy is None:
    legacy = read_legacy_flag(path)
  if path.endswith('.json'):  # A Hugging Face tokenizer.json: the SentencePiece model it wraps.
    model = sentencepiece_from_tokenizer_json_file(path)
    with tempfile.NamedTemporaryFile(suffix='.model', delete=False) as f:
      f.write(model)
    path = f.name
  return MultimodalVocabulary(seqio.SentencePieceVocabulary(path), placeholder_ids, legacy)


class LazyVocabulary(seqio.Vocabulary):
  """A vocabulary built on first use by `factory()` (e.g. from a path gin binds later).

  seqio tasks are registered when `MIXTURE_OR_TASK_MODULE` is imported, often before gin has
  bound the tokenizer path (or before the sample data exists); this defers reading the file
  until a dataset or a decode needs it. Everything delegates to the built vocabulary.
  """

  def __init__(self, factory, name: str = 'lazy'):
    self._factory = factory
    self._name = name
    self._built = None
    self._lock = threading.Lock()
    super().__init__(extra_ids=0)

  @property
  def vocabulary(self) -> 'MultimodalVocabulary':
    with self._lock:
      if self._built is None:
        self._built = self._factory()
      return self._built

  def __getattr__(self, name):
    if name.startswith('_'):
      raise AttributeError(name)
    return getattr(self.vocabulary, name)

  @property
  def eos_id(self):
    return self.vocabulary.eos_id

  @property
  def unk_id(self):
    return self.vocabulary.unk_id

  @property
  def pad_id(self):
    return self.vocabulary.pad_id

  @property
  def _base_vocab_size(self):
    return self.vocabulary.vocab_size

  def _encode(self, s):
    return self.vocabulary.encode(s)

  def _decode(self, ids):
    return self.vocabulary.decode(ids)

  def _encode_tf(self, s):
    return self.vocabulary.encode_tf(s)

  def _decode_tf(self, ids):
    return self.vocabulary.decode_tf(ids)

  def __eq__(self, other):
    return self is other

  def __hash__(self):
    return id(self)

  def __str__(self):
    return f'LazyVocabulary({self._name})'


def placeholder_counts(ids, vocabulary: MultimodalVocabulary) -> Dict[str, int]:
  """How many ids of each placeholder `ids` holds (numpy; for checks and tests)."""
  ids = np.asarray(ids)
  return {text: int((ids == token).sum()) for text, token in vocabulary.placeholder_ids.items()}
