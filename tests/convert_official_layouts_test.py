"""Every released official Uni-MoE v1 layout converts (tools/convert_checkpoint.py --source unimoe)
and gives the official model's logits.

Layouts, each written as the release splits it (a base model directory for --base, the LoRA run's
directory for --input, the 8e expert set for --expert_dir) with the official tensor names:

  speech     Uni_MoE_speech: 4 experts (MoeLayer) on every layer.
  audio      Uni_MoE_audio: 4 experts on layers 0, 2, ..., dense LlamaMLP on the odd ones.
  speech_dp  Uni_MoE_speech_dp: as audio (its train.py keeps PEFT off the dense gate_proj).
  8e         Uni_MoE_8e: DeepSpeed MoE (8 experts, fp32 `deepspeed_moe.gate.wg`) on the layers
             config.json moe_type 'sparse' / moe_stride 2 selects, LlamaMLPLoRA everywhere
             (loralib adapters inside experts and dense FFNs, PEFT adapters on the loralib Linears
             too), experts from `{n}_mlp_experts.bin` updated by the expert set (8 FFNs from 6
             files), the dense base FFNs of MoE layers in the base.

The reference (`official_logits`) is a float64 numpy transcription of the official forward
(modeling_llama.py / modeling_llama_dp.py, moe.py `MoeLayer`, moe_dp.py `top2gating`,
llama_mlp.py `LlamaMLPLoRA`, PEFT LoRA unmerged), computed from the tensors the official loader
assembles, not from the files.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimoe_jax import checkpoints
from unimoe_jax.decoder import Decoder
from unimoe_jax.moe import routing
from official_reference import EXPERT_SET
from tool_runs import run_convert

VOCAB, D, HEADS, LAYERS, F = 80, 32, 4, 4, 48
RANK, ALPHA = 4, 8.0  # PEFT adapter_config.json
EPS = 1e-5  # config.json rms_norm_eps (ours defaults to 1e-6)
TOL = 1e-4  # float32
PROJ = ('gate_proj', 'up_proj', 'down_proj')
TOKENS = np.array(
    [[1, 17, 5, 33, 60, 2, 41, 9, 77, 12, 28, 3], [1, 44, 8, 19, 70, 55, 6, 31, 2, 64, 23, 11]],
    np.int32,
)


def _shape(proj):
  return (D, F) if proj == 'down_proj' else (F, D)


class Model:
  """The tensors the official loader assembles (logical names, adapters unmerged), the layout
  and the adapter scales: what `official_logits` runs."""

  def __init__(self, variant, seed=0, loralib_alpha=ALPHA, dense_loralib=True):
    self.variant = variant
    self.deepspeed = variant == '8e'
    self.experts = 8 if self.deepspeed else 4
    self.moe = set(range(LAYERS)) if variant == 'speech' else set(range(0, LAYERS, 2))
    self.peft_scale = ALPHA / RANK
    self.loralib_scale = loralib_alpha / RANK
    self.loralib_alpha = loralib_alpha
    self.dense_loralib = dense_loralib and self.deepspeed
    rng = np.random.default_rng(seed)
    self.rng = rng

    def w(*shape, scale=0.2):
      return rng.normal(0, scale, shape).astype(np.float32)

    t = {
        'model.embed_tokens.weight': w(VOCAB, D, scale=1.0),
        'model.norm.weight': 1 + w(D, scale=0.1),
        'lm_head.weight': w(VOCAB, D),
    }
    self.peft = {}  # module -> (A [r, in], B [out, r])
    self.loralib = {}  # module (…{proj}) -> (A, B), scale loralib_scale
    for i in range(LAYERS):
      p = f'model.layers.{i}'
      t[f'{p}.input_layernorm.weight'] = 1 + w(D, scale=0.1)
      t[f'{p}.post_attention_layernorm.weight'] = 1 + w(D, scale=0.1)
      for proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
        t[f'{p}.self_attn.{proj}.weight'] = w(D, D)
        self.peft[f'{p}.self_attn.{proj}'] = (w(RANK, D), w(D, RANK))
      if i in self.moe:
        gate = f'{p}.mlp.deepspeed_moe.gate.wg' if self.deepspeed else f'{p}.mlp.gate'
        t[f'{gate}.weight'] = w(self.experts, D, scale=0.5)
        for e in range(self.experts):
          ep = (
              f'{p}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}'
              if self.deepspeed
              else f'{p}.mlp.experts.{e}'
          )
          for proj in PROJ:
            t[f'{ep}.{proj}.weight'] = w(*_shape(proj))
            out, inp = _shape(proj)
            if self.deepspeed:  # loralib inside each DeepSpeed expert; no PEFT there.
              self.loralib[f'{ep}.{proj}'] = (w(RANK, inp), w(out, RANK))
            else:
              self.peft[f'{ep}.{proj}'] = (w(RANK, inp), w(out, RANK))
      else:
        for proj in PROJ:
          t[f'{p}.mlp.{proj}.weight'] = w(*_shape(proj))
          out, inp = _shape(proj)
          if not (variant == 'speech_dp' and proj == 'gate_proj'):  # 'mlp.gate' keyword.
            self.peft[f'{p}.mlp.{proj}'] = (w(RANK, inp), w(out, RANK))
          if self.dense_loralib:
            a, b = w(RANK, inp), w(out, RANK)
            self.loralib[f'{p}.mlp.{proj}'] = (a, b)
            # PEFT adapts the loralib Linears of a dense LlamaMLPLoRA too (8e train.py).
            self.peft[f'{p}.mlp.{proj}_lora_A'] = (w(RANK, inp), w(RANK, RANK))
            self.peft[f'{p}.mlp.{proj}_lora_B'] = (w(RANK, RANK), w(out, RANK))
    self.t = t

  def config(self):
    cfg = dict(
        architectures=['LlavaLlamaForCausalLM'],
        model_type='llava',
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        hidden_act='silu',
        max_position_embeddings=64,
        rms_norm_eps=EPS,
        rope_scaling=None,
        rope_theta=5000.0,  # Ignored by the official rotary embedding (always 10000).
        tie_word_embeddings=False,
        torch_dtype='bfloat16',
        pretraining_tp=1,
        moe={'enabled': True},
        num_experts=self.experts,
        num_experts_per_tok=2,
    )
    if self.deepspeed:
      cfg.update(
          moe_type='sparse',
          moe_stride=2,
          ep_size=8,
          capacity_factor=1.5,
          lora_r=RANK,
          lora_alpha=self.loralib_alpha,
          lora_dropout=0.05,
          use_fm_block=False,
          aux_balance_loss=True,
          aux_balance_loss_coef=0.01,
          aux_multimodal_loss=False,
          aux_kl_loss=False,
      )
    return cfg


# ---------------------------------------------------------------------------------------------
# The official computation, float64.


def _lin(m, module, x):
  """PEFT-wrapped nn.Linear (no bias): W x + scale · B A x."""
  y = x @ m.t[f'{module}.weight'].astype(np.float64).T
  if module in m.peft:
    a, b = m.peft[module]
    y = y + m.peft_scale * (x @ a.T.astype(np.float64)) @ b.T.astype(np.float64)
  return y


def _proj(m, module, x):
  """One projection of LlamaMLPLoRA / LlamaMLP: the Linear plus loralib's B(A(x)) · scaling."""
  y = _lin(m, module, x)
  if module in m.loralib:
    if m.deepspeed and f'{module}_lora_A.weight' in m.t:
      inner = _lin(m, f'{module}_lora_A', x)
      y = y + m.loralib_scale * _lin(m, f'{module}_lora_B', inner)
    else:
      a, b = m.loralib[module]
      y = y + m.loralib_scale * (x @ a.T.astype(np.float64)) @ b.T.astype(np.float64)
  return y


def _mlp(m, prefix, x):
  silu = lambda v: v / (1 + np.exp(-v))  # pylint: disable=unnecessary-lambda-assignment
  h = silu(_proj(m, f'{prefix}.gate_proj', x)) * _proj(m, f'{prefix}.up_proj', x)
  return _proj(m, f'{prefix}.down_proj', h)


def _rms(x, w):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * w.astype(np.float64)


def _rope(x):  # [T, H, hd], LlamaRotaryEmbedding with base 10000, rotate_half.
  hd = x.shape[-1]
  inv = 1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))
  freqs = np.arange(x.shape[0])[:, None] * inv[None]
  emb = np.concatenate([freqs, freqs], -1)[:, None]
  rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
  return x * np.cos(emb) + rot * np.sin(emb)


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _moe(m, i, x, gumbel):
  """MoeLayer (top-k logits, softmax over them) or DeepSpeed top2gating (softmax over all,
  argmax, argmax of logits + Gumbel without the first, p_i / (p_1 + p_2))."""
  p = f'model.layers.{i}.mlp'
  out = np.zeros_like(x)
  if m.deepspeed:
    logits = x @ m.t[f'{p}.deepspeed_moe.gate.wg.weight'].astype(np.float64).T
    probs = _softmax(logits)
    first = probs.argmax(-1)
    noisy = logits + (0.0 if gumbel is None else gumbel)
    noisy[np.arange(len(x)), first] = -np.inf
    second = noisy.argmax(-1)
    chosen = np.stack([first, second], -1)
    pw = np.take_along_axis(probs, chosen, -1)
    weights = pw / pw.sum(-1, keepdims=True)
    prefix = f'{p}.deepspeed_moe.experts.deepspeed_experts'
  else:
    logits = _lin(m, f'{p}.gate', x)
    chosen = np.argsort(-logits, -1)[:, :2]
    weights = _softmax(np.take_along_axis(logits, chosen, -1))
    prefix = f'{p}.experts'
  for e in range(m.experts):
    rows, slot = np.nonzero(chosen == e)
    if len(rows):
      out[rows] += weights[rows, slot, None] * _mlp(m, f'{prefix}.{e}', x[rows])
  return out


def official_logits(m, tokens, gumbels=None):
  """[batch, length, vocab] float64; `gumbels[j]` the noise `[batch*length, E]` of the j-th MoE
  layer (DeepSpeed only; None: no sampling)."""
  hd = D // HEADS
  rows = []
  for b, row in enumerate(tokens):
    x = m.t['model.embed_tokens.weight'][row].astype(np.float64)
    n = len(row)
    for i in range(LAYERS):
      p = f'model.layers.{i}'
      h = _rms(x, m.t[f'{p}.input_layernorm.weight'])
      q = _rope(_lin(m, f'{p}.self_attn.q_proj', h).reshape(n, HEADS, hd))
      k = _rope(_lin(m, f'{p}.self_attn.k_proj', h).reshape(n, HEADS, hd))
      v = _lin(m, f'{p}.self_attn.v_proj', h).reshape(n, HEADS, hd)
      s = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(hd)
      s = np.where(np.tril(np.ones((n, n), bool))[None], s, -np.inf)
      a = np.einsum('hqk,khd->qhd', _softmax(s), v).reshape(n, D)
      x = x + _lin(m, f'{p}.self_attn.o_proj', a)
      h = _rms(x, m.t[f'{p}.post_attention_layernorm.weight'])
      if i in m.moe:
        j = sorted(m.moe).index(i)
        g = None if gumbels is None else gumbels[j][b * n : (b + 1) * n]
        x = x + _moe(m, i, h, g)
      else:
        x = x + _mlp(m, f'{p}.mlp', h)
    rows.append(_rms(x, m.t['model.norm.weight']) @ m.t['lm_head.weight'].astype(np.float64).T)
  return np.stack(rows)


# ---------------------------------------------------------------------------------------------
# Writing the release layout.


def _peft_files(m):
  """adapter_model.bin tensors (PEFT names: base_model.model.<module>.lora_{A,B}.weight)."""
  out = {}
  for module, (a, b) in m.peft.items():
    out[f'base_model.model.{module}.lora_A.weight'] = a
    out[f'base_model.model.{module}.lora_B.weight'] = b
  return out


def write_release(m, root):
  """(input dir, base dir, expert dir or None) as the official training leaves them."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  def save_bin(tensors, path):
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, path)

  inp, base = root / 'run', root / 'base'
  inp.mkdir()
  base.mkdir()
  gates = {k: v for k, v in m.t.items() if '.mlp.gate.' in k or '.deepspeed_moe.gate.' in k}
  experts = {k: v for k, v in m.t.items() if '.experts.' in k}
  base_sd = {k: v for k, v in m.t.items() if k not in gates and k not in experts}
  expert_dir = None
  if m.deepspeed:
    # The base is the dense speech base: a dense FFN on every layer (unused on MoE layers), and
    # here the dense loralib weights (with their PEFT adapters in adapter_model.bin).
    for i in sorted(m.moe):
      for proj in PROJ:
        base_sd[f'model.layers.{i}.mlp.{proj}.weight'] = m.rng.normal(0, 0.2, _shape(proj)).astype(
            np.float32
        )
    for module, (a, b) in m.loralib.items():
      if '.deepspeed_moe.' not in module:
        base_sd[f'{module}_lora_A.weight'], base_sd[f'{module}_lora_B.weight'] = a, b
    # The expert set: one stage-2 FFN per file for every layer; experts 2/6 and 5/7 share one.
    expert_dir = root / 'experts'
    expert_dir.mkdir()
    by_file = {}
    for e, stem in enumerate(EXPERT_SET):
      ffn = {}
      for i in range(LAYERS):
        for proj in PROJ:
          ds = f'model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{proj}.weight'
          ffn[f'model.layers.{i}.mlp.{proj}.weight'] = m.t.get(
              ds, m.rng.normal(0, 0.2, _shape(proj)).astype(np.float32)
          )
      if stem in by_file:  # The shared file: the same FFNs for both experts.
        for i in sorted(m.moe):
          for proj in PROJ:
            key = f'model.layers.{i}.mlp.{proj}.weight'
            m.t[
                f'model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{proj}.' 'weight'
            ] = by_file[stem][key]
        continue
      by_file[stem] = ffn
      save_bin(ffn, expert_dir / f'{stem}.bin')
    # {n}_mlp_experts.bin: expert n (local index 0, ep_size 8): its loralib adapters and stale
    # copies of its FFN weights, which the expert set overrides.
    for e in range(8):
      rank_sd = {}
      for i in sorted(m.moe):
        src = f'model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}'
        dst = f'model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.0'
        for proj in PROJ:
          a, b = m.loralib[f'{src}.{proj}']
          rank_sd[f'{dst}.{proj}_lora_A.weight'] = a
          rank_sd[f'{dst}.{proj}_lora_B.weight'] = b
          rank_sd[f'{dst}.{proj}.weight'] = np.zeros(_shape(proj), np.float32)
      save_bin(rank_sd, inp / f'{e}_mlp_experts.bin')
    for module, (a, b) in list(m.loralib.items()):
      if '.deepspeed_moe.' not in module:  # Dense loralib pairs: in the base, checked above.
        m.t[f'{module}_lora_A.weight'], m.t[f'{module}_lora_B.weight'] = a, b
  else:
    base_sd.update(experts)  # The 4e base holds the stage-2 experts.
  safetensors.numpy.save_file(
      {k: np.ascontiguousarray(v) for k, v in base_sd.items()}, str(base / 'model.safetensors')
  )
  (base / 'config.json').write_text(json.dumps(m.config()))
  save_bin(gates, inp / 'mlp_gates.bin')
  save_bin(_peft_files(m), inp / 'adapter_model.bin')
  (inp / 'config.json').write_text(json.dumps(m.config()))
  (inp / 'adapter_config.json').write_text(
      json.dumps({'r': RANK, 'lora_alpha': ALPHA, 'lora_dropout': 0.05, 'peft_type': 'LORA'})
  )
  return str(inp), str(base), expert_dir and str(expert_dir)


def convert(m, root, merge, capsys, extra=()):
  inp, base, expert_dir = write_release(m, root)
  out = str(root / ('merged' if merge else 'kept'))
  flags = (['--merge_lora'] if merge else []) + list(extra)
  experts = {'expert_dir': expert_dir} if expert_dir else {}
  capsys.readouterr()
  assert (
      run_convert(
          *flags, source='unimoe', input=inp, base=base, output=out, dtype='float32', **experts
      )
      == 0
  )
  summary = json.loads(capsys.readouterr().out.splitlines()[-1])
  return out, summary


def _ours(out, sampling=None, rngs=None):
  cfg, params = checkpoints.restore_model(out)
  dec = cfg.decoder
  if sampling is not None:
    import dataclasses  # pylint: disable=g-import-not-at-top

    dec = dataclasses.replace(
        dec, moe=dataclasses.replace(dec.moe, second_expert_sampling=sampling)
    )
  logits, _ = Decoder(dec).apply({'params': params['decoder']}, jnp.asarray(TOKENS), rngs=rngs)
  return np.asarray(logits, np.float64), dec


@pytest.mark.parametrize('merge', [True, False], ids=['merged', 'kept'])
@pytest.mark.parametrize('variant', ['speech', 'audio', 'speech_dp'])
def test_4e_layouts_match_official(tmp_path, capsys, variant, merge):
  m = Model(variant)
  out, summary = convert(m, tmp_path, merge, capsys)
  ours, dec = _ours(out)
  assert summary['moe_layers'] == sorted(m.moe)
  assert dec.moe.layers == ('all' if variant == 'speech' else 'even')
  assert dec.moe.router_dtype == 'float32' and not dec.moe.second_expert_sampling
  assert dec.rms_norm_eps == EPS and dec.rope_theta == 10000.0
  assert (dec.lora is None) == merge
  assert any('rope_theta=5000.0 ignored' in n for n in summary['notes'])
  err = np.abs(ours - official_logits(m, TOKENS)).max()
  print(f'{variant} {"merged" if merge else "kept"}: max |logit error| {err:.2e}')
  assert err < TOL, err


@pytest.mark.parametrize('merge', [True, False], ids=['merged', 'kept'])
def test_8e_deepspeed_layout_matches_official(tmp_path, capsys, merge):
  m = Model('8e')
  out, summary = convert(m, tmp_path, merge, capsys)
  raw, gin_text = checkpoints.restore(out)
  assert summary['moe_layers'] == [0, 2]
  for text in (
      'second_expert_sampling = True',
      "load_balance_loss_form = 'top1'",
      "router_dtype = 'float32'",
      "layers = 'even'",
      'load_balance_loss_coef = 0.01',
      'num_experts = 8',
  ):
    assert text in gin_text, text
  assert any('dense FFN tensors of MoE layers not loaded' in n for n in summary['notes'])
  assert any('expert-file tensors of dense layers ignored' in n for n in summary['notes'])
  # Experts 2 and 6 start from one expert-set file, but their loralib adapters differ.
  if merge:
    wi = raw['decoder']['layers_0']['moe']['wi_0']['kernel']
    assert not np.allclose(wi[2], wi[6])
  else:
    moe = raw['decoder']['layers_2']['moe']
    np.testing.assert_array_equal(moe['wi_0']['kernel'][2], moe['wi_0']['kernel'][6])
    assert moe['wo']['lora_a'].shape == (8, F, RANK)

  # Deterministic top-2 (sampling off) against the reference.
  ours, dec = _ours(out, sampling=False)
  assert dec.moe.second_expert_sampling is False
  err = np.abs(ours - official_logits(m, TOKENS)).max()
  print(f'8e {"merged" if merge else "kept"} sampling off: max |logit error| {err:.2e}')
  assert err < TOL, err

  # Sampling on (as converted), with the same Gumbel draws fed to both.
  draws = [np.random.default_rng(10 + j).gumbel(size=(TOKENS.size, 8)) for j in range(2)]
  calls = []

  def fixed_noise(key, shape):
    del key
    calls.append(shape)
    return jnp.asarray(draws[len(calls) - 1], jnp.float32).reshape(shape)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(routing, 'gumbel_noise', fixed_noise)
    sampled, dec = _ours(out, rngs={'router': jax.random.PRNGKey(0)})
  assert dec.moe.second_expert_sampling and len(calls) == 2
  want = official_logits(m, TOKENS, gumbels=draws)
  err = np.abs(sampled - want).max()
  print(f'8e {"merged" if merge else "kept"} sampling on: max |logit error| {err:.2e}')
  assert err < TOL, err
  assert np.abs(sampled - ours).max() > 1e-2  # The draws did change the routing.


def test_8e_scanned_layout(tmp_path, capsys):
  """--scan_layers: MoE on every other layer scans in blocks of 2; same logits."""
  m = Model('8e', seed=1)
  out, _ = convert(m, tmp_path, True, capsys, extra=['--scan_layers'])
  raw, gin_text = checkpoints.restore(out)
  assert 'stacked_layers' in raw['decoder'] and 'scan_layers = True' in gin_text
  ours, dec = _ours(out, sampling=False)
  assert dec.scan_period() == 2
  err = np.abs(ours - official_logits(m, TOKENS)).max()
  print(f'8e merged, scanned: max |logit error| {err:.2e}')
  assert err < TOL, err


def test_8e_without_dense_loralib_weights_names_what_cannot_be_reproduced(tmp_path, capsys):
  """The released 8e base is the dense speech base: no loralib weights for the dense FFNs, whose
  LlamaMLPLoRA the official loader then initialises at random; PEFT adapters of those Linears
  cannot be applied. Converted without them (the reference leaves them out too), named."""
  m = Model('8e', dense_loralib=False)
  for i in (1, 3):  # PEFT adapters of the missing loralib Linears, as train.py would save them.
    for proj in PROJ:
      out, inp = _shape(proj)
      m.peft[f'model.layers.{i}.mlp.{proj}_lora_A'] = (
          np.ones((RANK, inp), np.float32),
          np.ones((RANK, RANK), np.float32),
      )
  out, summary = convert(m, tmp_path, True, capsys)
  notes = ' | '.join(summary['notes'])
  assert 'PEFT adapters of 6 loralib Linears of dense FFNs (layers [1, 3]' in notes
  assert 'lora_r=4 gives the dense FFNs of layers [1, 3] loralib adapters' in notes
  for k in [k for k in m.peft if '_lora_' in k]:
    del m.peft[k]
  ours, _ = _ours(out, sampling=False)
  assert np.abs(ours - official_logits(m, TOKENS)).max() < TOL


def test_8e_loralib_scale_from_config(tmp_path, capsys):
  """config.json lora_alpha sets the loralib scale (here 1, PEFT's 2): merged it matches the
  reference; kept, one LoRAConfig cannot hold both scales, and the error names the fields."""
  m = Model('8e', loralib_alpha=4.0)
  out, _ = convert(m, tmp_path, True, capsys)
  ours, _ = _ours(out, sampling=False)
  assert np.abs(ours - official_logits(m, TOKENS)).max() < TOL
  with pytest.raises(
      ValueError,
      match=r'lora_alpha=4.0\).*adapter_config.json r=4, ' r'lora_alpha=8\).*--merge_lora',
  ):
    run_convert(
        source='unimoe',
        input=tmp_path / 'run',
        base=tmp_path / 'base',
        expert_dir=tmp_path / 'experts',
        output=tmp_path / 'kept2',
    )
  assert not (tmp_path / 'kept2').exists()


@pytest.mark.parametrize(
    'field,value,match',
    [
        ('use_fm_block', True, 'use_fm_block=True'),
        ('rope_scaling', {'type': 'linear', 'factor': 2.0}, 'rope_scaling='),
        ('moe_type', 'mixed', "moe_type must be 'sparse' or 'dense'"),
    ],
)
def test_8e_fields_we_cannot_honour_are_named(tmp_path, field, value, match):
  m = Model('8e')
  inp, base, expert_dir = write_release(m, tmp_path)
  cfg = json.loads(open(os.path.join(inp, 'config.json')).read())
  cfg[field] = value
  open(os.path.join(inp, 'config.json'), 'w').write(json.dumps(cfg))
  with pytest.raises(ValueError, match=match):
    run_convert(
        '--merge_lora',
        source='unimoe',
        input=inp,
        base=base,
        expert_dir=expert_dir,
        output=tmp_path / 'out',
    )
  assert not (tmp_path / 'out').exists()


def test_8e_rank_file_with_several_experts_is_refused(tmp_path):
  """A rank file of a run with ep_size < 8 holds several local experts; the official loader
  would fold them onto one expert: refused, naming the file."""
  import torch  # pylint: disable=g-import-not-at-top

  m = Model('8e')
  inp, base, expert_dir = write_release(m, tmp_path)
  path = os.path.join(inp, '3_mlp_experts.bin')
  sd = torch.load(path)
  sd.update({k.replace('deepspeed_experts.0.', 'deepspeed_experts.1.'): v for k, v in sd.items()})
  torch.save(sd, path)
  with pytest.raises(ValueError, match=r'3_mlp_experts.bin holds the experts \[0, 1\]'):
    run_convert(
        source='unimoe', input=inp, base=base, expert_dir=expert_dir, output=tmp_path / 'out'
    )
