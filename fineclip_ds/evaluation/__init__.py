"""Evaluation the FineCLIP way: zero-shot box classification, image-text retrieval, dense-feature pictures."""
