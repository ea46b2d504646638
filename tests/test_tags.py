"""The tag stage in `fastlaion run`: language groups and their thresholds, LAION's heads, watermark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from fastlaion.cli import app
from fastlaion.heads import watermark_model
from fastlaion.server import LoopbackServer, Served
from helpers import encode

MODELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "models"
runner = CliRunner()

CAPTIONS = ["a photograph of a cat sleeping on a sofa", "une photo d'un chat qui dort sur un canapé",
            "a cup of black coffee on a wooden table", "ein Foto einer Katze, die auf einem Sofa schläft",
            "12345"]


def tiny_checkpoint(path: Path, seed: int) -> Path:
    import open_clip

    from fastlaion.score import TINY_MODEL, register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    torch.save({"state_dict": open_clip.create_model(TINY_MODEL).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def served(photos):
    names = list(photos)
    files = {f"{i}.jpg": Served(encode(photos[names[i % len(names)]]), "image/jpeg") for i in range(len(CAPTIONS))}
    with LoopbackServer(files) as server:
        yield server


def run(tmp_path: Path, server: LoopbackServer, *flags: str) -> pl.DataFrame:
    inp = tmp_path / "in.parquet"
    pl.DataFrame({"url": [server.url(f"{i}.jpg") for i in range(len(CAPTIONS))], "caption": CAPTIONS}).write_parquet(inp)
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(inp), "-o", str(out), "--allow-private-networks", "--model", "fastlaion-tiny", "--no-progress", *flags])
    assert result.exit_code == 0, result.output
    return pl.read_parquet(out / "00000.parquet")


def test_language_groups_get_their_own_threshold(tmp_path, served):
    t = run(tmp_path, served, "--pretrained", "none", "--min-similarity", "1.0", "--min-similarity-multi", "-1")
    assert t["language"].to_list()[:4] == ["en", "fr", "en", "de"]
    assert t["language_group"].to_list() == ["en", "multi", "en", "multi", "nolang"]
    # English pairs face 1.0 (impossible), the others -1 (always passes)
    assert t["status"].to_list() == ["dropped", "kept", "dropped", "kept", "kept"]
    assert t.filter(pl.col("status") == "dropped")["reason"].unique().to_list() == ["low_similarity"]
    assert "punsafe" not in t.columns and "aesthetic" not in t.columns  # auto: no LAION head for this model
    assert "pwatermark" not in t.columns and "aesthetic_v2" not in t.columns  # no weights given: no column


def test_auto_heads_follow_openais_weights_whatever_their_name(tmp_path):
    """`--nsfw-head auto` / `--aesthetic-v1 auto` picked LAION's heads only for `--pretrained
    openai` with the architecture named exactly ViT-B-32 or ViT-L-14: the -quickgelu name the
    README gives for OpenAI's weights, and a local copy of their download, got no punsafe and no
    aesthetic. Now they get the heads; other weights (another tag, a file that is not OpenAI's,
    random ones) still do not."""
    from fastlaion.config import ScoreConfig
    from fastlaion.tags import _AUTO_AESTHETIC_V1, _AUTO_NSFW, _auto

    def picked(model: str, pretrained: str | None) -> tuple[str | None, str | None]:
        score = ScoreConfig(model=model, pretrained=pretrained)
        return _auto("auto", _AUTO_NSFW, score, "punsafe"), _auto("auto", _AUTO_AESTHETIC_V1, score, "aesthetic")

    cached = tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "abc" / "w.bin"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")  # recognised by its Hugging Face cache folder, as for QuickGELU
    other = tmp_path / "ViT-B-32.pt"
    other.write_bytes(b"not OpenAI's bytes")  # OpenAI's file name, another digest
    b32 = ("nsfw-vit-b-32", "aesthetic-v1-vit-b-32")
    assert picked("ViT-B-32", "openai") == b32 and picked("ViT-B-32-quickgelu", "openai") == b32
    assert picked("ViT-B-32", str(cached)) == b32 and picked("ViT-B-32-quickgelu", str(cached)) == b32
    assert picked("ViT-L-14-quickgelu", "openai") == ("nsfw-vit-l-14", "aesthetic-v1-vit-l-14")
    for model, pretrained in (("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-B-32", str(other)), ("ViT-B-32", None),
                              ("ViT-B-32-quickgelu", "metaclip_400m"), ("ViT-H-14", "openai")):
        assert picked(model, pretrained) == (None, None), (model, pretrained)


def test_a_similarity_equal_to_its_threshold_is_kept(tmp_path, served):
    """LAION keeps a pair at similarity >= the threshold (0.28 English, 0.26 the others): a row
    exactly at its group's threshold is kept, one just under it dropped, for both groups."""
    ckpt = str(tiny_checkpoint(tmp_path / "w.pt", 3))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = run(tmp_path / "a", served, "--pretrained", ckpt, "--min-similarity", "-1", "--min-similarity-multi", "-1")
    sim = first["similarity"].to_list()
    groups = first["language_group"].to_list()
    en = sorted((s for s, g in zip(sim, groups) if g == "en"))
    other = sorted((s for s, g in zip(sim, groups) if g != "en"))
    t = run(tmp_path / "b", served, "--pretrained", ckpt, "--min-similarity", repr(en[-1]),
            "--min-similarity-multi", repr(other[-1]))
    # Each row against its group's threshold, on this run's own scores: a rerun's can differ from
    # the first's in the last float32 bit (batches made in another order sum in another order),
    # so a row may sit just off the threshold; on the threshold (the usual case) it is kept.
    limit = {"en": np.float32(en[-1]), "other": np.float32(other[-1])}
    for s, g, st in zip(t["similarity"].to_list(), t["language_group"].to_list(), t["status"].to_list()):
        at = limit["en" if g == "en" else "other"]
        assert (st == "kept") == bool(np.float32(s) >= at), (s, g, st, at)
    assert t["status"].to_list().count("kept") >= 1, (sim, groups, t["status"].to_list())


def test_no_language_means_one_threshold_and_no_columns(tmp_path, served):
    t = run(tmp_path, served, "--pretrained", "none", "--no-language", "--min-similarity", "1.0",
            "--min-similarity-multi", "-1")
    assert "language" not in t.columns
    assert t["status"].to_list() == ["dropped"] * 5


def test_multilingual_model_scores_the_non_english_rows(tmp_path, served):
    import open_clip

    main = tiny_checkpoint(tmp_path / "main.pt", 1)
    multi = tiny_checkpoint(tmp_path / "multi.pt", 2)
    t = run(tmp_path, served, "--pretrained", str(main), "--multilingual-model", "fastlaion-tiny",
            "--multilingual-pretrained", str(multi), "--min-similarity", "-1", "--min-similarity-multi", "-1")
    assert t["similarity_model"].to_list() == ["fastlaion-tiny"] * 5
    img = np.load(tmp_path / "out" / "00000_img_emb.npy").astype(np.float32)
    txt = np.load(tmp_path / "out" / "00000_txt_emb.npy").astype(np.float32)
    en = (t["language_group"] == "en").to_numpy()
    # English rows: the main model's similarity (its embeddings are the ones stored)
    np.testing.assert_allclose((img * txt).sum(1)[en], t["similarity"].to_numpy()[en], atol=5e-3)
    # others: the multilingual model's own text tower, checked independently
    model = open_clip.create_model("fastlaion-tiny", pretrained=str(multi)).eval()
    tok = open_clip.get_tokenizer("fastlaion-tiny")
    with torch.no_grad():
        t_multi = torch.nn.functional.normalize(model.encode_text(tok([CAPTIONS[1]])), dim=-1)[0].numpy()
    assert not np.allclose(t_multi, txt[1], atol=1e-2)  # a different model really was used
    assert abs(t["similarity"][1] - (img[1] * txt[1]).sum()) > 1e-3


@pytest.mark.skipif(not MODELS.is_dir(), reason="real LAION heads not found")
def test_laion_heads_and_watermark_columns(tmp_path, served):
    torch.manual_seed(0)
    wm = tmp_path / "wm.pth"
    torch.save(watermark_model().state_dict(), wm)
    t = run(tmp_path, served, "--pretrained", "none", "--min-similarity", "-1",
            "--nsfw-head", str(MODELS / "nsfw_head_vit_b_32.pth"),
            "--aesthetic-v1", str(MODELS / "aesthetic_v1_vit_b_32_linear.pth"), "--watermark-model", str(wm))
    assert t["status"].to_list() == ["kept"] * 5
    for col in ("punsafe", "aesthetic", "pwatermark"):
        assert t[col].null_count() == 0, col
    assert t["punsafe"].is_between(0, 1).all() and t["pwatermark"].is_between(0, 1).all()
    # aesthetic = the published linear head on the stored image embeddings, computed by hand
    img = np.load(tmp_path / "out" / "00000_img_emb.npy").astype(np.float64)
    state = torch.load(MODELS / "aesthetic_v1_vit_b_32_linear.pth", weights_only=True)
    want = img @ state["weight"].double().numpy()[0] + state["bias"].double().numpy()[0]
    np.testing.assert_allclose(t["aesthetic"].to_numpy(), want, atol=2e-2)
    # punsafe = LAION's NSFW head on the same L2-normalised image embeddings (LAION.md step 9),
    # the published architecture written out: (x - mean) / sqrt(variance), ReLU between the
    # linear layers, a sigmoid at the end; not on the caption's embeddings
    nsfw = torch.load(MODELS / "nsfw_head_vit_b_32.pth", weights_only=True)
    txt = np.load(tmp_path / "out" / "00000_txt_emb.npy").astype(np.float64)
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-3)

    def punsafe_of(emb: np.ndarray) -> np.ndarray:
        x = (emb - nsfw["norm.mean"].double().numpy()) / np.sqrt(nsfw["norm.variance"].double().numpy())
        for i in range(1, 4):
            x = x @ nsfw[f"linear_{i}.weight"].double().numpy().T + nsfw[f"linear_{i}.bias"].double().numpy()
            x = np.maximum(x, 0) if i < 3 else x
        return 1 / (1 + np.exp(-x[:, 0]))

    np.testing.assert_allclose(t["punsafe"].to_numpy(), punsafe_of(img), atol=1e-4)
    assert np.abs(punsafe_of(txt) - punsafe_of(img)).max() > 1e-3  # which embedding goes in shows


def test_head_for_another_embedding_size_is_a_clear_error(tmp_path, served):
    if not MODELS.is_dir():
        pytest.skip("real LAION heads not found")
    inp = tmp_path / "in.parquet"
    pl.DataFrame({"url": [served.url("0.jpg")], "caption": ["a cat"]}).write_parquet(inp)
    result = runner.invoke(app, ["run", str(inp), "-o", str(tmp_path / "o"), "--model", "fastlaion-tiny",
                                 "--pretrained", "none", "--nsfw-head", str(MODELS / "nsfw_head_vit_l_14.pth")])
    assert result.exit_code == 2
    assert "takes 768-d embeddings" in result.output


@pytest.mark.skipif(not MODELS.is_dir(), reason="real LAION heads not found")
def test_a_resume_takes_the_same_head_file_named_otherwise_and_refuses_a_changed_one(tmp_path, served, monkeypatch):
    """The run's head named by a relative path, the rerun's by an absolute one (from another
    folder): the same file, so it resumes, as for an input file; it was refused as "other
    settings". A head file rewritten since would tag the shards left with other values: refused."""
    head = tmp_path / "nsfw.pth"
    head.write_bytes((MODELS / "nsfw_head_vit_b_32.pth").read_bytes())
    inp = tmp_path / "in.parquet"
    pl.DataFrame({"url": [served.url(f"{i}.jpg") for i in range(len(CAPTIONS))], "caption": CAPTIONS}).write_parquet(inp)
    out = tmp_path / "out"
    flags = ["run", str(inp), "-o", str(out), "--allow-private-networks", "--model", "fastlaion-tiny", "--pretrained",
             "none", "--no-progress", "--shard-size", "2", "--min-similarity", "-1"]
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [*flags, "--nsfw-head", "nsfw.pth"])
    assert result.exit_code == 0, result.output
    (out / "00002_stats.json").unlink()  # the last shard unfinished, as a run stopped there leaves it
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = runner.invoke(app, [*flags, "--nsfw-head", str(head)])
    assert result.exit_code == 0, result.output
    assert "2 of 3 shards already complete" in result.output
    table = pl.concat([pl.read_parquet(p) for p in sorted(out.glob("0*.parquet"))])
    assert table["punsafe"].null_count() == 0 and table.height == len(CAPTIONS)
    state = torch.load(head, weights_only=True)
    torch.save({**state, "linear_3.bias": state["linear_3.bias"] + 1}, head)
    (out / "00002_stats.json").unlink()
    result = runner.invoke(app, [*flags, "--nsfw-head", str(head)])
    assert result.exit_code == 2
    assert f"--nsfw-head {head} changed since the run in {out} began" in result.output


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp32"])
def test_the_watermark_detector_stays_float32_whatever_the_precision(tmp_path, precision):
    """--precision is the CLIP towers': bfloat16 moved a calibrated random detector's pwatermark by
    up to 0.52 (bench/RESULTS.md), so the detector keeps float32 until the real weights say otherwise."""
    from fastlaion.config import ScoreConfig, TagConfig
    from fastlaion.tags import Tagger

    wm = tmp_path / "wm.pth"
    torch.save(watermark_model().state_dict(), wm)
    tagger = Tagger(TagConfig(language=False, nsfw_head=None, aesthetic_v1=None, watermark_model=str(wm)),
                    ScoreConfig(precision=precision), None, torch.device("cpu"))
    assert tagger.watermark.dtype == torch.float32
    assert {t.dtype for t in tagger.watermark.model.parameters()} == {torch.float32}
