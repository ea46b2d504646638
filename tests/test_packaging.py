"""The wheel carries what a plain `pip install` needs at run time: the CUDA sources and model configs."""

import subprocess
import sys
import zipfile


def test_wheel_ships_kernel_sources_and_model_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = tmp_path.glob("fastlaion-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastlaion/_kernels/cosine.cu" in names
    assert "fastlaion/model_configs/fastlaion-tiny.json" in names
    assert "fastlaion/cli.py" in names
    assert "fastlaion/extract_native.c" in names  # the WAT hot path is built from it on first use
    assert "fastlaion/parquet_native.c" in names  # and its Parquet writer
    assert "fastlaion/tokenize_native.c" in names  # the tokenizer's compiled word table
    assert "fastlaion/jpeg_native.c" in names  # the GPU decoders' JPEG check
    assert "fastlaion/f16_native.c" in names  # the embeddings' float16 conversion
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Provides-Extra: gpu" in meta and "nvidia-dali-cuda130" in meta


def test_kernel_sources_are_found_from_the_checkout():
    from fastlaion.ops import kernels_dir

    assert (kernels_dir() / "cosine.cu").is_file()
