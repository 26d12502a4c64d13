"""CLIP vision tower: parity with Hugging Face's CLIPVisionModel hidden states, video pooling,
converter errors, bfloat16 compute and logical axes."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe_jax import partitioning
from unimoe_jax.convert import clip as convert_clip
from unimoe_jax.encoders import clip

import hf_reference

HF_KW = hf_reference.tiny_config('clip_vision')


@functools.lru_cache(maxsize=None)
def _hf_tower():
  """A tiny random CLIPVisionModel and its HF-style state dict (with the 'vision_model.' level
  that original checkpoint files have)."""
  torch, transformers = hf_reference.torch_and_transformers()
  config = transformers.CLIPVisionConfig(attn_implementation='eager', **HF_KW)
  model = transformers.CLIPVisionModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      # LayerNorm scales around 1, everything else centred: no tensor is zero or trivial.
      p.copy_(
          torch.randn_like(p) * 0.1
          + (
              1.0
              if name.endswith('norm1.weight')
              or name.endswith('norm2.weight')
              or name.endswith('layrnorm.weight')
              else 0.0
          )
      )
  sd = hf_reference.state_dict_numpy(model)
  return model, config, sd


def _hf_hidden_states(pixels_nhwc):
  torch, _ = hf_reference.torch_and_transformers()
  model, _, _ = _hf_tower()
  x = torch.tensor(np.asarray(pixels_nhwc).transpose(0, 3, 1, 2))
  with torch.no_grad():
    out = model(pixel_values=x, output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


def _pixels(batch, seed=0, frames=None):
  shape = (batch,) + ((frames,) if frames else ()) + (30, 30, 3)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _ours(**overrides):
  _, config, sd = _hf_tower()
  cfg = convert_clip.config_from_hf(config.to_dict(), **overrides)
  params = convert_clip.params_from_hf({'vision_model.' + k: v for k, v in sd.items()}, cfg)
  return cfg, params


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize('select_layer', [-2, -1, 1])
@pytest.mark.parametrize('select_feature', ['patch', 'cls_patch'])
def test_matches_hf_hidden_state(select_layer, select_feature):
  cfg, params = _ours(select_layer=select_layer, select_feature=select_feature)
  pixels = _pixels(2)
  ours = clip.CLIPVisionTower(cfg).apply({'params': params}, pixels)
  ref = _hf_hidden_states(pixels)[select_layer]
  if select_feature == 'patch':
    ref = ref[:, 1:]
  assert ours.shape == (2, cfg.num_tokens, 32) == ref.shape
  err = _max_err(ours, ref)
  print(f'clip select_layer={select_layer} {select_feature}: max abs err {err:.2e}')
  assert err < 1e-4
  # The selected state differs from its neighbours, so a wrong layer count would fail.
  assert _max_err(ours, _hf_hidden_states(pixels)[select_layer - 1][:, -ours.shape[1] :]) > 1e-2


def test_later_layers_are_not_built_and_params_match_init_tree():
  cfg, params = _ours(select_layer=-2)
  assert cfg.num_used_layers == 2
  init = jax.eval_shape(clip.CLIPVisionTower(cfg).init, jax.random.PRNGKey(0), _pixels(1))
  init = nn.meta.unbox(init['params'])
  assert 'layers_2' not in init
  shapes = lambda t: jax.tree_util.tree_map(lambda a: tuple(a.shape), t)  # pylint: disable=unnecessary-lambda-assignment
  assert shapes(init) == shapes(params)


def test_video_is_the_mean_of_per_frame_outputs():
  cfg, params = _ours()
  video = _pixels(2, seed=3, frames=3)
  tower = clip.CLIPVisionTower(cfg)
  ours = tower.apply({'params': params}, video)
  per_frame = np.stack([_hf_hidden_states(video[:, t])[-2][:, 1:] for t in range(3)], axis=1)
  assert ours.shape == (2, cfg.num_tokens, 32)
  err = _max_err(ours, per_frame.mean(axis=1))
  print(f'clip video: max abs err {err:.2e}')
  assert err < 1e-4
  assert _max_err(ours, per_frame[:, 0]) > 1e-2  # Frames really differ.
  frames = tower.apply({'params': params}, video, pool_frames=False)
  assert frames.shape == (2, 3, cfg.num_tokens, 32)
  assert _max_err(frames, per_frame) < 1e-4


def test_llava_prefix_and_transformers5_prefix():
  _, config, sd = _hf_tower()
  cfg = convert_clip.config_from_hf(config.to_dict())
  _, reference = _ours()
  llava = {'model.vision_tower.vision_tower.vision_model.' + k: v for k, v in sd.items()}
  llava['model.mm_projector.0.weight'] = np.zeros((4, 32), np.float32)  # Other modules' tensors.
  llava['model.embed_tokens.weight'] = np.zeros((5, 4), np.float32)
  for state_dict, prefix in [(llava, 'model.vision_tower.vision_tower.vision_model.'), (sd, '')]:
    params = convert_clip.params_from_hf(state_dict, cfg, prefix=prefix)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, reference)


def test_converter_names_bad_tensors():
  _, config, sd = _hf_tower()
  cfg = convert_clip.config_from_hf(config.to_dict())
  renamed = dict(sd)
  renamed['encoder.layers.0.mlp.fc9.weight'] = renamed.pop('encoder.layers.0.mlp.fc1.weight')
  with pytest.raises(ValueError, match=r'encoder\.layers\.0\.mlp\.fc1\.weight') as info:
    convert_clip.params_from_hf(renamed, cfg, prefix='')
  assert 'encoder.layers.0.mlp.fc9.weight' in str(info.value)

  wrong = dict(sd)
  wrong['encoder.layers.1.self_attn.q_proj.weight'] = np.zeros((32, 31), np.float32)
  with pytest.raises(ValueError, match=r'encoder\.layers\.1\.self_attn\.q_proj\.weight'):
    convert_clip.params_from_hf(wrong, cfg, prefix='')

  # A later layer that the selection drops is ignored, but a used one must be present.
  dropped = {k: v for k, v in sd.items() if not k.startswith('encoder.layers.2.')}
  convert_clip.params_from_hf(dropped, cfg, prefix='')
  missing = {k: v for k, v in sd.items() if not k.startswith('encoder.layers.1.')}
  with pytest.raises(ValueError, match=r'missing .*encoder\.layers\.1\.'):
    convert_clip.params_from_hf(missing, cfg, prefix='')


def test_bfloat16_compute_stays_close():
  cfg, params = _ours()
  pixels = _pixels(2, seed=5)
  f32 = clip.CLIPVisionTower(cfg).apply({'params': params}, pixels)
  bf16 = clip.CLIPVisionTower(cfg, dtype=jnp.bfloat16).apply({'params': params}, pixels)
  assert bf16.dtype == jnp.bfloat16
  rel = _max_err(bf16, f32) / float(np.max(np.abs(f32)))
  print(f'clip bf16 vs f32: max rel err {rel:.2e}')
  assert 0 < rel < 5e-2


def test_every_param_has_logical_axes_and_runs_sharded():
  cfg = clip.named('tiny')  # Sizes divisible by the 4-way model axis.
  tower = clip.CLIPVisionTower(cfg)
  pixels = np.random.default_rng(7).normal(size=(8, 32, 32, 3)).astype(np.float32)
  boxed = jax.eval_shape(tower.init, jax.random.PRNGKey(0), pixels)
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == len(x.value.shape) for x in leaves)
  named_axes = [[n for n in x.names if n is not None] for x in leaves]
  assert all(len(set(n)) == len(n) for n in named_axes)  # flax rejects repeats under a mesh.
  rng = np.random.default_rng(8)
  params = jax.tree_util.tree_map(
      lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32), nn.meta.unbox(boxed)['params']
  )

  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, model=4))
  shardings = partitioning.params_shardings(mesh, boxed)
  variables = jax.device_put({'params': params}, shardings)
  expected = tower.apply({'params': params}, pixels)
  with partitioning.mesh_context(mesh):
    sharded = jax.jit(tower.apply)(variables, pixels)
  assert sharded.shape == (8, cfg.num_tokens, 64)
  assert _max_err(sharded, expected) < 1e-4


def test_config_validation_and_sizes():
  large = clip.CLIP_SIZES['vit-l-14-336']
  assert (large.num_patches, large.num_tokens, large.num_used_layers) == (576, 576, 23)
  assert dataclasses.replace(large, select_feature='cls_patch').num_tokens == 577
  for field, value in [
      ('select_feature', 'cls'),
      ('select_layer', 25),
      ('act', 'swish'),
      ('patch_size', 13),
      ('num_heads', 5),
  ]:
    with pytest.raises(ValueError, match=field):
      dataclasses.replace(large, **{field: value})
  with pytest.raises(ValueError, match='pixels'):
    jax.eval_shape(
        clip.CLIPVisionTower(clip.named('tiny')).init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, 30, 30, 3)),
    )
