import pytest

from fineclip_ds.config import ModelConfig, OptimConfig
from fineclip_ds.models.factory import create_fineclip
from fineclip_ds.training.optimizer import build_optimizer, warmup_cosine, warn_if_warmup_outlasts


def test_weight_decay_follows_open_clips_split():
    model, _, _ = create_fineclip(ModelConfig(freeze_text=False))
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.2))
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0.2 for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    exempt = {name for name, p in model.named_parameters() if p.requires_grad and id(p) not in decayed}
    assert {"clip.visual.positional_embedding", "clip.token_embedding.weight", "clip.visual.conv1.weight",
            "clip.visual.proj"} <= names
    assert {"clip.logit_scale", "clip.visual.class_embedding", "clip.visual.ln_pre.weight",
            "clip.visual.transformer.resblocks.0.attn.in_proj_bias"} <= exempt
    assert all(p.ndim >= 2 for name, p in model.named_parameters() if name in names)


def test_warmup_then_cosine_reaches_the_floor():
    assert warmup_cosine(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_a_warmup_longer_than_the_run_is_reported_with_the_peak_it_reaches(caplog):
    warn_if_warmup_outlasts(OptimConfig(warmup_steps=100), total_steps=100)  # reaches optim.lr at its last step
    warn_if_warmup_outlasts(OptimConfig(warmup_steps=400), total_steps=100)
    assert [record.getMessage() for record in caplog.records] == [
        "optim.warmup_steps=400 > train.max_steps=100: the learning rate peaks at 25% of optim.lr"]
