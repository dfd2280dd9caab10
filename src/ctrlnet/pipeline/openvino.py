"""The OpenVINO backend: the denoising loop's UNet and ControlNets and the VAE decoder run as
OpenVINO models on the CPU (``Pipeline(..., backend="openvino")``, ``--backend openvino``;
optional extra ``ctrlnet[openvino]``).

Everything else stays ours and in PyTorch: the loop (``sampling.denoise``: inactive nets not run,
hint features once, control mode on the conditional half, regions, inpainting, several nets,
``every``), the text encoders, the hint encoders, the VAE encoder. The wrappers below are called
exactly as the torch modules are, so the loop does not know which backend runs.

Lifecycle of one module (a UNet, a ControlNet or a VAE):

1. converted once per weights (``openvino.convert_model`` traces it, batch, text length and latent
   size left dynamic) and saved as OpenVINO IR (f32 weights) under the disk cache, in a folder named
   by a digest of its class, config and every weight byte (and the OpenVINO and graph versions): a
   changed weight file gets a new folder, never a stale model. Later processes read the IR back
   (a fraction of a second) instead of converting (half a minute for an SD1.5 UNet on 2 cores).
2. compiled per input shape (``reshape`` to static shapes, then ``compile_model`` with the
   precision hint f32 or bf16; a few seconds): static shapes ran faster than dynamic ones in a
   one-off check. The last ``max_shapes`` compiled shapes per module are kept in memory.

OpenVINO's own compiled-model cache (``CACHE_DIR``) is not used: in the same check (an SD1.5 UNet
at 256 px) it saved a fraction of a second of a few-second compile and wrote 3.3 GB per shape.

The converted graphs take what varies per call as inputs: a ControlNet's 13 residual scales (so one
graph serves every scale, soft or flat) and the UNet's residuals (zeros at steps without control).
Weights are frozen into the IR: after changing a module's weights in place call
``Pipeline.reset_backend()`` (the next call converts again, under the new digest).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import diffusers
import numpy as np
import torch
from torch import nn

from ..models.controlnet import ControlNet
from ..version import __version__

GRAPH_VERSION = "1"  # bump when a graph's inputs or outputs change: old cache folders are then not read
PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}
INSTALL = "pip install 'ctrlnet[openvino]' (the openvino package)"


class MissingExtra(ImportError, ValueError):
    """An optional package is not installed (an ImportError; a ValueError too, so the CLI prints it as
    one line, as every other bad-input error)."""


def openvino_module():
    """The ``openvino`` package, or a MissingExtra that says how to get it."""
    try:
        import openvino
    except ImportError as e:
        raise MissingExtra(f"backend openvino needs the openvino package: {INSTALL}") from e
    return openvino


def available() -> bool:
    try:
        openvino_module()
    except ImportError:
        return False
    return True


def default_cache_dir() -> Path:
    """``$CTRLNET_OPENVINO_CACHE``, else ``~/.cache/ctrlnet/openvino``."""
    env = os.environ.get("CTRLNET_OPENVINO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ctrlnet" / "openvino"


def code_versions(module: nn.Module) -> dict:
    """What the traced graph's code depends on: the versions of OpenVINO, torch, diffusers and
    ctrlnet, and the source files of the module's class and of these graphs (a local edit counts)."""
    sources = {Path(__file__), Path(inspect.getsourcefile(type(module)) or __file__)}
    return {"openvino": openvino_module().__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "ctrlnet": __version__, "graph": GRAPH_VERSION,
            "sources": sorted(hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sources if p.is_file())}


def weights_digest(module: nn.Module, kind: str) -> str:
    """A digest of what the converted graph depends on: the kind of graph, the module's class and
    config (without diffusers' bookkeeping keys ``_name_or_path``, ``_use_default_values``..., which
    change with the folder and even the process), every parameter and buffer (name, dtype, shape,
    bytes) and ``code_versions``. SHA-256 (hardware-accelerated on current CPUs, 1.3 GB/s per core
    here), tensors hashed in parallel threads (hashlib releases the GIL), then their digests in order."""
    config = getattr(module, "config", {})
    config = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
    config = {k: v for k, v in config.items() if not str(k).startswith("_")}
    head = json.dumps([kind, type(module).__name__, config, code_versions(module)], sort_keys=True, default=str)
    tensors = [*module.named_parameters(), *module.named_buffers()]  # non-persistent buffers too

    def one(item) -> bytes:
        name, t = item
        t = t.detach().cpu().contiguous()
        h = hashlib.sha256(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
        return h.digest()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        parts = list(pool.map(one, tensors))
    return hashlib.sha256(head.encode() + b"".join(parts)).hexdigest()[:32]


def residual_shapes(unet_config, b: int, h: int, w: int) -> list[tuple[int, ...]]:
    """The shapes of the UNet's control residuals for latents (b, C, h, w): the down residuals (one
    after conv_in, one per ResNet layer, one per downsampler), then the middle one."""
    channels = list(unet_config.block_out_channels)
    layers = unet_config.layers_per_block
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(channels)
    shapes = [(b, channels[0], h, w)]
    for i, c in enumerate(channels):
        shapes += [(b, c, h, w)] * layers[i]
        if i < len(channels) - 1:  # a stride-2 3x3 conv with padding 1
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((b, c, h, w))
    return shapes + [(b, channels[-1], h, w)]


# ------------------------------------------------------------------ the graphs that are traced

class UNetGraph(nn.Module):
    """The UNet with control residuals as inputs: (sample, timestep, text, *residuals[, text_embeds,
    time_ids]) -> the prediction. sample (B, C, h, w); timestep (1,) float32; text (B, T, D)."""

    def __init__(self, unet: nn.Module, n_residuals: int, sdxl: bool):
        super().__init__()
        self.unet, self.n, self.sdxl = unet, n_residuals, sdxl

    def forward(self, sample, timestep, text, *rest):
        res = rest[:self.n]
        added = {"text_embeds": rest[self.n], "time_ids": rest[self.n + 1]} if self.sdxl else None
        return self.unet(sample, timestep, text, added_cond_kwargs=added,
                         down_block_additional_residuals=list(res[:-1]), mid_block_additional_residual=res[-1],
                         return_dict=False)[0]


class ControlNetGraph(nn.Module):
    """A ControlNet from its hint features: (sample, timestep, text, hint, scales (n,)[, text_embeds,
    time_ids]) -> n residuals, residual i multiplied by scales[i] (a shuffle-style net's pooled)."""

    def __init__(self, net: ControlNet, sdxl: bool):
        super().__init__()
        self.net, self.sdxl = net, sdxl

    def forward(self, sample, timestep, text, hint, scales, *added):
        added = {"text_embeds": added[0], "time_ids": added[1]} if self.sdxl else None
        down, mid = self.net(sample, timestep, text, hint=hint, added_cond_kwargs=added)  # scale 1
        out = [r * scales[i] for i, r in enumerate((*down, mid))]
        if self.net.config.global_pool_conditions:  # after the scales, as ControlNet.forward (both are linear)
            out = [r.mean(dim=(2, 3), keepdim=True) for r in out]
        return tuple(out)


class DecoderGraph(nn.Module):
    """The VAE decoder: (B, C, h, w) unscaled latents -> (B, 3, H, W) images in about [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


# ------------------------------------------------------------------ converted modules

def complete(folder: Path) -> bool:
    """A cache folder holding a whole converted model (the IR and its weights)."""
    return (folder / "model.xml").is_file() and (folder / "model.bin").is_file()


class ConvertedModel:
    """One torch module as an OpenVINO model: the IR (read from the cache or converted on first use,
    with that call's inputs as the tracing example) and its compiled forms, one per input shape."""

    def __init__(self, backend: "OpenVINOBackend", module: nn.Module, graph: nn.Module, kind: str,
                 dynamic: Sequence[Sequence[int]]):
        self.backend, self.module, self.graph, self.kind = backend, module, graph, kind
        self.dynamic = [list(d) for d in dynamic]  # each input's shape, -1 where it may change
        self.model = None  # the ov.Model (dynamic shapes)
        self.compiled: OrderedDict[tuple, Any] = OrderedDict()  # input shapes -> ov.CompiledModel, last used last
        self.folder: Path | None = None
        self.converted = False  # whether this process converted it (False: read from the cache)

    def load(self, example: Sequence[torch.Tensor]) -> None:
        ov = self.backend.ov
        digest = weights_digest(self.module, self.kind)
        self.folder = self.backend.cache_dir / f"{self.kind}-{digest}"
        xml = self.folder / "model.xml"
        if complete(self.folder):
            self.model = self.backend.core.read_model(str(xml))
            return
        with torch.no_grad(), warnings.catch_warnings():
            # tracing warns about every Python branch on a shape: those branches hold for every size the
            # pipeline makes (multiples of the size multiple), which the parity tests check
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            model = ov.convert_model(self.graph, example_input=tuple(example),
                                     input=[ov.PartialShape(d) for d in self.dynamic])
        # written to a temporary folder, then renamed: an interrupted write leaves no half model behind
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}-", dir=self.folder.parent))
        try:
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)  # f32: the torch weights exactly
            (tmp / "source.json").write_text(json.dumps({"kind": self.kind, "class": type(self.module).__name__,
                                                         **code_versions(self.module)}) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            if self.folder.exists() and not complete(self.folder):  # left incomplete by hand: replaced
                shutil.rmtree(self.folder)
            try:
                os.replace(tmp, self.folder)
            except OSError:
                if not complete(self.folder):  # not "another process got there first": a real failure
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process's model, the same one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.model = self.backend.core.read_model(str(xml))  # memory-mapped weights, not the converter's copy
        self.converted = True

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.model is None:
            self.load(inputs)
        shapes = tuple(tuple(x.shape) for x in inputs)
        compiled = self.compiled.get(shapes)
        if compiled is None:
            model = self.model.clone()
            model.reshape({port: self.backend.ov.PartialShape(list(s)) for port, s in zip(model.inputs, shapes)})
            compiled = self.backend.core.compile_model(model, "CPU", self.backend.properties)
            self.compiled[shapes] = compiled
            while len(self.compiled) > self.backend.max_shapes:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(shapes)
        arrays = [x.detach().float().contiguous().numpy() for x in inputs]
        # CompiledModel's own infer request, reused call after call (not thread-safe: the server
        # runs every generation on its one model thread); outputs are copied out
        out = compiled(arrays)
        return [torch.from_numpy(np.asarray(out[port])) for port in compiled.outputs]


class _Wrapper:
    """Passes attribute reads (``config``, ``device``) through to the torch module, as the loop reads them."""

    dtype = torch.float32  # what the loop casts inputs to: the graphs take f32 (bf16 runs inside OpenVINO)

    def __init__(self, module: nn.Module, converted: ConvertedModel):
        self.module, self.converted = module, converted

    def __getattr__(self, name: str):
        if name == "module":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)


def timestep_input(t) -> torch.Tensor:
    """(1,) float32: the graphs' timestep (the torch modules broadcast it over the batch alike)."""
    return torch.as_tensor(t, dtype=torch.float32).reshape(-1)[:1]


class OpenVINOUNet(_Wrapper):
    """Called as ``UNet2DConditionModel`` is by ``controlled_unet_forward``."""

    _zeros: list[torch.Tensor] | None = None  # the last steps-without-control residuals, kept per size

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None, return_dict=False):
        b, _, h, w = sample.shape
        if down_block_additional_residuals is None:  # a step without control: zeros, one graph for all steps
            if self._zeros is None or self._zeros[0].shape[0] != b or self._zeros[0].shape[2:] != (h, w):
                self._zeros = [torch.zeros(s) for s in residual_shapes(self.module.config, b, h, w)]  # read-only
            residuals = self._zeros
        else:
            residuals = [*down_block_additional_residuals, mid_block_additional_residual]
        inputs = [sample, timestep_input(timestep), encoder_hidden_states, *residuals]
        if added_cond_kwargs:
            inputs += [added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]]
        return (self.converted(inputs)[0],)


class OpenVINOControlNet(_Wrapper):
    """Called as ``ControlNet`` is by ``sampling.control_residuals`` (with ``hint=``)."""

    def __call__(self, sample, timestep, encoder_hidden_states, hint=None, conditioning_scale=1.0,
                 guess_mode=False, added_cond_kwargs=None, **kwargs):
        if hint is None:
            raise ValueError("the OpenVINO ControlNet takes hint features: hint=net.embed_condition(condition)")
        if kwargs:
            raise ValueError(f"the OpenVINO ControlNet does not take {sorted(kwargs)}; use backend torch for them")
        scales = torch.tensor(self.module.residual_scales(conditioning_scale, soft=guess_mode))  # (n,)
        inputs = [sample, timestep_input(timestep), encoder_hidden_states, hint, scales]
        if added_cond_kwargs:
            inputs += [added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]]
        out = self.converted(inputs)
        return tuple(out[:-1]), out[-1]


class OpenVINODecoder(_Wrapper):
    """Called as ``AutoencoderKL`` is by ``sampling.decode``: ``decode(z, return_dict=False)``."""

    def decode(self, z, return_dict=False):
        return (self.converted([z])[0],)


class OpenVINOBackend:
    """Runs modules through OpenVINO on the CPU: ``wrap(module)`` gives the object the loop calls in
    its place (made once per module and kept). ``precision``: torch.float32 or torch.bfloat16
    (OpenVINO's inference precision hint; on a CPU without native bf16 OpenVINO runs f32).
    ``cache_dir``: where converted models are kept (``default_cache_dir()``). ``max_shapes``: compiled
    input shapes kept per module (each holds the weights once more, in the inference precision, and
    its activation buffers)."""

    def __init__(self, precision: torch.dtype = torch.float32, cache_dir: str | Path | None = None,
                 max_shapes: int = 2, threads: int | None = None):
        if precision not in PRECISIONS:
            name = {torch.float16: "fp16"}.get(precision, str(precision))
            raise ValueError(f"backend openvino: dtype {name} is not supported; use fp32 or bf16")
        if max_shapes < 1:
            raise ValueError(f"max_shapes: {max_shapes}; keep at least 1 compiled shape per module")
        self.ov = openvino_module()
        self.core = self.ov.Core()
        self.precision = precision
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.max_shapes = max_shapes
        self.properties = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.properties["INFERENCE_NUM_THREADS"] = int(threads)
        self._wrapped: dict[int, Any] = {}  # id(module) -> wrapper (which keeps the module alive)

    def wrap(self, module: nn.Module):
        """The OpenVINO stand-in for a UNet, a ControlNet or a VAE (for decoding)."""
        if id(module) in self._wrapped:
            return self._wrapped[id(module)]
        wrapper = self._make(module)
        self._wrapped[id(module)] = wrapper
        return wrapper

    def _make(self, module: nn.Module):
        if isinstance(module, ControlNet):
            c = module.config
            sdxl = c.addition_embed_type == "text_time"
            dynamic = [[-1, c.in_channels, -1, -1], [1], [-1, -1, c.cross_attention_dim],
                       [-1, c.block_out_channels[0], -1, -1], [c.num_residuals]]
            if sdxl:
                dynamic += [[-1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim], [-1, 6]]
            return OpenVINOControlNet(module, ConvertedModel(self, module, ControlNetGraph(module, sdxl), "controlnet",
                                                             dynamic))
        config = getattr(module, "config", None)
        if config is not None and "cross_attention_dim" in config:  # a UNet2DConditionModel
            if config.get("class_embed_type") or config.get("addition_embed_type") not in (None, "text_time"):
                raise ValueError("backend openvino: this UNet's class / added embeddings are not supported "
                                 f"(class_embed_type={config.get('class_embed_type')}, "
                                 f"addition_embed_type={config.get('addition_embed_type')}); use backend torch")
            sdxl = config.get("addition_embed_type") == "text_time"
            shapes = residual_shapes(config, 1, 8, 8)
            dynamic = ([[-1, config.in_channels, -1, -1], [1], [-1, -1, config.cross_attention_dim]]
                       + [[-1, s[1], -1, -1] for s in shapes])
            if sdxl:
                dynamic += [[-1, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim],
                            [-1, 6]]
            return OpenVINOUNet(module, ConvertedModel(self, module, UNetGraph(module, len(shapes), sdxl), "unet",
                                                       dynamic))
        if config is not None and "latent_channels" in config:  # an AutoencoderKL: its decoder
            return OpenVINODecoder(module, ConvertedModel(self, module, DecoderGraph(module), "vae-decoder",
                                                          [[-1, config.latent_channels, -1, -1]]))
        raise ValueError(f"backend openvino: cannot run a {type(module).__name__}; use backend torch")

    def forget(self, module: nn.Module) -> None:
        """Drop a module's converted and compiled models (an unloaded ControlNet)."""
        self._wrapped.pop(id(module), None)

    def reset(self) -> None:
        """Drop every converted model: the next call converts (or reads from the cache) again, with the
        weights the modules have then."""
        self._wrapped.clear()

    def converted(self) -> list[ConvertedModel]:
        return [w.converted for w in self._wrapped.values()]

