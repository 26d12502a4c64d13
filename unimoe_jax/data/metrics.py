"""Evaluation metrics as seqio metric functions: `fn(targets, predictions) -> {name: value}`.

seqio calls a task's `metric_fns` with the postprocessed targets and the decoded predictions of
the whole eval split (lists of equal length) and logs every float as a `seqio.metrics.Scalar`.
Targets and predictions may arrive as `bytes` (pretokenized features come back from tf.data as
bytes); every function here decodes them as UTF-8 first.

Scales (stated per function, summarised here):
  multiple_choice_accuracy, accuracy, exact_match   percent, 0..100 (as LLaVA's ScienceQA script
                                                     and t5.evaluation.metrics report accuracy)
  word_error_rate                                   fraction ('wer' 0.25 = 25 %), may exceed 1
  bleu                                              sacrebleu's 0..100
  cider                                             pycocoevalcap's CIDEr-D scale (x10 built in;
                                                     an exact copy of a single reference is 10)

Text normalisation used by WER, exact_match and the option-text rule of multiple choice
(`normalize_text`): Unicode NFKC; lower-case; apostrophes (' and U+2019) deleted so contractions
stay one word ("Don't" -> "dont"); every other Unicode punctuation character (categories P*)
replaced by a space, so "well-known" -> "well known"; whitespace runs collapsed to one space and
the ends stripped. Symbols (S*: '+', '$', '=') and digits are kept; note '%', '#', '&', '@'
and '*' are Unicode punctuation (Po) and become spaces.
"""

import re
import unicodedata
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import jiwer
import sacrebleu

Text = Union[str, bytes]

_APOSTROPHES = ("'", '\u2019')
_LETTERS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'


def _as_text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, str):
    return value
  # numpy scalars of dtype object/bytes from tf.data.
  if hasattr(value, 'item'):
    return _as_text(value.item())
  raise TypeError(f'expected str or bytes, got {type(value).__name__}: {value!r}')


def _check_lengths(targets: Sequence[Any], predictions: Sequence[Any]) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} predictions')
  if not len(targets):
    raise ValueError('no examples to score (targets and predictions are empty)')


def normalize_text(text: Text) -> str:
  """The normalisation described in the module docstring: NFKC, lower-case, apostrophes deleted,
  other punctuation -> space, whitespace collapsed and stripped."""
  text = unicodedata.normalize('NFKC', _as_text(text)).lower()
  pieces = []
  for char in text:
    if char in _APOSTROPHES:
      continue
    pieces.append(' ' if unicodedata.category(char).startswith('P') else char)
  return ' '.join(''.join(pieces).split())


def _references(target: Any) -> List[str]:
  """A target that is one string or a list/tuple of acceptable strings -> list of str."""
  if isinstance(target, (str, bytes)):
    return [_as_text(target)]
  references = [_as_text(t) for t in target]
  if not references:
    raise ValueError('a target has an empty list of references')
  return references


# ------------------------------------------------------------------------------------------------
# Accuracy-style metrics.


def accuracy(targets: Sequence[Any], predictions: Sequence[Text]) -> Dict[str, float]:
  """Percent of predictions equal to their target after whitespace normalisation only.

  Case and punctuation matter (use `exact_match` to ignore them); runs of whitespace count as one
  space and the ends are stripped. A target may be a list of acceptable strings (any match).

  Returns:
    {'accuracy': percent in 0..100}.
  """
  _check_lengths(targets, predictions)
  squash = lambda s: ' '.join(s.split())
  correct = sum(
      squash(_as_text(p)) in {squash(r) for r in _references(t)}
      for t, p in zip(targets, predictions)
  )
  return {'accuracy': 100.0 * correct / len(targets)}


def exact_match(targets: Sequence[Any], predictions: Sequence[Text]) -> Dict[str, float]:
  """Percent of predictions whose `normalize_text` equals that of the target (or of any of a
  list of acceptable targets): case-, punctuation- and whitespace-insensitive.

  Returns:
    {'exact_match': percent in 0..100}.
  """
  _check_lengths(targets, predictions)
  correct = sum(
      normalize_text(p) in {normalize_text(r) for r in _references(t)}
      for t, p in zip(targets, predictions)
  )
  return {'exact_match': 100.0 * correct / len(targets)}


# ------------------------------------------------------------------------------------------------
# Multiple choice.

# Parsing follows LLaVA's llava/eval/eval_science_qa.py (the script LLaVA-style models, Uni-MoE
# included, are scored with; Uni-MoE's own eval.py only writes generations): the prediction, with
# newlines turned into '. ', names a letter if it is (1) exactly a letter, (2) starts with a letter
# and '. ', or (3) contains "The answer is X". Extensions here, each listed in the docstring.
_LETTER_AT_START = re.compile(r'^(?:\(([A-Z])\)|([A-Z])(?:[.):]|$)(?=\s|$))')
_ANSWER_IS = re.compile(r'(?i:\bthe answer is)\s*:?\s*\(?([A-Z])\b')
_ANSWER_COLON = re.compile(r'^(?i:answer)\s*:\s*\(?([A-Z])\b')
_ANSWER_PREFIX = re.compile(r'^\s*(?i:the answer is|answer\s*:)\s*')


def parse_choice_letter(prediction: Text) -> Optional[str]:
  """The option letter a free-form prediction names, or None.

  Rules, in order (letters are upper-case A-Z only, as the official script):
    1. LLaVA: the stripped prediction is a single letter: "B".
    2. LLaVA "B. text", widened to a letter at the start followed by '.', ')' or ':' and then
       whitespace or the end, or a parenthesised letter at the start: "B.", "B)", "B: dog",
       "(B)", "(B) dog".
    3. LLaVA "The answer is B" (case-insensitive phrase; the letter may be parenthesised and
       must end a word, so "The answer is Apple" names no letter, unlike LLaVA's regex), and
       "Answer: B" at the start.
  """
  text = _as_text(prediction).replace('\n', '. ').strip()
  match = _LETTER_AT_START.match(text)
  if match:
    return match.group(1) or match.group(2)
  match = _ANSWER_IS.search(text) or _ANSWER_COLON.match(text)
  return match.group(1) if match else None


def _choice_target(target: Any):
  """-> (answer letter or None, normalised answer text or None, options list or None)."""
  if isinstance(target, Mapping):
    if 'answer' not in target:
      raise ValueError(f"a multiple-choice target dict needs an 'answer' key, got {target!r}")
    options = target.get('options', target.get('choices'))
    options = None if options is None else [_as_text(o) for o in options]
    answer = target['answer']
    if hasattr(answer, 'item') and not isinstance(answer, (str, bytes)):
      answer = answer.item()  # numpy scalar from tf.data
    if isinstance(answer, int) and not isinstance(answer, bool):
      if options is None or not 0 <= answer < len(options):
        raise ValueError(
            f'answer index {answer} needs options with more than {answer} entries, '
            f'got {options!r}'
        )
      return _LETTERS[answer], normalize_text(options[answer]), options
    answer = _as_text(answer).strip()
    if len(answer) == 1 and answer in _LETTERS:
      if options is not None:
        if _LETTERS.index(answer) >= len(options):
          raise ValueError(f'answer {answer!r} is outside the {len(options)} options {options!r}')
        return answer, normalize_text(options[_LETTERS.index(answer)]), options
      return answer, None, None
    # The answer given as option text.
    normalized = normalize_text(answer)
    if options is not None:
      for index, option in enumerate(options):
        if normalize_text(option) == normalized:
          return _LETTERS[index], normalized, options
      raise ValueError(f'answer {answer!r} is neither a letter nor one of the options {options!r}')
    return None, normalized, None
  answer = _as_text(target).strip()
  if len(answer) == 1 and answer in _LETTERS:
    return answer, None, None
  return None, normalize_text(answer), None


def multiple_choice_correct(target: Any, prediction: Text) -> bool:
  """Whether one prediction answers one multiple-choice target (see multiple_choice_accuracy)."""
  letter, answer_text, options = _choice_target(target)
  if options is not None and len(options) > len(_LETTERS):
    raise ValueError(f'at most {len(_LETTERS)} options are supported, got {len(options)}')
  named = parse_choice_letter(prediction)
  if named is not None:
    # As the official script: a letter outside the options is a wrong answer, not a retry.
    if options is not None and _LETTERS.index(named) >= len(options):
      return False
    if letter is not None:
      return named == letter
  # No letter (or a text-only target): compare the option text, after dropping a leading
  # "The answer is" / "Answer:" so "The answer is dog." matches the option "dog".
  text = normalize_text(_ANSWER_PREFIX.sub('', _as_text(prediction).strip()))
  if not text:
    return False
  if options is not None:
    matching = [i for i, option in enumerate(options) if normalize_text(option) == text]
    return bool(matching) and _LETTERS[matching[0]] == letter
  return answer_text is not None and text == answer_text


def multiple_choice_accuracy(
    targets: Sequence[Any], predictions: Sequence[Text]
) -> Dict[str, float]:
  """Multiple-choice accuracy (ScienceQA, A-OKVQA MC, ClothoAQA-style answers), in percent.

  A target is one of:
    * a dict {'answer': letter | index | option text, 'options': [option texts]} ('choices' is
      accepted for 'options', as ScienceQA names it; an int answer is an index into options);
    * a letter string 'B' (no options known: only letter rules apply);
    * any other string: a free-form answer ("yes", "dog"), matched as option text.
  A prediction is correct when `parse_choice_letter` finds the target's letter in it, or, if it
  names no letter, when its `normalize_text` (after dropping a leading "The answer is" /
  "Answer:") equals the normalised text of the correct option (first match if options repeat).
  A named letter beyond the number of options, or a wrong letter, is wrong even if the option
  text also appears ("A. dog" with dog = option B is wrong, as in the official script).

  Returns:
    {'accuracy': percent in 0..100}.
  """
  _check_lengths(targets, predictions)
  correct = sum(multiple_choice_correct(t, p) for t, p in zip(targets, predictions))
  return {'accuracy': 100.0 * correct / len(targets)}


# ------------------------------------------------------------------------------------------------
# ASR and generation metrics.


def word_error_rate(targets: Sequence[Text], predictions: Sequence[Text]) -> Dict[str, float]:
  """Corpus-level word error rate with jiwer over `normalize_text`-ed text.

  WER = (substitutions + deletions + insertions) summed over the corpus / reference words summed
  over the corpus (not a mean of per-utterance rates). A reference that normalises to nothing
  contributes only insertions. If the whole corpus has no reference words the WER is 0.0 when
  there are no hypothesis words either, else inf.

  Returns:
    {'wer': fraction (0.25 = 25 %; can exceed 1 with insertions), plus the corpus counts
    'wer_substitutions', 'wer_deletions', 'wer_insertions', 'wer_reference_words'}.
  """
  _check_lengths(targets, predictions)
  references = [normalize_text(t) for t in targets]
  hypotheses = [normalize_text(p) for p in predictions]
  output = jiwer.process_words(references, hypotheses)
  reference_words = output.substitutions + output.deletions + output.hits
  errors = output.substitutions + output.deletions + output.insertions
  if reference_words:
    wer = errors / reference_words
  else:
    wer = 0.0 if errors == 0 else float('inf')
  return {
      'wer': float(wer),
      'wer_substitutions': float(output.substitutions),
      'wer_deletions': float(output.deletions),
      'wer_insertions': float(output.insertions),
      'wer_reference_words': float(reference_words),
  }


def bleu(
    targets: Sequence[Any],
    predictions: Sequence[Text],
    tokenize: str = '13a',
    lowercase: bool = False,
) -> Dict[str, float]:
  """Corpus BLEU with `sacrebleu.corpus_bleu` (defaults: 13a tokenizer, case-sensitive, 'exp'
  smoothing, BLEU-4 with the corpus brevity penalty), on the raw (un-normalised) text.

  A target is one reference string or a list of references; examples may have different numbers
  of references (the missing ones are passed to sacrebleu as None, which it skips).
  Bind other options with functools.partial(bleu, tokenize='intl').

  Returns:
    {'bleu': 0..100}.
  """
  _check_lengths(targets, predictions)
  references = [_references(t) for t in targets]
  streams = max(len(r) for r in references)
  reference_streams = [[r[i] if i < len(r) else None for r in references] for i in range(streams)]
  score = sacrebleu.corpus_bleu(
      [_as_text(p) for p in predictions], reference_streams, tokenize=tokenize, lowercase=lowercase
  )
  return {'bleu': float(score.score)}


def cider(
    targets: Sequence[Any], predictions: Sequence[Text], tokenizer: str = 'ptb'
) -> Dict[str, float]:
  """Corpus CIDEr-D with `pycocoevalcap.cider.cider.Cider` (n = 1..4, sigma 6: clipped tf-idf
  cosine per n-gram order, Gaussian length penalty, mean over orders and references, x10).

  Document frequencies come from the references of this call, so the score depends on the whole
  corpus: with a single example every idf is log(1) - log(1) = 0 and CIDEr is 0.

  Args:
    targets: per example one reference caption or a list of them.
    tokenizer: 'ptb' runs pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1 through `java`;
      lower-cases, splits punctuation and drops it) on references and predictions, as the COCO
      caption evaluation does; 'whitespace' uses `normalize_text` and splits on spaces (no Java).

  Returns:
    {'cider': mean per-example CIDEr-D (an exact copy of every reference scores 10 when every
    n-gram order is present and no other example shares its n-grams)}.
  """
  from pycocoevalcap.cider.cider import Cider

  _check_lengths(targets, predictions)
  references = {i: _references(t) for i, t in enumerate(targets)}
  candidates = {i: [_as_text(p)] for i, p in enumerate(predictions)}
  if tokenizer == 'ptb':
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer()
    references = ptb.tokenize({i: [{'caption': r} for r in refs] for i, refs in references.items()})
    candidates = ptb.tokenize({i: [{'caption': c} for c in caps] for i, caps in candidates.items()})
  elif tokenizer == 'whitespace':
    references = {i: [normalize_text(r) for r in refs] for i, refs in references.items()}
    candidates = {i: [normalize_text(c) for c in caps] for i, caps in candidates.items()}
  else:
    raise ValueError(f"tokenizer must be 'ptb' or 'whitespace', got {tokenizer!r}")
  score, _ = Cider().compute_score(references, candidates)
  return {'cider': float(score)}
