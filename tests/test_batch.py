import numpy as np
import polars as pl
import pytest

from fastlaion.batch import Batch, funnel, merge_funnels


def make(n=6):
    rows = pl.DataFrame({"row": list(range(n)), "url": [f"u{i}" for i in range(n)]})
    return Batch(rows, payload={"img": [f"img{i}" for i in range(n)], "arr": np.arange(n) * 10})


def test_drop_keeps_payloads_aligned_and_records_reasons():
    b = make()
    assert b.drop(np.array([False, True, False, False, True, False]), "download", "http_404") == 2
    assert b.rows["url"].to_list() == ["u0", "u2", "u3", "u5"]
    assert b.payload["img"] == ["img0", "img2", "img3", "img5"]
    assert b.payload["arr"].tolist() == [0, 20, 30, 50]
    reasons = [None, "not_an_image", None, "truncated"]
    assert b.drop(np.array([r is not None for r in reasons]), "decode", reasons) == 2
    assert b.rows["url"].to_list() == ["u0", "u3"]
    assert b.payload["img"] == ["img0", "img3"]
    out = b.outcome()
    assert out["row"].to_list() == list(range(6))
    assert out["status"].to_list() == ["kept", "dropped", "dropped", "kept", "dropped", "dropped"]
    assert out["reason"].to_list() == [None, "http_404", "not_an_image", None, "http_404", "truncated"]
    assert out["stage"].to_list() == [None, "download", "decode", None, "download", "decode"]


def test_drop_rejects_unknown_stage_missing_reason_and_bad_mask():
    b = make(3)
    with pytest.raises(ValueError, match="unknown stage"):
        b.drop(np.array([True, False, False]), "somewhere", "x")
    with pytest.raises(ValueError, match="without a reason"):
        b.drop(np.array([True, False, False]), "decode", [None, None, None])
    with pytest.raises(ValueError, match="mask"):
        b.drop(np.array([True]), "decode", "x")
    with pytest.raises(ValueError, match="payload"):
        b.set_payload("bad", [1])
    assert len(b) == 3


def test_funnel_levels_add_up_and_merge():
    b = make(10)
    b.drop(np.arange(10) < 3, "download", ["http_404", "timeout", "http_404"] + [None] * 7)
    b.drop(np.arange(7) == 0, "decode", "truncated")
    b.drop(np.arange(6) == 5, "filter", "low_similarity")
    f = funnel(b.outcome())
    assert f["input"] == 10
    assert (f["downloaded"], f["decoded"], f["scored"], f["kept"]) == (7, 6, 6, 5)
    assert f["drops"]["download"] == {"http_404": 2, "timeout": 1}
    assert f["drops"]["filter"] == {"low_similarity": 1}
    m = merge_funnels([f, f])
    assert m["input"] == 20 and m["kept"] == 10 and m["drops"]["download"]["http_404"] == 4
