"""Randomly initialised BLIP / BLIP-2 / LLaVA captioners of a named size, saved as a local transformers model.

Nothing downloads: the tokenizer is a word-level one written here. Tests use the "tiny" size; the
throughput benchmark uses BLIP-2 OPT-2.7b's real shapes, since generation speed does not depend on
what the weights are (the benchmark fixes the caption length).

    python -m fineclip_ds.data.random_captioners --kind blip2 --size tiny --output models/blip2-tiny
    python -m fineclip_ds.data.make_regions ... --captioner models/blip2-tiny

Kinds: blip2 (sizes: tiny, opt-2.7b), blip and llava (tiny only; llava's --prompt must hold "<image>").
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle", "small", "big", "on", "the",
         "left", "right", "top", "bottom"]

# ViT (vision), Q-Former and OPT shapes of each BLIP-2 size; "opt-2.7b" is Salesforce/blip2-opt-2.7b's.
BLIP2_SIZES: dict[str, dict] = {
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=16),
                 qformer=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                 opt=dict(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                          word_embed_proj_dim=32, max_position_embeddings=64),
                 queries=4, vocab=None),
    "opt-2.7b": dict(vision=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                 num_attention_heads=16, image_size=224, patch_size=14),
                     qformer=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12),
                     opt=dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                              word_embed_proj_dim=2560, max_position_embeddings=2048),
                     queries=32, vocab=50272),
}


def _word_tokenizer(vocab: list[str], size: int | None, bos: str = "</s>", eos: str = "</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = vocab + [f"w{i}" for i in range(max(0, (size or 0) - len(vocab)))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token=bos, eos_token=eos)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def save_random_blip2(directory: Path, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Blip2ForConditionalGeneration + Blip2Processor of `size` (a BLIP2_SIZES key) with random weights."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    shape = BLIP2_SIZES[size]
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<unk>", "</s>", "<image>"]
    tokenizer = _word_tokenizer(specials + WORDS, shape["vocab"])
    image_size = shape["vision"]["image_size"]
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**shape["vision"]).to_dict(),
        qformer_config=Blip2QFormerConfig(vocab_size=len(tokenizer), encoder_hidden_size=shape["vision"]["hidden_size"],
                                          **shape["qformer"]).to_dict(),
        text_config=OPTConfig(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2, eos_token_id=2,
                              **shape["opt"]).to_dict(),
        num_query_tokens=shape["queries"], image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # random weights favour special tokens, which decode to nothing: make words win
        model.get_output_embeddings().weight[: len(specials)] = 0
    model.to(dtype).save_pretrained(directory)
    Blip2Processor(BlipImageProcessor(size={"height": image_size, "width": image_size}), tokenizer,
                   num_query_tokens=shape["queries"]).save_pretrained(directory)
    return directory


def save_random_blip(directory: Path, seed: int = 0) -> Path:
    """A tiny BlipForConditionalGeneration (ViT 1 layer, width 32, 32 px) + BlipProcessor with a BERT word vocab."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(directory / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    torch.manual_seed(seed)
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


# A prompt the tiny LLaVA's word vocabulary holds, with the image token its processor expands.
LLAVA_PROMPT = "USER: <image> describe ASSISTANT:"


def save_random_llava(directory: Path, seed: int = 0) -> Path:
    """A tiny LlavaForConditionalGeneration (CLIP ViT + Llama, width 32) + LlavaProcessor; its prompt must
    hold "<image>", e.g. "USER: <image> describe ASSISTANT:"."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    tokenizer = _word_tokenizer(specials + ["USER:", "ASSISTANT:", "describe"] + WORDS, None,
                                bos="<s>", eos="</s>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=16, projection_dim=32).to_dict(),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=0, bos_token_id=2, eos_token_id=3).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        model.get_output_embeddings().weight[: len(specials)] = 0
    model.save_pretrained(directory)
    LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer,
                   patch_size=16, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(directory)  # the CLS token the ViT adds
    return directory


def main(argv: list[str] | None = None) -> Path:
    """The command line: a random captioner of a kind and size, saved for make_regions --captioner."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("blip2", "blip", "llava"), default="blip2")
    parser.add_argument("--size", choices=tuple(BLIP2_SIZES), default="tiny", help="blip and llava: tiny only")
    parser.add_argument("--output", type=Path, required=True, help="folder to save the model and processor in")
    args = parser.parse_args(argv)
    if args.kind == "blip2":
        directory = save_random_blip2(args.output, args.size)
    elif args.size != "tiny":
        parser.error(f"--size {args.size}: --kind {args.kind} comes in one size: tiny")
    else:
        directory = (save_random_blip if args.kind == "blip" else save_random_llava)(args.output)
    prompt = f' --prompt "{LLAVA_PROMPT}"' if args.kind == "llava" else ""
    # random weights repeat a word: without this every caption is dropped as degenerate ("a a a a")
    generate = """ --generate '{"no_repeat_ngram_size": 1}'"""
    print(f"wrote a random {args.kind} {args.size} captioner; use it as make_regions --captioner {directory}{prompt}"
          f"{generate}")
    return directory


if __name__ == "__main__":
    main()
