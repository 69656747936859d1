"""Images of chat requests: `data:` URLs always, `http(s)` URLs only when allowed, local paths never.

Limits follow OpenAI's vision guide (PNG, JPEG, WEBP, non-animated GIF; at most 20 MB per image) and the
practice of vLLM, llama.cpp and LMDeploy for remote images (a size cap, a timeout, no redirects, no private
addresses). Every failure is an `ApiError` 400 naming the content part at fault.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import socket
import warnings
from dataclasses import dataclass
from urllib.parse import urlparse

from PIL import Image, UnidentifiedImageError

from eve_vlm.serve.protocol import ApiError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.-]+)*);base64,(?P<data>.*)$", re.DOTALL)


@dataclass(frozen=True)
class ImageLimits:
    """What a request's images may be.

    Attributes:
        max_bytes: Encoded size per image.
        max_pixels: Width x height per image (decompression bombs are refused before decoding).
        allow_remote: Fetch `http(s)` URLs (off by default).
        remote_timeout_s: Connect and read timeout for a remote image.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 6000 * 6000
    allow_remote: bool = False
    remote_timeout_s: float = 5.0


def load_image_url(url: str, param: str, limits: ImageLimits) -> Image.Image:
    """The RGB image of an `image_url` part.

    Raises:
        ApiError: 400 for a bad, unreadable, too large or disallowed image.
    """
    if url.startswith("data:"):
        data = _decode_data_url(url, param, limits)
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote:
            raise ApiError(
                400,
                "Remote image URLs are not enabled on this server; send the image as a base64 data URL "
                "(data:image/png;base64,...), or start the server with --allow-remote-images.",
                param=param,
                code="remote_images_disabled",
            )
        data = _fetch(url, param, limits)
    else:
        raise ApiError(
            400,
            "image_url.url must be a data URL (data:image/png;base64,...)"
            + (" or an http(s) URL" if limits.allow_remote else "")
            + "; local paths and other schemes are not accepted.",
            param=param,
            code="invalid_image_url",
        )
    return _open(data, param, limits)


def _decode_data_url(url: str, param: str, limits: ImageLimits) -> bytes:
    match = DATA_URL.match(url)
    if match is None:
        raise ApiError(
            400,
            "A data URL must look like data:image/png;base64,<base64 data>.",
            param=param,
            code="invalid_image_url",
        )
    mime = match["mime"]
    if mime and not mime.startswith("image/"):
        raise ApiError(400, f"The data URL holds {mime!r}, not an image.", param=param, code="invalid_image")
    payload = re.sub(r"\s+", "", match["data"])
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ApiError(400, _too_large(limits), param=param, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(
            400,
            f"The image's base64 data is invalid or truncated ({err}).",
            param=param,
            code="invalid_image",
        ) from None


def _too_large(limits: ImageLimits) -> str:
    return f"The image is larger than this server's limit of {limits.max_bytes // (1024 * 1024)} MB."


def _fetch(url: str, param: str, limits: ImageLimits) -> bytes:
    import httpx

    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        raise ApiError(
            400, f"Cannot resolve the image host {host!r}.", param=param, code="invalid_image_url"
        ) from None
    if any(not ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
        raise ApiError(
            400, "Image URLs may not point to private addresses.", param=param, code="invalid_image_url"
        )
    try:
        with httpx.stream("GET", url, timeout=limits.remote_timeout_s, follow_redirects=False) as response:
            if response.status_code != 200:
                raise ApiError(
                    400,
                    f"Fetching the image gave HTTP {response.status_code}.",
                    param=param,
                    code="invalid_image_url",
                )
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > limits.max_bytes:
                    raise ApiError(400, _too_large(limits), param=param, code="image_too_large")
            return bytes(data)
    except httpx.HTTPError as err:
        raise ApiError(
            400, f"Cannot fetch the image: {err}.", param=param, code="invalid_image_url"
        ) from None


def _open(data: bytes, param: str, limits: ImageLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in FORMATS:
                    raise ApiError(
                        400,
                        f"Image format {img.format} is not accepted; send PNG, JPEG, WEBP or GIF.",
                        param=param,
                        code="invalid_image",
                    )
                if img.width * img.height > limits.max_pixels:
                    raise ApiError(
                        400,
                        f"The image has {img.width}x{img.height} pixels, more than this server's limit of "
                        f"{limits.max_pixels}.",
                        param=param,
                        code="image_too_large",
                    )
                return img.convert("RGB")
    except ApiError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(
            400, "The image_url data is not a readable image.", param=param, code="invalid_image"
        ) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ApiError(
            400, f"The image is damaged or truncated ({err}).", param=param, code="invalid_image"
        ) from None
