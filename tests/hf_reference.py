"""Tiny random Hugging Face models built locally (no download), as numerical references."""

import functools
import json
import os

import numpy as np
import pytest


def torch_and_transformers():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  return torch, transformers


def state_dict_numpy(model):
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


_TINY_CONFIGS = os.path.join(os.path.dirname(__file__), 'testdata', 'hf_tiny_configs.json')


@functools.lru_cache(maxsize=None)
def _tiny_configs():
  with open(_TINY_CONFIGS) as f:
    return json.load(f)


def tiny_config(name, **overrides):
  """Keyword arguments of a transformers config class: entry `name` of
  testdata/hf_tiny_configs.json (its '_' keys, notes, dropped), then `overrides`."""
  entry = _tiny_configs()[name]
  return dict({k: v for k, v in entry.items() if not k.startswith('_')}, **overrides)


# The sizes every tiny decoder of the tests shares (LLaMA, Mixtral, LLaVA's language model).
TINY_DECODER = tiny_config('llama_decoder')


def _tiny_causal_lm(architecture, overrides, **sizes):
  """(transformers `{architecture}ForCausalLM` of TINY_DECODER's and `sizes`' sizes, in eval
  mode with eager attention, its config); `overrides` win over both."""
  _, transformers = torch_and_transformers()
  cfg = dict(TINY_DECODER, max_position_embeddings=128, attn_implementation='eager', **sizes)
  cfg.update(overrides)
  config = getattr(transformers, f'{architecture}Config')(**cfg)
  return getattr(transformers, f'{architecture}ForCausalLM')(config).eval(), config


def tiny_llama(**overrides):
  return _tiny_causal_lm('Llama', overrides, intermediate_size=96)


def tiny_mixtral(**overrides):
  torch, _ = torch_and_transformers()
  model, config = _tiny_causal_lm(
      'Mixtral',
      overrides,
      intermediate_size=48,
      num_local_experts=4,
      num_experts_per_tok=2,
      router_jitter_noise=0.0,
  )
  # transformers 5 creates expert tensors with torch.empty; give every tensor real values.
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() > 1:
        p.normal_(0.0, 0.1)
  return model, config


def randomize(model, seed=1):
  """Every parameter of `model` drawn from normal(0, 0.1) under torch seed `seed`, in place (a
  freshly initialised model's zero biases and unit norms would hide layout mistakes)."""
  torch, _ = torch_and_transformers()
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.1)
  return model


def logits(model, tokens):
  torch, _ = torch_and_transformers()
  with torch.no_grad():
    return model(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
