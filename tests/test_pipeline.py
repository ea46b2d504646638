"""End to end: `fastlaion run` against a loopback server, every kind of bad input included."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fastlaion.cli import app
from fastlaion.server import LoopbackServer, Served

from helpers import encode, refused_url, with_jpeg_size

runner = CliRunner()


def build_case(photos):
    """(files to serve, rows: (url path or absolute URL, caption, expected (stage, reason) or None))."""
    jpeg = {n: encode(a, "JPEG") for n, a in photos.items()}
    files = {
        "chelsea.jpg": Served(jpeg["chelsea"], "image/jpeg"),
        "coffee.png": Served(encode(photos["coffee"], "PNG"), "image/png"),
        "astronaut.webp": Served(encode(photos["astronaut"], "WEBP"), "image/webp"),
        "rocket.jpg": Served(jpeg["rocket"], "image/jpeg"),
        "page.jpg": Served(b"<html><body>moved</body></html>" * 300, "image/jpeg"),
        "truncated.jpg": Served(jpeg["rocket"][: len(jpeg["rocket"]) // 2], "image/jpeg"),
        "empty.jpg": Served(b"", "image/jpeg"),
        "bomb.jpg": Served(with_jpeg_size(jpeg["coffee"], 10_000, 9_000), "image/jpeg"),
        "small.png": Served(encode(Image.new("RGB", (8, 8)), "PNG"), "image/png"),
    }
    rows = [
        ("chelsea.jpg", "a cat", None),
        ("coffee.png", "a cup of coffee", None),
        ("astronaut.webp", "an astronaut", None),
        ("rocket.jpg", "bell\x07 and\x00 null in a rocket caption", None),
        ("chelsea.jpg", "long " * 20_000, None),  # 100k characters
        ("missing.jpg", "a dead link", ("download", "http_404")),
        (refused_url(), "nobody listens", ("download", "connection_error")),
        ("", "no url at all", ("download", "invalid_url")),
        ("ftp://127.0.0.1/x.jpg", "not http", ("download", "invalid_url")),
        ("page.jpg", "html instead of an image", ("decode", "not_an_image")),
        ("truncated.jpg", "half a rocket", ("decode", "truncated")),
        ("empty.jpg", "nothing", ("decode", "empty_body")),
        ("bomb.jpg", "claims 90M pixels", ("decode", "too_many_pixels")),
        ("small.png", "a tiny png", ("decode", "too_few_bytes")),
        ("rocket.jpg", "", ("score", "no_caption")),
    ]
    return files, rows


def write_input(tmp_path: Path, server: LoopbackServer, rows) -> Path:
    urls = [u if (u == "" or "://" in u) else server.url(u) for u, _, _ in rows]
    path = tmp_path / "input.parquet"
    pl.DataFrame({"url": urls, "caption": [c for _, c, _ in rows]}).write_parquet(path)
    return path


def tiny_checkpoint(tmp_path: Path) -> Path:
    """A random-weight tiny CLIP saved as a local checkpoint (exercises --pretrained PATH)."""
    import open_clip

    from fastlaion.score import TINY_MODEL, register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def read_output(out: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in sorted(out.glob("[0-9]*.parquet"))], how="diagonal_relaxed")


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, photos):
    tmp = tmp_path_factory.mktemp("run")
    files, rows = build_case(photos)
    ckpt = tiny_checkpoint(tmp)
    with LoopbackServer(files) as server:
        inp = write_input(tmp, server, rows)
        out = tmp / "out"
        result = runner.invoke(app, ["run", str(inp), "-o", str(out), "--allow-private-networks", "--model", "fastlaion-tiny",
                                     "--pretrained", str(ckpt), "--min-similarity", "-1", "--shard-size", "6",
                                     "--timeout", "3", "--retries", "1", "--no-progress"])
    return result, out, rows, files, ckpt, tmp


def test_every_row_has_its_expected_outcome(scored_run):
    result, out, rows, files, _, _ = scored_run
    assert result.exit_code == 0, result.output
    table = read_output(out)
    assert table.height == len(rows)
    assert table["key"].to_list() == sorted(table["key"].to_list())
    assert table["key"].n_unique() == len(rows)
    for (url, caption, expected), rec in zip(rows, table.iter_rows(named=True)):
        if expected is None:
            assert rec["status"] == "kept", (url, rec)
            assert rec["stage"] is None and rec["reason"] is None
        else:
            assert (rec["status"], rec["stage"], rec["reason"]) == ("dropped", *expected), (url, rec)
    # what the downloaded bytes were, independently of the pipeline
    by_url = table.filter(pl.col("url").str.ends_with("chelsea.jpg")).row(0, named=True)
    assert by_url["sha256"] == hashlib.sha256(files["chelsea.jpg"].body).hexdigest()
    assert by_url["bytes"] == len(files["chelsea.jpg"].body)
    assert (by_url["original_width"], by_url["original_height"]) == (451, 300)  # not swapped
    assert by_url["http_status"] == 200
    assert table.filter(pl.col("reason") == "http_404")["http_status"].to_list() == [404]


def test_captions_are_cleaned_not_dropped(scored_run):
    _, out, rows, *_ = scored_run
    table = read_output(out)
    assert table["caption"][3] == "bell and null in a rocket caption"
    assert table["caption_edit"][3] == "control_chars"
    assert len(table["caption"][4]) == 2000 and table["caption_edit"][4] == "truncated"
    assert table["status"][4] == "kept"


def test_funnel_adds_up_and_matches_the_parquet(scored_run):
    result, out, rows, *_ = scored_run
    table = read_output(out)
    summary = json.loads((out / "summary.json").read_text())
    f = summary["funnel"]
    assert f["input"] == len(rows)
    left = f["input"]
    for stage, level in [("download", "downloaded"), ("decode", "decoded"), ("score", "scored"), ("filter", "kept")]:
        left -= sum(f["drops"][stage].values())
        assert f[level] == left
        got = table.filter(pl.col("stage") == stage).group_by("reason").len()
        assert dict(got.iter_rows()) == f["drops"][stage]
    assert f["kept"] == table.filter(pl.col("status") == "kept").height == 5
    # the printed funnel shows the same numbers
    assert "http_404 1" in result.output and "too_many_pixels 1" in result.output
    shard_stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert len(shard_stats) == 3 and sum(s["funnel"]["kept"] for s in shard_stats) == 5
    assert all(set(s["timings_s"]) >= {"download", "decode", "score", "write"} for s in shard_stats)


def test_webdataset_shards_load_with_the_webdataset_library(scored_run):
    import webdataset as wds

    _, out, *_ = scored_run
    table = read_output(out)
    kept = table.filter(pl.col("status") == "kept")
    tars = sorted(str(p) for p in out.glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert sorted(s["__key__"] for s in samples) == sorted(kept["key"].to_list())
    for s in samples:
        rec = kept.filter(pl.col("key") == s["__key__"]).row(0, named=True)
        assert s["txt"] == rec["caption"]
        assert s["json"]["url"] == rec["url"]
        assert s["json"]["similarity"] == pytest.approx(rec["similarity"], abs=1e-6)
        assert s["jpg"].size == (rec["width"], rec["height"])
        assert max(s["jpg"].size) == 256  # border mode, --image-size 256 (the default)


def test_embeddings_match_parquet_rows_and_similarity(scored_run):
    _, out, *_ = scored_run
    for pq in sorted(out.glob("[0-9]*.parquet")):
        t = pl.read_parquet(pq)
        img = np.load(str(pq).replace(".parquet", "_img_emb.npy"))
        txt = np.load(str(pq).replace(".parquet", "_txt_emb.npy"))
        assert img.dtype == np.float16 and img.shape == (t.height, 512) and txt.shape == img.shape
        scored = t["similarity"].is_not_null().to_numpy()
        assert not np.isnan(img[scored]).any() and np.isnan(img[~scored]).all()
        cos = (img[scored].astype(np.float32) * txt[scored].astype(np.float32)).sum(1)
        np.testing.assert_allclose(cos, t["similarity"].to_numpy()[scored], atol=5e-3)


def test_similarity_matches_open_clip_on_the_original_image(scored_run, photos):
    """Our decode + preprocessing + scoring against open_clip's own transform and model."""
    import open_clip

    _, out, _, files, ckpt, _ = scored_run
    model, _, preprocess = open_clip.create_model_and_transforms("fastlaion-tiny", pretrained=str(ckpt))
    tokenizer = open_clip.get_tokenizer("fastlaion-tiny")
    table = read_output(out).filter(pl.col("status") == "kept")
    for name in ("coffee.png", "chelsea.jpg"):
        rec = table.filter(pl.col("url").str.ends_with(name)).row(0, named=True)
        image = Image.open(io.BytesIO(files[name].body)).convert("RGB")
        with torch.no_grad():
            i = torch.nn.functional.normalize(model.encode_image(preprocess(image)[None]), dim=-1)
            t = torch.nn.functional.normalize(model.encode_text(tokenizer([rec["caption"]])), dim=-1)
        assert rec["similarity"] == pytest.approx(float((i * t).sum()), abs=2e-3), name


def test_threshold_drops_with_a_reason(tmp_path, photos):
    files, rows = build_case(photos)
    with LoopbackServer(files) as server:
        inp = write_input(tmp_path, server, rows[:3])
        out = tmp_path / "out"
        result = runner.invoke(app, ["run", str(inp), "-o", str(out), "--allow-private-networks", "--model", "fastlaion-tiny", "--pretrained",
                                     "none", "--min-similarity", "1.0", "--no-progress"])
    assert result.exit_code == 0, result.output
    table = read_output(out)
    assert table["reason"].to_list() == ["low_similarity"] * 3
    assert table["similarity"].null_count() == 0 and (table["similarity"] < 1.0).all()
    assert not list(out.glob("*.tar")) or all(_tar_members(p) == [] for p in out.glob("*.tar"))


def test_each_shard_records_what_scored_it_and_a_mixed_output_is_told(tmp_path, photos):
    """A shard's stats say what its similarities were computed in ("fp32 on cpu"); a resume that
    scores the shards left another way (here --precision bf16: what auto is on a CPU with AMX,
    where the first run may have been fp32) is told, with the count of each, in the summary."""
    from fastlaion.writer import shard_files

    files, rows = build_case(photos)
    args = ["--allow-private-networks", "--model", "fastlaion-tiny", "--pretrained", "none", "--min-similarity", "-1",
            "--shard-size", "2", "--no-progress"]
    with LoopbackServer(files) as server:
        inp = write_input(tmp_path, server, rows[:4])
        out = tmp_path / "out"
        first = runner.invoke(app, ["run", str(inp), "-o", str(out), *args, "--precision", "fp32"])
        assert first.exit_code == 0, first.output
        assert [json.loads((out / f"0000{k}_stats.json").read_text())["scoring"] for k in (0, 1)] == ["fp32 on cpu"] * 2
        assert json.loads((out / "summary.json").read_text())["scoring"] == {"fp32 on cpu": 2}
        assert "scored in more than one way" not in first.output
        for f in out.iterdir():  # shard 1 lost: the resume redoes it
            if shard_files().fullmatch(f.name) and f.name.startswith("00001"):
                f.unlink()
        second = runner.invoke(app, ["run", str(inp), "-o", str(out), *args, "--precision", "bf16"])
    assert second.exit_code == 0, second.output
    assert json.loads((out / "00001_stats.json").read_text())["scoring"] == "bf16 on cpu"
    assert json.loads((out / "summary.json").read_text())["scoring"] == {"bf16 on cpu": 1, "fp32 on cpu": 1}
    told = " ".join(second.output.split())
    assert ("the output's shards were scored in more than one way (bf16 on cpu (1 shard), fp32 on cpu (1 shard))"
            in told), second.output


def _tar_members(path):
    import tarfile

    with tarfile.open(path) as tf:
        return tf.getnames()


def test_samples_are_written_off_the_event_loop(tmp_path, photos, monkeypatch):
    """The tar members of a batch are built and written on the write thread, not on the loop
    that runs the downloads."""
    import threading

    from fastlaion.writer import ShardWriter

    threads = []
    add = ShardWriter.add_samples

    def spy(self, batch):
        threads.append(threading.current_thread().name)
        return add(self, batch)

    monkeypatch.setattr(ShardWriter, "add_samples", spy)
    files, rows = build_case(photos)
    with LoopbackServer(files) as server:
        inp = write_input(tmp_path, server, rows)
        out = tmp_path / "out"
        result = runner.invoke(app, ["run", str(inp), "-o", str(out), "--allow-private-networks", "--no-score",
                                     "--no-progress", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert len(threads) >= 2 and all(name.startswith("write") for name in threads), threads
    assert read_output(out).filter(pl.col("status") == "kept").height == 6


def test_no_score_keeps_every_decoded_image(tmp_path, photos):
    files, rows = build_case(photos)
    with LoopbackServer(files) as server:
        inp = write_input(tmp_path, server, rows)
        out = tmp_path / "out"
        result = runner.invoke(app, ["run", str(inp), "-o", str(out), "--allow-private-networks", "--no-score", "--resize-mode", "center_crop",
                                     "--image-size", "128", "--no-progress", "--timeout", "3", "--retries", "0"])
    assert result.exit_code == 0, result.output
    table = read_output(out)
    assert "similarity" not in table.columns
    kept = table.filter(pl.col("status") == "kept")
    assert kept.height == 6  # the 5 scored ones plus the caption-less rocket
    assert set(zip(kept["width"], kept["height"])) == {(128, 128)}
    assert not list(out.glob("*_emb.npy"))


def test_an_ipv4_address_spelled_otherwise_is_downloaded_and_its_url_kept_as_given(tmp_path, photos):
    """`http://127.1:PORT/...` is 127.0.0.1 to browsers: downloaded from there, its row's url
    as the input wrote it (aiohttp refused these spellings: invalid_url)."""
    files = {"chelsea.jpg": Served(encode(photos["chelsea"], "JPEG"), "image/jpeg")}
    with LoopbackServer(files) as server:
        urls = [f"http://{host}:{server.port}/chelsea.jpg" for host in ("127.1", "2130706433", "0177.0.0.1")]
        inp = tmp_path / "input.parquet"
        pl.DataFrame({"url": urls, "caption": ["a cat"] * 3}).write_parquet(inp)
        out = tmp_path / "out"
        result = runner.invoke(app, ["run", str(inp), "-o", str(out), "--allow-private-networks", "--no-score",
                                     "--no-progress", "--timeout", "3", "--retries", "0"])
        assert server.hits["/chelsea.jpg"] == 3
    assert result.exit_code == 0, result.output
    table = read_output(out).sort("url")
    assert table["url"].to_list() == sorted(urls)
    assert table["status"].to_list() == ["kept"] * 3


def test_a_ctrl_c_while_many_downloads_stream_stops_the_run_every_time(tmp_path):
    """A real SIGINT to this process at a random moment while 48 bodies of 2 MiB stream in: uvloop
    took the KeyboardInterrupt that Python's handler raised inside a connection's data_received
    for that connection's error, closed it and went on; the Ctrl-C was lost in 7 runs of 10 (the
    run finished, exit 0, with one row dropped as a transient "payload_error"; a worker process ran
    on until its parent killed it). Now each run stops: exit 130, its one line."""
    import os
    import random
    import signal
    import threading
    import time

    n = 48
    body = b"\xff\xd8\xff" + random.Random(0).randbytes(1 << 21)
    files = {f"{i}.jpg": Served(body, "image/jpeg") for i in range(n)}
    rng = random.Random(1)
    with LoopbackServer(files) as server:
        inp = tmp_path / "in.txt"
        inp.write_text("".join(server.url(f"{i}.jpg") + "\n" for i in range(n)))
        for k in range(6):
            asked = sum(server.hits.values())
            delay_s = rng.uniform(0.0, 0.15)

            def ctrl_c() -> None:  # once the downloads stream
                while sum(server.hits.values()) < asked + 8:
                    time.sleep(0.001)
                time.sleep(delay_s)
                os.kill(os.getpid(), signal.SIGINT)

            sender = threading.Thread(target=ctrl_c)
            sender.start()
            try:
                result = runner.invoke(app, ["run", str(inp), "-o", str(tmp_path / f"o{k}"), "--no-score", "--no-language",
                                             "--shard-size", str(n), "--workers", str(n), "--allow-private-networks",
                                             "--retries", "0", "--no-progress"])
            finally:
                sender.join()
            assert result.exit_code == 130, (k, delay_s, result.output)
            done = len(list((tmp_path / f"o{k}").glob("*_stats.json")))  # of the run's one shard
            assert result.output.strip().splitlines()[-1] == (f"interrupted: {done} of 1 shard "
                                                              f"{'is' if done == 1 else 'are'} finished and kept; rerun "
                                                              "the same command to resume"), (k, result.output)
