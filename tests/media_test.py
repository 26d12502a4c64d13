"""Media preprocessing: parity with transformers' CLIP/Whisper processors, Kaldi fbank checks,
PyAV video sampling, and every error path of the loaders."""

import math
import os
import sys

import numpy as np
import pytest

from unimoe_jax.media import audio as audio_lib
from unimoe_jax.media import image as image_lib
from unimoe_jax.media import video as video_lib
from unimoe_jax.media.errors import MediaError

PIL = pytest.importorskip('PIL')
from PIL import Image  # noqa: E402

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools')
)
import bench_data  # noqa: E402  (official_expand2square, the reference of the pad mode)


def _rng(seed=0):
  return np.random.default_rng(seed)


def _assert_media_error(fn, path, reason_part):
  with pytest.raises(MediaError) as info:
    fn(path)
  message = str(info.value)
  assert os.fspath(path) in message, message
  assert reason_part.lower() in message.lower(), message
  return info.value


def _write_bytes(path, data):
  with open(path, 'wb') as f:
    f.write(data)
  return path


# ------------------------------------------------------------------------------------------------
# Images.


def _clip_processor(size):
  transformers = pytest.importorskip('transformers')
  return transformers.CLIPImageProcessor(
      size={'shortest_edge': size}, crop_size={'height': size, 'width': size}
  )


@pytest.mark.parametrize(
    'width,height,size', [(50, 37, 24), (37, 51, 24), (101, 200, 64), (64, 64, 64), (640, 427, 336)]
)
def test_crop_matches_clip_image_processor(width, height, size):
  array = _rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
  image = Image.fromarray(array)
  expected = _clip_processor(size)(image, return_tensors='np')['pixel_values'][0]
  ours = image_lib.preprocess_image(image, size=size, mode='crop')
  assert ours.shape == (size, size, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected.transpose(1, 2, 0), atol=1e-5, rtol=0)
  # The same uint8 pixels given as an array must give the same result.
  np.testing.assert_array_equal(image_lib.preprocess_image(array, size=size), ours)


@pytest.mark.parametrize('width,height', [(50, 31), (31, 50), (40, 40)])
def test_pad_matches_official_pipeline(width, height):
  size = 32
  image = Image.fromarray(_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8))
  color = tuple(int(m * 255) for m in image_lib.CLIP_MEAN)
  expected = _clip_processor(size)(
      bench_data.official_expand2square(image, color), return_tensors='np'
  )['pixel_values'][0]
  ours = image_lib.preprocess_image(image, size=size, mode='pad')
  np.testing.assert_allclose(ours, expected.transpose(1, 2, 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize('wide', [True, False])
def test_pad_geometry(wide):
  size = 20
  long_side, short_side = 40, 20
  shape = (short_side, long_side, 3) if wide else (long_side, short_side, 3)
  red = np.zeros(shape, np.uint8)
  red[..., 0] = 255
  out = image_lib.preprocess_image(red, size=size, mode='pad')
  mean = np.asarray(image_lib.CLIP_MEAN, np.float32)
  std = np.asarray(image_lib.CLIP_STD, np.float32)
  background = (np.asarray([122, 116, 104], np.float32) / 255 - mean) / std  # int(mean * 255)
  foreground = (np.asarray([1, 0, 0], np.float32) - mean) / std
  if not wide:
    out = out.transpose(1, 0, 2)  # padded columns become rows
  # 40x20 -> 40x40 canvas with 10 padding rows each side -> 20x20 with 5; the 2x bicubic
  # downscale reads 4 source rows either side, which blurs rows 3..6 and 13..16.
  np.testing.assert_allclose(out[:3], np.broadcast_to(background, (3, size, 3)), atol=1e-5)
  np.testing.assert_allclose(out[-3:], np.broadcast_to(background, (3, size, 3)), atol=1e-5)
  np.testing.assert_allclose(out[7:13], np.broadcast_to(foreground, (6, size, 3)), atol=1e-5)


def test_preprocess_image_rejects_bad_arguments():
  image = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match='mode'):
    image_lib.preprocess_image(image, size=4, mode='stretch')
  with pytest.raises(ValueError, match='uint8'):
    image_lib.preprocess_image(np.zeros((8, 8), np.float32), size=4)


def test_load_image_converts_to_rgb(tmp_path):
  rgba = np.zeros((5, 7, 4), np.uint8)
  rgba[..., 1] = 200
  rgba[..., 3] = 255
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
  Image.fromarray(np.full((5, 7), 77, np.uint8), 'L').save(tmp_path / 'g.png')
  a = image_lib.load_image(tmp_path / 'a.png')
  g = image_lib.load_image(str(tmp_path / 'g.png'))
  assert a.mode == 'RGB' and a.size == (7, 5)
  np.testing.assert_array_equal(np.asarray(a)[0, 0], [0, 200, 0])
  np.testing.assert_array_equal(np.asarray(g)[0, 0], [77, 77, 77])


def test_load_image_errors(tmp_path):
  _assert_media_error(image_lib.load_image, tmp_path / 'missing.jpg', 'no such file')
  _assert_media_error(image_lib.load_image, _write_bytes(tmp_path / 'empty.jpg', b''), 'empty')
  corrupt = _write_bytes(tmp_path / 'corrupt.jpg', _rng().bytes(500))
  error = _assert_media_error(image_lib.load_image, corrupt, 'cannot identify image file')
  assert str(error).startswith(f'cannot decode image {corrupt}: ')
  Image.fromarray(_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / 'f.jpg')
  data = (tmp_path / 'f.jpg').read_bytes()
  truncated = _write_bytes(tmp_path / 'truncated.jpg', data[: len(data) // 2])
  _assert_media_error(image_lib.load_image, truncated, 'truncated')
  _assert_media_error(image_lib.load_image, tmp_path, 'not a regular file')


# ------------------------------------------------------------------------------------------------
# Audio loading.


def test_load_audio_mono_passthrough(tmp_path):
  import soundfile

  wave = (0.5 * _rng().standard_normal(8000)).clip(-1, 1).astype(np.float32)
  soundfile.write(tmp_path / 'a.flac', wave, 16000, subtype='PCM_24')
  expected, _ = soundfile.read(tmp_path / 'a.flac', dtype='float32')
  loaded = audio_lib.load_audio(tmp_path / 'a.flac')
  assert loaded.dtype == np.float32 and loaded.shape == (8000,)
  np.testing.assert_array_equal(loaded, expected)
  np.testing.assert_allclose(loaded, wave, atol=1e-6)  # 24-bit quantisation only


@pytest.mark.parametrize('orig_sr', [44100, 8000])
def test_resample_equals_librosa(orig_sr):
  librosa = pytest.importorskip('librosa')
  wave = _rng(orig_sr).standard_normal(orig_sr // 3 + 7).astype(np.float32)
  ours = audio_lib.resample(wave, orig_sr, 16000)
  expected = librosa.resample(wave, orig_sr=orig_sr, target_sr=16000)
  assert ours.dtype == expected.dtype == np.float32 and ours.shape == expected.shape
  np.testing.assert_array_equal(ours, expected)


def _peak_frequency(wave, sample_rate):
  spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
  return np.argmax(spectrum) * sample_rate / wave.size


def test_load_audio_stereo_resampled(tmp_path):
  import soundfile

  rate, seconds = 44100, 1.0
  t = np.arange(int(rate * seconds)) / rate
  left = 0.4 * np.sin(2 * np.pi * 440 * t)
  right = 0.4 * np.sin(2 * np.pi * 1000 * t)
  soundfile.write(
      tmp_path / 's.wav', np.stack([left, right], 1).astype(np.float32), rate, subtype='FLOAT'
  )
  loaded = audio_lib.load_audio(tmp_path / 's.wav', sample_rate=16000)
  assert loaded.shape == (16000,) and loaded.dtype == np.float32
  # Both tones survive at their frequencies with equal weight: the channels were averaged.
  spectrum = np.abs(np.fft.rfft(loaded))  # 1 s at 16 kHz: bin k is k Hz
  assert abs(spectrum[440] / spectrum[1000] - 1) < 0.05
  assert spectrum[440] > 100 * np.median(spectrum)
  assert abs(np.max(np.abs(loaded)) - 0.4) < 0.1  # mean of two 0.4 tones, never the sum


def test_load_audio_pyav_fallback(tmp_path):
  av = pytest.importorskip('av')
  rate = 16000
  t = np.arange(rate) / rate
  tone = (0.3 * np.sin(2 * np.pi * 700 * t)).astype(np.float32)
  path = tmp_path / 'tone.mp4'  # libsndfile cannot read mp4/aac; PyAV must take over.
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('aac', rate=rate, layout='mono')
    for start in range(0, rate, 1024):
      frame = av.AudioFrame.from_ndarray(
          tone[None, start : start + 1024], format='fltp', layout='mono'
      )
      frame.sample_rate = rate
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode(None):
      container.mux(packet)
  loaded = audio_lib.load_audio(path)
  assert abs(loaded.size - rate) < 2048
  assert abs(_peak_frequency(loaded, rate) - 700) < 5


def test_load_audio_errors(tmp_path):
  import soundfile

  _assert_media_error(audio_lib.load_audio, tmp_path / 'missing.wav', 'no such file')
  _assert_media_error(audio_lib.load_audio, _write_bytes(tmp_path / 'empty.wav', b''), 'empty')
  _assert_media_error(
      audio_lib.load_audio, _write_bytes(tmp_path / 'corrupt.wav', _rng().bytes(2000)), 'soundfile'
  )
  soundfile.write(tmp_path / 'zero.wav', np.zeros((0,), np.float32), 16000)
  assert os.path.getsize(tmp_path / 'zero.wav') > 0  # a valid header with no samples
  _assert_media_error(audio_lib.load_audio, tmp_path / 'zero.wav', 'zero-length')


# ------------------------------------------------------------------------------------------------
# Whisper log-mel.


def _test_signal(seconds, seed=0):
  t = np.arange(int(16000 * seconds)) / 16000
  chirp = 0.3 * np.sin(2 * np.pi * (150 + 400 * t) * t)
  return (chirp + 0.05 * _rng(seed).standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize('n_mels', [80, 128])
@pytest.mark.parametrize('seconds', [4.3, 31.0])
def test_whisper_log_mel_matches_transformers(n_mels, seconds):
  transformers = pytest.importorskip('transformers')
  wave = _test_signal(seconds)
  extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)
  expected = extractor(wave, sampling_rate=16000, return_tensors='np').input_features[0]
  ours = audio_lib.whisper_log_mel(wave, n_mels=n_mels)
  assert ours.shape == (3000, n_mels) and ours.dtype == np.float32
  error = np.abs(ours - expected.T).max()
  assert error < 1e-4, error
  assert np.ptp(ours) > 1.0  # not a constant output that would match trivially


def test_whisper_log_mel_rejects_empty():
  with pytest.raises(ValueError, match='zero samples'):
    audio_lib.whisper_log_mel(np.zeros((0,), np.float32))


# ------------------------------------------------------------------------------------------------
# Kaldi fbank / BEATs.


def _expected_peak_bin(freq, num_bins=128, low=20.0, high=8000.0):
  """Nearest filter centre (the HTK formula, written here independently of the code)."""
  mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)
  delta = (mel(high) - mel(low)) / (num_bins + 1)
  centres = [mel(low) + (i + 1) * delta for i in range(num_bins)]
  return int(np.argmin([abs(c - mel(freq)) for c in centres]))


# Tones on FFT bins (multiples of 16000 / 512 Hz) whose nearest filter centre is clear. Below
# ~1 kHz the filters are narrower than an FFT bin, so the nearest-centre rule does not hold there.
@pytest.mark.parametrize('freq', [1500.0, 2250.0, 4000.0, 6750.0])
def test_kaldi_fbank_sine_peak(freq):
  t = np.arange(16000) / 16000
  wave = 0.5 * np.sin(2 * np.pi * freq * t) * 2**15
  fbank = audio_lib.kaldi_fbank(wave, num_mel_bins=128)
  peaks = np.argmax(fbank, axis=1)
  assert np.all(peaks == _expected_peak_bin(freq)), (np.unique(peaks), _expected_peak_bin(freq))


@pytest.mark.parametrize('num_samples', [400, 401, 559, 560, 16000, 480000])
def test_kaldi_fbank_frame_count(num_samples):
  wave = _rng().standard_normal(num_samples)
  expected = 1 + (num_samples - 400) // 160  # snip_edges: 25 ms windows every 10 ms
  assert audio_lib.kaldi_num_frames(num_samples) == expected
  assert audio_lib.kaldi_fbank(wave).shape == (expected, 128)


def test_kaldi_fbank_too_short():
  with pytest.raises(ValueError, match='at least one window'):
    audio_lib.kaldi_fbank(np.ones(399))


def _torch_kaldi_fbank(wave, num_mel_bins=128, dtype='float32'):
  """A torch transcription of torchaudio.compliance.kaldi.fbank with BEATs' arguments, operation
  by operation, used when torchaudio itself is not installed (torchaudio runs it in float32)."""
  torch = pytest.importorskip('torch')
  x = torch.from_numpy(np.asarray(wave, dtype))
  size, shift, padded = 400, 160, 512
  frames = x.as_strided((1 + (x.numel() - size) // shift, size), (shift, 1))
  frames = frames - frames.mean(dim=1, keepdim=True)
  previous = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode='replicate').squeeze(0)
  frames = frames - 0.97 * previous[:, :-1]
  frames = frames * torch.hann_window(size, periodic=False, dtype=x.dtype).pow(0.85)
  frames = torch.nn.functional.pad(frames, (0, padded - size))
  spectrum = torch.fft.rfft(frames).abs().pow(2.0)
  mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)
  low, high = mel(20.0), mel(8000.0)
  delta = (high - low) / (num_mel_bins + 1)
  index = torch.arange(num_mel_bins, dtype=x.dtype).unsqueeze(1)
  left, centre, right = (
      low + index * delta,
      low + (index + 1.0) * delta,
      low + (index + 2.0) * delta,
  )
  fft_mel = 1127.0 * (1.0 + 16000 / padded * torch.arange(padded // 2, dtype=x.dtype) / 700.0).log()
  banks = torch.clamp(
      torch.min((fft_mel - left) / (centre - left), (right - fft_mel) / (right - centre)), min=0.0
  )
  banks = torch.nn.functional.pad(banks, (0, 1))
  energies = spectrum @ banks.T
  return torch.clamp(energies, min=torch.finfo(torch.float32).eps).log().numpy()


def _fbank_test_wave():
  t = np.arange(16000 * 2) / 16000
  wave = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.05 * _rng(3).standard_normal(t.size)
  wave[8000:12000] = 0.0  # silence exercises the epsilon floor
  return wave.astype(np.float32)


def test_kaldi_fbank_matches_torch_transcription():
  wave = _fbank_test_wave() * 2**15
  ours = audio_lib.kaldi_fbank(wave)
  # In float64 the two agree to rounding; torchaudio's float32 differs by up to ~4e-4 (measured),
  # in bins ~16 nats below the frame's loudest, where float32 FFT noise dominates.
  exact = _torch_kaldi_fbank(wave, dtype='float64')
  assert ours.shape == exact.shape
  assert np.abs(ours - exact).max() < 1e-5, np.abs(ours - exact).max()
  error = np.abs(ours - _torch_kaldi_fbank(wave, dtype='float32')).max()
  assert error < 1e-3, error


def test_kaldi_fbank_matches_torchaudio_if_installed():
  kaldi = pytest.importorskip('torchaudio.compliance.kaldi')
  torch = pytest.importorskip('torch')
  wave = _fbank_test_wave()
  expected = kaldi.fbank(
      torch.from_numpy(wave).unsqueeze(0) * 2**15,
      num_mel_bins=128,
      sample_frequency=16000,
      frame_length=25,
      frame_shift=10,
  ).numpy()
  error = np.abs(audio_lib.kaldi_fbank(wave * 2**15) - expected).max()
  assert error < 1e-3, error


def test_beats_fbank_normalisation_and_chunk_shape():
  wave = _fbank_test_wave()
  raw = audio_lib.kaldi_fbank(wave.astype(np.float64) * 32768.0)
  np.testing.assert_allclose(
      audio_lib.beats_fbank(wave), (raw - 15.41663) / (2 * 6.55582), atol=1e-5
  )
  chunk = np.resize(wave, 480000)  # one official 30 s chunk -> 2998 frames
  assert audio_lib.beats_fbank(chunk).shape == (2998, 128)
  with pytest.raises(ValueError, match='16 kHz'):
    audio_lib.beats_fbank(wave, sample_rate=8000)


# ------------------------------------------------------------------------------------------------
# Video.


def _frame_color(index):
  return np.asarray([10 + 12 * index, 245 - 12 * index, 128], np.uint8)


def _write_video(path, num_frames, codec, size=32):
  av = pytest.importorskip('av')
  if codec not in av.codecs_available:
    pytest.skip(f'codec {codec} not in this PyAV build')
  with av.open(str(path), 'w') as container:
    stream = container.add_stream(codec, rate=10)
    stream.width = stream.height = size
    stream.pix_fmt = 'yuv420p' if codec != 'ffv1' else 'bgr0'
    if codec == 'mpeg4':
      stream.options = {'qscale': '2'}
    container.start_encoding()  # writes the header even when no frame follows
    for i in range(num_frames):
      pixels = np.broadcast_to(_frame_color(i), (size, size, 3)).copy()
      for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode(None):
      container.mux(packet)
  return path


def _decoded_indices(frames):
  table = np.stack([_frame_color(i) for i in range(20)]).astype(np.float32)
  means = frames.reshape(frames.shape[0], -1, 3).mean(axis=1)
  distance = np.abs(means[:, None, :] - table[None]).max(-1)
  # Colours are 12 apart: within 6 of one entry is an unambiguous match (mpeg4 is lossy).
  assert np.all(distance.min(axis=1) < 6), distance.min(axis=1)
  return distance.argmin(axis=1)


def test_sample_frame_indices():
  np.testing.assert_array_equal(video_lib.sample_frame_indices(20, 8), [0, 3, 5, 8, 11, 14, 16, 19])
  np.testing.assert_array_equal(video_lib.sample_frame_indices(8, 8), np.arange(8))
  np.testing.assert_array_equal(video_lib.sample_frame_indices(3, 6), [0, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(video_lib.sample_frame_indices(1, 3), [0, 0, 0])


# mp4 declares its frame count; Matroska does not, which takes the count-then-decode path.
@pytest.mark.parametrize('codec,suffix', [('mpeg4', 'mp4'), ('ffv1', 'mkv')])
def test_load_video_frames_uniform(tmp_path, codec, suffix):
  path = _write_video(tmp_path / f'v.{suffix}', 20, codec)
  frames = video_lib.load_video_frames(path, num_frames=8)
  assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
  np.testing.assert_array_equal(_decoded_indices(frames), [0, 3, 5, 8, 11, 14, 16, 19])
  frames = video_lib.load_video_frames(path, num_frames=24)  # more than the clip has
  np.testing.assert_array_equal(_decoded_indices(frames), list(range(20)) + [19] * 4)


def test_load_video_errors(tmp_path):
  import soundfile

  path = _write_video(tmp_path / 'v.mp4', 20, 'mpeg4')
  data = path.read_bytes()
  truncated = _write_bytes(tmp_path / 'truncated.mp4', data[: len(data) // 2])
  _assert_media_error(video_lib.load_video_frames, truncated, 'cannot decode video')
  _assert_media_error(
      video_lib.load_video_frames,
      _write_bytes(tmp_path / 'corrupt.mp4', _rng().bytes(3000)),
      'video',
  )
  _assert_media_error(video_lib.load_video_frames, tmp_path / 'missing.mp4', 'no such file')
  _assert_media_error(video_lib.load_video_frames, _write_bytes(tmp_path / 'e.mp4', b''), 'empty')
  soundfile.write(tmp_path / 'a.wav', np.zeros(1600, np.float32), 16000)
  _assert_media_error(video_lib.load_video_frames, tmp_path / 'a.wav', 'no video stream')


def test_load_video_zero_frames(tmp_path):
  # AVI keeps a readable header with a video stream and no frames (header-only mkv/mp4 do not).
  path = _write_video(tmp_path / 'none.avi', 0, 'mpeg4')
  _assert_media_error(video_lib.load_video_frames, path, 'zero-length')


def test_load_frame_list(tmp_path):
  paths = []
  for i in range(10):
    paths.append(tmp_path / f'frame_{i:03d}.png')
    Image.fromarray(np.broadcast_to(_frame_color(i), (6, 9, 3)).copy()).save(paths[-1])
  frames = video_lib.load_frame_list(paths, num_frames=4)
  assert frames.shape == (4, 6, 9, 3) and frames.dtype == np.uint8
  np.testing.assert_array_equal(frames[:, 0, 0], [_frame_color(i) for i in (0, 3, 6, 9)])
  assert video_lib.load_frame_list(paths[:3], num_frames=None).shape == (3, 6, 9, 3)
  np.testing.assert_array_equal(
      video_lib.load_frame_list(paths[:2], num_frames=3)[:, 0, 0],
      [_frame_color(i) for i in (0, 1, 1)],
  )
  processed = video_lib.preprocess_video(frames, size=6)
  assert processed.shape == (4, 6, 6, 3) and processed.dtype == np.float32
  np.testing.assert_array_equal(processed[2], image_lib.preprocess_image(frames[2], size=6))


def test_load_frame_list_errors(tmp_path):
  good = tmp_path / 'good.png'
  Image.fromarray(np.zeros((6, 9, 3), np.uint8)).save(good)
  other = tmp_path / 'other.png'
  Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(other)
  _assert_media_error(
      lambda p: video_lib.load_frame_list([good, p]), tmp_path / 'gone.png', 'no such file'
  )
  _assert_media_error(lambda p: video_lib.load_frame_list([good, p]), other, 'differs')
  with pytest.raises(ValueError, match='at least one'):
    video_lib.load_frame_list([])
