"""The JSON bodies of the HTTP API (pydantic models; their names are the OpenAPI component names).

Named ``...Request`` / ``...Response`` so that none reads like a library type: a
``ControlUnitRequest`` becomes a ``ctrlnet.pipeline.Control`` in ``to_control``, the one place the
request schema meets the library; the rules a control obeys are ``Control.check()``'s.
"""

from typing import Literal, Union

import numpy as np
import pydantic
from pydantic import ConfigDict, Field

from ..images import RESIZE_MODES
from ..pipeline import Control
from ..pipeline.sampling import CONTROL_MODES

Param = Union[int, float, str, bool]


class ControlUnitRequest(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = Field(description="a ControlNet name from GET /api/models")
    image: str | None = Field(None, description="base64 PNG/JPEG/WebP or data URL; multipart: file field imageN")
    annotator: str = Field("", description="detector run on the image first ('' = the image is the condition)")
    params: dict[str, Param] = Field(default_factory=dict, description="annotator parameters")
    scale: Union[float, list[float]] = Field(1.0, description="weight: one float or one per residual")
    start: float = Field(0.0, ge=0, le=1)
    end: float = Field(1.0, ge=0, le=1)
    # the library's own lists, so the schema offers exactly what Control accepts
    mode: Literal[CONTROL_MODES] = "balanced"
    resize_mode: Literal[RESIZE_MODES] = "crop_and_resize"

    def to_control(self, image: np.ndarray) -> Control:
        """This unit as the Pipeline takes it, with its decoded ``image``."""
        return Control(model=self.model, image=image, annotator=self.annotator, annotator_params=dict(self.params),
                       scale=self.scale, start=self.start, end=self.end, mode=self.mode,
                       resize_mode=self.resize_mode)


class GenerateRequest(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=4000)
    negative_prompt: str = Field("", max_length=4000)
    steps: int = Field(20, ge=1)
    guidance: float | None = Field(None, ge=0, le=50, description="default: the base's own")
    guidance_rescale: float | None = Field(None, ge=0, le=1)
    seed: int = Field(0, ge=0, lt=2 ** 63)
    num_images: int = Field(1, ge=1)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
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
    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="base64 or data URL; multipart: file field 'image'")
    annotator: str
    params: dict[str, Param] = Field(default_factory=dict)


class DetectResponse(pydantic.BaseModel):
    image: str = Field(description="the condition map, PNG data URL")
    width: int
    height: int
    seconds: float


def validation_message(e: pydantic.ValidationError, what: str) -> str:
    """One line naming the first few bad fields (``controls.0.mode: ...``)."""
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or what
        parts.append(f"{loc}: {err['msg']}")
    return f"{what}: " + "; ".join(parts)
