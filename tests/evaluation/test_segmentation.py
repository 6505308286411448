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


class _AllClassZero:
    """A stand-in model whose every token is class 0's embedding (with one-hot class embeddings)."""
    image_size = (4, 4)

    def encode_dense(self, window: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens = torch.zeros(1, 4, 300)
        tokens[..., 0] = 1
        return tokens, (2, 2)


def test_pixel_value_255_of_a_16_bit_map_with_more_than_255_classes_is_scored_as_class_255(monkeypatch):
    """ADE20K-847 / Pascal Context 459 ship 16-bit label maps of class indices with 65535 unscored: pixel value 255
    is class 255 there. It was taken for the 8-bit maps' unscored 255 and dropped uncounted, so a model calling every
    pixel class 0 scored class 0 perfectly where half the pixels were class 255 (mIoU 100 instead of 25)."""
    import numpy as np
    from PIL import Image

    from fineclip_ds.evaluation import segmentation

    monkeypatch.setattr(segmentation, "class_embeddings", lambda *args: torch.eye(300))
    stored = np.array([[0, 0, 255, 255], [0, 0, 255, 255]], dtype=np.uint16)
    item = segmentation.LabelledImage(lambda: Image.new("RGB", (4, 2)), lambda: Image.fromarray(stored))
    results = segmentation.evaluate_segmentation(_AllClassZero(), None, ((0, 0, 0), (1, 1, 1)),
                                                 [f"class {k}" for k in range(300)], [item], progress=False)
    # class 0: tp 4, fp 4 -> 1/2; class 255: tp 0, fn 4 -> 0
    assert results["classes_scored"] == 2
    assert results["miou"] == pytest.approx(25.0) and results["pixel_accuracy"] == pytest.approx(50.0)
    # 65535 (the unscored value of those maps) names no class: unscored and counted
    stored[0, 0] = 65535
    results = segmentation.evaluate_segmentation(_AllClassZero(), None, ((0, 0, 0), (1, 1, 1)),
                                                 [f"class {k}" for k in range(300)], [item], progress=False)
    assert results["skipped_unknown_label_pixels"] == 1 and results["pixel_accuracy"] == pytest.approx(100 * 3 / 7)


def _evaluate_one_label_map(monkeypatch, stored, tmp_path, caplog):
    """Segmentation of one 4x2 image whose label map, saved as a TIFF under the .png name the label folder reads
    (Pillow opens it by content, mode "I" or "F"), holds `stored`; the results and the warnings logged."""
    import logging

    from PIL import Image

    from fineclip_ds.evaluation import segmentation

    monkeypatch.setattr(segmentation, "class_embeddings", lambda *args: torch.eye(300))
    label_path = tmp_path / "000.png"
    Image.fromarray(stored).save(label_path, format="TIFF")
    item = segmentation.LabelledImage(lambda: Image.new("RGB", (4, 2)), lambda: Image.open(label_path), label_path)
    with caplog.at_level(logging.WARNING, logger="fineclip_ds"):
        return segmentation.evaluate_segmentation(_AllClassZero(), None, ((0, 0, 0), (1, 1, 1)),
                                                  [f"class {k}" for k in range(300)], [item, item], progress=False)


def test_a_32_bit_label_map_is_read_like_a_16_bit_one(monkeypatch, tmp_path, caplog):
    """A mode "I" map of class indices scores as the same values in a 16-bit map do; 70000 names no class."""
    import numpy as np

    stored = np.array([[0, 0, 255, 255], [0, 0, 255, 70000]], dtype=np.int32)
    results = _evaluate_one_label_map(monkeypatch, stored, tmp_path, caplog)
    assert results["classes_scored"] == 2 and results["pixel_accuracy"] == pytest.approx(100 * 4 / 7)
    assert results["skipped_unknown_label_pixels"] == 2  # once per image


def test_a_label_map_with_a_negative_value_is_skipped_counted_and_named(monkeypatch, tmp_path, caplog):
    """A 32-bit map holding -1 (a signed "ignore") ended in a bincount traceback (negative values), after the model
    had run; it is skipped and counted like an RGB map, and the warning names the file and the value."""
    import numpy as np

    stored = np.array([[0, 0, 1, 1], [0, -1, 1, -7]], dtype=np.int32)
    with pytest.raises(ValueError, match=r"no pixel scored; skipped: \{'label_negative_value': 2\}"):
        _evaluate_one_label_map(monkeypatch, stored, tmp_path, caplog)
    assert len(caplog.records) == 1  # once per problem, as for the other bad label maps
    assert "000.png" in caplog.text and "-7" in caplog.text and "skipped_label_negative_value" in caplog.text


def test_a_floating_point_label_map_is_skipped_and_counted(monkeypatch, tmp_path, caplog):
    """A mode "F" map: NaN became int64's most negative value (the same bincount traceback) and 1.5 became class 1,
    silently; class indices are whole numbers, so it is skipped and counted."""
    import numpy as np

    stored = np.array([[0, 0, 1.5, 1], [0, np.nan, 1, 1]], dtype=np.float32)
    with pytest.raises(ValueError, match=r"no pixel scored; skipped: \{'label_not_integer': 2\}"):
        _evaluate_one_label_map(monkeypatch, stored, tmp_path, caplog)
    assert "000.png" in caplog.text and "mode F" in caplog.text


def test_a_label_map_of_another_size_than_its_image_is_skipped_counted_and_named(monkeypatch, tmp_path, caplog):
    """It was counted (skipped_label_size_mismatch) but never logged, unlike the other bad label maps: the warning
    names the file and both sizes, once."""
    import numpy as np

    stored = np.zeros((2, 3), dtype=np.int32)  # 3x2; the image is 4x2
    with pytest.raises(ValueError, match=r"no pixel scored; skipped: \{'label_size_mismatch': 2\}"):
        _evaluate_one_label_map(monkeypatch, stored, tmp_path, caplog)
    assert len(caplog.records) == 1
    assert "000.png" in caplog.text and "3x2, its image 4x2" in caplog.text
    assert "skipped_label_size_mismatch" in caplog.text
