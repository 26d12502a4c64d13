"""Stage 2 -> stage 3: builds MoE layers from modality experts trained as dense FFNs.

Every decoder layer `layers_i/mlp/{wi_0,wi_1,wo}/kernel` of the stage-2 runs becomes expert e
of `layers_i/moe/{wi_0,wi_1,wo}/kernel` (`[expert, embed, mlp]`, `[expert, mlp, embed]`). The
sources are listed in expert order; `'base'` takes the FFN of the base (stage-1) model, for
configurations with more experts than modalities. Everything that is not an FFN comes from the
base model. The router is not written: stage 3 initialises it (a missing parameter keeps its
initialisation when the checkpoint is restored). Sources in the scanned layout
(`layer_stacking.py`) are read through the looped one, and the result is looped: it restores
into a model of either layout.
"""

import re
from typing import Any, Dict, Mapping, Sequence

import numpy as np
from flax import traverse_util

from unimoe_jax import layer_stacking

FFN_KERNELS = ('wi_0', 'wi_1', 'wo')
_MLP = re.compile(r'^layers_(\d+)$')


def _layers(decoder: Mapping[str, Any]):
  return sorted((int(_MLP.match(k).group(1)), k) for k in decoder if _MLP.match(k))


def assemble_experts(base: Mapping[str, Any], experts: Sequence[Mapping[str, Any]],
                     names: Sequence[str] = ()) -> Dict[str, Any]:
  """Params of the MoE model.

  Args:
    base: params of the stage-1 model (`{'decoder': {'layers_i': {'mlp': ...}}, ...}`).
    experts: one params tree per expert (a stage-2 model), or `base` itself.
    names: labels of `experts` for error messages.
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
  layers = _layers(decoder)
  if not layers:
    raise ValueError('base decoder has no layers_<i>')
  for _, layer in layers:
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
          raise ValueError(f'{name}: decoder/{layer}/mlp/{kernel}/kernel has shape {value.shape}, '
                           f'the base model {want}')
        stacked.append(value)
      out[('decoder', layer, 'moe', kernel, 'kernel')] = np.stack(stacked)
    for key in [k for k in out if k[:3] == ('decoder', layer, 'mlp')]:
      del out[key]
  return traverse_util.unflatten_dict(out)
