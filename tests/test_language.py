import numpy as np

from fastlaion.language import EN, MULTI, NOLANG, LanguageIdentifier


def test_real_lid176_identifies_captions_and_splits_like_laion():
    lid = LanguageIdentifier(min_score=0.5)
    texts = ["a photograph of a cat sleeping on a sofa", "une photo d'un chat qui dort sur un canapé",
             "ein Foto einer Katze, die auf einem Sofa schläft", "una foto de un gato durmiendo en el sofá",
             "猫がソファで寝ている写真", "cat", "", None, "12345 67890 !!!", "line one\nline two in english"]
    langs, scores, groups = lid(texts)
    assert langs[:5] == ["en", "fr", "de", "es", "ja"]
    assert groups[:5] == [EN, MULTI, MULTI, MULTI, MULTI]
    assert (scores[:5] > 0.5).all()
    assert langs[5:8] == [None, None, None] and groups[5:8] == [NOLANG] * 3  # under 5 characters
    assert np.isnan(scores[5:8]).all()
    assert groups[8] == NOLANG  # digits: identified with a low probability
    assert langs[9] == "en"  # newlines do not break fastText


def test_a_caption_repeated_in_a_batch_is_identified_once_and_as_alone():
    """Each distinct caption goes to fastText once (alt texts repeat within a shard); every row
    gets what fastText says of its caption alone."""
    lid = LanguageIdentifier()
    texts = ["a red summer dress with flowers", "robe d'été rouge à fleurs", "a red summer dress with flowers",
             "tiny", None, "robe d'été rouge à fleurs", " a red summer dress with flowers\n", "Sommerkleid rot"]
    asked: list[list[str]] = []
    model = lid.model

    class Counting:  # the real model, its inputs noted
        def predict(self, batch, k=1):
            asked.append(list(batch))
            return model.predict(batch, k=k)

    lid.model = Counting()
    langs, scores, groups = lid(texts)
    assert sorted(asked[0]) == sorted({"a red summer dress with flowers", "robe d'été rouge à fleurs", "Sommerkleid rot"})
    for text, lang, score in zip(texts, langs, scores):
        if text is None or len(text.strip()) < 5:
            assert lang is None and np.isnan(score)
            continue
        labels, probs = model.predict(text.replace("\n", " ").strip(), k=1)
        assert lang == labels[0].removeprefix("__label__") and score == np.float32(min(probs[0], 1.0))
    assert langs[0] == langs[2] == langs[6] == "en" and langs[1] == langs[5] == "fr"


def test_threshold_moves_rows_to_nolang():
    texts = ["a photograph of a cat sleeping on a sofa"] * 3
    assert LanguageIdentifier(min_score=1.01)(texts)[2] == [NOLANG] * 3


# --- the language process: the same identifier in a child, off the parent's GIL ---

import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import pytest  # noqa: E402

from fastlaion.config import ConfigError  # noqa: E402
from fastlaion.language import BatchLanguages, LanguageProcess, LanguageProcessClosed  # noqa: E402

MIXED = ["a photograph of a cat sleeping on a sofa", "une photo d'un chat qui dort sur un canapé", None, "",
         "ein Foto einer Katze, die auf einem Sofa schläft", "猫がソファで寝ている写真", "cat", "12345 67890 !!!",
         "line one\nline two in english", "Фотография кошки на диване", "x" * 3000, "  padded english caption  "]


def _captions(n: int, seed: int = 0) -> list[str | None]:
    import random

    rng = random.Random(seed)
    words = [w for t in MIXED if t for w in t.split()]
    return [None if rng.random() < 0.02 else " ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(n)]


def _same(a, b) -> None:
    assert a[0] == b[0] and a[2] == b[2]
    np.testing.assert_array_equal(a[1], b[1])  # NaN where not identified, in both


@pytest.fixture
def lp():
    process = LanguageProcess(min_score=0.5)
    yield process
    process.close()


def test_process_answers_as_the_identifier_in_order_from_many_threads(lp):
    local = LanguageIdentifier(min_score=0.5)
    batches = [MIXED, *(_captions(300, seed) for seed in range(8))]
    with ThreadPoolExecutor(4) as pool:  # several shards' batches in flight at once
        futures = list(pool.map(lp.submit, batches))
    for texts, future in zip(batches, futures):
        _same(lp.result(future, texts), local(texts))
    assert lp([]) == ([], pytest.approx(np.array([], dtype=np.float32)), [])


def test_the_parent_keeps_its_gil_while_the_process_identifies(lp):
    """fastText holds the GIL through `predict` (~20 us a caption): in-process, another thread of
    this process stands still for the whole call (0.5 s here); with the process it keeps running."""
    texts = _captions(10_000, seed=1)
    lp(texts[:100])  # started and warm
    done = threading.Event()

    def longest_stall() -> float:
        worst, last = 0.0, time.perf_counter()
        while not done.is_set():
            now = time.perf_counter()
            worst, last = max(worst, now - last), now
        return worst

    with ThreadPoolExecutor(1) as pool:
        stall = pool.submit(longest_stall)
        t0 = time.perf_counter()
        lp(texts)
        took = time.perf_counter() - t0
        done.set()
    assert took > 0.2  # the stall an in-process call would cause
    print(f"longest stall {stall.result()*1e3:.1f} ms in a {took:.2f} s call")
    # an in-process call would stall this thread for about the whole call; the bound leaves room
    # for the scheduler on a busy 2-core machine (`make test` runs two test processes)
    assert stall.result() < min(0.15, took / 2), (stall.result(), took)


def test_a_killed_child_is_replaced_and_its_batch_sent_again(lp, caplog):
    texts = _captions(2000, seed=2)
    expected = LanguageIdentifier(min_score=0.5)(texts)
    lp.wait_ready()
    first = lp._child.proc
    future = lp.submit(texts * 5)  # long enough that the kill lands while it is being answered
    os.kill(first.pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="fastlaion.language"):
        _same(lp.result(future, texts * 5), (expected[0] * 5, np.tile(expected[1], 5), expected[2] * 5))
    assert first.wait(5) == -signal.SIGKILL
    assert lp._child.proc.pid != first.pid
    assert "killed by SIGKILL" in caplog.text


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_is_left_to_the_parent(lp, sig):
    """The terminal's SIGINT, and Slurm's, systemd's or timeout's SIGTERM, reach the whole process
    group, this child too: the parent stops it. SIGTERM killed it, and the parent, while stopping,
    started another with a warning line ("killed by SIGTERM")."""
    lp.wait_ready()
    child = lp._child.proc
    os.kill(child.pid, getattr(signal, sig))
    time.sleep(0.2)
    _same(lp(MIXED), LanguageIdentifier(min_score=0.5)(MIXED))
    assert lp._child.proc is child and child.poll() is None  # the same child answered


def test_a_model_fasttext_cannot_read_is_a_config_error(tmp_path):
    bad = tmp_path / "lid.bin"
    bad.write_bytes(b"not a model")
    process = LanguageProcess(str(bad))
    try:
        with pytest.raises(ConfigError, match=f"--language-model {bad}: not a fastText model"):
            process.wait_ready()
        with pytest.raises(ConfigError):
            process(["a caption"])
    finally:
        process.close()
    with pytest.raises(ConfigError, match="no such file"):
        LanguageProcess(str(tmp_path / "missing.bin"))


def test_a_child_that_cannot_start_is_a_config_error(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # exits at once, saying nothing
    process = LanguageProcess()
    try:
        with pytest.raises(ConfigError, match=r"language identification could not start: .*ended \(exit status 1\)"):
            process.wait_ready()
    finally:
        process.close()


def test_close_and_garbage_collection_end_the_child():
    process = LanguageProcess()
    process.wait_ready()
    child = process._child.proc
    process.close()
    assert child.poll() is not None
    process = LanguageProcess()
    process.wait_ready()
    child = process._child.proc
    del process
    assert child.wait(5) == 0


def test_the_child_ends_with_its_parent_even_when_killed(tmp_path):
    script = ("import os, signal, sys\n"
              "from fastlaion.language import LanguageProcess\n"
              "p = LanguageProcess(); p.wait_ready()\n"
              "print(p._child.proc.pid, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    pid = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            break
        if state == "Z":  # ended; whoever adopted it has not reaped it yet
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the language process outlived its killed parent")


def test_batch_languages_takes_the_rows_left_in_their_order(lp):
    rows = [10, 11, 12, 13, 14]
    texts = ["a photograph of a cat sleeping on a sofa", "une photo d'un chat qui dort sur un canapé", "cat",
             "ein Foto einer Katze, die auf einem Sofa schläft", "a cup of black coffee on a wooden table"]
    taken = BatchLanguages(lp, rows, texts).take([14, 11, 13])  # 10 and 12 dropped on the way
    assert taken["language"] == ["en", "fr", "de"]
    assert taken["language_group"] == ["en", "multi", "multi"]
    np.testing.assert_array_equal(taken["language_score"], LanguageIdentifier()([texts[4], texts[1], texts[3]])[1])


def test_a_cancelled_batch_does_not_stop_the_next(lp):
    lp.wait_ready()
    first = lp.submit(_captions(3000, seed=4))
    assert first.cancel()  # its caller gave up on it; the child still answers it
    _same(lp.submit(MIXED).result(timeout=30), LanguageIdentifier(min_score=0.5)(MIXED))


def test_what_the_child_prints_at_start_is_not_taken_for_a_reply(tmp_path, monkeypatch):
    """The replies have a pipe of their own: a sitecustomize (or any import) printing to the
    child's stdout changes nothing."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.stdout.write('hello from site ' * 50)\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    process = LanguageProcess()
    try:
        _same(process.submit(MIXED).result(timeout=30), LanguageIdentifier()(MIXED))
    finally:
        process.close()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH is Python 3.11+")
def test_a_fastlaion_folder_in_the_current_directory_is_not_imported_by_the_child(tmp_path, monkeypatch):
    (tmp_path / "fastlaion").mkdir()
    (tmp_path / "fastlaion" / "__init__.py").write_text("raise ImportError('the wrong fastlaion')\n")
    monkeypatch.chdir(tmp_path)
    process = LanguageProcess()
    try:
        process.wait_ready()
        _same(process(MIXED), LanguageIdentifier()(MIXED))
    finally:
        process.close()


def test_a_closed_process_refuses_work_and_starts_no_child():
    process = LanguageProcess()
    process.wait_ready()
    child = process._child.proc
    process.close()
    with pytest.raises(LanguageProcessClosed):
        process(MIXED)
    assert process._child.proc is child and child.poll() is not None


def test_close_with_batches_queued_fails_them_at_once(caplog):
    process = LanguageProcess()
    process.wait_ready()
    texts = _captions(20_000, seed=5)
    queued = [process.submit(texts) for _ in range(6)]  # seconds of work for the child
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="fastlaion.language"):
        process.close()
    assert time.perf_counter() - t0 < 3
    for future in queued:
        with pytest.raises(LanguageProcessClosed):
            future.result(timeout=1)
    assert process._child.proc.poll() is not None
    assert "starting another" not in caplog.text
