from setuptools import setup

setup(
    name="guided-diffusion",
    version="0.1.0",
    description="ADM (Diffusion Models Beat GANs on Image Synthesis): networks, diffusion, "
    "guidance, training, sampling and a torch-only evaluator",
    license="MIT",
    python_requires=">=3.9",
    packages=["guided_diffusion", "guided_diffusion.configs", "evaluations"],
    package_dir={"guided_diffusion.configs": "configs"},
    package_data={"guided_diffusion.configs": ["*.json"]},
    install_requires=["torch", "numpy", "blobfile>=1.0.5", "tqdm", "pillow", "scipy", "safetensors"],
    extras_require={
        "mpi": ["mpi4py"],
        "quickstart": ["scikit-learn"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "diffusers": ["diffusers"],
        "test": ["pytest", "pytest-xdist>=3.7", "mpich", "mpi4py", "scikit-learn", "tensorboard", "wandb", "diffusers"],
    },
)
