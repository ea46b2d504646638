"""`fastlaion index` and search through it (fastlaion/dataset/index.py): with every cell read the
index gives the exact search's answer; with the default share of cells it finds nearly all of it
on clustered embeddings; a dataset changed since the build is searched exactly, with a warning;
bad input is one line. Expected answers are computed here with float64 numpy from the files."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from test_dataset_table import check_a_rerun_keeps_what_a_failed_undo_put_aside, invoke
from test_semantic import make_embeddings, unit64, write_embedding_run

pytest.importorskip("faiss")

N, DIM, K = 4000, 32, 10


def make_case(folder, n, dim, seed, query_seed):
    """A run of n clustered embeddings, 12 query files (samples plus noise) beside it, each
    query's exact top K keys (float64), and the (queries, samples) cosines."""
    emb = make_embeddings(n, dim, seed=seed)
    keys = write_embedding_run(folder, emb)
    rng = np.random.default_rng(query_seed)
    queries = unit64(emb[rng.choice(n, 12, replace=False)].astype(np.float64)
                     + rng.normal(scale=0.3 / math.sqrt(dim), size=(12, dim)))
    qfiles = []
    for i, q in enumerate(queries):
        np.save(path := folder.parent / f"q{i}.npy", q.astype(np.float32))
        qfiles.append(path)
    sims = queries @ unit64(emb).T
    exact = [[keys[j] for j in np.argsort(-row, kind="stable")[:K]] for row in sims]
    return keys, qfiles, exact, sims


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("index") / "run"
    keys, qfiles, exact, _ = make_case(folder, N, DIM, seed=11, query_seed=5)
    return folder, keys, qfiles, exact


def search_json(folder, qfiles, tmp_path, *options):
    out = tmp_path / f"hits{len(list(tmp_path.iterdir()))}.json"
    args = ["search", folder, "-k", K, "--json", out, "--no-progress", *options]
    for q in qfiles:
        args += ["--vector", q]
    result = invoke(args)
    return json.loads(out.read_text()), result.output


def keys_of(found):
    return [[h["key"] for h in r["hits"]] for r in found["results"]]


def test_every_cell_read_is_the_exact_answer_and_the_default_finds_nearly_all(case, tmp_path):
    folder, _, qfiles, exact = case
    built = invoke(["index", folder, "--no-progress"]).output
    cells = json.loads((folder / "index" / "index.json").read_text())["cells"]
    # 4 sqrt(n) cells, but no fewer than 64 training samples a cell
    assert f"{N:,} kept samples in {cells:,} cells" in built and cells == min(int(4 * math.sqrt(N)), N // 64)
    assert (folder / "index" / "image.faiss").stat().st_size > N * DIM * 2  # float16, every sample
    everything, out = search_json(folder, qfiles, tmp_path, "--probes", cells)
    assert f"(index: {cells:,} of {cells:,} cells read)" in out
    assert keys_of(everything) == exact
    default, out = search_json(folder, qfiles, tmp_path)
    probes = math.ceil(cells / 16)
    assert f"(index: {probes} of {cells:,} cells read)" in out and default["index"] == {"cells": cells, "probes": probes}
    found = sum(len(set(a) & set(b)) for a, b in zip(keys_of(default), exact))
    assert found / (K * len(exact)) >= 0.9, found
    assert found < K * len(exact) or probes == cells  # reading a sixteenth of the cells is not the exact scan
    # the similarities it reports are the cosines of the samples it names
    emb = {}
    for s in range(math.ceil(N / 500)):
        emb.update({f"{s:05d}{i:04d}": v for i, v in enumerate(unit64(np.load(folder / f"{s:05d}_img_emb.npy")))})
    q0 = np.load(qfiles[0]).astype(np.float64)
    for hit in default["results"][0]["hits"]:
        assert abs(hit["similarity"] - float(emb[hit["key"]] @ q0 / np.linalg.norm(q0))) < 2e-3
    plain, out = search_json(folder, qfiles, tmp_path, "--exact")
    assert "cells read" not in out and plain["index"] is None and keys_of(plain) == exact


def test_a_dataset_changed_since_the_build_is_searched_exactly(case, tmp_path):
    folder, _, qfiles, exact = case
    invoke(["index", folder, "--no-progress"])
    emb_file = folder / "00003_img_emb.npy"
    stat = emb_file.stat()
    os.utime(emb_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten since
    try:
        found, out = search_json(folder, qfiles, tmp_path)
        assert "cells read" not in out and found["index"] is None and keys_of(found) == exact
        assert "changed since" in out and "fastlaion index" in out
    finally:
        os.utime(emb_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again, out = search_json(folder, qfiles, tmp_path)  # the same files again: the index answers
    assert "cells read" in out


def test_a_crash_between_the_index_and_its_description_leaves_no_index_in_use(case, tmp_path):
    """index.json is removed before image.faiss is replaced and written after it: without it the
    folder's index is never used, and --probes says there is none."""
    folder, _, qfiles, exact = case
    invoke(["index", folder, "--no-progress"])
    meta = folder / "index" / "index.json"
    saved = meta.read_text()
    meta.unlink()
    try:
        found, out = search_json(folder, qfiles, tmp_path)
        assert "cells read" not in out and keys_of(found) == exact
        result = invoke(["search", folder, "--vector", qfiles[0], "--probes", 4], code=2)
        assert "has no index" in result.output and "fastlaion index" in result.output
    finally:
        meta.write_text(saved)


def test_bad_input_is_one_line(case, tmp_path, monkeypatch):
    folder, _, qfiles, _ = case
    for args, says in ((["index", folder, "--cells", -1], "--cells must be"),
                       (["index", folder, "--cells", N + 1], "more than the"),
                       (["index", tmp_path / "nothing"], "no such file"),
                       # OpenMP's int: an OverflowError traceback
                       (["index", folder, "--threads", 10**12], "--threads must be between 0 (every core) and 4096"),
                       (["search", folder, "--vector", qfiles[0], "--exact", "--probes", 3], "give one of them")):
        result = invoke(args, code=2)
        assert says in result.output and "Traceback" not in result.output, result.output
    no_emb = tmp_path / "noemb"
    no_emb.mkdir()
    for f in [*folder.glob("*.parquet"), *folder.glob("*_stats.json")]:
        (no_emb / f.name).write_bytes(f.read_bytes())
    result = invoke(["index", no_emb], code=2)
    assert "index needs image embeddings" in result.output, result.output  # it said "search needs"
    monkeypatch.setitem(sys.modules, "faiss", None)  # not installed
    result = invoke(["index", folder], code=2)
    assert "pip install faiss-cpu" in result.output and "Traceback" not in result.output


def test_a_moved_dataset_keeps_its_index_and_k_past_the_samples_is_all_of_them(case, tmp_path):
    """The index records its files relative to itself: a dataset copied whole with its times
    (cp -p) keeps it. A -k beyond the samples gives every sample, not k slots a query."""
    import shutil

    folder, keys, qfiles, exact = case
    invoke(["index", folder, "--no-progress"])
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(folder, moved)  # copy2: sizes and modification times kept
    cells = json.loads((moved / "index" / "index.json").read_text())["cells"]
    found, out = search_json(moved, qfiles[:1], tmp_path, "--probes", cells)
    assert "cells read" in out and keys_of(found)[0] == exact[0]
    out_file = tmp_path / "all.json"
    invoke(["search", moved, "--vector", qfiles[0], "-k", 10**12, "--probes", cells, "--json", out_file,
            "--no-progress"])
    hits = json.loads(out_file.read_text())["results"][0]["hits"]
    assert sorted(h["key"] for h in hits) == sorted(keys)
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True) and max(sims) <= 1.0


def test_files_that_change_during_the_build_replace_nothing(case, tmp_path):
    """A run still writing while the index is built: the files are compared before and after,
    and a change leaves the earlier index in place."""
    from fastlaion.dataset import open_dataset
    from fastlaion.dataset.index import IndexConfig, build_index
    from fastlaion.dataset.source import DatasetError, NoProgress

    folder, _, qfiles, _ = case
    invoke(["index", folder, "--no-progress"])
    before = (folder / "index" / "index.json").read_text()
    emb_file = folder / "00002_img_emb.npy"
    stat = emb_file.stat()

    class Rewriting(NoProgress):
        def start(self, what, total):
            if what == "index: adding":  # a shard rewritten while the build reads the others
                os.utime(emb_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    try:
        with pytest.raises(DatasetError, match="changed while the index was built"):
            build_index(open_dataset(folder), IndexConfig(), Rewriting())
        assert (folder / "index" / "index.json").read_text() == before
    finally:
        os.utime(emb_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    found, out = search_json(folder, qfiles[:1], tmp_path)
    assert "cells read" in out


def test_an_index_that_cannot_be_written_is_one_line_and_the_old_one_stays(case, tmp_path, monkeypatch):
    """A file of the new index that cannot be written (image.faiss: faiss's own write fails on a
    real limit on file sizes; index.json: ENOSPC injected): the earlier index stays as it was,
    byte for byte, nothing is left aside, and search uses it. The description's failure was a
    bare disk error, after the new image.faiss had replaced the earlier one's (no index), with an
    index.json.partial left beside it."""
    import errno
    import pathlib
    import resource
    import signal

    folder, _, qfiles, _ = case
    index = folder / "index"
    invoke(["index", folder, "--cells", 8, "--no-progress"])
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    assert sorted(before) == ["image.faiss", "index.json"]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))
    try:
        result = invoke(["index", folder, "--no-progress"], code=1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, xfsz)
    assert re.fullmatch(rf"error: cannot write {re.escape(str(index / '.partial' / 'image.faiss'))} \(.*File too "
                        r"large\)\); the earlier index, if any, is as it was\n", result.stderr), result.stderr
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before
    write_text = pathlib.Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name.startswith("index.json"):  # index.json.partial too, where it was written aside
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "write_text", full_disk)
        result = invoke(["index", folder, "--no-progress"], code=1)
    assert result.stderr == (f"error: cannot write {index / '.partial' / 'index.json'} (No space left on device); "
                             "the earlier index, if any, is as it was\n")
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before
    found, out = search_json(folder, qfiles[:1], tmp_path)
    assert "(index: 1 of 8 cells read)" in out  # the earlier index, still whole and described


@pytest.mark.parametrize("earlier, fails_at, undo_fails", [
    (True, 1, False),   # index.json moved aside
    (True, 2, False),   # image.faiss moved aside
    (True, 3, False),   # the new image.faiss put in place
    (True, 4, False),   # the new index.json put in place
    (False, 1, False),  # into a new folder
    (False, 2, False),
    (True, 2, True),    # and every rename after fails too: nothing undone
    (True, 3, True),
    (True, 4, True),
    (False, 2, True),
])
def test_a_disk_error_while_the_index_is_put_in_place_is_undone_or_says_what_is_where(
        case, tmp_path, monkeypatch, earlier, fails_at, undo_fails):
    """A rename that fails while the new index replaces the earlier one (a full disk: a real
    OSError, injected at one os.replace). index put its files in place with renames of its own:
    a failure at index.json's left the new image.faiss without a description, or beside the
    earlier one's, said only "No space left on device", and left index.json.partial. Now the
    renames made are undone and the folder is as it was, byte for byte, and search uses the
    earlier index; where undoing fails too, the one line says what is where and the disk matches
    it, and search uses no index (index.json is never beside another build's image.faiss) until
    the index is rebuilt."""
    import errno
    import shutil

    from fastlaion.dataset import output

    folder, _, qfiles, exact = case
    index = folder / "index"
    shutil.rmtree(index, ignore_errors=True)
    if earlier:
        invoke(["index", folder, "--cells", 8, "--no-progress"])
    before = {p.name: p.read_bytes() for p in index.iterdir()} if earlier else None
    real_replace = os.replace
    calls = []

    def replace(src, dst, *args, **kwargs):
        calls.append((src, dst))
        if len(calls) == fails_at or (undo_fails and len(calls) > fails_at):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(output.os, "replace", replace)
        result = invoke(["index", folder, "--no-progress"], 1)
    partial, aside = index / output.PARTIAL_DIR, index / output.EARLIER_DIR
    moves = [(index / "index.json", aside / "index.json"), (index / "image.faiss", aside / "image.faiss")] * earlier \
        + [(partial / "image.faiss", index / "image.faiss"), (partial / "index.json", index / "index.json")]
    assert [(Path(s), Path(d)) for s, d in calls[:fails_at]] == moves[:fails_at]
    failed = f"error: {index}: could not put the new index in place (No space left on device: {moves[fails_at - 1][0]})"
    if not undo_fails:
        from test_dataset_helpers import check_commit_undone

        check_commit_undone(result.stderr, failed, index, before, "index")
        if earlier:
            _, out = search_json(folder, qfiles[:1], tmp_path)
            assert "of 8 cells read" in out
        return
    undo = {(True, 2): aside / "index.json", (True, 3): aside / "image.faiss"}.get((earlier, fails_at),
                                                                                index / "image.faiss")
    holds = {(True, 2): "it holds 1 file (image.faiss) of the earlier one; the new index's 2 files (image.faiss, "
                        f"index.json) in {partial}; the earlier index's 1 file (index.json) in {aside}",
             (True, 3): f"it holds no file of either index; the new index's 2 files (image.faiss, index.json) in "
                        f"{partial}; the earlier index's 2 files (image.faiss, index.json) in {aside}",
             (True, 4): f"it holds 1 file (image.faiss) of the new index; the new index's other 1 file (index.json) "
                        f"in {partial}; the earlier index's 2 files (image.faiss, index.json) in {aside}",
             (False, 2): f"it holds 1 file (image.faiss) of the new index; the new index's other 1 file "
                         f"(index.json) in {partial}"}[(earlier, fails_at)]
    assert result.stderr == (f"{failed}, nor undo it (No space left on device: {undo}): {holds}; search compares "
                             f"every embedding until `fastlaion index {folder}` is rerun\n")
    in_folder = {(True, 2): [".earlier", ".partial", "image.faiss"], (True, 3): [".earlier", ".partial"]}.get(
        (earlier, fails_at), [".earlier", ".partial", "image.faiss"] if earlier else [".partial", "image.faiss"])
    assert sorted(p.name for p in index.iterdir()) == in_folder
    new_faiss_in = fails_at > 2 * earlier + 1  # the new image.faiss was put in place
    assert sorted(p.name for p in partial.iterdir()) == ["index.json"] if new_faiss_in else ["image.faiss", "index.json"]
    if earlier:
        assert {p.name: p.read_bytes() for p in aside.iterdir()} == \
            {n: b for n, b in before.items() if n == "index.json" or fails_at > 2}
    if fails_at == 2 and earlier:
        assert (index / "image.faiss").read_bytes() == before["image.faiss"]
    new_meta = json.loads((partial / "index.json").read_text())
    assert new_meta["cells"] == min(int(4 * math.sqrt(N)), N // 64)  # the new index's description
    found, out = search_json(folder, qfiles, tmp_path)  # no index.json in the folder: the exact search
    assert "cells read" not in out and found["index"] is None and keys_of(found) == exact
    if earlier:  # refused while .earlier/ holds the earlier index's files; once moved away, the rerun runs
        check_a_rerun_keeps_what_a_failed_undo_put_aside(index, ["index", folder, "--no-progress"], "index",
                                                         tmp_path / "kept")
        assert {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()} == \
            {n: b for n, b in before.items() if n == "index.json" or fails_at > 2}
    else:
        invoke(["index", folder, "--no-progress"])  # no earlier index aside: the rerun runs
    assert sorted(p.name for p in index.iterdir()) == ["image.faiss", "index.json"]  # a whole index in place
    _, out = search_json(folder, qfiles[:1], tmp_path)
    assert f"of {new_meta['cells']:,} cells read" in out


def test_ctrl_c_says_whether_the_index_was_written(case, tmp_path, monkeypatch):
    """A real Ctrl-C (SIGINT to this process) at each step of `fastlaion index`: before the new
    index is in place, the earlier one stays and the command says so; between image.faiss and
    index.json the step finishes first (it used to leave no index); once the index is in place,
    and while the closing line prints (where the command ended with 130 and not a word), it says
    that the index was written."""
    from test_dataset_helpers import ctrl_c, ctrl_c_after

    from fastlaion import cli_dataset
    from fastlaion.dataset import index as index_module

    folder, _, qfiles, _ = case
    meta = folder / "index" / "index.json"
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("image.faiss"):  # the new index file in place, its index.json not yet
            ctrl_c()

    written = f"interrupted: the index was written, whole, to {folder / 'index'}; search uses it"
    for target, name, wrap, says in (
            (index_module, "import_faiss", ctrl_c_after, "interrupted: the index was not replaced; rerun the command"),
            (index_module.os, "replace", lambda _: replace, written),
            (index_module, "default_probes", ctrl_c_after, written),
            (cli_dataset, "_say", ctrl_c_after, written)):
        invoke(["index", folder, "--cells", 8, "--no-progress"])  # the earlier index: 8 cells
        with monkeypatch.context() as m:
            m.setattr(target, name, wrap(getattr(target, name)))
            result = invoke(["index", folder, "--no-progress"], code=130)
        assert result.stderr.strip() == says, (name, result.stderr)
        cells = json.loads(meta.read_text())["cells"]
        assert cells == (8 if says != written else min(int(4 * math.sqrt(N)), N // 64)), name
        _, out = search_json(folder, qfiles[:1], tmp_path)
        assert f"of {cells:,} cells read" in out, name
    assert sorted(p.name for p in (folder / "index").iterdir()) == ["image.faiss", "index.json"]  # nothing aside


@pytest.fixture(scope="module")
def pq_case(tmp_path_factory):
    """Enough samples for the codebooks (39 x 256), 32 dimensions in 8 parts of 4."""
    n, dim = 12_000, 32
    folder = tmp_path_factory.mktemp("pq") / "run"
    keys, qfiles, exact, sims = make_case(folder, n, dim, seed=12, query_seed=6)
    cosine = {keys[j]: sims[:, j] for j in range(n)}
    return folder, qfiles, exact, cosine, n, dim


def test_pq_codes_take_a_fraction_of_the_space_and_search_reports_exact_cosines(pq_case, tmp_path, monkeypatch):
    """--pq 8: 8 bytes of codes a sample instead of 64 of float16. Their cosines are approximate
    (off by 0.03 on average here), so search ranks its best candidates again by their stored
    embeddings: what it reports are the exact cosines, and with every cell read it finds what the
    exact search finds."""
    folder, qfiles, exact, cosine, n, dim = pq_case
    built = invoke(["index", folder, "--pq", 8, "--no-progress"]).output
    meta = json.loads((folder / "index" / "index.json").read_text())
    assert meta["kind"] == "ivf-pq-v2" and meta["pq"] == 8 and meta["samples"] == n
    assert f"{n:,} kept samples in {meta['cells']:,} cells ({dim} dimensions, 8-byte codes a sample" in built
    # each sample: 8 bytes of codes and its 8-byte id, against 64 + 8 as float16
    assert (folder / "index" / "image.faiss").stat().st_size < n * (2 * dim + 8) / 3
    everything, out = search_json(folder, qfiles, tmp_path, "--probes", meta["cells"])
    assert (f"(index: {meta['cells']:,} of {meta['cells']:,} cells read, the best 1,000 by the 8-byte codes "
            "ranked again)") in out
    assert everything["index"] == {"cells": meta["cells"], "probes": meta["cells"], "pq": 8, "reranked": 1000}
    found = sum(len(set(a) & set(b)) for a, b in zip(keys_of(everything), exact))
    assert found / (K * len(exact)) >= 0.98, found
    # queries ranked again in groups (here one at a time) find the same
    monkeypatch.setattr("fastlaion.dataset.index.RERANK_BYTES", 1)
    grouped, _ = search_json(folder, qfiles, tmp_path, "--probes", meta["cells"])
    assert grouped["results"] == everything["results"]
    monkeypatch.undo()
    for q, result in enumerate(everything["results"]):
        for hit in result["hits"]:  # the stored embedding's cosine (float16), not the codes'
            assert abs(hit["similarity"] - cosine[hit["key"]][q]) < 1e-5, hit
        sims = [h["similarity"] for h in result["hits"]]
        assert sims == sorted(sims, reverse=True) and len(sims) == K
    default, out = search_json(folder, qfiles, tmp_path)
    found = sum(len(set(a) & set(b)) for a, b in zip(keys_of(default), exact))
    assert found / (K * len(exact)) >= 0.9, found
    # --rerank: fewer candidates ranked again find less of the exact answer, never more
    few, out = search_json(folder, qfiles, tmp_path, "--probes", meta["cells"], "--rerank", K)
    assert "the best 10 by the 8-byte codes ranked again" in out and few["index"]["reranked"] == K
    fewer = sum(len(set(a) & set(b)) for a, b in zip(keys_of(few), exact))
    assert fewer < found_all(everything, exact), fewer


def found_all(result, exact):
    return sum(len(set(a) & set(b)) for a, b in zip(keys_of(result), exact))


def test_bad_pq_is_one_line(case, pq_case):
    folder = pq_case[0]
    for args, message in (
            (["--pq", 7], "error: --pq 7: the embeddings' 32 dimensions do not split into 7 equal parts; use one of "
                          "8, 16, 32"),
            (["--pq", 64], "error: --pq 64: the embeddings' 32 dimensions do not split into 64 equal parts"),
            (["--pq", -1], "error: --pq must be 0 (float16 vectors) or a number of bytes a sample, got -1")):
        result = invoke(["index", folder, *args, "--no-progress"], code=2)
        assert result.output.strip().splitlines()[0].startswith(message), result.output
    for args, message in ((["--rerank", -1], "error: --rerank must be 0 (the default) or more, got -1"),
                          (["--rerank", 5, "--exact"], "error: --rerank is for the index; --exact searches every "
                                                       "embedding: give one of them")):
        result = invoke(["search", folder, "--vector", pq_case[1][0], *args, "--no-progress"], code=2)
        assert result.output.strip() == message, result.output
    small = invoke(["index", case[0], "--pq", 8, "--no-progress"], code=2)
    assert small.output.strip() == (f"error: --pq needs 9,984 or more samples with embeddings to learn its codes, "
                                    f"this dataset has {N:,}: leave --pq out (float16 vectors, {2 * DIM} bytes a "
                                    "sample)")


def test_search_through_the_index_reads_only_its_hits_shards(tmp_path, monkeypatch):
    """Ids say where each embedding is (shard, row): a search through the index never lists the
    whole dataset's kept samples (what the exact search reads), and finds the hits' rows in their
    shards only, also in a Parquet whose rows interleave shards (read by its shard column). An
    index from before the ids were rows is searched exactly, with a warning."""
    from fastlaion.dataset import open_dataset

    folder = tmp_path / "run"
    emb = make_embeddings(2000, 16, seed=21)
    keys = write_embedding_run(folder, emb)
    frame = open_dataset(folder).scan().collect()
    order = np.random.default_rng(3).permutation(frame.height)
    mixed = folder / "mixed.parquet"
    frame[order].write_parquet(mixed)
    queries = []
    for i in range(4):
        np.save(path := tmp_path / f"q{i}.npy", emb[i * 400].astype(np.float32) + 0.05)
        queries.append(path)
    for source, index_folder in ((folder, folder / "index"), (mixed, folder / "mixed.parquet.index")):
        exact, _ = search_json(source, queries, tmp_path, "--exact")
        invoke(["index", source, "--no-progress"])
        meta = json.loads((index_folder / "index.json").read_text())
        assert sorted(meta["shards"]) == [f"{s:05d}" for s in range(len(keys) // 500)]
        with monkeypatch.context() as m:
            m.setattr("fastlaion.dataset.search.kept_reader", lambda ds: pytest.fail("read every kept sample"))
            found, out = search_json(source, queries, tmp_path, "--probes", meta["cells"])
        assert "cells read" in out, source
        for got, want in zip(found["results"], exact["results"]):
            # the same hits and rows, the cosines to float16's precision (the index stores the
            # vectors made unit length again); ties (near copies) may be in another order: the
            # index gives them to the lower (shard, row), the exact search to the earlier row of
            # the file, which differ where rows interleave shards
            assert np.allclose([h["similarity"] for h in got["hits"]], [h["similarity"] for h in want["hits"]],
                               atol=1e-4, rtol=0)
            assert sorted((h["key"], h["url"], h["caption"]) for h in got["hits"]) == \
                sorted((h["key"], h["url"], h["caption"]) for h in want["hits"])
        if source == folder:
            assert keys_of(found) == keys_of(exact)
    # an index of session 10's kind (its ids were positions): not used, and said so
    meta_path = folder / "index" / "index.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "kind": "ivf-flat-fp16"}))
    found, out = search_json(folder, queries, tmp_path)
    assert found["index"] is None and "built by an earlier fastlaion" in " ".join(out.split())
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "kind": "ivf-hnsw-v9", "fastlaion": "9.0"}))
    found, out = search_json(folder, queries, tmp_path)
    assert found["index"] is None and "built by fastlaion 9.0, whose index this one cannot read" in " ".join(out.split())
    # --rerank and --probes need an index
    (folder / "index" / "index.json").unlink()
    for option in ("--rerank", "--probes"):
        result = invoke(["search", folder, "--vector", queries[0], option, 5, "--no-progress"], code=2)
        assert result.output.strip() == f"error: {option}: {folder} has no index; `fastlaion index {folder}` builds one"


def test_scan_shards_reads_those_shards_rows_in_dataset_order(tmp_path):
    from fastlaion.dataset import open_dataset

    folder = tmp_path / "run"
    keys = write_embedding_run(folder, make_embeddings(1600, 8, seed=2))
    run = open_dataset(folder)
    got = run.scan_shards({"00001", "00003"}).collect()
    assert got["key"].to_list() == [k for k in keys if k[:5] in ("00001", "00003")]
    assert run.scan_shards({"00009"}) is None
    frame = run.scan().collect()
    frame.reverse().write_parquet(folder / "mixed.parquet")  # one file, shards by its column
    mixed = open_dataset(folder / "mixed.parquet")
    got = mixed.scan_shards({"00002"}).collect()
    assert got["key"].to_list() == [k for k in reversed(keys) if k.startswith("00002")]


def test_fewer_hits_than_k_from_the_cells_read_is_said_with_the_probes_that_find_them(case, tmp_path):
    """-k 150 where the cells read hold fewer: the hits found, and one line naming the --probes
    that reads enough cells (the fewest that do) and --exact."""
    folder, keys, qfiles, _ = case
    invoke(["index", folder, "--no-progress"])
    cells = json.loads((folder / "index" / "index.json").read_text())["cells"]
    k = 150
    out = tmp_path / "hits.json"
    said = invoke(["search", folder, "--vector", qfiles[0], "-k", k, "--probes", 1, "--json", out,
                   "--no-progress"]).output
    found = json.loads(out.read_text())
    n = len(found["results"][0]["hits"])
    assert 0 < n < k <= len(keys)
    line = [line for line in said.splitlines() if "hits asked" in line]
    assert len(line) == 1, said
    match = re.search(rf"only {n} of the {k} hits asked \(-k\) were found: the index cells read \(1 of {cells}\) "
                      r"hold no more; --probes (\d+) \(or more\) reads enough of them, or --exact", line[0])
    assert match, line
    probes = int(match.group(1))
    assert found["short"] == {"k": k, "queries": 1, "fewest": n, "probes_needed": probes}
    for p, enough in ((probes, True), (probes - 1, False)):  # the fewest cells that hold k
        said = invoke(["search", folder, "--vector", qfiles[0], "-k", k, "--probes", p, "--json", out,
                       "--no-progress"]).output
        assert (len(json.loads(out.read_text())["results"][0]["hits"]) == k) is enough
        assert ("hits asked" not in said) is enough
    # more than the samples: all of them, nothing to say
    said = invoke(["search", folder, "--vector", qfiles[0], "-k", 10 * len(keys), "--probes", cells,
                   "--no-progress"]).output
    assert "hits asked" not in said and f"the {len(keys):,} best" in said


def test_a_second_index_while_one_is_written_is_refused_at_once(case, tmp_path):
    """`fastlaion index` held just before its commit in another process (the new index written
    under index/.partial/, the folder locked): a second one is refused at once in one line naming
    the first one's process, and changes nothing in index/ (it used to clear the first one's
    .partial/ and could interleave their renames: an index.json beside the other build's
    image.faiss); search meanwhile uses the earlier index. Then the first one's index is in place."""
    from test_dataset_helpers import held

    folder, _, qfiles, _ = case
    index = folder / "index"
    invoke(["index", folder, "--cells", 8, "--no-progress"])
    cells = min(int(4 * math.sqrt(N)), N // 64)
    with held(["index", folder, "--no-progress"], tmp_path) as first:
        before = {str(p.relative_to(index)): p.read_bytes() if p.is_file() else None for p in sorted(index.rglob("*"))}
        assert sorted(before) == [".lock", ".partial", ".partial/image.faiss", ".partial/index.json", "image.faiss",
                                  "index.json"]
        result = invoke(["index", folder, "--cells", 4, "--no-progress"], 2)
        assert result.stderr == f"error: {index}: another fastlaion index is writing into it (process {first.pid}); " \
                                "wait for it to end\n"
        assert {str(p.relative_to(index)): p.read_bytes() if p.is_file() else None
                for p in sorted(index.rglob("*"))} == before
        _, out = search_json(folder, qfiles[:1], tmp_path)
        assert "of 8 cells read" in out
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in index.iterdir()) == ["image.faiss", "index.json"]
    assert json.loads((index / "index.json").read_text())["cells"] == cells
    _, out = search_json(folder, qfiles[:1], tmp_path)
    assert f"of {cells:,} cells read" in out


def two_builds(folder, tmp_path):
    """Two copies of the case's run, a indexed with --cells 2, b with the default cells."""
    import shutil

    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for copy in (a, b):
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("index"))
    invoke(["index", a, "--cells", 2, "--no-progress"])
    invoke(["index", b, "--no-progress"])
    return a, b


def test_an_index_json_and_image_faiss_of_two_builds_are_not_searched_together(case, tmp_path):
    """search reads index.json, then image.faiss: an index rebuilt between the two reads (or the
    two files copied from different builds) gave one build's description with the other's index:
    --cells 2's probes (1 cell) read 1 of the other build's 62 cells, or the ids of another
    dataset's index of the same shape named this one's samples, with no word. Now search sees the
    index is not the one described and searches exactly, in one warning line."""
    import shutil

    folder, _, qfiles, exact = case
    a, b = two_builds(folder, tmp_path)
    # the same dataset (another copy, as `fastlaion index` run again on it would write), another
    # --cells, and another dataset of the same size indexed with the same cells as b
    other = tmp_path / "other" / "run"
    make_case(other, N, DIM, seed=12, query_seed=6)
    invoke(["index", other, "--no-progress"])
    assert (json.loads((other / "index" / "index.json").read_text())["cells"]
            == json.loads((b / "index" / "index.json").read_text())["cells"] > 2)
    for described, faiss_from in ((a, b), (b, a), (b, other)):
        mixed = tmp_path / f"mixed-{described.parent.name}-{faiss_from.parent.name}" / "run"
        shutil.copytree(described, mixed)
        shutil.copy2(faiss_from / "index" / "image.faiss", mixed / "index" / "image.faiss")
        found, out = search_json(mixed, qfiles, tmp_path)
        assert "cells read" not in out and found["index"] is None, out
        assert keys_of(found) == exact
        warnings = [line for line in out.splitlines() if "image.faiss" in line]
        assert len(warnings) == 1 and "searching every embedding instead" in warnings[0], out
    # each build's own pair is searched through its index
    for own in (a, b):
        found, out = search_json(own, qfiles, tmp_path, "--probes", 62)
        assert "cells read" in out and keys_of(found) == exact


def test_an_index_rebuilt_between_the_two_reads_is_read_again(case, tmp_path, monkeypatch):
    """The race itself, placed: search has read build a's index.json when build b's files are
    put in place (image.faiss, then index.json, as `fastlaion index` does), just before it reads
    image.faiss. It reads both again and searches through build b's index, without a warning."""
    import shutil

    import faiss

    folder, _, qfiles, exact = case
    a, b = two_builds(folder, tmp_path)
    real_read = faiss.read_index
    reads = []

    def rebuilt_first(path, *flags):
        if not reads:
            for name in ("image.faiss", "index.json"):
                shutil.copy2(b / "index" / name, a / "index" / (name + ".new"))
                os.replace(a / "index" / (name + ".new"), a / "index" / name)
        reads.append(path)
        return real_read(path, *flags)

    monkeypatch.setattr(faiss, "read_index", rebuilt_first)
    found, out = search_json(a, qfiles, tmp_path, "--probes", 62)
    assert len(reads) == 2 and "(index: 62 of 62 cells read)" in out and "warning" not in out, out
    assert keys_of(found) == exact
