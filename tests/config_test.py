"""Configs: named sizes, validation errors, and the gin files (from the checkout)."""

import dataclasses

import gin
import pytest

import unimoe_jax
from unimoe_jax import config as config_lib


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  for path in unimoe_jax.gin_search_paths():
    gin.add_config_file_search_path(path)
  yield
  gin.clear_config()


def _parse(*files, bindings=()):
  gin.parse_config_files_and_bindings(list(files), list(bindings))
  return gin.query_parameter('%DECODER_CONFIG').scoped_configurable_fn()


@pytest.mark.parametrize(
    'gin_file,size', [('models/tiny.gin', 'tiny'), ('models/llama_7b.gin', 'llama-7b')]
)
def test_gin_files_name_the_python_sizes(gin_file, size):
  assert _parse(gin_file) == config_lib.SIZES[size]


def test_llama_7b_is_the_published_size():
  """LLaMA-7B's sizes (Touvron et al. 2023, Table 2; HF's llama-7b config.json), written here
  apart from the table, which takes them from DecoderConfig's defaults."""
  cfg = config_lib.named('llama-7b')
  sizes = (cfg.vocab_size, cfg.embed_dim, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads)
  assert sizes == (32000, 4096, 32, 32, 32)
  assert (cfg.mlp_dim, cfg.rope_theta, cfg.rms_norm_eps) == (11008, 10000.0, 1e-6)


def test_gin_class_bindings_apply_on_top_of_a_named_size():
  """A gin file names a size (`config.named.size`); bindings of DecoderConfig's fields from
  other files and flags still apply (config.from_table), and `named`'s own arguments win."""
  cfg = _parse(
      'models/llama_7b.gin',
      bindings=['config.DecoderConfig.scan_layers = True', 'config.DecoderConfig.num_layers = 4'],
  )
  assert cfg == dataclasses.replace(config_lib.SIZES['llama-7b'], scan_layers=True, num_layers=4)
  assert config_lib.named('tiny', num_layers=3).num_layers == 3
  assert config_lib.named('tiny').scan_layers  # Under the same gin bindings, as DecoderConfig().
  with gin.unlock_config():
    gin.parse_config('small/config.DecoderConfig.embed_dim = 32')
  with gin.config_scope('small'):
    scoped = config_lib.named('tiny')
  assert (scoped.embed_dim, scoped.num_layers, scoped.resolved_head_dim) == (32, 4, 8)


def test_gin_files_compose():
  cfg = _parse(
      'models/llama_7b.gin',
      'models/moe_8e_top2.gin',
      'models/lora.gin',
      bindings=['config.MoEConfig.dispatch = "capacity"'],
  )
  assert cfg.embed_dim == 4096 and cfg.resolved_head_dim == 128
  assert cfg.moe == config_lib.MoEConfig(
      num_experts=8, num_experts_per_tok=2, dispatch='capacity', load_balance_loss_coef=0.01
  )
  assert cfg.lora.rank == 8 and cfg.lora.scale == 2.0
  assert cfg.moe_layer_indices() == tuple(range(32))


def test_gin_typo_names_the_binding():
  with pytest.raises(ValueError, match='embed_dimm'):
    _parse('models/tiny.gin', bindings=['config.DecoderConfig.embed_dimm = 3'])


def test_gin_search_path_finds_the_model_files():
  paths = unimoe_jax.gin_search_paths()
  assert paths and all(p.endswith('gin') for p in paths)


def test_moe_layer_selection():
  every_other = config_lib.named(
      'tiny', num_layers=4, moe=config_lib.MoEConfig(layers='every_other')
  )
  assert every_other.moe_layer_indices() == (1, 3)
  listed = config_lib.named('tiny', num_layers=4, moe=config_lib.MoEConfig(layers=[0, 2]))
  assert listed.moe_layer_indices() == (0, 2)
  with pytest.raises(ValueError, match=r'layers has indices \[7\] outside \[0, 4\)'):
    config_lib.named('tiny', num_layers=4, moe=config_lib.MoEConfig(layers=[7]))


def test_validation_names_the_field():
  with pytest.raises(ValueError, match='num_kv_heads=3'):
    config_lib.named('tiny', num_kv_heads=3)
  with pytest.raises(ValueError, match='num_experts_per_tok=5'):
    config_lib.MoEConfig(num_experts=4, num_experts_per_tok=5)
  with pytest.raises(TypeError):
    config_lib.named('tiny', dtype='bfloat17')
  with pytest.raises(KeyError, match='llama-70b'):
    config_lib.named('llama-70b')
  with pytest.raises(dataclasses.FrozenInstanceError):
    config_lib.SIZES['tiny'].num_layers = 3


@pytest.mark.slow
def test_installed_package_finds_gin_files_and_tasks(tmp_path):
  """Builds the wheel (offline, no build isolation), installs it to a directory and parses a
  model gin file from there, outside the checkout."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  wheels, target = tmp_path / 'wheels', tmp_path / 'site'
  pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
  subprocess.run(
      pip + ['wheel', '--no-deps', '--no-build-isolation', '-w', str(wheels), repo],
      check=True,
      cwd=tmp_path,
  )
  wheel = next(wheels.glob('*.whl'))
  subprocess.run(
      pip + ['install', '--no-deps', '--target', str(target), str(wheel)], check=True, cwd=tmp_path
  )
  script = (
      'import gin, unimoe_jax, unimoe_jax.tasks\n'
      'assert unimoe_jax.__file__.startswith(%r), unimoe_jax.__file__\n'
      'paths = unimoe_jax.gin_search_paths()\n'
      '[gin.add_config_file_search_path(p) for p in paths]\n'
      "gin.parse_config_files_and_bindings(['models/tiny.gin', 'models/moe_4e_top2.gin'], [])\n"
      "cfg = gin.query_parameter('%%DECODER_CONFIG').scoped_configurable_fn()\n"
      'print(paths, cfg.moe.num_experts)\n'
  ) % str(target)
  out = subprocess.run(
      [sys.executable, '-c', script],
      check=True,
      cwd=tmp_path,
      capture_output=True,
      text=True,
      env={**os.environ, 'PYTHONPATH': str(target)},
  ).stdout
  assert out.strip().endswith(' 4') and 'gin_files' in out, out


def _parse_model(*files, bindings=()):
  gin.parse_config_files_and_bindings(list(files), list(bindings))
  return gin.query_parameter('%MODEL_CONFIG').scoped_configurable_fn()


def test_multimodal_gin_equals_the_named_official_sizes():
  from unimoe_jax.connectors.qformer import QFORMER_SIZES
  from unimoe_jax.connectors.whisper_aligner import ALIGNER_SIZES
  from unimoe_jax.encoders.beats import BEATS_SIZES
  from unimoe_jax.encoders.clip import CLIP_SIZES
  from unimoe_jax.encoders.whisper import WHISPER_SIZES

  cfg = _parse_model('models/llama_7b.gin', 'models/moe_4e_top2.gin', 'models/multimodal.gin')
  assert cfg.decoder.moe.num_experts == 4 and cfg.decoder.embed_dim == 4096
  assert cfg.vision == CLIP_SIZES['vit-l-14-336']
  assert cfg.speech_encoder == WHISPER_SIZES['whisper-small']
  assert cfg.speech_aligner == ALIGNER_SIZES['whisper-small']
  assert cfg.audio_encoder == BEATS_SIZES['iter3']
  assert cfg.audio_qformer == QFORMER_SIZES['uni-moe-audio']
  assert cfg.num_soft_tokens('image') == 576  # (336 / 14)^2 patches, class token dropped.
  assert cfg.modalities == ('image', 'video', 'speech', 'audio')
  gin.clear_config()
  cfg = _parse_model(
      'models/llama_7b.gin',
      'models/multimodal.gin',
      bindings=['clip.CLIPVisionConfig.select_layer = -1', 'beats.BEATsConfig.deep_norm = False'],
  )
  assert cfg.vision == dataclasses.replace(CLIP_SIZES['vit-l-14-336'], select_layer=-1)
  assert cfg.audio_encoder == dataclasses.replace(BEATS_SIZES['iter3'], deep_norm=False)


def test_multimodal_tiny_gin_builds_the_tiny_towers():
  from unimoe_jax.connectors.qformer import QFORMER_SIZES
  from unimoe_jax.encoders.beats import BEATS_SIZES
  from unimoe_jax.encoders.clip import CLIP_SIZES

  cfg = _parse_model('models/tiny.gin', 'models/multimodal_tiny.gin')
  assert cfg.decoder == config_lib.SIZES['tiny']
  towers = (
      cfg.vision,
      cfg.speech_encoder,
      cfg.speech_aligner,
      cfg.audio_encoder,
      cfg.audio_qformer,
  )
  # The gin file widens the initialisation of every tiny tower (see its comment); the Python
  # size tables keep the released models' 0.02.
  assert all(t.init_std == 0.1 for t in towers)
  released_init = lambda c: dataclasses.replace(c, init_std=0.02)  # pylint: disable=unnecessary-lambda-assignment
  assert released_init(cfg.vision) == CLIP_SIZES['tiny']
  assert released_init(cfg.audio_encoder) == BEATS_SIZES['tiny']
  assert released_init(cfg.audio_qformer) == dataclasses.replace(
      QFORMER_SIZES['tiny'], num_layers=2, encoder_hidden_size=32
  )


def test_multimodal_gin_typo_names_the_binding():
  with pytest.raises(ValueError, match='num_query_tokenz'):
    _parse_model(
        'models/tiny.gin',
        'models/multimodal_tiny.gin',
        bindings=['whisper_aligner.WhisperAlignerConfig.num_query_tokenz = 3'],
    )


def test_config_gin_of_an_earlier_release_still_loads():
  """A config.gin written when the module was unimoe_jax/model.py (gin `model.UniMoEConfig`)
  builds the same model config as today's text (checkpoints.upgrade_gin_text)."""
  from unimoe_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from unimoe_jax.convert import llava  # pylint: disable=g-import-not-at-top
  from unimoe_jax.network import UniMoEConfig  # pylint: disable=g-import-not-at-top

  cfg = UniMoEConfig(decoder=config_lib.named('tiny'), image_token_id=-7)
  text = llava.model_gin_text(cfg, 'unimoe')
  assert 'network.UniMoEConfig' in text
  old = text.replace('import network', 'import model').replace('network.UniMoE', 'model.UniMoE')
  assert 'network' not in old
  with pytest.raises(ValueError):  # gin alone does not know the old name
    gin.clear_config()
    try:
      gin.parse_config(old)
    finally:
      gin.clear_config()
  assert checkpoints.model_config_from_gin(checkpoints.upgrade_gin_text(old)) == cfg
  assert checkpoints.upgrade_gin_text(text) == text
