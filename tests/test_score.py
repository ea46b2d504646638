import numpy as np
import pytest
import torch

from fastlaion.config import ConfigError, ScoreConfig
from fastlaion.ops import paired_cosine, paired_cosine_reference
from fastlaion.score import TINY_MODEL, Scorer, pick_device


def test_paired_cosine_reference_against_numpy():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(33, 40, generator=g), torch.randn(33, 40, generator=g)
    want = (a.numpy() * b.numpy()).sum(1) / (np.linalg.norm(a.numpy(), axis=1) * np.linalg.norm(b.numpy(), axis=1))
    np.testing.assert_allclose(paired_cosine(a.half(), b.half(), impl="auto").numpy(), want, atol=2e-3)
    np.testing.assert_allclose(paired_cosine_reference(a, b).numpy(), want, atol=1e-5)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        paired_cosine(a, b, impl="cuda")
    with pytest.raises(ValueError):
        paired_cosine(a, b[:3])


def test_tiny_scorer_embeds_in_batches_consistently():
    torch.manual_seed(0)
    s = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none"), pick_device("cpu"))
    assert s.clip_spec.size == (224, 224) and s.embed_dim == 512
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    texts = ["a cat", "a dog", "a cup of coffee", "", "x" * 5000]
    img, txt, sim = s.score(pixels, texts)
    assert img.shape == txt.shape == (5, 512) and img.dtype == np.float16 and sim.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)
    img1, txt1, sim1 = s.score(pixels[2:3], texts[2:3])  # a batch of one gives the same row
    np.testing.assert_allclose(sim1, sim[2:3], atol=1e-4)


def test_bad_model_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not an open_clip architecture.*ViT-B-32"):
        Scorer(ScoreConfig(model="ViT-B-33", pretrained="none"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="not a known tag"):
        Scorer(ScoreConfig(model=TINY_MODEL, pretrained="laion9b"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        Scorer(ScoreConfig(model=TINY_MODEL, pretrained=str(tmp_path / "nope" / "x.pt")), torch.device("cpu"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot load"):
        Scorer(ScoreConfig(model=TINY_MODEL, pretrained=str(bad)), torch.device("cpu"))


def test_pipeline_preprocessing_gives_open_clips_embeddings_on_real_photos(photos):
    """Our decode (libjpeg-turbo scaled decode, our resize/crop) + Scorer against open_clip's own
    `preprocess` + model on the same JPEG bytes: same random weights, cosine above 0.999."""
    import io

    import open_clip
    from PIL import Image

    from fastlaion.config import DecodeConfig
    from fastlaion.decode import Decoder
    from helpers import encode

    torch.manual_seed(0)
    s = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none"), torch.device("cpu"))
    preprocess = open_clip.image_transform(s.clip_spec.size, is_train=False)
    decoder = Decoder(DecodeConfig(), s.clip_spec)
    for name, arr in photos.items():
        body = encode(arr, "JPEG")
        ours = s.embed_images(decoder(body).clip_input[None])[0]
        with torch.no_grad():
            ref = s.model.encode_image(preprocess(Image.open(io.BytesIO(body)).convert("RGB"))[None])[0]
        cos = torch.nn.functional.cosine_similarity(ours, ref, dim=0).item()
        assert cos > 0.999, (name, cos)


def test_precision_choice():
    from fastlaion.score import pick_precision

    assert pick_precision("auto", torch.device("cpu")) == "fp32"
    assert pick_precision("auto", torch.device("cuda")) == "fp16"
    assert pick_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match="--precision"):
        ScoreConfig(precision="fp8").validate()
