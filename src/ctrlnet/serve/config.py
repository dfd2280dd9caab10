"""What the operator chose at start (``ctrlnet serve`` flags): the models to load and the limits.
No third-party imports, so the CLI can build it before the serve extra is checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    base: str = "nano"
    tokenizer: str | None = None  # a single-file base's tokenizer folder (default: the shipped CLIP one)
    # name -> path (file or folder); the bundled nano nets are added when the base is nano
    controlnets: dict[str, str] = field(default_factory=dict)
    dtype: str = "fp32"
    queue: int = 4                   # requests that may wait behind the running generation
    max_upload_mb: float = 16.0      # whole request body
    max_pixels: int = 4096 * 4096    # per uploaded image, checked before decoding
    max_side: int = 1024             # output width/height, and detect/image resolution
    max_steps: int = 100
    max_images: int = 4              # images per request
    max_controls: int = 4
    # torch.compile the UNet and ControlNets (Pipeline(compile=...)): True, or torch.compile's kwargs
    # (used when the Server loads the base; a Pipeline handed to Server keeps its own setting)
    compile: Union[bool, dict] = False
