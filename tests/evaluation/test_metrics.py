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
