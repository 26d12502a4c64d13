r"""Per-device memory of the training step of a gin model on its mesh, without any weights.

Lowers and compiles `training.train_state.make_train_step` for abstract inputs only
(`create_train_state(..., abstract_only=True)`: ShapeDtypeStructs carrying their shardings)
on a simulated mesh of CPU devices of the shape that gin's `MESH` declares, and prints per
device: parameters, optimizer state and batch (from the shardings), and XLA's
`compiled.memory_analysis()` (arguments, outputs, aliased, temporaries). Nothing is
allocated, so the paper's 7B configurations plan on a laptop:

  python tools/plan_memory.py --gin_file=models/unimoe_7b_4e.gin
  python tools/plan_memory.py --gin_file=models/unimoe_7b_8e.gin --trainable='.*'
  python tools/plan_memory.py --gin_file=models/tiny.gin --gin_file=models/moe_4e_top2.gin \
      --mesh=2,4,1 --batch_size=8 --seq_len=64

FSDP (parameters and optimizer state split over the batch axes, partitioning.py) follows the
gin switch `partitioning.logical_axis_rules.fsdp`, which the 7B model files turn on; `--fsdp` /
`--no_fsdp` override it, so the same file plans both ways:

  python tools/plan_memory.py --gin_file=models/unimoe_7b_4e.gin --no_fsdp

The model is the decoder alone (a text batch: the towers and connectors of the multimodal
model are small next to a 7B decoder and run once per media item); parameters keep their
gin dtypes (7B files: float32 weights, bfloat16 compute). The tool sets
XLA_FLAGS=--xla_force_host_platform_device_count=N itself and re-executes when the running
process does not already have that many CPU devices. Temporaries are XLA's CPU estimate
for the same partitioned program: TPU and GPU fuse differently, so read them as an order of
magnitude; the parameter and optimizer figures are exact.
"""

import argparse
import os
import sys
import time

import bench_common

_CHILD_ENV = 'UNIMOE_PLAN_MEMORY_DEVICES'


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
      '--gin_file',
      action='append',
      default=[],
      help='gin files (relative to gin/ or a --gin_search_paths entry)',
  )
  parser.add_argument('--gin_bindings', action='append', default=[])
  parser.add_argument('--gin_search_paths', action='append', default=[])
  parser.add_argument(
      '--num_devices',
      type=int,
      default=None,
      help='simulated devices (default: the product of the MESH axes; needed '
      'when an axis is -1)',
  )
  parser.add_argument(
      '--batch_size',
      type=int,
      default=None,
      help='global batch rows (default: one per data x expert shard)',
  )
  parser.add_argument('--seq_len', type=int, default=2048)
  parser.add_argument(
      '--num_layers',
      type=int,
      default=None,
      help='override DecoderConfig.num_layers (to bound compile time)',
  )
  parser.add_argument(
      '--trainable',
      action='append',
      default=None,
      help='trainable parameter patterns (default: TRAINABLE_PATTERNS from gin, ' 'else all)',
  )
  parser.add_argument(
      '--mesh', default=None, help="'data,expert,model' sizes, overriding gin's MESH"
  )
  fsdp = parser.add_mutually_exclusive_group()
  fsdp.add_argument(
      '--fsdp',
      dest='fsdp',
      action='store_true',
      default=None,
      help='shard parameters and optimizer state over data (x expert): binds '
      'partitioning.logical_axis_rules.fsdp = True (default: as gin says)',
  )
  fsdp.add_argument(
      '--no_fsdp',
      dest='fsdp',
      action='store_false',
      help='binds partitioning.logical_axis_rules.fsdp = False',
  )
  parser.add_argument('--json_out', default=None, help='also write the numbers as JSON here')
  from unimoe_jax import gin_utils  # pylint: disable=g-import-not-at-top

  rest, bindings = gin_utils.split_gin_args(argv)
  args = parser.parse_args(rest)
  args.gin_bindings = list(args.gin_bindings) + bindings
  return args


def _parse_gin(args):
  import gin  # pylint: disable=g-import-not-at-top
  from unimoe_jax import gin_utils  # pylint: disable=g-import-not-at-top

  bindings = list(args.gin_bindings)
  if args.num_layers is not None:
    bindings.append(f'config.DecoderConfig.num_layers = {args.num_layers}')
  if args.fsdp is not None:
    bindings.append(f'partitioning.logical_axis_rules.fsdp = {args.fsdp}')
  # The configurables the model files bind.
  import importlib  # pylint: disable=g-import-not-at-top

  for module in (
      'config',
      'model',
      'models',
      'partitioning',
      'training.optimizer',
      'training.train_state',
  ):
    importlib.import_module(f'unimoe_jax.{module}')
  gin.clear_config()
  gin_utils.parse(args.gin_file, bindings, args.gin_search_paths)


def _macro(name, default=None):
  import gin  # pylint: disable=g-import-not-at-top

  try:
    value = gin.query_parameter(f'%{name}')
  except ValueError:
    return default
  fn = getattr(value, 'scoped_configurable_fn', None)
  return fn() if fn is not None else value


def _mesh_config(args):
  from unimoe_jax import partitioning  # pylint: disable=g-import-not-at-top

  if args.mesh:
    data, expert, model = (int(x) for x in args.mesh.split(','))
    return partitioning.MeshConfig(data=data, expert=expert, model=model)
  return _macro('MESH') or partitioning.MeshConfig()


def _wanted_devices(args) -> int:
  mesh = _mesh_config(args)
  dims = (mesh.data, mesh.expert, mesh.model)
  if args.num_devices is not None:
    return args.num_devices
  if -1 in dims:
    raise SystemExit(f'MESH {mesh} has an axis of -1: pass --num_devices')
  return int(dims[0] * dims[1] * dims[2])


def _reexec_with_devices(n: int) -> None:
  env = dict(os.environ)
  flags = [
      f
      for f in env.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count')
  ]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={n}'])
  env['JAX_PLATFORMS'] = 'cpu'
  env[_CHILD_ENV] = str(n)
  os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)


def _fmt(n: float) -> str:
  return f'{int(n):>16,d}  {n / 2**30:9.3f} GiB'


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def plan(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from unimoe_jax import models, partitioning  # pylint: disable=g-import-not-at-top
  from unimoe_jax.network import UniMoEConfig  # pylint: disable=g-import-not-at-top
  from unimoe_jax.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from unimoe_jax.training import train_state as train_state_lib  # pylint: disable=g-import-not-at-top

  decoder = _macro('DECODER_CONFIG')
  if decoder is None:
    raise SystemExit('no DECODER_CONFIG in the gin files: include a model (gin/models/)')
  model = models.UniMoEModel(UniMoEConfig(decoder=decoder))
  mesh_config = _mesh_config(args)
  mesh = partitioning.make_mesh(mesh_config, jax.devices()[: args.num_devices or None])
  batch_shards = mesh.shape['data'] * mesh.shape['expert']
  batch = args.batch_size or batch_shards
  if batch % batch_shards:
    raise SystemExit(f'--batch_size={batch} is not divisible by data x expert = {batch_shards}')
  length = args.seq_len
  input_shapes = {
      k: (batch, length)
      for k in (
          'decoder_input_tokens',
          'decoder_target_tokens',
          'decoder_loss_weights',
          'decoder_segment_ids',
          'decoder_positions',
      )
  }
  input_types = {k: np.int32 for k in input_shapes}
  input_types['decoder_loss_weights'] = np.float32

  patterns = tuple(args.trainable or _macro('TRAINABLE_PATTERNS') or ('.*',))
  abstract_boxed = train_state_lib.abstract_params(model, input_shapes, input_types)
  mask = optimizer_lib.trainable_mask(nn.meta.unbox(abstract_boxed), patterns)
  tx, schedule = optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(), 1000)
  rng = jax.random.PRNGKey(0)
  state, shardings = train_state_lib.create_train_state(
      model, tx, mask, mesh, rng, input_shapes, input_types, abstract_only=True
  )
  step = train_state_lib.make_train_step(model, tx, mask, schedule)

  with partitioning.mesh_context(mesh):
    jitted, batch_shardings = train_state_lib.jit_train_step(step, mesh, shardings, input_shapes)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(s, input_types[k], sharding=batch_shardings[k])
        for k, s in input_shapes.items()
    }
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)
    started = time.time()
    lowered = jitted.lower(state, abstract_batch, abstract_rng)
    lower_s = time.time() - started
    started = time.time()
    compiled = lowered.compile()
    compile_s = time.time() - started
  stats = compiled.memory_analysis()

  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  trainable, _ = optimizer_lib.split_params(state.params, mask)
  num_trainable = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(trainable))
  result = {
      'gin_files': list(args.gin_file),
      'mesh': dict(mesh.shape),
      'num_devices': int(mesh.devices.size),
      'batch_size': batch,
      'seq_len': length,
      'num_layers': decoder.num_layers,
      'scan_layers': bool(getattr(decoder, 'scan_layers', False)),
      'fsdp': partitioning.logical_axis_rules() == partitioning.FSDP_LOGICAL_AXIS_RULES,
      'num_params': num_params,
      'num_trainable_params': num_trainable,
      'trainable_patterns': list(patterns),
      'params_bytes': _per_device_bytes(state.params),
      'opt_state_bytes': _per_device_bytes(state.opt_state),
      'batch_bytes': _per_device_bytes(abstract_batch),
      'xla_argument_bytes': int(stats.argument_size_in_bytes),
      'xla_output_bytes': int(stats.output_size_in_bytes),
      'xla_alias_bytes': int(stats.alias_size_in_bytes),
      'xla_temp_bytes': int(stats.temp_size_in_bytes),
      'xla_code_bytes': int(stats.generated_code_size_in_bytes),
      'lower_seconds': round(lower_s, 2),
      'compile_seconds': round(compile_s, 2),
  }
  result['peak_bytes'] = (
      result['xla_argument_bytes']
      + result['xla_output_bytes']
      - result['xla_alias_bytes']
      + result['xla_temp_bytes']
  )
  return result


def print_table(r: dict) -> None:
  mesh = ' '.join(f'{k}={v}' for k, v in r['mesh'].items())
  print(f"plan_memory: {' + '.join(r['gin_files'])}")
  print(
      f"  mesh {mesh} ({r['num_devices']} devices); batch {r['batch_size']} x {r['seq_len']} "
      f"tokens; {r['num_layers']} layers{' (scanned)' if r['scan_layers'] else ''}; "
      f"FSDP {'on' if r['fsdp'] else 'off'}"
  )
  print(
      f"  parameters {r['num_params']:,d} ({r['num_trainable_params']:,d} trainable: "
      f"{', '.join(r['trainable_patterns'])})"
  )
  print('  per device                       bytes')
  rows = [
      ('parameters', 'params_bytes'),
      ('optimizer state', 'opt_state_bytes'),
      ('batch', 'batch_bytes'),
      ('XLA arguments', 'xla_argument_bytes'),
      ('XLA outputs', 'xla_output_bytes'),
      ('XLA aliased (donated)', 'xla_alias_bytes'),
      ('XLA temporaries', 'xla_temp_bytes'),
      ('peak (arg+out-alias+temp)', 'peak_bytes'),
  ]
  for label, key in rows:
    print(f'  {label:<26}{_fmt(r[key])}')
  print(f"  lower {r['lower_seconds']:.1f} s, compile {r['compile_seconds']:.1f} s")


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = _parse_args(argv)
  _parse_gin(args)
  wanted = _wanted_devices(args)
  if os.environ.get(_CHILD_ENV) != str(wanted):
    import jax  # pylint: disable=g-import-not-at-top
    # jax.device_count() initialises the backend; only trust it when XLA_FLAGS already asked
    # for enough devices (otherwise re-exec so the flag is read at start-up).
    flags = os.environ.get('XLA_FLAGS', '')
    if (
        '--xla_force_host_platform_device_count' not in flags
        or jax.device_count() < wanted
        or jax.default_backend() != 'cpu'
    ):
      _reexec_with_devices(wanted)
  args.num_devices = wanted
  result = plan(args)
  print_table(result)
  bench_common.write_json(args.json_out, result)
  return result


if __name__ == '__main__':
  main()
