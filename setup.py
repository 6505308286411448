"""Install fineclip_ds (the trainer) and kernels (its Triton ops) as one distribution."""
from setuptools import find_packages, setup

setup(
    name="fineclip_ds",
    version="0.1.0",
    description="FineCLIP (region-aware CLIP) training on DeepSpeed with Triton kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["fineclip_ds", "fineclip_ds.*", "kernels", "kernels.*"]),
    package_data={"fineclip_ds": ["models/model_configs/*.json", "recipes/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.15",
        "open_clip_torch>=2.24",
        "transformers",
        "webdataset",
        "tensorboard",
        "triton",
        "tqdm",
        "pyyaml",
        "pillow",
        "numpy",
        "packaging",
    ],
    extras_require={
        "flash": ["flash-attn"],
        "dev": ["pytest>=7.3", "pytest-benchmark"],
    },
)
