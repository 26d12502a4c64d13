"""Tiny random Hugging Face models built locally (no download), as numerical references."""

import numpy as np
import pytest


def torch_and_transformers():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  return torch, transformers


def state_dict_numpy(model):
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


# The sizes every tiny decoder of the tests shares (LLaMA, Mixtral, LLaVA's language model).
TINY_DECODER = dict(
    vocab_size=97,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=5000.0,
    tie_word_embeddings=False,
)


def tiny_llama(**overrides):
  torch, transformers = torch_and_transformers()
  cfg = dict(
      TINY_DECODER,
      intermediate_size=96,
      max_position_embeddings=128,
      attn_implementation='eager',
  )
  cfg.update(overrides)
  config = transformers.LlamaConfig(**cfg)
  model = transformers.LlamaForCausalLM(config).eval()
  return model, config


def tiny_mixtral(**overrides):
  torch, transformers = torch_and_transformers()
  cfg = dict(
      TINY_DECODER,
      intermediate_size=48,
      max_position_embeddings=128,
      num_local_experts=4,
      num_experts_per_tok=2,
      router_jitter_noise=0.0,
      attn_implementation='eager',
  )
  cfg.update(overrides)
  config = transformers.MixtralConfig(**cfg)
  model = transformers.MixtralForCausalLM(config).eval()
  # transformers 5 creates expert tensors with torch.empty; give every tensor real values.
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() > 1:
        p.normal_(0.0, 0.1)
  return model, config


def logits(model, tokens):
  torch, _ = torch_and_transformers()
  with torch.no_grad():
    return model(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
