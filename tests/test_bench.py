"""The benchmarks' --quick dry runs (stages.py, tags.py, e2e.py), so the scripts cannot rot between
the hand-run measurements (their numbers are not checked, only that every section ran and compared)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick(script: str, scratch: tuple[str, Path], timeout: int) -> subprocess.CompletedProcess[str]:
    """bench/`script` --quick with its scratch folder option (`scratch`: (option, folder)), this
    checkout's fastlaion first on the path, offline; it must exit 0 (the last of its output shown)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", scratch[0], str(scratch[1])],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_stages_quick_prints_the_three_ratio_rows(tmp_path: Path) -> None:
    proc = quick("stages.py", ("--scratch", tmp_path), 300)
    out = proc.stdout + proc.stderr
    # | stage | data | fastlaion | peer | peer's figure | fastlaion / peer | by CPU time |
    rows = re.findall(r"^\| (decode|language|write) \|.*\| (\d+\.\d\d)x \| (?:\d+\.\d\dx|n/a) \|$", proc.stdout, re.MULTILINE)
    assert {stage for stage, _ in rows} == {"decode", "language", "write"}, out[-4000:]
    assert all(float(ratio) > 0 for _, ratio in rows)
    # the sides were checked against each other before they were timed
    for check in ("same shapes: CLIP input (224, 224, 3)", "agreement: ", "same shards: "):
        assert check in proc.stdout, check
    assert not list(tmp_path.iterdir()), "the write section left its shards behind"


def test_tags_quick_prints_every_heads_ratio_row_after_the_agreement_checks(tmp_path: Path) -> None:
    proc = quick("tags.py", ("--scratch", tmp_path), 600)
    out = proc.stdout + proc.stderr
    rows = re.findall(r"^\| (punsafe|aesthetic|aesthetic_v2|embedding heads|watermark input|watermark model|watermark bf16"
                      r"|pwatermark|tag stage) \|.*\| (\d+\.\d\d)x \| (?:\d+\.\d\dx|n/a) \|$", proc.stdout, re.MULTILINE)
    assert {stage for stage, _ in rows} == {"punsafe", "aesthetic", "aesthetic_v2", "embedding heads", "watermark input",
                                            "watermark model", "watermark bf16", "pwatermark", "tag stage"}, out[-4000:]
    assert all(float(ratio) > 0 for _, ratio in rows)
    # the sides were checked against each other (a mismatch exits non-zero) before they were timed
    for check in ("agreement, punsafe: ", "agreement, aesthetic: ", "agreement, aesthetic_v2: ",
                  "scores LAION's rating-0..9 embeddings", "detector on the peer's own resized pixels",
                  "decoder's pixels, in the run's decode: ", "pwatermark, bfloat16 network (weights + input): max |diff| ",
                  "pwatermark, float32 network, its input rounded to bfloat16: "):
        assert check in proc.stdout, check
    assert not list(tmp_path.iterdir()), "the random-weight files were left behind"


def test_e2e_quick_prints_the_chain_and_fastlaion_rows_after_the_agreement_checks(tmp_path: Path) -> None:
    """bench/e2e.py --quick: the tiny model on 48 images over loopback. The peer chain (img2dataset,
    clip-retrieval inference, the filter) runs only where bench/.venv-img2dataset and
    bench/.venv-clip-retrieval were made by a full run (--quick installs nothing); else it says SKIPPED."""
    proc = quick("e2e.py", ("--workdir", tmp_path), 300)
    out = proc.stdout + proc.stderr
    ratio = r"(\d+\.\d\dx|n/a)"
    rows = re.findall(r"^\| fastlaion \| run, (bf16|fp32) \(kept \d+; stage s: .*\) \| 48 \|.*\| " + ratio + r" \| "
                      + ratio + r" \|$", proc.stdout, re.MULTILINE)
    assert len(rows) == 2 and "fp32" in {precision for precision, *_ in rows}, out[-4000:]
    if "peer: SKIPPED" in proc.stdout:
        assert all(r == "n/a" for _, *ratios in rows for r in ratios)
        return
    for step in ("img2dataset", "clip-retrieval", "filter", r"\*\*the chain\*\*"):
        assert re.search(r"^\| peer \| " + step + r".*\| 48 \|", proc.stdout, re.MULTILINE), step
    assert all(float(r[:-1]) > 0 for _, *ratios in rows for r in ratios)
    # both sides keep about the same rows (a pair at the threshold may fall either side), checked before the table
    for name in ("auto", "fp32"):
        kept = re.search(rf"^counts, peer vs fastlaion {name}: downloaded 48 vs 48, scored 48 vs 48, kept at "
                         r"\S+ (\d+) vs (\d+)$", proc.stdout, re.MULTILINE)
        assert kept and abs(int(kept[1]) - int(kept[2])) <= 2, out[-4000:]
        assert f"agreement, fastlaion {name}: 48 URLs scored by both" in proc.stdout


def test_evaluate_quick_agrees_with_the_open_clip_script_then_prints_the_ratio(tmp_path: Path) -> None:
    """bench/evaluate.py --quick: 48 images in 10 classes, the tiny CLIP, both sides."""
    proc = quick("evaluate.py", ("--workdir", tmp_path), 300)
    assert re.search(r"^agreement: 48 / 48 images, .*: True$", proc.stdout, re.MULTILINE), proc.stdout[-4000:]
    assert re.search(r"^fastlaion / script: \d+\.\d\dx the speed by wall time, \d+\.\d\dx by CPU time",
                     proc.stdout, re.MULTILINE), proc.stdout[-4000:]
