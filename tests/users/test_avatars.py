"""Avatar processing on real files made here with Pillow and pillow-heif, and the bounded upload read."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from tempfile import SpooledTemporaryFile
from typing import BinaryIO, cast

import pytest
from fastapi import UploadFile
from PIL import ExifTags, Image, ImageCms
from starlette.datastructures import Headers

from pocketllm.users.avatars import (
    AvatarTooLarge,
    EmptyFile,
    ImageTooLarge,
    InvalidImage,
    ProcessedAvatar,
    UnsupportedMediaType,
    detect_image_format,
    process_avatar,
    read_upload_limited,
)

MAX_PIXELS = 40_000_000
MAX_SIDE = 512
RED = (220, 20, 20)
BLUE = (20, 20, 220)
# WEBP chunks that carry pixels or their layout. Any other chunk would be metadata.
PIXEL_CHUNKS = {b"VP8 ", b"VP8L", b"VP8X", b"ALPH"}
SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    output = io.BytesIO()
    image.save(output, format=image_format, **options)
    return output.getvalue()


def gradient(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """An image with varied pixels, so lossy encoders produce a realistically sized file."""
    return Image.linear_gradient("L").resize(size).convert(mode)


def split_colour(size: tuple[int, int]) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return image


def process(data: bytes, *, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> ProcessedAvatar:
    return process_avatar(data, max_pixels=max_pixels, max_side=max_side)


def open_output(result: ProcessedAvatar) -> Image.Image:
    image = Image.open(io.BytesIO(result.data), formats=["WEBP"])
    image.load()
    return image


def webp_chunks(data: bytes) -> list[bytes]:
    assert data[:4] == b"RIFF"
    assert data[8:12] == b"WEBP"
    chunks = []
    offset = 12
    while offset + 8 <= len(data):
        name = data[offset : offset + 4]
        (size,) = struct.unpack("<I", data[offset + 4 : offset + 8])
        chunks.append(name)
        offset += 8 + size + (size & 1)
    return chunks


def png_chunk(name: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + name + payload + struct.pack(">I", zlib.crc32(name + payload))


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares `width` x `height` RGB pixels, with only a few bytes of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def heif(image: Image.Image, **options: object) -> bytes:
    return encode(image, "HEIF", quality=80, **options)


# Accepted types.


@pytest.mark.parametrize(
    ("image_format", "make"),
    [
        ("PNG", lambda image: encode(image, "PNG")),
        ("JPEG", lambda image: encode(image, "JPEG", quality=90)),
        ("WEBP", lambda image: encode(image, "WEBP")),
        ("HEIF", heif),
    ],
    ids=["png", "jpeg", "webp", "heic"],
)
def test_accepted_type_becomes_webp(image_format: str, make: Callable[[Image.Image], bytes]) -> None:
    data = make(split_colour((300, 200)))
    assert detect_image_format(data) == image_format

    result = process(data)

    assert result.content_type == "image/webp"
    assert result.extension == "webp"
    assert (result.width, result.height) == (300, 200)
    output = open_output(result)
    assert output.size == (300, 200)
    assert output.mode == "RGB"
    assert _close(output.getpixel((10, 100)), RED)
    assert _close(output.getpixel((290, 100)), BLUE)


def test_heic_brand_is_detected() -> None:
    data = heif(Image.new("RGB", (32, 32), RED))

    assert data[4:12] == b"ftypheic"
    assert detect_image_format(data) == "HEIF"


def test_large_image_is_downscaled() -> None:
    data = encode(gradient((2000, 1000)), "PNG")

    result = process(data)

    assert (result.width, result.height) == (512, 256)
    assert open_output(result).size == (512, 256)


def test_portrait_image_is_downscaled() -> None:
    result = process(encode(gradient((600, 1800)), "JPEG"), max_side=300)

    assert (result.width, result.height) == (100, 300)


def test_small_image_is_not_upscaled() -> None:
    result = process(encode(gradient((40, 30)), "PNG"))

    assert (result.width, result.height) == (40, 30)


def test_transparency_is_kept() -> None:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste((*RED, 255), (0, 0, 32, 64))

    output = open_output(process(encode(image, "PNG")))

    assert output.mode == "RGBA"
    assert output.getpixel((50, 30))[3] == 0  # type: ignore[index]
    assert output.getpixel((10, 30))[3] == 255  # type: ignore[index]


def test_palette_transparency_is_kept() -> None:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste((*BLUE, 255), (0, 0, 32, 64))

    output = open_output(process(encode(image.convert("P"), "PNG")))

    assert output.mode == "RGBA"
    assert output.getpixel((50, 30))[3] == 0  # type: ignore[index]


def test_sixteen_bit_grey_keeps_tones() -> None:
    # 16-bit grey 0x8080 is mid-grey, and clipping at 255 would make it white.
    image = Image.new("I;16", (32, 32), 0x8080)

    output = open_output(process(encode(image, "PNG")))

    red, green, blue = output.getpixel((16, 16))  # type: ignore[misc]
    assert 118 <= red <= 138
    assert red == green == blue


def test_cmyk_jpeg_becomes_rgb() -> None:
    output = open_output(process(encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")))

    assert output.mode == "RGB"
    red, green, blue = output.getpixel((16, 16))  # type: ignore[misc]
    assert red > 200
    assert green < 60
    assert blue < 60


def test_animated_webp_keeps_first_frame() -> None:
    frames = [Image.new("RGB", (48, 48), RED), Image.new("RGB", (48, 48), BLUE)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)

    output = open_output(process(data))

    assert getattr(output, "n_frames", 1) == 1
    assert _close(output.getpixel((24, 24)), RED)


# Orientation.


def test_jpeg_orientation_is_applied() -> None:
    exif = Image.Exif()
    # 6: the stored picture must be turned 90 degrees clockwise for display.
    exif[ExifTags.Base.Orientation] = 6
    data = encode(split_colour((120, 60)), "JPEG", exif=exif, quality=95)

    result = process(data)

    assert (result.width, result.height) == (60, 120)
    output = open_output(result)
    # Turned clockwise, the red left half ends up on top.
    assert _close(output.getpixel((30, 10)), RED)
    assert _close(output.getpixel((30, 110)), BLUE)


def test_heic_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    data = heif(split_colour((128, 64)), exif=exif.tobytes())

    result = process(data)

    assert (result.width, result.height) == (64, 128)
    output = open_output(result)
    assert _close(output.getpixel((32, 10)), RED)
    assert _close(output.getpixel((32, 118)), BLUE)


def test_png_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 8
    data = encode(split_colour((80, 40)), "PNG", exif=exif)

    result = process(data)

    # 8: turned 90 degrees counter-clockwise, so the red left half ends up at the bottom.
    assert (result.width, result.height) == (40, 80)
    output = open_output(result)
    assert _close(output.getpixel((20, 75)), RED)
    assert _close(output.getpixel((20, 5)), BLUE)


# Metadata.


def test_gps_exif_is_removed() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneMaker"
    exif[ExifTags.Base.Orientation] = 1
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 31.0, 12.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (13.0, 24.0, 36.0)
    data = encode(gradient((200, 100)), "JPEG", exif=exif)
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] == "N"

    result = process(data)

    assert set(webp_chunks(result.data)) <= PIXEL_CHUNKS
    output = open_output(result)
    assert "exif" not in output.info
    assert len(output.getexif()) == 0
    assert b"PhoneMaker" not in result.data


def test_xmp_and_icc_are_removed() -> None:
    icc_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">secret-location</x:xmpmeta>'
    data = encode(gradient((200, 100)), "JPEG", xmp=xmp, icc_profile=icc_profile)
    assert b"secret-location" in data

    result = process(data)

    assert set(webp_chunks(result.data)) <= PIXEL_CHUNKS
    assert b"secret-location" not in result.data
    output = open_output(result)
    assert "xmp" not in output.info
    assert "icc_profile" not in output.info


def test_heic_exif_is_removed() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneMaker"
    data = heif(gradient((96, 64)), exif=exif.tobytes())
    assert b"PhoneMaker" in data

    result = process(data)

    assert set(webp_chunks(result.data)) <= PIXEL_CHUNKS
    assert b"PhoneMaker" not in result.data


# Rejected types.


@pytest.mark.parametrize(
    "data",
    [
        SVG,
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"GIF89a" + b"\x00" * 32,
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        b"<!DOCTYPE html><html><body>hi</body></html>",
        b"plain text, not an image",
        b"\x89PN",
        b"BM" + b"\x00" * 64,
        b"II*\x00" + b"\x00" * 64,
        b"RIFF\x00\x00\x00\x00WAVEfmt ",
        b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf",
        b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf",
        b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2",
    ],
    ids=[
        "svg",
        "bare-svg",
        "gif-header",
        "pdf-header",
        "html",
        "text",
        "cut-png-signature",
        "bmp",
        "tiff",
        "wav",
        "avif",
        "avif-generic-brand",
        "mp4",
    ],
)
def test_other_types_are_415(data: bytes) -> None:
    with pytest.raises(UnsupportedMediaType) as raised:
        process(data)

    assert raised.value.status_code == 415
    assert raised.value.code == "unsupported_media_type"


@pytest.mark.parametrize("image_format", ["GIF", "PDF", "BMP", "TIFF", "ICO"])
def test_real_files_of_other_types_are_415(image_format: str) -> None:
    data = encode(Image.new("RGB", (32, 32), RED), image_format)

    with pytest.raises(UnsupportedMediaType):
        process(data)


async def test_svg_labelled_png_is_415() -> None:
    upload = make_upload(SVG, filename="avatar.png", content_type="image/png")

    data = await read_upload_limited(upload, 1024 * 1024)

    with pytest.raises(UnsupportedMediaType):
        process(data)


def test_empty_file_is_400() -> None:
    with pytest.raises(EmptyFile) as raised:
        process(b"")

    assert raised.value.status_code == 400
    assert raised.value.code == "empty_file"


# Corrupt files.


@pytest.mark.parametrize(
    ("image_format", "make"),
    [
        ("PNG", lambda: encode(gradient((200, 200)), "PNG")),
        ("JPEG", lambda: encode(gradient((200, 200)), "JPEG")),
        ("WEBP", lambda: encode(gradient((200, 200)), "WEBP")),
        ("HEIF", lambda: heif(gradient((200, 200)))),
    ],
    ids=["png", "jpeg", "webp", "heic"],
)
@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1], ids=["nine-tenths", "half", "tenth"])
def test_truncated_image_is_400(image_format: str, make: Callable[[], bytes], keep: float) -> None:
    data = make()
    truncated = data[: int(len(data) * keep)]
    assert detect_image_format(truncated) == image_format

    with pytest.raises(InvalidImage) as raised:
        process(truncated)

    assert raised.value.status_code == 400
    assert raised.value.code == "invalid_image"


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + b"garbage" * 20,
        b"\xff\xd8\xff\xe0" + b"\x00" * 100,
        b"RIFF\x10\x00\x00\x00WEBPVP8 \x00\x00\x00\x00",
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 40,
    ],
    ids=["png", "jpeg", "webp", "heic"],
)
def test_corrupt_image_is_400(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        process(data)


def test_png_with_bad_pixel_data_is_400() -> None:
    # A valid header with pixel data far too short for it: the decoder must fail, not pad.
    with pytest.raises(InvalidImage):
        process(png_with_declared_size(100, 100))


# Pixel limits.


def test_png_bomb_is_413_before_decoding() -> None:
    # 3000 x 3000 is under Pillow's own limit, so only the max_pixels check can reject it. The pixel data is
    # a few bytes, so decoding would fail with invalid_image: image_too_large shows that it never started.
    data = png_with_declared_size(3000, 3000)
    assert len(data) < 200

    with pytest.raises(ImageTooLarge) as raised:
        process(data, max_pixels=1_000_000)

    assert raised.value.status_code == 413
    assert raised.value.code == "image_too_large"
    assert "3000x3000" in raised.value.message


def test_huge_png_bomb_is_413() -> None:
    # 100,000 x 100,000 (10 gigapixels) is past Pillow's decompression-bomb error limit as well.
    with pytest.raises(ImageTooLarge):
        process(png_with_declared_size(100_000, 100_000), max_pixels=500_000_000)


def test_jpeg_over_pixel_limit_is_413() -> None:
    data = encode(gradient((1200, 1000)), "JPEG")

    with pytest.raises(ImageTooLarge):
        process(data, max_pixels=1_000_000)


def test_image_at_pixel_limit_is_accepted() -> None:
    result = process(encode(gradient((1000, 1000)), "PNG"), max_pixels=1_000_000)

    assert (result.width, result.height) == (512, 512)


# read_upload_limited.


class CountingFile(io.BytesIO):
    """Counts the bytes read, to show that an oversized upload is never read in full."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk


def make_upload(data: bytes, *, filename: str = "avatar.png", content_type: str = "image/png") -> UploadFile:
    spooled = SpooledTemporaryFile(max_size=1024 * 1024)  # noqa: SIM115  (closed by the UploadFile)
    spooled.write(data)
    spooled.seek(0)
    # Starlette's multipart parser builds uploads the same way; typeshed's SpooledTemporaryFile is no BinaryIO.
    file = cast(BinaryIO, spooled)
    return UploadFile(file=file, filename=filename, headers=Headers({"content-type": content_type}))


async def test_upload_within_limit_is_read() -> None:
    data = bytes(range(256)) * 1000

    assert await read_upload_limited(make_upload(data), len(data)) == data


async def test_upload_over_limit_is_413() -> None:
    upload = make_upload(b"x" * 200_001)

    with pytest.raises(AvatarTooLarge) as raised:
        await read_upload_limited(upload, 200_000)

    assert raised.value.status_code == 413
    assert raised.value.code == "avatar_too_large"


async def test_oversized_upload_read_stops_early() -> None:
    source = CountingFile(b"x" * 5_000_000)
    upload = UploadFile(file=source, filename="avatar.png")

    with pytest.raises(AvatarTooLarge, match="1 MiB"):
        await read_upload_limited(upload, 1024 * 1024)

    assert source.bytes_read == 1024 * 1024 + 1


async def test_declared_size_rejected_unread() -> None:
    source = CountingFile(b"x" * 10_000)
    upload = UploadFile(file=source, filename="avatar.png", size=10_000)

    with pytest.raises(AvatarTooLarge):
        await read_upload_limited(upload, 5_000)

    assert source.bytes_read == 0


async def test_empty_upload_reads_empty() -> None:
    assert await read_upload_limited(make_upload(b""), 1024) == b""


async def test_upload_then_process() -> None:
    data = encode(gradient((700, 350)), "PNG")
    upload = make_upload(data, filename="photo.gif", content_type="image/gif")

    result = process(await read_upload_limited(upload, len(data)))

    assert (result.width, result.height) == (512, 256)


def _close(actual: object, expected: tuple[int, int, int], tolerance: int = 40) -> bool:
    assert isinstance(actual, tuple)
    return all(abs(int(a) - b) <= tolerance for a, b in zip(actual[:3], expected, strict=True))
