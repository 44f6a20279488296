"""Images named by an http(s) URL (the CLI's `--image URL`, `/image URL`), fetched with limits.

Fetched only because the user gave a URL. Limits, so that a URL cannot exhaust memory: at most
`MAX_IMAGE_BYTES` bytes are downloaded (64 MB by default; LLAVA_JAX_MAX_IMAGE_BYTES changes it), checked
against Content-Length before the download and counted during it, and the decoded image may have at most
`max_pixels()` pixels (PIL's decompression-bomb limit, `PIL.Image.MAX_IMAGE_PIXELS`, 89,478,485 by default:
the limit PIL already enforces on files, at twice that), checked from the header before decoding.
"""

from __future__ import annotations

import io
import os
import urllib.request
import warnings

from PIL import Image

from .image import ImageError

MAX_IMAGE_BYTES = 64 << 20
TIMEOUT_S = 30
_READ = 1 << 20


def is_url(source) -> bool:
    """True for a str starting with http:// or https:// (the only schemes fetched)."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def max_image_bytes() -> int:
    """The download limit: LLAVA_JAX_MAX_IMAGE_BYTES if set, else `MAX_IMAGE_BYTES`."""
    raw = os.environ.get("LLAVA_JAX_MAX_IMAGE_BYTES")
    if raw is None:
        return MAX_IMAGE_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ImageError(f"LLAVA_JAX_MAX_IMAGE_BYTES={raw!r} is not a positive number of bytes")
    return value


def max_pixels() -> int:
    """The pixel limit for fetched images: PIL's `Image.MAX_IMAGE_PIXELS` (None there means no limit)."""
    return Image.MAX_IMAGE_PIXELS or 2**63


def decode_image(data: bytes, what: str, pixel_limit: int | None = None) -> Image.Image:
    """Decode image bytes completely (a truncated file fails here), refusing more than `pixel_limit` pixels
    (default `max_pixels()`)."""
    limit = max_pixels() if pixel_limit is None else min(pixel_limit, max_pixels())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, as an error
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limit:
            raise ImageError(f"image {what} is {width}x{height} = {width * height:,} pixels, more than the limit of "
                             f"{limit:,}")
        image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own check, at twice the limit, fires first
        raise ImageError(f"image {what} has more pixels than the limit of {max_pixels():,} "
                         f"(PIL.Image.MAX_IMAGE_PIXELS): {e}") from e
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise ImageError(f"cannot read image {what}: {e}") from e
    return image


def fetch_image(url: str, max_bytes: int | None = None, timeout: float = TIMEOUT_S,
                opener=urllib.request.urlopen, pixel_limit: int | None = None) -> Image.Image:
    """Download and decode the image at an http(s) `url` within the limits above; `ImageError` otherwise.

    opener: `urllib.request.urlopen` or a stand-in with its interface (tests serve bytes without a network).
    """
    if not is_url(url):
        raise ImageError(f"{url!r} is not an http(s) URL")
    limit = max_image_bytes() if max_bytes is None else max_bytes
    try:
        with opener(url, timeout=timeout) as response:  # noqa: S310 (a user-given URL)
            declared = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
            if declared is not None and declared.strip().isdigit() and int(declared) > limit:
                raise ImageError(f"image {url} is {int(declared):,} bytes, more than the limit of {limit:,} "
                                 "(LLAVA_JAX_MAX_IMAGE_BYTES raises it)")
            data = bytearray()
            while chunk := response.read(min(_READ, limit + 1 - len(data))):
                data += chunk
                if len(data) > limit:
                    raise ImageError(f"image {url} is more than the limit of {limit:,} bytes "
                                     "(LLAVA_JAX_MAX_IMAGE_BYTES raises it)")
    except ImageError:
        raise
    except Exception as e:  # URLError, HTTPError, timeouts, connection resets
        raise ImageError(f"could not fetch image {url}: {e}") from e
    return decode_image(bytes(data), url, pixel_limit)
