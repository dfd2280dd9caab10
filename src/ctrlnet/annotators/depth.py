"""Depth maps and depth-derived normal maps: MiDaS v3 DPT-hybrid (``depth_midas``,
``normal_midas``) and Depth Anything v1 / v2 (``depth_anything``, ``depth_anything_v2``).

``depth_midas`` (ControlNet 1.0 ``depth``, 1.1 / A1111 ``depth_midas``): MiDaS v3 DPT-hybrid
(ViT-B/16 on a ResNet-50 (BiT) stem, DPT decoder; Ranftl et al. 2021, https://arxiv.org/abs/2103.13413)
from ``dpt_hybrid-midas-501f0c75.pt`` (published at https://huggingface.co/lllyasviel/Annotators and
in lllyasviel/ControlNet's ``annotator/ckpts``; the isl-org/MiDaS layout: timm's ``vit_base_resnet50_384``
under ``pretrained.model.``, the decoder under ``scratch.``), or the transformers folder
``Intel/dpt-hybrid-midas``. Both run in transformers' ``DPTForDepthEstimation`` (hybrid config, BiT
backbone, no timm): the ``.pt``'s keys are renamed at load time (``midas_to_transformers``; the
mapping of transformers' ``convert_dpt_hybrid_to_pytorch.py``, written out key by key here).
Pre-processing as ControlNet's ``annotator/midas``: the photo at its own size (the preprocessor
resolution: ``detect_resolution``, or the generation's size), sides rounded down to multiples of 32
so the decoder's x2 steps meet, scaled down to at most 1024 x 1024 pixels' worth (``midas_size``),
RGB scaled to [-1, 1] (``x / 127.5 - 1``: mean 0.5, std 0.5). Post-processing as ``annotator/midas/__init__.py``: the relative inverse depth
``depth -= min; depth /= max; 255 * depth`` (near = white), resized back to the input's size.

``normal_midas`` (ControlNet 1.0 ``normal``, A1111 ``normal_midas``): the same network's raw
prediction at the same size through ``normals_from_depth``: Sobel x / y of the raw depth,
zero where the normalised depth is under ``bg_th`` (background), z = ``a`` = 2 pi, unit length,
``n * 127.5 + 127.5`` stored as RGB = (z, y, x) - the channel order A1111 returns and ControlNet
1.0's ``control_sd15_normal`` was fed (its gradio app reverses the detector's (x, y, z) array).

``depth_anything`` / ``depth_anything_v2`` (A1111 names): transformers'
``DepthAnythingForDepthEstimation`` from a folder (``LiheYoung/depth-anything-{large,base,small}-hf``,
``depth-anything/Depth-Anything-V2-{Large,Base,Small}-hf``). Pre-processing as the folder's image
processor (``preprocessor_config.json``; DPTImageProcessor: keep the aspect, scale as little as
possible towards 518 x 518, sides rounded to multiples of 14, PIL bicubic, ImageNet mean / std; written
out here and tested against the processor). Post-processing as A1111's ``annotator/depth_anything*.py``:
bilinear back to the input size, then min-max to 0-255 (near = white; a metric model's depth is
negated first). A1111 feeds these networks BGR (``cv2.COLOR_BGR2RGB`` on an RGB image); we feed RGB,
what the networks were trained on.

Every map is (H, W, 3) uint8 at the input's size; ``BATCH`` runs several same-size images per
forward pass. A map with no depth variation (constant prediction) is black.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (BitConfig, DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTConfig,
                          DPTForDepthEstimation)

from ..images import resize_photo, resize_plain
from .spec import Spec
from .weights import (Weights, WeightsError, cached, check_folder, device, find, find_any,
                      load_strict, read_state_dict, strip_prefix)

MIDAS = Weights("dpt_hybrid-midas-501f0c75.pt", ("lllyasviel/Annotators",),
                "the MiDaS v3 DPT-hybrid depth network (isl-org/MiDaS layout)")
# the same file where lllyasviel/ControlNet keeps it (its hub snapshot, or a checkout of the repo)
MIDAS_CONTROLNET = Weights("annotator/ckpts/dpt_hybrid-midas-501f0c75.pt", ("lllyasviel/ControlNet",), MIDAS.what)
MIDAS_FOLDER = Weights("", ("Intel/dpt-hybrid-midas",), "MiDaS v3 DPT-hybrid as a transformers folder")
DEPTH_ANYTHING = Weights("", ("LiheYoung/depth-anything-large-hf", "LiheYoung/depth-anything-base-hf",
                              "LiheYoung/depth-anything-small-hf"), "Depth Anything (v1), a transformers folder")
DEPTH_ANYTHING_V2 = Weights("", ("depth-anything/Depth-Anything-V2-Large-hf",
                                 "depth-anything/Depth-Anything-V2-Base-hf",
                                 "depth-anything/Depth-Anything-V2-Small-hf"),
                            "Depth Anything V2, a transformers folder")

MIDAS_MULTIPLE = 32  # the DPT decoder upsamples x2 from 1/32 of the input: sides must divide by 32
# ControlNet 1.0 / 1.1 and A1111 run the network at the image's own size (the preprocessor
# resolution); a ViT's attention grows with the square of the tokens, so at most this many pixels
# (4096 tokens; a 16 MP photo would need 65536 tokens and ~200 GB of attention)
MIDAS_MAX_PIXELS = 1024 * 1024
NORMAL_A = 2 * math.pi  # ControlNet 1.0's z for the normal map (annotator/midas, ``a=np.pi * 2.0``)


# --- MiDaS: the original layout <-> transformers' DPT-hybrid ------------------------------------

def midas_config() -> DPTConfig:
    """transformers' config of the published DPT-hybrid: ViT-B/16 (12 layers, 768 wide, LayerNorm
    eps 1e-6 as timm's) on a BiT ResNet-50 stem of 3 stages (3, 4, 9 bottlenecks), readout
    "project", reassemble factors (1, 1, 1, 0.5), decoder 256 wide."""
    bit = BitConfig(global_padding="SAME", layer_type="bottleneck", depths=[3, 4, 9],
                    hidden_sizes=[256, 512, 1024, 2048], out_features=["stage1", "stage2", "stage3"],
                    embedding_dynamic_padding=True)
    return DPTConfig(is_hybrid=True, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, image_size=384, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True,
                     readout_type="project", backbone_out_indices=[2, 5, 8, 11], reassemble_factors=[1, 1, 1, 0.5],
                     neck_hidden_sizes=[256, 512, 768, 768], fusion_hidden_size=256,
                     backbone_featmap_shape=[1, 1024, 24, 24], use_batch_norm_in_fusion_residual=False,
                     backbone_config=bit)


# transformers name -> MiDaS name, one rule per module kind (the attention's q / k / v are one
# ``attn.qkv`` there, handled apart). Refinenet n of MiDaS is fusion layer 4 - n (the decoder runs
# from the coarsest), act_postprocess n is reassemble layer n - 1.
_TO_MIDAS = [
    (r"dpt\.embeddings\.cls_token", lambda m: "pretrained.model.cls_token"),
    (r"dpt\.embeddings\.position_embeddings", lambda m: "pretrained.model.pos_embed"),
    (r"dpt\.embeddings\.backbone\.bit\.embedder\.convolution\.(.+)",
     lambda m: f"pretrained.model.patch_embed.backbone.stem.conv.{m[1]}"),
    (r"dpt\.embeddings\.backbone\.bit\.embedder\.norm\.(.+)",
     lambda m: f"pretrained.model.patch_embed.backbone.stem.norm.{m[1]}"),
    (r"dpt\.embeddings\.backbone\.bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)",
     lambda m: f"pretrained.model.patch_embed.backbone.stages.{m[1]}.blocks.{m[2]}.{m[3]}"),
    (r"dpt\.embeddings\.projection\.(.+)", lambda m: f"pretrained.model.patch_embed.proj.{m[1]}"),
    (r"dpt\.encoder\.layer\.(\d+)\.layernorm_before\.(.+)", lambda m: f"pretrained.model.blocks.{m[1]}.norm1.{m[2]}"),
    (r"dpt\.encoder\.layer\.(\d+)\.layernorm_after\.(.+)", lambda m: f"pretrained.model.blocks.{m[1]}.norm2.{m[2]}"),
    (r"dpt\.encoder\.layer\.(\d+)\.attention\.output\.dense\.(.+)",
     lambda m: f"pretrained.model.blocks.{m[1]}.attn.proj.{m[2]}"),
    (r"dpt\.encoder\.layer\.(\d+)\.intermediate\.dense\.(.+)",
     lambda m: f"pretrained.model.blocks.{m[1]}.mlp.fc1.{m[2]}"),
    (r"dpt\.encoder\.layer\.(\d+)\.output\.dense\.(.+)", lambda m: f"pretrained.model.blocks.{m[1]}.mlp.fc2.{m[2]}"),
    (r"dpt\.layernorm\.(.+)", lambda m: f"pretrained.model.norm.{m[1]}"),
    (r"neck\.reassemble_stage\.readout_projects\.(\d)\.0\.(.+)",
     lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.0.project.0.{m[2]}"),
    (r"neck\.reassemble_stage\.layers\.(\d)\.projection\.(.+)",
     lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.3.{m[2]}"),
    (r"neck\.reassemble_stage\.layers\.(\d)\.resize\.(.+)",
     lambda m: f"pretrained.act_postprocess{int(m[1]) + 1}.4.{m[2]}"),
    (r"neck\.convs\.(\d)\.(.+)", lambda m: f"scratch.layer{int(m[1]) + 1}_rn.{m[2]}"),
    (r"neck\.fusion_stage\.layers\.(\d)\.projection\.(.+)",
     lambda m: f"scratch.refinenet{4 - int(m[1])}.out_conv.{m[2]}"),
    (r"neck\.fusion_stage\.layers\.(\d)\.residual_layer(\d)\.convolution(\d)\.(.+)",
     lambda m: f"scratch.refinenet{4 - int(m[1])}.resConfUnit{m[2]}.conv{m[3]}.{m[4]}"),
    (r"head\.head\.(\d)\.(.+)", lambda m: f"scratch.output_conv.{m[1]}.{m[2]}"),
]
_QKV_HF = re.compile(r"dpt\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
_QKV_MIDAS = re.compile(r"pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
# timm's ImageNet classifier: in the published file, unused by MiDaS (its features end at the blocks)
MIDAS_CLASSIFIER = {"pretrained.model.head.weight": (1000, 768), "pretrained.model.head.bias": (1000,)}


def midas_names(hf_keys) -> dict[str, str]:
    """MiDaS name -> transformers name for ``hf_keys`` (a DPT-hybrid's state-dict keys), q / k / v
    left out (``attn.qkv`` holds all three)."""
    names = {}
    for key in hf_keys:
        if _QKV_HF.fullmatch(key):
            continue
        for pattern, rename in _TO_MIDAS:
            m = re.fullmatch(pattern, key)
            if m:
                names[rename(m)] = key
                break
        else:
            raise KeyError(f"no MiDaS name for transformers key {key}")
    return names


def midas_to_transformers(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """A MiDaS-layout state dict under transformers' names (``names`` from ``midas_names``): each
    ``attn.qkv`` (3 D, ...) split into query / key / value (D, ...) in that order (timm's), the
    unused ImageNet classifier dropped. Keys it does not know are kept as they are, so that a file
    made for another network shows its own names in the loading error."""
    out = {}
    for key, value in state.items():
        qkv = _QKV_MIDAS.fullmatch(key)
        if qkv and value.shape[0] % 3 == 0:
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"dpt.encoder.layer.{qkv[1]}.attention.attention.{part}.{qkv[2]}"] = chunk
        elif key not in MIDAS_CLASSIFIER:
            out[names.get(key, key)] = value
    return out


def transformers_to_midas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``midas_to_transformers`` (without the classifier): a DPT-hybrid state dict
    in the published file's layout (its q / k / v concatenated into ``attn.qkv``)."""
    names = {hf: midas for midas, hf in midas_names(state).items()}
    out = {}
    for key, value in state.items():
        qkv = _QKV_HF.fullmatch(key)
        if qkv is None:
            out[names[key]] = value
        elif qkv[2] == "query":
            parts = [state[f"dpt.encoder.layer.{qkv[1]}.attention.attention.{p}.{qkv[3]}"]
                     for p in ("query", "key", "value")]
            out[f"pretrained.model.blocks.{qkv[1]}.attn.qkv.{qkv[3]}"] = torch.cat(parts, dim=0)
    return out


class _Layout(torch.nn.Module):
    """A file layout (names and shapes, meta tensors) for ``load_strict`` to check a state dict
    against before it is renamed, so that its errors name the published keys; it loads nothing."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.tensors = tensors

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return None


def dpt_hybrid_depth(net: DPTForDepthEstimation, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1], H and W multiples of 32 -> (B, H, W) relative inverse depth.

    MiDaS's ``forward_vit`` / ``forward_flex`` over transformers' modules: the position embeddings
    resized (bilinear) to the input's patch grid, which transformers' own hybrid forward does only
    at the config's square image size."""
    emb, config = net.dpt.embeddings, net.config
    b, _, h, w = x.shape
    gh, gw = h // emb.patch_size, w // emb.patch_size
    # BiT stages 1-3: (B, 256, H/4, W/4), (B, 512, H/8, W/8), (B, 1024, H/16, W/16)
    features = emb.backbone(x).feature_maps
    tokens = emb.projection(features[-1]).flatten(2).transpose(1, 2)  # (B, gh * gw, 768)
    tokens = torch.cat([emb.cls_token.expand(b, -1, -1), tokens], dim=1)  # (B, 1 + gh * gw, 768)
    tokens = tokens + emb._resize_pos_embed(emb.position_embeddings, gh, gw)
    # the decoder takes the first two BiT stages and the ViT's hooked blocks (8 and 11), before its final norm
    hidden = list(features[:2])
    for i, layer in enumerate(net.dpt.encoder.layer):
        out = layer(tokens)
        tokens = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
        if i in config.backbone_out_indices[2:]:
            hidden.append(tokens)
    fused = net.neck(hidden, gh, gw)  # 4 x (B, 256, .); the last at H/2
    return net.head(fused)  # (B, H, W)


def _fp32_eval(net: torch.nn.Module) -> torch.nn.Module:
    return net.float().to(device()).eval()


def _load_folder(folder: Path, name: str, cls, model_types: tuple[str, ...], what: str) -> torch.nn.Module:
    """A transformers model from ``folder``, every weight present (a folder missing some is a
    ``WeightsError``, never a half-random model)."""
    check_folder(folder, name, model_types, what)
    try:
        net, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise WeightsError(f"annotator {name!r}: {folder} could not be loaded ({detail}); expected {what}") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing:
        raise WeightsError(f"annotator {name!r}: {folder} is not {what}: {len(missing)} weights missing or of other "
                           f"shapes ({', '.join(missing[:3])})")
    return _fp32_eval(net)


def _midas_path(name: str, model: str) -> Path:
    """``model`` (the .pt, a folder holding it, or a transformers folder), else the first of the
    ``.pt`` (lllyasviel/Annotators, lllyasviel/ControlNet's ``annotator/ckpts``) or an
    ``Intel/dpt-hybrid-midas`` folder found where ``weights.find`` looks."""
    return find_any(name, MIDAS_NEED, model)


def load_midas(name: str = "depth_midas", model: str = "") -> DPTForDepthEstimation:
    """The MiDaS DPT-hybrid (fp32, eval, on ``weights.device()``), loaded once per file."""
    path = _midas_path(name, model)

    def build():
        if path.is_dir():
            what = f"{MIDAS_FOLDER.what} (a hybrid DPT, e.g. {MIDAS_FOLDER.repos[0]})"
            check_folder(path, name, ("dpt",), what)
            if not json.loads((path / "config.json").read_text()).get("is_hybrid"):
                raise WeightsError(f"annotator {name!r}: {path} holds a DPT that is not the hybrid (ViT on a ResNet "
                                   f"stem) of MiDaS v3; expected {what}")
            return _load_folder(path, name, DPTForDepthEstimation, ("dpt",), what)
        state = strip_prefix(read_state_dict(path, name, MIDAS.what))
        with torch.device("meta"):  # no random init of 123 M weights that the file replaces
            net = DPTForDepthEstimation(midas_config())
        published = transformers_to_midas(net.state_dict()) | {k: torch.empty(s, device="meta")
                                                                for k, s in MIDAS_CLASSIFIER.items()}
        load_strict(_Layout(published), state, path, name, MIDAS.what)  # errors in the file's own names
        net = net.to_empty(device="cpu")  # DPT has no buffers: every tensor comes from the file
        load_strict(net, midas_to_transformers(state, midas_names(net.state_dict())), path, name, MIDAS.what)
        return _fp32_eval(net)
    return cached(path, "midas", build)


def midas_size(h: int, w: int) -> tuple[int, int]:
    """(height, width) the network sees an (h, w) photo at: its own size as the originals run it
    (so ``detect_resolution`` sets it), sides rounded to multiples of 32, scaled down to at most
    ``MIDAS_MAX_PIXELS``."""
    k = min(1.0, math.sqrt(MIDAS_MAX_PIXELS / (h * w)))
    return (max(MIDAS_MULTIPLE, int(h * k / MIDAS_MULTIPLE) * MIDAS_MULTIPLE),
            max(MIDAS_MULTIPLE, int(w * k / MIDAS_MULTIPLE) * MIDAS_MULTIPLE))


def midas_input(images: list[np.ndarray]) -> torch.Tensor:
    """Same-size (H, W, 3) uint8 RGB -> (B, 3, h, w) in [-1, 1] at ``midas_size`` (ControlNet's
    ``image / 127.5 - 1``, i.e. mean 0.5, std 0.5)."""
    h, w = midas_size(*images[0].shape[:2])
    x = np.stack([resize_photo(i, w, h) for i in images]).astype(np.float32)  # (B, h, w, 3)
    return torch.from_numpy(x / 127.5 - 1.0).permute(0, 3, 1, 2)


def midas_raw(images: list[np.ndarray], model: str = "", name: str = "depth_midas") -> np.ndarray:
    """Same-size (H, W, 3) uint8 RGB -> (B, h, w) float32 raw MiDaS prediction (relative inverse
    depth: near is large) at ``midas_size``, one forward pass."""
    net = load_midas(name, model)
    with torch.inference_mode():
        return dpt_hybrid_depth(net, midas_input(images).to(device())).float().cpu().numpy()


def unit_range(depth: np.ndarray) -> np.ndarray:
    """``depth -= min; depth /= max`` (ControlNet's annotator/midas) as float32 in [0, 1]; all
    zeros when the depth is constant (where the original divides by zero)."""
    depth = depth.astype(np.float32) - depth.min()
    top = float(depth.max())
    return depth / top if top > 0 else np.zeros_like(depth)


def _grey(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h', w') float32 in [0, 1] -> (h, w, 3) uint8: ``(a * 255).clip(0, 255).astype(uint8)`` (the
    original truncates), resized to (h, w) as ControlNet resizes a detected map."""
    out = (a * 255.0).clip(0, 255).astype(np.uint8)
    return np.repeat(resize_plain(out, w, h)[:, :, None], 3, axis=2)


def depth_midas_batch(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    raw = midas_raw(images, model, "depth_midas")
    return [_grey(unit_range(d), *i.shape[:2]) for d, i in zip(raw, images)]


def depth_midas(image: np.ndarray, model: str = "") -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 MiDaS relative depth, near = white."""
    return depth_midas_batch([image], model)[0]


def normals_from_depth(depth: np.ndarray, bg_th: float = 0.4, a: float = NORMAL_A) -> np.ndarray:
    """ControlNet 1.0's normal map from a raw (H, W) MiDaS prediction (inverse depth, near large) ->
    (H, W, 3) uint8 RGB = (z, y, x) (annotator/midas; A1111 returns it so).

    x / y: 3 x 3 Sobel derivatives of the raw depth along the columns / rows (cv2's reflected
    border), set to 0 where the depth normalised to [0, 1] is under ``bg_th`` (the background);
    z = ``a``; the vector (x, y, z) made unit length, each component c stored as ``c * 127.5 + 127.5``
    (truncated). A flat or background pixel is (255, 127, 127)."""
    depth = np.asarray(depth, np.float32)
    x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    background = unit_range(depth) < bg_th
    x[background] = 0
    y[background] = 0
    normal = np.stack([x, y, np.full_like(x, a)], axis=2)  # (H, W, 3): x, y, z
    normal /= np.sqrt(np.sum(normal ** 2, axis=2, keepdims=True))
    return np.ascontiguousarray((normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)[:, :, ::-1])


def normal_midas_batch(images: list[np.ndarray], model: str = "", bg_th: float = 0.4) -> list[np.ndarray]:
    raw = midas_raw(images, model, "normal_midas")
    return [resize_plain(normals_from_depth(d, bg_th), i.shape[1], i.shape[0]) for d, i in zip(raw, images)]


def normal_midas(image: np.ndarray, model: str = "", bg_th: float = 0.4) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 ControlNet 1.0 normal map from MiDaS depth (``bg_th``:
    where the normalised depth is under it, the flat background normal)."""
    return normal_midas_batch([image], model, bg_th)[0]


# --- Depth Anything (v1, v2) -------------------------------------------------------------------

# The published folders' preprocessor_config.json (DPTImageProcessor), used where a folder has none.
DEPTH_ANYTHING_PROCESSOR = {
    "do_resize": True, "size": {"height": 518, "width": 518}, "keep_aspect_ratio": True, "ensure_multiple_of": 14,
    "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_pad": False,
    "image_processor_type": "DPTImageProcessor",
}


def depth_anything_size(h: int, w: int, processor: dict) -> tuple[int, int]:
    """(height, width) DPTImageProcessor resizes an (h, w) image to: with ``keep_aspect_ratio`` the
    one scale, of height's and width's, nearer to 1 ("scale as little as possible"), each side then
    rounded to a multiple of ``ensure_multiple_of`` (at least one multiple)."""
    size, m = processor["size"], int(processor.get("ensure_multiple_of", 1))
    size = size if isinstance(size, dict) else {"height": size, "width": size}
    sh, sw = size["height"] / h, size["width"] / w
    if processor.get("keep_aspect_ratio", False):
        if abs(1 - sw) < abs(1 - sh):
            sh = sw
        else:
            sw = sh
    return max(m, round(sh * h / m) * m), max(m, round(sw * w / m) * m)


def depth_anything_input(images: list[np.ndarray], processor: dict) -> torch.Tensor:
    """Same-size (H, W, 3) uint8 RGB -> (B, 3, h, w) float32 pixel values, as DPTImageProcessor
    (PIL resize of the uint8 image, then rescale and normalise in float32)."""
    out = []
    for image in images:
        if processor.get("do_resize", True):
            h, w = depth_anything_size(image.shape[0], image.shape[1], processor)
            resample = Image.Resampling(processor.get("resample", Image.Resampling.BICUBIC))
            image = np.asarray(Image.fromarray(image).resize((w, h), resample=resample))
        x = image.astype(np.float32)
        if processor.get("do_rescale", True):
            x = (image.astype(np.float64) * processor.get("rescale_factor", 1 / 255)).astype(np.float32)
        if processor.get("do_normalize", True):
            x = (x - np.array(processor["image_mean"], np.float32)) / np.array(processor["image_std"], np.float32)
        out.append(x.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out).astype(np.float32))


def load_depth_anything(name: str, weights: Weights, model: str = ""):
    """(network, processor settings) of a Depth Anything folder, loaded once per folder."""
    folder = find(name, weights, model)

    def build():
        net = _load_folder(folder, name, DepthAnythingForDepthEstimation, ("depth_anything",),
                           f"{weights.what} (e.g. {weights.repos[-1]})")
        processor = dict(DEPTH_ANYTHING_PROCESSOR)
        if (folder / "preprocessor_config.json").is_file():
            processor |= json.loads((folder / "preprocessor_config.json").read_text())
        return net, processor
    return cached(folder, "depth_anything", build)


def _depth_anything_batch(name: str, weights: Weights, images: list[np.ndarray], model: str) -> list[np.ndarray]:
    net, processor = load_depth_anything(name, weights, model)
    h, w = images[0].shape[:2]
    with torch.inference_mode():
        depth = net(pixel_values=depth_anything_input(images, processor).to(device())).predicted_depth  # (B, h', w')
        depth = F.interpolate(depth[:, None].float(), (h, w), mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    depth = depth.cpu().numpy()
    if getattr(net.config, "depth_estimation_type", "relative") == "metric":
        depth = -depth  # metric models give distance: far is large
    return [np.repeat((unit_range(d) * 255.0).clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2) for d in depth]


def depth_anything_batch(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    return _depth_anything_batch("depth_anything", DEPTH_ANYTHING, images, model)


def depth_anything_v2_batch(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    return _depth_anything_batch("depth_anything_v2", DEPTH_ANYTHING_V2, images, model)


def depth_anything(image: np.ndarray, model: str = "") -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 Depth Anything relative depth, near = white."""
    return depth_anything_batch([image], model)[0]


def depth_anything_v2(image: np.ndarray, model: str = "") -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 Depth Anything V2 relative depth, near = white."""
    return depth_anything_v2_batch([image], model)[0]


ANNOTATORS = {"depth_midas": depth_midas, "normal_midas": normal_midas, "depth_anything": depth_anything,
              "depth_anything_v2": depth_anything_v2}
PARAMS = {"depth_midas": {}, "normal_midas": {"bg_th": Spec(float, 0, 1)}, "depth_anything": {},
          "depth_anything_v2": {}}
MIDAS_NEED = (MIDAS, MIDAS_CONTROLNET, MIDAS_FOLDER)  # any one of them
WEIGHTS = {"depth_midas": (MIDAS_NEED,), "normal_midas": (MIDAS_NEED,), "depth_anything": (DEPTH_ANYTHING,),
           "depth_anything_v2": (DEPTH_ANYTHING_V2,)}
BATCH = {"depth_midas": depth_midas_batch, "normal_midas": normal_midas_batch, "depth_anything": depth_anything_batch,
         "depth_anything_v2": depth_anything_v2_batch}


# --- random weights for tests and benchmarks ---------------------------------------------------

def tiny_midas_config() -> DPTConfig:
    """A tiny DPT-hybrid of the published one's structure (BiT stem of 3 stages, 4 ViT layers)."""
    bit = BitConfig(global_padding="SAME", layer_type="bottleneck", depths=[1, 1, 1], hidden_sizes=[16, 32, 64, 128],
                    embedding_size=8, num_groups=2, out_features=["stage1", "stage2", "stage3"],
                    embedding_dynamic_padding=True)
    return DPTConfig(is_hybrid=True, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                     image_size=384, patch_size=16, layer_norm_eps=1e-6, readout_type="project",
                     backbone_out_indices=[0, 1, 2, 3], reassemble_factors=[1, 1, 1, 0.5],
                     neck_hidden_sizes=[16, 32, 32, 32], fusion_hidden_size=16, backbone_featmap_shape=[1, 64, 24, 24],
                     use_batch_norm_in_fusion_residual=False, backbone_config=bit,
                     architectures=["DPTForDepthEstimation"])


def tiny_depth_anything_config() -> DepthAnythingConfig:
    """A tiny Depth Anything (DINOv2 of 4 layers, 32 wide), the published folders' structure."""
    backbone = Dinov2Config(image_size=70, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            mlp_ratio=2, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=32,
                               neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
                               architectures=["DepthAnythingForDepthEstimation"])


def _varied(net: torch.nn.Module, last: torch.nn.Conv2d) -> torch.nn.Module:
    """A tiny random net whose depth varies over the image: He-initialised decoder convolutions and
    a non-negative last 1 x 1 convolution (its input is ReLU'd, so the ReLU'd output is rarely 0);
    transformers' init gives these tiny nets a near-constant or mostly-zero prediction."""
    with torch.no_grad():
        for m in [*net.neck.modules(), *net.head.modules()]:
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    m.bias.zero_()
        last.weight.abs_()
    return net


def _write_random_weights(folder: Path, seed: int) -> None:
    """Random weights under the published names, so that ``CTRLNET_ANNOTATORS=folder`` makes every
    annotator here available: the full-size ``dpt_hybrid-midas-501f0c75.pt`` in the original
    (isl-org/MiDaS, timm) key layout, and tiny random transformers folders ``dpt-hybrid-midas``,
    ``depth-anything-small-hf`` and ``Depth-Anything-V2-Small-hf``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    state = transformers_to_midas(DPTForDepthEstimation(midas_config()).state_dict())
    for key, shape in MIDAS_CLASSIFIER.items():
        state[key] = torch.randn(shape) * 0.02
    torch.save(state, folder / MIDAS.file)
    torch.manual_seed(seed)
    net = DPTForDepthEstimation(tiny_midas_config())
    _varied(net, net.head.head[4]).save_pretrained(folder / "dpt-hybrid-midas")
    for k, repo in enumerate(("depth-anything-small-hf", "Depth-Anything-V2-Small-hf")):
        torch.manual_seed(seed + k)
        net = DepthAnythingForDepthEstimation(tiny_depth_anything_config())
        _varied(net, net.head.conv3).save_pretrained(folder / repo)
        (folder / repo / "preprocessor_config.json").write_text(json.dumps(DEPTH_ANYTHING_PROCESSOR, indent=2))


def write_random_weights(folder: Path, seed: int = 0) -> None:
    """``_write_random_weights`` without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        _write_random_weights(folder, seed)
