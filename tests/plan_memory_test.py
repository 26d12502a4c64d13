"""tools/plan_memory.py on a tiny MoE: the printed table and exact per-device parameter bytes."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from unimoe_jax import config as config_lib
from unimoe_jax import models
from unimoe_jax import partitioning
from unimoe_jax.network import UniMoEConfig
from tool_runs import REPO, tool_env, tool_rows


def _tiny_moe_param_leaves():
  """The boxed (nn.Partitioned) parameter leaves of models/tiny.gin + models/moe_4e_top2.gin."""
  cfg = UniMoEConfig(
      decoder=config_lib.named(
          'tiny', moe=config_lib.MoEConfig(num_experts=4, num_experts_per_tok=2)
      )
  )
  shapes = {
      k: (2, 8) for k in ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')
  }
  boxed = jax.eval_shape(
      lambda: models.UniMoEModel(cfg).get_initial_variables(jax.random.PRNGKey(0), shapes)
  )['params']
  return jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _expected_param_bytes(rules, mesh_sizes):
  """Per-device float32 bytes of the tiny MoE's params under `rules`: each leaf divided by the
  sizes of the mesh axes its logical names map to."""
  total = 0
  for leaf in _tiny_moe_param_leaves():
    parts = 1
    for entry in partitioning.logical_to_mesh_spec(leaf.names, rules):
      for axis in (entry if isinstance(entry, tuple) else (entry,) if entry else ()):
        parts *= mesh_sizes[axis]
    total += 4 * int(np.prod(leaf.value.shape)) // parts
  return total


def _expected_param_counts():
  """(total, on the 'expert' axis) for the tiny MoE."""
  leaves = _tiny_moe_param_leaves()
  total = sum(int(np.prod(x.value.shape)) for x in leaves)
  expert = sum(int(np.prod(x.value.shape)) for x in leaves if 'expert' in x.names)
  return total, expert


@pytest.mark.slow  # a subprocess that compiles a training step: ~20-40 s on 2 cores
# Off: gin turns FSDP on and the flag turns it off again (the flag wins), as for the 7B files.
# '--fsdp' only (the no-FSDP case cost 13 s; fsdp_test.py tests the rules the switch flips).
@pytest.mark.parametrize('fsdp_flags', [['--fsdp']], ids=['fsdp'])
def test_tiny_moe_plan(tmp_path, fsdp_flags):
  # A wrong device count on purpose: the tool must re-execute itself with the mesh's 8.
  env = tool_env(
      XLA_FLAGS='--xla_force_host_platform_device_count=2 ' '--xla_backend_optimization_level=0',
      JAX_PLATFORMS='cpu',
      PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, 'tests')]),
  )
  env.pop('UNIMOE_PLAN_MEMORY_DEVICES', None)
  r, table = tool_rows(
      tmp_path,
      'plan_memory.py',
      '--gin_file=models/tiny.gin',
      '--gin_file=models/moe_4e_top2.gin',
      '--mesh=2,4,1',
      '--batch_size=8',
      '--seq_len=32',
      *fsdp_flags,
      json_flag='--json_out',
      env=env,
      timeout=300,
  )
  for label in ('parameters', 'optimizer state', 'XLA arguments', 'XLA temporaries', 'peak'):
    assert label in table, table
  assert 'mesh data=2 expert=4 model=1 (8 devices)' in table
  fsdp = fsdp_flags == ['--fsdp']
  assert ('FSDP on' if fsdp else 'FSDP off') in table
  assert r['num_devices'] == 8 and r['mesh'] == {'data': 2, 'expert': 4, 'model': 1}
  assert r['fsdp'] == fsdp

  total, expert = _expected_param_counts()
  assert expert > 0 and r['num_params'] == total
  if fsdp:  # Every weight with an 'embed' axis is split 8 ways (data x expert, or both).
    expected = _expected_param_bytes(partitioning.FSDP_LOGICAL_AXIS_RULES, r['mesh'])
    assert expected < 4 * total / 7
  else:  # model=1: only the expert axis splits parameters (4 ways); float32 = 4 bytes.
    expected = 4 * ((total - expert) + expert // 4)
    assert expected == _expected_param_bytes(partitioning.LOGICAL_AXIS_RULES, r['mesh'])
  assert r['params_bytes'] == pytest.approx(expected, rel=1e-6)
  print(
      f"\nFSDP {'on' if fsdp else 'off'}: params {r['params_bytes']}, optimizer state "
      f"{r['opt_state_bytes']}, temporaries {r['xla_temp_bytes']} bytes per device"
  )
  assert f"{r['params_bytes']:,d}" in table
  # Adam: mu and nu like the params, plus a few scalar counters (tolerance 64 bytes).
  assert abs(r['opt_state_bytes'] - 2 * r['params_bytes']) <= 64
  # XLA's own argument size: state + this device's batch rows + the rng key (<= 64 bytes).
  known = r['params_bytes'] + r['opt_state_bytes'] + r['batch_bytes'] + 4  # + step
  assert 0 <= r['xla_argument_bytes'] - known <= 64
  # The state is donated: XLA aliases it into the outputs.
  assert r['xla_alias_bytes'] >= r['params_bytes'] + r['opt_state_bytes']
  assert r['xla_temp_bytes'] > 0
