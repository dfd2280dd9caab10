"""Key names: diffusers <-> original (lllyasviel ControlNet / CompVis LDM / SGM) layout.

The maps are derived from the architecture (``layers_per_block``, which blocks have
attention), not from a fixed table, so they hold for SD1.x, SD2.x, SDXL and tiny configs.
Original names, for SD1.5 (lllyasviel/ControlNet ``cldm.py`` and CompVis ``openaimodel.py``):

| original                                   | diffusers                                        |
|--------------------------------------------|--------------------------------------------------|
| time_embed.{0,2}                           | time_embedding.linear_{1,2}                      |
| label_emb.0.{0,2}                          | add_embedding / class_embedding .linear_{1,2}    |
| input_blocks.0.0                           | conv_in                                          |
| input_blocks.i.0 (ResBlock)                | down_blocks.b.resnets.j, i = 1 + b*(L+1) + j     |
| input_blocks.i.1 (SpatialTransformer)      | down_blocks.b.attentions.j (inner names equal)   |
| input_blocks.i.0.op                        | down_blocks.b.downsamplers.0.conv, i = (b+1)(L+1)|
| middle_block.{0,1,2}                       | mid_block.resnets.0 / attentions.0 / resnets.1   |
| output_blocks.i.{0,1}                      | up_blocks.b.{resnets,attentions}.j, i = b(L+1)+j |
| output_blocks.i.{1|2}.conv                 | up_blocks.b.upsamplers.0.conv                    |
| out.{0,2}                                  | conv_norm_out / conv_out                         |
| zero_convs.i.0 / middle_block_out.0        | controlnet_down_blocks.i / controlnet_mid_block  |
| input_hint_block.0 / .2k+2 / last          | controlnet_cond_embedding.conv_in / blocks.k / conv_out |
"""

from __future__ import annotations

import re

# ResBlock sub-layers: diffusers name -> original name.
RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}


def _resnet_inner(inner: str) -> str:
    name, rest = inner.split(".", 1)
    return f"{RESNET[name]}.{rest}"


def diffusers_to_original_key(key: str, layers_per_block: int, num_hint_blocks: int = 6,
                              mid_has_attention: bool = True,
                              up_blocks_with_attention: frozenset[int] = frozenset()) -> str:
    """Original name of a diffusers UNet or ControlNet parameter name."""
    L = layers_per_block
    simple = [
        (r"time_embedding\.linear_1\.(.*)", r"time_embed.0.\1"),
        (r"time_embedding\.linear_2\.(.*)", r"time_embed.2.\1"),
        (r"(?:add|class)_embedding\.linear_1\.(.*)", r"label_emb.0.0.\1"),
        (r"(?:add|class)_embedding\.linear_2\.(.*)", r"label_emb.0.2.\1"),
        (r"class_embedding\.weight", r"label_emb.weight"),
        (r"conv_in\.(.*)", r"input_blocks.0.0.\1"),
        (r"conv_norm_out\.(.*)", r"out.0.\1"),
        (r"conv_out\.(.*)", r"out.2.\1"),
        (r"controlnet_down_blocks\.(\d+)\.(.*)", r"zero_convs.\1.0.\2"),
        (r"controlnet_mid_block\.(.*)", r"middle_block_out.0.\1"),
        (r"controlnet_cond_embedding\.conv_in\.(.*)", r"input_hint_block.0.\1"),
    ]
    for pattern, repl in simple:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.conv_out\.(.*)", key):
        return f"input_hint_block.{2 * (num_hint_blocks + 1)}.{m[1]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.0.{_resnet_inner(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        index = int(m[1]) * (2 if mid_has_attention else 1)
        return f"middle_block.{index}.{_resnet_inner(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.0.{_resnet_inner(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        slot = 2 if b in up_blocks_with_attention else 1
        return f"output_blocks.{b * (L + 1) + L}.{slot}.conv.{m[2]}"
    raise KeyError(f"no original-format name for diffusers key {key!r}")


def build_keymap(diffusers_keys, layers_per_block: int, num_hint_blocks: int = 6) -> dict[str, str]:
    """{diffusers key: original key} for every key of a diffusers state dict."""
    keys = list(diffusers_keys)
    mid_has_attention = any(k.startswith("mid_block.attentions.") for k in keys)
    up_attn = frozenset(int(k.split(".")[1]) for k in keys if re.match(r"up_blocks\.\d+\.attentions\.", k))
    mapping = {k: diffusers_to_original_key(k, layers_per_block, num_hint_blocks, mid_has_attention, up_attn)
               for k in keys}
    if len(set(mapping.values())) != len(mapping):
        raise AssertionError("key map is not one to one")  # a bug in the rules above, never user input
    return mapping
