"""Building SentencePiece model files: training a small LLaMA-style model, recovering the model a
Hugging Face `tokenizer.json` was converted from, and turning off the dummy prefix.

Kept apart from `vocabulary.py` (which re-exports these names) because it needs neither
TensorFlow nor seqio: `tools/make_sample_data.py` trains the demo's tokenizer with it.
"""

import io
import re
from typing import Mapping, Sequence


def sentencepiece_without_dummy_prefix(tokenizer):
  """A SentencePieceProcessor of the same model with `add_dummy_prefix` off (what the slow
  LlamaTokenizer loads when legacy=False)."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  proto = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.serialized_model_proto())
  proto.normalizer_spec.add_dummy_prefix = False
  processor = sentencepiece.SentencePieceProcessor()
  processor.LoadFromSerializedProto(proto.SerializeToString())
  return processor


# What a SentencePiece model needs to serve as a LLaMA-style vocabulary here: BPE, LLaMA's id
# layout (unk 0, <s> 1, </s> 2, no pad: the converter pads with 0), byte fallback (any text
# encodes) and identity normalisation without whitespace cleanup (the "\n" between a
# placeholder and the question is kept, as the official prompts have it).
LLAMA_TRAINER_SETTINGS = dict(
    model_type='bpe',
    byte_fallback=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    normalization_rule_name='identity',
    remove_extra_whitespaces=False,
)


def train_sentencepiece(lines: Sequence[str], path: str, vocab_size: int, **trainer_options) -> str:
  """Trains a small SentencePiece model on `lines` with `LLAMA_TRAINER_SETTINGS` (any of them,
  and any other trainer option, replaced or added by `trainer_options`) and writes it to
  `path`; returns `path`. For the sample data and tests: real runs use the released
  tokenizer.model."""
  import sentencepiece  # pylint: disable=g-import-not-at-top

  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=model,
      vocab_size=vocab_size,
      minloglevel=2,
      **{**LLAMA_TRAINER_SETTINGS, **trainer_options},
  )
  with open(path, 'wb') as f:
    f.write(model.getvalue())
  return path


TOKENIZER_JSON_FILE = 'tokenizer.json'
_SPACE = '\u2581'  # '▁', SentencePiece's escaped space.


def _merge_pair(merge) -> Sequence[str]:
  pair = merge.split(' ') if isinstance(merge, str) else list(merge)
  if len(pair) != 2:
    raise ValueError(f'merge {merge!r} is not a pair')
  return pair


def sentencepiece_from_tokenizer_json(tokenizer_json: Mapping) -> bytes:
  """The serialized SentencePiece BPE model that a Hugging Face `tokenizer.json` was converted
  from (LLaMA's fast tokenizer: BPE over text with spaces escaped as '▁', optional byte
  fallback, `transformers` LlamaConverter), for a directory that carries no `tokenizer.model`.

  The pieces keep their ids; a piece made by merges scores minus the rank of its first merge
  (SentencePiece merges the highest-scoring piece first, the converter ordered the merges by
  score, so both pick the same merge), the others score below all of them; `<0xNN>` pieces are
  bytes when byte fallback is on, special added tokens control pieces, the BPE unk token the
  unknown piece.

  Raises:
    ValueError saying why the file wraps no SentencePiece BPE model: another model type
    (Unigram, WordPiece), byte-level BPE (GPT-2 style `ByteLevel` pre-tokenizer, no '▁'
    escaping), a normalizer other than LLaMA's Prepend('▁') / Replace(' ', '▁'), a
    pre-tokenizer that splits, ids that are not 0..n-1.
  """
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  model = tokenizer_json.get('model') or {}
  if model.get('type') != 'BPE':
    raise ValueError(
        f'model type {model.get("type")!r}: only a BPE tokenizer.json converted '
        'from a SentencePiece BPE model (LLaMA) can be turned back into one'
    )
  add_dummy_prefix = False
  escapes = False
  normalizer = tokenizer_json.get('normalizer')
  steps = (
      []
      if normalizer is None
      else normalizer.get('normalizers', [normalizer])
      if normalizer.get('type') == 'Sequence'
      else [normalizer]
  )
  for step in steps:
    if step.get('type') == 'Prepend' and step.get('prepend') == _SPACE:
      add_dummy_prefix = True
    elif (
        step.get('type') == 'Replace'
        and step.get('pattern', {}).get('String') == ' '
        and step.get('content') == _SPACE
    ):
      escapes = True
    else:
      raise ValueError(
          f'normalizer {step}: SentencePiece (identity normalization, as LLaMA) '
          'has no equivalent'
      )
  pre = tokenizer_json.get('pre_tokenizer')
  if pre is not None:
    if (
        pre.get('type') != 'Metaspace'
        or pre.get('replacement', _SPACE) != _SPACE
        or pre.get('split', True)
    ):
      raise ValueError(
          f'pre_tokenizer {pre.get("type")} ({pre}): not the "▁"-escaping '
          'Metaspace(split=False) of a SentencePiece conversion (a ByteLevel '
          'pre-tokenizer is GPT-2 style byte-level BPE, which SentencePiece cannot '
          'represent)'
      )
    escapes = True
    add_dummy_prefix = add_dummy_prefix or pre.get('prepend_scheme', 'always') != 'never'
  if not escapes:
    raise ValueError(
        'spaces are not escaped as "▁" (no Replace normalizer or Metaspace '
        'pre-tokenizer): not a SentencePiece conversion'
    )
  vocab = dict(model.get('vocab') or {})
  added = {t['content']: t for t in tokenizer_json.get('added_tokens') or []}
  for content, token in added.items():
    if content not in vocab:
      vocab[content] = token['id']
  pieces = sorted(vocab, key=vocab.get)
  if [vocab[p] for p in pieces] != list(range(len(pieces))):
    raise ValueError('token ids are not 0..n-1: a SentencePiece model numbers its pieces so')
  first_rank = {}
  for rank, merge in enumerate(model.get('merges') or []):
    left, right = _merge_pair(merge)
    first_rank.setdefault(left + right, rank)
  byte_fallback = bool(model.get('byte_fallback'))
  byte_piece = re.compile(r'^<0x[0-9A-F]{2}>$')
  t = sentencepiece_model_pb2.ModelProto.SentencePiece
  proto = sentencepiece_model_pb2.ModelProto()
  ids = {}
  for i, piece in enumerate(pieces):
    entry = proto.pieces.add()
    entry.piece = piece
    if piece == model.get('unk_token'):
      entry.type, entry.score = t.UNKNOWN, 0.0
      ids['unk'] = i
    elif piece in added and added[piece].get('special'):
      entry.type, entry.score = t.CONTROL, 0.0
      ids.setdefault({'<s>': 'bos', '</s>': 'eos', '<pad>': 'pad'}.get(piece, piece), i)
    elif piece in added:
      entry.type, entry.score = t.USER_DEFINED, 0.0
    elif byte_fallback and byte_piece.match(piece):
      entry.type, entry.score = t.BYTE, 0.0
    else:
      entry.type = t.NORMAL
      entry.score = (
          -float(first_rank[piece]) if piece in first_rank else -float(len(first_rank) + i)
      )
  if 'unk' not in ids:
    raise ValueError('no unk_token: SentencePiece needs an unknown piece')
  spec = proto.trainer_spec
  spec.model_type = spec.BPE
  spec.vocab_size = len(pieces)
  spec.byte_fallback = byte_fallback
  spec.unk_id = ids['unk']
  spec.bos_id = ids.get('bos', -1)
  spec.eos_id = ids.get('eos', -1)
  spec.pad_id = ids.get('pad', -1)
  norm = proto.normalizer_spec
  norm.name = 'identity'
  norm.add_dummy_prefix = add_dummy_prefix
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True
  return proto.SerializeToString()
