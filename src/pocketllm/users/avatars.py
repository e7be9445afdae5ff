"""Avatar uploads: a bounded read of the upload, then a checked, metadata-free, downscaled WEBP re-encode.

The image type is decided from the file's first bytes, never from its name or Content-Type header, and
only PNG, JPEG, WEBP and HEIC/HEIF are decoded. Each is opened by its own Pillow plugin only, so a file
cannot reach another decoder. The pixel count from the header is checked before any pixel is decoded.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import structlog
from fastapi import UploadFile
from PIL import Image, ImageOps
from pillow_heif import register_heif_opener

from pocketllm.errors import InvalidInput, PocketLLMError

log = structlog.get_logger(__name__)

# Embedded thumbnails, depth maps and auxiliary images are never used, and a thumbnail could show a
# different picture than the image itself.
register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

OUTPUT_FORMAT = "WEBP"
OUTPUT_CONTENT_TYPE = "image/webp"
OUTPUT_EXTENSION = "webp"
OUTPUT_QUALITY = 85

_READ_CHUNK_BYTES = 64 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# HEVC-coded HEIF brands: those that pillow-heif's own opener accepts (`_is_supported_heif`), minus the generic ones.
_HEVC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})
# Generic HEIF brands: the compatible brands then tell HEVC from AV1 (AVIF), which is not accepted.
_GENERIC_HEIF_BRANDS = frozenset({b"mif1", b"msf1"})
# Errors Pillow and pillow-heif raise for truncated or corrupt files (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, RuntimeError)
_SIXTEEN_BIT_GRAY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class EmptyFile(InvalidInput):
    code = "empty_file"
    default_message = "The uploaded file is empty; choose an image file."


class InvalidImage(InvalidInput):
    code = "invalid_image"
    default_message = "The file could not be read as an image; it may be truncated or corrupt."


class UnsupportedMediaType(PocketLLMError):
    status_code = 415
    code = "unsupported_media_type"
    default_message = "The file is not a PNG, JPEG, WEBP or HEIC image; upload one of those."


class AvatarTooLarge(PocketLLMError):
    status_code = 413
    code = "avatar_too_large"
    default_message = "The uploaded file is too large; upload a smaller image."


class ImageTooLarge(PocketLLMError):
    status_code = 413
    code = "image_too_large"
    default_message = "The image has too many pixels; upload a smaller image."


@dataclass(frozen=True)
class ProcessedAvatar:
    data: bytes
    content_type: str
    extension: str
    width: int
    height: int


async def read_upload_limited(upload: UploadFile, max_bytes: int) -> bytes:
    """Read the upload in chunks and return its bytes, raising AvatarTooLarge once it exceeds `max_bytes`.

    At most `max_bytes + 1` bytes are read into memory. Starlette has already spooled the request body
    to a temporary file (in memory up to 1 MiB, then on disk), so this bounds memory, not the upload.
    """
    too_large = AvatarTooLarge(f"The uploaded file is larger than {_format_bytes(max_bytes)}; upload a smaller image.")
    if upload.size is not None and upload.size > max_bytes:
        raise too_large

    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = await upload.read(min(_READ_CHUNK_BYTES, max_bytes + 1 - total))
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def process_avatar(data: bytes, *, max_pixels: int, max_side: int) -> ProcessedAvatar:
    """Check an uploaded image and re-encode it as a WEBP of at most `max_side` pixels on the longer side.

    EXIF orientation is applied, then every piece of metadata (EXIF, GPS, XMP, ICC profile) is dropped.
    Animated images keep their first frame. CPU-bound: call it from a worker thread.

    Raises EmptyFile, UnsupportedMediaType (not PNG, JPEG, WEBP or HEIC/HEIF by its first bytes),
    ImageTooLarge (more than `max_pixels` pixels by the header) and InvalidImage (truncated or corrupt).
    """
    if not data:
        raise EmptyFile()
    image_format = detect_image_format(data)
    if image_format is None:
        raise UnsupportedMediaType()

    image = _open_checked(data, image_format, max_pixels)
    with image:
        if image_format == "JPEG":
            # Lets the JPEG decoder scale down by up to 8 while decoding, so a large photo never needs
            # its full-size pixels in memory.
            image.draft("RGB", (max_side, max_side))
        try:
            image.load()
        except Image.DecompressionBombError as error:
            raise ImageTooLarge() from error
        except _DECODE_ERRORS as error:
            raise InvalidImage() from error
        oriented = _apply_orientation(image)

    pixels = _to_output_mode(oriented)
    pixels.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    # A copy made from the raw pixels carries no `info`, so no metadata can reach the encoder.
    clean = Image.frombytes(pixels.mode, pixels.size, pixels.tobytes())
    output = io.BytesIO()
    clean.save(output, format=OUTPUT_FORMAT, quality=OUTPUT_QUALITY)
    return ProcessedAvatar(
        data=output.getvalue(),
        content_type=OUTPUT_CONTENT_TYPE,
        extension=OUTPUT_EXTENSION,
        width=clean.width,
        height=clean.height,
    )


def detect_image_format(data: bytes) -> str | None:
    """Return the Pillow format name ("PNG", "JPEG", "WEBP" or "HEIF") from the file's signature, or None."""
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(_JPEG_SIGNATURE):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if _is_hevc_heif(data):
        return "HEIF"
    return None


def _is_hevc_heif(data: bytes) -> bool:
    # The file starts with an `ftyp` box: 4-byte size, "ftyp", major brand, minor version, compatible brands.
    if len(data) < 16 or data[4:8] != b"ftyp":
        return False
    major_brand = data[8:12]
    if major_brand in _HEVC_BRANDS:
        return True
    if major_brand not in _GENERIC_HEIF_BRANDS:
        return False
    box_end = min(int.from_bytes(data[:4], "big"), len(data), 256)
    compatible = {data[offset : offset + 4] for offset in range(16, box_end - 3, 4)}
    return not compatible.isdisjoint(_HEVC_BRANDS)


def _open_checked(data: bytes, image_format: str, max_pixels: int) -> Image.Image:
    """Open the image with its format's plugin only and check its pixel count, decoding no pixels yet.

    Pillow's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS, process-wide) also applies: past
    twice that limit Image.open raises DecompressionBombError, reported here as ImageTooLarge.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=[image_format])
    except Image.DecompressionBombError as error:
        raise ImageTooLarge() from error
    except _DECODE_ERRORS as error:
        raise InvalidImage() from error

    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLarge(
            f"The image is {width}x{height} pixels, more than the {max_pixels:,} pixels allowed; "
            "upload a smaller image."
        )
    return image


def _apply_orientation(image: Image.Image) -> Image.Image:
    # exif_transpose returns a copy, also when no rotation is needed, so the result outlives `image`.
    try:
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as error:
        # A broken EXIF block should not cost the user the upload, so the picture keeps its stored rotation.
        log.info("avatar.orientation_unreadable", error_type=type(error).__name__, error=str(error))
        return image.copy()


def _to_output_mode(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_GRAY_MODES:
        # A plain convert("L") clips 16-bit values at 255, which turns most pictures white. Scale them instead.
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB")


def _format_bytes(size: int) -> str:
    if size >= 1024 * 1024 and size % (1024 * 1024) == 0:
        return f"{size // (1024 * 1024)} MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size:,} bytes"
