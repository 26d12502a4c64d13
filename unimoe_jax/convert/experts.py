"""Stage 2 -> stage 3: builds MoE layers from modality experts trained as dense FFNs.

Every selected decoder layer's `layers_i/mlp/{wi_0,wi_1,wo}/kernel` of the stage-2 runs becomes
expert e of `layers_i/moe/{wi_0,wi_1,wo}/kernel` (`[expert, embed, mlp]`, `[expert, mlp,
embed]`). The sources are listed in expert order and may repeat (the official 8-expert model
starts experts 2 and 6 from one FFN, 5 and 7 from another); `'base'` takes the FFN of the base
(stage-1) model. `layers` selects the MoE layers ('all', 'even' as the official 8e model's
`moe_stride` 2 and Uni_MoE_audio / speech_dp, 'odd', or indices); the other layers keep the
base model's dense FFN. Everything that is not an FFN comes from the base model. The router is
not written: stage 3 initialises it (a missing parameter keeps its initialisation when the
checkpoint is restored). Sources in the scanned layout (`layer_stacking.py`) are read through
the looped one, and the result is looped: it restores into a model of either layout.

`read_official_ffns` reads an official expert FFN file (the 8e expert set `--mlp_dir`:
`mlp_audiocap.bin`, ...; keys `model.layers.{i}.mlp.{gate,up,down}_proj.weight`) as a source.
"""

import re
from typing import Any, Dict, Mapping, Sequence

import numpy as np
from flax import traverse_util

from unimoe_jax import layer_stacking
from unimoe_jax.convert import io as ckpt_io

FFN_KERNELS = ('wi_0', 'wi_1', 'wo')
# Uni_MoE_8e train.py / all_builder.py `ori_expert_list`: the expert set file (8e-Experts, the
# official --mlp_dir) of each of the 8 experts, in order (experts 2 and 6 share mlp_base, 5 and 7
# mlp_base7).
OFFICIAL_EXPERT_SET = (
    'mlp_audiocap',
    'mlp_basev',
    'mlp_base',
    'mlp_base1',
    'mlp_base4',
    'mlp_base7',
    'mlp_base',
    'mlp_base7',
)
_MLP = re.compile(r'^layers_(\d+)$')


def _layers(decoder: Mapping[str, Any]):
  return sorted((int(_MLP.match(k).group(1)), k) for k in decoder if _MLP.match(k))


def _selected(layers, indices):
  """The layer indices `layers` selects ('all', 'even', 'odd' / 'every_other', or indices)."""
  if isinstance(layers, str):
    rule = {
        'all': lambda i: True,
        'even': lambda i: i % 2 == 0,
        'odd': lambda i: i % 2 == 1,
        'every_other': lambda i: i % 2 == 1,
    }.get(layers)
    if rule is None:
      raise ValueError(f"layers must be 'all', 'even', 'odd' or layer indices, got {layers!r}")
    return [i for i in indices if rule(i)]
  chosen = sorted(int(i) for i in layers)
  bad = sorted(set(chosen) - set(indices))
  if bad:
    raise ValueError(f'layers {bad} are not in the base decoder (layers {list(indices)})')
  return chosen


def read_official_ffns(path: str) -> Dict[str, Any]:
  """An official expert FFN file as a params tree `{'decoder': {'layers_i': {'mlp': ...}}}`.

  Keys are read by the official loader's rule (train.py / all_builder.py: `key.split('.')[2]` is
  the layer, `key.split('.')[-2]` the module, one of gate_proj / up_proj / down_proj); torch
  `[out, in]` weights become our `[in, out]` kernels.
  """
  ours = {'gate_proj': 'wi_0', 'up_proj': 'wi_1', 'down_proj': 'wo'}
  decoder: Dict[str, Any] = {}
  for key, value in ckpt_io.file_entries(path).items():
    parts = key.split('.')
    if (
        len(parts) < 5
        or parts[:2] != ['model', 'layers']
        or not parts[2].isdigit()
        or parts[-1] != 'weight'
        or parts[-2] not in ours
    ):
      raise ValueError(
          f'{path}: {key!r} is not an expert FFN weight '
          '(model.layers.<i>.mlp.<gate_proj|up_proj|down_proj>.weight)'
      )
    mlp = decoder.setdefault(f'layers_{int(parts[2])}', {}).setdefault('mlp', {})
    if ours[parts[-2]] in mlp:
      raise ValueError(f'{path}: two tensors are layer {parts[2]} {parts[-2]} ({key!r})')
    mlp[ours[parts[-2]]] = {'kernel': np.ascontiguousarray(np.asarray(value, np.float32).T)}
  return {'decoder': decoder}


def assemble_experts(
    base: Mapping[str, Any],
    experts: Sequence[Mapping[str, Any]],
    names: Sequence[str] = (),
    layers='all',
) -> Dict[str, Any]:
  """Params of the MoE model.

  Args:
    base: params of the stage-1 model (`{'decoder': {'layers_i': {'mlp': ...}}, ...}`).
    experts: one params tree per expert (a stage-2 model), or `base` itself; a tree may appear
      more than once.
    names: labels of `experts` for error messages.
    layers: the layers that become MoE ('all', 'even', 'odd', or indices); the others keep the
      base's dense FFN.
  Raises:
    ValueError naming the expert and tensor when an FFN is missing or shapes differ.
  """
  names = list(names) or [f'expert {e}' for e in range(len(experts))]
  # Inputs may hold scanned layers; the result is looped, which loads into either layout.
  base = layer_stacking.to_looped(base)
  experts = [layer_stacking.to_looped(params) for params in experts]
  if 'decoder' not in base:
    raise ValueError('base params have no "decoder"')
  out = traverse_util.flatten_dict(dict(base))
  decoder = base['decoder']
  all_layers = _layers(decoder)
  if not all_layers:
    raise ValueError('base decoder has no layers_<i>')
  chosen = set(_selected(layers, [i for i, _ in all_layers]))
  for index, layer in all_layers:
    if index not in chosen:
      continue
    if 'mlp' not in decoder[layer]:
      raise ValueError(f'base decoder/{layer} has no dense mlp (already MoE?)')
    for kernel in FFN_KERNELS:
      stacked = []
      for name, params in zip(names, experts):
        try:
          value = np.asarray(params['decoder'][layer]['mlp'][kernel]['kernel'])
        except KeyError as e:
          raise ValueError(f'{name}: missing decoder/{layer}/mlp/{kernel}/kernel') from e
        want = np.shape(decoder[layer]['mlp'][kernel]['kernel'])
        if value.shape != want:
          raise ValueError(
              f'{name}: decoder/{layer}/mlp/{kernel}/kernel has shape {value.shape}, '
              f'the base model {want}'
          )
        stacked.append(value)
      out[('decoder', layer, 'moe', kernel, 'kernel')] = np.stack(stacked)
    for key in [k for k in out if k[:3] == ('decoder', layer, 'mlp')]:
      del out[key]
  return traverse_util.unflatten_dict(out)
