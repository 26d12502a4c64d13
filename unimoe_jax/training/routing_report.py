"""Where the router sends each evaluation task's tokens: the paper's routing-distribution view.

For every MoE layer and expert, the fraction of a task's routing choices (each token makes
`num_experts_per_tok` of them) that go to that expert, counted separately for text tokens and
for media soft tokens. The MoE layer sows its top-k choices (`intermediates/.../moe/
router_indices`, `[batch, length, k]`); a teacher-forced forward over the task's evaluation
examples (prompt and reference answer) collects them. Padding takes no part.

  counts = count_choices(indices, token_groups(batch), num_experts)   # one batch
  fractions(counts)                                                   # {group: [layers, experts]}
"""

import re
from typing import Any, Dict, Mapping

import numpy as np

REPORT_FILE = 'routing.json'  # In MODEL_DIR (training/loop.py).
SOWN_NAME = 'router_indices'
_LAYER = re.compile(r'^layers_(\d+)$')
_OFFSET = re.compile(r'^offset_(\d+)$')


def router_choices(intermediates: Mapping[str, Any], scan_period: int = 1) -> np.ndarray:
  """The sown top-k choices of every MoE layer -> `[moe_layers, batch, length, k]` int32, in
  layer order. Unrolled layers sow under `layers_{i}/moe`; scanned blocks under
  `stacked_layers/offset_{r}/moe` with a leading `[num_layers / period]` axis (layer
  `j * scan_period + r`)."""
  found: Dict[int, np.ndarray] = {}

  def walk(tree, path):
    for key, value in tree.items():
      if key == SOWN_NAME:
        value = np.asarray(value[0] if isinstance(value, (tuple, list)) else value)
        layer = [int(m.group(1)) for m in map(_LAYER.match, path) if m]
        offset = [int(m.group(1)) for m in map(_OFFSET.match, path) if m]
        if layer:
          found[layer[-1]] = value
        elif offset:
          for j in range(value.shape[0]):
            found[j * scan_period + offset[-1]] = value[j]
        else:
          raise ValueError(f'{"/".join(path)}/{SOWN_NAME}: no layers_i or offset_r in the path')
      elif isinstance(value, Mapping):
        walk(value, path + (key,))

  walk(intermediates, ())
  if not found:
    raise ValueError(
        f'no {SOWN_NAME} in the intermediates: the model has no MoE layer, or '
        "the forward pass was not run with mutable=['intermediates']"
    )
  return np.stack([found[i] for i in sorted(found)]).astype(np.int32)


def token_groups(batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """`{'text': mask, 'media': mask}`, each `[batch, length]` bool: media soft tokens are the
  positions whose input is a (negative) placeholder id; text is every other real position
  (padding, target 0 in an unpacked row, is in neither)."""
  inputs = np.asarray(batch['decoder_input_tokens'])
  real = np.asarray(batch['decoder_target_tokens']) != 0
  if 'decoder_segment_ids' in batch:
    real = real | (np.asarray(batch['decoder_segment_ids']) != 0)
  media = real & (inputs < 0)
  return {'text': real & ~media, 'media': media}


def count_choices(
    indices: np.ndarray, groups: Mapping[str, np.ndarray], num_experts: int
) -> Dict[str, np.ndarray]:
  """`indices [layers, batch, length, k]` -> `{group: counts [layers, experts]}`: how many of
  the group's tokens' choices went to each expert (a token counts once per choice)."""
  indices = np.asarray(indices)
  if indices.ndim != 4:
    raise ValueError(f'indices: expected [layers, batch, length, k], got shape {indices.shape}')
  layers = indices.shape[0]
  out = {}
  for name, mask in groups.items():
    mask = np.asarray(mask, bool)
    if mask.shape != indices.shape[1:3]:
      raise ValueError(
          f"group {name!r}: mask shape {mask.shape} != indices' [batch, length] "
          f'{indices.shape[1:3]}'
      )
    chosen = indices[:, mask]  # [layers, tokens, k]
    counts = np.zeros((layers, num_experts), np.int64)
    for layer in range(layers):
      counts[layer] = np.bincount(chosen[layer].reshape(-1), minlength=num_experts)[:num_experts]
    out[name] = counts
  return out


def add_counts(total: Dict[str, np.ndarray], counts: Mapping[str, np.ndarray]) -> None:
  for name, value in counts.items():
    total[name] = total[name] + value if name in total else np.array(value)


def fractions(counts: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """`{group: counts [layers, experts]}` -> each row divided by its sum (float64; a group with
  no tokens gives NaN rows, not zeros that would read as 'never routed')."""
  out = {}
  for name, value in counts.items():
    value = np.asarray(value, np.float64)
    total = value.sum(axis=-1, keepdims=True)
    with np.errstate(invalid='ignore', divide='ignore'):
      out[name] = np.where(total > 0, value / np.where(total > 0, total, 1), np.nan)
  return out


def to_json(counts_by_task: Mapping[str, Mapping[str, np.ndarray]]) -> Dict[str, Any]:
  """`{task: {group: {'counts': [[...]], 'fractions': [[...]]}}}`, both `[layers][experts]`."""
  out = {}
  for task, counts in counts_by_task.items():
    fr = fractions(counts)
    out[task] = {
        name: {
            'counts': np.asarray(value).tolist(),
            'fractions': [
                [None if np.isnan(x) else round(float(x), 6) for x in row] for row in fr[name]
            ],
        }
        for name, value in counts.items()
    }
  return out
