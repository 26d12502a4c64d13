r"""Answers a question about optional media with a converted checkpoint.

    python -m unimoe_jax.generate --checkpoint /out/unimoe --image cat.jpg \
        --prompt "What is in the image?" --max_decode_steps 64

renders the Vicuna v1 prompt ("SYSTEM USER: <image>\nWhat is in the image? ASSISTANT:", see
unimoe_jax/prompting.py), decodes greedily (default), by sampling (`--temperature` > 0, with
`--top_k` / `--top_p`) or by beam search (`--num_beams` > 1), and prints the answer text up to
EOS. `--speech` feeds the Whisper encoder, `--audio` BEATs; media flags repeat; a file longer
than 30 s is cut into chunks as official inference cuts it (speech: all, audio: up to 20, all at
its one placeholder; unimoe_jax/prompting.py). Text-only
checkpoints (decoder params only, config.gin without MODEL_CONFIG) work the same way without
media. The vocabulary is `--vocab` or the checkpoint's `tokenizer.model`.
"""

import argparse
import dataclasses
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import checkpoint
from unimoe_jax import decoding
from unimoe_jax import prompting
from unimoe_jax import score
from unimoe_jax.model import UniMoE


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


def answer(checkpoint_dir: str, question: str, media: Optional[Mapping[str, Sequence[str]]] = None,
           *, max_decode_steps: int = 128, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, num_beams: int = 1, seed: int = 0,
           vocab_path: Optional[str] = None, dtype: str = 'float32',
           image_mode: str = 'crop') -> Answer:
  """Restores `checkpoint_dir`, builds the prompt and decodes (see the module docstring).

  Raises:
    MediaError naming a missing or undecodable media file (before the model is restored).
  """
  media = {m: list(p) for m, p in (media or {}).items() if p}
  if max_decode_steps < 1:
    raise ValueError(f'max_decode_steps must be >= 1, got {max_decode_steps}')
  vocab_path = vocab_path or checkpoint.tokenizer_path(checkpoint_dir)
  if vocab_path is None:
    raise FileNotFoundError(f'{checkpoint_dir} has no {checkpoint.TOKENIZER_FILE}; pass --vocab')
  # The config alone first, so that bad media fail before the (large) params are read.
  with open(os.path.join(checkpoint_dir, checkpoint.GIN_FILE)) as f:
    cfg = score.with_dtype(score.model_config_from_gin(f.read()), dtype)
  tokenizer = prompting.PromptTokenizer(vocab_path, cfg)
  prompt = prompting.build_prompt(question, media, cfg, tokenizer, room=max_decode_steps,
                                  image_mode=image_mode)
  cfg, params = score.restore_model(checkpoint_dir, dtype)
  if num_beams > 1:
    kwargs: Dict[str, Any] = dict(method='beam', num_beams=num_beams)
  elif temperature > 0:
    kwargs = dict(method='sample', temperature=temperature, top_k=top_k, top_p=top_p)
  else:
    kwargs = dict(method='greedy')
  model = UniMoE(cfg)

  @jax.jit
  def run(params, batch, lengths, rng):
    return decoding.generate(model, params, batch, lengths, max_decode_steps=max_decode_steps,
                             eos_id=tokenizer.eos_id, pad_id=0, rng=rng, **kwargs)

  batch = {k: jnp.asarray(v) for k, v in prompt.batch.items()}
  seqs, scores = run(params, batch, jnp.asarray([prompt.length], jnp.int32),
                     jax.random.PRNGKey(seed))
  generated = [int(t) for t in np.asarray(seqs[0, prompt.length:])]
  if tokenizer.eos_id in generated:
    generated = generated[:generated.index(tokenizer.eos_id) + 1]
  return Answer(text=tokenizer.decode(generated), tokens=generated, prompt=prompt.text,
                prompt_ids=[int(t) for t in prompt.batch['decoder_input_tokens'][0,
                                                                                :prompt.length]],
                score=float(scores[0]))


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='directory written by tools/convert_checkpoint.py')
  parser.add_argument('--prompt', required=True, help='the question (placeholders optional)')
  score.add_media_flags(parser)
  parser.add_argument('--max_decode_steps', type=int, default=128)
  parser.add_argument('--temperature', type=float, default=0.0, help='0: greedy')
  parser.add_argument('--top_k', type=int, default=0, help='sampling: keep the k most likely')
  parser.add_argument('--top_p', type=float, default=1.0, help='sampling: nucleus mass')
  parser.add_argument('--num_beams', type=int, default=1, help='> 1: beam search')
  parser.add_argument('--seed', type=int, default=0, help='sampling seed')
  parser.add_argument('--vocab', default=None, help="SentencePiece model; default the "
                      "checkpoint's tokenizer.model")
  parser.add_argument('--dtype', default='float32', help='compute dtype')
  parser.add_argument('--image_mode', default='crop', choices=('crop', 'pad'),
                      help="image preprocessing: CLIP's centre crop or LLaVA's expand-to-square")
  args = parser.parse_args(argv)
  media = {m: getattr(args, m) for m in prompting.MODALITIES if getattr(args, m)}
  result = answer(args.checkpoint, args.prompt, media, max_decode_steps=args.max_decode_steps,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  num_beams=args.num_beams, seed=args.seed, vocab_path=args.vocab,
                  dtype=args.dtype, image_mode=args.image_mode)
  print(result.text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
