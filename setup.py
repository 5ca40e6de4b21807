from setuptools import find_packages, setup

GEO = ["rasterio>=1.3", "pyarrow>=17"]  # pyarrow 17: ParquetWriter.add_key_value_metadata
ANN = ["faiss-cpu>=1.7.3"]  # 1.7.3: SearchParametersIVF / SearchParametersHNSW (per-query nprobe)

setup(
    name="mrs-adapter",
    version="0.1.0",
    description="CLIP + MRS-Adapter + HMMC: parameter-efficient remote sensing image-text "
                "retrieval (Yuan, Zhan, Xiong, IEEE TGRS 2023), a reference implementation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mrs_adapter", "mrs_adapter.*"]),
    package_data={"mrs_adapter": ["bpe_simple_vocab_16e6.txt.gz", "bpe_simple_vocab_16e6.LICENSE"]},
    python_requires=">=3.9",
    # torch 2.3: torch.amp.GradScaler("cuda") (train.py). 2.1 would do for
    # load_state_dict(assign=True) and torch.cuda.graph(capture_error_mode=...), 2.0 for
    # scaled_dot_product_attention and torch.compile. torchvision 0.18 is torch 2.3's release.
    install_requires=["torch>=2.3", "torchvision>=0.18", "ftfy", "regex", "numpy", "pillow"],
    # [geo]: search over GeoTIFF / COG (mrs_adapter/search/raster.py, docs/geotiff.md; rasterio's
    # wheels bundle GDAL; tested with rasterio 1.4.4, GDAL 3.10) and GeoParquet export (pyarrow).
    # The paper's path and plain-image search need neither. [test] includes [geo], so CI runs
    # every geo test; pyproj is the tests' reprojection, independent of rasterio's.
    # [ann]: `search.py ann`, an approximate index for large archives (mrs_adapter/search/ann.py);
    # without it queries are exact brute force. [test] includes it too.
    extras_require={"geo": GEO, "ann": ANN,
                    "test": ["pytest", "open_clip_torch", "ruff", "pyproj"] + GEO + ANN},
    license="MIT",
)
