"""Answers a question about optional media with a checkpoint: `answer`.

It renders the Vicuna v1 prompt ("SYSTEM USER: <image>\nWhat is in the image? ASSISTANT:", see
`serving/prompting.py`), decodes greedily (default), by sampling (`temperature` > 0, with
`top_k` / `top_p`) or by beam search (`num_beams` > 1), and returns the answer text up to EOS.
Speech feeds the Whisper encoder, audio BEATs; a file longer than 30 s is cut into chunks as
official inference cuts it (speech: all, audio: up to 20, all at its one placeholder).
Text-only checkpoints (decoder params only, config.gin without MODEL_CONFIG) work the same way
without media. The vocabulary is `vocab_path` or the checkpoint's `tokenizer.model`.

The checkpoint may also be a training MODEL_DIR (its latest step), its `checkpoints/` directory
or one `checkpoints/<step>` directory: the params are read from the train state and the model
from MODEL_DIR/config.gin, no export step needed; the tokenizer is then MODEL_DIR's or that of
the converted checkpoint the run started from (INITIAL_CHECKPOINT_PATH), else `vocab_path`.

The decoding settings are one `DecodingSettings`, checked when made (before any params are
read), the error naming its flag of `python -m unimoe_jax.generate`. The prompt (media soft
tokens included) plus `max_decode_steps` must fit in `max_length` (default 2048, the LLaMA /
Vicuna context): the decode buffer and cache are that long.
"""

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import checkpoints
from unimoe_jax import decoding
from unimoe_jax.network import UniMoE
from unimoe_jax.serving import prompting
from unimoe_jax.serving import scoring


@dataclasses.dataclass
class Answer:
  """What `answer` returns.

  Attributes:
    text: the answer, decoded up to (without) EOS.
    tokens: the generated ids (EOS included when produced).
    prompt: the rendered prompt text; prompt_ids its ids (placeholders expanded).
    score: the decoder's score (summed log-probs, or the beam's normalised score).
  """

  text: str
  tokens: List[int]
  prompt: str
  prompt_ids: List[int]
  score: float


@dataclasses.dataclass(frozen=True)
class DecodingSettings:
  """How `answer` decodes, as Hugging Face's GenerationConfig says it: greedy by default,
  sampling when `temperature` > 0 (then `top_k` / `top_p` truncate), beam search when
  `num_beams` > 1. Each field is the flag of `python -m unimoe_jax.generate` of the same name,
  whose defaults are read from here (`serving/flags.py`).

  Made settings are checked (`__post_init__`): a setting that would be ignored, silently change
  meaning or fail inside JAX raises a ValueError naming its flag. The bound that needs the
  model (`top_k` at most the vocabulary) is `check_vocabulary`.

  Attributes:
    max_decode_steps: most new tokens; the prompt plus these must fit `max_length`.
    temperature: 0 greedy, > 0 sampling.
    top_k: sampling: keep the k most likely tokens (0: off).
    top_p: sampling: the nucleus mass, in (0, 1] (1: off).
    num_beams: > 1: beam search (with temperature 0).
    seed: the sampling seed.
    max_length: the decode buffer and its cache: prompt (media soft tokens included) plus new
      tokens.
  """

  max_decode_steps: int = 128
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  num_beams: int = 1
  seed: int = 0
  max_length: int = scoring.DEFAULT_MAX_LENGTH

  def __post_init__(self):
    steps, length = self.max_decode_steps, self.max_length
    if not isinstance(steps, int) or steps < 1:
      raise ValueError(f'--max_decode_steps must be an integer >= 1, got {steps!r}')
    if not isinstance(length, int) or length < 2:
      raise ValueError(f'--max_length must be an integer >= 2, got {length!r}')
    if steps >= length:
      raise ValueError(
          f'--max_decode_steps={steps} leaves no room for the prompt in '
          f'--max_length={length} (the decode buffer: prompt + new tokens); '
          'lower it or raise --max_length'
      )
    temperature, top_k, top_p, num_beams = self.temperature, self.top_k, self.top_p, self.num_beams
    if not math.isfinite(temperature) or temperature < 0:
      raise ValueError(f'--temperature must be >= 0 (0: greedy), got {temperature}')
    if not isinstance(top_k, int) or top_k < 0:
      raise ValueError(f'--top_k must be an integer >= 0 (0: off), got {top_k!r}')
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
      raise ValueError(f'--top_p must be in (0, 1] (1: off), got {top_p}')
    if not isinstance(num_beams, int) or num_beams < 1:
      raise ValueError(f'--num_beams must be an integer >= 1, got {num_beams!r}')
    if num_beams > 1 and temperature > 0:
      raise ValueError(
          f'--num_beams={num_beams} (beam search) and --temperature={temperature} '
          '(sampling) exclude each other; beam search does not sample'
      )
    if temperature == 0 and (top_k or top_p < 1):
      raise ValueError(
          f'--top_k={top_k} / --top_p={top_p} only act when sampling; set '
          '--temperature > 0 (0 is greedy)'
      )

  def check_vocabulary(self, vocab_size: int) -> None:
    """Refuses a `top_k` larger than the model's vocabulary, naming --top_k."""
    if self.top_k > vocab_size:
      raise ValueError(f'--top_k={self.top_k} exceeds the vocabulary ({vocab_size} tokens)')

  def method_kwargs(self) -> Dict[str, Any]:
    """The method and its own arguments for `decoding.generate`."""
    if self.num_beams > 1:
      return dict(method='beam', num_beams=self.num_beams)
    if self.temperature > 0:
      return dict(method='sample', temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
    return dict(method='greedy')


def _with_overrides(settings: DecodingSettings, overrides: Mapping[str, Any]) -> DecodingSettings:
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(DecodingSettings)})
  if unknown:
    raise TypeError(
        f'answer: {", ".join(unknown)} is not a decoding setting; the settings are the fields '
        f'of DecodingSettings: {", ".join(f.name for f in dataclasses.fields(DecodingSettings))}'
    )
  return dataclasses.replace(settings, **overrides)


def answer(
    checkpoint_dir: str,
    question: str,
    media: Optional[Mapping[str, Sequence[str]]] = None,
    *,
    settings: Optional[DecodingSettings] = None,
    vocab_path: Optional[str] = None,
    dtype: str = 'float32',
    image_mode: str = 'crop',
    **setting_overrides,
) -> Answer:
  """Restores `checkpoint_dir` (a converted checkpoint or a training run), builds the prompt
  and decodes (see the module docstring).

  It decodes with `settings` (default `DecodingSettings()`), the fields named in
  `setting_overrides` replaced, as Hugging Face's `generate(generation_config, **kwargs)`:
  `answer(path, q, max_decode_steps=8)` is
  `answer(path, q, settings=DecodingSettings(max_decode_steps=8))`.

  Raises:
    ValueError naming the flag of a bad decoding setting (`DecodingSettings`) or a prompt that
      does not fit `max_length` with `max_decode_steps`; TypeError naming an override that is
      not a field of `DecodingSettings`; FileNotFoundError naming --checkpoint or --vocab;
      MediaError naming a missing or undecodable media file. All before the model's params are
      read.
  """
  settings = _with_overrides(settings or DecodingSettings(), setting_overrides)
  media = {m: list(p) for m, p in (media or {}).items() if p}
  scoring.check_dtype(dtype)
  # The config alone first, so that bad flags and media fail before the (large) params are read.
  gin_text = checkpoints.checkpoint_gin_text(checkpoint_dir)
  vocab_path = checkpoints.find_vocab(checkpoint_dir, vocab_path, gin_text=gin_text)
  cfg = checkpoints.with_dtype(checkpoints.model_config_from_gin(gin_text), dtype)
  settings.check_vocabulary(cfg.decoder.vocab_size)
  steps, max_length = settings.max_decode_steps, settings.max_length
  tokenizer = prompting.PromptTokenizer(vocab_path, cfg)
  prompt = prompting.build_prompt(
      question, media, cfg, tokenizer, room=steps, image_mode=image_mode
  )
  if prompt.length + steps > max_length:
    raise ValueError(
        f'the prompt is {prompt.length} tokens (media soft tokens included); with '
        f'--max_decode_steps={steps} that is {prompt.length + steps}, more than '
        f'--max_length={max_length}; shorten the prompt, lower --max_decode_steps or raise '
        '--max_length'
    )
  cfg, params = checkpoints.restore_model(checkpoint_dir, dtype)
  model = UniMoE(cfg)

  @jax.jit
  def run(params, batch, lengths, rng):
    return decoding.generate(
        model,
        params,
        batch,
        lengths,
        max_decode_steps=steps,
        eos_id=tokenizer.eos_id,
        pad_id=0,
        rng=rng,
        **settings.method_kwargs(),
    )

  batch = {k: jnp.asarray(v) for k, v in prompt.batch.items()}
  seqs, scores = run(
      params, batch, jnp.asarray([prompt.length], jnp.int32), jax.random.PRNGKey(settings.seed)
  )
  generated = [int(t) for t in np.asarray(seqs[0, prompt.length :])]
  if tokenizer.eos_id in generated:
    generated = generated[: generated.index(tokenizer.eos_id) + 1]
  return Answer(
      text=tokenizer.decode(generated),
      tokens=generated,
      prompt=prompt.text,
      prompt_ids=[int(t) for t in prompt.batch['decoder_input_tokens'][0, : prompt.length]],
      score=float(scores[0]),
  )
