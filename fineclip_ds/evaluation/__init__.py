"""Evaluation the FineCLIP way: zero-shot box classification, image-text retrieval, zero-shot segmentation,
dense-feature pictures."""
