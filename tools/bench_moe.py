"""Benchmark of the MoE feed-forward layer: forward + backward time per dispatch path.

For each shape (tokens, embed, mlp, experts, top_k) it times one jitted training step of a
scalar loss sum(y * cotangent), with gradients w.r.t. the input and every parameter, for

  jax:moe dense|capacity|dropless  `unimoe_jax.moe.layer.MoEFeedForward`, one row per dispatch
                   mode (--paths dense,capacity,dropless; capacity uses --capacity-factor 2.0)
  jax:ffn(k*F)     dense `unimoe_jax.layers.mlp.SwiGLU` of hidden k*F: same active FLOPs (ffn)
  torch:mixtral    transformers' MixtralSparseMoeBlock, same process/device/dtype (torch_mixtral)
  torch:ffn(k*F)   a plain PyTorch SwiGLU of hidden k*F (torch_ffn)

and prints median/min ms, useful TFLOP/s, throughput vs the JAX dense FFN and vs the torch
Mixtral block, and each compiled JAX program's temp memory. Useful FLOPs count only the routed
experts: forward = 2 * tokens * k * 3 * embed * mlp; forward + backward = 3x forward.

  CPU (defaults, ~2-4 min on 2 cores):  python tools/bench_moe.py
  GPU: JAX uses the GPU when jax[cuda] is installed, torch uses cuda when available:
        python tools/bench_moe.py --shapes mixtral --dtype bfloat16 --iters 20 --warmup 3
  Subsets: --paths dense,dropless,ffn,torch_mixtral   --shapes 2048x512x1408x4x2,64x4096x14336x8x2
On a GPU, XLA_PYTHON_CLIENT_PREALLOCATE defaults to false here and torch runs first per shape.
Times are wall clock: on a shared CPU other load inflates them (torch's OpenMP most of all).
"""

import argparse
import os
import statistics
import sys
import time

# On a GPU, JAX would otherwise grab 75% of the memory up front and starve the torch columns.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax.config import MoEConfig
from unimoe_jax.layers.mlp import SwiGLU
from unimoe_jax.moe.dispatch import expert_capacity
from unimoe_jax.moe.layer import MoEFeedForward

try:  # torch and transformers are optional.
  import torch
except ImportError:
  torch = None
try:
  from transformers import MixtralConfig
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
except ImportError:
  MixtralSparseMoeBlock = None

PRESETS = {
    'default': [(2048, 512, 1408, 4, 2), (512, 256, 704, 8, 2)],
    'mixtral': [(16384, 4096, 14336, 8, 2), (64, 4096, 14336, 8, 2)],
}
ALL_PATHS = ('ffn', 'dense', 'capacity', 'dropless', 'torch_mixtral', 'torch_ffn')  # Row order.


def parse_shapes(spec):
  shapes = []
  for part in spec.split(','):
    part = part.strip()
    if part in PRESETS:
      shapes += PRESETS[part]
    elif part:
      dims = tuple(int(v) for v in part.lower().split('x'))
      if len(dims) != 5:
        raise ValueError(f'shape {part!r} is not TOKENSxEMBEDxMLPxEXPERTSxTOPK')
      shapes.append(dims)
  return shapes


def median_ms(step, iters, warmup):
  times = []
  for i in range(warmup + iters):
    t0 = time.perf_counter()
    step()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times), 1e3 * min(times)


def bench_jax(module, x, ct, iters, warmup):
  """Returns ((median ms, min ms), temp MiB or None, drop fraction) of a jitted fwd+bwd step."""
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(0), x))['params']

  def loss_fn(p, xx, cot):
    out = module.apply({'params': p}, xx)
    y, aux = out if isinstance(out, tuple) else (out, {})
    return jnp.sum(y.astype(jnp.float32) * cot), aux.get('drop_fraction', jnp.float32(0))

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)  # d/d(params, x).
  compiled = jax.jit(grad_fn).lower(params, x, ct).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, 'temp_size_in_bytes', None) if mem is not None else None
  (_, drop), _ = jax.block_until_ready(compiled(params, x, ct))
  ms = median_ms(lambda: jax.block_until_ready(compiled(params, x, ct)), iters, warmup)
  return ms, None if temp is None else temp / 2**20, float(drop)


def bench_torch(block, x_np, ct_np, dtype, device, iters, warmup):
  """Returns (median ms, min ms) of `loss = sum(block(x) * ct); loss.backward()` on `device`."""
  block = block.to(device=device, dtype=dtype).train()
  x = torch.from_numpy(x_np).to(device=device, dtype=dtype).requires_grad_(True)
  ct = torch.from_numpy(ct_np).to(device=device, dtype=dtype)
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

  def step():
    for p in (x, *block.parameters()):
      p.grad = None
    out = block(x)
    y = out[0] if isinstance(out, tuple) else out
    (y.float() * ct.float()).sum().backward()
    sync()

  return median_ms(step, iters, warmup)


class TorchSwiGLU(torch.nn.Module if torch is not None else object):
  """wo(silu(wi_0 x) * wi_1 x), no biases."""

  def __init__(self, d, f):
    super().__init__()
    self.wi_0, self.wi_1 = (torch.nn.Linear(d, f, bias=False) for _ in range(2))
    self.wo = torch.nn.Linear(f, d, bias=False)

  def forward(self, x):
    return self.wo(torch.nn.functional.silu(self.wi_0(x)) * self.wi_1(x))


def normal_init(block):
  with torch.no_grad():
    for p in block.parameters():  # transformers 5 creates Mixtral's with torch.empty.
      p.normal_(0.0, 0.02)
  return block


def torch_mixtral(d, f, e, k, experts_impl):
  cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e,
                      num_experts_per_tok=k, router_jitter_noise=0.0)
  cfg._experts_implementation = experts_impl  # pylint: disable=protected-access
  return normal_init(MixtralSparseMoeBlock(cfg))


def run_shape(shape, args, dtype):
  """Benchmarks the selected paths of one shape; returns {name: ((ms, min ms), MiB, note)}.

  torch runs first and empties its cache, so on a GPU it is not starved by JAX's allocator.
  """
  t, d, f, e, k = shape
  if t % args.batch:
    raise ValueError(f'--batch {args.batch} does not divide {t} tokens')
  rng = np.random.default_rng(0)
  x_np = rng.standard_normal((args.batch, t // args.batch, d), dtype=np.float32)
  ct_np = rng.standard_normal(x_np.shape, dtype=np.float32)
  results = {}

  def attempt(name, fn):
    try:
      results[name] = fn()
    except Exception as err:  # pylint: disable=broad-except  (e.g. out of memory)
      results[name] = (None, None, f'error: {type(err).__name__}: {str(err)[:80]}')
    if torch is not None and torch.cuda.is_available():
      torch.cuda.empty_cache()
    print(f'  [{shape} {name} done]', file=sys.stderr, flush=True)

  if torch is not None:
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    tdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[args.dtype]
    timer = lambda block: bench_torch(block, x_np, ct_np, tdtype, device, args.iters,
                                      args.warmup)
  if 'torch_mixtral' in args.paths:
    if torch is None or MixtralSparseMoeBlock is None:
      results['torch_mixtral'] = (None, None, 'n/a (torch/transformers not installed)')
    else:
      attempt('torch_mixtral', lambda: (timer(torch_mixtral(d, f, e, k, args.torch_experts)),
                                        None, f'experts_implementation={args.torch_experts}'))
  if 'torch_ffn' in args.paths:
    if torch is None:
      results['torch_ffn'] = (None, None, 'n/a (torch not installed)')
    else:
      attempt('torch_ffn', lambda: (timer(normal_init(TorchSwiGLU(d, k * f))), None, ''))

  x, ct = jnp.asarray(x_np, dtype), jnp.asarray(ct_np, jnp.float32)
  if 'ffn' in args.paths:
    module = SwiGLU(mlp_dim=k * f, dtype=dtype, param_dtype=jnp.float32)
    attempt('ffn', lambda: bench_jax(module, x, ct, args.iters, args.warmup)[:2] + ('',))
  for mode in ('dense', 'capacity', 'dropless'):
    if mode not in args.paths:
      continue
    cfg = MoEConfig(num_experts=e, num_experts_per_tok=k, dispatch=mode,
                    capacity_factor=args.capacity_factor)
    module = MoEFeedForward(config=cfg, mlp_dim=f, dtype=dtype, param_dtype=jnp.float32)

    def run(module=module, mode=mode):
      ms, temp, drop = bench_jax(module, x, ct, args.iters, args.warmup)
      note = f'computes all {e} experts ({e / k:g}x the useful work)' if mode == 'dense' else ''
      if mode == 'capacity':
        cap = expert_capacity(t // args.batch, k, e, cfg.capacity_factor, cfg.min_capacity)
        note = f'cf={cfg.capacity_factor:g}, C={cap} rows/expert/seq, dropped {drop:.1%}'
      return ms, temp, note

    attempt(mode, run)
  return results


LABELS = {'ffn': 'jax:ffn(k*F)', 'dense': 'jax:moe dense', 'capacity': 'jax:moe capacity',
          'dropless': 'jax:moe dropless', 'torch_mixtral': 'torch:mixtral',
          'torch_ffn': 'torch:ffn(k*F)'}
COLS = (('shape TxDxFxExk', 21), ('implementation', 16), ('ms', 9), ('min ms', 9),
        ('TFLOP/s', 7), ('vs jax ffn', 10), ('vs torch', 8), ('temp MiB', 8), ('note', 0))


def fmt_row(cells):
  return ' '.join(str(c).rjust(w) if i >= 2 and w else str(c).ljust(w)
                  for i, ((_, w), c) in enumerate(zip(COLS, cells))).rstrip()


def print_rows(shape, results):
  t, d, f, e, k = shape
  flops = 3 * 2 * t * k * 3 * d * f
  median = lambda name: (results.get(name, (None,))[0] or (None,))[0]
  base, ref = median('ffn'), median('torch_mixtral')
  for name in ALL_PATHS:
    if name not in results:
      continue
    times, temp, note = results[name]
    ms = median(name)
    cells = ['x'.join(map(str, shape)), LABELS[name]] + ['n/a'] * 5
    if ms is not None:
      cells[2:5] = [f'{ms:.2f}', f'{times[1]:.2f}', f'{flops / (ms * 1e-3) / 1e12:.3f}']
      cells[5] = 'n/a' if base is None else f'{base / ms:.2f}x'
      cells[6] = 'n/a' if ref is None else f'{ref / ms:.2f}x'
    cells += ['-' if temp is None else f'{temp:.1f}', note]
    print(fmt_row(cells), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', default='default',
                      help="'default', 'mixtral', or comma-separated TxDxFxExK (e.g. 64x32x48x8x2)")
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--paths', default=','.join(ALL_PATHS),
                      help=f'comma-separated subset of {",".join(ALL_PATHS)}')
  parser.add_argument('--capacity-factor', type=float, default=2.0)
  parser.add_argument('--batch', type=int, default=1, help='rows; length = tokens / batch')
  parser.add_argument('--torch-experts', default='eager',
                      help="transformers experts_implementation: eager, batched_mm, grouped_mm")
  args = parser.parse_args()
  args.paths = [p.strip() for p in args.paths.split(',') if p.strip()]
  unknown = set(args.paths) - set(ALL_PATHS)
  if unknown:
    parser.error(f'unknown --paths {sorted(unknown)}; choose from {ALL_PATHS}')
  dtype = jnp.dtype(args.dtype)
  shapes = parse_shapes(args.shapes)

  dev = jax.devices()[0]
  if torch is None:
    tdev = 'n/a (torch not installed)'
  elif torch.cuda.is_available():
    tdev = f'cuda ({torch.cuda.get_device_name(0)}), torch {torch.__version__}'
  else:
    tdev = f'cpu ({torch.get_num_threads()} threads), torch {torch.__version__}'
  print(f'MoE FFN fwd+bwd benchmark | jax {jax.__version__} on {dev.platform} '
        f'({dev.device_kind}) | torch on {tdev} | dtype {args.dtype} (jax params float32) | '
        f'batch {args.batch} | median of {args.iters} iters after {args.warmup} warmup | '
        f'load avg {os.getloadavg()[0]:.2f}')
  print('Useful FLOPs = 3 (fwd+bwd) x 2 x tokens x k x 3 x embed x mlp (routed experts only; '
        'router/dispatch not counted). vs jax ffn = ffn_ms / ms; vs torch = torch_mixtral_ms / '
        'ms (>1: faster). temp MiB = memory_analysis().temp_size_in_bytes of the compiled '
        'JAX fwd+bwd.')
  header = fmt_row([c for c, _ in COLS])
  print(header)
  print('-' * len(header))
  for shape in shapes:
    print_rows(shape, run_shape(shape, args, dtype))


if __name__ == '__main__':
  main()
