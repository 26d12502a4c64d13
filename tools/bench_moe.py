"""Benchmark of the MoE feed-forward layer: forward + backward time per dispatch path.

(--forward-only times the forward pass alone, as inference and decoding run it.)

For each shape (tokens, embed, mlp, experts, top_k) it times one jitted training step of a
scalar loss sum(y * cotangent), with gradients w.r.t. the input and every parameter. Rows
(and their --paths names; `dropless` selects all five dropless/* rows):

  jax:ffn(k*F)              dense `layers.mlp.SwiGLU` of hidden k*F, same active FLOPs (ffn)
  jax:moe dense|capacity    `moe.layer.MoEFeedForward` per dispatch mode (dense, capacity;
                            capacity uses --capacity-factor 2.0)
  jax:moe dropless/B        dispatch='dropless' with grouped-matmul backend B: ragged_dot,
                            tiled (--gmm-tile rows; the fused SwiGLU loop of
                            moe/grouped_ffn.py), megablox (TPU only), mgpu (Hopper only)
  jax:moe dropless/tiled unfused  the tiled backend as separate grouped matmuls, three per
                            step (nine with --lora) (MoEConfig.fuse_ffn=False)
  jax:moe dropless EP DxE   the dropless layer (gmm_backend='auto') with experts sharded on a
                            data=D x expert=E mesh, run under shard_map (ep; --ep-mesh DxE,
                            default 2x4, 'none' drops it); x is reshaped to [D*E, T/(D*E), embed]
  torch:mixtral             transformers' MixtralSparseMoeBlock, same device/dtype (torch_mixtral)
  torch:ffn(k*F)            a plain PyTorch SwiGLU of hidden k*F (torch_ffn)

It prints median/min ms, useful TFLOP/s, throughput vs the JAX dense FFN and vs the torch
Mixtral block, and each compiled JAX program's temp memory (per device for the EP row);
--json PATH also writes the rows as a JSON list. Useful FLOPs count only the routed experts:
forward = 2 * tokens * k * 3 * embed * mlp; forward + backward = 3x forward.

  python tools/bench_moe.py   # CPU defaults: several minutes on 2 cores.
  python tools/bench_moe.py --paths ffn,dropless/tiled,ep --shapes 2048x512x1408x4x2,64x32x48x8x2
  python tools/bench_moe.py --shapes mixtral --dtype bfloat16 --iters 20 --warmup 3  # GPU
  python tools/bench_moe.py --lora 8 --paths ffn,dropless/tiled,dropless/tiled_unfused  # stage 3
  python tools/bench_moe.py --forward-only --batch 8 --shapes 8x512x1408x4x2  # a decode step
JAX uses the GPU when jax[cuda] is installed and torch uses cuda when available; there
XLA_PYTHON_CLIENT_PREALLOCATE defaults to false and torch runs first per shape.

The EP row needs D*E devices. On a CPU host that has fewer, it runs in a child process
(`--paths ep`) that adds --xla_force_host_platform_device_count=D*E to XLA_FLAGS before
importing jax; the other rows keep one host device, because fake devices slow them. These
fake devices share the same cores, so the EP row measures the overhead of the sharded program
(collectives, per-shard sorting), not a speed-up.
Times are wall clock: on a shared CPU other load inflates them (torch's OpenMP most of all).
"""

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile

import bench_common

PRESETS = {
    'default': [(2048, 512, 1408, 4, 2), (512, 256, 704, 8, 2)],
    'mixtral': [(16384, 4096, 14336, 8, 2), (64, 4096, 14336, 8, 2)],
}
# moe/grouped_matmul.BACKENDS, written here because the flags need it before jax may be imported
# (the EP child sets XLA_FLAGS first); checked against it once jax is in (below).
BACKENDS = ('ragged_dot', 'tiled', 'megablox', 'mgpu')
DROPLESS = tuple(f'dropless/{b}' for b in BACKENDS) + ('dropless/tiled_unfused',)
ALL_PATHS = ('ffn', 'dense', 'capacity') + DROPLESS + ('ep', 'torch_mixtral', 'torch_ffn')
HOPPER = ('H100', 'H200', 'H800')
LABELS = {
    'ffn': 'jax:ffn(k*F)',
    'dense': 'jax:moe dense',
    'capacity': 'jax:moe capacity',
    **{p: f'jax:moe {p}' for p in DROPLESS},
    'dropless/tiled_unfused': 'jax:moe dropless/tiled unfused',
    'ep': 'jax:moe dropless EP {}x{}',
    'torch_mixtral': 'torch:mixtral',
    'torch_ffn': 'torch:ffn(k*F)',
}


def mesh_spec(spec):
  """'DATAxEXPERT' -> (data, expert); 'none' -> None."""
  if spec.lower() == 'none':
    return None
  dims = tuple(int(v) for v in spec.lower().split('x'))
  if len(dims) != 2 or min(dims) < 1:
    raise ValueError(spec)
  return dims


def parse_args(argv=None):
  """Parses the command line; needs no jax, so it runs before jax is imported."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
      '--shapes',
      default='default',
      help="'default', 'mixtral', or comma-separated TxDxFxExK (e.g. 64x32x48x8x2)",
  )
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument(
      '--paths',
      default='ffn,dense,capacity,dropless,ep,torch_mixtral,torch_ffn',
      help=f'comma-separated subset of dropless,{",".join(ALL_PATHS)}',
  )
  parser.add_argument('--capacity-factor', type=float, default=2.0)
  parser.add_argument(
      '--gmm-tile',
      type=int,
      default=None,
      help="row tile of the 'tiled' backend (default: MoEConfig.gmm_tile)",
  )
  parser.add_argument(
      '--ep-mesh',
      type=mesh_spec,
      default='2x4',
      help="DATAxEXPERT mesh of the expert-parallel row, or 'none'",
  )
  parser.add_argument('--batch', type=int, default=1, help='rows; length = tokens / batch')
  parser.add_argument(
      '--lora',
      type=int,
      default=0,
      metavar='RANK',
      help='stage-3 step: LoRA adapters of this rank (alpha 16) on every JAX '
      'row, base kernels frozen; torch rows are then n/a',
  )
  parser.add_argument(
      '--lora-dropout',
      type=float,
      default=0.05,
      help='LoRA dropout rate with --lora (the official 0.05)',
  )
  parser.add_argument(
      '--forward-only',
      action='store_true',
      help='time the forward pass alone (torch under no_grad)',
  )
  parser.add_argument(
      '--torch-experts',
      default='eager',
      help='transformers experts_implementation: eager, batched_mm, grouped_mm',
  )
  parser.add_argument('--json', metavar='PATH', help='also write the rows there as JSON')
  args = parser.parse_args(argv)
  if args.forward_only and args.lora:
    parser.error('--lora times a training step; it does not go with --forward-only')
  names = [p.strip() for p in args.paths.split(',') if p.strip()]
  paths = {q for p in names for q in (DROPLESS if p == 'dropless' else (p,))}
  if paths - set(ALL_PATHS):
    parser.error(
        f'unknown --paths {sorted(paths - set(ALL_PATHS))}; choose from dropless,'
        f'{",".join(ALL_PATHS)}'
    )
  if args.ep_mesh is None:  # --ep-mesh none
    paths.discard('ep')
  args.paths = [p for p in ALL_PATHS if p in paths]
  return args


def force_host_devices(args):
  """Gives XLA's host platform data*expert devices when the EP row is the only row.

  Call before importing jax. Fake host devices slow the single-device rows (measured: the
  dropless layer ~15% slower with 8 of them), so a full run measures the EP row in a child
  process (`run_ep_in_child`) and keeps one device here.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if args.paths == ['ep'] and 'xla_force_host_platform_device_count' not in flags:
    n = args.ep_mesh[0] * args.ep_mesh[1]
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()


if __name__ == '__main__':  # jax reads XLA_FLAGS once, when it is imported below.
  ARGS = parse_args()
  force_host_devices(ARGS)

# On a GPU, JAX would otherwise grab 75% of the memory up front and starve the torch columns.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

# pylint: disable=wrong-import-position
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import partitioning
from unimoe_jax.config import LoRAConfig, MoEConfig
from unimoe_jax.layers.mlp import SwiGLU
from unimoe_jax.moe import grouped_matmul as gmm_lib
from unimoe_jax.moe.dispatch import expert_capacity
from unimoe_jax.moe.layer import MoEFeedForward

import bench_moe_torch  # Imports torch: after jax, the order the tool has always had.

# pylint: enable=wrong-import-position

if BACKENDS != gmm_lib.BACKENDS:
  raise RuntimeError(
      f'bench_moe.BACKENDS {BACKENDS} != moe/grouped_matmul.BACKENDS {gmm_lib.BACKENDS}'
  )


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


def bench_jax(module, x, ct, iters, warmup, mesh=None, lora=False, forward_only=False):
  """Returns ((median ms, min ms), temp MiB or None, drop fraction) of a jitted fwd+bwd step
  (of the forward alone with `forward_only`).

  With `mesh`: sharded params, x and ct split on the batch, traced and run in the mesh context
  (where the dropless MoE layer takes its expert-parallel shard_map path).
  With `lora`: a stage-3 step: training mode (LoRA dropout on), gradients only for the
  adapters, the router and x; the base kernels are frozen (passed, not differentiated).
  """
  if mesh is None:
    params = nn.meta.unbox(module.init(jax.random.PRNGKey(0), x))['params']
    context = contextlib.nullcontext()
  else:
    variables, _ = partitioning.init_sharded(
        lambda key: module.init(key, x), mesh, jax.random.PRNGKey(0)
    )
    params = variables['params']
    batch = partitioning.logical_sharding(mesh, ('activation_batch',))
    x, ct = jax.device_put(x, batch), jax.device_put(ct, batch)
    context = partitioning.mesh_context(mesh)
  flat = traverse_util.flatten_dict(params, sep='/')
  trained = lambda path: not lora or 'lora_' in path or 'router' in path
  train = {k: v for k, v in flat.items() if trained(k)}
  frozen = {k: v for k, v in flat.items() if not trained(k)}
  rngs = {'dropout': jax.random.PRNGKey(1)} if lora else None

  def loss_fn(tp, fp, xx, cot):
    p = traverse_util.unflatten_dict({**tp, **fp}, sep='/')
    out = module.apply({'params': p}, xx, deterministic=not lora, rngs=rngs)
    y, aux = out if isinstance(out, tuple) else (out, {})
    return jnp.sum(y.astype(jnp.float32) * cot), aux.get('drop_fraction', jnp.float32(0))

  if forward_only:
    step_fn = lambda tp, fp, xx, cot: (loss_fn(tp, fp, xx, cot), None)
  else:  # d/d(trained, x).
    step_fn = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)
  with context:
    compiled = jax.jit(step_fn).lower(train, frozen, x, ct).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, 'temp_size_in_bytes', None) if mem is not None else None
    (_, drop), _ = jax.block_until_ready(compiled(train, frozen, x, ct))
    ms = bench_common.median_min_ms(
        lambda: jax.block_until_ready(compiled(train, frozen, x, ct)), iters, warmup
    )
  return ms, None if temp is None else temp / 2**20, float(drop)


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
  jobs = {}  # name -> callable returning ((ms, min ms), temp MiB, note), or an 'n/a' string.

  lora = LoRAConfig(rank=args.lora, dropout=args.lora_dropout) if args.lora else None
  jobs.update(bench_moe_torch.jobs(shape, x_np, ct_np, args))

  x, ct = jnp.asarray(x_np, dtype), jnp.asarray(ct_np, jnp.float32)
  moe = lambda mode, backend='auto', fuse=True: MoEFeedForward(
      config=MoEConfig(
          num_experts=e,
          num_experts_per_tok=k,
          dispatch=mode,
          capacity_factor=args.capacity_factor,
          gmm_backend=backend,
          gmm_tile=args.gmm_tile,
          fuse_ffn=fuse,
      ),
      mlp_dim=f,
      lora=lora,
      dtype=dtype,
      param_dtype=jnp.float32,
  )
  bench = functools.partial(
      bench_jax,
      iters=args.iters,
      warmup=args.warmup,
      lora=bool(lora),
      forward_only=args.forward_only,
  )
  timed = lambda module, note: lambda: bench(module, x, ct)[:2] + (note,)
  jobs['ffn'] = timed(SwiGLU(mlp_dim=k * f, lora=lora, dtype=dtype, param_dtype=jnp.float32), '')
  jobs['dense'] = timed(moe('dense'), f'computes all {e} experts ({e / k:g}x the useful work)')

  def run_capacity(module=moe('capacity')):
    ms, temp, drop = bench(module, x, ct)
    cf = module.config.capacity_factor
    cap = expert_capacity(t // args.batch, k, e, cf, module.config.min_capacity)
    return ms, temp, f'cf={cf:g}, C={cap} rows/expert/seq, dropped {drop:.1%}'

  jobs['capacity'] = run_capacity
  dev = jax.devices()[0]
  hopper = dev.platform == 'gpu' and any(h in dev.device_kind for h in HOPPER)
  why = {
      'megablox': None if dev.platform == 'tpu' else 'n/a (TPU only)',  # No interpret mode.
      'mgpu': None if hopper else 'n/a (Hopper GPU only)',
  }
  for backend, name in zip(BACKENDS, DROPLESS):
    jobs[name] = why.get(backend) or timed(
        moe('dropless', backend), f'tile={args.gmm_tile}, fused' if backend == 'tiled' else ''
    )
  jobs['dropless/tiled_unfused'] = timed(
      moe('dropless', 'tiled', fuse=False), f'tile={args.gmm_tile}, separate grouped matmuls'
  )

  data, expert = args.ep_mesh or (1, 1)
  n = data * expert
  note = (
      f'backend auto={gmm_lib.default_backend()}, x [{n},{t // n},{d}], {e // expert} '
      'experts/shard, temp per device'
  )
  note += '; CPU: fake devices share the cores' if dev.platform == 'cpu' else ''

  def run_ep():
    mesh = partitioning.make_mesh(
        partitioning.MeshConfig(data=data, expert=expert), jax.devices()[:n]
    )
    xe, cte = x.reshape(n, t // n, d), ct.reshape(n, t // n, d)
    return bench(moe('dropless'), xe, cte, mesh=mesh)[:2] + (note,)

  jobs['ep'] = (
      functools.partial(run_ep_in_child, shape, args, note)
      if n > len(jax.devices()) and dev.platform == 'cpu' and args.paths != ['ep']
      else f'n/a (needs {n} devices, {len(jax.devices())} available)'
      if n > len(jax.devices())
      else f'n/a ({e} experts or {t} tokens not divisible by the mesh)'
      if e % expert or t % n
      else run_ep
  )

  results = {}
  for name, job in jobs.items():
    if name not in args.paths:
      continue
    try:
      results[name] = (None, None, job) if isinstance(job, str) else job()
    except Exception as err:  # pylint: disable=broad-except  (e.g. out of memory)
      results[name] = (None, None, f'error: {type(err).__name__}: {str(err)[:80]}')
    bench_moe_torch.empty_cache()
    print(f'  [{shape} {name} done]', file=sys.stderr, flush=True)
  return results


def run_ep_in_child(shape, args, note):
  """Runs the EP row in `python bench_moe.py --paths ep`, which fakes the host devices."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'ep.json')
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        '--paths',
        'ep',
        '--shapes',
        'x'.join(map(str, shape)),
        '--ep-mesh',
        'x'.join(map(str, args.ep_mesh)),
        '--dtype',
        args.dtype,
        '--iters',
        str(args.iters),
        '--warmup',
        str(args.warmup),
        '--batch',
        str(args.batch),
        '--gmm-tile',
        str(args.gmm_tile),
        '--lora',
        str(args.lora),
        '--lora-dropout',
        str(args.lora_dropout),
        '--json',
        out,
    ]
    cmd += ['--forward-only'] if args.forward_only else []
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as fp:
      row = json.load(fp)[0]
  if row['median_ms'] is None:
    raise RuntimeError(row['note'])
  return (row['median_ms'], row['min_ms']), row['temp_mib'], note + ' (child process)'


COLS = (
    ('shape TxDxFxExk', 21),
    ('implementation', 30),
    ('ms', 9),
    ('min ms', 9),
    ('TFLOP/s', 7),
    ('vs jax ffn', 10),
    ('vs torch', 8),
    ('temp MiB', 8),
    ('note', 0),
)


def passes(args):
  """Useful FLOPs per forward FLOP: 1 for --forward-only, else 3 (forward + backward)."""
  return 1 if args.forward_only else 3


def make_rows(shape, results, args):
  """One dict per benchmarked path, in row order; None where a number is not available."""
  t, d, f, e, k = shape
  gflop = passes(args) * 2 * t * k * 3 * d * f / 1e9
  ratio = lambda a, b: None if a is None or b is None else a / b
  median = lambda name: (results.get(name, (None,))[0] or (None,))[0]
  rows = []
  for name in (n for n in ALL_PATHS if n in results):
    times, temp, note = results[name]
    ms, min_ms = times or (None, None)
    label = LABELS[name].format(*args.ep_mesh or ())  # The EP row names its mesh.
    rows.append(
        dict(
            shape='x'.join(map(str, shape)),
            implementation=label,
            median_ms=ms,
            min_ms=min_ms,
            tflops=ratio(gflop, ms),
            vs_jax_ffn=ratio(median('ffn'), ms),
            vs_torch=ratio(median('torch_mixtral'), ms),
            temp_mib=temp,
            note=note,
        )
    )
  return rows


def fmt_row(cells):
  return ' '.join(
      str(c).rjust(w) if i >= 2 and w else str(c).ljust(w)
      for i, ((_, w), c) in enumerate(zip(COLS, cells))
  ).rstrip()


def print_row(row):
  num = lambda key, spec, unit='', none='n/a': (
      none if row[key] is None else format(row[key], spec) + unit
  )
  print(
      fmt_row(
          [
              row['shape'],
              row['implementation'],
              num('median_ms', '.2f'),
              num('min_ms', '.2f'),
              num('tflops', '.3f'),
              num('vs_jax_ffn', '.2f', 'x'),
              num('vs_torch', '.2f', 'x'),
              num('temp_mib', '.1f', none='-'),
              row['note'],
          ]
      )
  )


def host_cpu():
  """'model, N cores, avx512' from /proc/cpuinfo: XLA:CPU and torch speeds differ by ISA, so
  tables from two hosts only compare when this matches."""
  try:
    with open('/proc/cpuinfo') as fp:
      info = fp.read()
  except OSError:
    return 'unknown cpu'
  model = next(
      (
          line.split(':', 1)[1].strip()
          for line in info.splitlines()
          if line.startswith('model name')
      ),
      'unknown cpu',
  )
  isa = 'avx512' if ' avx512f' in info else 'avx2' if ' avx2' in info else 'no avx2'
  return f'{model}, {os.cpu_count()} cores, {isa}'


def main(args):
  sys.stdout.reconfigure(line_buffering=True)  # Rows show up as they finish, even when piped.
  dtype = jnp.dtype(args.dtype)
  shapes = parse_shapes(args.shapes)
  if args.gmm_tile is None:
    args.gmm_tile = MoEConfig.gmm_tile
  dev = jax.devices()[0]
  step = 'fwd' if args.forward_only else 'fwd+bwd'
  torch_device = bench_moe_torch.device_note()
  print(
      f'MoE FFN {step} benchmark | host {host_cpu()} | jax {jax.__version__} on {dev.platform} '
      f'({dev.device_kind}, {len(jax.devices())} devices) | torch on {torch_device} | dtype '
      f'{args.dtype} (jax params float32) | batch {args.batch} | gmm tile {args.gmm_tile} | '
      + (
          f'LoRA rank {args.lora}, dropout {args.lora_dropout:g}, base frozen | '
          if args.lora
          else ''
      )
      + f'median of {args.iters} iters after {args.warmup} warmup | '
      f'load avg {os.getloadavg()[0]:.2f}'
  )
  print(
      f'Useful FLOPs = {passes(args)} ({step}) x 2 x tokens x k x 3 x embed x '
      'mlp (routed experts only; router/dispatch not counted). vs jax ffn = ffn_ms / ms; vs '
      'torch = torch_mixtral_ms / ms (>1: faster). temp MiB = '
      f'memory_analysis().temp_size_in_bytes of the compiled JAX {step}.'
  )
  header = fmt_row([c for c, _ in COLS])
  print(header)
  print('-' * len(header))
  all_rows = []
  for shape in shapes:
    rows = make_rows(shape, run_shape(shape, args, dtype), args)
    for row in rows:
      print_row(row)
      row.update(device=f'{dev.platform} ({dev.device_kind})', dtype=args.dtype)
    all_rows += rows
    # Rewritten after each shape, so a crash keeps the finished ones.
    bench_common.write_json(args.json, all_rows)


if __name__ == '__main__':
  main(ARGS)
