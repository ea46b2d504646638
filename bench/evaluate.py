#!/usr/bin/env python3
"""`fastlaion evaluate` against the zero-shot script a user writes (open_clip's model and
preprocess, torchvision's ImageFolder, a DataLoader with a worker per core, batched), on the same
labelled folder and the same weights.

    .venv/bin/python bench/evaluate.py                      # 2,000 JPEGs in 10 classes, the tiny CLIP
    .venv/bin/python bench/evaluate.py --images 500 --batch-size 64
    .venv/bin/python bench/evaluate.py --model ViT-B-32 --images 1000 [--precision auto]
    .venv/bin/python bench/evaluate.py --model ViT-B-32 --pretrained /path/open_clip_model.bin

The images are bench/pipeline.py's (photographs cropped, resized to 320-800 px sides, JPEG,
cached under bench/_work/images/), linked into --classes class folders (image i in class i mod
C). Both sides use one checkpoint (default: --model's random weights as fastlaion's
`--pretrained none` makes them, saved once) in float32 on the CPU (`--precision fp32`, the
default here: fastlaion's own default picks bf16 on an AMX CPU, which the plain script does not;
`--precision auto` measures that). Each side runs in a child process: wall and CPU seconds (user + system, children
included) from its start, imports and model loading included. The figures must agree: same
images counted, top-1 within --tolerance (the two resize paths differ by a pixel level here and
there, which can flip a near-tie of the random model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import pipeline as bp  # noqa: E402  (the images, timed child processes, machine description)



def peer(root: str, model_name: str, ckpt: str, batch_size: int, out: str) -> None:
    """What a user writes: open_clip's eval transform on every image through torchvision's
    ImageFolder and a DataLoader, the class prompts' embeddings, one product per batch, top-5."""
    import open_clip
    import torch
    import torchvision

    from fastlaion.score import register_model_configs

    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=ckpt)
    model.eval()
    data = torchvision.datasets.ImageFolder(root, transform=preprocess)
    names = [c.replace("_", " ") for c in data.classes]
    with torch.no_grad():
        text = model.encode_text(open_clip.get_tokenizer(model_name)([f"a photo of a {c}." for c in names]))
        text = torch.nn.functional.normalize(text.float(), dim=1)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=len(os.sched_getaffinity(0)))
        hits1 = hits5 = n = 0
        for x, y in loader:
            f = torch.nn.functional.normalize(model.encode_image(x).float(), dim=1)
            top = (f @ text.T).topk(min(5, len(names)), dim=1).indices
            hits1 += int((top[:, 0] == y).sum())
            hits5 += int((top == y[:, None]).any(dim=1).sum())
            n += len(y)
    Path(out).write_text(json.dumps({"images": n, "top1": hits1 / n, "top5": hits5 / n}))


def folder_of(images: list[Path], root: Path, classes: int) -> Path:
    """An ImageFolder of links to `images`, image i in class i mod `classes`."""
    if root.exists():
        for link in root.rglob("*.jpg"):
            link.unlink()
    for i, path in enumerate(images):
        d = root / f"class_{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / path.name).symlink_to(path)
    return root


def save_random_checkpoint(model: str, path: Path) -> Path:
    """`model`'s random weights as fastlaion's `--pretrained none` makes them (e2e.write_checkpoint),
    saved at `path` for --pretrained PATH on both sides, by a child process (torch stays out of
    this one). Once: an existing file is reused."""
    if not path.exists():
        subprocess.run([sys.executable, "-c", "import sys, pathlib; sys.path.insert(0, sys.argv[3]); import e2e; "
                        "e2e.write_checkpoint(sys.argv[1], pathlib.Path(sys.argv[2]))", model, str(path), str(HERE)],
                       check=True, cwd=str(REPO))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--model", default="fastlaion-tiny")
    ap.add_argument("--pretrained", default=None,
                    help="a checkpoint both sides load (default: --model's random weights, fastlaion's seed, saved)")
    ap.add_argument("--precision", default="fp32",
                    help="fastlaion's (the script runs fp32 on the CPU); auto: its default here, bf16 on an AMX CPU")
    ap.add_argument("--tolerance", type=float, default=0.02, help="largest top-1 difference taken as agreement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=HERE / "_work" / "evaluate")
    ap.add_argument("--quick", action="store_true", help="48 images: a dry run that the scripts still work")
    ap.add_argument("--peer", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer:
        root, model_name, ckpt, batch_size, out = args.peer
        peer(root, model_name, ckpt, int(batch_size), out)
        return 0
    if args.quick:
        args.images, args.batch_size = 48, 16
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {bp.machine_info()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; load average {os.getloadavg()[0]:.1f}")
    images = bp.generate_images(HERE / "_work" / "images", args.images, args.seed)
    root = folder_of(images, args.workdir / "folder", args.classes)
    ckpt = args.pretrained or str(save_random_checkpoint(args.model, args.workdir / f"{args.model}-random.pt"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ours_json, peer_json = args.workdir / "fastlaion.json", args.workdir / "peer.json"
    ours_cmd = [sys.executable, "-m", "fastlaion", "evaluate", str(root), "--model", args.model, "--pretrained", ckpt,
                "--device", "cpu", "--precision", args.precision, "--batch-size", str(args.batch_size), "--json",
                str(ours_json), "--no-progress"]
    peer_cmd = [sys.executable, str(Path(__file__).resolve()), "--peer", str(root), args.model, ckpt,
                str(args.batch_size), str(peer_json)]
    wait = 0 if args.quick else 60
    ours = bp.run_timed(ours_cmd, args.workdir / "fastlaion.log", 3600, env, wait_quiet_s=wait)
    theirs = bp.run_timed(peer_cmd, args.workdir / "peer.log", 3600, env, wait_quiet_s=wait)
    if ours["rc"] or theirs["rc"]:
        print("a side failed:\n" + bp.tail(args.workdir / "fastlaion.log") + "\n" + bp.tail(args.workdir / "peer.log"))
        return 1
    a, b = json.loads(ours_json.read_text()), json.loads(peer_json.read_text())
    agree = a["images"] == b["images"] and abs(a["top1"] - b["top1"]) <= args.tolerance
    print(f"agreement: {a['images']:,} / {b['images']:,} images, top-1 {a['top1']:.4f} / {b['top1']:.4f}, "
          f"top-5 {a['top5'] if a['top5'] is None else round(a['top5'], 4)} / {b['top5']:.4f}: {agree}")
    print()
    print("| images | classes | tool | wall s | CPU s | images/s |")
    print("|---|---|---|---|---|---|")
    for name, r in (("fastlaion evaluate", ours), ("open_clip + ImageFolder script", theirs)):
        print(f"| {args.images:,} | {args.classes} | {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
              f"{args.images / r['wall_s']:.0f} |")
    print(f"\nfastlaion / script: {theirs['wall_s'] / ours['wall_s']:.2f}x the speed by wall time, "
          f"{theirs['cpu_s'] / ours['cpu_s']:.2f}x by CPU time (other load during: "
          f"{100 * max(ours['busy_after'], theirs['busy_after']):.0f} % of the CPUs after, at most)")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
