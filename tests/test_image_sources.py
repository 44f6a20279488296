"""Image sources that users get wrong: URLs (size and pixel caps, truncated files), 16-bit PNGs, and any bytes,
sizes or modes at all (a property test: the only outcomes are an RGB image or one of the project's errors)."""

import http.server
import io
import threading
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_jax.errors import InputError
from llava_jax.image import ImageError, load_image
from llava_jax.url_image import decode_image, fetch_image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)))


class FakeResponse:
    """What `urllib.request.urlopen` returns, serving `data`; counts the bytes read."""

    def __init__(self, data: bytes, length: int | None):
        self.stream, self.read_bytes = io.BytesIO(data), 0
        self.headers = {} if length is None else {"Content-Length": str(length)}

    def read(self, n=-1):
        chunk = self.stream.read(n)
        self.read_bytes += len(chunk)
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def serving(data: bytes, length: int | None = -1):
    responses = []

    def opener(url, timeout):
        responses.append(FakeResponse(data, len(data) if length == -1 else length))
        return responses[-1]

    return opener, responses


def test_url_image_within_the_limits_is_decoded():
    opener, _ = serving(PNG)
    image = fetch_image("https://example.org/a.png", opener=opener)
    assert image.size == (60, 40)


def test_url_size_cap_from_content_length_reads_nothing():
    opener, responses = serving(b"x" * 5000)
    with pytest.raises(ImageError, match=r"is 5,000 bytes, more than the limit of 1,000.*LLAVA_JAX_MAX_IMAGE_BYTES"):
        fetch_image("https://example.org/big.png", max_bytes=1000, opener=opener)
    assert responses[0].read_bytes == 0


def test_url_size_cap_without_content_length_stops_reading(monkeypatch):
    opener, responses = serving(b"x" * (10 << 20), length=None)  # a server that does not say, or lies
    monkeypatch.setenv("LLAVA_JAX_MAX_IMAGE_BYTES", str(1 << 20))
    with pytest.raises(ImageError, match="more than the limit of 1,048,576 bytes"):
        fetch_image("https://example.org/big.png", opener=opener)
    assert responses[0].read_bytes == (1 << 20) + 1  # one byte past the limit, never the whole body


def test_url_pixel_cap(monkeypatch):
    opener, _ = serving(PNG)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # the 60x40 PNG has 2,400 pixels
    with pytest.raises(ImageError, match=r"is 60x40 = 2,400 pixels, more than the limit of 2,000"):
        fetch_image("https://example.org/a.png", opener=opener)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # past twice the limit PIL itself refuses it
    with pytest.raises(ImageError, match=r"more pixels than the limit of 1,000 \(PIL.Image.MAX_IMAGE_PIXELS\)"):
        fetch_image("https://example.org/a.png", opener=opener)


def test_url_over_loopback_http(tmp_path):
    """A real HTTP exchange (127.0.0.1 only): a good image, a truncated one, a missing one."""
    files = {"/ok.png": PNG, "/truncated.png": PNG[: len(PNG) // 2]}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert fetch_image(base + "/ok.png").size == (60, 40)
        with pytest.raises(ImageError, match=r"cannot read image http://127\.0\.0\.1:\d+/truncated\.png"):
            fetch_image(base + "/truncated.png")
        with pytest.raises(ImageError, match="could not fetch image .*404"):
            fetch_image(base + "/missing.png")
        with pytest.raises(ImageError, match="more than the limit"):
            fetch_image(base + "/ok.png", max_bytes=100)
    finally:
        server.shutdown()
        server.server_close()


def test_16_bit_grayscale_png_warns_and_keeps_hf_pixels(tmp_path):
    values = np.linspace(0, 65535, 32 * 32).astype(np.uint16).reshape(32, 32)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    with pytest.warns(UserWarning, match="'I;16'.*values above 255.*clips them to 255"):
        rgb = load_image(str(path))
    expected = Image.open(path).convert("RGB")  # what PIL, and so HF, makes of it
    np.testing.assert_array_equal(np.asarray(rgb), np.asarray(expected))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an 8-bit grayscale PNG: no warning
        Image.fromarray((values >> 8).astype(np.uint8)).save(tmp_path / "gray8.png")
        load_image(str(tmp_path / "gray8.png"))


# ---------------------------------------------------------------- property: anything in, an image or our error

MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16",
         "I;16B", "I;16L", "F"]
FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"]


def check_outcome(load):
    """`load()` returns an RGB image or raises one of the project's `InputError`s; nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 16-bit warning is expected for some modes
        try:
            image = load()
        except InputError as e:
            assert str(e)
            return None
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.width > 0 and image.height > 0
    return image


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a",
                                                               b"BM"]))
def test_random_bytes(tmp_path, data, prefix):
    path = tmp_path / "random.img"
    path.write_bytes(prefix + data)
    check_outcome(lambda: load_image(str(path)))
    check_outcome(lambda: load_image(str(path), semantics="original"))
    check_outcome(lambda: load_image(decode_image(prefix + data, "from random bytes")))
    opener, _ = serving(prefix + data)
    check_outcome(lambda: load_image(fetch_image("http://example.org/x", opener=opener)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), width=st.integers(0, 40), height=st.integers(0, 40),
       fmt=st.sampled_from(FORMATS), seed=st.integers(0, 2**16), cut=st.floats(0.0, 1.0))
def test_random_sizes_and_modes(mode, width, height, fmt, seed, cut):
    rng = np.random.default_rng(seed)
    image = Image.new(mode, (width, height))
    if width and height:  # random content, within the mode's value range
        noise = Image.fromarray(rng.integers(0, 256, (height, width), np.uint8))
        image.paste(noise.convert(mode) if mode not in ("La", "RGBa", "PA") else image, (0, 0))
    for semantics in ("hf", "original"):
        check_outcome(lambda s=semantics: load_image(image, semantics=s))
    if not (width and height):
        return  # nothing to encode
    buf = io.BytesIO()
    try:
        image.save(buf, format=fmt)
    except (OSError, ValueError, KeyError, TypeError, SystemError):
        return  # PIL cannot write this mode in this format: nothing to load
    data = buf.getvalue()
    check_outcome(lambda: load_image(decode_image(data, "encoded")))
    check_outcome(lambda: load_image(decode_image(data[: int(len(data) * cut)], "truncated")))


@settings(max_examples=150, deadline=None)
@given(shape=st.lists(st.integers(0, 6), min_size=0, max_size=4),
       dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.int64, np.bool_]))
def test_random_arrays(shape, dtype):
    array = np.zeros(shape, dtype)
    check_outcome(lambda: load_image(array))
