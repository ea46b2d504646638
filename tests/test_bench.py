"""bench/stages.py --quick: the stage benchmarks' dry run, so the script cannot rot between the
hand-run measurements (its numbers are not checked, only that every section ran and compared)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stages_quick_prints_the_three_ratio_rows(tmp_path: Path) -> None:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "stages.py"), "--quick", "--scratch", str(tmp_path)], check=False,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # | stage | data | fastlaion | peer | peer's figure | fastlaion / peer | by CPU time |
    rows = re.findall(r"^\| (decode|language|write) \|.*\| (\d+\.\d\d)x \| (?:\d+\.\d\dx|n/a) \|$", proc.stdout, re.MULTILINE)
    assert {stage for stage, _ in rows} == {"decode", "language", "write"}, out[-4000:]
    assert all(float(ratio) > 0 for _, ratio in rows)
    # the sides were checked against each other before they were timed
    for check in ("same shapes: CLIP input (224, 224, 3)", "agreement: ", "same shards: "):
        assert check in proc.stdout, check
    assert not list(tmp_path.iterdir()), "the write section left its shards behind"


def test_tags_quick_prints_every_heads_ratio_row_after_the_agreement_checks(tmp_path: Path) -> None:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "tags.py"), "--quick", "--scratch", str(tmp_path)],
                          check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
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
