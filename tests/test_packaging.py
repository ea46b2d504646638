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


def _system_deps(tmp_path, apt_has_chromium: bool):
    """`make system-deps` on a machine with everything but chromium, against a stub apt (logging
    its calls) that has or lacks a package named chromium: Debian ships one, Ubuntu only
    chromium-browser (a snap), so `apt-get install chromium` fails there."""
    import os
    import shutil
    from pathlib import Path

    import pytest

    make = shutil.which("make")
    if make is None:
        pytest.skip("no make here")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "apt.log"
    stubs = {
        "apt-get": f'echo "apt-get $*" >> {log}\ncase "$*" in *install*chromium*) '
                   f'{"exit 0" if apt_has_chromium else "echo E: Unable to locate package chromium >&2; exit 100"};; esac',
        "apt-cache": f'echo "apt-cache $*" >> {log}\ncase "$*" in *chromium*) exit {0 if apt_has_chromium else 100};; esac',
        "ldconfig": 'echo "libturbojpeg.so.0 (libc6,x86-64) => /usr/lib/libturbojpeg.so.0"',
        "cc": "exit 0",
        "openssl": "exit 0",
    }
    for name, body in stubs.items():
        (bin_ / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_ / name).chmod(0o755)
    for tool in ("grep", "id"):  # the recipes' own tools; nothing else of the system's PATH (no chromium)
        os.symlink(shutil.which(tool), bin_ / tool)
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([make, "-s", "-C", str(repo), "system-deps", f"PYTHON={sys.executable}", "SUDO="],
                       env={"PATH": str(bin_), "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    return r, (log.read_text() if log.exists() else "")


def test_system_deps_goes_on_where_apt_has_no_chromium_package(tmp_path):
    """On Ubuntu (no apt package 'chromium') `make test` and `make demo` stopped at system-deps;
    chromium is for one test, which skips where it cannot be installed."""
    r, apt = _system_deps(tmp_path, apt_has_chromium=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "install -y -q chromium" not in apt
    assert "chromium" in r.stdout  # says it goes on without it


def test_system_deps_installs_chromium_where_apt_has_it(tmp_path):
    r, apt = _system_deps(tmp_path, apt_has_chromium=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "apt-get install -y -q chromium" in apt
