"""Stage 2 -> 3: tools/assemble_experts.py and convert/experts.py."""

import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from unimoe_jax import checkpoints
from unimoe_jax import config
from unimoe_jax.convert import experts as experts_lib
from unimoe_jax.decoder import Decoder
from official_reference import EXPERT_SET
from tool_runs import cli_args, run_tool


def _params(seed, **overrides):
  """Random params of the tiny decoder (`config.named('tiny', **overrides)`), as numpy."""
  cfg = config.named('tiny', **overrides)
  variables = Decoder(cfg).init(jax.random.PRNGKey(seed), np.zeros((1, 4), np.int32))
  import flax.linen as nn

  return {'decoder': jax.tree_util.tree_map(np.asarray, nn.meta.unbox(variables['params']))}


def test_experts_are_the_stage2_ffns_and_the_rest_is_base():
  base, e0, e1 = _params(0), _params(1), _params(2)
  out = experts_lib.assemble_experts(base, [e0, e1, base], ['e0', 'e1', 'base'])
  # The MoE model's names: its shapes suffice (eval_shape, not an init run op by op).
  moe_cfg = config.named('tiny', moe=config.MoEConfig(num_experts=3, num_experts_per_tok=2))
  moe_tree = {
      'decoder': jax.eval_shape(
          Decoder(moe_cfg).init, jax.random.PRNGKey(0), np.zeros((1, 4), np.int32)
      )['params']
  }
  want = {k for k in traverse_util.flatten_dict(moe_tree) if k[-1] != 'router'}
  assert set(traverse_util.flatten_dict(out)) == want  # Same names as the MoE model, no router.
  for layer in ('layers_0', 'layers_1'):
    for kernel in ('wi_0', 'wi_1', 'wo'):
      got = out['decoder'][layer]['moe'][kernel]['kernel']
      for e, src in enumerate((e0, e1, base)):
        np.testing.assert_array_equal(got[e], src['decoder'][layer]['mlp'][kernel]['kernel'])
  np.testing.assert_array_equal(
      out['decoder']['layers_0']['attention']['query']['kernel'],
      base['decoder']['layers_0']['attention']['query']['kernel'],
  )
  assert not np.array_equal(
      out['decoder']['layers_0']['attention']['query']['kernel'],
      e0['decoder']['layers_0']['attention']['query']['kernel'],
  )


def test_missing_or_misshapen_ffn_is_named():
  base, e0 = _params(0), _params(1)
  del e0['decoder']['layers_1']['mlp']['wo']
  with pytest.raises(ValueError, match='speech: missing decoder/layers_1/mlp/wo/kernel'):
    experts_lib.assemble_experts(base, [e0], ['speech'])
  e1 = _params(1)
  e1['decoder']['layers_0']['mlp']['wi_0']['kernel'] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match='image: decoder/layers_0/mlp/wi_0/kernel has shape'):
    experts_lib.assemble_experts(base, [e1], ['image'])


def test_tool_writes_a_checkpoint(tmp_path):
  base, e0 = _params(0), _params(1)
  checkpoints.save(str(tmp_path / 'base'), base, '# base\n')
  checkpoints.save(str(tmp_path / 'e0'), e0, '# e0\n')
  # `--expert` repeats, so it stands among the flags.
  argv = cli_args(
      '--expert',
      str(tmp_path / 'e0'),
      '--expert',
      'base',
      base=tmp_path / 'base',
      output=tmp_path / 'out',
  )
  run_tool(
      None,
      'assemble_experts.py',
      *argv,
      check=True,
      capture_output=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  params, gin_text = checkpoints.restore(str(tmp_path / 'out'))
  got = params['decoder']['layers_1']['moe']['wo']['kernel']
  assert got.shape[0] == 2
  np.testing.assert_array_equal(got[0], e0['decoder']['layers_1']['mlp']['wo']['kernel'])
  np.testing.assert_array_equal(got[1], base['decoder']['layers_1']['mlp']['wo']['kernel'])
  assert 'experts' in gin_text


def test_official_8e_expert_set_on_even_layers(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top

  import assemble_experts  # pylint: disable=g-import-not-at-top  (tools/ is on sys.path)

  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  base = _params(0, num_layers=4)
  checkpoints.save(str(tmp_path / 'base'), base, '# base\n')
  rng = np.random.default_rng(0)
  files = {}
  (tmp_path / 'experts').mkdir()
  for stem in sorted(set(EXPERT_SET)):  # A stage-2 FFN of every layer, official names.
    sd = {}
    for i in range(4):
      for proj, shape in (
          ('gate_proj', (128, 64)),
          ('up_proj', (128, 64)),
          ('down_proj', (64, 128)),
      ):
        sd[f'model.layers.{i}.mlp.{proj}.weight'] = rng.normal(size=shape).astype(np.float32)
    files[stem] = sd
    torch.save(
        {k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / 'experts' / f'{stem}.bin'
    )
  out = str(tmp_path / 'out')
  argv = cli_args(
      base=tmp_path / 'base', expert_set=tmp_path / 'experts', moe_layers='even', output=out
  )
  assert assemble_experts.main(argv) == 0
  params, gin_text = checkpoints.restore(out)
  assert 'MoE model of 8 experts' in gin_text and "'even'" in gin_text
  moe_cfg = config.named('tiny', num_layers=4, moe=config.MoEConfig(num_experts=8, layers=(0, 2)))
  want = nn.meta.unbox(
      jax.eval_shape(
          lambda: Decoder(moe_cfg).init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32))
      )['params']
  )
  want = {k: v.shape for k, v in traverse_util.flatten_dict(want).items() if k[-1] != 'router'}
  got = {k[1:]: v.shape for k, v in traverse_util.flatten_dict(params).items()}
  assert got == want  # The 8-expert even-layer model's tree, less the routers.
  names = {'wi_0': 'gate_proj', 'wi_1': 'up_proj', 'wo': 'down_proj'}
  for i in (0, 2):
    for kernel, proj in names.items():
      stacked = params['decoder'][f'layers_{i}']['moe'][kernel]['kernel']
      for e, stem in enumerate(EXPERT_SET):
        np.testing.assert_array_equal(
            stacked[e], files[stem][f'model.layers.{i}.mlp.{proj}.weight'].T
        )
      np.testing.assert_array_equal(stacked[2], stacked[6])
      np.testing.assert_array_equal(stacked[5], stacked[7])
  for i in (1, 3):  # Dense layers keep the base FFN (the expert set's odd layers are unused).
    for kernel in names:
      np.testing.assert_array_equal(
          params['decoder'][f'layers_{i}']['mlp'][kernel]['kernel'],
          base['decoder'][f'layers_{i}']['mlp'][kernel]['kernel'],
      )
  # An expert file with something else than FFN weights is named.
  torch.save(
      {'model.layers.0.mlp.gate.weight': torch.zeros(8, 64)}, tmp_path / 'experts' / 'bad.bin'
  )
  with pytest.raises(ValueError, match=r"bad.bin: 'model.layers.0.mlp.gate.weight' is not"):
    assemble_experts.main(
        cli_args(
            base=tmp_path / 'base', expert=tmp_path / 'experts' / 'bad.bin', output=tmp_path / 'o2'
        )
    )
  assert not (tmp_path / 'o2').exists()
