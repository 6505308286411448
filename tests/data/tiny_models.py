"""Tiny randomly initialised models the data tests build and save locally (nothing downloads):
BLIP and BLIP-2 captioners with a word-level tokenizer, and a torchvision detector's weights."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle", "small", "big", "on", "the",
         "left", "right", "top", "bottom"]


def save_tiny_blip(directory: Path) -> Path:
    """BlipForConditionalGeneration (ViT 1 layer, width 32, 32px) + BlipProcessor with a BERT word vocab."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(directory / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    torch.manual_seed(0)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         sep_token_id=tokenizer.sep_token_id),
        projection_dim=32)
    BlipForConditionalGeneration(config).save_pretrained(directory)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(directory)
    return directory


def save_tiny_blip2(directory: Path) -> Path:
    """Blip2ForConditionalGeneration (ViT + Q-Former + OPT, 1 layer each, width 32) + Blip2Processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig, PreTrainedTokenizerFast)

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["<pad>", "<unk>", "</s>", "<image>", *WORDS]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="</s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    queries = 4
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16).to_dict(),
        qformer_config=Blip2QFormerConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          encoder_hidden_size=32).to_dict(),
        text_config=OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                              num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64,
                              pad_token_id=0, bos_token_id=2, eos_token_id=2).to_dict(),
        num_query_tokens=queries, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # random weights favour special tokens, which decode to nothing: make words win
        model.get_output_embeddings().weight[: vocab.index("<image>") + 1] = 0
    model.save_pretrained(directory)
    Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer,
                   num_query_tokens=queries).save_pretrained(directory)
    return directory


def save_tiny_detector(path: Path, architecture: str = "fasterrcnn_mobilenet_v3_large_320_fpn",
                       num_classes: int = 3) -> Path:
    from torchvision.models import get_model

    torch.manual_seed(0)
    torch.save(get_model(architecture, weights=None, weights_backbone=None, num_classes=num_classes).state_dict(), path)
    return path
