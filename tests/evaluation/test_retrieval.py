"""Retrieval's image protocol: open_clip's centre crop by default (published numbers use it), or squashed; and
reading caption files."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fineclip_ds.evaluation.retrieval import CaptionedImage, evaluate_retrieval, load_caption_file

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


class RecordingModel:
    """Stands in for FineCLIP: keeps the image batches it is given."""

    def __init__(self, image_size: tuple[int, int]):
        self.image_size = image_size
        self.images: list[torch.Tensor] = []

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.images.append(images)
        return torch.nn.functional.normalize(images.flatten(1)[:, :8] + 1, dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(tokens[:, :8].float() + 1, dim=-1)


def _stripes(width: int, height: int) -> Image.Image:
    """Red, green and blue vertical stripes: a quarter, a half and a quarter of the width."""
    image = Image.new("RGB", (width, height), GREEN)
    image.paste(RED, (0, 0, width // 4, height))
    image.paste(BLUE, (width - width // 4, 0, width, height))
    return image


def _model_input(image: Image.Image, image_size: tuple[int, int], resize: str) -> torch.Tensor:
    model = RecordingModel(image_size)
    items = [CaptionedImage(lambda: image, ["stripes"])]
    evaluate_retrieval(model, lambda texts: torch.ones(len(texts), 8, dtype=torch.long), ((0, 0, 0), (1, 1, 1)),
                       items, progress=False, resize=resize)
    (batch,) = model.images
    return batch[0]


def _colour_share(pixels: torch.Tensor, channel: int) -> float:
    """Share of pixels where `channel` dominates."""
    return float((pixels.argmax(dim=0) == channel).float().mean())


def test_centre_crop_keeps_the_middle_of_a_wide_image_and_squash_keeps_all_of_it():
    wide = _stripes(128, 64)
    cropped = _model_input(wide, (64, 64), "center_crop")
    squashed = _model_input(wide, (64, 64), "squash")
    assert cropped.shape == squashed.shape == (3, 64, 64)
    assert _colour_share(cropped, 1) > 0.95  # the middle half of the width: green
    assert _colour_share(squashed, 0) > 0.2 and _colour_share(squashed, 2) > 0.2


def test_centre_crop_to_a_non_square_input_covers_it_without_black_borders():
    pixels = _model_input(Image.new("RGB", (50, 50), GREEN), (32, 64), "center_crop")
    assert pixels.shape == (3, 32, 64)
    assert _colour_share(pixels, 1) == 1.0 and pixels.sum(dim=0).min() > 0.5


@pytest.mark.parametrize("image_size", [(224, 224), (224, 448)], ids=["square", "wide"])
@pytest.mark.parametrize("source", [(640, 480), (480, 640), (500, 333), (640, 427)], ids=lambda wh: "x".join(map(str, wh)))
def test_centre_crop_gives_the_pixels_of_open_clips_validation_transform(image_size, source):
    """For a square input open_clip resizes the shorter side with torchvision's Resize(int), which truncates the
    longer one (640 x 480 -> 298 x 224); rounding it (299) rescaled the image by 0.3% and moved the crop."""
    from open_clip.transform import image_transform

    pixels = np.random.default_rng(0).integers(0, 256, size=(source[1], source[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    expected = image_transform(image_size, is_train=False, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert torch.equal(_model_input(image, image_size, "center_crop"), expected)


def test_an_unknown_resize_is_refused():
    with pytest.raises(ValueError, match="resize"):
        _model_input(_stripes(8, 8), (8, 8), "stretch")


def _caption_file(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(content))
    return path


PAIR_ROWS = [{"image": "0.jpg", "caption": "a red square"}, {"image": "1.jpg", "caption": ["a blue circle"]},
             {"image": "0.jpg", "caption": "a photo of a red square"}]
KARPATHY_PAIRS = {"images": [{"filename": row["image"], "split": "test", "sentences": [{"raw": row["caption"]}]}
                             for row in ({"image": "0.jpg", "caption": "a red square"},
                                         {"image": "1.jpg", "caption": "a blue circle"},
                                         {"image": "0.jpg", "caption": "a photo of a red square"})]}


@pytest.mark.parametrize("content", [PAIR_ROWS, KARPATHY_PAIRS], ids=["list", "karpathy"])
def test_rows_naming_the_same_image_are_one_image_with_all_its_captions(tmp_path, content):
    """One row per image-caption pair made each row an image: the copies tied and recall collapsed silently."""
    captions = load_caption_file(_caption_file(tmp_path, content), tmp_path)
    assert [item.captions for item in captions.images] == [["a red square", "a photo of a red square"],
                                                          ["a blue circle"]]
    assert captions.counts()["merged_duplicate_image_rows"] == 1


def test_non_string_captions_are_skipped_and_counted_when_the_file_is_read(tmp_path):
    """A null caption crashed inside the tokenizer (ftfy: NoneType has no len()) after every image was encoded."""
    rows = [{"image": "0.jpg", "caption": ["a red square", None]}, {"image": "5.jpg", "caption": None},
            {"image": "6.jpg", "caption": [7, "a green dot"]}]
    captions = load_caption_file(_caption_file(tmp_path, rows), tmp_path)
    assert all(isinstance(text, str) for item in captions.images for text in item.captions)
    assert captions.counts()["skipped_non_string_caption"] == 3


def test_an_image_without_captions_is_skipped_and_counted(tmp_path):
    """An image with no caption stayed a candidate no text could retrieve, lowering image-to-text recall quietly."""
    rows = [{"image": "0.jpg", "caption": ["a red square"]}, {"image": "1.jpg", "caption": []},
            {"image": "2.jpg", "caption": [None]}]
    captions = load_caption_file(_caption_file(tmp_path, rows), tmp_path)
    assert [item.captions for item in captions.images] == [["a red square"]]
    assert captions.counts()["skipped_no_caption"] == 2


def test_captions_longer_than_the_context_are_counted_and_warned_about_once(caplog):
    """The tokenizer cut long captions at its context length (77 for CLIP) without a word."""
    from open_clip.tokenizer import SimpleTokenizer

    long_caption = " ".join(["a red square beside a blue circle"] * 12)  # 84 words
    items = [CaptionedImage(lambda: _stripes(8, 8), ["stripes", long_caption, long_caption])]
    with caplog.at_level("WARNING", logger="fineclip_ds"):
        result = evaluate_retrieval(RecordingModel((8, 8)), SimpleTokenizer(), ((0, 0, 0), (1, 1, 1)), items,
                                    progress=False)
    assert result["captions_truncated"] == 2
    assert [record.getMessage() for record in caplog.records] == [
        "retrieval: 2 of 3 captions are longer than the tokenizer's 77-token context and are cut"]


def test_a_split_the_karpathy_file_lacks_is_named_with_the_splits_it_has(tmp_path):
    """--split val on a file without val entries said 'no readable images to evaluate retrieval on'."""
    with pytest.raises(ValueError, match=r"no entry has split 'val' \(splits in the file: \['test'\]\)"):
        load_caption_file(_caption_file(tmp_path, KARPATHY_PAIRS), tmp_path, split="val")


@pytest.mark.parametrize("rows", [[], [{"image": "0.jpg", "caption": []}, {"image": "1.jpg", "caption": None}]],
                         ids=["empty", "no-caption-left"])
def test_a_caption_file_with_no_captioned_image_is_refused_when_read(tmp_path, rows):
    """It failed only after the model had loaded, as 'no readable images'."""
    with pytest.raises(ValueError, match="no image with a caption to evaluate retrieval on"):
        load_caption_file(_caption_file(tmp_path, rows), tmp_path)
