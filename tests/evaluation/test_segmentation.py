"""Zero-shot segmentation's prediction path."""
import pytest
import torch

from fineclip_ds.evaluation.segmentation import load_label_folder, segment


class _PooledColours:
    """A stand-in model whose dense features are the window's colours pooled per 8 px token, padded to 16
    channels: no matmul, so the features are the same with and without autocast."""
    image_size = (32, 32)

    def encode_dense(self, window: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        pooled = torch.nn.functional.avg_pool2d(window.float(), 8)  # [1, 3, 4, 4]
        tokens = pooled.flatten(2).transpose(1, 2)  # [1, 16, 3]
        return torch.nn.functional.pad(tokens, (0, 13)), (4, 4)


@pytest.mark.parametrize("slide", [False, True])
def test_segmentation_under_bf16_autocast_predicts_as_in_fp32(slide):
    """Under autocast the token-to-class matmul ran in bf16: close classes rounded to ties, which argmax
    gives to the lower class index."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(3, 45, 70, generator=generator)
    classes = torch.nn.functional.normalize(torch.randn(40, 16, generator=generator), dim=-1)
    expected = segment(_PooledColours(), image, classes, slide)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        predicted = segment(_PooledColours(), image, classes, slide)
    assert torch.equal(predicted, expected)


def test_the_label_folder_reads_every_image_format_dense_viz_reads(tmp_path):
    """.webp images were skipped here (not counted) while dense-viz read them."""
    (tmp_path / "images").mkdir()
    for name in ("a.webp", "b.JPG", "c.png", "notes.txt"):
        (tmp_path / "images" / name).write_bytes(b"")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    classes, items = load_label_folder(tmp_path / "images", tmp_path / "labels", tmp_path / "classes.txt")
    assert classes == ["cat", "dog"]
    assert [item.label_path.name for item in items] == ["a.png", "b.png", "c.png"]


def test_a_blank_line_inside_the_classes_file_does_not_silently_shift_the_class_indices(tmp_path):
    """Label pixel k is class k = line k + 1 of --classes; a blank line in the middle was dropped, so every later
    line's name was scored against the next index's pixels, silently (a trailing newline is harmless)."""
    (tmp_path / "images").mkdir(), (tmp_path / "labels").mkdir()
    (tmp_path / "classes.txt").write_text("wall\n\nfloor\nceiling\n")
    with pytest.raises(ValueError, match="line 2 is blank; line k names label index k - 1"):
        load_label_folder(tmp_path / "images", tmp_path / "labels", tmp_path / "classes.txt")
    (tmp_path / "classes.txt").write_text("wall\nfloor\n\n")  # trailing blank lines name nothing
    assert load_label_folder(tmp_path / "images", tmp_path / "labels", tmp_path / "classes.txt")[0] == ["wall", "floor"]
