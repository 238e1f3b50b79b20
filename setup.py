"""Tandem: one stack to pretrain GPT, BERT and T5 models from raw web text to sharded checkpoints."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="tandem",
    version="0.1.0",
    description="Distributed pretraining of GPT, BERT and T5 Transformer language models",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pretrain*", "parallel*", "data_pipeline*", "launch*", "slurm*"]),
    package_data={"": ["*.yaml", "*.txt", "*.sh", "*.sbatch"]},
    install_requires=[
        # torch is not pinned here: CI installs the CPU build first, GPU users keep their CUDA build.
        "torch>=2.6",
        "deepspeed>=0.16",
        "megatron-core>=0.12",
        "sentencepiece>=0.2",
        "webdataset>=0.2.90",
        "numpy>=1.24",
        "pyyaml>=6",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "scipy>=1.10",  # scaling-law fits (L-BFGS)
        "threadpoolctl>=3",  # one BLAS thread during fits
        "matplotlib>=3.7",  # scaling plots
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2",
            "ruff>=0.6",
            "mypy>=1.10",
            "transformers>=4.45",
            "types-PyYAML",
            # Triton kernels run under TRITON_INTERPRET=1 in CPU tests; CUDA builds of torch bring their own.
            "triton>=3.0; sys_platform == 'linux'",
        ],
    },
    entry_points={"console_scripts": ["pretrain=pretrain.cli:main"]},
)
