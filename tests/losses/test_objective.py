"""The objective's self-distillation crops: from the model input, or from the same image at a higher
resolution when the batch carries one (losses.crop_source_scale); and a batch with no valid box."""
import torch
import torch.nn.functional as F

import fineclip_ds.losses.objective as objective_module
from fineclip_ds.config import KernelConfig, LossConfig, ModelConfig
from fineclip_ds.data.collate import RegionCollator, TransformedSample
from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.data.streams import SyntheticStream
from fineclip_ds.data.transforms import RegionTransform
from fineclip_ds.losses.objective import FineCLIPObjective
from fineclip_ds.models.factory import create_fineclip


def _objective_and_batch():
    torch.manual_seed(0)
    model, tokenizer, _ = create_fineclip(ModelConfig())
    objective = FineCLIPObjective(model, LossConfig(), KernelConfig(region_pool="torch", contrastive="torch"))
    samples = [TransformedSample(torch.randn(3, 64, 64), f"picture {i}", torch.tensor([[4.0, 6.0, 40.0, 50.0]]),
                                 ["a region"]) for i in range(2)]
    return objective, RegionCollator(tokenizer, max_boxes=2)(samples)


def _spy_on_crops(monkeypatch) -> dict:
    seen = {}
    crop_regions = objective_module.crop_regions

    def spy(images, boxes, box_mask, enlarge, out_hw):
        seen.update(images=images, boxes=boxes, out_hw=out_hw)
        return crop_regions(images, boxes, box_mask, enlarge, out_hw)

    monkeypatch.setattr(objective_module, "crop_regions", spy)
    return seen


def test_teacher_crops_come_from_the_model_input_by_default(monkeypatch):
    objective, batch = _objective_and_batch()
    seen = _spy_on_crops(monkeypatch)
    objective(batch)
    assert seen["images"] is batch["images"] and torch.equal(seen["boxes"], batch["boxes"])


def test_teacher_crops_come_from_the_higher_resolution_source_when_the_batch_has_one(monkeypatch):
    objective, batch = _objective_and_batch()
    batch["crop_images"] = F.interpolate(batch["images"], size=(128, 192), mode="bilinear")  # 2x tall, 3x wide
    seen = _spy_on_crops(monkeypatch)
    objective(batch)
    assert seen["images"] is batch["crop_images"] and seen["out_hw"] == (64, 64)
    torch.testing.assert_close(seen["boxes"], batch["boxes"] * torch.tensor([3.0, 2.0, 3.0, 2.0]))


def test_the_stream_carries_the_crop_source_at_the_asked_scale():
    world = ShapesWorld(seed=1, image_size=96)
    transform = RegionTransform(32, (0.5,) * 3, (0.25,) * 3, crop_source_scale=3)
    stream = SyntheticStream(world, transform, RegionCollator(lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
                                                              4), local_batch=2, rank=0, world_size=1, num_workers=0)
    batch = next(iter(stream))
    assert batch["images"].shape == (2, 3, 32, 32) and batch["crop_images"].shape == (2, 3, 96, 96)
    # the source is the same picture: shrunk to the model's size, it matches the model input
    shrunk = F.interpolate(batch["crop_images"], size=(32, 32), mode="area")
    assert (shrunk - batch["images"]).abs().mean() < 0.1 * batch["images"].abs().mean()
    assert "crop_images" not in next(iter(SyntheticStream(world, RegionTransform(32, (0.5,) * 3, (0.25,) * 3),
                                                          stream.collator, 2, 0, 1, num_workers=0)))


def test_a_batch_without_a_valid_box_trains_and_still_runs_the_teacher_tower(monkeypatch):
    """Records without boxes are accepted, so a small micro-batch can hold none. open_clip cannot encode
    an empty crop batch, and under ZeRO-3 a rank skipping the teacher's forward would leave the
    others waiting in its parameter gathers: the tower runs on a stand-in that is dropped."""
    torch.manual_seed(0)
    model, tokenizer, _ = create_fineclip(ModelConfig())
    objective = FineCLIPObjective(model, LossConfig(), KernelConfig(region_pool="torch", contrastive="torch"))
    samples = [TransformedSample(torch.randn(3, 64, 64), f"picture {i}", torch.zeros(0, 4), []) for i in range(2)]
    batch = RegionCollator(tokenizer, max_boxes=2)(samples)
    assert not batch["box_mask"].any()
    encoded = []
    encode_image = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda images: encoded.append(len(images)) or encode_image(images))
    total, report = objective(batch)
    total.backward()
    assert report["sd"] == 0 and report["rc"] == 0 and torch.isfinite(total)
    assert encoded == [1]  # the teacher's stand-in (the student path encodes through encode_image_and_dense)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_the_crop_teacher_gets_gradient_by_default_as_in_fineclips_code():
    """FineCLIP's training/clipself.py encodes the crops with the trained model outside no_grad, so L_SD
    pulls the crop embedding towards the region feature too; losses.sd_teacher_grad=False detaches it."""
    grads = {}
    for teacher_grad in (True, False):
        torch.manual_seed(0)
        model, tokenizer, _ = create_fineclip(ModelConfig())
        losses = LossConfig(w_gc=0.0, w_rc=0.0, **({} if teacher_grad else {"sd_teacher_grad": False}))
        objective = FineCLIPObjective(model, losses, KernelConfig(region_pool="torch", contrastive="torch"))
        samples = [TransformedSample(torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(i)), f"picture {i}",
                                     torch.tensor([[4.0, 6.0, 40.0, 50.0]]), ["a region"]) for i in range(2)]
        total, _ = objective(RegionCollator(tokenizer, max_boxes=2)(samples))
        total.backward()
        grads[teacher_grad] = model.visual.proj.grad.clone()
    assert LossConfig().sd_teacher_grad
    assert not torch.allclose(grads[True], grads[False])
