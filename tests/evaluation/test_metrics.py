import math

import numpy as np
import pytest
import torch

from fineclip_ds.evaluation.metrics import box_classification_metrics, retrieval_metrics


def test_box_metrics_average_per_class_and_skip_classes_without_boxes():
    # class 0: 2 boxes, 1 right; class 1: 1 box, right; class 2: no boxes; class 3: 1 box, second best
    scores = torch.tensor([
        [0.9, 0.1, 0.0, 0.0],
        [0.1, 0.8, 0.0, 0.2],
        [0.0, 0.7, 0.1, 0.3],
        [0.5, 0.0, 0.0, 0.4],
    ])
    labels = torch.tensor([0, 0, 1, 3])
    metrics = box_classification_metrics(scores, labels, num_classes=4)
    assert metrics["top1"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    assert metrics["top1_overall"] == pytest.approx(50.0)
    assert metrics["top5"] == pytest.approx(100.0)  # K = 4 <= 5: everything is in the top 5
    assert metrics["classes_with_boxes"] == 3 and metrics["boxes"] == 4


def test_ties_count_against_the_model():
    scores = torch.ones(3, 6)  # a constant model
    labels = torch.tensor([0, 1, 2])
    metrics = box_classification_metrics(scores, labels, num_classes=6)
    assert metrics["top1"] == 0.0 and metrics["top5"] == 0.0
    tied_second = torch.tensor([[0.5, 0.5, 0.1, 0.1, 0.1, 0.1]])
    assert box_classification_metrics(tied_second, torch.tensor([1]), 6)["top1"] == 0.0
    assert box_classification_metrics(tied_second, torch.tensor([1]), 6)["top5"] == 100.0


def test_retrieval_recall_by_hand():
    # 3 images, 4 texts: texts 0,1 -> image 0, text 2 -> image 1, text 3 -> image 2
    similarity = torch.tensor([
        [0.2, 0.9, 0.1, 0.3],   # image 0: own best is text 1 (rank 0)
        [0.5, 0.0, 0.4, 0.1],   # image 1: own text 2 at 0.4, beaten by text 0 (rank 1)
        [0.8, 0.7, 0.6, 0.6],   # image 2: own text 3 at 0.6 ties text 2 and trails 0, 1 (rank 3)
    ])
    text_to_image = torch.tensor([0, 0, 1, 2])
    metrics = retrieval_metrics(similarity, text_to_image, ks=(1, 2, 5))
    assert metrics["i2t_r1"] == pytest.approx(100 / 3) and metrics["i2t_r2"] == pytest.approx(200 / 3)
    assert metrics["i2t_r5"] == 100.0
    # texts: t0 column (0.2, 0.5, 0.8) -> image 0 rank 2; t1 (0.9, 0, 0.7) rank 0; t2 (0.1, 0.4, 0.6) rank 1;
    # t3 (0.3, 0.1, 0.6) rank 0
    assert metrics["t2i_r1"] == 50.0 and metrics["t2i_r2"] == 75.0 and metrics["t2i_r5"] == 100.0


def _ahead(score: float, true_score: float) -> bool:
    """The reference's tie rule: a candidate at least as high as the true score, NaN tying with everything."""
    return math.isnan(score) or math.isnan(true_score) or score >= true_score


def _reference_box_metrics(scores: list[list[float]], labels: list[int]) -> dict[str, float]:
    metrics = {}
    for k in (1, 5):
        hits = [sum(_ahead(v, row[y]) for j, v in enumerate(row) if j != y) < k for row, y in zip(scores, labels)]
        per_class = {y: [hit for hit, label in zip(hits, labels) if label == y] for y in set(labels)}
        metrics[f"top{k}"] = 100 * sum(sum(h) / len(h) for h in per_class.values()) / len(per_class)
        metrics[f"top{k}_overall"] = 100 * sum(hits) / len(hits)
    return metrics


def _reference_retrieval(similarity: list[list[float]], text_to_image: list[int], ks) -> dict[str, float]:
    """Image -> text: a hit when any own caption has fewer than k other images' captions ahead of it;
    text -> image: a hit when fewer than k other images are ahead of its own."""
    metrics = {}
    texts = range(len(text_to_image))
    for k in ks:
        image_hits = [any(sum(_ahead(row[u], row[t]) for u in texts if text_to_image[u] != i) < k
                          for t in texts if text_to_image[t] == i) for i, row in enumerate(similarity)]
        text_hits = [sum(_ahead(similarity[j][t], similarity[text_to_image[t]][t])
                         for j in range(len(similarity)) if j != text_to_image[t]) < k for t in texts]
        metrics[f"i2t_r{k}"] = 100 * sum(image_hits) / len(image_hits)
        metrics[f"t2i_r{k}"] = 100 * sum(text_hits) / len(text_hits)
    return metrics


def _random_scores(rng: np.random.Generator, shape: tuple[int, int]) -> torch.Tensor:
    """Few distinct values (many ties) or continuous ones, with NaNs sprinkled in a third of the draws."""
    scores = rng.integers(0, 3, size=shape).astype(np.float32) if rng.random() < 0.5 else rng.normal(size=shape)
    if rng.random() < 0.3:
        scores[rng.random(size=shape) < 0.2] = np.nan
    return torch.tensor(scores, dtype=torch.float32)


def test_box_metrics_match_a_loop_reference_on_random_scores():
    """Ties, fewer classes than k, classes without boxes and NaN scores, against a plain-loop reference."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        num_classes, boxes = int(rng.integers(1, 9)), int(rng.integers(1, 12))
        scores, labels = _random_scores(rng, (boxes, num_classes)), rng.integers(0, num_classes, size=boxes)
        metrics = box_classification_metrics(scores, torch.tensor(labels), num_classes)
        expected = _reference_box_metrics(scores.tolist(), labels.tolist())
        assert {key: metrics[key] for key in expected} == pytest.approx(expected, abs=1e-4)


def test_retrieval_matches_a_loop_reference_with_one_to_five_captions_per_image():
    rng = np.random.default_rng(1)
    for _ in range(300):
        images = int(rng.integers(1, 8))
        text_to_image = rng.permutation(np.repeat(np.arange(images), rng.integers(1, 6, size=images)))
        similarity = _random_scores(rng, (images, len(text_to_image)))
        metrics = retrieval_metrics(similarity, torch.tensor(text_to_image), ks=(1, 2, 5, 10))
        expected = _reference_retrieval(similarity.tolist(), text_to_image.tolist(), (1, 2, 5, 10))
        assert metrics == pytest.approx(expected, abs=1e-4)


def test_a_model_that_diverged_to_nan_scores_nothing():
    """NaN compares false with everything: a NaN true score used to have no candidate ahead of it, 100%."""
    box = box_classification_metrics(torch.full((4, 8), float("nan")), torch.tensor([0, 1, 2, 3]), 8)
    assert box["top1"] == box["top5"] == box["top1_overall"] == 0.0
    retrieval = retrieval_metrics(torch.full((12, 24), float("nan")), torch.arange(24) // 2)
    assert all(value == 0.0 for value in retrieval.values())
    # a NaN wrong class is not known to be below the true one; a NaN own caption leaves the others to hit
    assert box_classification_metrics(torch.tensor([[0.9, float("nan"), 0.1]]), torch.tensor([0]), 3)["top1"] == 0.0
    one_nan_caption = torch.tensor([[float("nan"), 0.9, 0.1], [0.2, 0.1, 0.8]])
    assert retrieval_metrics(one_nan_caption, torch.tensor([0, 0, 1]))["i2t_r1"] == 100.0


def test_an_image_without_captions_is_never_retrieved():
    """Not even when K exceeds the number of captions, which put every caption in its top K."""
    similarity = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])  # image 2 has no caption
    metrics = retrieval_metrics(similarity, torch.tensor([0, 1]), ks=(1, 5))
    assert metrics["i2t_r1"] == metrics["i2t_r5"] == pytest.approx(200 / 3)
    assert metrics["t2i_r1"] == 100.0

def test_no_boxes_is_an_error():
    with pytest.raises(ValueError, match="no boxes"):
        box_classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 3)


def test_segmentation_metrics_by_hand_with_absent_classes_and_ignored_pixels():
    from fineclip_ds.evaluation.metrics import confusion_matrix, segmentation_metrics

    target = torch.tensor([[0, 0, 1, 255], [1, 1, 255, 255]])
    predicted = torch.tensor([[0, 1, 1, 2], [1, 3, 0, 0]])
    confusion = confusion_matrix(predicted, target, num_classes=5, ignore_label=255)
    assert confusion.sum() == 5  # the three ignored pixels are not scored
    metrics = segmentation_metrics(confusion)
    # class 0: tp 1, fp 0, fn 1 -> 1/2; class 1: tp 2, fp 1, fn 1 -> 2/4; class 3: predicted once, absent -> 0/1
    # class 2 and 4: neither in the target nor predicted on scored pixels -> left out
    assert metrics["classes_scored"] == 3
    assert metrics["miou"] == pytest.approx(100 * (0.5 + 0.5 + 0.0) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(100 * 3 / 5)


def test_ade20k_labels_shift_by_one_with_zero_unscored():
    from PIL import Image

    from fineclip_ds.evaluation.segmentation import IGNORE_LABEL, label_indices

    stored = np.array([[0, 1, 2], [3, 4, 255]], dtype=np.uint8)  # ADE: 0 other, 1..3 classes, 4 beyond 3 classes
    target, unknown = label_indices(Image.fromarray(stored, "L"), 3, reduce_zero_label=True)
    assert target.tolist() == [[IGNORE_LABEL, 0, 1], [2, IGNORE_LABEL, IGNORE_LABEL]] and unknown == 1
    target, unknown = label_indices(Image.fromarray(stored, "L"), 3, reduce_zero_label=False)
    assert target.tolist() == [[0, 1, 2], [IGNORE_LABEL, IGNORE_LABEL, IGNORE_LABEL]] and unknown == 2


def test_percentages_are_exact_fractions_not_float32_noise():
    """1 hit of 5 prints as 20.0, not 20.000000298 (a float32 mean)."""
    scores = torch.eye(5)
    labels = torch.tensor([0, 2, 3, 4, 0])  # box 0 right; boxes 1-4 wrong
    metrics = box_classification_metrics(scores, labels, num_classes=5)
    assert metrics["top1_overall"] == 100 * (1 / 5)
    similarity = torch.eye(5)
    recall = retrieval_metrics(similarity, torch.tensor([0, 2, 3, 4, 0]), ks=(1,))
    assert recall["t2i_r1"] == 100 * (1 / 5)
