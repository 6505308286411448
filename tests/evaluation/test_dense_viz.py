"""Dense-feature pictures: one per image, none overwriting another."""
from pathlib import Path

from fineclip_ds.evaluation.dense_viz import picture_names


def test_images_sharing_a_stem_get_pictures_of_their_own():
    """dup.jpg and dup.png both wrote dup_dense.png: one picture lost, listed twice."""
    names = picture_names([Path("a/dup.jpg"), Path("a/dup.png"), Path("a/other.png")])
    assert names == ["dup.jpg_dense.png", "dup.png_dense.png", "other_dense.png"]
