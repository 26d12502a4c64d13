"""Issue 21: high bit-depth images are scaled to 8 bits, not clipped white, and extreme aspect
ratios preprocess in bounded memory (unimoe_jax/media/image.py)."""

import struct
import time
import zlib

import numpy as np
import pytest

from unimoe_jax.media import image as image_lib
from unimoe_jax.media.errors import MediaError

PIL = pytest.importorskip('PIL')
from PIL import Image  # noqa: E402


def _write_png(path, array, bit_depth):
  """A PNG written byte by byte (Pillow cannot write 16-bit colour PNGs). array `[h, w]` or
  `[h, w, c]`, c = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA."""
  a = np.asarray(array)
  if a.ndim == 2:
    a = a[..., None]
  height, width, channels = a.shape
  color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
  dtype = '>u2' if bit_depth == 16 else 'u1'
  raw = b''.join(b'\x00' + a[y].astype(dtype).tobytes() for y in range(height))

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

  header = struct.pack('>IIBBBBB', width, height, bit_depth, color_type, 0, 0, 0)
  with open(path, 'wb') as f:
    f.write(
        b'\x89PNG\r\n\x1a\n'
        + chunk(b'IHDR', header)
        + chunk(b'IDAT', zlib.compress(raw))
        + chunk(b'IEND', b'')
    )
  return str(path)


@pytest.mark.parametrize('channels', [1, 2, 3, 4])
def test_a_16_bit_png_loads_as_its_8_bit_twin(tmp_path, channels):
  rng = np.random.default_rng(channels)
  shape = (23, 31) if channels == 1 else (23, 31, channels)
  v8 = rng.integers(0, 256, shape).astype(np.uint16)
  deep = image_lib.load_image(_write_png(tmp_path / 'deep.png', v8 * 257, 16))
  flat = image_lib.load_image(_write_png(tmp_path / 'flat.png', v8, 8))
  np.testing.assert_array_equal(np.asarray(deep), np.asarray(flat))
  np.testing.assert_array_equal(
      image_lib.preprocess_image(deep, size=16), image_lib.preprocess_image(flat, size=16)
  )


def test_a_16_bit_mid_grey_is_not_white(tmp_path):
  path = _write_png(tmp_path / 'grey.png', np.full((8, 8), 32768, np.uint16), 16)
  pixels = np.asarray(image_lib.load_image(path))
  assert np.all(pixels == 128), np.unique(pixels)


def test_integer_and_float_modes_scale():
  v8 = np.arange(0, 256, dtype=np.int64).reshape(16, 16)
  want = np.repeat(v8.astype(np.uint8)[..., None], 3, axis=-1)
  sixteen = Image.fromarray((v8 * 257).astype(np.int32), mode='I')  # older Pillow's 16-bit PNG
  np.testing.assert_array_equal(np.asarray(image_lib.to_rgb(sixteen)), want)
  unit = Image.fromarray((v8 / 255).astype(np.float32), mode='F')  # a 0..1 float TIFF
  np.testing.assert_array_equal(np.asarray(image_lib.to_rgb(unit)), want)
  byte_scale = Image.fromarray(v8.astype(np.float32), mode='F')  # Pillow's 0..255 'F' scale
  np.testing.assert_array_equal(np.asarray(image_lib.to_rgb(byte_scale)), want)


@pytest.mark.parametrize(
    'mode,values,message',
    [
        ('I', [0, 70000], r"'I' \(32-bit integer\) pixels span 0..70000"),
        ('I', [-3, 10], r"'I' \(32-bit integer\) pixels span -3..10"),
        ('F', [0.0, 300.0], r"'F' \(float\) pixels span 0..300"),
        ('F', [0.0, np.nan], 'non-finite'),
    ],
)
def test_pixels_without_a_white_level_are_refused(mode, values, message):
  array = np.array([values], np.int32 if mode == 'I' else np.float32)
  with pytest.raises(ValueError, match=message):
    image_lib.preprocess_image(Image.fromarray(array, mode=mode), size=4)


def test_a_float_tiff_file_loads_and_a_bad_one_names_the_file(tmp_path):
  good = tmp_path / 'unit.tiff'
  Image.fromarray(np.full((4, 4), 0.5, np.float32), mode='F').save(good)
  assert np.all(np.asarray(image_lib.load_image(good)) == 128)
  bad = tmp_path / 'hdr.tiff'
  Image.fromarray(np.full((4, 4), 1000.0, np.float32), mode='F').save(bad)
  with pytest.raises(MediaError) as info:
    image_lib.load_image(bad)
  assert str(bad) in str(info.value) and "'F' (float) pixels span" in str(info.value)


@pytest.mark.parametrize(
    'width,height',
    [
        (200, 3),
        (3, 150),
        (401, 5),
        (7, 300),
        (1000, 40),
        (50, 1300),
        (2000, 1),
        (1, 900),
        (40, 1000),
        (1300, 50),
        (30, 4000),
        (4000, 30),
        (100, 3000),
    ],
)
def test_the_cropped_resize_matches_the_full_one(width, height):
  size = 24
  rng = np.random.default_rng(width * height)
  image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
  short, long = sorted((width, height))
  assert int(size * long / short) * size > image_lib.MAX_RESIZED_PIXELS_FACTOR * size * size
  full = image_lib.center_crop(np.asarray(image_lib.resize_shortest_edge(image, size)), size)
  cropped = image_lib.resize_and_center_crop(image, size)
  assert cropped.shape == (size, size, 3)
  np.testing.assert_array_equal(cropped, full)


def _record_sizes(monkeypatch):
  """Pixel counts of every image Pillow's resize / new / reduce builds."""
  sizes = []
  for name in ('resize', 'reduce'):
    original = getattr(Image.Image, name)

    def spy(self, *args, _original=original, **kwargs):
      out = _original(self, *args, **kwargs)
      sizes.append(out.width * out.height)
      return out

    monkeypatch.setattr(Image.Image, name, spy)
  original_new = Image.new

  def new(mode, size, *args, **kwargs):
    sizes.append(size[0] * size[1])
    return original_new(mode, size, *args, **kwargs)

  monkeypatch.setattr(Image, 'new', new)
  return sizes


@pytest.mark.parametrize(
    'width,height,mode,bound',
    [
        (2000, 1, 'crop', image_lib.MAX_RESIZED_PIXELS_FACTOR * 336**2),
        (1, 2000, 'crop', image_lib.MAX_RESIZED_PIXELS_FACTOR * 336**2),
        (2000, 1, 'pad', 2000**2),
        (100_000, 2, 'pad', image_lib.MAX_PAD_SIDE**2),
    ],
)
def test_extreme_aspect_ratios_stay_bounded(monkeypatch, width, height, mode, bound):
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
  sizes = _record_sizes(monkeypatch)
  start = time.perf_counter()
  out = image_lib.preprocess_image(image, size=336, mode=mode)
  seconds = time.perf_counter() - start
  assert out.shape == (336, 336, 3) and np.all(np.isfinite(out))
  assert sizes and max(sizes) <= bound, (max(sizes), bound)
  assert seconds < 10, seconds
