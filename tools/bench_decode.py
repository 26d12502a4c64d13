"""Benchmark of cached greedy decoding: tokens per second vs transformers' generate.

For each model (a tiny random LLaMA and, with --moe, the Mixtral variant with the same
widths) and each batch size it decodes --new-tokens tokens greedily after a random prompt of
--prompt-len tokens, with

  jax      `decoding.prefill_cache` + `decoding.greedy_decode` in one jitted function
           (prefill and a `lax.while_loop` over cached steps)
  torch    transformers' `generate(do_sample=False, min_new_tokens=max_new_tokens=N)` (its
           own KV cache), same weights, same device kind where torch has it

and prints decode tokens/s (batch * N / median wall time, prefill included on both sides),
the JAX/torch ratio, JAX compile time (excluded from the timings, reported separately) and
whether the greedy tokens agree. --json PATH also writes the rows.

  python tools/bench_decode.py                       # LLaMA embed 256, 4 layers; CPU ~1 min
  python tools/bench_decode.py --moe --batch-sizes 1,8 --new-tokens 64 --json rows.json
"""

import argparse
import statistics
import time

import bench_common


def _hf_model(kind, args):
  import torch
  import transformers

  common = dict(
      vocab_size=args.vocab,
      hidden_size=args.embed,
      num_hidden_layers=args.layers,
      num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads,
      max_position_embeddings=args.prompt_len + args.new_tokens + 8,
      rms_norm_eps=1e-5,
      tie_word_embeddings=False,
      attn_implementation='eager',
  )
  torch.manual_seed(0)
  if kind == 'llama':
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(intermediate_size=args.mlp, **common)
    )
  else:
    model = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            intermediate_size=args.mlp // 2,
            num_local_experts=args.experts,
            num_experts_per_tok=2,
            router_jitter_noise=0.0,
            **common,
        )
    )
  with torch.no_grad():
    for p in model.parameters():  # Some inits leave torch.empty tensors: draw them all.
      p.normal_(0.0, 0.05)
  return model.eval()


def _jax_decoder(hf_model, kind, args):
  import jax
  import jax.numpy as jnp
  from unimoe_jax.config import MoEConfig
  from unimoe_jax.convert import hf as convert_hf
  from unimoe_jax.decoder import Decoder

  overrides = {}
  if kind == 'mixtral':
    overrides['moe'] = MoEConfig(
        num_experts=args.experts, num_experts_per_tok=2, dispatch='dropless'
    )
  cfg = convert_hf.config_from_hf(hf_model.config.to_dict(), dtype='float32', **overrides)
  sd = {k: v.detach().float().cpu().numpy() for k, v in hf_model.state_dict().items()}
  params = jax.tree_util.tree_map(jnp.asarray, convert_hf.decoder_params_from_hf(sd, cfg))
  return Decoder(cfg), params


def _time(fn, iters, warmup):
  return statistics.median(bench_common.call_seconds(fn, iters, warmup))


def bench(kind, batch, args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from unimoe_jax import decoding

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  hf_model = _hf_model(kind, args)
  model, params = _jax_decoder(hf_model, kind, args)
  hf_model = hf_model.to(device)
  p, n = args.prompt_len, args.new_tokens
  prompt = np.random.RandomState(batch).randint(3, args.vocab, size=(batch, p)).astype(np.int32)
  buf = jnp.asarray(np.concatenate([prompt, np.zeros((batch, n), np.int32)], axis=1))
  lengths = jnp.full((batch,), p, jnp.int32)
  no_eos = args.vocab + 1

  def run(params, buf, lengths):
    cache, index = decoding.prefill_cache(model, params, buf[:, :p], lengths, p + n)
    return decoding.greedy_decode(
        buf,
        cache,
        decoding.decoder_tokens_to_logits(model, params),
        no_eos,
        initial_index=index,
        max_decode_steps=n,
    )[0]

  start = time.perf_counter()
  compiled = jax.jit(run).lower(params, buf, lengths).compile()
  compile_s = time.perf_counter() - start
  ours = np.asarray(compiled(params, buf, lengths))
  jax_s = _time(lambda: compiled(params, buf, lengths).block_until_ready(), args.iters, args.warmup)

  ids = torch.tensor(prompt, dtype=torch.long, device=device)
  attention = torch.ones_like(ids)

  def generate():
    with torch.no_grad():
      out = hf_model.generate(
          ids,
          attention_mask=attention,
          do_sample=False,
          max_new_tokens=n,
          min_new_tokens=n,
          eos_token_id=None,
          pad_token_id=0,
      )
    if device == 'cuda':
      torch.cuda.synchronize()
    return out

  theirs = generate().cpu().numpy()
  torch_s = _time(generate, args.iters, args.warmup)
  jax_tps, torch_tps = batch * n / jax_s, batch * n / torch_s
  return {
      'model': kind,
      'batch': batch,
      'prompt_len': p,
      'new_tokens': n,
      'jax_tokens_per_s': jax_tps,
      'torch_tokens_per_s': torch_tps,
      'ratio_jax_over_torch': jax_tps / torch_tps,
      'jax_compile_s': compile_s,
      'jax_ms': 1e3 * jax_s,
      'torch_ms': 1e3 * torch_s,
      'tokens_match': bool(np.array_equal(ours, theirs)),
      'jax_device': jax.devices()[0].device_kind,
      'torch_device': device,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch-sizes', default='1,8')
  parser.add_argument('--prompt-len', type=int, default=32)
  parser.add_argument('--new-tokens', type=int, default=64)
  parser.add_argument('--vocab', type=int, default=1024)
  parser.add_argument('--embed', type=int, default=256)
  parser.add_argument('--mlp', type=int, default=704)
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--kv-heads', type=int, default=2)
  parser.add_argument('--experts', type=int, default=4)
  parser.add_argument('--moe', action='store_true', help='also the Mixtral (MoE) variant')
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--json', default=None, help='write the rows to this path')
  args = parser.parse_args(argv)

  rows = []
  header = (
      f'{"model":8} {"batch":>5} {"jax tok/s":>10} {"torch tok/s":>11} {"ratio":>6} '
      f'{"compile s":>9} {"match":>5}'
  )
  print(
      f'greedy, prompt {args.prompt_len}, {args.new_tokens} new tokens, embed {args.embed}, '
      f'{args.layers} layers, vocab {args.vocab}'
  )
  print(header)
  for kind in ('llama', 'mixtral') if args.moe else ('llama',):
    for batch in (int(b) for b in args.batch_sizes.split(',')):
      r = bench(kind, batch, args)
      rows.append(r)
      print(
          f'{kind:8} {batch:5d} {r["jax_tokens_per_s"]:10.1f} {r["torch_tokens_per_s"]:11.1f} '
          f'{r["ratio_jax_over_torch"]:6.2f} {r["jax_compile_s"]:9.2f} '
          f'{str(r["tokens_match"]):>5}',
          flush=True,
      )
  if rows:
    print(f'devices: jax {rows[0]["jax_device"]}, torch {rows[0]["torch_device"]}')
  bench_common.write_json(args.json, rows)
  return rows


if __name__ == '__main__':
  main()
