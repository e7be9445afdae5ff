"""Image generation over the network against the fake provider: request bodies per model, both response
forms, file checks, costs and error mapping."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from PIL import Image

from pocketllm.errors import InvalidInput
from pocketllm.jobs.images import (
    GeneratedImageTooLarge,
    ImageRequestRejected,
    ImageResult,
    InvalidImageResponse,
    download_image,
    generate_images,
)
from pocketllm.jobs.prices import ImageRequest, imagerouter_image_models
from pocketllm.providers.catalogue import ProviderTarget
from pocketllm.providers.errors import (
    ProviderAuthFailed,
    ProviderRateLimited,
    ProviderRequestFailed,
    ProviderTimeout,
)
from pocketllm.providers.guard import OutboundGuard, ProviderUrlNotAllowed
from pocketllm.providers.http import ProviderHttp
from pocketllm.providers.registry import PROVIDERS
from tests.conftest import loopback_only_resolver
from tests.fakes.provider import (
    GPT_IMAGE_OUTPUT_TOKENS,
    VALID_API_KEY,
    FakeProvider,
    count_tokens,
    make_png,
    revise_prompt,
)
from tests.fakes.trickle import CHUNKED_JSON_HEAD, provider_http_on_server_transport, trickling_server

PROMPT = "a red fox in the snow"
MAX_IMAGE_BYTES = 1024 * 1024
SHORT_TIMEOUT_SECONDS = 0.3
# Long enough that only the client's timeout can end the wait. The fake's reset() releases the pause.
PROVIDER_DELAY_SECONDS = 30.0


@pytest.fixture
async def http() -> AsyncIterator[ProviderHttp]:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        yield ProviderHttp(client, OutboundGuard(allow_private=True, resolver=loopback_only_resolver))


@pytest.fixture
def fake(fake_provider: FakeProvider) -> FakeProvider:
    """The fake provider with OpenAI's per-model image rules applied, as the real API applies them."""
    fake_provider.strict_image_models = True
    return fake_provider


def openai_target(fake: FakeProvider, api_key: str | None = VALID_API_KEY) -> ProviderTarget:
    return ProviderTarget(PROVIDERS["openai"], fake.openai_base_url, api_key)


def imagerouter_target(fake: FakeProvider) -> ProviderTarget:
    return ProviderTarget(PROVIDERS["imagerouter"], fake.imagerouter_base_url, VALID_API_KEY)


def custom_target(fake: FakeProvider) -> ProviderTarget:
    return ProviderTarget(PROVIDERS["custom"], fake.openai_base_url, VALID_API_KEY)


async def generate(
    http: ProviderHttp,
    target: ProviderTarget,
    request: ImageRequest,
    *,
    timeout: float = 10.0,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = 50_000_000,
) -> ImageResult:
    return await generate_images(
        http, target, request, timeout=timeout, max_image_bytes=max_image_bytes, max_pixels=max_pixels
    )


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def corrupt_checksum(png: bytes) -> bytes:
    """Flip one byte inside the IDAT chunk, so its CRC no longer matches while the header still reads."""
    position = png.index(b"IDAT") + 6
    return png[:position] + bytes([png[position] ^ 0xFF]) + png[position + 1 :]


def image_bytes(image_format: str, size: tuple[int, int] = (4, 4)) -> bytes:
    output = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(output, format=image_format)
    return output.getvalue()


# -- request bodies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "expected_body"),
    [
        (
            ImageRequest(prompt=PROMPT, model="dall-e-2", n=2, size="512x512"),
            {"model": "dall-e-2", "prompt": PROMPT, "n": 2, "size": "512x512", "response_format": "b64_json"},
        ),
        (
            ImageRequest(prompt=PROMPT, model="dall-e-3", quality="hd"),
            {
                "model": "dall-e-3",
                "prompt": PROMPT,
                "n": 1,
                "size": "1024x1024",
                "quality": "hd",
                "style": "vivid",
                "response_format": "b64_json",
            },
        ),
        (
            ImageRequest(prompt=PROMPT, model="gpt-image-1", n=2, size="1536x1024", quality="low"),
            {"model": "gpt-image-1", "prompt": PROMPT, "n": 2, "size": "1536x1024", "quality": "low"},
        ),
    ],
)
async def test_openai_model_gets_its_parameters(
    fake: FakeProvider, http: ProviderHttp, request_: ImageRequest, expected_body: dict[str, Any]
) -> None:
    result = await generate(http, openai_target(fake), request_)

    sent = fake.last_request("/images/generations")
    assert sent.body == expected_body
    assert sent.headers["authorization"] == f"Bearer {VALID_API_KEY}"
    assert len(result.images) == request_.n


async def test_imagerouter_body_leaves_out_count(fake: FakeProvider, http: ProviderHttp) -> None:
    await generate(http, imagerouter_target(fake), ImageRequest(prompt=PROMPT, model="test/fixed-image"))
    bare = fake.last_request("/images/generations").body
    request = ImageRequest(prompt=PROMPT, model="test/range-image", size="1024x768", quality="high")
    await generate(http, imagerouter_target(fake), request)
    full = fake.last_request("/images/generations").body

    assert bare == {"model": "test/fixed-image", "prompt": PROMPT, "response_format": "b64_json"}
    assert full == {
        "model": "test/range-image",
        "prompt": PROMPT,
        "size": "1024x768",
        "quality": "high",
        "response_format": "b64_json",
    }


async def test_custom_body(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.strict_image_models = False

    result = await generate(
        http, custom_target(fake), ImageRequest(prompt=PROMPT, model="local/sdxl", n=3, size="auto")
    )

    sent = fake.last_request("/images/generations").body
    assert sent == {"model": "local/sdxl", "prompt": PROMPT, "n": 3, "size": "auto", "response_format": "b64_json"}
    assert len(result.images) == 3
    assert result.cost_usd is None


async def test_invalid_request_sends_nothing(fake: FakeProvider, http: ProviderHttp) -> None:
    with pytest.raises(InvalidInput) as raised:
        await generate(http, openai_target(fake), ImageRequest(prompt=PROMPT, model="dall-e-3", n=2))

    assert raised.value.code == "unsupported_image_count"
    assert fake.requests == []


# -- response forms and files --------------------------------------------------------------------------------


async def test_base64_images_are_the_generated_files(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.image_width, fake.image_height = 12, 5

    result = await generate(http, openai_target(fake), ImageRequest(prompt=PROMPT, model="dall-e-2", n=3))

    assert sorted(image.data for image in result.images) == sorted(fake.generated_images.values())
    for image in result.images:
        assert image.mime_type == "image/png"
        assert image.extension == "png"
        assert (image.width, image.height) == (12, 5)
        assert image.revised_prompt is None


async def test_url_images_are_downloaded_without_key(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.image_response_format = "url"
    fake.image_width, fake.image_height = 3, 9

    result = await generate(http, openai_target(fake), ImageRequest(prompt=PROMPT, model="dall-e-2", n=2))

    downloads = fake.requests_to(".png")
    assert len(downloads) == 2
    assert all(download.path.startswith("/files/img-") for download in downloads)
    assert all("authorization" not in download.headers for download in downloads)
    generated = fake.generated_images
    assert [image.data for image in result.images] == [generated[d.path.removeprefix("/files/")] for d in downloads]
    assert [(image.width, image.height) for image in result.images] == [(3, 9), (3, 9)]


@pytest.mark.parametrize(
    ("image_format", "mime_type", "extension"),
    [("PNG", "image/png", "png"), ("JPEG", "image/jpeg", "jpg"), ("WEBP", "image/webp", "webp")],
)
@pytest.mark.parametrize("response_format", ["b64_json", "url"])
async def test_image_format_detected(
    fake: FakeProvider,
    http: ProviderHttp,
    image_format: str,
    mime_type: str,
    extension: str,
    response_format: Any,
) -> None:
    fake.image_format = image_format  # type: ignore[assignment]
    fake.image_response_format = response_format
    fake.image_width, fake.image_height = 20, 11

    result = await generate(http, openai_target(fake), ImageRequest(prompt=PROMPT, model="dall-e-2"))

    (image,) = result.images
    assert image.mime_type == mime_type
    assert image.extension == extension
    assert (image.width, image.height) == (20, 11)
    assert [image.data] == list(fake.generated_images.values())


async def test_dall_e_3_revised_prompt_kept(fake: FakeProvider, http: ProviderHttp) -> None:
    result = await generate(http, openai_target(fake), ImageRequest(prompt=PROMPT, model="dall-e-3"))

    (image,) = result.images
    assert image.revised_prompt == revise_prompt(PROMPT)
    assert result.usage is None


async def test_gpt_image_usage_kept(fake: FakeProvider, http: ProviderHttp) -> None:
    request = ImageRequest(prompt=PROMPT, model="gpt-image-1", n=2, quality="low")

    result = await generate(http, openai_target(fake), request)

    assert result.usage is not None
    assert result.usage["input_tokens"] == count_tokens(PROMPT)
    assert result.usage["output_tokens"] == GPT_IMAGE_OUTPUT_TOKENS[("low", "1024x1024")] * 2
    assert result.usage["total_tokens"] == result.usage["input_tokens"] + result.usage["output_tokens"]
    assert result.usage["input_tokens_details"]["image_tokens"] == 0


async def test_extra_images_are_dropped(fake: FakeProvider, http: ProviderHttp) -> None:
    files = [make_png(2, 2, (index, 0, 0)) for index in range(3)]
    fake.image_response_override = {"created": 1, "data": [{"b64_json": encoded(data)} for data in files]}

    result = await generate(http, openai_target(fake), ImageRequest(prompt=PROMPT, model="dall-e-2"))

    assert [image.data for image in result.images] == files[:1]
    assert result.cost_usd == 0.02


async def test_items_without_image_are_skipped(fake: FakeProvider, http: ProviderHttp) -> None:
    data = make_png(2, 3)
    fake.image_response_override = {"data": [{"revised_prompt": "nothing"}, "junk", {"b64_json": encoded(data)}]}

    result = await generate(http, openai_target(fake), ImageRequest(prompt=PROMPT, model="dall-e-2"))

    assert [image.data for image in result.images] == [data]


# -- costs ---------------------------------------------------------------------------------------------------


async def test_openai_cost_from_table(fake: FakeProvider, http: ProviderHttp) -> None:
    request = ImageRequest(prompt=PROMPT, model="dall-e-3", size="1792x1024", quality="hd")

    result = await generate(http, openai_target(fake), request)

    assert result.cost_usd == 0.12


async def test_openai_cost_counts_images_received(fake: FakeProvider, http: ProviderHttp) -> None:
    request = ImageRequest(prompt=PROMPT, model="gpt-image-1", n=3, quality="low")

    result = await generate(http, openai_target(fake), request)

    assert len(result.images) == 3
    assert result.cost_usd == 0.033


@pytest.mark.parametrize("model", ["test/fixed-image", "test/range-image"])
async def test_imagerouter_reported_cost_used(fake: FakeProvider, http: ProviderHttp, model: str) -> None:
    listed = {entry.id: price for entry, price in imagerouter_image_models(fake.imagerouter_models)}

    result = await generate(http, imagerouter_target(fake), ImageRequest(prompt=PROMPT, model=model))

    assert result.cost_usd == listed[model]
    assert len(result.images) == 1


async def test_imagerouter_override_cost_used(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.imagerouter_cost = 0.0125

    result = await generate(http, imagerouter_target(fake), ImageRequest(prompt=PROMPT, model="test/fixed-image"))

    assert result.cost_usd == 0.0125


@pytest.mark.parametrize("cost", [-1, "0.04", True, None])
async def test_imagerouter_unusable_cost_is_none(fake: FakeProvider, http: ProviderHttp, cost: Any) -> None:
    fake.image_response_override = {"data": [{"b64_json": encoded(make_png(2, 2))}], "cost": cost}

    result = await generate(http, imagerouter_target(fake), ImageRequest(prompt=PROMPT, model="test/fixed-image"))

    assert result.cost_usd is None


async def test_imagerouter_model_list_over_network(fake: FakeProvider, http: ProviderHttp) -> None:
    body = await http.request_json(
        "GET", f"{fake.url}/imagerouter/v1/models", provider="imagerouter", secret=VALID_API_KEY
    )

    models = {model.id: price for model, price in imagerouter_image_models(body)}

    assert models == {"test/fixed-image": 0.04, "test/range-image": 0.0013, "test/free-image:free": 0.0}


# -- provider errors -----------------------------------------------------------------------------------------


async def test_wrong_key_is_auth_failure(fake: FakeProvider, http: ProviderHttp) -> None:
    with pytest.raises(ProviderAuthFailed) as raised:
        await generate(http, openai_target(fake, api_key="sk-wrong-key-123456"), ImageRequest(PROMPT, "dall-e-2"))

    assert raised.value.status_code == 400
    assert "sk-wrong-key-123456" not in raised.value.message


async def test_rate_limit_keeps_retry_after(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.fail_next("/images/generations", status=429, retry_after=7)

    with pytest.raises(ProviderRateLimited) as raised:
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"))

    assert raised.value.headers == {"Retry-After": "7"}


@pytest.mark.parametrize("status", [500, 503])
async def test_server_error_is_request_failure(fake: FakeProvider, http: ProviderHttp, status: int) -> None:
    fake.fail_next("/images/generations", status=status)

    with pytest.raises(ProviderRequestFailed) as raised:
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"))

    assert type(raised.value) is ProviderRequestFailed
    assert raised.value.status_code == 502


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_rejected_request_keeps_scrubbed_message(fake: FakeProvider, http: ProviderHttp, status: int) -> None:
    message = f"Your request was rejected by the safety system for key {VALID_API_KEY}."
    fake.fail_next("/images/generations", status=status, error_code="content_policy_violation", message=message)

    with pytest.raises(ImageRequestRejected) as raised:
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-3"))

    assert raised.value.code == "image_request_rejected"
    assert raised.value.status_code == 400
    assert "rejected by the safety system" in raised.value.message
    assert VALID_API_KEY not in raised.value.message
    assert "[redacted]" in raised.value.message


async def test_imagerouter_rate_limit(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.fail_next("/v1/openai/images/generations", status=429, retry_after=3)

    with pytest.raises(ProviderRateLimited) as raised:
        await generate(http, imagerouter_target(fake), ImageRequest(PROMPT, "test/fixed-image"))

    assert raised.value.headers == {"Retry-After": "3"}
    assert fake.last_request().path == "/imagerouter/v1/openai/images/generations"


async def test_imagerouter_unknown_model_rejected(fake: FakeProvider, http: ProviderHttp) -> None:
    with pytest.raises(ImageRequestRejected) as raised:
        await generate(http, imagerouter_target(fake), ImageRequest(PROMPT, "test/video"))

    assert "test/video" in raised.value.message


async def test_slow_generation_times_out(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.fail_next("/images/generations", delay_seconds=PROVIDER_DELAY_SECONDS)

    with pytest.raises(ProviderTimeout):
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"), timeout=SHORT_TIMEOUT_SECONDS)


async def test_slow_download_times_out(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.image_response_format = "url"
    fake.fail_next(".png", delay_seconds=PROVIDER_DELAY_SECONDS)

    with pytest.raises(ProviderTimeout):
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"), timeout=SHORT_TIMEOUT_SECONDS)


# -- size limits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_name", ["big-5000.png", "stream-5000.png"])
async def test_oversized_download_rejected(fake: FakeProvider, http: ProviderHttp, file_name: str) -> None:
    fake.image_response_override = {"data": [{"url": f"{fake.url}/files/{file_name}"}]}

    with pytest.raises(GeneratedImageTooLarge) as raised:
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"), max_image_bytes=4096)

    assert raised.value.code == "generated_image_too_large"
    assert "4,096 bytes" in raised.value.message


@pytest.mark.parametrize("file_name", ["big-4096.png", "stream-4096.png"])
async def test_download_at_limit_is_read(fake: FakeProvider, http: ProviderHttp, file_name: str) -> None:
    # The file has exactly the allowed size and a PNG signature, so it is read and then fails the image check.
    fake.image_response_override = {"data": [{"url": f"{fake.url}/files/{file_name}"}]}

    with pytest.raises(InvalidImageResponse) as raised:
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"), max_image_bytes=4096)

    assert "truncated or corrupt" in raised.value.message


async def test_oversized_base64_rejected(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.image_width, fake.image_height = 64, 64
    size = len(make_png(64, 64))

    with pytest.raises(GeneratedImageTooLarge):
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"), max_image_bytes=size - 1)
    result = await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"), max_image_bytes=size)

    assert len(result.images[0].data) == size


async def test_too_many_pixels_rejected(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.image_width, fake.image_height = 10, 7

    with pytest.raises(GeneratedImageTooLarge) as raised:
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"), max_pixels=69)
    result = await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"), max_pixels=70)

    assert "10x7" in raised.value.message
    assert (result.images[0].width, result.images[0].height) == (10, 7)


# -- blocked URLs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data/iam/", "http://metadata.google.internal/computeMetadata/v1/"],
)
async def test_metadata_image_url_blocked(fake: FakeProvider, http: ProviderHttp, url: str) -> None:
    # The guard raises for these hosts before it resolves or connects, even with private addresses allowed.
    fake.image_response_override = {"data": [{"url": url}]}

    with pytest.raises(ProviderUrlNotAllowed) as raised:
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"))

    assert raised.value.status_code == 400
    assert raised.value.code == "provider_url_not_allowed"
    assert "image URL" in raised.value.message
    assert "metadata" in raised.value.message
    assert [record.path for record in fake.requests] == ["/openai/v1/images/generations"]


async def test_unresolvable_image_host_is_request_failure(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.image_response_override = {"data": [{"url": "https://images.example.invalid/fox.png"}]}

    with pytest.raises(ProviderRequestFailed) as raised:
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"))

    assert "could not be resolved" in raised.value.message


# -- unusable responses --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message_part"),
    [
        ({}, "no image"),
        ({"data": []}, "no image"),
        ({"data": "image"}, "no image"),
        ({"data": [{"revised_prompt": "no file"}]}, "no image"),
        ({"data": [{"b64_json": "not base64!"}]}, "not valid base64"),
        ({"data": [{"b64_json": encoded(b"GIF89a" + bytes(40))}]}, "not a PNG, JPEG or WEBP"),
        ({"data": [{"b64_json": encoded(make_png(16, 16)[:40])}]}, "truncated or corrupt"),
        ({"data": [{"b64_json": encoded(make_png(16, 16)[:-20])}]}, "truncated or corrupt"),
        ({"data": [{"b64_json": encoded(corrupt_checksum(make_png(16, 16)))}]}, "truncated or corrupt"),
        ({"data": [{"b64_json": encoded(image_bytes("JPEG")[:30])}]}, "truncated or corrupt"),
        ({"data": [{"b64_json": encoded(image_bytes("BMP"))}]}, "not a PNG, JPEG or WEBP"),
        ({"error": {"message": "Provider failed for key sk-test-valid"}}, "instead of images"),
        ([1, 2], "not a JSON object"),
    ],
)
async def test_unusable_body_is_invalid_response(
    fake: FakeProvider, http: ProviderHttp, body: Any, message_part: str
) -> None:
    fake.image_response_override = body

    with pytest.raises(InvalidImageResponse) as raised:
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"))

    assert raised.value.code == "invalid_image_response"
    assert raised.value.status_code == 502
    assert message_part in raised.value.message
    assert VALID_API_KEY not in raised.value.message


async def test_missing_image_file_is_invalid_response(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.image_response_override = {"data": [{"url": f"{fake.url}/files/missing.png"}]}

    with pytest.raises(InvalidImageResponse) as raised:
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"))

    assert "HTTP 404" in raised.value.message


async def test_undecodable_image_download_is_provider_error(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.image_response_override = {"data": [{"url": f"{fake.url}/files/big-4096.png"}]}
    # A plain body sent as gzip. The fake takes a rule that only adds a header when it also has a delay.
    fake.fail_next("/files/big-4096.png", headers={"content-encoding": "gzip"}, delay_seconds=0.01)

    with pytest.raises(ProviderRequestFailed) as raised:
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"))

    assert raised.value.code == "provider_unavailable"


async def test_redirected_image_url_is_not_followed(fake: FakeProvider, http: ProviderHttp) -> None:
    fake.image_response_override = {"data": [{"url": f"{fake.url}/files/elsewhere.png"}]}
    fake.fail_next("/files/elsewhere.png", redirect_to="http://169.254.169.254/latest/meta-data/")

    with pytest.raises(InvalidImageResponse) as raised:
        await generate(http, openai_target(fake), ImageRequest(PROMPT, "dall-e-2"))

    assert "HTTP 302" in raised.value.message


@pytest.mark.parametrize("dripped", ["head", "body"])
async def test_dripping_download_ends_at_deadline(dripped: str) -> None:
    # The whole response would take 8 s (head) or 4 s (body) at one byte a tenth of a second.
    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 40\r\n\r\n"
    sent_at_once, trickled = (b"", head + b"x" * 40) if dripped == "head" else (head, b"x" * 40)

    async with (
        trickling_server(sent_at_once=sent_at_once, trickled=trickled) as server,
        provider_http_on_server_transport() as http,
    ):
        started = time.monotonic()
        with pytest.raises(ProviderTimeout):
            await download_image(
                http,
                f"{server.url}/image.png",
                provider="openai",
                timeout=SHORT_TIMEOUT_SECONDS,
                max_image_bytes=MAX_IMAGE_BYTES,
            )
        elapsed = time.monotonic() - started
        await asyncio.wait_for(server.closed_by_client.wait(), timeout=5)

    # Ended by the download's own deadline, not by the response's end or the client's 10 s read timeout.
    assert elapsed < 2
    assert server.closed_by_client.is_set()


async def test_trickling_generation_ends_at_deadline() -> None:
    async with (
        trickling_server(sent_at_once=CHUNKED_JSON_HEAD, trickled=None) as server,
        provider_http_on_server_transport() as http,
    ):
        target = ProviderTarget(spec=PROVIDERS["openai"], base_url=f"{server.url}/v1", api_key="sk-test-trickle")
        started = time.monotonic()
        with pytest.raises(ProviderTimeout):
            await generate(http, target, ImageRequest(PROMPT, "dall-e-2"), timeout=SHORT_TIMEOUT_SECONDS)
        elapsed = time.monotonic() - started
        await asyncio.wait_for(server.closed_by_client.wait(), timeout=5)

    # Ended by the whole call's bound, not by the client's 10 s read timeout.
    assert elapsed < 3
    assert server.closed_by_client.is_set()
