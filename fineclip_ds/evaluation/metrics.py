"""Ranking metrics on similarity matrices. Ties count against the model: a true item that only
ties with a wrong one is not ranked above it, so a constant model scores chance, never 100%. A NaN
score ties with everything, so a model that has diverged to NaN scores chance too (NaN compares
false with everything, which ranked a NaN true score first: 100%)."""
from __future__ import annotations

import torch


def at_least(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """scores >= threshold, true wherever either is NaN (a NaN ties with everything)."""
    return (scores >= threshold) | scores.isnan() | threshold.isnan()


def rank_of_true(scores: torch.Tensor, true_scores: torch.Tensor) -> torch.Tensor:
    """How many other candidates score at least as high as the true one. scores: [n, K]; true_scores: [n]."""
    return at_least(scores, true_scores.unsqueeze(1)).sum(dim=1) - 1


def box_classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Top-1/top-5 as the mean of per-class accuracies over classes that have boxes (FineCLIP, CLIPSelf), and
    overall (per box). With fewer than 5 classes every box is in the top 5, so top-5 is 100%.

    scores: [n, K] box-to-class similarity; labels: [n] class indices.
    """
    if scores.shape[0] == 0:
        raise ValueError("no boxes to evaluate")
    ranks = rank_of_true(scores, scores.gather(1, labels.unsqueeze(1)).squeeze(1))
    metrics: dict[str, float] = {"boxes": float(labels.numel())}
    present = torch.bincount(labels, minlength=num_classes) > 0
    metrics["classes_with_boxes"] = float(present.sum())
    for k in (1, 5):
        correct = (ranks < k).double()  # float64: a float32 mean printed 1/5 as 20.000000298
        per_class = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, correct) / torch.bincount(labels, minlength=num_classes).clamp(min=1)
        metrics[f"top{k}"] = 100.0 * float(per_class[present].mean())
        metrics[f"top{k}_overall"] = 100.0 * float(correct.mean())
    return metrics


def retrieval_metrics(similarity: torch.Tensor, text_to_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image Recall@K. similarity: [n_images, n_texts]; text_to_image: [n_texts] image index.

    An image is retrieved correctly at K when its best-scoring own caption is ranked within K (any of its
    captions in the top K; an image without captions never is); a caption when its own image is.
    Image->text averages over images, text->image over captions, as COCO/Flickr30k retrieval reports them.
    """
    n_images = similarity.shape[0]
    own = text_to_image.unsqueeze(0) == torch.arange(n_images).unsqueeze(1)  # [n_images, n_texts]
    # a NaN caption is the image's worst own caption, not its best: any other own caption can still hit
    best_own = similarity.nan_to_num(nan=float("-inf")).masked_fill(~own, float("-inf")).max(dim=1).values
    image_ranks = at_least(similarity, best_own.unsqueeze(1)).logical_and(~own).sum(dim=1)
    image_ranks[~own.any(dim=1)] = torch.iinfo(image_ranks.dtype).max  # it ranked n_texts: a hit for K > n_texts
    text_scores = similarity.T  # [n_texts, n_images]
    text_ranks = rank_of_true(text_scores, text_scores.gather(1, text_to_image.unsqueeze(1)).squeeze(1))
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"i2t_r{k}"] = 100.0 * float((image_ranks < k).double().mean())
        metrics[f"t2i_r{k}"] = 100.0 * float((text_ranks < k).double().mean())
    return metrics


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_label: int) -> torch.Tensor:
    """[K, K] counts, rows = target class, columns = predicted class; ignored pixels left out."""
    keep = target != ignore_label
    pairs = target[keep].long() * num_classes + predicted[keep].long()
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU over classes present in the ground truth or the prediction (an absent class predicted
    nowhere has no IoU and is left out, as mmsegmentation does), and pixel accuracy."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    iou = true_positive[present] / union[present]
    total = confusion.sum()
    return {
        "miou": 100.0 * float(iou.mean()) if present.any() else 0.0,
        "pixel_accuracy": 100.0 * float(true_positive.sum() / total) if total > 0 else 0.0,
        "classes_scored": float(present.sum()),
    }
