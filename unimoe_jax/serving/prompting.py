"""One model input from a question, media files and a SentencePiece model (numpy only, no TF).

What the CLIs (`generate`, `score`) feed a `UniMoE`, built the way the data pipeline builds
training examples:

  1. Placeholders. The text may hold `<image>`, `<video>`, `<speech>`, `<audio>` where the
     media go; each must occur once per file of its modality, in file order. When the text holds
     none, one line per file is put in front in the official order (`inference_all.py`:
     "<image>\n", then "<audio>\n", then "<video>\n", then the question): images, speech,
     audio, videos ("<image>\n<audio>\nWhat ..."). The official data writes every voice file
     as `<audio>`; when only speech files are given, `<audio>` in the text is read as
     `<speech>` (as `ManifestConfig.voice_modality='speech'` does).
  2. Template (generation): the Vicuna v1 prompt of one human turn and an empty answer,
     "SYSTEM USER: <question> ASSISTANT:" (data/conversation.py). Scoring uses the raw text.
  3. Tokens: BOS, then SentencePiece on each text piece between placeholders (official
     `tokenizer_image_token`), each placeholder its one id (`UniMoEConfig.<m>_token_id`) repeated
     `config.num_soft_tokens(m)` times per item of its file (conversation.tokenize_conversation's
     expansion).
  4. Media: `--image` / `--video` through CLIP preprocessing; `--speech` and `--audio` files are
     cut as the official loaders cut them (`media.audio.split_chunks`): speech into pieces of
     one Whisper window + 1 sample (480001 for 30 s), every piece kept, each a Whisper log-mel
     item; audio into 480000-sample pieces, at most 20, each a BEATs item padded as
     `config.audio_padding` says (`media.audio.beats_chunk_features`, with
     `audio_feature_mask`). A file's items stand, in order, at its one placeholder.
     A missing or undecodable file raises `MediaError` naming it.
"""

import dataclasses
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from unimoe_jax.data import conversation as conversation_lib
from unimoe_jax.media import audio as audio_lib
from unimoe_jax.media import image as image_lib
from unimoe_jax.media import video as video_lib
from unimoe_jax.media.errors import MediaError, PathLike
from unimoe_jax.modalities import MODALITIES, PLACEHOLDERS

# The order of the lines `place_placeholders` puts in front of a text without placeholders:
# official inference writes <image>, then <audio> (speech or audio), then <video>.
PLACEHOLDER_ORDER = ('image', 'speech', 'audio', 'video')

__all__ = [
    'MediaError',
    'PromptTokenizer',
    'Prompt',
    'place_placeholders',
    'media_features',
    'media_items',
    'prompt_ids',
    'build_prompt',
]


class PromptTokenizer:
  """A SentencePiece model + the placeholder ids of a `UniMoEConfig` (the duck type that
  `conversation.tokenize_conversation` takes: `encode`, `bos_id`, `eos_id`, `placeholder_ids`)."""

  def __init__(self, path: str, config):
    import sentencepiece  # pylint: disable=g-import-not-at-top

    self.path = path
    self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.placeholder_ids = {PLACEHOLDERS[m]: config.token_id(m) for m in MODALITIES}
    self._id_to_placeholder = {v: k for k, v in self.placeholder_ids.items()}
    ordered = sorted(self.placeholder_ids, key=len, reverse=True)
    self._split = re.compile('(' + '|'.join(re.escape(p) for p in ordered) + ')')

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str) -> List[int]:
    """Placeholders -> their one id; each text piece between them encoded on its own."""
    ids: List[int] = []
    for piece in self._split.split(text):
      if piece in self.placeholder_ids:
        ids.append(self.placeholder_ids[piece])
      elif piece:
        ids.extend(self.sp.encode(piece))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, placeholders dropped, cut at the first EOS."""
    out = []
    for token in ids:
      token = int(token)
      if token == self.eos_id:
        break
      if token not in self._id_to_placeholder and 0 <= token < self.vocab_size:
        out.append(token)
    return self.sp.decode(out)

  def piece(self, token: int) -> str:
    token = int(token)
    if token in self._id_to_placeholder:
      return self._id_to_placeholder[token]
    return self.sp.id_to_piece(token)


def place_placeholders(text: str, media: Mapping[str, Sequence[PathLike]]) -> str:
  """`text` with exactly one placeholder per media file (see the module docstring, step 1)."""
  counts = {m: len(media.get(m, ())) for m in MODALITIES}
  if counts['speech'] and not counts['audio'] and PLACEHOLDERS['speech'] not in text:
    text = text.replace(PLACEHOLDERS['audio'], PLACEHOLDERS['speech'])
  in_text = {m: text.count(PLACEHOLDERS[m]) for m in MODALITIES}
  if not any(in_text.values()):
    return ''.join(f'{PLACEHOLDERS[m]}\n' * counts[m] for m in PLACEHOLDER_ORDER) + text
  wrong = {m: (in_text[m], counts[m]) for m in MODALITIES if in_text[m] != counts[m]}
  if wrong:
    raise ValueError(
        'the text must hold one placeholder per media file: '
        + ', '.join(
            f'{PLACEHOLDERS[m]} occurs {t} times for {c} file(s)' for m, (t, c) in wrong.items()
        )
    )
  return text


def _load_speech(path: PathLike, config) -> List[np.ndarray]:
  """Every chunk of a speech file, each `[2 * max_source_positions, n_mels]` Whisper log-mel of
  the encoder's window (30 s for Whisper; shorter for a tiny encoder, as the data's
  ManifestConfig.speech_seconds makes it). Chunks are window + 1 samples apart, as official
  `train/data.py` / `inference_all.py` cut them (480001 for 30 s; the extra sample is dropped)."""
  enc = config.speech_encoder
  frames = 2 * enc.max_source_positions
  seconds = -(-frames // audio_lib.WHISPER_FRAMES_PER_SECOND)
  window = seconds * audio_lib.SAMPLE_RATE
  items = []
  for chunk in audio_lib.split_chunks(
      audio_lib.load_audio(path, audio_lib.SAMPLE_RATE), window + 1
  ):
    mel = audio_lib.whisper_log_mel(chunk[:window], enc.num_mel_bins, chunk_seconds=seconds)
    items.append(np.pad(mel[:frames], ((0, max(0, frames - len(mel))), (0, 0))))
  return items


def _load_audio(path: PathLike, config) -> List[Tuple[np.ndarray, np.ndarray]]:
  """(`[2998, 128]` BEATs filterbank, `[2998]` bool mask) of each of the first 20
  (`audio.AUDIO_MAX_CHUNKS`) 480000-sample chunks of an audio file, padded as
  `config.audio_padding` says."""
  wave = audio_lib.load_audio(path, audio_lib.SAMPLE_RATE)
  return [
      audio_lib.beats_chunk_features(chunk, config.audio_padding, audio_lib.BEATS_CHUNK_FRAMES)
      for chunk in audio_lib.split_chunks(
          wave, audio_lib.BEATS_CHUNK_SAMPLES, audio_lib.AUDIO_MAX_CHUNKS
      )
  ]


def media_items(
    config, media: Mapping[str, Sequence[PathLike]], image_mode: str = 'crop', video_frames: int = 8
) -> Tuple[Dict[str, np.ndarray], Dict[str, List[int]]]:
  """(the batch's media keys for one example, items per file of each modality).

  Args:
    config: the `UniMoEConfig`.
    media: modality -> file paths (in placeholder order).
    image_mode: 'crop' (CLIP processor, the official default) or 'pad' (LLaVA expand2square).
    video_frames: frames picked uniformly from each video file.
  Returns:
    `<m>_features` `[1, items, ...]` float32 and `<m>_mask` `[1, items]` bool per modality with
    files (plus `audio_feature_mask` `[1, items, frames]`), where a long speech / audio file
    gives several items (module docstring, step 4); and modality -> [items of file 0, ...].
  Raises:
    MediaError naming a missing or undecodable file; ValueError for a modality the model
    lacks.
  """
  out: Dict[str, np.ndarray] = {}
  counts: Dict[str, List[int]] = {}
  for m in MODALITIES:
    paths = list(media.get(m, ()))
    if not paths:
      continue
    if m not in config.modalities:
      raise ValueError(
          f'the model has no {m} encoder (it has {list(config.modalities)}); ' f'cannot use {paths}'
      )
    if m == 'image':
      per_file = [
          [image_lib.load_and_preprocess_image(p, size=config.vision.image_size, mode=image_mode)]
          for p in paths
      ]
    elif m == 'video':
      per_file = [
          [
              video_lib.preprocess_video(
                  video_lib.load_video_frames(p, video_frames), config.vision.image_size, image_mode
              )
          ]
          for p in paths
      ]
    elif m == 'speech':
      per_file = [_load_speech(p, config) for p in paths]
    else:
      pairs = [_load_audio(p, config) for p in paths]
      per_file = [[f for f, _ in file_pairs] for file_pairs in pairs]
      out['audio_feature_mask'] = np.stack([k for file_pairs in pairs for _, k in file_pairs])[None]
    items = [item for file_items in per_file for item in file_items]
    counts[m] = [len(file_items) for file_items in per_file]
    out[f'{m}_features'] = np.stack(items).astype(np.float32)[None]
    out[f'{m}_mask'] = np.ones((1, len(items)), bool)
  return out, counts


def media_features(
    config, media: Mapping[str, Sequence[PathLike]], image_mode: str = 'crop', video_frames: int = 8
) -> Dict[str, np.ndarray]:
  """The batch's media keys of `media_items` (without the per-file item counts)."""
  return media_items(config, media, image_mode, video_frames)[0]


def prompt_ids(
    text: str,
    tokenizer: PromptTokenizer,
    config,
    template: bool = True,
    items_per_file: Optional[Mapping[str, Sequence[int]]] = None,
) -> np.ndarray:
  """BOS + tokens of `text` (placeholders already placed), the k-th placeholder of modality m
  expanded to `items_per_file[m][k] * config.num_soft_tokens(m)` ids (one item per file for a
  modality not listed): `[n]` int32. `template` wraps `text` as the one human turn of a Vicuna
  v1 generation prompt."""
  items_per_file = items_per_file or {}
  soft = {}
  for m in config.modalities:
    n = config.num_soft_tokens(m)
    soft[PLACEHOLDERS[m]] = [c * n for c in items_per_file[m]] if m in items_per_file else n
  if template:
    conversation = [{'from': 'human', 'value': text}, {'from': 'gpt', 'value': ''}]
    ids, _ = conversation_lib.tokenize_conversation(conversation, tokenizer, soft)
    return ids
  tokens = np.asarray([tokenizer.bos_id] + tokenizer.encode(text), np.int64)
  id_to_placeholder = {v: k for k, v in tokenizer.placeholder_ids.items()}
  ids, _ = conversation_lib._expand_placeholders(  # pylint: disable=protected-access
      tokens, np.zeros(len(tokens), np.float32), id_to_placeholder, soft
  )
  return ids


@dataclasses.dataclass
class Prompt:
  """One example in the project's batch format.

  Attributes:
    batch: `decoder_input_tokens` `[1, length]` int32 (the prompt, then `room` zeros) and the
      media keys of `media_features`.
    length: the prompt's length in tokens (BOS and expanded placeholders included).
    text: the text that was tokenised (the rendered template when generating).
  """

  batch: Dict[str, np.ndarray]
  length: int
  text: str


def build_prompt(
    text: str,
    media: Mapping[str, Sequence[PathLike]],
    config,
    tokenizer: PromptTokenizer,
    *,
    template: bool = True,
    room: int = 0,
    image_mode: str = 'crop',
    video_frames: int = 8,
) -> Prompt:
  """The whole recipe of the module docstring for one example.

  Args:
    text: the question (generation) or the text to score; placeholders optional.
    media: modality ('image', 'video', 'speech', 'audio') -> file paths.
    config: the `UniMoEConfig`.
    tokenizer: a `PromptTokenizer` for `config`.
    template: render the Vicuna v1 generation prompt around `text`.
    room: zeros appended after the prompt (the decode buffer's free positions).
  Raises:
    MediaError naming a bad file; ValueError for placeholder / file count mismatches, a
    modality the model lacks, or token ids outside the model's vocabulary.
  """
  unknown = sorted(set(media) - set(MODALITIES))
  if unknown:
    raise ValueError(f'unknown media kinds {unknown}; expected {MODALITIES}')
  placed = place_placeholders(text, media)
  features, items_per_file = media_items(config, media, image_mode, video_frames)
  ids = prompt_ids(placed, tokenizer, config, template, items_per_file)
  placeholder_ids = set(tokenizer.placeholder_ids.values())
  bad = sorted(
      {
          int(t)
          for t in ids
          if int(t) not in placeholder_ids and not 0 <= int(t) < config.decoder.vocab_size
      }
  )
  if bad:
    raise ValueError(
        f'token ids {bad} of {tokenizer.path} fall outside the model vocabulary '
        f'({config.decoder.vocab_size})'
    )
  tokens = np.zeros((1, len(ids) + room), np.int32)
  tokens[0, : len(ids)] = ids
  rendered = (
      conversation_lib.prompt_text(
          [{'from': 'human', 'value': placed}, {'from': 'gpt', 'value': ''}]
      )
      if template
      else placed
  )
  return Prompt(batch={'decoder_input_tokens': tokens, **features}, length=len(ids), text=rendered)


def text_positions(ids: Sequence[int], tokenizer: PromptTokenizer) -> np.ndarray:
  """Indices of the ids that are text (not placeholders): `[n_text]` int."""
  ids = np.asarray(ids)
  return np.nonzero(~np.isin(ids, list(tokenizer.placeholder_ids.values())))[0]
