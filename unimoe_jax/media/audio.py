"""Audio loading and the two front-ends Uni-MoE's encoders expect, in numpy (no torch).

* `whisper_log_mel`: Whisper's log-mel spectrogram (speech encoder), time-major `[3000, n_mels]`.
* `kaldi_fbank` / `beats_fbank`: the Kaldi-compatible log filterbank that BEATs (audio encoder)
  computes with `torchaudio.compliance.kaldi.fbank`, time-major `[frames, 128]`.

Both are computed in float64 and returned as float32; the references (torch) work in float32, so
they agree to float32 rounding (see tests/media_test.py for the measured error).
"""

import functools
from typing import List, Optional, Tuple

import numpy as np

from unimoe_jax.media.errors import MediaError, PathLike, check_readable_file

SAMPLE_RATE = 16000  # Hz: what Whisper and BEATs read; every audio loader resamples to it.
WHISPER_SECONDS = 30  # Whisper's window: 3000 log-mel frames (100 per second).
WHISPER_N_FFT = 400
WHISPER_HOP_LENGTH = 160
WHISPER_FRAMES_PER_SECOND = SAMPLE_RATE // WHISPER_HOP_LENGTH  # 100 log-mel frames

# BEATs' `preprocess` (official Uni_MoE_audio/model/audio_encoder/BEATs.py) defaults.
BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582
BEATS_WAVE_SCALE = 2.0**15  # BEATs feeds torchaudio 16-bit integer units, not [-1, 1].
BEATS_MEL_BINS = 128

# Kaldi floors spectra and energies at float32's machine epsilon
# (torchaudio: torch.finfo(float).eps).
_FLOAT32_EPS = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------------------------
# Loading.


def _decode_with_soundfile(path: str):
  import soundfile

  samples, rate = soundfile.read(path, dtype='float32', always_2d=True)
  return samples.T, rate  # [channels, samples]


def _decode_with_pyav(path: str):
  """Fallback for containers libsndfile does not read (m4a, mp4 audio tracks, ...)."""
  import av

  with av.open(path) as container:
    if not container.streams.audio:
      raise ValueError('no audio stream')
    stream = container.streams.audio[0]
    rate = stream.codec_context.sample_rate or stream.rate
    # Planar float keeps channels separate and needs no integer rescaling.
    resampler = av.AudioResampler(format='fltp', layout=stream.layout.name, rate=rate)
    chunks = []
    for frame in container.decode(stream):
      for converted in resampler.resample(frame):
        chunks.append(converted.to_ndarray())
    for converted in resampler.resample(None):
      chunks.append(converted.to_ndarray())
  if not chunks:
    return np.zeros((1, 0), np.float32), rate
  return np.concatenate(chunks, axis=1).astype(np.float32), rate


def load_audio(path: PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Decodes an audio file to mono float32 at `sample_rate`, as the official data loader does.

  Channels are averaged (as librosa.to_mono) and the result is resampled as `librosa.resample`
  (its default soxr_hq, see `resample`) when the file's rate differs, as official `train/data.py`.

  Returns:
    `[samples]` float32, nominally in [-1, 1].

  Raises:
    MediaError: missing, empty, undecodable file, or one with zero samples.
  """
  path = check_readable_file('audio', path)
  try:
    samples, rate = _decode_with_soundfile(path)
  except Exception as soundfile_error:  # libsndfile raises RuntimeError subclasses and others.
    try:
      samples, rate = _decode_with_pyav(path)
    except Exception as pyav_error:
      raise MediaError(
          'audio', path, f'soundfile: {soundfile_error}; PyAV: {pyav_error}'.replace('\n', ' ')
      ) from None
  if samples.shape[-1] == 0:
    raise MediaError('audio', path, 'zero-length audio (0 samples)')
  wave = samples.mean(axis=0, dtype=np.float32) if samples.shape[0] > 1 else samples[0]
  if not np.all(np.isfinite(wave)):
    raise MediaError('audio', path, 'non-finite samples')
  if rate != sample_rate:
    wave = resample(wave, rate, sample_rate)
  return np.ascontiguousarray(wave, dtype=np.float32)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
  """Equal to `librosa.resample(wave, orig_sr=..., target_sr=...)` with its default 'soxr_hq':
  soxr's HQ resampler, then zero-padded or trimmed to ceil(samples * target_sr / orig_sr).

  soxr is called directly because importing librosa.core costs seconds (scipy.signal, numba) in
  every data-loading process; tests check the two agree exactly.
  """
  import soxr

  if orig_sr == target_sr:
    return wave
  length = int(np.ceil(wave.shape[-1] * float(target_sr) / orig_sr))
  out = soxr.resample(wave, orig_sr, target_sr, quality='soxr_hq')
  out = out[:length] if out.shape[-1] >= length else np.pad(out, (0, length - out.shape[-1]))
  return np.asarray(out, dtype=wave.dtype)


# --------------------------------------------------------------------------------------------
# Whisper.


def _slaney_mel(freq):
  """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, log above."""
  freq = np.asarray(freq, np.float64)
  min_log_hz, min_log_mel, log_step = 1000.0, 15.0, np.log(6.4) / 27.0
  linear = 3.0 * freq / 200.0
  logarithmic = min_log_mel + np.log(np.maximum(freq, min_log_hz) / min_log_hz) / log_step
  return np.where(freq >= min_log_hz, logarithmic, linear)


def _slaney_mel_inverse(mel):
  mel = np.asarray(mel, np.float64)
  min_log_hz, min_log_mel, log_step = 1000.0, 15.0, np.log(6.4) / 27.0
  linear = 200.0 * mel / 3.0
  logarithmic = min_log_hz * np.exp(log_step * (mel - min_log_mel))
  return np.where(mel >= min_log_mel, logarithmic, linear)


@functools.lru_cache(maxsize=8)
def whisper_mel_filters(
    n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = WHISPER_N_FFT
) -> np.ndarray:
  """Slaney-scale, Slaney-normalised (unit area) triangular mel filters from 0 Hz to Nyquist,
  `[n_mels, n_fft // 2 + 1]` float64: what `librosa.filters.mel(sr, n_fft, n_mels)` gives and
  Whisper's `mel_filters.npz` holds."""
  fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
  edges = _slaney_mel_inverse(
      np.linspace(_slaney_mel(0.0), _slaney_mel(sample_rate / 2), n_mels + 2)
  )
  widths = np.diff(edges)
  offsets = edges[:, None] - fft_freqs[None, :]
  lower = -offsets[:-2] / widths[:-1, None]
  upper = offsets[2:] / widths[1:, None]
  filters = np.maximum(0.0, np.minimum(lower, upper))
  filters *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
  filters.setflags(write=False)
  return filters


def _frames(signal: np.ndarray, frame_length: int, hop: int, num_frames: int) -> np.ndarray:
  """A read-only strided view `[num_frames, frame_length]` of a 1-D contiguous signal."""
  stride = signal.strides[0]
  return np.lib.stride_tricks.as_strided(
      signal, shape=(num_frames, frame_length), strides=(hop * stride, stride), writeable=False
  )


def whisper_log_mel(
    wave: np.ndarray,
    n_mels: int = 80,
    chunk_seconds: int = WHISPER_SECONDS,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
  """Whisper's log-mel spectrogram of one 16 kHz waveform.

  Recipe (openai/whisper `log_mel_spectrogram` and transformers' WhisperFeatureExtractor): zero-pad
  or trim to `chunk_seconds`; centred STFT (reflect padding) with n_fft 400, hop 160 and a
  periodic Hann window; power; Slaney mel filters; log10 floored at 1e-10; clamp to (max - 8);
  (x + 4) / 4; the last STFT frame is dropped so 30 s gives exactly 3000 frames.

  Args:
    wave: `[samples]` float waveform at `sample_rate`.
    n_mels: 80 (Whisper up to large-v2) or 128 (large-v3).

  Returns:
    `[chunk_seconds * 100, n_mels]` float32, time-major.
  """
  wave = np.asarray(wave, dtype=np.float64)
  if wave.ndim != 1:
    raise ValueError(f'wave must be 1-D [samples], got shape {wave.shape}')
  if wave.size == 0:
    raise ValueError('wave has zero samples')
  num_samples = chunk_seconds * sample_rate
  wave = wave[:num_samples]
  wave = np.pad(wave, (0, num_samples - wave.size))
  half = WHISPER_N_FFT // 2
  padded = np.pad(wave, (half, half), mode='reflect')
  num_frames = num_samples // WHISPER_HOP_LENGTH  # one fewer than the STFT gives: last dropped.
  n = np.arange(WHISPER_N_FFT)
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / WHISPER_N_FFT)  # periodic, as torch.hann_window
  frames = _frames(padded, WHISPER_N_FFT, WHISPER_HOP_LENGTH, num_frames) * hann
  power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2  # [frames, n_fft // 2 + 1]
  mel = power @ whisper_mel_filters(n_mels, sample_rate).T  # [frames, n_mels]
  log_mel = np.log10(np.maximum(mel, 1e-10))
  log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
  return ((log_mel + 4.0) / 4.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Kaldi filterbank (torchaudio.compliance.kaldi.fbank) and BEATs.


def htk_mel(freq):
  """Kaldi/HTK mel scale: 1127 ln(1 + f / 700)."""
  return 1127.0 * np.log1p(np.asarray(freq, np.float64) / 700.0)


def kaldi_num_frames(
    num_samples: int,
    sample_rate: int = SAMPLE_RATE,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> int:
  """Frames Kaldi gives with snip_edges=True: 1 + (samples - window) // shift (0 if too short)."""
  window = int(sample_rate * frame_length_ms * 0.001)
  shift = int(sample_rate * frame_shift_ms * 0.001)
  return 0 if num_samples < window else 1 + (num_samples - window) // shift


@functools.lru_cache(maxsize=8)
def kaldi_mel_banks(
    num_mel_bins: int,
    padded_window_size: int,
    sample_rate: float,
    low_freq: float,
    high_freq: float,
) -> np.ndarray:
  """Kaldi's triangular mel filters `[num_mel_bins, padded_window_size // 2 + 1]` float64.

  Triangles are linear in HTK mel between equally spaced (in mel) edges from low_freq to
  high_freq (<= 0 means an offset from Nyquist); the Nyquist FFT bin always gets weight 0.
  """
  if num_mel_bins <= 3:
    raise ValueError(f'num_mel_bins must be > 3, got {num_mel_bins}')
  nyquist = 0.5 * sample_rate
  if high_freq <= 0.0:
    high_freq += nyquist
  if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
    raise ValueError(f'bad low_freq {low_freq} / high_freq {high_freq} for Nyquist {nyquist}')
  mel_low, mel_high = htk_mel(low_freq), htk_mel(high_freq)
  delta = (mel_high - mel_low) / (num_mel_bins + 1)
  index = np.arange(num_mel_bins, dtype=np.float64)[:, None]
  left = mel_low + index * delta
  center = mel_low + (index + 1.0) * delta
  right = mel_low + (index + 2.0) * delta
  num_fft_bins = padded_window_size // 2
  fft_mel = htk_mel(sample_rate / padded_window_size * np.arange(num_fft_bins))[None, :]
  up = (fft_mel - left) / (center - left)
  down = (right - fft_mel) / (right - center)
  banks = np.maximum(0.0, np.minimum(up, down))
  banks = np.pad(banks, ((0, 0), (0, 1)))  # Nyquist column
  banks.setflags(write=False)
  return banks


def kaldi_fbank(
    wave: np.ndarray,
    num_mel_bins: int = BEATS_MEL_BINS,
    sample_rate: int = SAMPLE_RATE,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    preemphasis: float = 0.97,
    dither: float = 0.0,
    rng: Optional[np.random.Generator] = None,
) -> np.ndarray:
  """Log mel filterbank equal to `torchaudio.compliance.kaldi.fbank(wave[None], ...)`.

  Fixed to torchaudio's defaults for everything BEATs does not pass: povey window
  (Hann(non-periodic) ** 0.85), DC offset removed per frame, pre-emphasis with the first sample
  replicated, FFT size rounded up to a power of two (400 -> 512), snip_edges (only frames that
  fit), power spectrum, no energy column, natural log floored at float32 epsilon. torchaudio's
  dither default is 0.0 (deterministic); a nonzero `dither` adds `dither * N(0, 1)` per sample.

  Args:
    wave: `[samples]` waveform in the units the caller would give torchaudio (BEATs: int16 range).

  Returns:
    `[frames, num_mel_bins]` float32, frames = 1 + (samples - window) // shift.
  """
  wave = np.ascontiguousarray(wave, dtype=np.float64)
  if wave.ndim != 1:
    raise ValueError(f'wave must be 1-D [samples], got shape {wave.shape}')
  window_size = int(sample_rate * frame_length_ms * 0.001)
  window_shift = int(sample_rate * frame_shift_ms * 0.001)
  if window_size < 2 or window_shift <= 0:
    raise ValueError(f'bad frame_length_ms {frame_length_ms} / frame_shift_ms {frame_shift_ms}')
  if wave.size < window_size:
    raise ValueError(
        f'wave has {wave.size} samples; kaldi_fbank needs at least one window of ' f'{window_size}'
    )
  if not 0.0 <= preemphasis <= 1.0:
    raise ValueError(f'preemphasis must be in [0, 1], got {preemphasis}')
  padded_size = 1 << (window_size - 1).bit_length()
  frames = np.array(
      _frames(
          wave,
          window_size,
          window_shift,
          kaldi_num_frames(wave.size, sample_rate, frame_length_ms, frame_shift_ms),
      )
  )
  if dither != 0.0:
    rng = rng if rng is not None else np.random.default_rng()
    frames = frames + dither * rng.standard_normal(frames.shape)
  frames -= frames.mean(axis=1, keepdims=True)
  if preemphasis != 0.0:
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - preemphasis * previous
  n = np.arange(window_size)
  povey = (0.5 - 0.5 * np.cos(2 * np.pi * n / (window_size - 1))) ** 0.85
  spectrum = np.abs(np.fft.rfft(frames * povey, n=padded_size, axis=-1)) ** 2
  banks = kaldi_mel_banks(
      num_mel_bins, padded_size, float(sample_rate), float(low_freq), float(high_freq)
  )
  energies = spectrum @ banks.T
  return np.log(np.maximum(energies, _FLOAT32_EPS)).astype(np.float32)


def beats_fbank(
    wave: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    fbank_mean: float = BEATS_FBANK_MEAN,
    fbank_std: float = BEATS_FBANK_STD,
) -> np.ndarray:
  """BEATs' input features (official `BEATs.preprocess` for one waveform).

  The [-1, 1] waveform is scaled by 2**15, turned into a 128-bin Kaldi fbank (25 ms / 10 ms), and
  normalised as (x - 15.41663) / (2 * 6.55582). A 30 s chunk (480000 samples) gives 2998 frames.

  Args:
    wave: `[samples]` float waveform in [-1, 1] at 16 kHz.

  Returns:
    `[frames, 128]` float32.
  """
  if sample_rate != SAMPLE_RATE:
    raise ValueError(f'BEATs expects 16 kHz audio, got sample_rate {sample_rate}')
  fbank = kaldi_fbank(
      np.asarray(wave, np.float64) * BEATS_WAVE_SCALE,
      num_mel_bins=BEATS_MEL_BINS,
      sample_rate=sample_rate,
      frame_length_ms=25.0,
      frame_shift_ms=10.0,
  )
  return ((fbank.astype(np.float64) - fbank_mean) / (2.0 * fbank_std)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Long files and short clips, as the official Uni-MoE loaders cut and pad them.

# Official `train/data.py` / `inference_all.py` chunking. Speech (Uni_MoE_speech) cuts pieces of
# 480001 samples while more than 480000 remain (Whisper's extractor then keeps the first
# 480000) and keeps every piece; audio (Uni_MoE_audio) cuts 480000-sample pieces and keeps at
# most 20 per file (`trunclen`).
SPEECH_CHUNK_SAMPLES = WHISPER_SECONDS * SAMPLE_RATE + 1
BEATS_CHUNK_SAMPLES = WHISPER_SECONDS * SAMPLE_RATE
AUDIO_MAX_CHUNKS = 20
BEATS_CHUNK_FRAMES = 2998  # kaldi_num_frames(480000)
BEATS_MIN_SAMPLES = 400  # one 25 ms Kaldi window
AUDIO_PADDING_MODES = ('official', 'masked')


def split_chunks(
    wave: np.ndarray, chunk_samples: int, max_chunks: Optional[int] = None
) -> List[np.ndarray]:
  """`wave` cut into consecutive pieces of `chunk_samples` (the last one shorter), at most
  `max_chunks` of them (None: all).

  This is the official loop `while len(rest) > 0: if len(rest) > n: cut n ... else: keep the
  rest` for n = `chunk_samples`: a file of exactly k * n samples gives k full pieces.
  """
  wave = np.asarray(wave)
  if wave.ndim != 1:
    raise ValueError(f'split_chunks: wave must be 1-D [samples], got shape {wave.shape}')
  if chunk_samples < 1:
    raise ValueError(f'split_chunks: chunk_samples must be >= 1, got {chunk_samples}')
  if max_chunks is not None and max_chunks < 1:
    raise ValueError(f'split_chunks: max_chunks must be >= 1 or None, got {max_chunks}')
  starts = range(0, wave.size, chunk_samples)
  if max_chunks is not None:
    starts = starts[:max_chunks]
  return [wave[s : s + chunk_samples] for s in starts]


def beats_chunk_features(
    chunk: np.ndarray, padding: str = 'official', frames: int = BEATS_CHUNK_FRAMES
) -> Tuple[np.ndarray, np.ndarray]:
  """One audio item for BEATs: (`[frames, 128]` float32 fbank, `[frames]` bool, True = real).

  `chunk` is one piece of at most 480000 samples (16 kHz, [-1, 1]; see `split_chunks`).

  padding='official' (Uni_MoE_audio `train/data.py` and `inference_all.py`): the waveform is
    padded to 480000 samples by repeating its last sample, the fbank is taken of the padded wave
    (2998 frames), and the sample-level padding mask (True on the repeated samples) is reduced
    to frames as BEATs' `forward_padding_mask` does: the 320-sample tail is cut, and a frame of
    160 consecutive samples is padding only if all of them are, so frame f is real iff
    160 f < len(chunk). The encoder reduces it once more to tokens (encoders/beats.py). The
    first `frames` (<= 2998) frames are returned; only they are computed.
  padding='masked' (ours): the fbank of the chunk as it is (a chunk shorter than one 25 ms
    window is first edge-padded to 400 samples), cut or zero-padded to `frames`, True on the
    frames the chunk itself gave.
  """
  if padding not in AUDIO_PADDING_MODES:
    raise ValueError(f'audio padding must be one of {AUDIO_PADDING_MODES}, got {padding!r}')
  chunk = np.asarray(chunk, np.float32)
  if chunk.ndim != 1 or chunk.size == 0:
    raise ValueError(
        f'beats_chunk_features: chunk must be 1-D and non-empty, got shape ' f'{chunk.shape}'
    )
  if chunk.size > BEATS_CHUNK_SAMPLES:
    raise ValueError(
        f'beats_chunk_features: chunk has {chunk.size} samples, more than one '
        f'{BEATS_CHUNK_SAMPLES}-sample piece; cut it with split_chunks first'
    )
  if frames < 1:
    raise ValueError(f'beats_chunk_features: frames must be >= 1, got {frames}')
  if padding == 'official':
    if frames > BEATS_CHUNK_FRAMES:
      raise ValueError(
          f"audio padding 'official' gives {BEATS_CHUNK_FRAMES} frames per "
          f'{BEATS_CHUNK_SAMPLES}-sample chunk; {frames} frames were asked for'
      )
    length = chunk.size
    padded = np.concatenate([chunk, np.full(BEATS_CHUNK_SAMPLES - length, chunk[-1], np.float32)])
    # Frame f reads samples [160 f, 160 f + 400): the first `frames` need only this prefix.
    needed = (frames - 1) * 160 + 400
    fbank = beats_fbank(padded[:needed])
    sample_padding = np.arange(BEATS_CHUNK_SAMPLES) >= length
    per_frame = BEATS_CHUNK_SAMPLES // BEATS_CHUNK_FRAMES
    frame_padding = (
        sample_padding[: BEATS_CHUNK_FRAMES * per_frame]
        .reshape(BEATS_CHUNK_FRAMES, per_frame)
        .all(axis=1)
    )
    return fbank, ~frame_padding[:frames]
  if chunk.size < BEATS_MIN_SAMPLES:
    chunk = np.pad(chunk, (0, BEATS_MIN_SAMPLES - chunk.size), mode='edge')
  fbank = beats_fbank(chunk)[:frames]
  mask = np.arange(frames) < len(fbank)
  return np.pad(fbank, ((0, frames - len(fbank)), (0, 0))), mask
