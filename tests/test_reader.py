import json

import polars as pl
import pytest

from fastlaion.config import ConfigError, InputConfig, InputFormat
from fastlaion.reader import read_inputs, shards

URLS = ["http://127.0.0.1:1/a.jpg", "http://127.0.0.1:1/b.jpg", "", "http://127.0.0.1:1/c.jpg"]
CAPS = ["a cat", "a dog", "nothing", "a bird"]


def write_all(tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(u or "   " for u in URLS) + "\n\n")
    pl.DataFrame({"link": URLS, "alt": CAPS}).write_csv(tmp_path / "in.csv")
    pl.DataFrame({"link": URLS, "alt": CAPS}).write_csv(tmp_path / "in.tsv", separator="\t")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"link": u, "alt": c, "n": 1}) + "\n" for u, c in zip(URLS, CAPS)))
    pl.DataFrame({"link": URLS, "alt": CAPS, "extra": [1, 2, 3, 4]}).write_parquet(tmp_path / "in.parquet")


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl", "parquet"])
def test_tabular_inputs_read_alike(tmp_path, ext):
    write_all(tmp_path)
    t = read_inputs(InputConfig(paths=(str(tmp_path / f"in.{ext}"),), url_col="link", caption_col="alt"), True)
    assert t["url"].to_list() == [u or None for u in URLS] or t["url"].to_list() == URLS
    assert t["caption"].to_list() == CAPS


def test_txt_input_has_urls_only_and_needs_no_score(tmp_path):
    write_all(tmp_path)
    cfg = InputConfig(paths=(str(tmp_path / "in.txt"),))
    t = read_inputs(cfg, need_captions=False)
    assert t["url"].to_list() == [u for u in URLS if u]  # blank lines are not rows
    assert t["caption"].null_count() == t.height
    with pytest.raises(ConfigError, match="--no-score"):
        read_inputs(cfg, need_captions=True)


def test_several_inputs_concatenate_in_order_and_shard(tmp_path):
    write_all(tmp_path)
    cfg = InputConfig(paths=(str(tmp_path / "in.csv"), str(tmp_path / "in.parquet")), url_col="link",
                      caption_col="alt", shard_size=3)
    t = read_inputs(cfg, True)
    assert t.height == 8
    parts = list(shards(t, 3))
    assert [s for s, _ in parts] == [0, 1, 2]
    assert [p.height for _, p in parts] == [3, 3, 2]
    assert parts[2][1]["row"].to_list() == [0, 1]
    assert pl.concat([p.drop("row") for _, p in parts]).equals(t)


def test_bad_inputs_name_the_problem(tmp_path):
    write_all(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        read_inputs(InputConfig(paths=(str(tmp_path / "missing.csv"),)), True)
    with pytest.raises(ConfigError, match="no URL column 'url'.*link"):
        read_inputs(InputConfig(paths=(str(tmp_path / "in.csv"),), caption_col="alt"), True)
    with pytest.raises(ConfigError, match="no caption column 'caption'"):
        read_inputs(InputConfig(paths=(str(tmp_path / "in.csv"),), url_col="link"), True)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(ConfigError, match="bad.parquet: cannot read as parquet"):
        read_inputs(InputConfig(paths=(str(bad),)), True)
    odd = tmp_path / "list.xyz"
    odd.write_text("x")
    with pytest.raises(ConfigError, match="--input-format"):
        read_inputs(InputConfig(paths=(str(odd),)), True)
    t = read_inputs(InputConfig(paths=(str(odd),), input_format=InputFormat.txt), False)
    assert t["url"].to_list() == ["x"]


def test_captions_cleaned_and_counted(tmp_path):
    caps = ["fine", "bell\x07 and\x00 null", "x" * 100_000, "tab\tand\nnewline"]
    pl.DataFrame({"url": ["http://127.0.0.1:1/"] * 4, "caption": caps}).write_parquet(tmp_path / "c.parquet")
    t = read_inputs(InputConfig(paths=(str(tmp_path / "c.parquet"),), max_caption_chars=2000), True)
    assert t["caption"].to_list()[:2] == ["fine", "bell and null"]
    assert t["caption"][2] == "x" * 2000
    assert t["caption"][3] == "tab and newline"
    assert t["caption_edit"].to_list() == [None, "control_chars", "truncated", None]
