"""`fastlaion evaluate`: zero-shot accuracy on a labelled image folder of real photographs,
checked against top-1/top-5 and per-class recall computed here with numpy from the embeddings the
Scorer's public API gives (images read with Pillow, not fastlaion's decoder; class prompts
averaged here); a case whose figures are known by construction whatever the model; the error
cases and Ctrl-C through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from test_dataset_helpers import ctrl_c_after, ctrl_c_while_writing, run_cli_here

from fastlaion.config import ScoreConfig
from fastlaion.score import TINY_MODEL, Scorer

TEMPLATES = ("a photo of a {}.", "a blurry picture of the {}.")


def pictures() -> dict[str, list[np.ndarray]]:
    """Seven classes of RGB pictures: a photograph, mirrored, and its centre; chelsea has two more
    (turned, and its lower right quarter), so that classes differ in size and the mean per-class
    recall is not the top-1 accuracy."""
    out = {}
    for name in ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins", "moon"):
        a = getattr(skimage.data, name)()
        a = np.stack([a] * 3, axis=-1) if a.ndim == 2 else a
        h, w = a.shape[:2]
        out[name] = [a, a[:, ::-1], a[h // 4: 3 * h // 4, w // 4: 3 * w // 4]]
        if name == "chelsea":
            out[name] += [np.rot90(a), a[h // 2:, w // 2:]]
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder of PNGs (Pillow and fastlaion's decoder read the same pixels from them):
    class folders with '_' in a name, an image one level down, a file that is no image, a
    hidden folder, and one image that does not decode."""
    root = tmp_path_factory.mktemp("eval") / "images"
    for name, arrays in pictures().items():
        d = root / {"rocket": "space_rocket", "moon": "the_moon"}.get(name, name)
        (d / "more").mkdir(parents=True)
        for i, a in enumerate(arrays):
            Image.fromarray(np.ascontiguousarray(a)).save((d / "more" if i == 2 else d) / f"{i}.png")
    (root / "coffee" / "notes.txt").write_text("not an image: left out\n")
    (root / "coffee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (root / ".ipynb_checkpoints").mkdir()
    return root


def scorer() -> Scorer:
    import torch

    return Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none", precision="fp32", device="cpu"),
                  torch.device("cpu"))


def expected(root: Path, classes: list[str] | None = None, limit: int = 0) -> dict:
    """The figures, computed here: classes = folders in name order, images read with Pillow and
    made the model's input by the Scorer's clip_spec, embeddings from Scorer.embed_images and
    embed_texts, prompts averaged and every score and rank in numpy."""
    s = scorer()
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = classes or [f.replace("_", " ") for f in folders]
    text = s.embed_texts([t.format(c) for c in names for t in TEMPLATES]).numpy().astype(np.float64)
    per_class = text.reshape(len(names), len(TEMPLATES), -1).mean(axis=1)
    per_class /= np.linalg.norm(per_class, axis=1, keepdims=True)
    labels, sims = [], []
    for label, f in enumerate(folders):
        paths = sorted(p for p in (root / f).rglob("*.png") if p.name != "broken.png")
        for p in paths[:limit] if limit else paths:
            with Image.open(p) as im:
                rgb = im.convert("RGB")
            pixels = np.array(s.clip_spec.apply(rgb, rgb.width, rgb.height))
            emb = s.embed_images(pixels[None])[0].numpy().astype(np.float64)
            labels.append(label)
            sims.append(per_class @ emb)
    labels, sims = np.array(labels), np.array(sims)
    order = np.argsort(-sims, axis=1, kind="stable")
    ranked = np.sort(sims, axis=1)[:, ::-1]
    # decidable: the gaps the figures hang on are far above float32's rounding (~1e-6 here), which
    # is all that may differ between the command's batches and these single images
    assert (ranked[:, 0] - ranked[:, 1]).min() > 1e-5 and (ranked[:, 4] - ranked[:, 5]).min() > 1e-5
    recall = [float(np.mean(order[labels == c, 0] == c)) for c in range(len(folders))]
    return {"top1": float(np.mean(order[:, 0] == labels)),
            "top5": float(np.mean((order[:, :5] == labels[:, None]).any(axis=1))),
            "recall": recall, "mean": float(np.mean(recall)), "names": names,
            "counts": [int(np.sum(labels == c)) for c in range(len(folders))],
            "pairs": {(names[t], names[p]) for t, p in zip(labels, order[:, 0]) if t != p}}


def evaluate(root: Path, json_path: Path, *more: str):
    args = ["evaluate", root, "--model", TINY_MODEL, "--pretrained", "none", "--device", "cpu", "--precision",
            "fp32", *sum((["--template", t] for t in TEMPLATES), []), "--batch-size", "4", "--json", json_path,
            "--no-progress", *more]
    result = run_cli_here(args)
    return result, (json.loads(json_path.read_text()) if result.returncode == 0 else None)


def check(got: dict, want: dict) -> None:
    assert got["top1"] == pytest.approx(want["top1"]) and got["top5"] == pytest.approx(want["top5"])
    assert got["mean_per_class_recall"] == pytest.approx(want["mean"])
    assert [c["class"] for c in got["per_class"]] == want["names"]
    assert [c["images"] for c in got["per_class"]] == want["counts"]
    assert [c["recall"] for c in got["per_class"]] == pytest.approx(want["recall"])
    assert {(c["true"], c["predicted"]) for c in got["confused"]} <= want["pairs"]
    assert len(got["confused"]) == min(5, len(want["pairs"]))


def test_figures_match_numpy_on_the_scorers_embeddings(folder, tmp_path):
    result, got = evaluate(folder, tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    want = expected(folder)
    assert want["counts"] == [3, 3, 5, 3, 3, 3, 3]  # coffee's broken image and notes left out; the hidden folder is no class
    assert "space rocket" in want["names"] and "the moon" in want["names"]
    assert abs(want["mean"] - want["top1"]) > 0.01  # the two figures are told apart here
    check(got, want)
    assert got["images"] == 23 and got["classes"] == 7 and got["templates"] == list(TEMPLATES)
    assert [u["path"] for u in got["undecodable"]] == ["coffee/broken.png"]
    assert "warning: 1 image(s) did not decode and are not counted: coffee/broken.png" in result.stderr
    out = result.stdout
    assert f"  top-1 accuracy         {100 * want['top1']:6.2f}%" in out
    assert f"  top-5 accuracy         {100 * want['top5']:6.2f}%" in out
    assert f"  mean per-class recall  {100 * want['mean']:6.2f}%" in out
    assert "23 images in 7 classes" in out and "space rocket" in out


def test_classnames_and_limit(folder, tmp_path):
    names = ["astronaut in orbit", "photographer", "tabby cat", "cup of coffee", "coins", "rocket", "full moon"]
    (tmp_path / "names.txt").write_text("# in the folders' order\n" + "\n".join(names) + "\n")
    result, got = evaluate(folder, tmp_path / "r.json", "--classnames", str(tmp_path / "names.txt"), "--limit", "2")
    assert result.returncode == 0, result.stderr
    want = expected(folder, names, limit=2)
    assert want["counts"] == [2] * 7
    check(got, want)


def test_the_same_images_in_every_class_give_one_in_c_whatever_the_model(tmp_path):
    """Every class folder holds the same four pictures: each picture gets one best class wherever
    it is, so it is right in exactly one of the C folders (top-1 and mean recall 1/C) and among its
    5 best in five (top-5 5/C), and every wrong answer is a confusion, whatever the weights."""
    arrays = [a for name in ("chelsea", "rocket") for a in pictures()[name][:2]]
    classes = ["cat", "dog", "car", "ship", "plane", "horse"]
    for c in classes:
        (tmp_path / "in" / c).mkdir(parents=True)
        for i, a in enumerate(arrays):
            Image.fromarray(np.ascontiguousarray(a)).save(tmp_path / "in" / c / f"{i}.jpg", quality=90)
    result, got = evaluate(tmp_path / "in", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert got["images"] == 24 and got["top1"] == pytest.approx(1 / 6) and got["top5"] == pytest.approx(5 / 6)
    assert got["mean_per_class_recall"] == pytest.approx(1 / 6)
    assert sum(c["recall"] * 4 for c in got["per_class"]) == pytest.approx(4)  # each picture right once
    assert all(c["true"] != c["predicted"] and c["share"] == c["images"] / 4 for c in got["confused"])


def test_linked_folders_are_read_as_torchvision_reads_them(tmp_path):
    """ImageFolder walks a class folder following links (os.walk(followlinks=True)): a class
    whose images are in a linked folder has them, a linked class folder is a class, and a link
    back up the tree is not walked round and round."""
    shared = tmp_path / "elsewhere"
    shared.mkdir()
    for i, a in enumerate(pictures()["rocket"]):
        Image.fromarray(np.ascontiguousarray(a)).save(shared / f"{i}.png")
    (tmp_path / "in" / "cat").mkdir(parents=True)
    Image.fromarray(pictures()["chelsea"][0]).save(tmp_path / "in" / "cat" / "0.png")
    (tmp_path / "in" / "cat" / "loop").symlink_to(tmp_path / "in" / "cat")  # a cycle: cat/loop/loop/...
    (tmp_path / "in" / "rocket").mkdir()
    (tmp_path / "in" / "rocket" / "linked").symlink_to(shared)
    (tmp_path / "in" / "ship").symlink_to(shared)
    result, got = evaluate(tmp_path / "in", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert {c["folder"]: c["images"] for c in got["per_class"]} == {"cat": 1, "rocket": 3, "ship": 3}


def test_fewer_than_six_classes_have_no_top5(folder, tmp_path):
    for name in ("chelsea", "coffee"):
        (tmp_path / "in" / name).mkdir(parents=True)
        Image.fromarray(pictures()[name][0]).save(tmp_path / "in" / name / "0.png")
    result, got = evaluate(tmp_path / "in", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert got["top5"] is None and "top-5 accuracy              -  (5 classes or fewer" in result.stdout


def test_bad_input_is_one_line(folder, tmp_path):
    def make(*dirs: str, files: tuple[str, ...] = ()) -> Path:
        root = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        root.mkdir()
        for d in dirs:
            (root / d).mkdir()
        for f in files:
            (root / f).write_bytes(Path(next(folder.glob("chelsea/*.png"))).read_bytes() if f.endswith(".png") else b"x")
        return root

    (tmp_path / "file.png").write_bytes(b"x")
    (tmp_path / "names.txt").write_text("a\nb\n")
    broken = make("a", "b", files=("a/0.jpg", "b/0.png"))
    (broken / "b" / "0.png").write_bytes(b"garbage")
    cases = [
        ([tmp_path / "nowhere"], f"error: {tmp_path / 'nowhere'}: no such folder"),
        ([tmp_path / "file.png"], f"error: {tmp_path / 'file.png'}: is a file"),
        ([make(files=("x.png",))], "no class subfolders in it"),
        ([make("only", files=("only/0.png",))], "only one class subfolder ('only'); zero-shot accuracy needs 2 or more"),
        ([(r := make("a", "b", files=("a/0.png", "b/notes.txt")))], f"error: {r / 'b'}: no images in it"),
        ([folder, "--classnames", tmp_path / "names.txt"], "--classnames: 2 names for 7 class folders"),
        ([folder, "--classnames", tmp_path / "none.txt"], f"--classnames {tmp_path / 'none.txt'}: cannot read it"),
        ([folder, "--limit", "-1"], "--limit"),
        ([folder, "--template", "a photo"], "--template 'a photo' must hold '{}' once"),
        ([folder, "--json", tmp_path / "no" / "r.json"], f"--json {tmp_path / 'no' / 'r.json'}: no folder"),
        ([folder, "--model", "ViT-Nope"], "--model"),
        ([folder, "--templates", "imagenet-80"], "--templates 'imagenet-80': no such prompt set; the sets are openai, "
                                                 "openai-simple"),
        ([folder, "--templates", "openai", "--template", "a {}"], "--template and --templates: give your own prompts"),
        ([folder, "--classnames", "imagenet"], "--classnames: 1,000 names for 7 class folders"),
        ([broken], f"error: {broken}: none of its 2 images decoded (the first: a/0.jpg: "),
    ]
    for args, message in cases:
        model = [] if "--model" in args else ["--model", TINY_MODEL]
        result = run_cli_here(["evaluate", *args, *model, "--pretrained", "none", "--device", "cpu", "--no-progress"])
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)


def test_ctrl_c_says_whether_the_figures_were_written(folder, tmp_path, monkeypatch):
    """A real Ctrl-C while images are classified, or while --json is written, leaves the earlier
    file as it was and says nothing was written; while the figures print, once it is in place,
    it says it was written. Exit status 130 every time."""
    import pathlib

    from fastlaion import cli_dataset, ops

    out = tmp_path / "r.json"
    for target, name, wrap, says in (
            (ops, "topk_cosine", ctrl_c_after, "nothing was written"),
            (pathlib.Path, "write_text", lambda w: ctrl_c_while_writing(w, ".json"), "nothing was written"),
            (cli_dataset, "_say", ctrl_c_after, f"the figures were written, whole, to {out}")):
        out.write_text('{"old": true}')
        with monkeypatch.context() as m:
            m.setattr(target, name, wrap(getattr(target, name)))
            result = run_cli_here(["evaluate", folder, "--model", TINY_MODEL, "--pretrained", "none", "--device",
                                   "cpu", "--json", out, "--no-progress"])
        assert result.returncode == 130, (name, result.stdout, result.stderr)
        assert result.stderr.splitlines()[-1] == f"interrupted: {says}", (name, result.stderr)
        if "whole" in says:
            assert json.loads(out.read_text())["classes"] == 7
        else:
            assert out.read_text() == '{"old": true}', name


def test_named_prompt_sets_and_imagenet_names(folder, tmp_path):
    """--templates openai / openai-simple are OpenAI CLIP's ImageNet prompts as open_clip ships them
    (its functions, applied here to a name, give what our templates format to), averaged as any
    --template list: the command's figures are those of the same prompts given one by one; the
    class prompts are embedded a pass of PROMPTS_A_PASS at a time, the same as all at once."""
    from open_clip import zero_shot_metadata

    from fastlaion.dataset.classify import class_embeddings, template_set

    for name, count, made in (("openai", 80, zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES),
                              ("openai-simple", 7, zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES)):
        got = template_set(name)
        assert len(got) == len(set(got)) == count and all(t.count("{}") == 1 for t in got)
        assert [t.format("tabby cat") for t in got] == [make("tabby cat") for make in made]
    simple = template_set("openai-simple")
    base = ["evaluate", folder, "--model", TINY_MODEL, "--pretrained", "none", "--device", "cpu", "--precision", "fp32",
            "--batch-size", "4", "--no-progress", "--limit", "1"]
    named = run_cli_here([*base, "--templates", "openai-simple", "--json", tmp_path / "named.json"])
    listed = run_cli_here([*base, *sum((["--template", t] for t in simple), []), "--json", tmp_path / "listed.json"])
    assert named.returncode == 0 and listed.returncode == 0, (named.stderr, listed.stderr)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("named.json", "listed.json"))
    a.pop("seconds"), b.pop("seconds")
    assert a["templates"] == list(simple) and a == b
    assert "7 prompt templates" in named.stdout
    s = scorer()
    classes = ("cat", "dog", "space rocket")
    whole = class_embeddings(s, classes, simple, per_pass=10_000)
    for per_pass in (1, 4, 20):
        np.testing.assert_allclose(class_embeddings(s, classes, simple, per_pass=per_pass).numpy(), whole.numpy(),
                                   atol=1e-5)
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    assert len(IMAGENET_CLASSNAMES) == 1000 and IMAGENET_CLASSNAMES[0] == "tench"


def test_json_to_stdout_is_the_json_alone(folder, tmp_path):
    """--json -: stdout is the figures' JSON document alone (what `stats --json -` does; a pipe
    into jq reads it), the same as --json FILE writes; the table and lines go to stderr."""
    result, from_file = evaluate(folder, tmp_path / "r.json", "--limit", "1")
    assert result.returncode == 0, result.stderr
    args = ["evaluate", folder, "--model", TINY_MODEL, "--pretrained", "none", "--device", "cpu", "--precision",
            "fp32", *sum((["--template", t] for t in TEMPLATES), []), "--batch-size", "4", "--json", "-",
            "--no-progress", "--limit", "1"]
    piped = run_cli_here(args)
    assert piped.returncode == 0, piped.stderr
    got = json.loads(piped.stdout)
    got.pop("seconds"), from_file.pop("seconds")
    assert got == from_file
    assert "top-1 accuracy" in piped.stderr and "figures written to stdout" in piped.stderr


def test_a_class_whose_images_all_fail_to_decode_is_told_in_the_mean(folder, tmp_path):
    """A class none of whose images decoded has no recall: the mean per-class recall is over the
    others, and its line says so, naming the class."""
    root = tmp_path / "in"
    for name in ("chelsea", "coffee", "astronaut"):
        (root / name).mkdir(parents=True)
    for name in ("chelsea", "coffee"):
        for p in sorted((folder / name).glob("*.png"))[:2]:
            (root / name / p.name).write_bytes(p.read_bytes())
    (root / "astronaut" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    result, got = evaluate(root, tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    recalls = {c["class"]: c["recall"] for c in got["per_class"]}
    assert recalls["astronaut"] is None and got["images"] == 4
    assert got["mean_per_class_recall"] == pytest.approx((recalls["chelsea"] + recalls["coffee"]) / 2)
    assert "(over 2 of 3 classes: none of astronaut's images decoded)" in result.stdout


def test_class_prompts_in_more_than_one_pass_are_shown_on_the_progress():
    """ImageNet's 1,000 classes with OpenAI's 80 prompts are minutes of text tower on a CPU: the
    passes advance a "class prompts" bar to the prompts' count; one pass shows no bar of its own."""
    from fastlaion.dataset.classify import class_embeddings

    class Recording:
        def __init__(self):
            self.calls = []

        def start(self, what, total):
            self.calls.append(("start", what, total))

        def advance(self, n=1):
            self.calls.append(("advance", n))

        def stop(self):
            self.calls.append(("stop",))

    s = scorer()
    many, one = Recording(), Recording()
    class_embeddings(s, ("cat", "dog", "space rocket"), TEMPLATES, many, per_pass=4)
    class_embeddings(s, ("cat", "dog", "space rocket"), TEMPLATES, one, per_pass=6)
    assert many.calls == [("start", "class prompts", 6), ("advance", 4), ("advance", 2), ("stop",)]
    assert one.calls == []
