"""Dense-feature pictures: one per image, none overwriting another."""
from pathlib import Path

from fineclip_ds.evaluation.dense_viz import picture_names


def test_images_sharing_a_stem_get_pictures_of_their_own():
    """dup.jpg and dup.png both wrote dup_dense.png: one picture lost, listed twice."""
    names = picture_names([Path("a/dup.jpg"), Path("a/dup.png"), Path("a/other.png")])
    assert names == ["dup.jpg_dense.png", "dup.png_dense.png", "other_dense.png"]


def test_a_name_that_is_another_images_stem_does_not_collide_either():
    """dup.jpg (stem shared with dup.png, so named by its full name) and dup.jpg.webp (stem dup.jpg) both wrote
    dup.jpg_dense.png."""
    names = picture_names([Path("dup.jpg"), Path("dup.png"), Path("dup.jpg.webp"), Path("dup.jpg_2.png")])
    assert len(set(names)) == 4 and names[1] == "dup.png_dense.png" and names[3] == "dup.jpg_2_dense.png"
