"""Generation: ``Pipeline`` (prompt + control images -> images, ``controlled``), the denoising
loop (``sampling``), text conditioning (``text``), samplers by name (``schedulers``) and the
shortest tensor path for the monitor and tests (``text_to_image``)."""

from .controlled import Control, Pipeline, Region, Result
from .sampling import rescale_noise_cfg
from .text import PromptTruncatedWarning, encode_text
from .text_to_image import text_to_image

__all__ = ["Control", "Pipeline", "Region", "Result", "PromptTruncatedWarning", "encode_text", "rescale_noise_cfg",
           "text_to_image"]
