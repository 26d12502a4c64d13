"""The Vicuna v1 conversation template and the tokenisation + loss masking of one conversation.

Official Uni-MoE trains with `--version v1`: `conv_vicuna_v1` (SeparatorStyle.TWO, roles USER /
ASSISTANT, sep " ", sep2 "</s>"), whose `get_prompt` renders

    system + " " + "USER: " + q1 + " " + "ASSISTANT: " + a1 + "</s>" + "USER: " + q2 + " " + ...

A human turn ends with sep " ", an answer with sep2 "</s>". An empty message renders as the
bare "ROLE:" with no separator (how a generation prompt ends: "... ASSISTANT:").

Placeholders stay where the data puts them. LLaVA's `preprocess_multimodal` moves `<image>` to
the start of its turn followed by "\\n"; Uni-MoE defines that function (Uni_MoE_audio) but never
calls it, so its prompts keep e.g. "What is in the image?\\n<image>" as written. We do the same.

Tokenisation follows official `preprocess_va` (LLaVA's `preprocess_v1`) with the legacy slow
LLaMA tokenizer: BOS, then the prompt cut at every "</s>" (which becomes the EOS id) and every
placeholder (its one id), each text chunk SentencePiece-encoded on its own. Loss weights: the
official code masks `len(tokenize(instruction + "ASSISTANT: ")) - 2` tokens of each round (BOS
and the lone "▁" of the trailing space excluded), i.e. everything up to and including
"ASSISTANT:". The answer tokens (the first one carries the space after the colon: "▁Hi") and
the "</s>" that ends each answer get weight 1; BOS, system prompt, user turns, role names and
placeholders get 0. Here the boundary is found by checking that the tokens of the round's text
up to "ASSISTANT:" are a prefix of the round's tokens (true for SentencePiece, which never merges
across a space); when they are not, the conversation is refused instead of masked wrongly
(official: the whole example silently gets no loss after a "tokenization mismatch" warning).

The tokenizer's `legacy` flag (`MultimodalVocabulary.legacy`, read from tokenizer_config.json):
the text after each "</s>" ("USER: ..." of the next round) is encoded with
`encode_after_special`, which drops SentencePiece's dummy-prefix space when legacy is False, as
the slow LlamaTokenizer does then ("US" instead of "▁US"). The official masking counts each
round's tokens on the round alone (with the prefix); where that count differs from the tokens
in context (not for LLaMA's "USER:"), its labels are misaligned or dropped, while ours stay on
the answers.
"""

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import gin
import numpy as np

SYSTEM = (
    'A chat between a curious user and an artificial intelligence assistant. '
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {'human': 'USER', 'gpt': 'ASSISTANT'}
SEP = ' '
SEP2 = '</s>'

Conversation = Sequence[Mapping[str, str]]  # [{'from': 'human' | 'gpt', 'value': str}, ...]


@gin.configurable
def system_prompt(text: str = SYSTEM) -> str:
  """The system message that opens every conversation: Vicuna v1's, as official Uni-MoE uses.

  Training data, evaluation, `generate` and `score` all render through here, so one binding
  changes them together. The CPU demo binds '' (gin/demo/tiny_data.gin): its sample answers are a
  few tokens, and Vicuna's 102-token system message would be three quarters of every sequence.
  """
  return text


def _opening() -> str:
  system = system_prompt()
  return system + SEP if system else ''


def validate(conversations: Conversation) -> None:
  """Raises ValueError unless turns alternate human, gpt, human, ... starting with human.

  Every human message must be non-empty; a gpt message may be empty (or None) only as the last
  turn (a generation prompt). Messages may not contain "</s>", which would break the rounds.
  """
  if not isinstance(conversations, (list, tuple)) or not conversations:
    raise ValueError('conversation is empty or not a list of turns')
  for index, turn in enumerate(conversations):
    if not isinstance(turn, Mapping) or 'from' not in turn or 'value' not in turn:
      raise ValueError(f'turn {index} must be a dict with "from" and "value", got {turn!r:.80}')
    expected = 'human' if index % 2 == 0 else 'gpt'
    if turn['from'] != expected:
      raise ValueError(
          f'turn {index} is from {turn["from"]!r}, expected {expected!r} (turns '
          'must alternate human/gpt, starting with human)'
      )
    value = turn['value']
    if value is not None and not isinstance(value, str):
      raise ValueError(f'turn {index} value must be a string, got {type(value).__name__}')
    if not value:
      if expected == 'human':
        raise ValueError(f'turn {index} (human) is empty')
      if index != len(conversations) - 1:
        raise ValueError(f'turn {index} (gpt) is empty but is not the last turn')
    elif SEP2 in value:
      raise ValueError(f'turn {index} contains the separator {SEP2!r}')


def render(conversations: Conversation) -> List[Tuple[str, bool]]:
  """The official Vicuna v1 prompt as (text, is_answer) segments whose concatenation is the
  `get_prompt()` string; an answer segment is the answer text + "</s>"."""
  validate(conversations)
  segments = []
  prompt = _opening()
  for turn in conversations:
    role, value = ROLES[turn['from']], turn['value']
    if not value:
      prompt += role + ':'
    elif turn['from'] == 'human':
      prompt += role + ': ' + value + SEP
    else:
      segments.append((prompt + role + ': ', False))
      segments.append((value + SEP2, True))
      prompt = ''
  if prompt:
    segments.append((prompt, False))
  return segments


def prompt_text(conversations: Conversation) -> str:
  return ''.join(text for text, _ in render(conversations))


def _rounds(conversations: Conversation):
  """(text before the answer, answer or None) per round, the official `split(sep2)` rounds."""
  validate(conversations)
  rounds = []
  head = _opening()
  for turn in conversations:
    role, value = ROLES[turn['from']], turn['value']
    if turn['from'] == 'human':
      head += role + ': ' + value + SEP
    elif value:
      rounds.append((head + role + ':', value))
      head = ''
    else:
      head += role + ':'
  if head:
    rounds.append((head, None))
  return rounds


def tokenize_conversation(
    conversations: Conversation,
    vocab,
    num_soft_tokens: Mapping[str, Union[int, Sequence[int]]],
) -> Tuple[np.ndarray, np.ndarray]:
  """BOS + the tokenised Vicuna v1 prompt, with loss weights on the answers.

  Args:
    conversations: [{'from': 'human'|'gpt', 'value': text}, ...] (the official manifest field).
    vocab: a `MultimodalVocabulary` (encode splits on placeholders; bos_id, eos_id,
      placeholder_ids).
    num_soft_tokens: placeholder string -> copies of its id per occurrence: an int, or one int
      per occurrence in text order (an item that became several chunks). A placeholder that
      occurs in the text must be listed here.

  Returns:
    targets `[n]` int32 and loss_weights `[n]` float32 (1 on answer tokens and their EOS).

  Raises:
    ValueError: malformed conversation, unlisted placeholder, wrong per-occurrence count, or
      an answer boundary the tokenizer does not keep (see the module docstring).
  """
  id_to_placeholder = {v: k for k, v in vocab.placeholder_ids.items()}
  tokens: List[int] = [vocab.bos_id]
  weights: List[float] = [0.0]
  after_eos = getattr(vocab, 'encode_after_special', vocab.encode)
  for index, (head, answer) in enumerate(_rounds(conversations)):
    # Rounds after the first follow the previous answer's "</s>" (module docstring).
    encode = vocab.encode if index == 0 else after_eos
    head_ids = list(encode(head))
    if answer is None:
      tokens += head_ids
      weights += [0.0] * len(head_ids)
      continue
    round_ids = list(encode(head + ' ' + answer))
    if round_ids[: len(head_ids)] != head_ids:
      raise ValueError(
          f'round {index}: the tokens of the text up to "ASSISTANT:" are not a '
          "prefix of the round's tokens, so the answer cannot be masked exactly"
      )
    tokens += round_ids + [vocab.eos_id]
    weights += [0.0] * len(head_ids) + [1.0] * (len(round_ids) - len(head_ids)) + [1.0]
  tokens = np.asarray(tokens, np.int64)
  weights = np.asarray(weights, np.float32)
  is_placeholder = np.isin(tokens, list(id_to_placeholder))
  weights[is_placeholder] = 0.0
  return _expand_placeholders(tokens, weights, id_to_placeholder, num_soft_tokens)


def _expand_placeholders(
    tokens, weights, id_to_placeholder: Dict[int, str], num_soft_tokens
) -> Tuple[np.ndarray, np.ndarray]:
  repeats = np.ones(len(tokens), np.int64)
  for token, placeholder in id_to_placeholder.items():
    positions = np.nonzero(tokens == token)[0]
    if positions.size == 0:
      continue
    if placeholder not in num_soft_tokens:
      raise ValueError(
          f'{placeholder} occurs {positions.size} times but num_soft_tokens has no '
          f'entry for it (has {sorted(num_soft_tokens)})'
      )
    counts = num_soft_tokens[placeholder]
    counts = np.full(positions.size, counts) if np.ndim(counts) == 0 else np.asarray(counts)
    if counts.shape != positions.shape:
      raise ValueError(
          f'{placeholder} occurs {positions.size} times but num_soft_tokens gives '
          f'{counts.size} per-occurrence counts'
      )
    if np.any(counts < 1):
      raise ValueError(f'num_soft_tokens for {placeholder} must be >= 1, got {counts.tolist()}')
    repeats[positions] = counts
  return (
      np.repeat(tokens, repeats).astype(np.int32),
      np.repeat(weights, repeats).astype(np.float32),
  )


def decode_prompt(ids, vocab) -> str:
  """Text of a `tokenize_conversation` output: BOS dropped, EOS rendered as "</s>", each
  placeholder id as its string. With one copy per placeholder (num_soft_tokens 1) this is the
  prompt: `decode_prompt(tokenize_conversation(c, v, {p: 1, ...})[0], v) == prompt_text(c)`."""
  ids = [int(i) for i in np.asarray(ids).reshape(-1)]
  if ids and ids[0] == vocab.bos_id:
    ids = ids[1:]
  runs: List[List[int]] = [[]]
  for token in ids:
    if token == vocab.eos_id:
      runs.append([])
    else:
      runs[-1].append(token)
  return SEP2.join(vocab.decode(run) for run in runs)


def answer_text(conversations: Conversation) -> Optional[str]:
  """What the weighted tokens decode to: every answer followed by "</s>", concatenated."""
  answers = [text for text, is_answer in render(conversations) if is_answer]
  return ''.join(answers) if answers else None
