"""Hugging Face LLaMA / Mixtral state dicts -> our decoder parameters (numpy, no torch).

A state dict here is a mapping from Hugging Face tensor names to numpy arrays (as
`safetensors.numpy.load_file` or `{k: v.numpy()}` gives). Torch `nn.Linear` stores
`[out, in]`; our kernels are `[in, out]` with heads split out. LLaMA on Hugging Face already
uses the "rotate half" rotary layout that `layers/attention.py` implements, so no permutation of
query/key rows is needed.
"""

from typing import Any, Dict, Mapping

import numpy as np

from unimoe_jax.config import DecoderConfig, MoEConfig
from unimoe_jax.convert.common import TensorReader, linear_kernel


def config_from_hf(hf: Mapping[str, Any], **overrides) -> DecoderConfig:
  """A DecoderConfig from a Hugging Face LLaMA or Mixtral `config.json` dict."""
  rope = hf.get('rope_parameters') or {}
  theta = rope.get('rope_theta', hf.get('rope_theta', 10000.0))
  heads = hf['num_attention_heads']
  moe = None
  if hf.get('num_local_experts'):
    moe = MoEConfig(num_experts=hf['num_local_experts'],
                    num_experts_per_tok=hf['num_experts_per_tok'],
                    router_jitter=hf.get('router_jitter_noise', 0.0) or 0.0,
                    load_balance_loss_coef=0.0)
  if hf.get('tie_word_embeddings'):
    raise ValueError('config_from_hf: tied input/output embeddings are not supported '
                     '(LLaMA and Mixtral checkpoints have an untied lm_head)')
  fields = dict(
      vocab_size=hf['vocab_size'], embed_dim=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      mlp_dim=hf['intermediate_size'], rope_theta=float(theta),
      rms_norm_eps=hf.get('rms_norm_eps', 1e-6), moe=moe)
  fields.update(overrides)
  return DecoderConfig(**fields)


def _mixtral_experts(r: TensorReader, prefix: str, cfg: DecoderConfig) -> Dict[str, np.ndarray]:
  """Experts in either layout: transformers>=5 fused `experts.gate_up_proj` / `down_proj`,
  or the original per-expert `experts.{e}.w1/w2/w3`."""
  e, d, f = cfg.moe.num_experts, cfg.embed_dim, cfg.mlp_dim
  if r.has(f'{prefix}.experts.gate_up_proj'):
    gate_up = r.pop(f'{prefix}.experts.gate_up_proj', (e, 2 * f, d))
    down = r.pop(f'{prefix}.experts.down_proj', (e, d, f))
    return {'wi_0': gate_up[:, :f].transpose(0, 2, 1), 'wi_1': gate_up[:, f:].transpose(0, 2, 1),
            'wo': down.transpose(0, 2, 1)}
  w1 = np.stack([r.pop(f'{prefix}.experts.{i}.w1.weight', (f, d)).T for i in range(e)])
  w3 = np.stack([r.pop(f'{prefix}.experts.{i}.w3.weight', (f, d)).T for i in range(e)])
  w2 = np.stack([r.pop(f'{prefix}.experts.{i}.w2.weight', (d, f)).T for i in range(e)])
  return {'wi_0': w1, 'wi_1': w3, 'wo': w2}


def decoder_params_from_hf(state_dict: Mapping[str, np.ndarray],
                           cfg: DecoderConfig) -> Dict[str, Any]:
  """Converts a LlamaForCausalLM / MixtralForCausalLM state dict into `Decoder` params.

  Raises ValueError naming every missing or unexpected tensor, or a tensor of the wrong shape.
  """
  r = TensorReader(state_dict, ignore_suffixes=('rotary_emb.inv_freq',))
  d, h, kv, hd, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.mlp_dim
  params: Dict[str, Any] = {
      'token_embedder': {'embedding': r.pop('model.embed_tokens.weight', (cfg.vocab_size, d))},
      'decoder_norm': {'scale': r.pop('model.norm.weight', (d,))},
      'logits_dense': {'kernel': linear_kernel(r.pop('lm_head.weight', (cfg.vocab_size, d)))},
  }
  moe_layers = set(cfg.moe_layer_indices())
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}'
    layer = {
        'pre_attention_norm': {'scale': r.pop(f'{p}.input_layernorm.weight', (d,))},
        'pre_mlp_norm': {'scale': r.pop(f'{p}.post_attention_layernorm.weight', (d,))},
        'attention': {
            'query': {'kernel': linear_kernel(r.pop(f'{p}.self_attn.q_proj.weight',
                                              (h * hd, d))).reshape(d, h, hd)},
            'key': {'kernel': linear_kernel(r.pop(f'{p}.self_attn.k_proj.weight',
                                            (kv * hd, d))).reshape(d, kv, hd)},
            'value': {'kernel': linear_kernel(r.pop(f'{p}.self_attn.v_proj.weight',
                                              (kv * hd, d))).reshape(d, kv, hd)},
            'out': {'kernel': linear_kernel(r.pop(f'{p}.self_attn.o_proj.weight',
                                            (d, h * hd))).reshape(h, hd, d)},
        },
    }
    if i in moe_layers:
      # transformers>=5 names the block `mlp`; older Mixtral checkpoints `block_sparse_moe`.
      prefix = f'{p}.mlp' if r.has(f'{p}.mlp.gate.weight') else f'{p}.block_sparse_moe'
      router = linear_kernel(r.pop(f'{prefix}.gate.weight', (cfg.moe.num_experts, d)))
      experts = _mixtral_experts(r, prefix, cfg)
      layer['moe'] = {'router': router, **{k: {'kernel': v} for k, v in experts.items()}}
    else:
      layer['mlp'] = {
          'wi_0': {'kernel': linear_kernel(r.pop(f'{p}.mlp.gate_proj.weight', (f, d)))},
          'wi_1': {'kernel': linear_kernel(r.pop(f'{p}.mlp.up_proj.weight', (f, d)))},
          'wo': {'kernel': linear_kernel(r.pop(f'{p}.mlp.down_proj.weight', (d, f)))},
      }
    params[f'layers_{i}'] = layer
  r.finish()
  return params
