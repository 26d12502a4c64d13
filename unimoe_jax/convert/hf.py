"""Hugging Face LLaMA / Mixtral state dicts <-> our decoder parameters (numpy, no torch).

A state dict here is a mapping from Hugging Face tensor names to numpy arrays (as
`safetensors.numpy.load_file` or `{k: v.numpy()}` gives). Torch `nn.Linear` stores
`[out, in]`; our kernels are `[in, out]` with heads split out. LLaMA on Hugging Face already
uses the "rotate half" rotary layout that `layers/attention.py` implements, so no permutation of
query/key rows is needed.

`tensor_table(cfg)` is the one name / layout table of both directions: the import below
(`decoder_params_from_hf`) and the export (`convert/export_hf.py`) read it. Its names are the
`save_pretrained` layout (what transformers 4 and 5 write and the Hub's Mixtral holds: per-expert
`block_sparse_moe.experts.{e}.w1/w2/w3`); the import also reads transformers 5's in-memory
names (`mlp.gate`, fused `mlp.experts.gate_up_proj` / `down_proj`) and `mlp.experts.{e}.w*`.
"""

import re
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from flax import traverse_util
import numpy as np

from unimoe_jax.config import DecoderConfig, MoEConfig
from unimoe_jax.convert.common import TensorReader, fields_from_hf

# DecoderConfig field -> LLaMA / Mixtral config.json key, both directions (export_hf.hf_config).
DECODER_FIELDS = {
    'vocab_size': 'vocab_size',
    'embed_dim': 'hidden_size',
    'num_layers': 'num_hidden_layers',
    'num_heads': 'num_attention_heads',
    'mlp_dim': 'intermediate_size',
    'rms_norm_eps': 'rms_norm_eps',
}


def config_from_hf(hf: Mapping[str, Any], **overrides) -> DecoderConfig:
  """A DecoderConfig from a Hugging Face LLaMA or Mixtral `config.json` dict."""
  rope = hf.get('rope_parameters') or {}
  theta = rope.get('rope_theta', hf.get('rope_theta', 10000.0))
  heads = hf['num_attention_heads']
  moe = None
  if hf.get('num_local_experts'):
    moe = MoEConfig(
        num_experts=hf['num_local_experts'],
        num_experts_per_tok=hf['num_experts_per_tok'],
        router_jitter=hf.get('router_jitter_noise', 0.0) or 0.0,
        load_balance_loss_coef=0.0,
    )
  if hf.get('tie_word_embeddings'):
    raise ValueError(
        'config_from_hf: tied input/output embeddings are not supported '
        '(LLaMA and Mixtral checkpoints have an untied lm_head)'
    )
  fields = dict(
      fields_from_hf(hf, DECODER_FIELDS, {'rms_norm_eps': 1e-6}),
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      rope_theta=float(theta),
      moe=moe,
  )
  return DecoderConfig(**{**fields, **overrides})


class Entry(NamedTuple):
  """One Hugging Face tensor and where it lives in our decoder tree.

  `linear`: a torch Linear weight `hf_shape = [out, in]`, ours its transpose reshaped to
  `our_shape` (heads split out); otherwise the values are copied. `expert`: the tensor is slice
  `expert` of our stacked `[expert, in, out]` kernel (`our_shape` is that slice's shape).
  """

  hf: str
  ours: Tuple[str, ...]
  hf_shape: Tuple[int, ...]
  our_shape: Tuple[int, ...]
  linear: bool
  expert: Optional[int] = None

  def to_ours(self, value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.T).reshape(self.our_shape) if self.linear else value

  def to_hf(self, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if self.expert is not None:
      value = value[self.expert]
    if not self.linear:
      return value
    return np.ascontiguousarray(value.reshape(self.hf_shape[::-1]).T)


# Our projection name <-> the Hugging Face module name.
ATTENTION_MODULES = {'query': 'q_proj', 'key': 'k_proj', 'value': 'v_proj', 'out': 'o_proj'}
MLP_MODULES = {'wi_0': 'gate_proj', 'wi_1': 'up_proj', 'wo': 'down_proj'}
EXPERT_MODULES = {'wi_0': 'w1', 'wi_1': 'w3', 'wo': 'w2'}


def tensor_table(cfg: DecoderConfig) -> List[Entry]:
  """Every tensor of a LlamaForCausalLM / MixtralForCausalLM of `cfg`, in our tree's order."""
  d, h, kv, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim
  hd = cfg.resolved_head_dim
  v = cfg.vocab_size
  table = [
      Entry('model.embed_tokens.weight', ('token_embedder', 'embedding'), (v, d), (v, d), False),
      Entry('model.norm.weight', ('decoder_norm', 'scale'), (d,), (d,), False),
      Entry('lm_head.weight', ('logits_dense', 'kernel'), (v, d), (d, v), True),
  ]
  attention = {
      'query': ((h * hd, d), (d, h, hd)),
      'key': ((kv * hd, d), (d, kv, hd)),
      'value': ((kv * hd, d), (d, kv, hd)),
      'out': ((d, h * hd), (h, hd, d)),
  }
  mlp = {'wi_0': ((f, d), (d, f)), 'wi_1': ((f, d), (d, f)), 'wo': ((d, f), (f, d))}
  moe_layers = set(cfg.moe_layer_indices())
  for i in range(cfg.num_layers):
    p, ours = f'model.layers.{i}', f'layers_{i}'
    table += [
        Entry(
            f'{p}.input_layernorm.weight', (ours, 'pre_attention_norm', 'scale'), (d,), (d,), False
        ),
        Entry(
            f'{p}.post_attention_layernorm.weight',
            (ours, 'pre_mlp_norm', 'scale'),
            (d,),
            (d,),
            False,
        ),
    ]
    table += _linear_entries(f'{p}.self_attn', (ours, 'attention'), ATTENTION_MODULES, attention)
    if i in moe_layers:
      e = cfg.moe.num_experts
      table.append(
          Entry(f'{p}.block_sparse_moe.gate.weight', (ours, 'moe', 'router'), (e, d), (d, e), True)
      )
      for x in range(e):
        experts = f'{p}.block_sparse_moe.experts.{x}'
        table += _linear_entries(experts, (ours, 'moe'), EXPERT_MODULES, mlp, expert=x)
    else:
      table += _linear_entries(f'{p}.mlp', (ours, 'mlp'), MLP_MODULES, mlp)
  return table


def _linear_entries(
    hf_module: str,
    our_module: Tuple[str, ...],
    hf_names: Mapping[str, str],
    shapes: Mapping[str, Tuple[Tuple[int, ...], Tuple[int, ...]]],
    expert: Optional[int] = None,
) -> List[Entry]:
  """The Linear weights `{hf_module}.{hf_names[ours]}.weight` <-> `our_module + (ours,
  'kernel')`, for each `ours: (hf_shape, our_shape)` of `shapes`, in that order."""
  return [
      Entry(
          f'{hf_module}.{hf_names[name]}.weight',
          our_module + (name, 'kernel'),
          hf_shape,
          our_shape,
          True,
          expert,
      )
      for name, (hf_shape, our_shape) in shapes.items()
  ]


class _Slice:
  """A lazily read slice of a (possibly lazy) tensor, with its shape known up front."""

  def __init__(self, source, index, shape):
    self.source, self.index, self.shape = source, index, tuple(shape)
    self.ndim = len(self.shape)

  def __array__(self, dtype=None, copy=None):
    del copy
    value = np.asarray(self.source)[self.index]
    return value if dtype is None else value.astype(dtype)


_MOE_MLP = re.compile(r'^(model\.layers\.\d+)\.mlp\.(gate\.weight|experts\.)')
_FUSED = re.compile(
    r'^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.' r'(gate_up_proj|down_proj)$'
)


def _canonical(state_dict: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, str], bool]:
  """(the state dict under `tensor_table` names, canonical -> source name of those renamed,
  whether the source spells the MoE block `mlp`)."""
  out: Dict[str, Any] = {}
  renamed: Dict[str, str] = {}
  mlp_style = False
  for name in state_dict:
    value = state_dict[name]
    fused = _FUSED.match(name)
    if fused:  # transformers 5: [expert, 2 * ffn, embed] gate|up, [expert, embed, ffn] down.
      mlp_style = mlp_style or '.mlp.' in name
      p, kind = fused.groups()
      shape = tuple(value.shape)
      if len(shape) != 3 or (kind == 'gate_up_proj' and shape[1] % 2):
        raise ValueError(f'{name}: unexpected shape {shape}')
      for x in range(shape[0]):
        parts = (
            [('w1', np.s_[x, : shape[1] // 2]), ('w3', np.s_[x, shape[1] // 2 :])]
            if kind == 'gate_up_proj'
            else [('w2', np.s_[x])]
        )
        for module, index in parts:
          new = f'{p}.block_sparse_moe.experts.{x}.{module}.weight'
          sliced_shape = (
              (shape[1] // 2, shape[2]) if kind == 'gate_up_proj' else (shape[1], shape[2])
          )
          out[new] = _Slice(value, index, sliced_shape)
          renamed[new] = f'{name}[{x}]'
      continue
    new = _MOE_MLP.sub(r'\1.block_sparse_moe.\2', name)
    if new != name:
      mlp_style = True
      renamed[new] = name
    out[new] = value
  return out, renamed, mlp_style


def decoder_params_from_hf(
    state_dict: Mapping[str, np.ndarray], cfg: DecoderConfig
) -> Dict[str, Any]:
  """Converts a LlamaForCausalLM / MixtralForCausalLM state dict into `Decoder` params.

  Raises ValueError naming every missing or unexpected tensor, or a tensor of the wrong shape.
  """
  sd, renamed, mlp_style = _canonical(state_dict)
  r = TensorReader(sd, ignore_suffixes=('rotary_emb.inv_freq',))
  flat: Dict[Tuple[str, ...], Any] = {}
  experts: Dict[Tuple[str, ...], Dict[int, np.ndarray]] = {}
  try:
    for entry in tensor_table(cfg):
      value = entry.to_ours(r.pop(entry.hf, entry.hf_shape))
      if entry.expert is None:
        flat[entry.ours] = value
      else:
        experts.setdefault(entry.ours, {})[entry.expert] = value
    r.finish()
  except ValueError as e:
    message = str(e)
    for new, old in renamed.items():
      message = re.sub(re.escape(new) + r'(?!\d)', old, message)
    if mlp_style:
      message = message.replace('.block_sparse_moe.', '.mlp.')
    raise ValueError(message) from None
  for path, slices in experts.items():
    flat[path] = np.stack([slices[x] for x in range(len(slices))])
  return traverse_util.unflatten_dict(flat)
