import functools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastlaion.config import ConfigError, ScoreConfig
from fastlaion.ops import paired_cosine, paired_cosine_reference
from fastlaion.score import (TINY_MODEL, CachedClipTokenizer, FusedMlp, HalfLayerNorm, PatchEmbedding, PrefixTextEncoder, Scorer,
                             clip_options, fold_quick_gelu, half_layer_norms, onednn_fusion_works, pick_device,
                             register_model_configs)


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


@pytest.fixture(scope="module")
def random_scorer():
    """random_scorer(model, open_clip_layers=False): the CPU Scorer of that model's random weights
    (--pretrained none: the same weights at every build), made once for this module; ViT-B-32's
    build (its random init) takes seconds of CPU. For tests that only read the Scorer. In fp32,
    as open_clip's model it is compared with (auto would be bf16 on an AMX CPU, as this one)."""
    made = {}

    def get(model: str, open_clip_layers: bool = False) -> Scorer:
        if (model, open_clip_layers) not in made:
            made[model, open_clip_layers] = Scorer(ScoreConfig(model=model, pretrained="none", precision="fp32"),
                                                   pick_device("cpu"),
                                                   open_clip_layers=open_clip_layers)
        return made[model, open_clip_layers]
    return get


# Captions of every length class: empty, short, each bucket edge, over the 77-token context.
PREFIX_TEXTS = ["", "a cat", "a photograph of a cat on a red sofa in the sun", "über straße 東京 " * 5,
                " ".join(["word"] * 14), " ".join(["word"] * 15), " ".join(["word"] * 30), " ".join(["word"] * 47),
                " ".join(["word"] * 60), "word " * 100, "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2]


@pytest.mark.parametrize("model", [TINY_MODEL, "ViT-B-32"])
def test_text_features_through_the_used_positions_equal_open_clip(model, random_scorer):
    """The prefix encoder against open_clip's own encode_text over all 77 positions, with
    captions of every length mixed so each bucket runs and rows come back in their order.
    ViT-B-32 (seconds of CPU for each of the seven forwards of the whole batch on 2 cores)
    takes each caption once, longest and shortest interleaved; the tiny model takes each twice."""
    s = random_scorer(model)
    assert s._text_prefix is not None and s._text_prefix.causal_blocks
    if model == TINY_MODEL:
        texts = PREFIX_TEXTS[::-1] + PREFIX_TEXTS
    else:
        texts = PREFIX_TEXTS[1::2][::-1] + PREFIX_TEXTS[::2]
    assert sorted(texts) == sorted(PREFIX_TEXTS * (len(texts) // len(PREFIX_TEXTS)))  # every caption, as often
    used = s._text_prefix.ends(s.tokenizer(texts)) + 1
    for low, high in ((0, 16), (16, 32), (32, 48), (48, 77)):  # every bucket gets rows
        assert any(low < int(n) <= high for n in used), (low, high, used)
    assert int(used.max()) == 77
    with torch.inference_mode():
        want = s.model.encode_text(s.tokenizer(texts))
    got = s.text_features(texts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    prefix = s._text_prefix
    with torch.inference_mode():  # each way on its own: packed (text_features' above), buckets, one pass
        for batch in (texts, texts[:4], texts[1:2], ["", "a cat"], ["a cat", ""], [""]):
            tokens = s.tokenizer(batch)
            reference = want if batch is texts else s.model.encode_text(tokens)
            for way in (prefix.encode_packed, prefix.encode_buckets, prefix.encode_one_pass):
                torch.testing.assert_close(way(tokens, torch.device("cpu")), reference,
                                           atol=1e-5, rtol=1e-5, msg=lambda m, way=way, batch=batch: f"{way}: {batch}: {m}")
        # packed, the positions of the batch's longest caption run for the others only in attention
        tokens = s.tokenizer(texts)
        used = prefix.ends(tokens) + 1
        rows = []
        hook = s.model.transformer.resblocks[0].mlp.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
        try:
            prefix.encode_packed(tokens, torch.device("cpu"))
        finally:
            hook.remove()
        assert rows == [int(used.sum())] and rows[0] < len(texts) * int(used.max()) / 2
        # and attention on a grid per length group (up to 16 positions, 32, 48, more), each as long
        # as its group's longest caption, not one grid of the batch's longest for every caption
        shapes = []
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def recording(q, *args, **kwargs):
            shapes.append(tuple(q.shape[:1] + q.shape[2:3]))  # (captions, length)
            return sdpa(q, *args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
            prefix.encode_packed(tokens, torch.device("cpu"))
        groups = [[int(u) for u in used if low < int(u) <= high] for low, high in ((0, 16), (16, 32), (32, 48), (48, 77))]
        assert shapes == [(len(g), max(g)) for g in groups] * len(s.model.transformer.resblocks)
    # Cut one position short of a caption's end-of-text token, the embedding changes: the test sees it.
    with torch.inference_mode():
        tokens = s.tokenizer(texts[2:3])
        end = int(s._text_prefix.ends(tokens)[0])
        short = s._text_prefix._encode_prefix(tokens[:, :end], torch.tensor([end - 1]), end)
    assert (short - want[2:3]).abs().max() > 1e-2


@pytest.mark.parametrize("prefix", [True, False])
def test_a_repeated_caption_runs_through_the_text_tower_once(prefix):
    """A batch where captions repeat (as one page's alt text does over its images): the tower
    sees each distinct caption once, in first-appearance order, and every row, copies included,
    gets open_clip's embedding of its own caption, in the batch's order."""
    torch.manual_seed(0)
    s = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none", precision="fp32"), pick_device("cpu"))
    if not prefix:
        s._text_prefix = None  # open_clip's encode_text path
    rows_seen: list[int] = []
    # the final layer norm sees one row a caption (packed: its end-of-text position; else its 77)
    hook = s.model.ln_final.register_forward_pre_hook(lambda _m, args: rows_seen.append(args[0].shape[0]))
    texts = ["red shoe", "a cat", "red shoe", "", "a cat", "red shoe", "blue shoe", "", "a dog"]
    try:
        got = s.text_features(texts)
    finally:
        hook.remove()
    assert sum(rows_seen) == 5  # red shoe, a cat, '', blue shoe, a dog
    with torch.inference_mode():
        want = s.model.encode_text(s.tokenizer(texts))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], got[6])  # another caption, another embedding
    # all distinct: one pass over all of them, as before
    rows_seen.clear()
    hook = s.model.ln_final.register_forward_pre_hook(lambda _m, args: rows_seen.append(args[0].shape[0]))
    try:
        s.text_features(texts[:2])
    finally:
        hook.remove()
    assert sum(rows_seen) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_text_features_through_the_used_positions_on_cuda_fp16():
    """On the GPU in fp16, where shorter sequences take other kernels: the embeddings agree with
    open_clip's 77-position ones as fp16 runs of one model agree (cosine > 0.999)."""
    torch.manual_seed(0)
    s = Scorer(ScoreConfig(model="ViT-B-32", pretrained="none"), torch.device("cuda"))
    assert s._text_prefix is not None and s.dtype == torch.float16
    texts = (PREFIX_TEXTS[::-1] + PREFIX_TEXTS) * 8
    with torch.inference_mode():
        want = s.model.encode_text(s.tokenizer(texts).to("cuda")).float()
    got = s.text_features(texts).float()
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert float(cosine.min()) > 0.999, cosine.min()


@pytest.mark.parametrize("model", [TINY_MODEL, "ViT-B-32"])
def test_image_tower_from_uint8_patches_equals_open_clips(model, random_scorer):
    """PatchEmbedding (patches cut from the channel-last uint8 pixels, one matrix product with the
    convolution's weights scaled by 1 / (255 std), centred by its bias; the blocks' attention one
    scaled_dot_product_attention each) against open_clip's encode_image of the pixels normalised
    as before, in float32 on the CPU: the same features to rounding. Black, white, random, and an
    image whose halves differ (a patch cut in the wrong order moves them)."""
    ours, theirs = random_scorer(model), random_scorer(model, open_clip_layers=True)
    assert ours._patches is not None and theirs._patches is None
    h, w = ours.clip_spec.size
    pixels = torch.randint(0, 256, (5, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pixels[0], pixels[1] = 0, 255
    pixels[2, :, : w // 2] = torch.tensor([250, 10, 10], dtype=torch.uint8)  # red left half, blue right
    pixels[2, :, w // 2:] = torch.tensor([10, 10, 250], dtype=torch.uint8)
    pixels[3] = pixels[3].flip(0)
    calls = []  # the blocks' attention: one scaled_dot_product_attention each, no mask
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), kwargs.get("is_causal"), kwargs.get("attn_mask")))
        return sdpa(q, k, v, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
        got = ours.image_features(pixels)
    want = theirs.image_features(pixels)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    transformer = ours.model.visual.transformer
    heads = transformer.resblocks[0].attn.num_heads
    tokens = 1 + (h // ours._patches.patch) * (w // ours._patches.patch)
    assert calls == [((5, heads, tokens, transformer.width // heads), False, None)] * len(transformer.resblocks)
    assert (got[0] - got[1]).abs().max() > 1e-2 and (got[2] - got[4]).abs().max() > 1e-2  # the images differ
    # the numpy input of the CPU decoders takes the same path
    torch.testing.assert_close(ours.image_features(pixels.numpy()), want, atol=1e-4, rtol=1e-4)


def test_patch_embedding_only_for_plain_patch_convolutions():
    """for_model declines a tower whose convolution is not a plain patch embedding (padding, a
    bias, overlapping strides) and a model without a VisionTransformer: open_clip's path runs."""
    import copy

    torch.manual_seed(0)
    s = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none"), pick_device("cpu"))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    assert PatchEmbedding.for_model(s.model, mean, std) is not None
    for change in ("padding", "bias", "stride"):
        model = copy.deepcopy(s.model)
        conv = model.visual.conv1
        if change == "padding":
            conv.padding = (1, 1)
        elif change == "bias":
            conv.bias = torch.nn.Parameter(torch.zeros(conv.out_channels))
        else:
            conv.stride = (conv.stride[0] // 2, conv.stride[1] // 2)
        assert PatchEmbedding.for_model(model, mean, std) is None, change
    assert PatchEmbedding.for_model(torch.nn.Linear(2, 2), mean, std) is None


def test_quick_gelu_folded_into_one_silu_gives_the_same_features():
    """fold_quick_gelu: every QuickGELU MLP of both towers runs SiLU on c_fc's output scaled by
    1.702, c_proj's weight divided by it: open_clip's features to float32 rounding; a model
    without QuickGELU is left alone."""
    import copy

    import open_clip
    from open_clip.transformer import QuickGELU

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL, pretrained=None, force_quick_gelu=True).eval()
    blocks = sum(type(m) is QuickGELU for m in model.modules())
    assert blocks >= 4
    folded = copy.deepcopy(model)
    assert fold_quick_gelu(folded) == blocks
    assert not any(type(m) is QuickGELU for m in folded.modules())
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    tokens = open_clip.get_tokenizer(TINY_MODEL)(PREFIX_TEXTS[:4])
    with torch.inference_mode():
        torch.testing.assert_close(folded.encode_image(images), model.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(folded.encode_text(tokens), model.encode_text(tokens), atol=1e-5, rtol=1e-5)
        gelu = open_clip.create_model(TINY_MODEL, pretrained=None).eval()
        gelu.load_state_dict(model.state_dict())  # the same weights with nn.GELU: other features (the test sees it)
        assert (gelu.encode_image(images) - model.encode_image(images)).abs().max() > 1e-3
    assert fold_quick_gelu(gelu) == 0


def test_openai_tags_get_the_activation_they_were_trained_with():
    """clip_options asks open_clip for QuickGELU where the tag was trained with it and the
    architecture's config does not say so (the default ViT-B-32 / openai); not for other tags, the
    -quickgelu architectures, random weights or local files."""
    assert clip_options("ViT-B-32", "openai") == {"force_quick_gelu": True}
    assert clip_options("ViT-B-32", "laion2b_s34b_b79k") == {}
    assert clip_options("ViT-B-32-quickgelu", "openai") == {}
    assert clip_options("ViT-B-32", None) == {}
    assert clip_options("ViT-B-32", __file__) == {}


def test_a_local_copy_of_openai_weights_is_known_by_its_cache_folder_or_its_digest(tmp_path):
    """A local --pretrained file that is a QuickGELU tag's download gets QuickGELU: one in a Hugging
    Face cache folder of the tag's repository, or one named as the tag's URL (OpenAI's, whose path
    is the file's sha256) with that digest; the same name with other bytes, or another folder, not."""
    import hashlib

    import open_clip

    cached = tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "abc" / "w.bin"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert clip_options("ViT-B-32", str(cached)) == {"force_quick_gelu": True}
    other = tmp_path / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "w.bin"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"weights")
    assert clip_options("ViT-B-32", str(other)) == {}

    url = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["url"]
    named = tmp_path / url.rsplit("/", 1)[-1]
    named.write_bytes(b"not OpenAI's bytes")
    assert clip_options("ViT-B-32", str(named)) == {}
    # a file whose digest is the one the URL names: register a tag as open_clip would, with this file's
    body = b"stand-in weights"
    digest = hashlib.sha256(body).hexdigest()
    fake = tmp_path / "fake.pt"
    fake.write_bytes(body)
    from open_clip import pretrained as registry

    registry._PRETRAINED["ViT-B-32"]["fastlaion_test_digest"] = registry._pcfg(
        url=f"https://example.invalid/{digest}/fake.pt", quick_gelu=True)
    try:
        assert clip_options("ViT-B-32", str(fake)) == {"force_quick_gelu": True}
        fake.write_bytes(body + b"!")
        assert clip_options("ViT-B-32", str(fake)) == {}
    finally:
        del registry._PRETRAINED["ViT-B-32"]["fastlaion_test_digest"]


def test_openai_weights_from_the_hugging_face_cache_load_with_quick_gelu(tmp_path, monkeypatch):
    """The default --model ViT-B-32 --pretrained openai, loaded offline from a Hugging Face cache
    holding (random) weights where open_clip looks for OpenAI's: the Scorer's features are those of
    the same weights in ViT-B-32-quickgelu, the architecture they were trained in, not of nn.GELU."""
    from safetensors.torch import save_file

    # the weights: the reference's own random ones (the architecture they were trained in)
    reference = Scorer(ScoreConfig(model="ViT-B-32-quickgelu", pretrained="none", precision="fp32"), torch.device("cpu"),
                       open_clip_layers=True)
    repo = tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()},
              str(repo / "snapshots" / revision / "open_clip_model.safetensors"))
    pixels = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    # the cache folder huggingface_hub looks in (HF_HUB_CACHE, which it reads once, when imported;
    # HF_HUB_OFFLINE is set by conftest.py: never the network), in this process
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with warnings.catch_warnings(record=True) as caught:  # open_clip's warning, printed once in a process
        warnings.simplefilter("always")
        s = Scorer(ScoreConfig(model="ViT-B-32", pretrained="openai", precision="fp32"), torch.device("cpu"))
    assert not [w for w in caught if "QuickGELU mismatch" in str(w.message)]
    images, texts = s.embed_images(pixels), s.embed_texts(["a photo of a cat", "a dog"])
    torch.testing.assert_close(images, reference.embed_images(pixels), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(texts, reference.embed_texts(["a photo of a cat", "a dog"]), atol=1e-4, rtol=1e-4)


def test_half_layer_norms_replace_open_clips_float32_ones():
    """A float16 open_clip model's LayerNormFp32 modules (every one: the towers' blocks, ln_pre,
    ln_post, ln_final) become HalfLayerNorm: the features as the float32 norms give them (as
    close as float16 runs of one model agree), float32 input still through the original."""
    import copy

    import open_clip
    from open_clip.transformer import LayerNormFp32

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL, pretrained=None, precision="fp16", device="cpu").eval()
    count = sum(type(m) is LayerNormFp32 for m in model.modules())
    assert count >= 5
    swapped = copy.deepcopy(model)
    assert half_layer_norms(swapped) == count
    assert not any(type(m) is LayerNormFp32 for m in swapped.modules())
    assert sum(type(m) is HalfLayerNorm for m in swapped.modules()) == count
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(2)).half()
    tokens = open_clip.get_tokenizer(TINY_MODEL)(PREFIX_TEXTS[:4])
    with torch.inference_mode():
        for encode, x in (("encode_image", images), ("encode_text", tokens)):
            want, got = getattr(model, encode)(x).float(), getattr(swapped, encode)(x).float()
            cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
            assert float(cosine.min()) > 0.9999, (encode, cosine)
        x = torch.randn(3, model.ln_final.normalized_shape[0])
        torch.testing.assert_close(swapped.ln_final(x), model.ln_final(x))  # float32: LayerNormFp32's arithmetic
        assert swapped.ln_final(x.half()).dtype == torch.float16


def test_half_layer_norms_on_the_cpu_keep_float32_parameters():
    """On the CPU a bfloat16 (or float16) model's HalfLayerNorm takes float32 weight and bias with
    the reduced-precision input, as PyTorch's CPU kernel allows: the output of LayerNormFp32
    (norm in float32, rounded once) but for rare last-bit differences, in the input's dtype;
    and a bf16 Scorer's norms are swapped (its towers checked against fp32 in the bf16 test)."""
    from open_clip.transformer import LayerNormFp32

    generator = torch.Generator().manual_seed(3)
    norm = LayerNormFp32(768)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(768, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(768, generator=generator))
    for dtype in (torch.bfloat16, torch.float16):
        half = HalfLayerNorm(norm, dtype)
        assert half.weight_low.dtype == torch.float32 and half.bias_low.dtype == torch.float32
        x = (10 + 3 * torch.randn(8, 50, 768, generator=generator)).to(dtype)
        got, want = half(x), norm(x)
        assert got.dtype == dtype
        differ = got != want
        assert float(differ.float().mean()) < 0.005, dtype
        # a last-bit difference at most (near 0, where w z + b cancels, a few of 1e-5)
        torch.testing.assert_close(got.float(), want.float(), rtol=torch.finfo(dtype).eps, atol=1e-4)
    s = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none", precision="bf16"), torch.device("cpu"))
    norms = [m for m in s.model.modules() if isinstance(m, torch.nn.LayerNorm | HalfLayerNorm)]
    assert norms and all(type(m) is HalfLayerNorm and m.dtype == torch.bfloat16 for m in norms)


@pytest.mark.skipif(not onednn_fusion_works(), reason="this torch has no working oneDNN fused linear")
def test_fused_mlps_on_the_cpu_in_bf16_compute_what_torch_does():
    """FusedMlp (oneDNN's linear with the bias and activation fused) against the MLP it replaces,
    in bfloat16, for each activation open_clip's blocks use here (GELU, its tanh form, SiLU: the
    folded QuickGELU): the same values to bfloat16's rounding; other MLPs are left alone. A bf16
    Scorer on the CPU runs every block MLP fused, an fp32 one none, and a bf16 one where the op
    fails its probe none (the towers as torch runs them)."""
    from collections import OrderedDict

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 64, generator=generator).to(torch.bfloat16)
    for act in (torch.nn.GELU(), torch.nn.GELU(approximate="tanh"), torch.nn.SiLU()):
        mlp = torch.nn.Sequential(OrderedDict(c_fc=torch.nn.Linear(64, 256), gelu=act, c_proj=torch.nn.Linear(256, 64)))
        mlp = mlp.to(torch.bfloat16)
        assert FusedMlp.fusable(mlp)
        with torch.inference_mode():
            want, got = mlp(x).float(), FusedMlp(mlp)(x).float()
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02, msg=lambda m, act=act: f"{act}: {m}")
        other = torch.nn.Sequential(OrderedDict(c_fc=torch.nn.Linear(64, 256), gelu=torch.nn.ReLU(), c_proj=torch.nn.Linear(256, 64)))
        assert not FusedMlp.fusable(other)  # an activation not mapped to oneDNN's
    blocks = {}
    for precision in ("bf16", "fp32"):
        s = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none", precision=precision), torch.device("cpu"))
        blocks[precision] = [type(m.mlp) for m in s.model.modules() if hasattr(m, "mlp")]
    assert blocks["bf16"] and set(blocks["bf16"]) == {FusedMlp}
    assert FusedMlp not in blocks["fp32"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FusedMlp, "forward", lambda self, x: 1 / 0)  # an op that changed: the probe says no
        assert not onednn_fusion_works.__wrapped__()
        mp.setattr("fastlaion.score.onednn_fusion_works", lambda: False)
        s = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none", precision="bf16"), torch.device("cpu"))
        assert not any(type(m) is FusedMlp for m in s.model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fastlaion_layers_score_as_open_clips_on_cuda_fp16():
    """On the GPU in float16: the patch embedding and float16 layer norms against open_clip's
    convolution and float32 norms, one random ViT-B-32: features at cosine > 0.999, scores within
    0.005 (float16 runs of one model differ by about that much)."""
    torch.manual_seed(0)
    ours = Scorer(ScoreConfig(model="ViT-B-32", pretrained="none"), torch.device("cuda"))
    theirs = Scorer(ScoreConfig(model="ViT-B-32", pretrained="none"), torch.device("cuda"), open_clip_layers=True)
    assert ours._patches is not None and any(type(m) is HalfLayerNorm for m in ours.model.modules())
    assert not any(type(m) is HalfLayerNorm for m in theirs.model.modules())
    h, w = ours.clip_spec.size
    pixels = torch.randint(0, 256, (64, h, w, 3), dtype=torch.uint8, device="cuda")
    texts = (PREFIX_TEXTS * 8)[:64]
    img_a, txt_a, sim_a = ours.score(pixels, texts)
    img_b, txt_b, sim_b = theirs.score(pixels, texts)
    for a, b in ((img_a, img_b), (txt_a, txt_b)):
        cosine = (a.astype(np.float32) * b.astype(np.float32)).sum(axis=1)
        assert float(cosine.min()) > 0.999, cosine.min()
    assert float(np.abs(sim_a - sim_b).max()) < 5e-3


def test_compiled_towers_score_as_the_eager_ones(caplog):
    """--compile: torch.compile'd towers (on the CPU here; inductor) give the eager scores, for a
    batch smaller than batch_size (padded), one larger (cut in pieces) and captions of mixed
    lengths (each compiled text length); the shapes they run at stay within the fixed set, and
    each is announced once as it compiles."""
    torch.manual_seed(0)
    eager = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none", batch_size=4), pick_device("cpu"))
    compiled = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none", batch_size=4, compile=True), pick_device("cpu"))
    compiled.model.load_state_dict(eager.model.state_dict())
    rng = np.random.default_rng(1)
    seen: list[tuple[int, ...]] = []
    image = compiled._compiled._image
    compiled._compiled._image = lambda x: seen.append(tuple(x.shape)) or image(x)
    for n, texts in ((3, PREFIX_TEXTS[:3]), (6, PREFIX_TEXTS[3:9])):
        pixels = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
        want = eager.score(pixels, texts)
        got = compiled.score(pixels, texts)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), atol=2e-3)
    assert set(seen) == {(4, 224, 224, 3)}  # 3 rows padded to 4; 6 rows as 4 + 2 padded
    # each shape says once that it compiles (the batch waits for it: no silent minute-long stall)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--compile: compiling")]
    assert said.count("--compile: compiling the image tower for batches of 4 (once; the batch waits for it)") == 1
    assert len(said) == len(set(said)) and any("text tower at" in m for m in said), said


def test_compile_without_a_cpp_compiler_on_the_cpu_is_a_clear_error(monkeypatch):
    """Inductor builds C++ on the CPU: without a compiler --compile fails when the model loads,
    in one line, not at the first batch with torch's traceback."""
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("no g++ found")
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ConfigError, match=r"--compile on the CPU needs a C\+\+ compiler .*no g\+\+ found"):
        Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none", compile=True), pick_device("cpu"))


def test_compile_without_triton_on_cuda_is_a_clear_error(monkeypatch):
    """Inductor writes Triton kernels on CUDA: without triton, one line when the model loads (the
    check alone here: the device need not exist)."""
    import importlib.util

    from fastlaion.score import check_compile_backend

    find_spec = importlib.util.find_spec
    if find_spec("triton") is not None:
        check_compile_backend(torch.device("cuda"))  # there: no error
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="--compile on CUDA needs triton"):
        check_compile_backend(torch.device("cuda"))


def test_prefix_text_encoder_only_for_causal_end_pooled_towers():
    torch.manual_seed(0)
    model = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none"), pick_device("cpu")).model
    assert PrefixTextEncoder.for_model(model) is not None
    assert PrefixTextEncoder.for_model(model).causal_blocks  # its blocks run as causal attention here
    block = model.transformer.resblocks[-1]
    block.attn.bias_k = torch.nn.Parameter(torch.zeros(1, 1, block.attn.embed_dim))  # not what it reproduces
    assert not PrefixTextEncoder.for_model(model).causal_blocks  # ... then open_clip's own blocks run
    block.attn.bias_k = None
    model.text_pool_type = "last"  # pooled at a fixed position: the padding matters
    assert PrefixTextEncoder.for_model(model) is None
    model.text_pool_type = "argmax"
    model.attn_mask = torch.zeros_like(model.attn_mask)  # bidirectional: every position sees the padding
    assert PrefixTextEncoder.for_model(model) is None
    assert PrefixTextEncoder.for_model(model.visual) is None


def _tokenizer_cases() -> list[str]:
    import random
    import string

    rng = random.Random(0)
    ascii_printable = "".join(chr(c) for c in range(0x20, 0x7F))
    cases = [rng.choice(["", " "]) + "".join(rng.choice(ascii_printable) for _ in range(rng.randint(0, 80)))
             for _ in range(600)]
    cases += [" ".join(rng.choice(string.ascii_letters) * rng.randint(1, 9) for _ in range(rng.randint(1, 30)))
              for _ in range(200)]
    cases += ["", " ", "A Cat", "it's we're I'll don't", "&amp; &lt;b&gt; &amp;amp; Tom &amp; Jerry", "caf\u00e9 na\u00efve",
              "mojibake: caf\u00c3\u00a9", "\u6771\u4eac\u30bf\u30ef\u30fc \U0001f5fc emoji \U0001f44d\U0001f3fd",
              "\u201ccurly\u201d \ufb01 ligature \uff26\uff55\uff4c\uff4c width", "\x1b[31mred\x1b[0m escape",
              "ctl\x00\x07chars", "\t\n tabs \r\n lines \u2028", "x" * 3000, "word " * 500,
              "<start_of_text> literal <end_of_text>", "NUMBERS 12345 3.14 1,000", "UPPER lower MiXeD",
              # long captions: split up to a space past 8 tokens' worth of characters, or whole
              # when that holds under a context of words (long words), ASCII and not
              "abcdefghijklmnop " * 100, "\u00e9" + "abcdefghijklmnop " * 100, "x " * 700 + "\u00e9",
              "\u00e9" + "a" * 700 + " b c", "\u00e9 " + "word, " * 400]
    return cases


@pytest.fixture(params=["compiled", "python"])
def tokenizer_path(request, native_library, monkeypatch):
    """The tokenizer with its compiled word table (tokenize_native.c) and without (Python alone)."""
    from fastlaion import tokenize_native

    if request.param == "python":
        monkeypatch.setenv("FASTLAION_NATIVE", "0")
    elif native_library._compiler() is None:
        pytest.skip("no C compiler: the compiled tokenizer cannot be built here")
    tokenize_native._reset()
    yield request.param
    tokenize_native._reset()


def test_cached_tokenizer_gives_open_clip_token_ids(tokenizer_path):
    """Against open_clip's own tokenizer on random printable ASCII (with and without '&'), words
    repeated across captions, entities, non-ASCII, mojibake, control characters, over-long text."""
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")
    ours = CachedClipTokenizer.wrap(open_clip.get_tokenizer("ViT-B-32"))
    assert isinstance(ours, CachedClipTokenizer)
    assert (ours._native is not None) == (tokenizer_path == "compiled")
    cases = _tokenizer_cases()
    assert torch.equal(ours(cases), reference(cases))
    assert torch.equal(ours(cases[::-1]), reference(cases[::-1]))  # now from the word cache
    assert torch.equal(ours("a single caption"), reference("a single caption"))
    assert torch.equal(ours(c for c in cases[:40]), reference(cases[:40]))  # any iterable, as open_clip takes
    assert torch.equal(ours(cases[:50], context_length=16), reference(cases[:50], context_length=16))
    # words of one token each, fewer than a context of them before the cut: the whole caption is split
    long_words = ["photograph " * 30, "\u00e9 " + "photograph " * 30]
    assert torch.equal(ours(long_words, context_length=16), reference(long_words, context_length=16))
    small = CachedClipTokenizer.wrap(open_clip.get_tokenizer("ViT-B-32"))
    small.MAX_WORDS = 8  # the cache starts over when full: same ids
    assert torch.equal(small(cases[:100]), reference(cases[:100]))
    assert 0 < len(small._words) <= 8
    assert len(small.tokenizer.cache) <= 8 + 2  # open_clip's own BPE cache too (+ its special tokens)
    if small._native is not None:
        assert 0 < len(small._native) <= 8  # the compiled table starts over with it


def _split_cases(n: int) -> list[str]:
    """Captions that exercise each of the pattern's alternatives on printable ASCII: special
    tokens whole, cut and in capitals, contractions and near-contractions, runs of punctuation
    around them, digits, capitals, spaces in runs, and a few captions for Python (non-ASCII, '&',
    control characters)."""
    import random
    import string

    rng = random.Random(1)
    parts = ["<start_of_text>", "<END_OF_TEXT>", "<start_of", "<<end_of_text>>", "'s", "'S", "'t", "'re", "'ve", "'m",
             "'ll", "'l", "'d", "''s", "'", "don't", "it'S", "x'dd", "!'s", "a_b", "3.14", "1,000", "::", "<>", "Hello",
             "WORLD", "mIxEd", "  ", "~`|\\", "\"q\"", "e\u0301", "caf\u00e9", "&amp;", "\t", "x" * 90]
    alphabet = string.ascii_letters + string.digits + " '<>_.,!?-" * 3
    cases = []
    for _ in range(n):
        if rng.random() < 0.5:
            cases.append("".join(rng.choice(parts) + rng.choice(["", " ", "  "]) for _ in range(rng.randint(0, 40))))
        else:
            cases.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))))
    return cases


def test_compiled_tokenizer_splits_as_open_clip_and_leaves_the_rest_to_python(native_library):
    """The compiled path tokenizes every caption of printable ASCII without '&' once its words are
    known, with open_clip's ids at every context length (truncation with eot last); the others
    it leaves to Python, which gives open_clip's ids too."""
    import open_clip

    from fastlaion import tokenize_native

    if native_library._compiler() is None:
        pytest.skip("no C compiler: the compiled tokenizer cannot be built here")
    tokenize_native._reset()
    reference = open_clip.get_tokenizer("ViT-B-32")
    # open_clip's ids at each context below are its encoding of the whole caption, cut (its
    # __call__ does the cutting): each caption encoded once for the four (its ftfy cleaning and
    # BPE took 3 s a context on 2 cores), by open_clip's own encode still
    reference.encode = functools.lru_cache(maxsize=None)(reference.encode)
    ours = CachedClipTokenizer.wrap(open_clip.get_tokenizer("ViT-B-32"))
    cases = _split_cases(3000)
    plain = np.array([c.isascii() and c.isprintable() and "&" not in c for c in cases])
    assert 0.2 < plain.mean() < 0.9
    for context in (77, 16, 2, 1):
        first = ours(cases, context_length=context)  # Python computes the new words and hands them over
        _, status = ours._native.encode(cases, context)
        assert (status[plain] == tokenize_native.ST_DONE).all()
        assert (status[~plain] == tokenize_native.ST_NOT_ASCII).all()
        again = ours(cases, context_length=context)  # now in C
        expected = reference(cases, context_length=context)
        assert torch.equal(first, expected), context
        assert torch.equal(again, expected), context
    # a word not in the table yet: the caption goes to Python, which adds the word
    ids, status = ours._native.encode(["zzyzx quokkas"], 77)
    assert status.tolist() == [tokenize_native.ST_NEW_WORD] and not ids.any()
    assert torch.equal(ours(["zzyzx quokkas"]), reference(["zzyzx quokkas"]))
    assert ours._native.encode(["zzyzx quokkas"], 77)[1].tolist() == [tokenize_native.ST_DONE]
    with pytest.raises(ValueError, match="context length 0"):
        ours._native.encode(["a"], 0)


def test_compiled_tokenizer_is_shared_by_threads(tokenizer_path):
    """Threads tokenizing with one tokenizer at once (the scorer's pools) get open_clip's ids."""
    import concurrent.futures

    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")
    ours = CachedClipTokenizer.wrap(open_clip.get_tokenizer("ViT-B-32"))
    chunks = [_split_cases(300)[i::4] for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: ours(c, context_length=24), chunks * 3))
    for chunk, ids in zip(chunks * 3, got):
        assert torch.equal(ids, reference(chunk, context_length=24))


def test_cached_tokenizer_leaves_other_tokenizers_alone():
    from open_clip.tokenizer import SimpleTokenizer

    reducing = SimpleTokenizer(reduction_mask="simple")
    assert CachedClipTokenizer.wrap(reducing) is reducing
    torch.manual_seed(0)
    scorer = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none"), pick_device("cpu"))
    assert isinstance(scorer.tokenizer, CachedClipTokenizer)


def test_bad_model_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not an open_clip architecture.*ViT-B-32"):
        Scorer(ScoreConfig(model="ViT-B-33", pretrained="none"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="not a known tag"):
        Scorer(ScoreConfig(model=TINY_MODEL, pretrained="laion9b"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        Scorer(ScoreConfig(model=TINY_MODEL, pretrained=str(tmp_path / "nope" / "x.pt")), torch.device("cpu"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a PyTorch checkpoint"):
        Scorer(ScoreConfig(model=TINY_MODEL, pretrained=str(bad)), torch.device("cpu"))


def test_a_local_checkpoint_that_does_not_load_says_why_naming_its_option(tmp_path):
    """No "101" from torch's unpickler, no hint about downloading tags: a local file was given."""
    def error(pretrained, **flags):
        with pytest.raises(ConfigError) as e:
            Scorer(ScoreConfig(model=TINY_MODEL, pretrained=str(pretrained)), torch.device("cpu"), **flags)
        return str(e.value)

    notes = tmp_path / "notes.txt"
    for text in ("hello world\n", "every line of my notes\n"):  # KeyError: 101, IndexError from torch.load
        notes.write_text(text)
        assert error(notes) == (f"--pretrained {notes}: not a PyTorch checkpoint (torch.load failed: the file is "
                                "neither a zip archive nor a pickle, the formats torch.save writes)")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    assert error(tmp_path / "other.pt").startswith(
        f"--pretrained {tmp_path / 'other.pt'}: weights do not fit {TINY_MODEL} (Error(s) in loading state_dict")
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    assert error(tmp_path / "tensor.pt") == (f"--pretrained {tmp_path / 'tensor.pt'}: not a PyTorch state dict "
                                             "(it holds a Tensor)")
    assert error(tmp_path) == f"--pretrained {tmp_path}: not a checkpoint file (it is a folder)"
    flags = ("--multilingual-model", "--multilingual-pretrained")
    assert error(notes, flags=flags).startswith(f"--multilingual-pretrained {notes}: not a PyTorch checkpoint")
    with pytest.raises(ConfigError, match="^--multilingual-model 'bogus' is not an open_clip architecture"):
        Scorer(ScoreConfig(model="bogus", pretrained="none"), torch.device("cpu"), flags=flags)


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
    s = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none", precision="fp32"), torch.device("cpu"))
    preprocess = open_clip.image_transform(s.clip_spec.size, is_train=False)
    decoder = Decoder(DecodeConfig(), s.clip_spec)
    for name, arr in photos.items():
        body = encode(arr, "JPEG")
        pixels = decoder(body).clip_input
        assert not pixels.flags.writeable  # a view of the decoder's bytes, as search --image passes it
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's "not writable" UserWarning would reach the user
            ours = s.embed_images(pixels[None])[0]
        with torch.no_grad():
            ref = s.model.encode_image(preprocess(Image.open(io.BytesIO(body)).convert("RGB"))[None])[0]
        cos = torch.nn.functional.cosine_similarity(ours, ref, dim=0).item()
        assert cos > 0.999, (name, cos)


def test_precision_choice(monkeypatch):
    """auto: fp16 on CUDA; on the CPU bf16 where torch finds AMX tiles (this dev box's Xeon has
    them), else fp32. The probe is torch's: a CPU without AMX is its answer False."""
    from fastlaion.score import cpu_has_amx, pick_precision

    amx = "amx_tile" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else cpu_has_amx()
    assert cpu_has_amx() == amx
    assert pick_precision("auto", torch.device("cpu")) == ("bf16" if amx else "fp32")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert pick_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probe
    assert pick_precision("auto", torch.device("cpu")) == "fp32"
    assert pick_precision("auto", torch.device("cuda")) == "fp16"
    assert pick_precision("fp32", torch.device("cpu")) == "fp32"
    assert pick_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match="--precision"):
        ScoreConfig(precision="fp8").validate()


def test_bf16_on_the_cpu_scores_as_fp32_up_to_its_rounding(photos):
    """The CPU's auto precision where it has AMX: ViT-B-32's towers in bfloat16 against fp32, same
    random weights, same decoded photographs and captions: embeddings at cosine above 0.999 and
    similarities within 0.005 (bench/score.py's precision table: 0.0016 at most, 0.0005 on
    average); and a model's tower really ran in bfloat16."""
    from fastlaion.config import DecodeConfig
    from fastlaion.decode import Decoder
    from helpers import encode

    fp32 = Scorer(ScoreConfig(model="ViT-B-32", pretrained="none", precision="fp32"), torch.device("cpu"))
    bf16 = Scorer(ScoreConfig(model="ViT-B-32", pretrained="none", precision="bf16"), torch.device("cpu"))
    assert bf16.model.visual.proj.dtype == torch.bfloat16 and fp32.model.visual.proj.dtype == torch.float32
    decoder = Decoder(DecodeConfig(), fp32.clip_spec)
    pixels = np.stack([decoder(encode(arr)).clip_input for arr in photos.values()] * 2)
    texts = ["a cat", "a cup of coffee on a table", "an astronaut in a white suit", "a rocket on its launch pad",
             "", "a photograph of a cat " * 12, "café crème", "red"]
    (i32, t32, s32), (i16, t16, s16) = fp32.score(pixels, texts), bf16.score(pixels, texts)
    for a, b in ((i32, i16), (t32, t16)):
        cosines = np.sum(a.astype(np.float32) * b.astype(np.float32), axis=1)
        assert cosines.min() > 0.999, cosines
    assert np.abs(s32 - s16).max() < 0.005, (s32, s16)
    assert not np.array_equal(s32, s16)  # bf16's own arithmetic, not fp32's again


def test_random_weights_are_one_model_in_every_process_and_resume():
    """--pretrained none: two Scorers (two workers, or a run and its resume) have the same random
    weights, whatever the global generator's state; the caller's generator is left as it was."""
    torch.manual_seed(123)
    a = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none"), pick_device("cpu"))
    after_a = torch.rand(3)
    torch.manual_seed(123)
    torch.rand(1000)  # another state
    b = Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none"), pick_device("cpu"))
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    torch.manual_seed(123)
    Scorer(ScoreConfig(model=TINY_MODEL, pretrained="none"), pick_device("cpu"))
    assert torch.equal(torch.rand(3), after_a)  # making a Scorer drew nothing from the caller's generator
