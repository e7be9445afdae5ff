"""Image models and their prices: which options each model takes, request validation and cost estimates.

OpenAI models have a fixed table here. ImageRouter and custom servers have no table: ImageRouter publishes
a price per model in its model list (see `imagerouter_image_models`), and custom servers publish none.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from pocketllm.errors import InvalidInput
from pocketllm.providers.schemas import ProviderModel

# One credit is a tenth of a US cent, so 1 USD is 1000 credits.
CREDITS_PER_USD = 1000
# No single image request costs anywhere near this; a larger reported cost is treated as unknown.
MAX_USD_AMOUNT = 10_000.0
PRICE_SOURCE = "https://openai.com/api/pricing/"
# The date OpenAI published the gpt-image-1 prices, the newest entries of the table. The DALL-E prices are
# older and were unchanged on that date.
# NOTE: the figures match OpenAI's per-image table as published in 2025, but were not re-checked against
# the live page when this table was written.
PRICE_DATE = "2025-04-23"

IMAGE_PROVIDERS = ("openai", "imagerouter", "custom")
MAX_MODEL_ID_LENGTH = 200
# Prompt limit for models without a published one; it is gpt-image-1's, the longest OpenAI allows.
DEFAULT_MAX_PROMPT_LENGTH = 32_000
# Side limits for sizes sent to ImageRouter and custom servers, whose models publish none.
MIN_IMAGE_SIDE = 64
MAX_IMAGE_SIDE = 4096
# ImageRouter's generation endpoint ignores `n` and returns one image per request.
IMAGEROUTER_MAX_IMAGES = 1
CUSTOM_MAX_IMAGES = 10
IMAGEROUTER_QUALITIES = ("auto", "low", "medium", "high")
AUTO = "auto"
MAX_IMAGEROUTER_MODELS = 2000

_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")


class UnsupportedImageProvider(InvalidInput):
    code = "unsupported_image_provider"
    default_message = "The provider cannot generate images; use openai, imagerouter or custom."


class EmptyPrompt(InvalidInput):
    code = "empty_prompt"
    default_message = "The prompt is empty; describe the image to generate."


class PromptTooLong(InvalidInput):
    code = "prompt_too_long"
    default_message = "The prompt is too long for the model; shorten it."


class UnknownImageModel(InvalidInput):
    code = "unknown_image_model"
    default_message = "The image model is not known for this provider."


class UnsupportedImageSize(InvalidInput):
    code = "unsupported_image_size"
    default_message = "The image size is not supported by the model."


class UnsupportedImageCount(InvalidInput):
    code = "unsupported_image_count"
    default_message = "The number of images is not supported by the model."


class UnsupportedImageOption(InvalidInput):
    code = "unsupported_image_option"
    default_message = "The model does not take this quality or style."


@dataclass(frozen=True, slots=True)
class ImageRequest:
    prompt: str
    model: str
    size: str | None = None
    n: int = 1
    quality: str | None = None
    style: str | None = None


@dataclass(frozen=True, slots=True)
class ImageModelSpec:
    """An image model with a published price table: the options it takes and USD per image for each."""

    id: str
    name: str
    provider: str
    sizes: tuple[str, ...]
    max_n: int
    qualities: tuple[str, ...]
    styles: tuple[str, ...]
    default_size: str
    default_quality: str
    default_style: str | None
    max_prompt_length: int
    # Request fields the model's API accepts besides model and prompt. Others are never sent.
    parameters: frozenset[str]
    # USD per image by (quality, size). "auto" values are priced through `_priced_quality` and `_priced_size`.
    prices: dict[tuple[str, str], float] = field(default_factory=dict)

    def price_per_image(self, quality: str, size: str) -> float | None:
        return self.prices.get((_priced_quality(self, quality), _priced_size(self, size)))


def _price_table(per_quality: dict[str, dict[str, float]]) -> dict[tuple[str, str], float]:
    return {(quality, size): price for quality, by_size in per_quality.items() for size, price in by_size.items()}


_OPENAI_MODELS: tuple[ImageModelSpec, ...] = (
    ImageModelSpec(
        id="dall-e-2",
        name="DALL-E 2",
        provider="openai",
        sizes=("256x256", "512x512", "1024x1024"),
        max_n=10,
        qualities=("standard",),
        styles=(),
        default_size="1024x1024",
        default_quality="standard",
        default_style=None,
        max_prompt_length=1000,
        parameters=frozenset({"n", "size", "response_format"}),
        prices=_price_table({"standard": {"256x256": 0.016, "512x512": 0.018, "1024x1024": 0.020}}),
    ),
    ImageModelSpec(
        id="dall-e-3",
        name="DALL-E 3",
        provider="openai",
        sizes=("1024x1024", "1024x1792", "1792x1024"),
        max_n=1,
        qualities=("standard", "hd"),
        styles=("vivid", "natural"),
        default_size="1024x1024",
        default_quality="standard",
        default_style="vivid",
        max_prompt_length=4000,
        parameters=frozenset({"n", "size", "quality", "style", "response_format"}),
        prices=_price_table(
            {
                "standard": {"1024x1024": 0.040, "1024x1792": 0.080, "1792x1024": 0.080},
                "hd": {"1024x1024": 0.080, "1024x1792": 0.120, "1792x1024": 0.120},
            }
        ),
    ),
    ImageModelSpec(
        id="gpt-image-1",
        name="GPT Image 1",
        provider="openai",
        sizes=("1024x1024", "1024x1536", "1536x1024", AUTO),
        max_n=10,
        qualities=("low", "medium", "high", AUTO),
        styles=(),
        # Explicit defaults instead of the API's "auto", so the estimate is the price of what is generated.
        default_size="1024x1024",
        default_quality="medium",
        default_style=None,
        max_prompt_length=32_000,
        # gpt-image-1 always returns base64 and rejects `response_format` with 400 unknown_parameter.
        parameters=frozenset({"n", "size", "quality"}),
        # NOTE: these are output prices only. The prompt's text tokens are billed on top of them, at
        # $5.00 per million tokens on the same page.
        prices=_price_table(
            {
                "low": {"1024x1024": 0.011, "1024x1536": 0.016, "1536x1024": 0.016},
                "medium": {"1024x1024": 0.042, "1024x1536": 0.063, "1536x1024": 0.063},
                "high": {"1024x1024": 0.167, "1024x1536": 0.25, "1536x1024": 0.25},
            }
        ),
    ),
)
_OPENAI_MODELS_BY_ID = {spec.id: spec for spec in _OPENAI_MODELS}


def _priced_quality(spec: ImageModelSpec, quality: str) -> str:
    # NOTE: "auto" lets the model choose, so the bill can be anywhere from the low to the high price.
    # It is estimated at the medium price, which may be below the actual cost.
    return "medium" if quality == AUTO and spec.id == "gpt-image-1" else quality


def _priced_size(spec: ImageModelSpec, size: str) -> str:
    # NOTE: "auto" is estimated at the square 1024x1024 price, the cheapest size.
    return "1024x1024" if size == AUTO and spec.id == "gpt-image-1" else size


def known_image_models(provider: str) -> list[ImageModelSpec]:
    """Return the models with a price table for `provider`: OpenAI's three, and none for other providers."""
    return list(_OPENAI_MODELS) if provider == "openai" else []


def validate_image_request(provider: str, request: ImageRequest) -> ImageRequest:
    """Check an image request against what the provider's model takes, and return it with defaults filled in.

    Raises the InvalidInput subclasses of this module (status 400), whose messages name the accepted values.
    """
    if provider not in IMAGE_PROVIDERS:
        raise UnsupportedImageProvider(
            f"The provider {provider[:40]!r} cannot generate images; use one of: {', '.join(IMAGE_PROVIDERS)}."
        )
    if not request.prompt.strip():
        raise EmptyPrompt()

    if provider == "openai":
        return _validate_openai(request)
    return _validate_open_ended(provider, request)


def _validate_openai(request: ImageRequest) -> ImageRequest:
    spec = _OPENAI_MODELS_BY_ID.get(request.model)
    if spec is None:
        raise UnknownImageModel(
            f"The image model {request.model[:60]!r} is not an OpenAI image model; "
            f"use one of: {', '.join(_OPENAI_MODELS_BY_ID)}."
        )
    _check_prompt_length(request.prompt, spec.max_prompt_length, spec.id)
    _check_count(request.n, spec.max_n, spec.id)

    size = request.size if request.size is not None else spec.default_size
    if size not in spec.sizes:
        raise UnsupportedImageSize(
            f"The size {size[:20]!r} is not supported by {spec.id}; use one of: {', '.join(spec.sizes)}."
        )
    quality = request.quality if request.quality is not None else spec.default_quality
    if quality not in spec.qualities:
        raise UnsupportedImageOption(
            f"The quality {quality[:20]!r} is not supported by {spec.id}; use one of: {', '.join(spec.qualities)}."
        )
    style = request.style if request.style is not None else spec.default_style
    if style is not None and style not in spec.styles:
        accepted = f"use one of: {', '.join(spec.styles)}" if spec.styles else "leave the style out"
        raise UnsupportedImageOption(f"The style {style[:20]!r} is not supported by {spec.id}; {accepted}.")

    return replace(request, size=size, quality=quality, style=style)


def _validate_open_ended(provider: str, request: ImageRequest) -> ImageRequest:
    """Check a request for ImageRouter or a custom server, whose models publish no option lists."""
    model = request.model
    if not model or len(model) > MAX_MODEL_ID_LENGTH or any(character.isspace() for character in model):
        raise UnknownImageModel(
            f"The image model id must be 1 to {MAX_MODEL_ID_LENGTH} characters without spaces, "
            "for example 'black-forest-labs/FLUX-1-schnell'."
        )
    _check_prompt_length(request.prompt, DEFAULT_MAX_PROMPT_LENGTH, model[:60])
    max_n = IMAGEROUTER_MAX_IMAGES if provider == "imagerouter" else CUSTOM_MAX_IMAGES
    _check_count(request.n, max_n, model[:60])

    if request.size is not None and not _is_open_size(request.size):
        raise UnsupportedImageSize(
            f"The size {request.size[:20]!r} is invalid; use 'auto' or WIDTHxHEIGHT with each side "
            f"from {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} pixels, for example '1024x768'."
        )
    if request.style is not None:
        raise UnsupportedImageOption(f"{provider} image requests take no style; leave the style out.")
    if request.quality is not None:
        if provider != "imagerouter":
            raise UnsupportedImageOption(f"{provider} image requests take no quality; leave the quality out.")
        if request.quality not in IMAGEROUTER_QUALITIES:
            raise UnsupportedImageOption(
                f"The quality {request.quality[:20]!r} is not supported by ImageRouter; "
                f"use one of: {', '.join(IMAGEROUTER_QUALITIES)}."
            )
    return request


def _check_prompt_length(prompt: str, limit: int, model: str) -> None:
    if len(prompt) > limit:
        raise PromptTooLong(
            f"The prompt is {len(prompt):,} characters, more than the {limit:,} that {model} accepts; shorten it."
        )


def _check_count(n: int, max_n: int, model: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_n:
        accepted = "exactly 1 image" if max_n == 1 else f"1 to {max_n} images"
        raise UnsupportedImageCount(f"{model} generates {accepted} per request; got {n!r}.")


def _is_open_size(size: str) -> bool:
    if size == AUTO:
        return True
    match = _SIZE.match(size)
    if match is None:
        return False
    return all(MIN_IMAGE_SIDE <= int(side) <= MAX_IMAGE_SIDE for side in match.groups())


# -- estimates -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """The expected price of an image request, in USD and credits. None prices mean the price is unknown."""

    provider: str
    model: str
    n: int
    size: str | None
    quality: str | None
    usd_per_image: float | None
    usd_total: float | None
    cost_credits: float | None

    def breakdown(self) -> dict[str, Any]:
        """Return the estimate as a JSON-safe dict, with the unit and the source of the prices."""
        return {
            "provider": self.provider,
            "model": self.model,
            "images": self.n,
            "size": self.size,
            "quality": self.quality,
            "usd_per_image": self.usd_per_image,
            "usd_total": self.usd_total,
            "credits_per_usd": CREDITS_PER_USD,
            "price_source": PRICE_SOURCE if self.provider == "openai" else None,
            "price_date": PRICE_DATE if self.provider == "openai" else None,
        }


def estimate_cost(provider: str, request: ImageRequest, *, catalogue_price_usd: float | None = None) -> CostEstimate:
    """Estimate the price of a request that `validate_image_request` has returned.

    OpenAI prices come from the table. For ImageRouter and custom servers `catalogue_price_usd` (USD per
    image, from the provider's model list) is used when given, and the prices are None otherwise.
    """
    usd_per_image: float | None = None
    if provider == "openai":
        spec = _OPENAI_MODELS_BY_ID.get(request.model)
        if spec is not None and request.size is not None and request.quality is not None:
            usd_per_image = spec.price_per_image(request.quality, request.size)
    else:
        usd_per_image = usd_amount(catalogue_price_usd)

    usd_total: float | None = None
    cost_credits: float | None = None
    if usd_per_image is not None:
        # Decimal keeps table prices exact: 3 x 0.011 is 0.033, not 0.032999999999999995.
        total = Decimal(str(usd_per_image)) * request.n
        usd_total = float(total)
        cost_credits = float(total * CREDITS_PER_USD)
    return CostEstimate(
        provider=provider,
        model=request.model,
        n=request.n,
        size=request.size,
        quality=request.quality,
        usd_per_image=usd_per_image,
        usd_total=usd_total,
        cost_credits=cost_credits,
    )


def usd_amount(value: Any) -> float | None:
    """Return `value` as a float when it is a number (not a bool) from 0 to MAX_USD_AMOUNT, else None.

    The cap keeps a provider's absurd figure from overflowing when it is converted to credits.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and 0 <= value <= MAX_USD_AMOUNT else None


# -- model lists ---------------------------------------------------------------------------------------------


def image_model_listing(provider: str) -> list[ProviderModel]:
    """Return the models with a price table for `provider` as catalogue entries, prices in `metadata`.

    `pricing` stays None because ModelPricing is per million tokens, not per image.
    """
    return [_listing_entry(spec) for spec in known_image_models(provider)]


def _listing_entry(spec: ImageModelSpec) -> ProviderModel:
    prices: dict[str, dict[str, float]] = {}
    for (quality, size), price in spec.prices.items():
        prices.setdefault(quality, {})[size] = price
    metadata: dict[str, Any] = {
        "sizes": list(spec.sizes),
        "max_images": spec.max_n,
        "qualities": list(spec.qualities),
        "styles": list(spec.styles),
        "default_size": spec.default_size,
        "default_quality": spec.default_quality,
        "max_prompt_length": spec.max_prompt_length,
        "price_per_image_usd": prices,
        "price_source": PRICE_SOURCE,
        "price_date": PRICE_DATE,
    }
    return ProviderModel(
        id=spec.id,
        name=spec.name,
        provider=spec.provider,
        capabilities=["images"],
        metadata=metadata,
    )


def imagerouter_image_models(raw: Any) -> list[tuple[ProviderModel, float | None]]:
    """Normalise the body of ImageRouter's `GET /v1/models` into image models and their USD price per image.

    The body is an object keyed by model id. Each value lists its `output` kinds ("image" or "video") and
    its `providers`, each with a `pricing` of `{"type": "fixed", "value": ...}` or a `range` of min,
    average and max. The price is the first provider's fixed value, else its range average, else None.
    A list of entries with an `id` field is accepted too. Video models and malformed entries are skipped.
    """
    entries: list[tuple[Any, Any]]
    if isinstance(raw, dict):
        entries = list(raw.items())
    elif isinstance(raw, list):
        entries = [(entry.get("id"), entry) for entry in raw if isinstance(entry, dict)]
    else:
        return []

    models: list[tuple[ProviderModel, float | None]] = []
    seen: set[str] = set()
    for model_id, entry in entries[:MAX_IMAGEROUTER_MODELS]:
        normalised = _imagerouter_model(model_id, entry)
        if normalised is not None and normalised[0].id not in seen:
            seen.add(normalised[0].id)
            models.append(normalised)
    return models


def _imagerouter_model(model_id: Any, entry: Any) -> tuple[ProviderModel, float | None] | None:
    if not isinstance(model_id, str) or not isinstance(entry, dict):
        return None
    if not model_id or len(model_id) > MAX_MODEL_ID_LENGTH or any(character.isspace() for character in model_id):
        return None
    outputs = entry.get("output")
    if not isinstance(outputs, list) or "image" not in outputs:
        return None

    price, pricing_metadata = _imagerouter_price(entry.get("providers"))
    metadata: dict[str, Any] = {"price_per_image_usd": price, **pricing_metadata}
    release_date = entry.get("release_date")
    if isinstance(release_date, str) and len(release_date) <= 40:
        metadata["release_date"] = release_date
    supported = entry.get("supported_params")
    if isinstance(supported, dict):
        metadata["supported_params"] = {
            key: value for key, value in supported.items() if isinstance(key, str) and isinstance(value, bool)
        }

    model = ProviderModel(
        id=model_id,
        name=model_id,
        provider="imagerouter",
        capabilities=["images"],
        metadata=metadata,
    )
    return model, price


def _imagerouter_price(providers: Any) -> tuple[float | None, dict[str, Any]]:
    """Return the first usable per-image price among `providers`, and metadata describing it."""
    if not isinstance(providers, list):
        return None, {}
    for provider in providers:
        pricing = provider.get("pricing") if isinstance(provider, dict) else None
        if not isinstance(pricing, dict):
            continue
        raw_type = pricing.get("type")
        pricing_type = raw_type[:40] if isinstance(raw_type, str) else None

        fixed = usd_amount(pricing.get("value"))
        if fixed is not None:
            return fixed, {"pricing_type": pricing_type}
        price_range = pricing.get("range")
        if not isinstance(price_range, dict):
            continue
        bounds = {key: usd_amount(price_range.get(key)) for key in ("min", "average", "max")}
        average = bounds["average"]
        if average is not None:
            known_bounds = {key: value for key, value in bounds.items() if value is not None}
            return average, {"pricing_type": pricing_type, "price_range_usd": known_bounds}
    return None, {}
