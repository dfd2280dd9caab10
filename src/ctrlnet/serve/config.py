"""What the operator chose at start (``ctrlnet serve`` flags): the models to load and the limits.
No third-party imports, so the CLI can build it before the serve extra is checked."""

from __future__ import annotations

import ipaddress
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
    backend: str = "torch"  # or "openvino" (Pipeline(backend=...))
    # HTTP basic credentials "USER:PASS[,USER2:PASS2]" (A1111's --api-auth), required on every route
    # when set; a server bound beyond loopback refuses to start without them
    api_auth: str | None = None


def credentials(spec: str | None) -> list[tuple[str, str]]:
    """``--api-auth``'s "USER:PASS[,USER2:PASS2]" as (user, password) pairs; a ValueError naming
    the flag when an entry has no ':' or an empty user or password."""
    if not spec:
        return []
    pairs = []
    for i, entry in enumerate(spec.split(",")):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth: entry {i + 1} must be USER:PASS with both non-empty "
                             "(several: USER:PASS,USER2:PASS2)")
        pairs.append((user, password))
    return pairs


def is_loopback(host: str) -> bool:
    """An address of this machine only: localhost or a loopback IP (127.x.y.z, ::1) - not a name
    that merely starts with "127." (127.example.com)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(config: ServeConfig) -> None:
    """A server reachable beyond this machine must ask for credentials: anyone who reaches an open
    port could otherwise generate with the operator's models and hardware."""
    credentials(config.api_auth)  # well-formed, whatever the host
    if not is_loopback(config.host) and not config.api_auth:
        raise ValueError(f"--host {config.host}: a server reachable beyond this machine needs credentials: "
                         "add --api-auth USER:PASS (or set CTRLNET_API_AUTH), or bind 127.0.0.1")
