"""`UniMoEModel`: the t5x model interface over `network.UniMoE`.

t5x's train / eval / infer binaries (and `unimoe_jax.train`, which drives the same methods)
call, with t5x's signatures and batch keys:

    get_initial_variables(rng, input_shapes, input_types=None) -> {'params': ...}
    loss_fn(params, batch, dropout_rng) -> (loss, metrics)
    eval_fn(params, batch) -> (loss, metrics)
    predict_batch(params, batch, rng=None) -> decodes [batch, length]
    predict_batch_with_aux(params, batch, rng=None, *, return_all_decodes=False,
                           num_decodes=1, prompt_with_targets=False) -> (decodes, aux)
    score_batch(params, batch, return_intermediates=False) -> [batch] log-likelihoods
    FEATURE_CONVERTER_CLS, input_vocabulary, output_vocabulary, optimizer_def

The batch is the project's one format (docs/architecture.md): `decoder_input_tokens`,
`decoder_target_tokens`, `decoder_loss_weights`, optional `decoder_segment_ids`,
`decoder_positions`, `decoder_causal_attention`, and `<m>_features` / `<m>_mask` per modality.
`metrics` are `clu.metrics` objects (t5x merges them with `Metric.merge`); clu is imported
lazily, since the core imports only jax, flax, optax, numpy and gin at module level.

Prediction takes each row's prompt from `decoder_causal_attention` when the feature converter
provides it (t5x: 1 on the prompt and on the first target input position) and otherwise from
the loss weights: the prompt is every target token before the row's first loss-weighted
token (BOS, the rendered conversation, the answer's "ASSISTANT:" prefix). Decodes hold only
the generated tokens, as t5x's decoder-only model returns them.
"""

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import gin
import jax
import jax.numpy as jnp
import numpy as np

from unimoe_jax import decoding
from unimoe_jax.modalities import MODALITIES
from unimoe_jax.network import UniMoE, UniMoEConfig, check_placeholders

Array = jax.Array
Batch = Mapping[str, Array]

LOSS_NORMALIZERS = ('NUM_REAL_TARGET_TOKENS', 'NUM_TOTAL_TARGET_TOKENS', 'SUM')

# Whole-batch totals a microbatch's loss needs (`with_batch_totals`): `[batch]`, every row the
# same value, so that slicing the batch into microbatches (t5x's trainer, ours) keeps them.
BATCH_LOSS_WEIGHT = 'batch_loss_weight'  # float32: sum of decoder_loss_weights of the batch
BATCH_ROWS = 'batch_rows'  # int32: rows of the batch
BATCH_TOTAL_KEYS = (BATCH_LOSS_WEIGHT, BATCH_ROWS)
# Folded into the dropout key to make the 'router' rng (MoE second-expert sampling).
ROUTER_RNG_SALT = 0x726F75


def _default_dtype(key: str):
  if key.endswith('_mask'):
    return np.bool_
  if key.endswith('_features') or key == 'decoder_loss_weights':
    return np.float32
  return np.int32


def cross_entropy(
    logits: Array, targets: Array, z_loss: float = 0.0, label_smoothing: float = 0.0
) -> Tuple[Array, Array]:
  """Per-token (cross-entropy + z-loss, z-loss), float32 `[batch, length]`.

  z_loss adds `z_loss * log(sum(exp(logits)))**2` (PaLM / t5x). Label smoothing spreads
  `label_smoothing` uniformly over the vocabulary; the constant entropy term is subtracted so
  that a perfect prediction scores 0, as t5x does.

  A target outside `[0, vocab)` (a media placeholder's negative id, which carries loss weight 0)
  has cross-entropy exactly 0: the gather reads id 0 there instead (an out-of-range gather
  returns NaN, and NaN * weight 0 is NaN), so such positions add nothing to a weighted sum.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  in_vocab = (targets >= 0) & (targets < vocab)
  safe_targets = jnp.where(in_vocab, targets, 0)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / max(vocab - 1, 1)
  target_log_prob = jnp.take_along_axis(log_probs, safe_targets[..., None], axis=-1)[..., 0]
  loss = -confidence * target_log_prob
  if label_smoothing > 0:
    loss = loss - low * (jnp.sum(log_probs, axis=-1) - target_log_prob)
    normalizer = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    loss = loss - normalizer
  loss = jnp.where(in_vocab, loss, 0.0)
  z = z_loss * jnp.square(log_z)
  return loss + z, z


def loss_weights(batch: Batch) -> Array:
  """float32 `[batch, length]`: `decoder_loss_weights`, or 1 on every non-padding target."""
  weights = batch.get('decoder_loss_weights')
  if weights is None:
    return (batch['decoder_target_tokens'] > 0).astype(jnp.float32)
  return weights.astype(jnp.float32)


def with_batch_totals(batch: Batch) -> Dict[str, Array]:
  """`batch` plus `BATCH_TOTAL_KEYS`, for a trainer that splits it into microbatches.

  Gradient accumulation sums the microbatches' gradients (t5x's trainer does, and
  `training/train_state.py`). With these keys each microbatch's `loss_fn` divides by the whole
  batch's normaliser and weighs its MoE auxiliary loss by its share of the rows, so the summed
  gradient is the whole batch's gradient however the loss-weighted tokens fall into
  microbatches (the auxiliary loss, a product of per-expert means, is the mean of the
  microbatches' values: exact only without it).
  """
  weights = loss_weights(batch)
  rows = weights.shape[0]
  out = dict(batch)
  out[BATCH_LOSS_WEIGHT] = jnp.full((rows,), jnp.sum(weights), jnp.float32)
  out[BATCH_ROWS] = jnp.full((rows,), rows, jnp.int32)
  return out


def prompt_lengths(batch: Batch) -> Array:
  """`[batch]` int32: the number of prompt tokens at the start of `decoder_target_tokens`."""
  if 'decoder_causal_attention' in batch:
    # t5x's convention: 1 on the inputs and on the first target *input* position.
    return jnp.maximum(jnp.sum(batch['decoder_causal_attention'], axis=-1).astype(jnp.int32) - 1, 1)
  weights = batch['decoder_loss_weights'] > 0
  first = jnp.argmax(weights, axis=-1).astype(jnp.int32)
  # A row with no answer token is all prompt (its real length).
  real = jnp.sum(batch['decoder_target_tokens'] > 0, axis=-1).astype(jnp.int32)
  return jnp.maximum(jnp.where(jnp.any(weights, axis=-1), first, real), 1)


@gin.configurable
class UniMoEModel:
  """t5x's decoder-only model interface for `UniMoE` (text-only models too: no encoders).

  Args:
    config: the model (`MODEL_CONFIG` in gin).
    vocabulary: seqio vocabulary used for inputs and outputs (placeholders included).
    optimizer_def: what the driving binary optimises with: an optax
      `GradientTransformation` factory for `unimoe_jax.train`, t5x's `OptaxWrapper` under t5x.
    z_loss, label_smoothing: as t5x's `BaseTransformerModel`.
    loss_normalizing_factor: 'NUM_REAL_TARGET_TOKENS' (default: mean over loss-weighted
      tokens, as Hugging Face and the official code compute it), 'NUM_TOTAL_TARGET_TOKENS'
      (t5x's tokens of the whole batch incl. padding), 'SUM', or a float to divide by.
    decode_method, max_decode_steps, temperature, top_k, top_p, num_beams, beam_alpha: how
      `predict_batch_with_aux` decodes (greedy by default, as the paper evaluates).
  """

  def __init__(
      self,
      config: UniMoEConfig = gin.REQUIRED,
      vocabulary: Any = None,
      optimizer_def: Any = None,
      z_loss: float = 0.0,
      label_smoothing: float = 0.0,
      loss_normalizing_factor: Union[str, float] = 'NUM_REAL_TARGET_TOKENS',
      decode_method: str = 'greedy',
      max_decode_steps: Optional[int] = None,
      temperature: float = 1.0,
      top_k: int = 0,
      top_p: float = 1.0,
      num_beams: int = 4,
      beam_alpha: float = 0.6,
  ):
    if isinstance(loss_normalizing_factor, str) and loss_normalizing_factor not in LOSS_NORMALIZERS:
      raise ValueError(
          f'UniMoEModel.loss_normalizing_factor must be one of {LOSS_NORMALIZERS} or '
          f'a number, got {loss_normalizing_factor!r}'
      )
    if decode_method not in decoding.GENERATE_METHODS:
      raise ValueError(
          f'UniMoEModel.decode_method must be one of {decoding.GENERATE_METHODS}, got '
          f'{decode_method!r}'
      )
    self.config = config
    self.module = UniMoE(config)
    self._vocabulary = vocabulary
    self.optimizer_def = optimizer_def
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    self.loss_normalizing_factor = loss_normalizing_factor
    self.decode_method = decode_method
    self.max_decode_steps = max_decode_steps
    self.decode_kwargs = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams, alpha=beam_alpha
    )

  def check_batch(self, batch: Mapping[str, Any], where: str) -> None:
    """Raises, naming `where`, when a host batch's placeholders do not match the soft tokens
    this model makes per item (`network.check_placeholders`); the loops call it before any
    compute on the batch. numpy only: one comparison of the token ids per modality."""
    check_placeholders(self.config, batch, where)

  # ---- vocabularies and features ---------------------------------------------------------
  @property
  def input_vocabulary(self):
    return self._vocabulary

  @property
  def output_vocabulary(self):
    return self._vocabulary

  @property
  def FEATURE_CONVERTER_CLS(self):  # pylint: disable=invalid-name
    # The converter lives on the TensorFlow side (data/); only the data path asks for it.
    from unimoe_jax.data.feature_converter import MultimodalDecoderFeatureConverter  # pylint: disable=g-import-not-at-top

    return MultimodalDecoderFeatureConverter

  # ---- initialisation ------------------------------------------------------------------
  def dummy_batch(
      self,
      input_shapes: Mapping[str, Tuple[int, ...]],
      input_types: Optional[Mapping[str, Any]] = None,
  ) -> Dict[str, np.ndarray]:
    input_types = input_types or {}
    batch = {}
    for key, shape in input_shapes.items():
      dtype = input_types.get(key)
      dtype = getattr(dtype, 'as_numpy_dtype', dtype) or _default_dtype(key)
      batch[key] = np.ones(shape, dtype) if key.endswith('_mask') else np.zeros(shape, dtype)
    return batch

  def get_initial_variables(
      self,
      rng: Array,
      input_shapes: Mapping[str, Tuple[int, ...]],
      input_types: Optional[Mapping[str, Any]] = None,
  ) -> Dict[str, Any]:
    """Variables (params boxed with their logical axes) for batches of `input_shapes`.

    Media keys in `input_shapes` (`image_features` ...) build their encoders' variables too;
    a model whose config has an encoder always gets its parameters (shapes of the features are
    taken from the config when the batch does not name them).

    Parameters depend on neither the media lengths nor the feature dtypes, so the dummy batch
    is `decoder_input_tokens` as given (its rows stay: an expert-parallel layer's shard_map
    splits them over the mesh) with one item of each modality the config has: every run of
    one model at one batch shape traces the same init program, and jax's persistent
    compilation cache compiles it once (on the CPU demo the init program compiles slower
    than a training step).
    """
    del input_types  # Tokens and float features, whatever the batch holds.
    batch = self.dummy_batch(
        self._with_media_shapes({'decoder_input_tokens': input_shapes['decoder_input_tokens']})
    )
    params_rng, dropout_rng = jax.random.split(rng)
    return self.module.init(
        {'params': params_rng, 'dropout': dropout_rng}, batch, deterministic=True
    )

  def _with_media_shapes(self, input_shapes):
    shapes = dict(input_shapes)
    batch = shapes['decoder_input_tokens'][0]
    for m in self.config.modalities:
      if f'{m}_features' not in shapes:
        shapes[f'{m}_features'] = (batch, 1) + self.item_shape(m)
        shapes[f'{m}_mask'] = (batch, 1)
    return shapes

  def item_shape(self, modality: str) -> Tuple[int, ...]:
    """A valid shape of one item of `<modality>_features` (no batch and items axes).

    Parameter shapes do not depend on the number of video frames or audio frames, so the
    smallest valid counts are used.
    """
    cfg = self.config
    if modality == 'image':
      return (cfg.vision.image_size, cfg.vision.image_size, 3)
    if modality == 'video':
      return (1, cfg.vision.image_size, cfg.vision.image_size, 3)
    if modality == 'speech':
      return (2 * cfg.speech_encoder.max_source_positions, cfg.speech_encoder.num_mel_bins)
    if modality == 'audio':
      return (2 * cfg.audio_encoder.input_patch_size, cfg.audio_encoder.num_mel_bins)
    raise ValueError(f'unknown modality {modality!r}; expected one of {MODALITIES}')

  # ---- training and evaluation ---------------------------------------------------------
  def _compute_logits(self, params, batch: Batch, dropout_rng: Optional[Array] = None):
    # 'router': the Gumbel draws of MoEConfig.second_expert_sampling, a stream of its own
    # (folded from the dropout key, which stays as it was). Without rngs (evaluation) the
    # MoE layer keys its noise from the router logits instead.
    rngs = (
        None
        if dropout_rng is None
        else {'dropout': dropout_rng, 'router': jax.random.fold_in(dropout_rng, ROUTER_RNG_SALT)}
    )
    return self.module.apply(
        {'params': params}, batch, deterministic=dropout_rng is None, rngs=rngs
    )

  def _normalizer(self, batch_loss_weight: Array, batch_tokens: Array) -> Array:
    """The loss divisor of the whole batch (`batch_tokens`: rows x length, padding too)."""
    factor = self.loss_normalizing_factor
    if factor == 'NUM_REAL_TARGET_TOKENS':
      return jnp.maximum(batch_loss_weight, 1.0)
    if factor == 'NUM_TOTAL_TARGET_TOKENS':
      return jnp.asarray(batch_tokens, jnp.float32)
    if factor == 'SUM':
      return jnp.asarray(1.0, jnp.float32)
    return jnp.asarray(float(factor), jnp.float32)

  def loss_fn(self, params, batch: Batch, dropout_rng: Optional[Array]):
    """(scalar loss, metrics). The loss is the normalised cross-entropy (+ z-loss) of the
    loss-weighted target tokens plus the MoE auxiliary loss (coefficients in MoEConfig).

    On a microbatch carrying `BATCH_TOTAL_KEYS` (`with_batch_totals` of the whole batch) the
    loss is this microbatch's part of the whole batch's loss, so microbatch gradients sum to
    the whole batch's; metrics count each microbatch by its share of the rows, so merged
    (summed) over the microbatches they are the whole batch's too.
    """
    from clu import metrics as clu_metrics  # pylint: disable=g-import-not-at-top

    logits, aux = self._compute_logits(params, batch, dropout_rng)
    targets = batch['decoder_target_tokens']
    weights = loss_weights(batch)
    rows, length = targets.shape
    if BATCH_LOSS_WEIGHT in batch:
      batch_loss_weight = batch[BATCH_LOSS_WEIGHT][0]
      batch_rows = batch[BATCH_ROWS][0].astype(jnp.float32)
    else:
      batch_loss_weight, batch_rows = jnp.sum(weights), jnp.asarray(rows, jnp.float32)
    share = rows / batch_rows  # This microbatch's share of the batch's rows (1: no split).
    token_loss, token_z = cross_entropy(logits, targets, self.z_loss, self.label_smoothing)
    normalizer = self._normalizer(batch_loss_weight, batch_rows * length)
    cross_ent = jnp.sum(token_loss * weights) / normalizer
    z_loss = jnp.sum(token_z * weights) / normalizer
    moe_loss = share * aux.get('aux_loss', jnp.zeros((), jnp.float32))
    loss = cross_ent + moe_loss

    num_tokens = jnp.sum(weights)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    average = clu_metrics.Average.from_model_output

    def batch_total(value):  # Summed over microbatches: the whole batch's value.
      return clu_metrics.Average(total=value, count=share)

    metrics = {
        'loss': batch_total(loss),
        'cross_ent_loss': batch_total(cross_ent),
        'z_loss': batch_total(z_loss),
        'accuracy': clu_metrics.Average(total=jnp.sum(correct * weights), count=num_tokens),
        'cross_ent_loss_per_target_token': clu_metrics.Average(
            total=jnp.sum((token_loss - token_z) * weights), count=num_tokens
        ),
        'num_target_tokens': batch_total(num_tokens),
        'num_sequences': batch_total(jnp.sum(jnp.any(weights > 0, axis=-1)).astype(jnp.float32)),
    }
    for key in (
        'aux_loss',
        'load_balance_loss',
        'router_z_loss',
        'drop_fraction',
        'router_entropy',
    ):
      if key in aux:
        metrics[f'moe/{key}'] = average(aux[key].astype(jnp.float32))
    if 'expert_fraction' in aux:
      fraction = aux['expert_fraction']  # [moe layers, experts]
      for e in range(fraction.shape[-1]):
        metrics[f'moe/expert_load/expert_{e}'] = average(jnp.mean(fraction[:, e]))
    return loss, metrics

  def eval_fn(self, params, batch: Batch):
    return self.loss_fn(params, batch, dropout_rng=None)

  def score_batch(self, params, batch: Batch, return_intermediates: bool = False):
    """`[batch]` sum of log p(target) over loss-weighted tokens (t5x's sequence score)."""
    logits, aux = self._compute_logits(params, batch)
    targets = batch['decoder_target_tokens']
    weights = loss_weights(batch)
    token_loss, _ = cross_entropy(logits, targets)
    scores = -jnp.sum(token_loss * weights, axis=-1)
    if return_intermediates:
      return scores, {'logits': logits, 'aux': aux}
    return scores

  # ---- decoding ------------------------------------------------------------------------
  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None) -> Array:
    return self.predict_batch_with_aux(params, batch, rng=rng)[0]

  def predict_batch_with_aux(
      self,
      params,
      batch: Batch,
      rng: Optional[Array] = None,
      *,
      return_all_decodes: bool = False,
      num_decodes: int = 1,
      prompt_with_targets: bool = False,
  ) -> Tuple[Array, Dict[str, Array]]:
    """Decodes an answer for each row's prompt with the KV cache (the paper: greedy).

    `num_decodes` follows t5x: the beam size of beam search (1 keeps `num_beams`), the number
    of samples per row of sampling (the one with the highest log-probability is returned);
    greedy decoding has one answer, repeated `num_decodes` times.

    Returns `decodes [batch, length]` (generated tokens only, EOS included, then 0) and
    `{'scores': [batch]}` (log-probability of each decode; beam search: its beam score). With
    `return_all_decodes`, `[batch, num_decodes, length]` and `[batch, num_decodes]` in
    increasing order of score (t5x's order: the best last).
    """
    del prompt_with_targets  # The prompt is always read from the target buffer.
    if num_decodes < 1:
      raise ValueError(f'predict_batch_with_aux: num_decodes must be >= 1, got {num_decodes}')
    targets = batch['decoder_target_tokens']
    rows, length = targets.shape
    lengths = prompt_lengths(batch)
    keep = jnp.arange(length)[None, :] < lengths[:, None]
    prompt_batch = dict(batch)
    prompt_batch['decoder_input_tokens'] = jnp.where(keep, targets, 0)
    for key in ('decoder_segment_ids', 'decoder_positions', 'decoder_causal_attention'):
      prompt_batch.pop(key, None)
    method, kwargs = self.decode_method, dict(self.decode_kwargs)
    samples = num_decodes if method == 'sample' else 1
    if samples > 1:  # Row b's samples are rows b * samples ... of the tiled batch.
      prompt_batch = {k: jnp.repeat(v, samples, axis=0) for k, v in prompt_batch.items()}
    if method == 'beam' and num_decodes > 1:
      kwargs['num_beams'] = num_decodes
    sequences, scores = decoding.generate(
        self.module,
        params,
        prompt_batch,
        jnp.repeat(lengths, samples),
        max_decode_steps=self.max_decode_steps or length,
        eos_id=getattr(self._vocabulary, 'eos_id', 1),
        method=method,
        rng=rng,
        all_beams=method == 'beam',
        **kwargs,
    )
    if method == 'beam':
      pass  # [rows, beams, length], scores increasing.
    elif samples > 1:
      sequences = sequences.reshape(rows, samples, length)
      order = jnp.argsort(scores.reshape(rows, samples), axis=-1)
      scores = jnp.take_along_axis(scores.reshape(rows, samples), order, axis=-1)
      sequences = jnp.take_along_axis(sequences, order[..., None], axis=1)
    else:  # Greedy (or one sample): one answer per row.
      sequences = jnp.repeat(sequences[:, None], num_decodes, axis=1)
      scores = jnp.repeat(scores[:, None], num_decodes, axis=1)
    # Drop the prompt: row b's answer starts at lengths[b].
    index = jnp.arange(length)[None, None, :] + lengths[:, None, None]
    decodes = jnp.take_along_axis(sequences, jnp.minimum(index, length - 1), axis=2)
    decodes = jnp.where(index < length, decodes, 0)
    if return_all_decodes:
      return decodes, {'scores': scores}
    return decodes[:, -1], {'scores': scores[:, -1]}
