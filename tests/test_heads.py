"""LAION's heads against the real published weights (../shared/data/models) and independent maths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastlaion.config import ConfigError
from fastlaion.heads import (
    KNOWN_WEIGHTS, AestheticV2, WatermarkDetector, load_aesthetic_head, load_nsfw_head, resolve_weights,
    sha256_file, watermark_model,
)

MODELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "models"
needs_models = pytest.mark.skipif(not MODELS.is_dir(), reason=f"real LAION heads not found at {MODELS}")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def nsfw_by_hand(state: dict[str, torch.Tensor], emb: np.ndarray) -> np.ndarray:
    """The documented architecture in plain numpy, float64."""
    x = (emb - state["norm.mean"].double().numpy()) / np.sqrt(state["norm.variance"].double().numpy())
    n = len([k for k in state if k.startswith("linear_") and k.endswith(".weight")])
    for i in range(1, n + 1):
        x = x @ state[f"linear_{i}.weight"].double().numpy().T + state[f"linear_{i}.bias"].double().numpy()
        if i < n:
            x = np.maximum(x, 0)
    return 1 / (1 + np.exp(-x[:, 0]))


@needs_models
@pytest.mark.parametrize("name, dim, arch", [("nsfw_head_vit_b_32.pth", 512, "b_32"), ("nsfw_head_vit_l_14.pth", 768, "l_14")])
def test_real_nsfw_heads_match_the_documented_architecture(name, dim, arch):
    path = MODELS / name
    head = load_nsfw_head(str(path))
    assert head.embed_dim == dim
    state = torch.load(path, map_location="cpu", weights_only=True)
    rng = np.random.default_rng(0)
    real = np.concatenate([np.load(MODELS / "aesthetic_v1_rating_embeddings" / f"vit_{arch}_rating{i}.npy")
                           for i in range(10)])
    emb = np.concatenate([unit(rng.normal(size=(32, dim))), unit(real)]).astype(np.float32)
    got = head(torch.from_numpy(emb)).numpy()
    want = nsfw_by_hand(state, emb.astype(np.float64))
    assert got.shape == (42,) and ((got >= 0) & (got <= 1)).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert got.std() > 1e-3  # the head does discriminate between inputs


@needs_models
@pytest.mark.parametrize("arch, dim", [("b_32", 512), ("l_14", 768)])
def test_real_aesthetic_v1_scores_rating_embeddings_in_increasing_order(arch, dim):
    head = load_aesthetic_head(str(MODELS / f"aesthetic_v1_vit_{arch}_linear.pth"), version=1)
    emb = np.concatenate([np.load(MODELS / "aesthetic_v1_rating_embeddings" / f"vit_{arch}_rating{i}.npy")
                          for i in range(10)])
    assert emb.shape == (10, dim)
    scores = head(torch.from_numpy(unit(emb).astype(np.float32))).numpy()
    assert (np.diff(scores) > 0).all(), scores


@needs_models
def test_known_weights_hashes_are_those_of_the_published_files():
    for name, file in [("nsfw-vit-b-32", "nsfw_head_vit_b_32.pth"), ("nsfw-vit-l-14", "nsfw_head_vit_l_14.pth"),
                       ("aesthetic-v1-vit-b-32", "aesthetic_v1_vit_b_32_linear.pth"),
                       ("aesthetic-v1-vit-l-14", "aesthetic_v1_vit_l_14_linear.pth")]:
        assert KNOWN_WEIGHTS[name].sha256 == sha256_file(MODELS / file)


def test_known_weights_come_from_the_cache_and_a_bad_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLAION_WEIGHTS_CACHE", str(tmp_path))
    known = KNOWN_WEIGHTS["aesthetic-v1-vit-b-32"]
    cached = tmp_path / f"aesthetic-v1-vit-b-32-{known.sha256[:12]}.pth"
    cached.write_bytes(b"tampered")
    with pytest.raises(ConfigError, match="sha256"):
        resolve_weights("aesthetic-v1-vit-b-32", "--aesthetic-v1")
    assert not cached.exists()  # removed, so the next run downloads afresh


def test_aesthetic_v2_architecture_loads_its_state_dict_layout(tmp_path):
    torch.manual_seed(0)
    model = AestheticV2()
    assert [k for k in model.state_dict() if k.endswith("weight")] == [
        "layers.0.weight", "layers.2.weight", "layers.4.weight", "layers.6.weight", "layers.7.weight"]
    path = tmp_path / "v2.pth"
    torch.save(model.state_dict(), path)
    loaded = load_aesthetic_head(str(path), version=2)
    x = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    np.testing.assert_allclose(loaded(x).numpy(), model.eval()(x).numpy(), rtol=1e-6)
    with pytest.raises(ConfigError, match="not an aesthetic V1"):
        load_aesthetic_head(str(path), version=1)


def test_bad_weights_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_nsfw_head(str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not torch")
    with pytest.raises(ConfigError, match="not a PyTorch checkpoint"):
        load_nsfw_head(str(junk))
    torch.save({"weight": torch.zeros(1, 4)}, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="NSFW head"):
        load_nsfw_head(str(tmp_path / "wrong.pth"))
    torch.save(torch.zeros(4), tmp_path / "tensor.pth")
    with pytest.raises(ConfigError, match=r"not a PyTorch state dict \(it holds a Tensor\)"):
        load_nsfw_head(str(tmp_path / "tensor.pth"))


LOADERS = {  # each option's loader, as `fastlaion run` calls it
    "--nsfw-head": load_nsfw_head,
    "--aesthetic-v1": lambda source: load_aesthetic_head(source, version=1),
    "--aesthetic-v2": lambda source: load_aesthetic_head(source, version=2),
    "--watermark-model": lambda source: WatermarkDetector.load(source, torch.device("cpu")),
}


def load_error(flag: str, source: Path | str) -> str:
    with pytest.raises(ConfigError) as e:
        LOADERS[flag](str(source))
    return str(e.value)


@needs_models
def test_weights_that_do_not_fit_their_head_are_refused_in_one_line(tmp_path):
    """Each is refused when it loads, in one line saying what does not fit: an NSFW head whose
    layers do not chain loaded and then failed on the run's first batch, with a traceback; a V1
    weight that is no matrix raised IndexError; a V2 or watermark mismatch printed torch's
    multi-line message (or, for the watermark, only its first line, which names nothing)."""
    nsfw = torch.load(MODELS / "nsfw_head_vit_b_32.pth", weights_only=True)
    cases = [
        (load_nsfw_head, {**nsfw, "norm.mean": torch.zeros(768), "norm.variance": torch.ones(768)},
         "norm.mean holds (768,) values, linear_1 takes 512"),
        (load_nsfw_head, {**nsfw, "linear_2.weight": torch.zeros(32, 16)}, "linear_1 gives 32 values, linear_2 takes 16"),
        (LOADERS["--aesthetic-v1"], {"weight": torch.zeros(512), "bias": torch.zeros(1)},
         "not an aesthetic V1 state dict (its weight is no matrix)"),
        (LOADERS["--aesthetic-v1"], {"weight": 3, "bias": torch.zeros(1)}, "not a PyTorch state dict (its 'weight' holds a int)"),
        (LOADERS["--aesthetic-v2"], {**AestheticV2(512).state_dict(), "layers.2.weight": torch.zeros(100, 1024)},
         "not an aesthetic V2 state dict (size mismatch for layers.2.weight: copying a param with shape "
         "torch.Size([100, 1024]) from checkpoint, the shape in current model is torch.Size([128, 1024]).)"),
        (LOADERS["--watermark-model"], nsfw, "weights do not fit efficientnet_b3a's head (Missing key(s) in "
                                             'state_dict: "conv_stem.weight", "bn1.weight"'),
    ]
    for i, (load, state, says) in enumerate(cases):
        path = tmp_path / f"{i}.pth"
        torch.save(state, path)
        with pytest.raises(ConfigError) as e:
            load(str(path))
        assert says in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < len(str(path)) + 300, str(e.value)


@pytest.mark.parametrize("flag", list(LOADERS))
def test_a_file_that_is_no_checkpoint_says_so_with_its_option(tmp_path, flag):
    """A text file given as weights: torch's weights-only unpickler fails on it with whatever its
    bytes lead to ("KeyError: 101" on "hello", "IndexError: pop from empty list" on "every"): the
    user is told what the file is, once, with the option that named it."""
    notes = tmp_path / "notes.txt"
    for text in ("hello world\n", "every line of my notes\n"):
        notes.write_text(text)
        assert load_error(flag, notes) == (f"{flag} {notes}: not a PyTorch checkpoint (torch.load failed: the file "
                                           "is neither a zip archive nor a pickle, the formats torch.save writes)")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert load_error(flag, empty) == f"{flag} {empty}: not a PyTorch checkpoint (the file is empty)"
    torch.save(torch.nn.Linear(4, 1), tmp_path / "module.pth")  # the model, not its state_dict()
    message = load_error(flag, tmp_path / "module.pth")
    assert message.startswith(f"{flag} {tmp_path / 'module.pth'}: a checkpoint of more than tensors")
    assert "torch.nn.modules.linear.Linear" in message and message.endswith("save the model's state_dict() instead")


@pytest.mark.parametrize("flag", list(LOADERS))
def test_a_truncated_checkpoint_is_named_once(tmp_path, flag):
    real = MODELS / "nsfw_head_vit_b_32.pth"
    if real.is_file():
        whole = real.read_bytes()
    else:
        torch.save({"weight": torch.zeros(1, 512)}, tmp_path / "whole.pth")
        whole = (tmp_path / "whole.pth").read_bytes()
    cut = tmp_path / "trunc.pth"
    cut.write_bytes(whole[: len(whole) // 2])
    message = load_error(flag, cut)
    assert message.startswith(f"{flag} {cut}: not a PyTorch checkpoint: truncated or corrupted (torch.load failed: ")
    assert message.count(flag) == 1 and message.count(str(cut)) == 1, message


def test_a_missing_file_lists_only_the_names_its_option_takes(tmp_path, monkeypatch):
    import fastlaion.heads

    def no_download(url, target, flag):
        raise AssertionError(f"{flag} tried to download {url}")

    monkeypatch.setattr(fastlaion.heads, "_download", no_download)
    missing = tmp_path / "nope.pth"
    assert load_error("--nsfw-head", missing) == (f"--nsfw-head {str(missing)!r}: no such file (give a path, an "
                                                  "http(s) URL or one of: nsfw-vit-b-32, nsfw-vit-l-14)")
    assert load_error("--aesthetic-v1", missing) == (
        f"--aesthetic-v1 {str(missing)!r}: no such file (give a path, an http(s) URL or one of: "
        "aesthetic-v1-vit-b-32, aesthetic-v1-vit-b-16, aesthetic-v1-vit-l-14)")
    for flag in ("--aesthetic-v2", "--watermark-model"):
        assert load_error(flag, missing) == f"{flag} {str(missing)!r}: no such file (give a path or an http(s) URL)"
    # another option's name is no name here: nothing is downloaded for it
    assert "no such file" in load_error("--aesthetic-v2", "nsfw-vit-b-32")
    assert "no such file" in load_error("--nsfw-head", "aesthetic-v1-vit-b-32")


def test_watermark_detector_shapes_and_batching_with_random_weights(tmp_path):
    torch.manual_seed(0)
    model = watermark_model()
    path = tmp_path / "wm.pth"
    torch.save(model.state_dict(), path)
    det = WatermarkDetector.load(str(path), torch.device("cpu"))
    pixels = torch.randint(0, 256, (3, 256, 256, 3), dtype=torch.uint8)
    p = det(pixels)
    assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()
    np.testing.assert_allclose(det(pixels[1:2]).numpy(), p[1:2].numpy(), atol=1e-5)  # batch-independent
    torch.save({"classifier.weight": torch.zeros(2, 1536)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="efficientnet_b3a"):
        WatermarkDetector.load(str(tmp_path / "other.pth"), torch.device("cpu"))


def test_watermark_detector_in_bfloat16_runs_the_network_in_bfloat16_and_returns_float32(tmp_path):
    """The dtype bench/tags.py measures the detector in: weights and input in bfloat16, pwatermark
    back in float32 (what the Parquet column holds), and close to float32's on this uncalibrated
    random network (0.50 +- 0.001 everywhere: it says nothing of the trained detector's error)."""
    torch.manual_seed(0)
    path = tmp_path / "wm.pth"
    torch.save(watermark_model().state_dict(), path)
    det = WatermarkDetector.load(str(path), torch.device("cpu"), dtype=torch.bfloat16)
    fp32 = WatermarkDetector.load(str(path), torch.device("cpu"))
    seen = []
    det.model.conv_stem.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].dtype))
    pixels = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    p = det(pixels)
    assert seen == [torch.bfloat16] and {t.dtype for t in det.model.parameters()} == {torch.bfloat16}
    assert p.dtype == torch.float32 and p.shape == (2,) and ((p >= 0) & (p <= 1)).all()
    assert fp32.dtype == torch.float32 and {t.dtype for t in fp32.model.parameters()} == {torch.float32}
    np.testing.assert_allclose(p.numpy(), fp32(pixels).numpy(), atol=0.01)


def test_pwatermark_is_laions_softmax_first_class_on_its_resized_normalised_pixels(photos):
    """LAION.md step 10, as LAION-5B-WatermarkDetection computes it: the image through
    torchvision's Resize((256, 256)) (bilinear, the aspect ratio not kept), ToTensor and
    Normalize(ImageNet mean, std), the network's two logits through a softmax, and pwatermark the
    first of the two (its `water_sym, clear_sym = sym`). Checked against that recipe written out
    with torchvision on a real photograph, and on a network whose classifier's last layer is made
    to answer (3, -3) whatever the image: pwatermark is then 1 / (1 + e^-6) = 0.99753, (-3, 3) its
    complement, so taking the second class or no softmax would show."""
    import torchvision.transforms as T
    from PIL import Image

    torch.manual_seed(0)
    model = watermark_model().eval()
    det = WatermarkDetector(model, torch.device("cpu"))
    images = [Image.fromarray(photos[name]) for name in ("chelsea", "coffee")]  # 451x300, 600x400
    laion = T.Compose([T.Resize((256, 256)), T.ToTensor(),
                       T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        want = torch.softmax(model(torch.stack([laion(im) for im in images])), dim=1)[:, 0]
    # the decoder's watermark input: the same squash to 256 x 256 (tests/test_decode.py checks it)
    pixels = torch.from_numpy(np.stack([np.asarray(im.resize((256, 256), Image.Resampling.BILINEAR))
                                        for im in images]))
    seen: list[torch.Tensor] = []
    hook = model.conv_stem.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach().clone()))
    got = det(pixels)
    hook.remove()
    # the network's input itself: an uncalibrated random network answers about 0.5 for anything
    np.testing.assert_allclose(seen[0].numpy(), torch.stack([laion(im) for im in images]).numpy(), atol=1e-5)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)

    last = model.classifier[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([3.0, -3.0]))
    np.testing.assert_allclose(det(pixels).numpy(), [1 / (1 + np.exp(-6.0))] * 2, rtol=1e-6)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([-3.0, 3.0]))
    np.testing.assert_allclose(det(pixels).numpy(), [1 / (1 + np.exp(6.0))] * 2, rtol=1e-5)
