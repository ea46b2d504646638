"""Semantic dedup (fastlaion/dataset/semantic.py): the exact walk and the clustered one, on
synthetic embedding runs whose near duplicates are planted; expected drops computed here with
float64 numpy from the same float16 vectors the files hold."""

from __future__ import annotations

import logging
import math
import shutil

import numpy as np
import pytest
from test_dataset_helpers import greedy_reference, load_json, run_cli_here
from test_dataset_table import invoke, write_run

THRESHOLD = 0.95
SHARD = 500


def make_embeddings(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit float16 vectors around 30 topics (cosine ~0.5 within a topic), a fifth of them near
    copies (cosine > 0.99) of an earlier original, so that several copies of one original repeat
    each other too."""
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(30, dim))
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    emb = np.empty((n, dim))
    originals: list[int] = []
    for i in range(n):
        if originals and rng.random() < 0.2:
            v = emb[originals[int(rng.integers(len(originals)))]] + rng.normal(
                scale=rng.choice([0.05, 0.1]) / math.sqrt(dim), size=dim)
        else:
            originals.append(i)
            v = topics[int(rng.integers(len(topics)))] + rng.normal(scale=1.0 / math.sqrt(dim), size=dim)
        emb[i] = v / np.linalg.norm(v)
    return emb.astype(np.float16)


def write_embedding_run(folder, emb: np.ndarray) -> list[str]:
    keys = [f"{i // SHARD:05d}{i % SHARD:04d}" for i in range(len(emb))]
    rows = [{"key": k, "url": f"https://h.example/{i}.jpg", "caption": f"c{i}", "status": "kept"}
            for i, k in enumerate(keys)]
    write_run(folder, rows, SHARD)
    for s in range(math.ceil(len(emb) / SHARD)):
        np.save(folder / f"{s:05d}_img_emb.npy", emb[s * SHARD:(s + 1) * SHARD])
    return keys


def unit64(emb: np.ndarray) -> np.ndarray:
    e = emb.astype(np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def embedding_case(folder, emb: np.ndarray, min_exact: int = 300):
    keys = write_embedding_run(folder, emb)
    cos = unit64(emb) @ unit64(emb).T
    assert np.abs(cos - THRESHOLD).min() > 1e-3  # nothing sits on the threshold
    index = {k: i for i, k in enumerate(keys)}
    exact = greedy_reference(keys, lambda a, b: cos[index[a], index[b]] >= THRESHOLD)
    assert len(exact) > min_exact
    return folder, keys, cos, exact


@pytest.fixture(scope="module")
def emb_run(tmp_path_factory):
    return embedding_case(tmp_path_factory.mktemp("semantic") / "run", make_embeddings(3000, 48, seed=3))


def make_ring(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit float16 vectors on a circle (a random plane of `dim` dimensions) at 50 points 7.2
    degrees apart, each within 1 degree of its point: samples 0-2 points apart have cosine
    0.96-1, 3 or more apart below 0.946, none near 0.95. No k-means boundary can avoid cutting
    through such pairs: about one in five straddles two of 8 clusters."""
    rng = np.random.default_rng(seed)
    plane = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T
    angles = np.radians(rng.integers(0, 50, n) * 7.2 + rng.uniform(-1, 1, n))
    emb = np.cos(angles)[:, None] * plane[0] + np.sin(angles)[:, None] * plane[1]
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory):
    return embedding_case(tmp_path_factory.mktemp("ring") / "run", make_ring(3000, 48, seed=4), min_exact=2000)


def dedup_rows(out):
    import polars as pl

    frame = pl.read_parquet(out / "metadata.parquet")
    return dict(zip(frame["key"], frame["duplicate_of"])), frame


@pytest.mark.parametrize("method, clusters", [("exact", 0), ("clusters", 1), ("auto", 0)])
def test_exact_and_one_cluster_give_the_all_pairs_walk(emb_run, tmp_path, method, clusters):
    folder, keys, _, exact = emb_run
    invoke(["dedup", "--by", "embedding", "--min-cosine", THRESHOLD, "--method", method, "--clusters", clusters,
            "--device", "cpu", "--from", folder, "-o", tmp_path, "--no-progress"])
    marks, frame = dedup_rows(tmp_path)
    assert {k: v for k, v in marks.items() if v is not None} == exact
    assert frame["key"].to_list() == keys
    assert (frame.filter(frame["duplicate_of"].is_not_null())["reason"] == "duplicate_embedding").all()
    info = load_json(tmp_path / "dataset.json")
    assert info["duplicates"] == len(exact) and info["kept"] == len(keys) - len(exact)
    assert info["settings"]["method"] == ("exact" if method == "auto" else method)  # 3,000 samples: auto is exact
    if method == "clusters":  # one cluster: no pair can straddle two
        assert info["settings"]["probe_pairs"] > 10 and info["settings"]["probe_pairs_split"] == 0
    assert not list(tmp_path.rglob("bucket-*")) and not (tmp_path / ".partial").exists()


@pytest.mark.parametrize("case, clusters", [("emb_run", 0), ("ring_run", 8)])
def test_clusters_drop_only_true_duplicates_and_find_most(request, tmp_path, case, clusters):
    """Default clusters (78 for 3,000 samples) on samples around topics: few pairs split. Eight on
    a ring of near duplicates: about a fifth split, and the probes must say so."""
    folder, keys, cos, exact = request.getfixturevalue(case)
    result = run_cli_here(["dedup", "--by", "embedding", "--min-cosine", str(THRESHOLD), "--method", "clusters",
                      "--clusters", str(clusters), "--device", "cpu", "--from", str(folder), "-o", str(tmp_path),
                      "--no-progress"])
    assert result.returncode == 0, result.stderr
    marks, _ = dedup_rows(tmp_path)
    index = {k: i for i, k in enumerate(keys)}
    drops = {k: v for k, v in marks.items() if v is not None}
    for dup, first in drops.items():
        assert first < dup and marks[first] is None                 # an earlier sample, itself kept
        assert cos[index[dup], index[first]] >= THRESHOLD            # truly that close
    kept = [k for k in keys if marks[k] is None]
    found = len(set(drops) & set(exact)) / len(exact)
    info = load_json(tmp_path / "dataset.json")
    st = info["settings"]
    assert (st["min_cosine"], st["method"], st["clusters"]) == (THRESHOLD, "clusters", clusters or 78)  # sqrt(6000)
    assert info["kept"] == len(kept)
    # the split estimate: 1,000 probes (at most a third) evenly spaced over the sample read for
    # k-means (64 a cluster, plus the probes), held out of the training
    sample = np.linspace(0, len(keys) - 1, min(len(keys), 64 * st["clusters"] + 1000)).astype(np.int64)
    probes = sample[np.linspace(0, len(sample) - 1, min(1000, len(sample) // 3)).astype(np.int64)]
    pairs = int((cos[:, probes] >= THRESHOLD).sum()) - len(probes)  # not a probe with itself
    assert st["probe_samples"] == len(probes) and st["probe_pairs"] == pairs > 100
    share = st["probe_pairs_split"] / pairs
    if clusters == 0:
        assert found > 0.97 and share < 0.03, (found, share)  # planted near copies: few split
    else:
        assert 0.1 < share < 0.35, share  # 8 boundaries across a ring of pairs up to 2 steps of 50 apart
        assert len(kept) > len(keys) - len(exact)  # those pairs never compared: more kept than exact keeps
    assert (f"{st['clusters']} k-means clusters (--method clusters): {100 * share:.1f}% of the {pairs:,} pairs above "
            "--min-cosine" in " ".join(result.stdout.split()))


def test_spilling_in_many_buckets_changes_nothing(emb_run, tmp_path, caplog):
    import polars as pl
    import torch

    from fastlaion.dataset import open_dataset
    from fastlaion.dataset.dedup import _candidates
    from fastlaion.dataset.semantic import EmbeddingReader, clustered_duplicates
    from fastlaion.dataset.source import NoProgress

    folder = emb_run[0]
    ds = open_dataset(folder)
    cand = _candidates(ds)
    assert isinstance(cand, pl.DataFrame)
    results = []
    for bucket_bytes in (1 << 30, 16 << 10):
        with caplog.at_level(logging.INFO, logger="fastlaion.dataset.semantic"):
            caplog.clear()
            dup, first, report = clustered_duplicates(EmbeddingReader(ds, cand), THRESHOLD, 256, torch.device("cpu"),
                                                      12, bucket_bytes, tmp_path / f"spill{bucket_bytes}", NoProgress())
            results.append((dup, first, report.clusters))
        assert not list((tmp_path / f"spill{bucket_bytes}").iterdir())  # every bucket file read and removed
        buckets = int(caplog.text.split(" spill buckets")[0].rsplit(" ", 1)[1])
        assert buckets == (1 if bucket_bytes == 1 << 30 else 12)  # 3,000 x 108 bytes / 16 KiB = 20, one cluster each
    (dup_a, first_a, k_a), (dup_b, first_b, k_b) = results
    assert k_a == k_b == 12 and len(dup_a) > 300
    np.testing.assert_array_equal(dup_a, dup_b)
    np.testing.assert_array_equal(first_a, first_b)


def test_a_missing_or_bad_embedding_file_counts_its_samples_and_the_rest_is_deduped(emb_run, tmp_path):
    folder, keys, cos, _ = emb_run
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    (run / "00002_img_emb.npy").unlink()
    np.save(run / "00004_img_emb.npy", np.zeros((SHARD, 7), np.float16))   # another width
    np.save(run / "00000_img_emb.npy", np.zeros((SHARD, 9), np.float16))   # another, in the first file read
    (run / "00005_img_emb.npy").write_bytes(b"")                          # a crash's leftover
    big = np.load(run / "00003_img_emb.npy").astype(np.float32) * 1e6      # another tool's float32, not unit:
    np.save(run / "00003_img_emb.npy", big)                                # still read (no overflow to inf)
    bad = {k for k in keys if k[:5] in ("00000", "00002", "00004", "00005")}
    index = {k: i for i, k in enumerate(keys)}
    rest = [k for k in keys if k not in bad]
    expected = greedy_reference(rest, lambda a, b: cos[index[a], index[b]] >= THRESHOLD)
    for method in ("exact", "clusters"):
        out = tmp_path / method
        result = run_cli_here(["dedup", "--by", "embedding", "--min-cosine", str(THRESHOLD), "--method", method,
                          *(["--clusters", "1"] if method == "clusters" else []),  # --method exact takes none
                          "--device", "cpu", "--from", str(run), "-o", str(out), "--no-progress"])
        assert result.returncode == 0, result.stderr
        assert f"{len(bad):,} kept samples had no readable image/embedding" in result.stdout
        assert all(f"0000{s}_img_emb.npy" in result.stderr for s in (0, 2, 4, 5)), result.stderr
        marks, _ = dedup_rows(out)
        assert {k: v for k, v in marks.items() if v is not None} == expected
        assert load_json(out / "dataset.json")["unreadable_samples"] == len(bad)


def test_bad_method_or_clusters_is_one_line(emb_run, tmp_path):
    folder = emb_run[0]
    for args, message in ((["--method", "approx"], "--method must be one of auto, exact, clusters"),
                          (["--clusters", "-1"], "--clusters")):
        result = run_cli_here(["dedup", "--by", "embedding", *args, "--from", str(folder), "-o", str(tmp_path / "o")])
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_clusters_with_auto_on_a_dataset_compared_exactly_says_it_is_not_used(tmp_path):
    """--clusters 10 with --method auto on 300 samples (auto: exact, every pair) was silently
    ignored. It says so in one warning line; with --method clusters it is used, without a word."""
    folder = tmp_path / "run"
    write_embedding_run(folder, make_embeddings(300, 16, seed=5))
    args = ["dedup", "--by", "embedding", "--device", "cpu", "--from", folder, "--no-progress"]
    result = run_cli_here([*args, "--clusters", 10, "-o", tmp_path / "auto"])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ("warning: --clusters 10 is not used: --method auto compared every pair of the 300 "
                             "samples exactly (it clusters past 100,000 on cpu); --method clusters uses it\n")
    assert load_json(tmp_path / "auto" / "dataset.json")["settings"]["method"] == "exact"
    for extra, method in ((["--method", "clusters", "--clusters", 10], "clusters"), ([], "exact")):
        quiet = run_cli_here([*args, *extra, "-o", tmp_path / method])
        assert (quiet.returncode, quiet.stderr) == (0, ""), quiet.stderr
        assert load_json(tmp_path / method / "dataset.json")["settings"]["method"] == method


def test_kmeans_and_assignment_against_numpy():
    import torch

    from fastlaion.dataset.semantic import default_clusters, nearest_centroid, spherical_kmeans

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    x = np.concatenate([c + rng.normal(scale=0.05, size=(40, 16)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    xt = torch.from_numpy(x.astype(np.float32))
    cent = spherical_kmeans(xt, 5, iterations=10, seed=1).numpy().astype(np.float64)
    assert np.allclose(np.linalg.norm(cent, axis=1), 1, atol=1e-5)
    assign = nearest_centroid(xt, torch.from_numpy(cent.astype(np.float32))).numpy()
    np.testing.assert_array_equal(assign, np.argmax(x @ cent.T, axis=1))
    for c in range(5):  # converged: each centroid is its members' normalised mean
        members = x[assign == c]
        if len(members):
            mean = members.sum(axis=0)
            assert np.allclose(cent[c], mean / np.linalg.norm(mean), atol=1e-4)
    assert len(set(assign.tolist())) == 5  # no centroid wasted
    # more clusters than distinct points: the empty ones restart on the worst-fitting samples
    few = torch.from_numpy(np.repeat(x[:3], 4, axis=0).astype(np.float32))
    cent_few = spherical_kmeans(few, 6, iterations=3, seed=0)
    assert cent_few.shape == (6, 16) and torch.isfinite(cent_few).all()
    assert len(set(nearest_centroid(few, cent_few).tolist())) == 3
    assert [default_clusters(n) for n in (1, 2, 3000, 10**6, 10**12)] == [2, 2, 78, 1415, 65536]


def test_rows_that_interleave_shards_are_walked_in_dataset_order(emb_run, tmp_path):
    """One Parquet file whose rows mix the run's shards (re-sorted by another tool, say): the
    walk follows the file's order, so a drop never names a later sample."""
    import polars as pl

    from fastlaion.dataset import open_dataset

    folder, keys, cos, _ = emb_run
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    frame = open_dataset(folder).scan().collect()
    order = np.random.default_rng(8).permutation(frame.height)
    frame[order].write_parquet(run / "mixed.parquet")
    mixed = [keys[i] for i in order]
    index = {k: i for i, k in enumerate(keys)}
    expected = greedy_reference(mixed, lambda a, b: cos[index[a], index[b]] >= THRESHOLD)
    position = {k: i for i, k in enumerate(mixed)}
    for method in ("exact", "clusters"):
        out = tmp_path / method
        invoke(["dedup", "--by", "embedding", "--min-cosine", THRESHOLD, "--method", method,
                *(["--clusters", 1] if method == "clusters" else []),  # --method exact takes none
                "--device", "cpu", "--from", run / "mixed.parquet", "-o", out, "--no-progress"])
        marks = dict(pl.read_parquet(out / "metadata.parquet").select("key", "duplicate_of").iter_rows())
        drops = {k: v for k, v in marks.items() if v is not None}
        assert drops == expected, method
        assert all(position[first] < position[dup] for dup, first in drops.items())


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU; torch sees none")
def test_both_methods_on_cuda(emb_run, tmp_path):
    """The walks on CUDA (float32 blocks; k-means assignment through the float16 topk_cosine
    kernel): exact equals the reference, clusters drops only true duplicates and finds most."""
    folder, keys, cos, exact = emb_run
    index = {k: i for i, k in enumerate(keys)}
    for method in ("exact", "clusters"):
        out = tmp_path / method
        invoke(["dedup", "--by", "embedding", "--min-cosine", THRESHOLD, "--method", method, "--device", "cuda",
                "--from", folder, "-o", out, "--no-progress"])
        marks, _ = dedup_rows(out)
        drops = {k: v for k, v in marks.items() if v is not None}
        if method == "exact":
            assert drops == exact
        else:
            assert all(first < dup and marks[first] is None and cos[index[dup], index[first]] >= THRESHOLD
                       for dup, first in drops.items())
            assert len(set(drops) & set(exact)) > 0.97 * len(exact)


@pytest.fixture(params=["compiled", "numpy"])
def f16_path(request, monkeypatch, tmp_path_factory):
    """fastlaion.f16_native built (or found) in this session's cache, or switched off (numpy)."""
    from fastlaion import f16_native

    monkeypatch.setenv("FASTLAION_KERNEL_CACHE", str(tmp_path_factory.getbasetemp() / "f16-cache"))
    monkeypatch.setenv("FASTLAION_NATIVE", "1" if request.param == "compiled" else "0")
    f16_native._reset()
    if request.param == "compiled":
        assert f16_native.library() is not None  # the dev box and CI have a C compiler
    yield request.param
    f16_native._reset()


def _cpu_has_f16c() -> bool:
    import platform
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    return platform.machine() == "x86_64" and cpuinfo.exists() and " f16c" in cpuinfo.read_text()


EVERY_F16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16)  # every float16: zeros, subnormals, infs, NaNs


def test_finite_rows_agrees_with_isfinite_on_every_float16(f16_path):
    """The exponent-bits check that replaced np.isfinite on the embeddings, on all 65,536 float16
    values, alone and with one of them in an otherwise finite row."""
    from fastlaion.dataset.semantic import finite_rows

    np.testing.assert_array_equal(finite_rows(EVERY_F16[:, None]), np.isfinite(EVERY_F16))
    rows = np.ones((EVERY_F16.size, 13), np.float16)
    rows[:, 11] = EVERY_F16
    np.testing.assert_array_equal(finite_rows(rows), np.isfinite(EVERY_F16))
    assert (~finite_rows(rows)).sum() == 2048  # exponent all ones: 2 infs and 2,046 NaNs


@pytest.mark.parametrize("f16_path, simd", [("compiled", True), ("compiled", False), ("numpy", True)],
                         indirect=["f16_path"], ids=["f16c", "portable-c", "numpy"])
def test_float32_rows_gives_numpys_values_for_every_float16(f16_path, simd):
    """float32_rows (f16_native.c: F16C and the portable C, or numpy) against numpy's astype on all
    65,536 float16 values, bit for bit (NaNs as NaNs), in rows whose width is no multiple of 8; the
    squared lengths against float64 sums, inf or NaN exactly for the rows that hold one."""
    from fastlaion import f16_native
    from fastlaion.dataset.semantic import float32_rows

    if simd and f16_path == "compiled" and _cpu_has_f16c():
        assert f16_native.simd()  # on such a CPU (the dev box, CI) the F16C path is the one tested here
    perm = np.random.default_rng(0).permutation(EVERY_F16)
    mixed = perm[:perm.size // 13 * 13].reshape(-1, 13)  # 5,041 rows of 13: a tail past the 8s
    lane = np.full((EVERY_F16.size, 13), 0.5, np.float16)
    lane[:, 0] = lane[:, 12] = EVERY_F16  # each value in an 8-wide lane and in the scalar tail
    rows = np.concatenate([mixed, lane])
    x32, norm2 = f16_native.rows(rows, simd=simd) if f16_path == "compiled" else float32_rows(rows)
    want = rows.astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(x32), nan)
    np.testing.assert_array_equal(x32.view(np.uint32)[~nan], want.view(np.uint32)[~nan])  # -0.0 too
    with np.errstate(invalid="ignore"):  # numpy warns casting a signalling NaN
        ref = (want.astype(np.float64) ** 2).sum(axis=1)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(norm2), finite)
    np.testing.assert_allclose(norm2[finite], ref[finite], rtol=1e-5)
    assert (~finite).sum() == 2048 + (~np.isfinite(mixed)).any(axis=1).sum()


def test_embedding_reader_groups_by_shard_in_first_appearance_order(emb_run):
    """EmbeddingReader's per-shard groups, on a real run's kept samples in another order (a
    subset's rows can interleave shards): each shard once, in order of first appearance, with its
    candidates' positions in dataset order and their rows (the key's number after the shard's),
    -1 for a key that has none; against a plain Python grouping."""
    import polars as pl

    from fastlaion.dataset import open_dataset
    from fastlaion.dataset.semantic import EmbeddingReader
    from fastlaion.dataset.source import KEPT, collect

    ds = open_dataset(emb_run[0])
    cand = collect(ds.scan().filter(pl.col("status") == KEPT).select("key", "shard"))
    cand = cand[np.random.default_rng(1).permutation(cand.height)]
    keys, shards = cand["key"].to_list(), cand["shard"].to_list()
    keys[17] = shards[17] + "x"  # not a number: no row
    cand = cand.with_columns(pl.Series("key", keys))
    want: dict[str, tuple[list[int], list[int]]] = {}
    for pos, (key, shard) in enumerate(zip(keys, shards)):
        got = want.setdefault(shard, ([], []))
        got[0].append(pos)
        got[1].append(int(key[len(shard):]) if key[len(shard):].isdigit() else -1)
    assert len(want) > 2
    reader = EmbeddingReader(ds, cand)
    assert [s for s, _, _ in reader.per_shard] == list(want)
    for shard, pos, row in reader.per_shard:
        assert pos.tolist() == want[shard][0] and row.tolist() == want[shard][1]
