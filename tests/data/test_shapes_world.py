import numpy as np
import pytest

from fineclip_ds.data.shapes_world import EVAL_INDEX_OFFSET, ShapesWorld


def test_samples_are_a_pure_function_of_seed_and_index():
    first, again = ShapesWorld(seed=3).sample(11), ShapesWorld(seed=3).sample(11)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert (first.caption, first.boxes, first.labels) == (again.caption, again.boxes, again.labels)
    other = ShapesWorld(seed=4).sample(11)
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))


def test_captions_name_every_object_and_boxes_lie_inside_the_image():
    world = ShapesWorld(image_size=96)
    for index in range(50):
        sample = world.sample(index)
        assert sample.image.size == (96, 96)
        assert 1 <= len(sample.boxes) == len(sample.region_captions) == len(sample.labels) <= world.max_objects
        for box, caption, label in zip(sample.boxes, sample.region_captions, sample.labels):
            assert 0 <= box[0] < box[2] <= 96 and 0 <= box[1] < box[3] <= 96
            assert caption == f"a {world.classes[label]}"
            assert caption in sample.caption


def test_shapes_are_drawn_in_their_colour_inside_their_box():
    world = ShapesWorld(image_size=128)
    sample = world.sample(5)
    pixels = np.asarray(sample.image).astype(int)
    x1, y1, x2, y2 = (int(round(v)) for v in sample.boxes[-1])  # drawn last: nothing covers it
    centre = pixels[(y1 + y2) // 2, (x1 + x2) // 2]
    from fineclip_ds.data.shapes_world import COLOURS
    colour = world.classes[sample.labels[-1]].split(" ")[0]
    assert np.abs(centre - np.array(COLOURS[colour])).max() <= 1


def test_held_out_samples_differ_from_training_samples():
    world = ShapesWorld()
    assert world.eval_sample(2).caption == world.sample(EVAL_INDEX_OFFSET + 2).caption
    assert not np.array_equal(np.asarray(world.eval_sample(2).image), np.asarray(world.sample(2).image))


def test_label_maps_mark_each_shape_with_its_class_and_background_as_ignored():
    from fineclip_ds.data.shapes_world import IGNORE_LABEL

    world = ShapesWorld(image_size=128)
    for index in range(10):
        sample = world.sample(index)
        labels = np.asarray(sample.label_map)
        assert labels.shape == (128, 128)
        assert set(np.unique(labels)) <= set(sample.labels) | {IGNORE_LABEL}
        x1, y1, x2, y2 = (int(round(v)) for v in sample.boxes[-1])
        assert labels[(y1 + y2) // 2, (x1 + x2) // 2] == sample.labels[-1]
        assert labels[0, 0] == IGNORE_LABEL or any(b[0] < 1 and b[1] < 1 for b in sample.boxes)


@pytest.mark.parametrize("args", [["--samples_per_shard", "0"], ["--num_samples", "-5"], ["--seed", "-1"]])
def test_the_shards_cli_refuses_counts_below_one_with_a_message(tmp_path, monkeypatch, capsys, args):
    """`python -m fineclip_ds.data.shapes_world --samples_per_shard 0` ended in 'ValueError: range() arg 3 must not
    be zero' (a traceback, exit 1); `--num_samples -5` printed 'wrote -5 samples to 0 shards' and exited 0;
    `--seed -1` ended in numpy's 'ValueError: expected non-negative integer'."""
    import sys

    from fineclip_ds.data.shapes_world import main

    monkeypatch.setattr(sys, "argv", ["shapes_world", "--output_dir", str(tmp_path / "shards"), *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert args[0] in capsys.readouterr().err
