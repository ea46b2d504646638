"""`fastlaion search`: text, image and vector queries against a real run (a saved tiny CLIP
checkpoint, so that the queries are embedded with the weights the run used), checked against
open_clip's own embeddings and a numpy brute force over the run's embedding files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from helpers import encode
from PIL import Image
from test_dataset_helpers import (check_ctrl_c_of_an_output, ctrl_c_after, ctrl_c_while_writing, run_cli,
                                 run_cli_here)
from test_pipeline import tiny_checkpoint
from typer.testing import CliRunner

from fastlaion.cli import app
from fastlaion.server import LoopbackServer, Served

runner = CliRunner()


def variants(photos) -> dict[str, np.ndarray]:
    """Twelve pictures: each photograph, mirrored, and its centre."""
    out = {}
    for name, arr in photos.items():
        h, w = arr.shape[:2]
        out[name] = arr
        out[name + "-mirror"] = arr[:, ::-1]
        out[name + "-centre"] = arr[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos):
    tmp = tmp_path_factory.mktemp("search")
    pictures = variants(photos)
    files = {f"{n}.jpg": Served(encode(np.ascontiguousarray(a)), "image/jpeg") for n, a in pictures.items()}
    ckpt = tiny_checkpoint(tmp)
    with LoopbackServer(files) as server:
        names = sorted(pictures)
        inp = tmp / "in.parquet"
        pl.DataFrame({"url": [server.url(f"{n}.jpg") for n in names] + [server.url("gone.jpg")],
                      "caption": [f"a picture of {n.replace('-', ' ')}" for n in names] + ["a dead link"]}
                     ).write_parquet(inp)
        out = tmp / "out"
        result = runner.invoke(app, ["run", str(inp), "-o", str(out), "--allow-private-networks", "--model",
                                     "fastlaion-tiny", "--pretrained", str(ckpt), "--min-similarity", "-1",
                                     "--shard-size", "4", "--retries", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out, ckpt, pictures, tmp


def kept_embeddings(out: Path) -> tuple[list[str], np.ndarray]:
    """Kept samples' keys in dataset order and their image embeddings, read here from the files."""
    keys, vecs = [], []
    for parquet in sorted(out.glob("[0-9]*.parquet")):
        frame = pl.read_parquet(parquet)
        emb = np.load(parquet.with_name(parquet.stem + "_img_emb.npy")).astype(np.float64)
        for i, (key, status) in enumerate(frame.select("key", "status").iter_rows()):
            if status == "kept":
                keys.append(key)
                vecs.append(emb[i] / np.linalg.norm(emb[i]))
    return keys, np.array(vecs)


def open_clip_model(ckpt: Path):
    import open_clip

    from fastlaion.score import TINY_MODEL, register_model_configs

    register_model_configs()
    model = open_clip.create_model(TINY_MODEL, pretrained=str(ckpt)).eval()
    return model, open_clip.get_tokenizer(TINY_MODEL), open_clip.image_transform(model.visual.image_size,
                                                                                  is_train=False)


def brute_force(keys: list[str], emb: np.ndarray, q: np.ndarray, k: int) -> list[tuple[str, float]]:
    sims = emb @ (q / np.linalg.norm(q))
    order = sorted(range(len(keys)), key=lambda i: (-sims[i], i))[:k]
    return [(keys[i], float(sims[i])) for i in order]


def hits_of(path: Path) -> list[list[tuple[str, float]]]:
    data = json.loads(path.read_text())
    return [[(h["key"], h["similarity"]) for h in r["hits"]] for r in data["results"]]


def test_text_queries_find_what_open_clip_and_numpy_find(run, tmp_path):
    out, ckpt, _, _ = run
    keys, emb = kept_embeddings(out)
    assert len(keys) == 12 and len({k[:5] for k in keys}) == 3  # three shards to merge
    texts = ["a picture of chelsea", "a rocket on its launch pad", "coffee"]
    result = runner.invoke(app, ["search", str(out), *sum((["--text", t] for t in texts), []), "-k", "5",
                                 "--device", "cpu", "--json", str(tmp_path / "hits.json"), "--no-progress"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    model, tokenizer, _ = open_clip_model(ckpt)
    with torch.no_grad():
        q = model.encode_text(tokenizer(texts)).double().numpy()
    got = hits_of(tmp_path / "hits.json")
    for i, text in enumerate(texts):
        want = brute_force(keys, emb, q[i], 5)
        assert [k for k, _ in got[i]] == [k for k, _ in want], text
        assert np.allclose([s for _, s in got[i]], [s for _, s in want], atol=1e-4)
        assert f'text "{text}": the 5 best of 12 kept samples' in result.output
    assert got[0][0][0] in result.output


def test_an_image_query_matches_open_clips_preprocessing(run, tmp_path):
    out, ckpt, pictures, _ = run
    keys, emb = kept_embeddings(out)
    query = tmp_path / "q.png"
    Image.fromarray(pictures["astronaut-centre"]).save(query)
    result = runner.invoke(app, ["search", str(out), "--image", str(query), "-k", "12", "--device", "cpu",
                                 "--json", str(tmp_path / "hits.json"), "--no-progress"])
    assert result.exit_code == 0, result.output
    model, _, preprocess = open_clip_model(ckpt)
    with torch.no_grad():
        q = model.encode_image(preprocess(Image.open(query).convert("RGB"))[None]).double().numpy()[0]
    (got,) = hits_of(tmp_path / "hits.json")
    assert sorted(k for k, _ in got) == sorted(keys)  # k above the kept count: every one, once
    want = brute_force(keys, emb, q, 12)
    sims = dict(zip(keys, emb @ (q / np.linalg.norm(q))))
    # ranks agree with open_clip's own preprocessing up to its small resize differences
    assert all(abs(sims[k] - w) < 0.02 for (k, _), (_, w) in zip(got, want)), (got, want)


def test_a_vector_query_needs_no_model_and_finds_its_own_sample(run, tmp_path):
    out, _, _, _ = run
    keys, emb = kept_embeddings(out)
    np.save(tmp_path / "v.npy", emb[7].astype(np.float32) * 3)  # any length
    result = run_cli(["search", str(out), "--vector", str(tmp_path / "v.npy"), "-k", "3", "--model", "no-such-model",
                      "--json", str(tmp_path / "hits.json"), "--no-progress"])
    assert result.returncode == 0, result.stderr  # the model is never looked at
    (got,) = hits_of(tmp_path / "hits.json")
    assert got[0][0] == keys[7] and abs(got[0][1] - 1) < 1e-3
    assert [k for k, _ in got] == [k for k, _ in brute_force(keys, emb, emb[7], 3)]


def test_a_random_weights_run_finds_its_own_images_and_says_what_it_cannot(photos, tmp_path):
    """A run scored with random weights (--pretrained none, the demo's way): search and classify
    load the same seeded model, so a query of one of its photos finds that photo's sample (at cosine
    > 0.99), and a warning says text queries and labels mean nothing (they were refused: each load
    used to draw other weights)."""
    files = {f"{n}.jpg": Served(encode(np.ascontiguousarray(a)), "image/jpeg") for n, a in photos.items()}
    with LoopbackServer(files) as server:
        names = sorted(photos)
        inp = tmp_path / "in.parquet"
        pl.DataFrame({"url": [server.url(f"{n}.jpg") for n in names],
                      "caption": [f"a picture of {n}" for n in names]}).write_parquet(inp)
        out = tmp_path / "out"
        result = runner.invoke(app, ["run", str(inp), "-o", str(out), "--allow-private-networks", "--model",
                                     "fastlaion-tiny", "--pretrained", "none", "--min-similarity", "-1",
                                     "--retries", "0", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    keys, emb = kept_embeddings(out)
    assert len(keys) == len(photos)
    queries = []
    for name in names:
        queries += ["--image", str(tmp_path / f"{name}.png")]
        Image.fromarray(photos[name]).save(queries[-1])
    found = run_cli(["search", str(out), *queries, "-k", "1", "--device", "cpu",
                     "--json", str(tmp_path / "hits.json"), "--no-progress"])
    assert found.returncode == 0, found.stderr
    said = " ".join(found.stderr.split())  # rich wraps the warning at the width
    assert "random weights" in said and "text queries and their hits mean nothing" in said, said
    rows = pl.read_parquet(sorted(out.glob("[0-9]*.parquet")))
    for name, got in zip(names, hits_of(tmp_path / "hits.json"), strict=True):
        row = rows.filter(pl.col("url").str.ends_with(f"/{name}.jpg"))
        assert got[0][0] == row["key"][0] and got[0][1] > 0.99, (name, got)
    labelled = run_cli_here(["classify", "--from", str(out), "-o", str(tmp_path / "c"), "--class", "cat", "--class", "dog",
                        "--device", "cpu", "--no-progress"])
    assert labelled.returncode == 0 and "its labels mean nothing" in " ".join(labelled.stderr.split()), labelled.stderr


def test_bad_searches_are_one_line(run, tmp_path):
    out, _, _, tmp = run
    np.save(tmp_path / "short.npy", np.ones(3, np.float32))
    (tmp_path / "not-an-image.jpg").write_bytes(b"hello")
    no_score = tmp / "no-score"
    no_score.mkdir(exist_ok=True)
    for f in out.glob("0000[0-9].parquet"):
        (no_score / f.name).write_bytes(f.read_bytes())
        (no_score / (f.stem + "_stats.json")).write_text("{}")
    cases = [
        ([str(out)], "nothing to search for: give --text, --image or --vector"),
        ([str(out), "--image", str(tmp_path / "not-an-image.jpg")], "not-an-image.jpg: cannot read it as an image"),
        ([str(out), "--image", str(tmp_path / "nowhere.png")], "nowhere.png: cannot read it as an image"),
        ([str(out), "--vector", str(tmp_path / "short.npy")], "the queries have 3 dimensions, the dataset's embeddings"),
        ([str(out), "--text", "x", "-k", "0"], "-k must be at least 1"),
        ([str(no_score), "--vector", str(tmp_path / "short.npy")], "search needs image embeddings"),
    ]
    for args, message in cases:
        result = run_cli_here(["search", *args, "--device", "cpu", "--no-progress"])
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_bad_image_query_is_named_before_the_model_loads(tmp_path):
    """Every --image is read before the CLIP model loads: a file that is no image fails in a
    second, not after torch, open_clip and the weights (7 s here for a random tiny model). The
    model named here cannot load at all, so only an image read first gives the image's error."""
    from fastlaion.config import ConfigError
    from fastlaion.dataset.search import Query, embed_queries
    from fastlaion.score import ScoreConfig

    (tmp_path / "note.jpg").write_text("not a picture")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "fine.png")
    queries = [Query("image", str(tmp_path / "fine.png")), Query("image", str(tmp_path / "note.jpg"))]
    with pytest.raises(ConfigError, match=r"^--image .*note\.jpg: cannot read it as an image"):
        embed_queries(queries, ScoreConfig(model="no-such-model", pretrained="none", device="cpu"))


# --- classify: zero-shot labels from the stored embeddings ------------------------------------------

CLASSES = ["cat", "astronaut", "rocket", "cup of coffee"]
TEMPLATES = ["a photo of a {}.", "a blurry picture of the {}"]


def test_classify_labels_every_kept_sample_as_open_clip_would(run, tmp_path):
    out, ckpt, _, _ = run
    keys, emb = kept_embeddings(out)
    args = ["classify", "--from", str(out), "-o", str(tmp_path / "c"), "--top", "3", "--device", "cpu", "--no-progress"]
    args += sum((["--class", c] for c in CLASSES), []) + sum((["--template", t] for t in TEMPLATES), [])
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    model, tokenizer, _ = open_clip_model(ckpt)
    with torch.no_grad():
        text = model.encode_text(tokenizer([t.format(c) for c in CLASSES for t in TEMPLATES])).double().numpy()
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    per_class = text.reshape(len(CLASSES), len(TEMPLATES), -1).mean(axis=1)
    per_class /= np.linalg.norm(per_class, axis=1, keepdims=True)
    sims = emb @ per_class.T
    frame = pl.read_parquet(tmp_path / "c" / "metadata.parquet")
    before = pl.concat([pl.read_parquet(p) for p in sorted(out.glob("[0-9]*.parquet"))])
    assert frame.drop("zero_shot_label", "zero_shot_score", "zero_shot_top", "shard").equals(before)  # every row, as it was
    got = {r["key"]: r for r in frame.iter_rows(named=True)}
    for key, row in zip(keys, sims):
        order = np.argsort(-row, kind="stable")
        assert got[key]["zero_shot_top"] == [CLASSES[i] for i in order[:3]], key
        assert got[key]["zero_shot_label"] == CLASSES[order[0]]
        assert abs(got[key]["zero_shot_score"] - row[order[0]]) < 1e-4
    assert all(r["zero_shot_label"] is None for r in got.values() if r["status"] != "kept")
    info = json.loads((tmp_path / "c" / "dataset.json").read_text())
    assert info["kind"] == "classify" and info["classified"] == len(keys) == sum(info["counts"].values())
    assert f"classify: {len(keys)} of {len(keys)} kept samples labelled over 4 classes" in result.output
    # a class becomes a subset
    label = got[keys[0]]["zero_shot_label"]
    sub = runner.invoke(app, ["subset", "--where", f"zero_shot_label = '{label}'", "--from", str(tmp_path / "c"),
                              "-o", str(tmp_path / "s"), "--no-progress"])
    assert sub.exit_code == 0, sub.output
    assert sorted(pl.read_parquet(tmp_path / "s" / "metadata.parquet")["key"]) == sorted(
        k for k in keys if got[k]["zero_shot_label"] == label)


def test_a_subset_with_shards_moved_away_is_searched_and_classified_with_the_runs_model(run, tmp_path):
    """subset --shards copies the run's config.json and the embeddings: moved away from the run,
    and the run gone, text queries and classify embed with the run's model and find what they
    find on the run."""
    import shutil

    out, _, _, _ = run
    keys, _ = kept_embeddings(out)

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args] + ["--device", "cpu", "--no-progress"], terminal_width=200)

    shutil.copytree(out, tmp_path / "a" / "run")
    made = runner.invoke(app, ["subset", "--where", "true", "--from", str(tmp_path / "a" / "run"), "-o",
                               str(tmp_path / "a" / "s"), "--shards", "--shard-size", "5", "--no-progress"])
    assert made.exit_code == 0, made.output
    shutil.move(tmp_path / "a" / "s", tmp_path / "moved")
    shutil.rmtree(tmp_path / "a")  # the run it came from is gone
    texts = sum((["--text", t] for t in ("a picture of chelsea", "coffee")), [])
    for folder, name in ((out, "run"), (tmp_path / "moved", "moved")):
        result = invoke("search", folder, *texts, "-k", 5, "--json", tmp_path / f"{name}.json")
        assert result.exit_code == 0, result.output
        classes = sum((["--class", c] for c in CLASSES), [])
        result = invoke("classify", "--from", folder, "-o", tmp_path / f"{name}-c", *classes)
        assert result.exit_code == 0, result.output
    for on_run, moved in zip(hits_of(tmp_path / "run.json"), hits_of(tmp_path / "moved.json")):
        assert dict(moved).keys() == dict(on_run).keys()  # the same samples, at the same cosines
        assert all(abs(dict(moved)[k] - s) < 1e-4 for k, s in on_run)
    labels = [pl.read_parquet(tmp_path / f"{name}-c" / "metadata.parquet").filter(pl.col("status") == "kept")
              .select("key", "zero_shot_label").sort("key") for name in ("run", "moved")]
    assert labels[0].equals(labels[1]) and labels[0].height == len(keys)


def test_ctrl_c_says_whether_the_labels_were_written(run, tmp_path, monkeypatch):
    """classify: a real Ctrl-C before its output is in place leaves the earlier one and says so;
    once it is (or while it is put there, or while the closing line prints), it says where it was
    written."""
    out = run[0]

    def invoke(args, code):
        result = runner.invoke(app, [str(a) for a in args] + ["--device", "cpu", "--no-progress"])
        assert result.exit_code == code, (result.output, result.exception)
        return result

    check_ctrl_c_of_an_output(monkeypatch, invoke, ["classify", "--from", out, "--class", "cat", "--class", "dog"],
                              ["classify", "--from", out, *sum((["--class", c] for c in CLASSES), [])],
                              tmp_path / "c", "the labelled dataset was")


def test_bad_classify_input_is_one_line(run, tmp_path):
    out, _, _, tmp = run
    (tmp_path / "classes.txt").write_text("# animals\ncat\n\ndog\n")
    (tmp_path / "empty.txt").write_text("# animals, to come\n\n")
    first = run_cli_here(["classify", "--from", str(out), "-o", str(tmp_path / "c"), "--classes", str(tmp_path / "classes.txt"),
                     "--device", "cpu", "--no-progress"])
    assert first.returncode == 0 and "over 2 classes" in first.stdout, first.stderr
    named = run_cli_here(["classify", "--from", str(out), "-o", str(tmp_path / "n"), "--classes", str(tmp_path / "classes.txt"),
                          "--templates", "openai-simple", "--device", "cpu", "--no-progress"])
    assert named.returncode == 0 and "over 2 classes" in named.stdout, named.stderr
    cases = [
        ([], "no classes: give --class NAME"),
        (["--class", "cat", "--class", "cat"], "class named twice: 'cat'"),
        (["--class", "cat", "--template", "a photo"], "--template 'a photo' must hold '{}' once"),
        (["--class", "cat", "--templates", "clip"], "--templates 'clip': no such prompt set; the sets are openai"),
        (["--class", "cat", "--templates", "openai", "--template", "a {}"], "--template and --templates: give"),
        (["--class", "cat", "--class", "dog", "--top", "3"], "--top must be between 1 and 2"),
        (["--classes", str(tmp_path / "none.txt")], "--classes"),
        (["--classes", str(tmp_path / "empty.txt")], f"--classes {tmp_path / 'empty.txt'}: no class names in it"),
        (["--class", "cat", "--from-again"], "error: no such option: --from-again"),
    ]
    for args, message in cases:
        source = ["--from", str(out)] if "--from-again" not in args else []
        args = [a for a in args if a != "--from-again"] + (["--from-again"] if "--from-again" in args else [])
        result = run_cli_here(["classify", *source, "-o", str(tmp_path / "o"), *args, "--device", "cpu", "--no-progress"])
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    again = run_cli_here(["classify", "--from", str(tmp_path / "c"), "-o", str(tmp_path / "c2"), "--class", "x",
                     "--device", "cpu", "--no-progress"])
    assert again.returncode == 2 and "already has zero_shot_label" in again.stderr, again.stderr


@pytest.mark.parametrize("template", ["{} {x}", "a {} }", "{} of {1}", "a {{}} photo", "{} {0}"])
def test_a_template_that_does_not_take_the_class_name_once_is_refused_before_work(tmp_path, template):
    """'{} {x}' and 'a {} }' hold '{}' once and passed the check; str.format then failed once the
    model had loaded (a KeyError or ValueError traceback); 'a {{}} photo' made prompts without
    the class name. Refused before the dataset is read (the --from here does not exist)."""
    result = runner.invoke(app, ["classify", "--from", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o"),
                                 "--class", "cat", "--template", template, "--no-progress"], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: --template {template!r} must hold '{{}}' once"), result.output
    assert not (tmp_path / "o").exists()


# --- the search itself, on synthetic embeddings (vector queries: no model) -----------------------------

def synthetic_run(folder: Path, emb: np.ndarray, captions: dict[int, str] | None = None) -> list[str]:
    from test_semantic import write_embedding_run

    keys = write_embedding_run(folder, emb)
    if captions:  # write_embedding_run names them c<i>; some get other text
        for parquet in sorted(folder.glob("[0-9]*.parquet")):
            frame = pl.read_parquet(parquet)
            frame.with_columns(pl.Series("caption", [captions.get(int(k[:5]) * 500 + int(k[5:]), c)
                                                     for k, c in zip(frame["key"], frame["caption"])])
                               ).write_parquet(parquet)
    return keys


def search_json(args: list[str], path: Path) -> list[list[tuple[str, float]]]:
    result = run_cli_here(["search", *args, "--json", str(path), "--no-progress"])
    assert result.returncode == 0, result.stderr
    return hits_of(path)


def test_ties_go_to_the_earlier_sample_at_every_k(tmp_path):
    rng = np.random.default_rng(11)
    emb = rng.normal(size=(1200, 32))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for row in (100, 300, 450, 700):  # the same image four times: bitwise-equal embeddings
        emb[row] = emb[100]
    keys = synthetic_run(tmp_path / "run", emb.astype(np.float16))
    np.save(tmp_path / "q.npy", emb[100])
    for k in (1, 2, 3, 4, 5):
        (got,) = search_json([str(tmp_path / "run"), "--vector", str(tmp_path / "q.npy"), "-k", str(k)],
                             tmp_path / f"h{k}.json")
        assert [key for key, _ in got][:4] == [keys[r] for r in (100, 300, 450, 700)][:k]


def test_ctrl_c_says_whether_the_hits_were_written(tmp_path, monkeypatch):
    """search --json: a real Ctrl-C while the file is written leaves the earlier one as it was (it
    was cut short) and says nothing was written; while the hits print, once it is in place (where
    the command ended with 130 and not a word), it says that it was written."""
    import pathlib

    from fastlaion import cli_dataset

    rng = np.random.default_rng(14)
    synthetic_run(tmp_path / "run", rng.normal(size=(600, 16)).astype(np.float16))
    np.save(tmp_path / "q.npy", rng.normal(size=16))
    hits = tmp_path / "hits.json"
    args = ["search", str(tmp_path / "run"), "--vector", str(tmp_path / "q.npy"), "--no-progress"]
    done = runner.invoke(app, [*args, "--json", str(hits)])
    assert done.exit_code == 0, done.output
    new = hits.read_bytes()
    for target, name, wrap, json_args, says in (
            (pathlib.Path, "write_text", lambda w: ctrl_c_while_writing(w, ".json"), ["--json", str(hits)],
             "nothing was written"),
            (cli_dataset, "_say", ctrl_c_after, ["--json", str(hits)], f"the hits were written, whole, to {hits}"),
            (cli_dataset, "_say", ctrl_c_after, [], "nothing was written")):
        hits.write_text('{"old": true}')
        with monkeypatch.context() as m:
            m.setattr(target, name, wrap(getattr(target, name)))
            result = runner.invoke(app, [*args, *json_args])
        assert result.exit_code == 130, (name, result.output)
        assert result.stderr.strip() == f"interrupted: {says}", (name, json_args, result.stderr)
        assert hits.read_bytes() == (new if "hits were" in says else b'{"old": true}'), name
        assert sorted(p.name for p in tmp_path.iterdir()) == ["hits.json", "q.npy", "run"], name


def test_search_json_dash_writes_the_hits_to_stdout_alone(tmp_path, monkeypatch):
    """`search DS --json -` wrote a file named `-`. `-` is stdout: the JSON alone (what a file
    gets, for jq), the hits' lines on stderr; a Ctrl-C once it is out says it was written."""
    from fastlaion import cli_dataset

    rng = np.random.default_rng(15)
    synthetic_run(tmp_path / "run", rng.normal(size=(300, 16)).astype(np.float16))
    np.save(tmp_path / "q.npy", rng.normal(size=16))
    monkeypatch.chdir(tmp_path)
    args = ["search", str(tmp_path / "run"), "--vector", str(tmp_path / "q.npy"), "-k", "3", "--no-progress"]
    to_file = runner.invoke(app, [*args, "--json", str(tmp_path / "hits.json")])
    assert to_file.exit_code == 0, to_file.output
    result = runner.invoke(app, [*args, "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((tmp_path / "hits.json").read_text())
    hit_lines = [line for line in to_file.stdout.splitlines() if not line.startswith("hits written to ")]
    assert result.stderr.splitlines() == [*hit_lines, "hits written to stdout"]
    with monkeypatch.context() as m:
        m.setattr(cli_dataset, "_say", ctrl_c_after(cli_dataset._say))
        stopped = runner.invoke(app, [*args, "--json", "-"])
    assert stopped.exit_code == 130, stopped.output
    assert json.loads(stopped.stdout) == json.loads((tmp_path / "hits.json").read_text())
    assert stopped.stderr.splitlines()[-1] == "interrupted: the hits were written, whole, to stdout"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hits.json", "q.npy", "run"]  # no file named -


def test_interleaved_rows_foreign_float16_and_markup_in_captions(tmp_path):
    """A Parquet whose rows mix shards (the gather path), one shard's float16 vectors not unit
    length (another tool's), and captions with rich markup in them, printed as they are."""
    rng = np.random.default_rng(12)
    emb = rng.normal(size=(1500, 32))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    caption = "Vintage poster [/url] [red]SALE[/red] [b]"
    keys = synthetic_run(tmp_path / "run", emb.astype(np.float16), {42: caption})
    half = np.load(tmp_path / "run" / "00001_img_emb.npy") * np.float16(0.5)
    np.save(tmp_path / "run" / "00001_img_emb.npy", half)
    from fastlaion.dataset import open_dataset

    frame = open_dataset(tmp_path / "run").scan().collect()
    order = rng.permutation(frame.height)
    frame[order].write_parquet(tmp_path / "run" / "mixed.parquet")
    queries = [emb[42], emb[700] + rng.normal(scale=0.3, size=32)]
    for i, q in enumerate(queries):
        np.save(tmp_path / f"q{i}.npy", q)
    args = [str(tmp_path / "run" / "mixed.parquet"), "--vector", str(tmp_path / "q0.npy"), "--vector",
            str(tmp_path / "q1.npy"), "-k", "7"]
    got = search_json(args, tmp_path / "h.json")
    unit = emb.astype(np.float16).astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    mixed = [keys[i] for i in order]
    position = {k: i for i, k in enumerate(mixed)}
    for q, hits in zip(queries, got):
        sims = unit @ (q / np.linalg.norm(q))
        want = sorted(range(len(keys)), key=lambda i: (-sims[i], position[keys[i]]))[:7]
        assert [k for k, _ in hits] == [keys[i] for i in want]
        assert all(abs(s - sims[i]) < 1e-3 and s <= 1.0001 for (_, s), i in zip(hits, want))
    shown = run_cli_here(["search", *args, "--no-progress"])
    assert caption in shown.stdout and "Traceback" not in shown.stderr, shown.stderr


def test_more_bad_searches_are_one_line(tmp_path):
    rng = np.random.default_rng(13)
    synthetic_run(tmp_path / "run", rng.normal(size=(600, 16)).astype(np.float16))
    np.savez(tmp_path / "v.npz", a=np.ones(16))
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    (tmp_path / "v.json").write_text(json.dumps([1.0] * 16))
    (tmp_path / "run" / "config.json").write_text(json.dumps({"score": {"enabled": False, "model": "ViT-B-32",
                                                                         "pretrained": "openai"}}))
    (tmp_path / "bad").mkdir()
    for f in (tmp_path / "run").glob("0000*.parquet"):
        (tmp_path / "bad" / f.name).write_bytes(f.read_bytes())
        (tmp_path / "bad" / f"{f.stem}_img_emb.npy").write_bytes((tmp_path / "run" / f"{f.stem}_img_emb.npy").read_bytes())
        (tmp_path / "bad" / f"{f.stem}_stats.json").write_text("{}")
    (tmp_path / "bad" / "config.json").write_text('["not", "an object"]')
    for folder in (tmp_path / "run", tmp_path / "bad"):  # finished runs, as their summary says
        shards = len(list(folder.glob("*_stats.json")))
        (folder / "summary.json").write_text(json.dumps({"shards_total": shards, "shards_failed": []}))
    cases = [
        ([str(tmp_path / "run"), "--vector", str(tmp_path / "v.npz")], "v.npz: need a .npy of one real-valued vector"),
        ([str(tmp_path / "run"), "--vector", str(tmp_path / "s.npy")], "s.npy: need a .npy of one real-valued vector"),
        ([str(tmp_path / "run"), "--vector", str(tmp_path / "v.json")],  # numpy: "This file contains pickled..."
         f"--vector {tmp_path / 'v.json'}: not a .npy file; --vector takes a NumPy .npy file holding one embedding"),
        ([str(tmp_path / "run"), "--text", "a cat"], "was run without CLIP scoring (--no-score)"),
        ([str(tmp_path / "bad"), "--text", "a cat"], "config.json: no 'score' object in it"),
    ]
    for args, message in cases:
        result = run_cli_here(["search", *args, "--device", "cpu", "--no-progress"])
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    # classify names itself, not search ("it has no image embeddings to search")
    result = run_cli_here(["classify", "--from", str(tmp_path / "run"), "-o", str(tmp_path / "c"), "--class", "cat",
                           "--device", "cpu", "--no-progress"])
    assert result.returncode == 2 and "has no image embeddings to classify" in result.stderr, result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none")
def test_classify_and_search_on_cuda_agree_with_the_cpu(run, tmp_path):
    """classify's float16 topk_cosine kernel and search's query embedding on CUDA: the CPU's
    labels (but for near ties) and hits."""
    out = run[0]
    for device in ("cpu", "cuda"):
        args = ["classify", "--from", str(out), "-o", str(tmp_path / device), "--device", device, "--no-progress"]
        result = runner.invoke(app, args + sum((["--class", c] for c in CLASSES), []))
        assert result.exit_code == 0, result.output
    cpu, gpu = (pl.read_parquet(tmp_path / d / "metadata.parquet").filter(pl.col("status") == "kept") for d in ("cpu", "cuda"))
    assert (cpu["zero_shot_label"] == gpu["zero_shot_label"]).sum() >= cpu.height - 1
    assert (cpu["zero_shot_score"] - gpu["zero_shot_score"]).abs().max() < 5e-3
    hits = {}
    for device in ("cpu", "cuda"):
        result = runner.invoke(app, ["search", str(out), "--text", "a cat", "-k", "3", "--device", device,
                                     "--json", str(tmp_path / f"{device}.json"), "--no-progress"])
        assert result.exit_code == 0, result.output
        hits[device] = hits_of(tmp_path / f"{device}.json")[0]
    assert [k for k, _ in hits["cpu"]] == [k for k, _ in hits["cuda"]]


def test_a_run_scored_with_gelu_for_quick_gelu_weights_is_named_by_search(run, tmp_path, caplog):
    """A run an older fastlaion scored with OpenAI's ViT-B-32 weights on nn.GELU (config.json
    without model_build): the model search loads now has QuickGELU, so the stored embeddings are
    not what the queries get, and search says so; the same run recorded by this version does not
    warn. The weights are a local file in the Hugging Face cache folder of OpenAI's tag (only its
    path is read here)."""
    import shutil

    from fastlaion.dataset.search import SearchConfig, run_score_config
    from fastlaion.dataset.source import open_dataset

    out = tmp_path / "out"
    shutil.copytree(run[0], out)
    weights = tmp_path / "models--timm--vit_base_patch32_clip_224.openai" / "w.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"never loaded")
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["model_build"] == 2
    said = {}
    for build in (None, 2):
        config = {**recorded, "score": {**recorded["score"], "model": "ViT-B-32", "pretrained": str(weights)}}
        if build is None:
            del config["model_build"]
        (out / "config.json").write_text(json.dumps(config))
        caplog.clear()
        with caplog.at_level("WARNING"):
            score = run_score_config(open_dataset(out), SearchConfig())
        assert (score.model, score.pretrained) == ("ViT-B-32", str(weights))
        said[build] = caplog.text
    assert "older fastlaion" in said[None] and "QuickGELU" in said[None] and "ViT-B-32" in said[None]
    assert "older fastlaion" not in said[2]
