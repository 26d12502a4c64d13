"""A float64 numpy transcription of official Uni-MoE's audio path, for tests.

Written from the official code (github HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs,
`Uni_MoE/Uni_MoE_audio/`): the chunking and padding loop of `train/data.py` /
`inference_all.py`, `BEATsProcessor` (audio_encoder/BEATs.py), `BEATs.extract_features` with
its `forward_padding_mask`, the fairseq-style encoder of audio_encoder/backbone.py, the
`Blip2QFormerModel` that audio_aligner/Qformer.py runs with an all-ones encoder mask, and the
aligner's linear projector. Weights are official-layout state dicts (tensor name -> numpy);
nothing here uses unimoe_jax except the Kaldi filterbank (`media.audio.kaldi_fbank`, checked
against torchaudio's algorithm in tests/media_test.py).
"""

import math
from typing import Dict, List, Mapping, Tuple

import numpy as np
from scipy import special

from unimoe_jax.media import audio as audio_lib

CHUNK = 480000
TRUNCLEN = 20
FBANK_MEAN, FBANK_STD = 15.41663, 6.55582


# ---------------------------------------------------------------------------------------------
# Data: official `train/data.py` / `inference_all.py`.


def official_chunks(sample: np.ndarray) -> List[Tuple[np.ndarray, np.ndarray]]:
  """(480000-sample wave, [480000] bool padding mask, True = padding) per chunk kept."""
  tmp = np.asarray(sample, np.float32)
  out = []
  taken = 0
  while len(tmp) > 0:
    if taken >= TRUNCLEN:
      break
    if len(tmp) > CHUNK:
      chunk, tmp = tmp[:CHUNK], tmp[CHUNK:]
      out.append((chunk, np.zeros(CHUNK, bool)))
    else:
      pad = np.concatenate([tmp, np.full(CHUNK - len(tmp), tmp[-1], np.float32)])
      mask = np.concatenate([np.zeros(len(tmp), bool), np.ones(CHUNK - len(tmp), bool)])
      out.append((pad, mask))
      tmp = tmp[:0]
    taken += 1
  return out


def beats_processor(wave: np.ndarray) -> np.ndarray:
  """`BEATsProcessor` for one wave: kaldi fbank of wave * 2**15 (128 bins, 25 / 10 ms),
  normalised. `[frames, 128]` float64."""
  fbank = audio_lib.kaldi_fbank(
      np.asarray(wave, np.float64) * 2.0**15,
      num_mel_bins=128,
      sample_rate=16000,
      frame_length_ms=25.0,
      frame_shift_ms=10.0,
  )
  return (fbank.astype(np.float64) - FBANK_MEAN) / (2 * FBANK_STD)


# ---------------------------------------------------------------------------------------------
# BEATs (`extract_features(fbank, padding_mask)[0]`, inference mode).


def _layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / math.sqrt(2.0)))


def _linear(sd, name, x):
  return x @ sd[name + '.weight'].T + sd[name + '.bias']


def forward_padding_mask(length: int, padding_mask: np.ndarray) -> np.ndarray:
  """`BEATs.forward_padding_mask`: cut the tail to a multiple of `length`, view as `length`
  runs, a run is padding iff all of it is."""
  extra = padding_mask.shape[1] % length
  if extra > 0:
    padding_mask = padding_mask[:, :-extra]
  return padding_mask.reshape(padding_mask.shape[0], length, -1).all(-1)


def _relative_bucket(rel: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
  """`MultiheadAttention._relative_positions_bucket(bidirectional=True)`, float32 like torch."""
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  with np.errstate(divide='ignore'):
    large = max_exact + (
        np.log(rel.astype(np.float32) / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(half - max_exact)
    )
  large = np.where(rel < max_exact, 0, large).astype(np.int64)
  large = np.minimum(large, half - 1)
  return buckets + np.where(rel < max_exact, rel, large)


def beats(
    sd: Mapping[str, np.ndarray], cfg: Mapping, fbank: np.ndarray, padding_mask: np.ndarray
) -> np.ndarray:
  """`[batch, frames, 128]` fbank + `[batch, n]` padding mask -> `[batch, tokens, width]`.

  Covers the post-LN deep-norm configuration of BEATs iter3 (the one Uni-MoE loads)."""
  assert not cfg['layer_norm_first'] and cfg['relative_position_embedding']
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  fbank = np.asarray(fbank, np.float64)
  b, t, m = fbank.shape
  frame_pad = forward_padding_mask(t, padding_mask)
  # patch_embedding: Conv2d(1, embed, k=p, stride=p) over [frames, mel]; reshape(B, C, -1).
  p = cfg['input_patch_size']
  tp, mp = t // p, m // p
  patches = fbank[:, : tp * p, : mp * p].reshape(b, tp, p, mp, p).transpose(0, 1, 3, 2, 4)
  w = sd['patch_embedding.weight'][:, 0]  # [embed, p (time), p (mel)]
  x = np.einsum('btfuv,euv->btfe', patches, w).reshape(b, tp * mp, -1)
  if cfg.get('conv_bias'):
    x = x + sd['patch_embedding.bias']
  x = _layer_norm(x, sd['layer_norm.weight'], sd['layer_norm.bias'], 1e-5)
  n = x.shape[1]
  token_pad = forward_padding_mask(n, frame_pad)
  if 'post_extract_proj.weight' in sd:
    x = _linear(sd, 'post_extract_proj', x)
  d = x.shape[-1]

  # TransformerEncoder.extract_features: x[padding_mask] = 0; pos_conv; + x; layer_norm.
  x = np.where(token_pad[..., None], 0.0, x)
  k, g = cfg['conv_pos'], cfg['conv_pos_groups']
  v, gain = sd['encoder.pos_conv.0.weight_v'], sd['encoder.pos_conv.0.weight_g']
  weight = gain * v / np.sqrt((v**2).sum(axis=(0, 1), keepdims=True))  # weight_norm dim=2
  xp = np.pad(x, ((0, 0), (k // 2, k // 2), (0, 0)))
  out_len = n + 2 * (k // 2) - k + 1
  cg = d // g
  conv = np.zeros((b, out_len, d))
  for grp in range(g):
    ins = slice(grp * cg, (grp + 1) * cg)
    for tap in range(k):
      conv[:, :, ins] += xp[:, tap : tap + out_len, ins] @ weight[ins, :, tap].T
  conv += sd['encoder.pos_conv.0.bias']
  if k % 2 == 0:  # SamePad drops the last output.
    conv = conv[:, :-1]
  x = x + _gelu(conv)
  x = _layer_norm(x, sd['encoder.layer_norm.weight'], sd['encoder.layer_norm.bias'], 1e-5)

  h = cfg['encoder_attention_heads']
  hd = d // h
  rel = np.arange(n)[None, :] - np.arange(n)[:, None]  # memory - context
  table = sd['encoder.layers.0.self_attn.relative_attention_bias.weight']
  position_bias = table[_relative_bucket(rel, cfg['num_buckets'], cfg['max_distance'])]
  position_bias = position_bias.transpose(2, 0, 1)  # [heads, query, key]
  alpha = (2 * cfg['encoder_layers']) ** 0.25 if cfg['deep_norm'] else 1.0
  for i in range(cfg['encoder_layers']):
    pre = f'encoder.layers.{i}'
    q = _linear(sd, f'{pre}.self_attn.q_proj', x).reshape(b, n, h, hd).transpose(0, 2, 1, 3)
    kk = _linear(sd, f'{pre}.self_attn.k_proj', x).reshape(b, n, h, hd).transpose(0, 2, 1, 3)
    vv = _linear(sd, f'{pre}.self_attn.v_proj', x).reshape(b, n, h, hd).transpose(0, 2, 1, 3)
    logits = (q * hd**-0.5) @ kk.transpose(0, 1, 3, 2)  # [b, h, q, k]
    logits = np.where(token_pad[:, None, None, :], -np.inf, logits)
    bias = position_bias[None]
    if cfg['gru_rel_pos']:
      gates = _linear(sd, f'{pre}.self_attn.grep_linear', q).reshape(b, h, n, 2, 4).sum(-1)
      gates = 1.0 / (1.0 + np.exp(-gates))
      gate_a, gate_b = gates[..., 0], gates[..., 1]
      grep_a = sd[f'{pre}.self_attn.grep_a'].reshape(1, h, 1)
      bias = (gate_a * (gate_b * grep_a - 1.0) + 2.0)[..., None] * bias
    logits = logits + bias
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = (probs @ vv).transpose(0, 2, 1, 3).reshape(b, n, d)
    attn = _linear(sd, f'{pre}.self_attn.out_proj', attn)
    x = _layer_norm(
        x * alpha + attn,
        sd[f'{pre}.self_attn_layer_norm.weight'],
        sd[f'{pre}.self_attn_layer_norm.bias'],
        1e-5,
    )
    ffn = _linear(sd, f'{pre}.fc2', _gelu(_linear(sd, f'{pre}.fc1', x)))
    x = _layer_norm(
        x * alpha + ffn,
        sd[f'{pre}.final_layer_norm.weight'],
        sd[f'{pre}.final_layer_norm.bias'],
        1e-5,
    )
  return x


# ---------------------------------------------------------------------------------------------
# Q-Former (transformers `Blip2QFormerModel(query_embeds=..., encoder_hidden_states=...,
# encoder_attention_mask=ones)`, query tokens only) and the aligner's projector.


def _bert_attention(sd, name, x, kv, heads, eps):
  b, nq, d = x.shape
  hd = d // heads
  split = lambda y: y.reshape(b, -1, heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
  q = split(_linear(sd, f'{name}.attention.query', x))
  k = split(_linear(sd, f'{name}.attention.key', kv))
  v = split(_linear(sd, f'{name}.attention.value', kv))
  scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)  # all-ones mask: nothing added
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, nq, d)
  out = _linear(sd, f'{name}.output.dense', ctx)
  return _layer_norm(
      out + x, sd[f'{name}.output.LayerNorm.weight'], sd[f'{name}.output.LayerNorm.bias'], eps
  )


def qformer(
    sd: Mapping[str, np.ndarray],
    states: np.ndarray,
    query_tokens: np.ndarray,
    num_layers: int,
    heads: int,
    cross_attention_frequency: int = 2,
    eps: float = 1e-12,
) -> np.ndarray:
  """`[batch, tokens, width]` encoder states -> `[batch, num_query, hidden]` last_hidden_state."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  states = np.asarray(states, np.float64)
  query = np.asarray(query_tokens, np.float64).reshape(1, -1, sd['layernorm.weight'].shape[0])
  x = _layer_norm(
      np.repeat(query, states.shape[0], 0), sd['layernorm.weight'], sd['layernorm.bias'], eps
  )
  for i in range(num_layers):
    pre = f'encoder.layer.{i}'
    x = _bert_attention(sd, f'{pre}.attention', x, x, heads, eps)
    if i % cross_attention_frequency == 0:
      x = _bert_attention(sd, f'{pre}.crossattention', x, states, heads, eps)
    hidden = _gelu(_linear(sd, f'{pre}.intermediate_query.dense', x))
    x = _layer_norm(
        _linear(sd, f'{pre}.output_query.dense', hidden) + x,
        sd[f'{pre}.output_query.LayerNorm.weight'],
        sd[f'{pre}.output_query.LayerNorm.bias'],
        eps,
    )
  return x


def soft_tokens(
    sample: np.ndarray,
    beats_sd,
    beats_cfg,
    qformer_sd,
    query_tokens,
    projector: Dict[str, np.ndarray],
    qformer_layers: int,
    qformer_heads: int,
) -> np.ndarray:
  """Official `encode_audios` over every kept chunk of one file, concatenated as
  `prepare_inputs_labels_for_audio_and_vision` does: `[chunks * num_query, llm_width]`."""
  outs = []
  for wave, mask in official_chunks(sample):
    fbank = beats_processor(wave)[None]
    states = beats(beats_sd, beats_cfg, fbank, mask[None])
    q = qformer(qformer_sd, states, query_tokens, qformer_layers, qformer_heads)
    outs.append(q[0] @ np.asarray(projector['weight'], np.float64).T + projector['bias'])
  return np.concatenate(outs, 0)


def beats_state_dict_shapes(cfg: Mapping) -> Dict[str, Tuple[int, ...]]:
  """Name -> shape of every tensor of official `BEATs(cfg).state_dict()` but the relative
  position table (`encoder.layers.<i>.self_attn.relative_attention_bias.weight`)."""
  e, d, f = cfg['embed_dim'], cfg['encoder_embed_dim'], cfg['encoder_ffn_embed_dim']
  h, k, g, p = (
      cfg['encoder_attention_heads'],
      cfg['conv_pos'],
      cfg['conv_pos_groups'],
      cfg['input_patch_size'],
  )
  shapes = {
      'patch_embedding.weight': (e, 1, p, p),
      'layer_norm.weight': (e,),
      'layer_norm.bias': (e,),
      'encoder.pos_conv.0.bias': (d,),
      'encoder.pos_conv.0.weight_g': (1, 1, k),
      'encoder.pos_conv.0.weight_v': (d, d // g, k),
      'encoder.layer_norm.weight': (d,),
      'encoder.layer_norm.bias': (d,),
  }
  if cfg['conv_bias']:
    shapes['patch_embedding.bias'] = (e,)
  if e != d:
    shapes.update({'post_extract_proj.weight': (d, e), 'post_extract_proj.bias': (d,)})
  for i in range(cfg['encoder_layers']):
    pre = f'encoder.layers.{i}'
    for proj in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
      shapes.update(
          {f'{pre}.self_attn.{proj}.weight': (d, d), f'{pre}.self_attn.{proj}.bias': (d,)}
      )
    if cfg['gru_rel_pos']:
      shapes.update(
          {
              f'{pre}.self_attn.grep_linear.weight': (8, d // h),
              f'{pre}.self_attn.grep_linear.bias': (8,),
              f'{pre}.self_attn.grep_a': (1, h, 1, 1),
          }
      )
    for norm in ('self_attn_layer_norm', 'final_layer_norm'):
      shapes.update({f'{pre}.{norm}.weight': (d,), f'{pre}.{norm}.bias': (d,)})
    shapes.update(
        {
            f'{pre}.fc1.weight': (f, d),
            f'{pre}.fc1.bias': (f,),
            f'{pre}.fc2.weight': (d, f),
            f'{pre}.fc2.bias': (d,),
        }
    )
  return shapes
