"""The images of a chat request (`image_url` parts), fetched under the server's policy.

- `data:image/...;base64,...` URLs: always accepted; the decoded bytes count against `max_image_bytes`.
- local files (`file:///path` or a plain path): only inside the directory the server was started with
  (`--allow-local-images DIR`); anything else, a symlink out of it included, is refused.
- `http(s)://` URLs: only with `--allow-remote-images`, downloaded by `url_image.fetch_image` with the byte
  limit and a timeout.
Every image is decoded completely, with at most `max_pixels` pixels (checked from the header first).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from PIL import Image

from ..image import ImageError
from ..url_image import decode_image, fetch_image, is_url

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)", re.S)


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how big they may be."""

    max_image_bytes: int = 20 << 20
    max_pixels: int = 4096 * 4096
    local_dir: str | None = None  # local files only inside this directory
    allow_remote: bool = False
    remote_timeout_s: float = 10.0


def load_image_url(url: str, policy: ImagePolicy) -> Image.Image:
    """The decoded image an `image_url` names; `ImageError` (a 400 for the client) otherwise."""
    if not isinstance(url, str) or not url:
        raise ImageError("image_url.url must be a non-empty string")
    if url.startswith("data:"):
        return decode_image(_data_url_bytes(url, policy.max_image_bytes), "in a data: URL", policy.max_pixels)
    if is_url(url):
        if not policy.allow_remote:
            raise ImageError("remote image URLs are disabled on this server (start it with --allow-remote-images); "
                             "send the image as a data: URL")
        return fetch_image(url, max_bytes=policy.max_image_bytes, timeout=policy.remote_timeout_s,
                           pixel_limit=policy.max_pixels)
    if policy.local_dir is None:
        raise ImageError("local image paths are disabled on this server (start it with --allow-local-images DIR); "
                         "send the image as a data: URL")
    path = unquote(urlparse(url).path) if url.startswith("file:") else url
    return decode_image(_local_bytes(path, policy), path, policy.max_pixels)


def _data_url_bytes(url: str, limit: int) -> bytes:
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise ImageError("a data: image URL must be data:<type>;base64,<data>")
    data = match["data"]
    if len(data) * 3 // 4 > limit:
        raise ImageError(f"the image in a data: URL is about {len(data) * 3 // 4:,} bytes, more than the limit of "
                         f"{limit:,}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the data: URL is not valid base64: {e}") from e


def _local_bytes(path: str, policy: ImagePolicy) -> bytes:
    root = os.path.realpath(policy.local_dir)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise ImageError(f"image path {path!r} is outside the allowed directory")
    try:
        with open(real, "rb") as f:
            data = f.read(policy.max_image_bytes + 1)
    except OSError as e:
        raise ImageError(f"cannot read image {path!r}: {e.strerror}") from e
    if len(data) > policy.max_image_bytes:
        raise ImageError(f"image {path!r} is more than the limit of {policy.max_image_bytes:,} bytes")
    return data
