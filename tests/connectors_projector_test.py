"""LLaVA's mm_projector: parity with the torch nn.Sequential that LLaVA's builder makes."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from unimoe_jax.connectors.projector import Projector, projector_depth
from unimoe_jax.convert import clip as convert_clip

import hf_reference

IN_DIM, OUT_DIM = 24, 40


def _llava_projector(kind):
  """The module LLaVA's `build_vision_projector` returns, with random (nonzero) weights."""
  torch, _ = hf_reference.torch_and_transformers()
  if kind == 'linear':
    module = torch.nn.Linear(IN_DIM, OUT_DIM)
  else:
    layers = [torch.nn.Linear(IN_DIM, OUT_DIM)]
    for _ in range(1, projector_depth(kind)):
      layers += [torch.nn.GELU(), torch.nn.Linear(OUT_DIM, OUT_DIM)]
    module = torch.nn.Sequential(*layers)
  with torch.no_grad():
    for p in module.parameters():
      p.normal_(0.0, 0.3)
  return module


@pytest.mark.parametrize('kind', ['linear', 'mlp2x_gelu', 'mlp3x_gelu'])
def test_matches_llava_projector(kind):
  torch, _ = hf_reference.torch_and_transformers()
  module = _llava_projector(kind)
  state_dict = {
      f'model.mm_projector.{k}': v for k, v in hf_reference.state_dict_numpy(module).items()
  }
  state_dict['model.layers.0.mlp.up_proj.weight'] = np.zeros((3, 3), np.float32)  # Ignored.
  params = convert_clip.projector_params_from_hf(state_dict, kind)

  x = np.random.default_rng(0).normal(size=(2, 5, IN_DIM)).astype(np.float32)
  projector = Projector(kind, OUT_DIM)
  init = nn.meta.unbox(jax.eval_shape(projector.init, jax.random.PRNGKey(0), x)['params'])
  assert jax.tree_util.tree_map(lambda a: a.shape, init) == jax.tree_util.tree_map(
      lambda a: a.shape, params
  )
  ours = projector.apply({'params': params}, x)
  with torch.no_grad():
    ref = module(torch.tensor(x)).numpy()
  err = float(np.max(np.abs(np.asarray(ours) - ref)))
  print(f'projector {kind}: max abs err {err:.2e}')
  assert ours.shape == (2, 5, OUT_DIM)
  assert err < 1e-4
  frames = projector.apply({'params': params}, np.stack([x, x[::-1]], axis=1))
  assert frames.shape == (2, 2, 5, OUT_DIM)
  np.testing.assert_allclose(frames[:, 0], ours, atol=1e-5)
  np.testing.assert_allclose(frames[:, 1], ours[::-1], atol=1e-5)
  if kind != 'linear':
    # The tolerance tells the exact erf GELU from the tanh form.
    for layer in module:
      if isinstance(layer, torch.nn.GELU):
        layer.approximate = 'tanh'
    with torch.no_grad():
      tanh_ref = module(torch.tensor(x)).numpy()
    assert float(np.max(np.abs(np.asarray(ours) - tanh_ref))) > 1e-4


def test_every_param_has_logical_axes():
  x = np.zeros((1, 3, IN_DIM), np.float32)
  for kind in ('linear', 'mlp2x_gelu', 'mlp4x_gelu'):
    boxed = jax.eval_shape(Projector(kind, OUT_DIM).init, jax.random.PRNGKey(0), x)
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert len(leaves) == 2 * projector_depth(kind)
    assert all(
        isinstance(v, nn.LogicallyPartitioned) and len(v.names) == len(v.value.shape)
        for v in leaves
    )
    # flax refuses a kernel whose axis names repeat once a mesh maps them.
    assert all(len(set(v.names)) == len(v.names) for v in leaves)


@pytest.mark.parametrize('kind', ['conv', 'mlp0x_gelu', 'mlp2x_relu', 'identity', 'mlp2x_gelu '])
def test_bad_kind_raises(kind):
  with pytest.raises(ValueError, match='projector kind'):
    Projector(kind, OUT_DIM)
  with pytest.raises(ValueError, match='projector kind'):
    convert_clip.projector_params_from_hf({}, kind)


def test_converter_names_bad_tensors():
  module = _llava_projector('mlp2x_gelu')
  sd = {f'model.mm_projector.{k}': v for k, v in hf_reference.state_dict_numpy(module).items()}
  with pytest.raises(ValueError, match=r'model\.mm_projector\.weight'):
    convert_clip.projector_params_from_hf(sd, 'linear')  # An mlp checkpoint read as 'linear'.
  wrong = dict(sd, **{'model.mm_projector.2.weight': np.zeros((OUT_DIM, OUT_DIM + 1), np.float32)})
  with pytest.raises(ValueError, match=r'model\.mm_projector\.2\.weight'):
    convert_clip.projector_params_from_hf(wrong, 'mlp2x_gelu')
  renamed = dict(sd)
  renamed['model.mm_projector.1.weight'] = renamed.pop('model.mm_projector.2.weight')
  with pytest.raises(ValueError, match=r'model\.mm_projector\.2\.weight') as info:
    convert_clip.projector_params_from_hf(renamed, 'mlp2x_gelu')
  assert 'model.mm_projector.1.weight' in str(info.value)
