"""The JSON bodies of the HTTP API (pydantic models; their names are the OpenAPI component names).

Named ``...Request`` / ``...Response`` so that none reads like a library type: a
``ControlUnitRequest`` becomes a ``ctrlnet.pipeline.Control`` in ``to_control``, the one place the
request schema meets the library; the rules a control obeys are ``Control.check()``'s. Numeric
bounds come from ``ctrlnet.pipeline.ranges`` (the one table the CLI and the Python API check too),
so the schema documents them and a request outside them is a 422 before anything runs. NaN and
infinity are refused (``allow_inf_nan=False``): JSON has no such numbers, but Python's parser
takes ``NaN`` and ``Infinity``.
"""

from typing import Literal, Union

import numpy as np
import pydantic
from pydantic import ConfigDict, Field

from ..images import RESIZE_MODES
from ..pipeline import Control
from ..pipeline.ranges import MAX_SEED, RANDOM_SEED, RANGES
from ..pipeline.sampling import CONTROL_MODES

Param = Union[int, float, str, bool]


def bounds(name: str) -> dict:
    """``RANGES[name]`` as pydantic Field bounds (``ge``/``gt``, ``le``)."""
    r = RANGES[name]
    return {"gt" if r.lo_open else "ge": r.lo, "le": r.hi}


class ControlUnitRequest(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)
    model: str = Field(description="a ControlNet name from GET /api/models")
    image: str | None = Field(None, description="base64 PNG/JPEG/WebP or data URL; multipart: file field imageN")
    annotator: str = Field("", description="detector run on the image first ('' = the image is the condition)")
    params: dict[str, Param] = Field(default_factory=dict, description="annotator parameters")
    # range checked by Control.check (one message for one value or a list)
    scale: Union[float, list[float]] = Field(1.0, description=f"weight: one float or one per residual, each "
                                                              f"{RANGES['scale'].describe()}")
    start: float = Field(0.0, **bounds("start"))
    end: float = Field(1.0, **bounds("end"))
    # the library's own lists, so the schema offers exactly what Control accepts
    mode: Literal[CONTROL_MODES] = "balanced"
    resize_mode: Literal[RESIZE_MODES] = "crop_and_resize"
    every: int = Field(1, **bounds("every"), description="run the net at every k-th step, reuse its residuals "
                                                          "in between")
    type: str = Field("", max_length=64, description="a Union ControlNet's condition type for image (canny, depth, "
                                                     "openpose, ...: GET /api/models lists each net's types)")
    pairs: list["UnionPairRequest"] = Field(default_factory=list, max_length=8, description=(
        "more (image, type) pairs for the same Union ControlNet, run through its trunk once with image/type"))

    def to_control(self, image: np.ndarray, pair_images: list[np.ndarray] = ()) -> Control:
        """This unit as the Pipeline takes it, with its decoded ``image`` (and its pairs' images)."""
        kw = dict(model=self.model, image=image, annotator=self.annotator, annotator_params=dict(self.params),
                  scale=self.scale, start=self.start, end=self.end, mode=self.mode,
                  resize_mode=self.resize_mode, every=self.every, type=self.type)
        if self.pairs:
            kw.update(image=[image, *pair_images], type=[self.type] + [p.type for p in self.pairs],
                      annotator=[self.annotator] + [p.annotator for p in self.pairs])
        return Control(**kw)


class UnionPairRequest(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="base64 PNG/JPEG/WebP or data URL")
    type: str = Field(max_length=64)
    annotator: str = ""


class GenerateRequest(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str = Field(max_length=4000)
    negative_prompt: str = Field("", max_length=4000)
    steps: int = Field(20, **bounds("steps"), description="also at most the server's max_steps")
    guidance: float | None = Field(None, **bounds("guidance"), description="default: the base's own")
    guidance_rescale: float | None = Field(None, **bounds("guidance_rescale"))
    seed: int = Field(0, ge=RANDOM_SEED, le=MAX_SEED, description="image i uses seed + i; -1: random (the "
                                                                   "seeds drawn come back in 'seeds')")
    num_images: int = Field(1, **bounds("num_images"), description="also at most the server's max_images")
    width: int | None = Field(None, **bounds("width"), description="default: from the first control image's "
                                                                    "aspect, within the server's max_side/max_pixels")
    height: int | None = Field(None, **bounds("height"))
    scheduler: str = "ddim"
    controls: list[ControlUnitRequest] = Field(default_factory=list)


class GenerateResponse(pydantic.BaseModel):
    images: list[str] = Field(description="PNG data URLs, with the A1111 'parameters' text chunk")
    conditions: list[str] = Field(description="the condition map each control unit used, PNG data URLs")
    parameters: list[str]
    seeds: list[int]
    width: int
    height: int
    seconds: float
    warnings: list[str]


class DetectRequest(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    image: str | None = Field(None, description="base64 or data URL; multipart: file field 'image'")
    annotator: str
    params: dict[str, Param] = Field(default_factory=dict)


class DetectResponse(pydantic.BaseModel):
    image: str = Field(description="the condition map, PNG data URL")
    width: int
    height: int
    seconds: float


def validation_message(e: pydantic.ValidationError, what: str) -> str:
    """One line naming the first few bad fields and their values (``steps: Input should be greater
    than or equal to 1, got 0``); values other than short scalars are not echoed back."""
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or what
        value = err.get("input")
        got = f", got {value!r}" if isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= 40) \
            else ""
        parts.append(f"{loc}: {err['msg']}{got}")
    return f"{what}: " + "; ".join(parts)
