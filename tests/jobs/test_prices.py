"""Image request validation, the OpenAI price table, cost estimates and ImageRouter model normalisation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pocketllm.errors import InvalidInput
from pocketllm.jobs.prices import (
    CREDITS_PER_USD,
    PRICE_DATE,
    PRICE_SOURCE,
    ImageRequest,
    estimate_cost,
    image_model_listing,
    imagerouter_image_models,
    known_image_models,
    validate_image_request,
)
from tests.fakes.provider import default_imagerouter_models

PROMPT = "a red fox in the snow"

# OpenAI's published prices in USD per image, by model, quality and size.
PUBLISHED_PRICES = [
    ("dall-e-2", "standard", "256x256", 0.016),
    ("dall-e-2", "standard", "512x512", 0.018),
    ("dall-e-2", "standard", "1024x1024", 0.020),
    ("dall-e-3", "standard", "1024x1024", 0.040),
    ("dall-e-3", "standard", "1024x1792", 0.080),
    ("dall-e-3", "standard", "1792x1024", 0.080),
    ("dall-e-3", "hd", "1024x1024", 0.080),
    ("dall-e-3", "hd", "1024x1792", 0.120),
    ("dall-e-3", "hd", "1792x1024", 0.120),
    ("gpt-image-1", "low", "1024x1024", 0.011),
    ("gpt-image-1", "low", "1024x1536", 0.016),
    ("gpt-image-1", "low", "1536x1024", 0.016),
    ("gpt-image-1", "medium", "1024x1024", 0.042),
    ("gpt-image-1", "medium", "1024x1536", 0.063),
    ("gpt-image-1", "medium", "1536x1024", 0.063),
    ("gpt-image-1", "high", "1024x1024", 0.167),
    ("gpt-image-1", "high", "1024x1536", 0.25),
    ("gpt-image-1", "high", "1536x1024", 0.25),
]


def rejection(provider: str, request: ImageRequest) -> InvalidInput:
    with pytest.raises(InvalidInput) as raised:
        validate_image_request(provider, request)
    return raised.value


# -- validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "size", "quality", "style"),
    [
        ("dall-e-2", "1024x1024", "standard", None),
        ("dall-e-3", "1024x1024", "standard", "vivid"),
        ("gpt-image-1", "1024x1024", "medium", None),
    ],
)
def test_openai_defaults_filled(model: str, size: str, quality: str, style: str | None) -> None:
    validated = validate_image_request("openai", ImageRequest(prompt=PROMPT, model=model))

    assert validated.size == size
    assert validated.quality == quality
    assert validated.style == style
    assert validated.prompt == PROMPT
    assert validated.n == 1


def test_given_options_are_kept() -> None:
    request = ImageRequest(prompt=PROMPT, model="dall-e-3", size="1792x1024", quality="hd", style="natural")

    assert validate_image_request("openai", request) == request


@pytest.mark.parametrize("provider", ["imagerouter", "custom"])
def test_open_providers_get_no_defaults(provider: str) -> None:
    request = ImageRequest(prompt=PROMPT, model="black-forest-labs/FLUX-1-schnell")

    assert validate_image_request(provider, request) == request


@pytest.mark.parametrize(
    ("provider", "request_", "code", "named_values"),
    [
        ("openai", ImageRequest(prompt="  \n ", model="dall-e-3"), "empty_prompt", []),
        ("imagerouter", ImageRequest(prompt="", model="test/fixed-image"), "empty_prompt", []),
        ("openai", ImageRequest(prompt="x" * 1001, model="dall-e-2"), "prompt_too_long", ["1,000"]),
        ("openai", ImageRequest(prompt="x" * 4001, model="dall-e-3"), "prompt_too_long", ["4,000"]),
        ("openai", ImageRequest(prompt="x" * 32_001, model="gpt-image-1"), "prompt_too_long", ["32,000"]),
        ("custom", ImageRequest(prompt="x" * 32_001, model="local-model"), "prompt_too_long", ["32,000"]),
        ("openai", ImageRequest(prompt=PROMPT, model="dall-e-4"), "unknown_image_model", ["gpt-image-1"]),
        ("openai", ImageRequest(prompt=PROMPT, model="DALL-E-3"), "unknown_image_model", ["dall-e-3"]),
        ("imagerouter", ImageRequest(prompt=PROMPT, model=""), "unknown_image_model", ["200"]),
        ("imagerouter", ImageRequest(prompt=PROMPT, model="flux schnell"), "unknown_image_model", ["200"]),
        ("custom", ImageRequest(prompt=PROMPT, model="m" * 201), "unknown_image_model", ["200"]),
        ("custom", ImageRequest(prompt=PROMPT, model="model\t1"), "unknown_image_model", ["200"]),
        (
            "openai",
            ImageRequest(prompt=PROMPT, model="dall-e-3", size="512x512"),
            "unsupported_image_size",
            ["1024x1024", "1024x1792", "1792x1024"],
        ),
        (
            "openai",
            ImageRequest(prompt=PROMPT, model="gpt-image-1", size="1792x1024"),
            "unsupported_image_size",
            ["1536x1024", "auto"],
        ),
        (
            "openai",
            ImageRequest(prompt=PROMPT, model="dall-e-2", size="auto"),
            "unsupported_image_size",
            ["256x256", "512x512"],
        ),
        ("imagerouter", ImageRequest(prompt=PROMPT, model="m", size="63x1024"), "unsupported_image_size", ["64"]),
        ("imagerouter", ImageRequest(prompt=PROMPT, model="m", size="1024x4097"), "unsupported_image_size", ["4096"]),
        ("custom", ImageRequest(prompt=PROMPT, model="m", size="large"), "unsupported_image_size", ["auto"]),
        ("custom", ImageRequest(prompt=PROMPT, model="m", size="1024x1024x3"), "unsupported_image_size", ["auto"]),
        ("openai", ImageRequest(prompt=PROMPT, model="dall-e-3", n=2), "unsupported_image_count", ["exactly 1"]),
        ("openai", ImageRequest(prompt=PROMPT, model="dall-e-2", n=11), "unsupported_image_count", ["1 to 10"]),
        ("openai", ImageRequest(prompt=PROMPT, model="gpt-image-1", n=0), "unsupported_image_count", ["1 to 10"]),
        ("openai", ImageRequest(prompt=PROMPT, model="gpt-image-1", n=True), "unsupported_image_count", ["1 to 10"]),
        ("imagerouter", ImageRequest(prompt=PROMPT, model="m", n=2), "unsupported_image_count", ["exactly 1"]),
        ("custom", ImageRequest(prompt=PROMPT, model="m", n=11), "unsupported_image_count", ["1 to 10"]),
        (
            "openai",
            ImageRequest(prompt=PROMPT, model="dall-e-2", style="vivid"),
            "unsupported_image_option",
            ["leave the style out"],
        ),
        (
            "openai",
            ImageRequest(prompt=PROMPT, model="gpt-image-1", style="natural"),
            "unsupported_image_option",
            ["leave the style out"],
        ),
        (
            "openai",
            ImageRequest(prompt=PROMPT, model="gpt-image-1", quality="hd"),
            "unsupported_image_option",
            ["low", "medium", "high", "auto"],
        ),
        (
            "openai",
            ImageRequest(prompt=PROMPT, model="dall-e-3", quality="low"),
            "unsupported_image_option",
            ["standard", "hd"],
        ),
        (
            "openai",
            ImageRequest(prompt=PROMPT, model="dall-e-3", style="pastel"),
            "unsupported_image_option",
            ["vivid", "natural"],
        ),
        (
            "openai",
            ImageRequest(prompt=PROMPT, model="dall-e-2", quality="hd"),
            "unsupported_image_option",
            ["standard"],
        ),
        (
            "imagerouter",
            ImageRequest(prompt=PROMPT, model="m", quality="ultra"),
            "unsupported_image_option",
            ["auto", "low", "medium", "high"],
        ),
        ("imagerouter", ImageRequest(prompt=PROMPT, model="m", style="vivid"), "unsupported_image_option", ["style"]),
        ("custom", ImageRequest(prompt=PROMPT, model="m", quality="hd"), "unsupported_image_option", ["quality"]),
        ("anthropic", ImageRequest(prompt=PROMPT, model="claude"), "unsupported_image_provider", ["imagerouter"]),
    ],
)
def test_invalid_request_is_400(provider: str, request_: ImageRequest, code: str, named_values: list[str]) -> None:
    error = rejection(provider, request_)

    assert error.code == code
    assert error.status_code == 400
    for value in named_values:
        assert value in error.message


@pytest.mark.parametrize(
    ("provider", "request_"),
    [
        ("openai", ImageRequest(prompt="x" * 1000, model="dall-e-2")),
        ("openai", ImageRequest(prompt="x" * 4000, model="dall-e-3")),
        ("openai", ImageRequest(prompt="x" * 32_000, model="gpt-image-1", n=10, size="auto", quality="auto")),
        ("openai", ImageRequest(prompt=PROMPT, model="dall-e-2", n=10, size="256x256", quality="standard")),
        ("imagerouter", ImageRequest(prompt=PROMPT, model="m", size="64x4096", quality="high")),
        ("imagerouter", ImageRequest(prompt=PROMPT, model="m" * 200, size="auto")),
        ("custom", ImageRequest(prompt="x" * 32_000, model="org/model:free", n=10, size="4096x64")),
    ],
)
def test_requests_at_limits_are_accepted(provider: str, request_: ImageRequest) -> None:
    validated = validate_image_request(provider, request_)

    assert validated.prompt == request_.prompt
    assert validated.n == request_.n


def test_unknown_model_message_names_models() -> None:
    error = rejection("openai", ImageRequest(prompt=PROMPT, model="midjourney"))

    for model in ("dall-e-2", "dall-e-3", "gpt-image-1"):
        assert model in error.message


# -- known models and estimates ------------------------------------------------------------------------------


def test_known_models_per_provider() -> None:
    assert [spec.id for spec in known_image_models("openai")] == ["dall-e-2", "dall-e-3", "gpt-image-1"]
    assert known_image_models("imagerouter") == []
    assert known_image_models("custom") == []
    assert known_image_models("groq") == []


@pytest.mark.parametrize(("model", "quality", "size", "usd"), PUBLISHED_PRICES)
def test_estimate_matches_published_price(model: str, quality: str, size: str, usd: float) -> None:
    request = validate_image_request("openai", ImageRequest(prompt=PROMPT, model=model, size=size, quality=quality))

    estimate = estimate_cost("openai", request)

    assert estimate.usd_per_image == usd
    assert estimate.usd_total == usd
    assert estimate.cost_credits == pytest.approx(usd * CREDITS_PER_USD)


def test_table_has_no_unpublished_prices() -> None:
    published = {(model, quality, size) for model, quality, size, _ in PUBLISHED_PRICES}
    in_table = {(spec.id, quality, size) for spec in known_image_models("openai") for quality, size in spec.prices}

    assert in_table == published


def test_dall_e_3_hd_wide_estimate() -> None:
    request = validate_image_request(
        "openai", ImageRequest(prompt=PROMPT, model="dall-e-3", size="1792x1024", quality="hd")
    )

    estimate = estimate_cost("openai", request)

    assert estimate.usd_total == 0.12
    assert estimate.cost_credits == 120


def test_gpt_image_low_three_images_estimate() -> None:
    request = validate_image_request("openai", ImageRequest(prompt=PROMPT, model="gpt-image-1", quality="low", n=3))

    estimate = estimate_cost("openai", request)

    assert estimate.usd_per_image == 0.011
    assert estimate.usd_total == 0.033
    assert estimate.cost_credits == 33
    assert estimate.n == 3
    assert estimate.size == "1024x1024"
    assert estimate.quality == "low"


def test_gpt_image_auto_priced_as_medium_square() -> None:
    request = validate_image_request(
        "openai", ImageRequest(prompt=PROMPT, model="gpt-image-1", size="auto", quality="auto", n=2)
    )

    estimate = estimate_cost("openai", request)

    assert estimate.usd_per_image == 0.042
    assert estimate.usd_total == 0.084
    assert estimate.size == "auto"
    assert estimate.quality == "auto"


def test_dall_e_2_ten_images_estimate() -> None:
    request = validate_image_request("openai", ImageRequest(prompt=PROMPT, model="dall-e-2", size="512x512", n=10))

    estimate = estimate_cost("openai", request)

    assert estimate.usd_total == 0.18
    assert estimate.cost_credits == 180


@pytest.mark.parametrize("provider", ["imagerouter", "custom"])
def test_catalogue_price_estimate(provider: str) -> None:
    request = validate_image_request(provider, ImageRequest(prompt=PROMPT, model="test/fixed-image"))

    estimate = estimate_cost(provider, request, catalogue_price_usd=0.04)

    assert estimate.usd_per_image == 0.04
    assert estimate.usd_total == 0.04
    assert estimate.cost_credits == 40


@pytest.mark.parametrize("price", [None, -0.01, float("nan"), float("inf"), True])
def test_unusable_catalogue_price_is_unknown(price: Any) -> None:
    request = ImageRequest(prompt=PROMPT, model="test/fixed-image")

    estimate = estimate_cost("imagerouter", request, catalogue_price_usd=price)

    assert estimate.usd_per_image is None
    assert estimate.usd_total is None
    assert estimate.cost_credits is None


def test_free_catalogue_price_is_zero() -> None:
    request = ImageRequest(prompt=PROMPT, model="test/free-image:free")

    estimate = estimate_cost("imagerouter", request, catalogue_price_usd=0)

    assert estimate.usd_total == 0
    assert estimate.cost_credits == 0


def test_breakdown_is_json_safe() -> None:
    request = validate_image_request("openai", ImageRequest(prompt=PROMPT, model="dall-e-3", quality="hd"))

    breakdown = estimate_cost("openai", request).breakdown()

    assert json.loads(json.dumps(breakdown)) == breakdown
    assert breakdown == {
        "provider": "openai",
        "model": "dall-e-3",
        "images": 1,
        "size": "1024x1024",
        "quality": "hd",
        "usd_per_image": 0.08,
        "usd_total": 0.08,
        "credits_per_usd": 1000,
        "price_source": PRICE_SOURCE,
        "price_date": PRICE_DATE,
    }


def test_breakdown_without_price() -> None:
    breakdown = estimate_cost("custom", ImageRequest(prompt=PROMPT, model="local")).breakdown()

    assert breakdown["usd_per_image"] is None
    assert breakdown["usd_total"] is None
    assert breakdown["price_source"] is None
    assert json.loads(json.dumps(breakdown)) == breakdown


# -- model lists ---------------------------------------------------------------------------------------------


def test_openai_listing_carries_prices() -> None:
    listing = {model.id: model for model in image_model_listing("openai")}

    assert sorted(listing) == ["dall-e-2", "dall-e-3", "gpt-image-1"]
    dall_e_3 = listing["dall-e-3"]
    assert dall_e_3.provider == "openai"
    assert dall_e_3.capabilities == ["images"]
    assert dall_e_3.pricing is None
    assert dall_e_3.metadata["price_per_image_usd"]["hd"]["1792x1024"] == 0.12
    assert dall_e_3.metadata["max_images"] == 1
    assert dall_e_3.metadata["styles"] == ["vivid", "natural"]
    assert dall_e_3.metadata["price_source"] == PRICE_SOURCE
    assert dall_e_3.metadata["price_date"] == PRICE_DATE
    assert listing["gpt-image-1"].metadata["sizes"] == ["1024x1024", "1024x1536", "1536x1024", "auto"]
    assert listing["gpt-image-1"].metadata["styles"] == []
    assert listing["dall-e-2"].metadata["qualities"] == ["standard"]
    for model in listing.values():
        assert json.loads(model.model_dump_json())["metadata"] == model.metadata


def test_listing_for_other_providers_is_empty() -> None:
    assert image_model_listing("imagerouter") == []
    assert image_model_listing("custom") == []


def test_imagerouter_models_keep_images_only() -> None:
    raw = default_imagerouter_models()

    models = {model.id: (model, price) for model, price in imagerouter_image_models(raw)}

    image_ids = sorted(model_id for model_id, entry in raw.items() if "image" in entry["output"])
    assert sorted(models) == image_ids
    assert "test/video" not in models
    fixed, fixed_price = models["test/fixed-image"]
    assert fixed_price == raw["test/fixed-image"]["providers"][0]["pricing"]["value"]
    assert fixed.provider == "imagerouter"
    assert fixed.capabilities == ["images"]
    assert fixed.metadata["pricing_type"] == "fixed"
    assert fixed.metadata["release_date"] == "2024-11-02"
    ranged, ranged_price = models["test/range-image"]
    price_range = raw["test/range-image"]["providers"][0]["pricing"]["range"]
    assert ranged_price == price_range["average"]
    assert ranged.metadata["price_range_usd"] == price_range
    assert ranged.metadata["supported_params"]["quality"] is True
    assert models["test/free-image:free"][1] == 0


def test_imagerouter_junk_entries_are_skipped() -> None:
    valid = {"output": ["image"], "providers": [{"id": "p", "pricing": {"type": "fixed", "value": 0.02}}]}
    raw: dict[str, Any] = {
        "ok/model": valid,
        "no-output": {"providers": valid["providers"]},
        "output-string": {"output": "image", "providers": valid["providers"]},
        "not-a-dict": ["image"],
        "none": None,
        "with space": valid,
        "m" * 201: valid,
        "": valid,
    }

    models = imagerouter_image_models(raw)

    assert [(model.id, price) for model, price in models] == [("ok/model", 0.02)]


@pytest.mark.parametrize(
    "providers",
    [
        None,
        "deepinfra",
        [],
        [None, "x", {"pricing": None}],
        [{"pricing": {"type": "fixed", "value": "0.04"}}],
        [{"pricing": {"type": "fixed", "value": -1}}],
        [{"pricing": {"type": "fixed", "value": True}}],
        [{"pricing": {"type": "calculated", "range": {"min": 0.1, "max": 0.2}}}],
        [{"pricing": {"type": "calculated", "range": [0.1, 0.2]}}],
    ],
)
def test_imagerouter_unusable_price_is_unknown(providers: Any) -> None:
    models = imagerouter_image_models({"odd/model": {"output": ["image"], "providers": providers}})

    assert [(model.id, price) for model, price in models] == [("odd/model", None)]


def test_imagerouter_price_from_later_provider() -> None:
    providers = [{"pricing": {"type": "fixed", "value": None}}, {"pricing": {"type": "fixed", "value": 0.03}}]

    models = imagerouter_image_models({"two/providers": {"output": ["image", "video"], "providers": providers}})

    assert [(model.id, price) for model, price in models] == [("two/providers", 0.03)]


def test_imagerouter_list_shape_is_accepted() -> None:
    raw = [
        {"id": "list/model", "output": ["image"], "providers": [{"pricing": {"type": "fixed", "value": 0.01}}]},
        {"id": "list/video", "output": ["video"]},
        {"output": ["image"]},
        "junk",
        None,
    ]

    models = imagerouter_image_models(raw)

    assert [(model.id, price) for model, price in models] == [("list/model", 0.01)]


@pytest.mark.parametrize("raw", [None, "models", 42, {"data": "x"}])
def test_imagerouter_body_without_models(raw: Any) -> None:
    assert imagerouter_image_models(raw) == []
