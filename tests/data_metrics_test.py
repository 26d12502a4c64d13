"""unimoe_jax.data.metrics against values worked out by hand (issue requirement 4)."""

import math
import shutil

import pytest

pytest.importorskip('jiwer')
pytest.importorskip('sacrebleu')
pytest.importorskip('pycocoevalcap')

from unimoe_jax.data import metrics  # noqa: E402

needs_java = pytest.mark.skipif(
    shutil.which('java') is None, reason="pycocoevalcap's PTBTokenizer needs java"
)


# ------------------------------------------------------------------------------------------------
# Normalisation, accuracy, exact match.


def test_normalize_text_rule():
  # Apostrophes deleted, other punctuation -> space, case folded, whitespace collapsed; NFKC
  # turns the full-width 'Ａ' into 'a'. '%' is Unicode punctuation (Po) and goes; '+' is a
  # symbol (Sm) and stays, as do digits.
  assert metrics.normalize_text("  Don't STOP\u2014well-known!  ") == 'dont stop well known'
  assert metrics.normalize_text('It\u2019s 50% (ok), \uff21+B?') == 'its 50 ok a+b'
  assert metrics.normalize_text(b'Hello,\n\tWorld.') == 'hello world'


def test_accuracy_and_exact_match():
  targets = ['Paris', 'blue', ['7', 'seven'], b'a b']
  predictions = ['paris.', 'blue', 'seven', 'a  b ']
  # accuracy: 'paris.' != 'Paris' (case and '.' matter) -> 3 of 4 = 75 %.
  assert metrics.accuracy(targets, predictions) == {'accuracy': 75.0}
  # exact_match normalises case and punctuation -> all 4 correct.
  assert metrics.exact_match(targets, predictions) == {'exact_match': 100.0}
  # One wrong answer in 4 -> 75 %.
  assert metrics.exact_match(targets, ['Paris', 'red', '7', 'a b']) == {'exact_match': 75.0}


def test_length_mismatch_and_empty_raise():
  with pytest.raises(ValueError, match='2 targets but 1 predictions'):
    metrics.exact_match(['a', 'b'], ['a'])
  with pytest.raises(ValueError, match='no examples'):
    metrics.word_error_rate([], [])


# ------------------------------------------------------------------------------------------------
# Multiple choice.

OPTIONS = {'answer': 'B', 'options': ['cat', 'dog', 'bird']}


@pytest.mark.parametrize(
    'prediction,correct',
    [
        ('B', True),  # LLaVA rule 1
        ('B. dog', True),  # LLaVA rule 2
        ('(B)', True),
        ('B.', True),
        ('B)', True),
        ('The answer is B', True),  # LLaVA rule 3
        ('The answer is (B).', True),
        ('the answer is B.', True),
        ('Answer: B', True),
        ('B\nBecause dogs bark.', True),  # newline -> '. ', then rule 2
        ('dog', True),  # option text
        ('Dog!', True),
        ('The answer is dog.', True),
        ('A', False),  # wrong letter
        ('(A)', False),
        ('The answer is C.', False),
        ('A. dog', False),  # the letter decides, as in the official script
        ('D', False),  # outside the 3 options
        ('cat', False),  # wrong option text
        ('b', False),  # letters are upper-case only
        ('B dog', False),  # neither a letter form nor the option text
        ('The answer is Bird', False),  # 'Bird' is not the letter B
        ('', False),
    ],
)
def test_multiple_choice_variants(prediction, correct):
  assert metrics.multiple_choice_correct(OPTIONS, prediction) is correct


def test_multiple_choice_target_forms():
  # Letter-only target: letters work, text cannot be checked.
  assert metrics.multiple_choice_correct('C', 'The answer is C.')
  assert not metrics.multiple_choice_correct('C', 'B')
  # Index answer and ScienceQA's 'choices' key: index 2 -> 'C' -> 'bird'.
  scienceqa = {'answer': 2, 'choices': ['cat', 'dog', 'bird']}
  assert metrics.multiple_choice_correct(scienceqa, 'C')
  assert metrics.multiple_choice_correct(scienceqa, 'bird')
  assert not metrics.multiple_choice_correct(scienceqa, 'B')
  # Answer given as option text resolves to its letter.
  assert metrics.multiple_choice_correct({'answer': 'Dog', 'options': ['cat', 'dog']}, '(B)')
  # Free-form answer (ClothoAQA yes/no).
  assert metrics.multiple_choice_correct('yes', 'Yes.')
  assert not metrics.multiple_choice_correct('yes', 'no')
  with pytest.raises(ValueError, match='outside the 2 options'):
    metrics.multiple_choice_correct({'answer': 'C', 'options': ['x', 'y']}, 'C')
  with pytest.raises(ValueError, match='neither a letter nor one of the options'):
    metrics.multiple_choice_correct({'answer': 'fish', 'options': ['x', 'y']}, 'x')


def test_multiple_choice_accuracy_percent():
  targets = [OPTIONS, OPTIONS, 'A', {'answer': 0, 'options': ['yes', 'no']}, b'D']
  predictions = ['B', 'cat', 'The answer is A.', 'yes', b'(C)']
  # Correct: 1st (B), 3rd (A), 4th (yes = option A) -> 3 of 5 = 60 %.
  assert metrics.multiple_choice_accuracy(targets, predictions) == {'accuracy': 60.0}


# ------------------------------------------------------------------------------------------------
# WER.


def test_word_error_rate_hand_computed():
  # Pair 1: 'the cat sat on the mat' (6 words after normalisation) vs 'the dog sat on mat':
  # cat -> dog is 1 substitution, the second 'the' is 1 deletion -> 2 / 6.
  one = metrics.word_error_rate(['The cat sat on the mat.'], ['the dog sat on mat'])
  assert one['wer'] == pytest.approx(2 / 6, abs=1e-12)
  assert (
      one['wer_substitutions'],
      one['wer_deletions'],
      one['wer_insertions'],
      one['wer_reference_words'],
  ) == (1, 1, 0, 6)
  # Adding pair 2: 'hello world' (2 words) vs 'hello big world' (1 insertion).
  # Corpus level: (2 + 1) / (6 + 2) = 0.375; a per-utterance mean would be (1/3 + 1/2) / 2.
  two = metrics.word_error_rate(
      ['The cat sat on the mat.', 'Hello, world!'], ['the dog sat on mat', 'hello big world']
  )
  assert two['wer'] == pytest.approx(3 / 8, abs=1e-12)
  # Case and punctuation only -> 0; an empty hypothesis deletes every word -> 1.
  assert metrics.word_error_rate(["It's OK."], ['its ok'])['wer'] == 0.0
  assert metrics.word_error_rate(['a b c'], [''])['wer'] == 1.0
  # Empty reference: only insertions count; with no reference words at all it is inf.
  assert metrics.word_error_rate(['a b', ''], ['a b', 'x'])['wer'] == pytest.approx(1 / 2)
  assert metrics.word_error_rate(['...'], ['x'])['wer'] == math.inf


# ------------------------------------------------------------------------------------------------
# BLEU.


def test_bleu_hand_computed():
  sentence = 'the quick brown fox jumps over the lazy dog'
  assert metrics.bleu([sentence], [sentence])['bleu'] == pytest.approx(100.0, abs=1e-9)
  # Hypothesis = the first 6 of 9 reference tokens: every n-gram precision is 1, so BLEU is the
  # brevity penalty exp(1 - 9 / 6) = exp(-0.5) = 0.60653.
  short = 'the quick brown fox jumps over'
  assert metrics.bleu([sentence], [short])['bleu'] == pytest.approx(100 * math.exp(-0.5), abs=1e-9)
  # Two references of 9 and 7 tokens: the closest length (7) sets BP = exp(1 - 7 / 6).
  assert metrics.bleu([[sentence, 'the quick brown fox jumps over it']], [short])['bleu'] == (
      pytest.approx(100 * math.exp(1 - 7 / 6), abs=1e-9)
  )
  # 'the cat sat on the mat' vs reference 'the cat sat on a mat' (equal lengths, BP = 1):
  # clipped matches 1-gram 5/6, 2-gram 3/5 (the cat, cat sat, sat on), 3-gram 2/4, 4-gram 1/3;
  # geometric mean (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** 0.25.
  assert metrics.bleu(['the cat sat on a mat'], ['the cat sat on the mat'])['bleu'] == (
      pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-9)
  )


def test_bleu_variable_reference_counts():
  # Example 1 has two references, example 2 one: both hypotheses copy a reference -> 100.
  targets = [['a dog runs in the park', 'a dog is running in a park'], 'two cats sleep on a sofa']
  predictions = ['a dog is running in a park', 'two cats sleep on a sofa']
  assert metrics.bleu(targets, predictions)['bleu'] == pytest.approx(100.0, abs=1e-9)
  assert metrics.bleu(targets, ['a cat', 'two cats sleep on a sofa'])['bleu'] < 100.0


# ------------------------------------------------------------------------------------------------
# CIDEr-D.
#
# In every case below the two examples share no n-gram, so each reference n-gram has document
# frequency 1 and an unseen candidate n-gram counts as 1 too: every idf is log(2) - log(1), the
# same for all n-grams, and each order's clipped cosine reduces to plain count overlap.
# 'length' in the Gaussian penalty is pycocoevalcap's bigram count.


@needs_java
def test_cider_hand_computed_ptb():
  # Ex 1: 'dog runs on sand' vs 'dog runs on grass': 1-grams 3/4, 2-grams 2/3, 3-grams 1/2,
  # 4-grams 0; equal lengths -> 10 * (3/4 + 2/3 + 1/2 + 0) / 4 = 4.7916667.
  # Ex 2: exact copy of the 3-word 'red car parked': orders 1-3 give 1, order 4 has no n-gram
  # -> 10 * 3 / 4 = 7.5. Corpus mean (4.7916667 + 7.5) / 2 = 6.1458333.
  # The PTB tokenizer lower-cases and drops the '.', so 'Red car parked.' is the same caption.
  expected = (10 * (3 / 4 + 2 / 3 + 1 / 2) / 4 + 7.5) / 2
  got = metrics.cider(
      ['dog runs on grass', 'Red car parked.'], ['dog runs on sand', 'red car parked']
  )
  assert got['cider'] == pytest.approx(expected, abs=1e-9)


@needs_java
def test_cider_multiple_references_and_length_penalty():
  # Ex 1: candidate 'dog runs on' (2 bigrams) against references 'dog runs on grass' (3 bigrams)
  # and 'cat sleeps'. Against ref 1: 3/sqrt(3*4), 2/sqrt(2*3), 1/sqrt(1*2), 0, each times
  # exp(-(2 - 3)**2 / (2 * 6**2)); against ref 2: 0. Mean over 4 orders, over 2 references, x10.
  # Ex 2: nothing in common -> 0. Corpus mean = ex 1 / 2.
  per_order = 3 / math.sqrt(12) + 2 / math.sqrt(6) + 1 / math.sqrt(2)
  example_1 = per_order * math.exp(-1 / 72) / 4 / 2 * 10
  got = metrics.cider(
      [['dog runs on grass', 'cat sleeps'], 'red car parked'], ['dog runs on', 'blue boat']
  )
  assert got['cider'] == pytest.approx(example_1 / 2, abs=1e-9)


@needs_java
def test_cider_ranks_copy_above_unrelated():
  targets = [
      ['a man rides a horse on the beach', 'a person riding a horse by the sea'],
      ['two dogs play with a ball', 'dogs playing fetch in a yard'],
      ['a plate of pasta with tomato sauce', 'spaghetti with red sauce on a plate'],
  ]
  copies = [
      'a man rides a horse on the beach',
      'two dogs play with a ball',
      'a plate of pasta with tomato sauce',
  ]
  unrelated = ['a red bus on a street', 'a laptop on a desk', 'snow on a mountain']
  good = metrics.cider(targets, copies)['cider']
  bad = metrics.cider(targets, unrelated)['cider']
  # 'a' and 'on' still overlap in the unrelated captions, so bad is small but not 0.
  assert good > 1.0 and good > 10 * bad


def test_cider_whitespace_tokenizer_and_single_example():
  # Same hand value as the PTB test (no punctuation involved), without Java.
  expected = (10 * (3 / 4 + 2 / 3 + 1 / 2) / 4 + 7.5) / 2
  got = metrics.cider(
      ['dog runs on grass', 'red car parked'],
      ['dog runs on sand', 'red car parked'],
      tokenizer='whitespace',
  )
  assert got['cider'] == pytest.approx(expected, abs=1e-9)
  # One example: idf = log(1) - log(1) = 0 for every n-gram, so even a copy scores 0.
  assert metrics.cider(['a b c'], ['a b c'], tokenizer='whitespace')['cider'] == 0.0
  with pytest.raises(ValueError, match='tokenizer'):
    metrics.cider(['a'], ['a'], tokenizer='bpe')
