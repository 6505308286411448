"""Region captions from any `transformers` image-to-text model (BLIP-2 as in FineCLIP, BLIP, LLaVA-style),
loaded from a local path, batched over crops; outputs cleaned, and what is dropped is counted."""
from __future__ import annotations

from collections import Counter
from typing import Protocol

import torch
from packaging.version import Version
from PIL import Image


class Captioner(Protocol):
    def __call__(self, crops: list[Image.Image]) -> list[str]: ...


def clean_caption(text: str, prompt: str) -> tuple[str | None, str | None]:
    """(caption, None) or (None, reason): strips a prompt echo and whitespace; drops empty and degenerate
    outputs (under 2 characters, or 4+ words with at most 2 distinct: "a a a a", "the cat the cat")."""
    text, echo = text.strip(), prompt.strip()
    if echo and text.lower().startswith(echo.lower()) and not text[len(echo):len(echo) + 1].isalnum():
        text = text[len(echo):].strip()  # the prompt as whole words: "a photograph" is no echo of "a photo"
    if len(text) < 2:
        return None, "caption_empty"
    words = text.lower().split()
    if len(words) >= 4 and len(set(words)) <= 2:
        return None, "caption_degenerate"
    return text, None


class TransformersCaptioner:
    """AutoProcessor + AutoModelForImageTextToText from `model_path`; bf16 on GPU, batched generate."""

    def __init__(self, model_path: str, prompt: str = "", max_new_tokens: int = 20, batch_size: int = 32,
                 device: str | None = None, generate_kwargs: dict | None = None):
        import transformers
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.processor = AutoProcessor.from_pretrained(model_path)
        # `dtype` from transformers 4.56; before, it was `torch_dtype`, and an unknown `dtype` loaded fp32 weights
        # that bf16 inputs then failed to multiply, on a GPU only (transformers is not pinned)
        dtype_keyword = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, **{dtype_keyword: dtype})
        self.model = self.model.to(self.device).eval()
        self.dtype, self.prompt = dtype, prompt
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.generate_kwargs = dict(generate_kwargs or {})  # e.g. num_beams, repetition_penalty

    @torch.no_grad()
    def __call__(self, crops: list[Image.Image]) -> list[str]:
        captions: list[str] = []
        for start in range(0, len(crops), self.batch_size):
            batch = [crop.convert("RGB") for crop in crops[start:start + self.batch_size]]
            kwargs = {"text": [self.prompt] * len(batch)} if self.prompt else {}
            inputs = self.processor(images=batch, return_tensors="pt", **kwargs).to(self.device)
            inputs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
            generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **self.generate_kwargs)
            captions += self.processor.batch_decode(new_tokens(generated, inputs.get("input_ids")),
                                                    skip_special_tokens=True)
        return captions


def new_tokens(generated: torch.Tensor, prompt_ids: torch.Tensor | None) -> torch.Tensor:
    """The generated continuation alone: decoder-only models (BLIP-2 OPT, LLaVA) return the prompt first,
    and its decoding (image tokens dropped, a chat template around it) no longer matches the prompt text."""
    if prompt_ids is None or generated.shape[1] < prompt_ids.shape[1]:
        return generated
    length = prompt_ids.shape[1]
    return generated[:, length:] if torch.equal(generated[:, :length], prompt_ids.to(generated.device)) else generated


def caption_regions(captioner: Captioner, crops: list[Image.Image], prompt: str) -> tuple[list[str | None], Counter]:
    """Captions for every crop (None where dropped) and the drop counts by reason."""
    drops: Counter = Counter()
    cleaned: list[str | None] = []
    for raw in captioner(crops) if crops else []:
        caption, reason = clean_caption(raw, prompt)
        if reason:
            drops[reason] += 1
        cleaned.append(caption)
    return cleaned, drops
