"""Text conditioning: prompts -> what the UNet and the ControlNets read, for generation and training.

- SD1.x/2.x: the text encoder's last hidden state (B, T, D).
- SDXL: both encoders' penultimate hidden states concatenated (768 + 1280 = 2048), the second
  encoder's projected pooled output (``text_embeds``) and the size/crop micro-conditioning
  (``time_ids``), passed to the UNet as ``added_cond_kwargs``.
- Classifier-free guidance batches the negative prompt's rows first: [uncond; cond].
- Prompts longer than the text encoder's context are cut, with a ``PromptTruncatedWarning``.
"""

from __future__ import annotations

import warnings

import torch


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the text encoder's context; the rest is cut."""


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, T) ids padded to the tokenizer's context; longer prompts are truncated."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def warn_long_prompts(tokenizer, prompts: list[str]) -> None:
    """A ``PromptTruncatedWarning`` for each prompt the text encoder will not read whole."""
    for p in prompts:
        n = len(tokenizer(p, truncation=False).input_ids)
        if n > tokenizer.model_max_length:
            warnings.warn(f"prompt has {n} tokens; the text encoder reads {tokenizer.model_max_length}, the rest is "
                          f"cut: {p[:60]!r}...", PromptTruncatedWarning, stacklevel=3)


@torch.no_grad()
def encode_text(base, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden (B, T, D), pooled (B, P) or None) of a ``LockedBase``'s text encoder(s)."""
    if base.text_encoder_2 is None:
        ids = tokenize(base.tokenizer, prompts).to(base.text_encoder.device)
        return base.text_encoder(ids)[0], None
    hidden, pooled = [], None
    for tok, enc in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
        out = enc(tokenize(tok, prompts).to(enc.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (B, P)
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(batch: int, height: int, width: int) -> torch.Tensor:
    """(batch, 6) SDXL micro-conditioning (original size, crop top-left, target size): uncropped, same size."""
    return torch.tensor([[height, width, 0, 0, height, width]] * batch, dtype=torch.float32)


@torch.no_grad()
def guidance_text(base, prompts: list[str], negative_prompt: str, cfg: bool, height: int,
                  width: int) -> tuple[torch.Tensor, dict | None]:
    """(text (2B or B, T, D), added_cond_kwargs or None): [uncond; cond] rows when ``cfg``; SDXL's
    pooled text and time ids in the same row order."""
    cond, pooled = encode_text(base, prompts)
    if cfg:
        uncond, uncond_pooled = encode_text(base, [negative_prompt] * len(prompts))
        text = torch.cat([uncond, cond])
        pooled = torch.cat([uncond_pooled, pooled]) if pooled is not None else None
    else:
        text = cond
    if pooled is None:
        return text, None
    return text, {"text_embeds": pooled, "time_ids": sdxl_time_ids(text.shape[0], height, width).to(text.device,
                                                                                                      text.dtype)}
