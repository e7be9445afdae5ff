"""Image generation through a provider's OpenAI-compatible `POST /images/generations` endpoint.

Every request, including the download of images returned as URLs, goes through the outbound guard. Each
returned file is checked before it is kept: its format must be PNG, JPEG or WEBP by its first bytes,
and its pixel count, read from the header by Pillow, must be within the limit. The bytes are kept as
the provider sent them, without a re-encode.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import struct
from dataclasses import dataclass, replace
from typing import Any

import httpx
import structlog
from PIL import Image

from pocketllm.errors import InvalidInput, PocketLLMError
from pocketllm.jobs.prices import (
    ImageRequest,
    estimate_cost,
    known_image_models,
    usd_amount,
    validate_image_request,
)
from pocketllm.providers.catalogue import ProviderTarget
from pocketllm.providers.errors import ProviderRequestFailed, ProviderTimeout
from pocketllm.providers.guard import ProviderUnreachable, ProviderUrlNotAllowed
from pocketllm.providers.http import ProviderHttp, provider_error_message, scrub_secret
from pocketllm.providers.network import io_deadline

log = structlog.get_logger(__name__)

_READ_CHUNK_BYTES = 64 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# Pillow format name to (MIME type, file extension).
_FORMATS = {"PNG": ("image/png", "png"), "JPEG": ("image/jpeg", "jpg"), "WEBP": ("image/webp", "webp")}
# Errors Pillow raises for truncated or corrupt files (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
# Statuses that mean the request itself is wrong (bad parameter, content policy, unknown model).
_REJECTED_STATUSES = frozenset({400, 404, 422})
MAX_REVISED_PROMPT_LENGTH = 32_000
# Room in a generation response for everything but the images: revised prompts, usage, cost.
_RESPONSE_OVERHEAD_BYTES = 1024 * 1024


class ImageRequestRejected(InvalidInput):
    """The provider rejected the request as invalid, so sending it again cannot succeed."""

    code = "image_request_rejected"
    default_message = "The provider rejected the image request; check the model, size and prompt."


class InvalidImageResponse(ProviderRequestFailed):
    code = "invalid_image_response"
    default_message = "The provider returned no usable image; try again later."


class GeneratedImageTooLarge(ProviderRequestFailed):
    code = "generated_image_too_large"
    default_message = "The provider returned an image larger than the server accepts."


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    data: bytes  # the file as the provider sent it
    mime_type: str  # image/png, image/jpeg or image/webp
    extension: str  # png, jpg or webp
    width: int
    height: int
    revised_prompt: str | None  # the prompt the model actually used, when it rewrote it (dall-e-3)


@dataclass(frozen=True, slots=True)
class ImageResult:
    images: list[GeneratedImage]
    # USD: ImageRouter's reported `cost` when present, the table price times the images for OpenAI, else None.
    cost_usd: float | None
    # The provider's `usage` block (gpt-image-1 reports tokens), JSON-safe, or None.
    usage: dict[str, Any] | None


async def generate_images(
    http: ProviderHttp,
    target: ProviderTarget,
    request: ImageRequest,
    *,
    timeout: float,
    max_image_bytes: int,
    max_pixels: int = 50_000_000,
) -> ImageResult:
    """Generate images and return them checked, with their cost and the provider's usage.

    `timeout` (seconds) bounds the whole generation request and each whole image download. The request
    is validated again here, so only the parameters its model takes are sent. Raises the InvalidInput errors of
    `validate_image_request`, ImageRequestRejected, ProviderAuthFailed, ProviderRateLimited,
    ProviderTimeout, ProviderRequestFailed and its subclasses InvalidImageResponse and GeneratedImageTooLarge,
    and ProviderUrlNotAllowed for an image URL that the guard blocks.
    """
    provider = target.provider
    request = validate_image_request(provider, request)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else None

    def map_error(response: httpx.Response) -> PocketLLMError | None:
        if response.status_code not in _REJECTED_STATUSES:
            return None
        detail = provider_error_message(response, target.api_key)
        suffix = f": {detail}" if detail else f" (HTTP {response.status_code}); check the model, size and prompt."
        return ImageRequestRejected(f"{provider} rejected the image request{suffix}")

    # The whole call, not only each read: a provider that sends its response a byte at a time would
    # otherwise keep a worker slot and a connection for as long as it likes.
    with io_deadline(timeout):
        body = await http.request_json(
            "POST",
            f"{target.base_url}/images/generations",
            provider=provider,
            secret=target.api_key,
            headers=headers,
            json=build_request_body(provider, request),
            timeout=timeout,
            map_error=map_error,
            # Base64 takes four characters for three bytes; the rest of the body is small.
            max_response_bytes=request.n * (max_image_bytes * 4 // 3 + 4) + _RESPONSE_OVERHEAD_BYTES,
        )

    items = _response_items(body, provider=provider, secret=target.api_key)
    images: list[GeneratedImage] = []
    for item in items:
        if len(images) == request.n:
            break
        data = await _item_bytes(http, item, provider=provider, timeout=timeout, max_image_bytes=max_image_bytes)
        if data is None:
            continue
        revised_prompt = item.get("revised_prompt")
        if isinstance(revised_prompt, str):
            revised_prompt = revised_prompt[:MAX_REVISED_PROMPT_LENGTH]
        else:
            revised_prompt = None
        image = await asyncio.to_thread(
            _checked_image, data, provider=provider, max_pixels=max_pixels, revised_prompt=revised_prompt
        )
        images.append(image)
    if not images:
        log.info("images.empty_response", provider=provider, model=request.model)
        raise InvalidImageResponse(f"{provider} returned no image; try again later.")

    cost_usd = _cost_usd(provider, request, body, len(images))
    log.info("images.generated", provider=provider, model=request.model, count=len(images))
    return ImageResult(images=images, cost_usd=cost_usd, usage=_json_safe_usage(body.get("usage")))


def build_request_body(provider: str, request: ImageRequest) -> dict[str, Any]:
    """Build the JSON body for a validated request, with only the fields the provider's model accepts."""
    if provider == "openai":
        spec = next(spec for spec in known_image_models(provider) if spec.id == request.model)
        optional: dict[str, Any] = {
            "n": request.n,
            "size": request.size,
            "quality": request.quality,
            "style": request.style,
            "response_format": "b64_json",
        }
        accepted = {name: value for name, value in optional.items() if name in spec.parameters}
    elif provider == "imagerouter":
        # ImageRouter ignores `n` (one image per request) and takes quality as auto, low, medium or high.
        accepted = {"size": request.size, "quality": request.quality, "response_format": "b64_json"}
    else:
        # Custom servers get only the fields every OpenAI-compatible image endpoint takes.
        accepted = {"n": request.n, "size": request.size, "response_format": "b64_json"}

    body: dict[str, Any] = {"model": request.model, "prompt": request.prompt}
    body.update({name: value for name, value in accepted.items() if value is not None})
    return body


def _response_items(body: Any, *, provider: str, secret: str | None) -> list[dict[str, Any]]:
    """Return the `data` entries of a generation response, raising InvalidImageResponse when there are none."""
    if not isinstance(body, dict):
        raise InvalidImageResponse(f"{provider} returned a response that is not a JSON object.")
    data = body.get("data")
    if isinstance(data, list) and data:
        return [item for item in data if isinstance(item, dict)]

    # ImageRouter can report a failure in a 200 response with an OpenAI-shaped `error` object.
    error = body.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str) and message:
        raise InvalidImageResponse(f"{provider} returned an error instead of images: {scrub_secret(message, secret)}")
    raise InvalidImageResponse(f"{provider} returned no image; try again later.")


async def _item_bytes(
    http: ProviderHttp,
    item: dict[str, Any],
    *,
    provider: str,
    timeout: float,
    max_image_bytes: int,
) -> bytes | None:
    """Return the file of one `data` entry from `b64_json` or `url`, or None when it has neither."""
    encoded = item.get("b64_json")
    if isinstance(encoded, str) and encoded:
        # Four base64 characters carry three bytes, so the size is known before decoding. The response
        # as a whole was limited when it was read.
        if len(encoded) // 4 * 3 > max_image_bytes + 3:
            raise _too_large(provider, max_image_bytes)
        try:
            data = base64.b64decode(encoded, validate=True)
        except binascii.Error as error:
            raise InvalidImageResponse(f"{provider} returned an image that is not valid base64.") from error
        if len(data) > max_image_bytes:
            raise _too_large(provider, max_image_bytes)
        return data

    url = item.get("url")
    if isinstance(url, str) and url:
        return await download_image(http, url, provider=provider, timeout=timeout, max_image_bytes=max_image_bytes)
    return None


async def download_image(http: ProviderHttp, url: str, *, provider: str, timeout: float, max_image_bytes: int) -> bytes:
    """Download an image URL from a generation response through the guard, reading at most `max_image_bytes`.

    The request carries no Authorization header: the URL is a signed URL, often on another host, and the
    user's key must not travel there. Redirects are not followed. The URL is never logged or quoted,
    because its query string is a credential. `timeout` bounds the whole download, as an `io_deadline`
    rather than a task cancellation, which could leave the connection checked out of httpcore's pool.
    """
    try:
        with io_deadline(timeout):
            async with http.guard.stream(http.client, "GET", url, timeout=timeout) as response:
                if response.status_code >= 300:
                    log.info("images.download_failed", provider=provider, status=response.status_code)
                    raise InvalidImageResponse(
                        f"Downloading the image that {provider} generated failed with HTTP {response.status_code}; "
                        "try again later."
                    )
                declared = response.headers.get("content-length")
                if declared is not None and declared.strip().isdigit() and int(declared) > max_image_bytes:
                    raise _too_large(provider, max_image_bytes)

                chunks: list[bytes] = []
                total = 0
                async for chunk in response.aiter_bytes(_READ_CHUNK_BYTES):
                    total += len(chunk)
                    if total > max_image_bytes:
                        raise _too_large(provider, max_image_bytes)
                    chunks.append(chunk)
                return b"".join(chunks)
    except (TimeoutError, httpx.TimeoutException) as error:
        log.info("images.download_timed_out", provider=provider, error=type(error).__name__)
        raise ProviderTimeout(f"Downloading the image that {provider} generated timed out; try again later.") from error
    except httpx.RequestError as error:
        # Also a body that cannot be decoded with its Content-Encoding (httpx.DecodingError).
        log.info("images.download_unreachable", provider=provider, error=type(error).__name__)
        raise ProviderRequestFailed(
            f"The connection for the image that {provider} generated failed; try again later."
        ) from error
    except ProviderUrlNotAllowed as error:
        # A provider pointing at a blocked address is suspicious, so it is logged as a warning.
        log.warning("images.download_blocked", provider=provider)
        raise ProviderUrlNotAllowed(f"{provider} returned an image URL that is not allowed. {error.message}") from error
    except ProviderUnreachable as error:
        log.info("images.download_unresolved", provider=provider)
        raise ProviderRequestFailed(
            f"The host of the image that {provider} generated could not be resolved; try again later."
        ) from error


def _checked_image(data: bytes, *, provider: str, max_pixels: int, revised_prompt: str | None) -> GeneratedImage:
    """Identify the file by its signature and read its size from the header, without decoding its pixels.

    Opening a file reads only its header, and `verify()` checks the structure (for PNG, every chunk's CRC)
    without decoding pixels. Raises InvalidImageResponse, or GeneratedImageTooLarge past `max_pixels`.
    """
    image_format = _detect_format(data)
    if image_format is None:
        raise InvalidImageResponse(f"{provider} returned a file that is not a PNG, JPEG or WEBP image.")

    try:
        with Image.open(io.BytesIO(data), formats=[image_format]) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise GeneratedImageTooLarge(
                    f"{provider} returned a {width}x{height} image, more than the {max_pixels:,} pixels allowed."
                )
            image.verify()
    except Image.DecompressionBombError as error:
        raise GeneratedImageTooLarge(f"{provider} returned an image with too many pixels.") from error
    except _DECODE_ERRORS as error:
        raise InvalidImageResponse(f"{provider} returned an image that is truncated or corrupt.") from error

    mime_type, extension = _FORMATS[image_format]
    return GeneratedImage(
        data=data, mime_type=mime_type, extension=extension, width=width, height=height, revised_prompt=revised_prompt
    )


def _detect_format(data: bytes) -> str | None:
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(_JPEG_SIGNATURE):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _too_large(provider: str, max_image_bytes: int) -> GeneratedImageTooLarge:
    return GeneratedImageTooLarge(f"{provider} returned an image larger than {max_image_bytes:,} bytes.")


def _cost_usd(provider: str, request: ImageRequest, body: dict[str, Any], count: int) -> float | None:
    """Return the USD cost of the images received: ImageRouter's reported `cost`, or OpenAI's table price.

    A custom server's `cost` field is ignored, because its unit is unknown.
    """
    if provider == "imagerouter":
        return usd_amount(body.get("cost"))
    if provider == "openai":
        return estimate_cost(provider, replace(request, n=count)).usd_total
    return None


def _json_safe_usage(usage: Any) -> dict[str, Any] | None:
    if not isinstance(usage, dict):
        return None
    try:
        # Python's json module accepts NaN and Infinity in responses, but they are not valid JSON to store.
        json.dumps(usage, allow_nan=False)
    except ValueError:
        return None
    return usage
