"""The decoder's two parameter layouts, looped and scanned, and the one converter between them.

Looped (`DecoderConfig.scan_layers = False`, and what every converter reads and writes):

    layers_{i}/<path>                          one subtree per layer, i in [0, num_layers)

Scanned (`scan_layers = True`): the layers run under `nn.scan` in blocks of p layers
(p = `DecoderConfig.scan_period()`: 1 when all layers are alike, 2 for MoE on every other
layer), and layer i = j * p + r is slice j of a stacked leaf

    stacked_layers/offset_{r}/<path>           leading axis 'layers' of size num_layers / p

A tree in either layout converts to the other with `to_looped` / `to_stacked`; the round trip
is exact (slicing and stacking copy values). `match_layout` converts a tree to the layout of
another (a checkpoint to the model being built), so a checkpoint written in one layout loads
into a model of the other. Only the decoder's subtree changes: the tree itself when it is a
decoder's (has `layers_{i}` / `stacked_layers` at its root), or any subtree under a key named
'decoder' (the multimodal model, t5x's train state, optimizer moments). The towers' own
`layers_{i}` are not touched.

Trees may be partial (any subset of a model's leaves, e.g. only the trainable ones, or a
checkpoint missing the LoRA matrices): a leaf is stacked when all its layers hold it, and
stacking one that only some layers hold is an error naming it.
"""

import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

STACKED = 'stacked_layers'
LAYERS_AXIS = 'layers'  # Logical axis name of the stacked axis (partitioning.py maps it).
DECODER_KEY = 'decoder'
_LOOPED = re.compile(r'^layers_(\d+)$')
_OFFSET = re.compile(r'^offset_(\d+)$')


def offset_name(r: int) -> str:
  return f'offset_{r}'


def _is_mapping(x) -> bool:
  return hasattr(x, 'items') and hasattr(x, 'keys')


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if _is_mapping(value):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: Dict[Tuple[str, ...], Any]) -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _stack(values: List[Any]):
  """Stacks one leaf's per-layer values on a new leading axis.

  numpy arrays stack with numpy (host checkpoints stay on the host), jax arrays with
  jax.numpy; ShapeDtypeStructs (abstract trees) gain the axis; Python scalars (a mask tree's
  bools) must agree across layers and stay one scalar.
  """
  first = values[0]
  if isinstance(first, (bool, int, float, str, type(None))):
    if any(v != first for v in values):
      raise ValueError(f'cannot stack differing per-layer values {values}')
    return first
  if hasattr(first, 'shape') and not hasattr(first, '__array__') and hasattr(first, 'dtype'):
    import jax  # pylint: disable=g-import-not-at-top

    return jax.ShapeDtypeStruct((len(values),) + tuple(first.shape), first.dtype)
  if all(isinstance(v, np.ndarray) or np.isscalar(v) for v in values):
    return np.stack(values)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  return jnp.stack(values)


def _slice(value, j: int):
  """Layer j of a stacked leaf (see `_stack` for the kinds of leaves)."""
  if isinstance(value, (bool, int, float, str, type(None))):
    return value
  if hasattr(value, 'shape') and not hasattr(value, '__array__') and hasattr(value, 'dtype'):
    import jax  # pylint: disable=g-import-not-at-top

    return jax.ShapeDtypeStruct(tuple(value.shape[1:]), value.dtype)
  return value[j]


def _num_blocks(value) -> Optional[int]:
  """The leading (stacked) size of an array-like leaf; None for a Python scalar."""
  if isinstance(value, (bool, int, float, str, type(None))):
    return None
  return int(value.shape[0]) if hasattr(value, 'shape') else int(np.shape(value)[0])


def looped_indices(decoder_tree) -> List[int]:
  return sorted(int(m.group(1)) for m in map(_LOOPED.match, decoder_tree) if m)


def is_stacked(decoder_tree) -> bool:
  return STACKED in decoder_tree


def stacked_period(decoder_tree) -> int:
  """p of a scanned decoder tree: the number of `offset_r` subtrees."""
  offsets = [int(m.group(1)) for m in map(_OFFSET.match, decoder_tree[STACKED]) if m]
  if sorted(offsets) != list(range(len(offsets))) or not offsets:
    raise ValueError(
        f'{STACKED} holds {sorted(decoder_tree[STACKED])}; expected ' 'offset_0 .. offset_{p-1}'
    )
  return len(offsets)


def _decoder_to_stacked(decoder, period: int, num_layers: Optional[int] = None):
  if is_stacked(decoder):
    if stacked_period(decoder) != period:
      return _decoder_to_stacked(_decoder_to_looped(decoder), period, num_layers)
    return decoder
  indices = looped_indices(decoder)
  if not indices:
    return decoder
  num_layers = num_layers or indices[-1] + 1
  beyond = [i for i in indices if i >= num_layers]
  if beyond:
    raise ValueError(f'cannot stack layers {beyond} into a decoder of {num_layers} layers')
  if num_layers % period:
    raise ValueError(f'cannot stack {num_layers} layers in blocks of {period}')
  blocks = num_layers // period
  out = {k: v for k, v in decoder.items() if not _LOOPED.match(k)}
  stacked: Dict[Tuple[str, ...], Any] = {}
  per_layer = {
      i: _flatten(decoder[f'layers_{i}']) if f'layers_{i}' in decoder else {}
      for i in range(num_layers)
  }
  for r in range(period):
    members = [j * period + r for j in range(blocks)]
    paths = sorted({p for i in members for p in per_layer[i]})
    for path in paths:
      holders = [i for i in members if path in per_layer[i]]
      if len(holders) != len(members):
        lacking = sorted(set(members) - set(holders))
        raise ValueError(
            f'cannot stack {"/".join(path)}: layers {lacking} lack it (held by '
            f'{holders}); every layer at offset {r} of a {period}-layer block '
            'must hold the same parameters'
        )
      stacked[(offset_name(r),) + path] = _stack([per_layer[i][path] for i in members])
  out[STACKED] = _unflatten(stacked)
  return out


def _decoder_to_looped(decoder):
  if not is_stacked(decoder):
    return decoder
  period = stacked_period(decoder)
  out = {k: v for k, v in decoder.items() if k != STACKED}
  looped: Dict[Tuple[str, ...], Any] = {}
  blocks = _stacked_blocks(decoder)
  for r in range(period):
    for path, value in _flatten(decoder[STACKED][offset_name(r)]).items():
      for j in range(blocks):
        looped[(f'layers_{j * period + r}',) + path] = _slice(value, j)
  out.update(_unflatten(looped))
  return out


def _stacked_blocks(decoder) -> int:
  """The length of the stacked axis (read from the first array leaf)."""
  for value in _flatten(decoder[STACKED]).values():
    blocks = _num_blocks(value)
    if blocks is not None:
      return blocks
  raise ValueError(f'{STACKED} holds no arrays: its number of blocks is unknown')


def _is_decoder(node) -> bool:
  return _is_mapping(node) and (STACKED in node or bool(looped_indices(node)))


def _root_is_decoder(tree) -> bool:
  """A decoder's own tree (not a model's holding one under 'decoder')."""
  return _is_mapping(tree) and (
      STACKED in tree or (bool(looped_indices(tree)) and DECODER_KEY not in tree)
  )


def _map_decoders(tree, fn):
  """Applies `fn` to the decoder subtree(s) of `tree` (see the module docstring)."""
  if _root_is_decoder(tree):
    return fn(tree)
  return _map_below(tree, fn)


def _map_below(tree, fn):
  if not _is_mapping(tree):
    return tree
  return {
      key: fn(value) if key == DECODER_KEY and _is_decoder(value) else _map_below(value, fn)
      for key, value in tree.items()
  }


def to_looped(tree):
  """`tree` with its decoder subtree(s) in the looped layout (a looped tree comes back as is)."""
  return _map_decoders(tree, _decoder_to_looped)


def to_stacked(tree, period: int, num_layers: Optional[int] = None):
  """`tree` with its decoder subtree(s) stacked in blocks of `period` layers.

  `num_layers` is needed only when a partial tree's last layers hold nothing.
  """
  return _map_decoders(tree, lambda d: _decoder_to_stacked(d, period, num_layers))


def to_config_layout(tree, decoder_config):
  """`tree` in the layout a model of `decoder_config` (a DecoderConfig) builds."""
  period = decoder_config.scan_period()
  if period is None:
    return to_looped(tree)
  return to_stacked(tree, period, decoder_config.num_layers)


def decoder_layouts(tree, prefix=()) -> Dict[Tuple[str, ...], Optional[Tuple[int, int]]]:
  """Path of each decoder subtree -> (period, blocks) when stacked, None when looped."""
  if not _is_mapping(tree):
    return {}
  if (not prefix and _root_is_decoder(tree)) or (
      prefix and prefix[-1] == DECODER_KEY and _is_decoder(tree)
  ):
    if is_stacked(tree):
      return {prefix: (stacked_period(tree), _stacked_blocks(tree))}
    return {prefix: None}
  out = {}
  for key, value in tree.items():
    out.update(decoder_layouts(value, prefix + (key,)))
  return out


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def match_layout(tree, like):
  """`tree` with each decoder subtree in the layout of the same subtree of `like`.

  `like` may hold arrays, ShapeDtypeStructs or flax boxes (only its structure is read).
  Decoder subtrees that `like` lacks keep their layout.
  """
  from flax.core import meta  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  like = jax.tree_util.tree_map(lambda x: x, meta.unbox(like)) if like is not None else like
  layouts = decoder_layouts(like)
  if not layouts:
    return tree
  if () in layouts:
    return _convert_to(tree, layouts[()])
  out = tree
  for path, layout in layouts.items():
    try:
      sub = _get(out, path)
    except (KeyError, TypeError):
      continue
    converted = _convert_to(sub, layout)
    out = _replace(out, path, converted)
  return out


def _convert_to(decoder, layout: Optional[Tuple[int, int]]):
  if layout is None:
    return _decoder_to_looped(decoder)
  period, blocks = layout
  return _decoder_to_stacked(decoder, period, period * blocks)


def _replace(tree, path, value):
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _replace(tree[path[0]], path[1:], value)
  return out


def looped_paths(path: Tuple[str, ...], period: int, num_blocks: int) -> List[str]:
  """The looped parameter paths ('/'-joined) that the stacked leaf at `path` holds.

  E.g. ('decoder', 'stacked_layers', 'offset_1', 'moe', 'router') with period 2 and 3 blocks:
  decoder/layers_1/moe/router, decoder/layers_3/moe/router, decoder/layers_5/moe/router.
  A path outside `stacked_layers` gives itself.
  """
  path = tuple(str(k) for k in path)
  if STACKED not in path:
    return ['/'.join(path)]
  at = path.index(STACKED)
  match = _OFFSET.match(path[at + 1]) if at + 1 < len(path) else None
  if match is None:
    raise ValueError(f'{"/".join(path)}: expected offset_<r> after {STACKED}')
  r = int(match.group(1))
  return [
      '/'.join(path[:at] + (f'layers_{j * period + r}',) + path[at + 2 :])
      for j in range(num_blocks)
  ]


def stacked_leaf_layout(params, path: Tuple[str, ...]) -> Optional[Tuple[int, int]]:
  """(period, blocks) of the stacked leaf at `path` of `params`, None for an unstacked one."""
  path = tuple(str(k) for k in path)
  if STACKED not in path:
    return None
  at = path.index(STACKED)
  stack = _get(params, path[: at + 1])
  period = len([k for k in stack if _OFFSET.match(k)])
  return period, _stacked_blocks(_get(params, path[:at]))
