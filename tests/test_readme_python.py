"""The README's Python example runs as written, on a trained run, and gives what its comments say."""
import re
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_example() -> str:
    section = README.read_text().split("### In Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs_on_a_trained_run(runs, tmp_path):
    photo = Image.new("RGB", (320, 200), "white")
    ImageDraw.Draw(photo).ellipse((20, 40, 120, 140), fill="red")
    photo.save(tmp_path / "photo.jpg")
    code = readme_python_example()
    assert '"runs/tiny-cpu"' in code and '"photo.jpg"' in code
    code = code.replace('"runs/tiny-cpu"', repr(str(runs["one_zero2"]))).replace('"photo.jpg"',
                                                                                   repr(str(tmp_path / "photo.jpg")))
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)
    model, regions, probabilities = names["model"], names["regions"], names["probabilities"]
    assert not model.training and names["kept"] == [0, 1]
    assert regions.shape == (2, names["image_embedding"].shape[-1]) and probabilities.shape == (2, 3)
    torch.testing.assert_close(regions.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2))
    with torch.no_grad():
        torch.testing.assert_close(names["image_embedding"], model.encode_image(names["pixels"][None]))
