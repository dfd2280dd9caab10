"""Generation: ``Pipeline`` (prompt + control images -> images), the denoising loop
(``sampling``), image handling (``images``) and samplers by name (``schedulers``)."""

from .controlled import Control, Pipeline, Region, Result, save_png
from .sampling import encode_text, rescale_noise_cfg
from .text_to_image import encode_prompts, text_to_image

__all__ = ["Control", "Pipeline", "Region", "Result", "save_png", "encode_prompts", "encode_text", "rescale_noise_cfg",
           "text_to_image"]
