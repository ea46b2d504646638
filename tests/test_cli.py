"""The command line as a user meets it: help, bad input as one clear line, resume after SIGKILL."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from typer.testing import CliRunner

from fastlaion.cli import app
from fastlaion.config import InputConfig, RunConfig, resume_key
from fastlaion.server import LoopbackServer, Served
from helpers import encode, invoke_cli

runner = CliRunner()
FASTLAION = [sys.executable, "-m", "fastlaion"]


def test_run_help_explains_every_option():
    result = runner.invoke(app, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0
    import click

    cmd = typer_command("run")
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help, f"{param.opts} has no help"
            assert param.opts[0] in result.output
    for word in ("--shard-size", "--url-col", "--caption-col", "--resize-mode", "--min-similarity", "--no-score"):
        assert word in result.output


def test_the_command_list_gives_each_command_its_first_paragraph_as_running_text():
    """`fastlaion --help` lists each command by its docstring's first paragraph, wrapped to the
    terminal, not cut where the docstring's lines end (rich keeps those by default)."""
    import typer.main

    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    panel = result.output.split("Commands")[1]
    listed: dict[str, list[str]] = {}  # each command's lines, as wrapped: its name on the first
    for line in panel.splitlines():
        line = line.strip()
        body = line[1:].rstrip("│").rstrip() if line.startswith("│") else ""
        if not body.strip():
            continue
        if body[1] != " ":  # "│ name  text": a command's first line
            name, text = body.split(None, 1)
            listed[name] = [text]
        else:
            listed[name].append(body.strip())
    for name, cmd in typer.main.get_command(app).commands.items():
        first = " ".join(cmd.help.split("\n\n")[0].split())
        assert " ".join(listed[name]) == first, name
        # wrapped where the terminal ends, not where the docstring's lines did
        assert all(len(line) > 50 for line in listed[name][:-1]), listed[name]


@pytest.mark.parametrize("name", ["", "run", "demo", "extract", "subset", "dedup", "stats", "index", "search",
                                  "classify", "evaluate", "version"])
def test_help_at_80_columns_cuts_no_option_name_nor_default(name):
    """rich shrank every column of typer's options table to fit the terminal: at 80 columns
    `--max-caption-c…`, two options both shown as `--multilingual-…`, `[default: noai,noimageai,n…`.
    The names are never cut; the help column wraps (a word too long for it is folded)."""
    import re

    import click
    import typer.main

    group = typer.main.get_command(app)
    assert set(group.commands) == {"run", "demo", "extract", "subset", "dedup", "stats", "index", "search",
                                   "classify", "evaluate", "version"}  # a new command: add it above
    cmd = group.commands[name] if name else group
    result = runner.invoke(app, [name, "--help"] if name else ["--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    assert "…" not in result.output
    names = [opt for param in cmd.params if isinstance(param, click.Option)
             for opt in param.opts + param.secondary_opts] + ["--help"]
    for opt in names:
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", result.output), (opt, result.output)
    # the description above the panels: each paragraph wrapped at the terminal, not where the
    # docstring's lines end ("... per kept" / "sample), a" / "Parquet per shard ...")
    description = result.output.split("Usage:")[1].split("╭")[0].split("\n")[2:]
    paragraphs = [p.splitlines() for p in "\n".join(line.strip() for line in description).split("\n\n") if p.strip()]
    for lines in paragraphs:
        assert all(len(line) > 60 for line in lines[:-1]), lines


def typer_command(name):
    import typer.main

    group = typer.main.get_command(app)
    return group.commands[name]


TINY = ["--model", "fastlaion-tiny", "--pretrained", "none", "--no-progress"]  # a CLIP model that loads in a second


@pytest.mark.parametrize("args, message", [
    (["run", "{tmp}/missing.csv", "-o", "{tmp}/o"], "input file not found"),
    (["run", "{tmp}/in.csv", "-o", "{tmp}/o", "--url-col", "link"], "no URL column 'link'"),
    (["run", "{tmp}/in.csv", "-o", "{tmp}/o", "--caption-col", "alt"], "no caption column 'alt'"),
    (["run", "{tmp}/bad.parquet", "-o", "{tmp}/o"], "cannot read as parquet"),
    (["run", "{tmp}/in.csv", "-o", "{tmp}/o", "--shard-size", "0"], "--shard-size must be at least 1"),
    (["run", "{tmp}/in.csv", "-o", "{tmp}/o", "--min-similarity", "3"], "--min-similarity must be between"),
    (["run", "{tmp}/in.csv", "-o", "{tmp}/o", "--timeout", "0"], "--timeout must be positive"),
    (["run", "{tmp}/in.csv", "-o", "{tmp}/o", "--model", "ViT-B-99", "--pretrained", "none"], "not an open_clip architecture"),
    (["run", "{tmp}/in.csv", "-o", "{tmp}/o", "--pretrained", "laion9b"],
     "error: --pretrained 'laion9b' is not a known tag for ViT-B-32 (tags: openai, "),
    (["run", "{tmp}/in.txt", "-o", "{tmp}/o"], "--no-score"),
    (["run", "{tmp}/in.csv", "-o", "{tmp}/o", "--opt-out-tags", "noai,foo", "--no-score"], "--opt-out-tags: 'foo' is not one of noai,"),
    (["run", "{tmp}/in.csv", "-o", "{tmp}/o", "--opt-out-tags", "all", "--no-score"], "--opt-out-tags: 'all' is not one of"),
    (["run", "{tmp}/in.csv", "-o", "{tmp}/in.csv"], "not a folder"),
    (["run", "{tmp}/in.txt", "{tmp}/../{tmp.name}/in.txt", "-o", "{tmp}/o", "--no-score"],
     "error: INPUT {tmp}/../{tmp.name}/in.txt is given twice (as {tmp}/in.txt): its rows would be downloaded and "
     "written twice"),
    # a text file given as weights (torch's unpickler: "KeyError: 101"), and a truncated checkpoint
    # (the CLIP heads read embeddings: refused with --no-score, so scored by the tiny model)
    *[(["run", "{tmp}/in.csv", "-o", "{tmp}/o", *(["--no-score"] if flag == "--watermark-model" else TINY),
        flag, "{tmp}/notes.txt"],
       (f"error: {flag} {{tmp}}/notes.txt: not a PyTorch checkpoint (torch.load failed: the file is neither a zip "
        "archive nor a pickle")) for flag in ("--watermark-model", "--aesthetic-v2", "--aesthetic-v1", "--nsfw-head")],
    (["run", "{tmp}/in.csv", "-o", "{tmp}/o", *TINY, "--nsfw-head", "{tmp}/trunc.pth"],
     "error: --nsfw-head {tmp}/trunc.pth: not a PyTorch checkpoint: truncated or corrupted"),
    (["run", "{tmp}/in.csv", "-o", "{tmp}/o", *TINY, "--aesthetic-v2", "{tmp}/nope.pth"],
     "error: --aesthetic-v2 '{tmp}/nope.pth': no such file (give a path or an http(s) URL)\n"),
    (["run", "{tmp}/in.csv", "-o", "{tmp}/o", "--model", "fastlaion-tiny", "--pretrained", "{tmp}/notes.txt"],
     "error: --pretrained {tmp}/notes.txt: not a PyTorch checkpoint (torch.load failed: the file is neither"),
    (["run", "{tmp}/in.csv", "-o", "{tmp}/o", "--model", "fastlaion-tiny", "--pretrained", "none", "--no-progress",
      "--multilingual-model", "bogus"], "error: --multilingual-model 'bogus' is not an open_clip architecture"),
    (["demo", "-o", "{tmp}/in.csv"], "error: --output exists and is not a folder: {tmp}/in.csv\n"),
    (["run", "{tmp}/header.csv", "-o", "{tmp}/o", "--no-score"], "the input has no rows: {tmp}/header.csv;"),
    (["run", "{tmp}/header.csv", "{tmp}/empty.txt", "-o", "{tmp}/o", "--no-score"],
     "the inputs have no rows: {tmp}/header.csv, {tmp}/empty.txt;"),
    # a binary file read as csv/tsv: its bytes were listed as the "columns", in 17 lines of garbage
    *[(["run", "{tmp}/real.parquet", "-o", "{tmp}/o", "--no-score", "--input-format", fmt],
       f"error: {{tmp}}/real.parquet: cannot read as {fmt}: its first line is not text (a binary file? "
       "--input-format picks the format)\n") for fmt in ("csv", "tsv")],
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    import torch

    pl.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}).write_csv(tmp_path / "in.csv")
    (tmp_path / "in.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    (tmp_path / "bad.parquet").write_bytes(b"definitely not parquet")
    (tmp_path / "notes.txt").write_text("hello world\n")
    checkpoint = tmp_path / "whole.pth"
    torch.save({"weight": torch.zeros(1, 512)}, checkpoint)
    (tmp_path / "trunc.pth").write_bytes(checkpoint.read_bytes()[:-100])
    (tmp_path / "header.csv").write_text("url,caption\n")
    (tmp_path / "empty.txt").write_text("")
    pl.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}).write_parquet(tmp_path / "real.parquet")
    # in this process: a fresh one for each case took 5-10 s of torch's start-up (the console
    # script's own line is checked by the demo's refusal and test_search's commands)
    result = invoke_cli([a.format(tmp=tmp_path) for a in args], env={"COLUMNS": "200"})
    assert result.returncode == 2, result.stderr
    assert message.format(tmp=tmp_path) in result.stderr, result.stderr
    if "no rows" in message or "not an open_clip architecture" in message or "not a known tag" in message:
        # a fresh folder is not left behind (a bad model name or tag was found only once the
        # models loaded, 15-20 s in, the folder holding config.json by then)
        assert not (tmp_path / "o").exists()
    assert "Traceback" not in result.stderr + result.stdout
    said = [line for line in result.stderr.strip().splitlines() if "has RANDOM weights" not in line]  # TINY's
    assert len(said) <= 2, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--no-score", "--min-similarity", "0.3"], "--min-similarity with --no-score"),
    (["--no-score", "--min-similarity-multi", "0.2", "--multilingual-model", "xlm-roberta-base-ViT-B-32"],
     "--min-similarity-multi, --multilingual-model with --no-score"),
    (["--no-score", "--resize-mode", "no", "--image-size", "128"], "--image-size 128 with --resize-mode no"),
    (["--no-score", "--resize-mode", "no", "--jpeg-quality", "80"], "--jpeg-quality 80 with --resize-mode no"),
    # the heads read CLIP embeddings: with --no-language the first two were silently unused
    (["--no-score", "--no-language", "--nsfw-head", "nsfw-vit-b-32", "--aesthetic-v1", "aesthetic-v1-vit-b-32"],
     "--nsfw-head, --aesthetic-v1 with --no-score"),
    (["--no-score", "--aesthetic-v2", "{tmp}/v2.pth"], "--aesthetic-v2 with --no-score"),
    (["--no-language", "--multilingual-model", "xlm-roberta-base-ViT-B-32"], "needs language identification"),
    (["--no-score", "--resize-mode", "keep_ratio", "--border-color", "black"],
     "--border-color black with --resize-mode keep_ratio"),
    # nothing to compile, no caption identified: these ran, the option silently unused
    (["--no-score", "--compile"], "--compile with --no-score"),
    (["--no-score", "--no-language", "--language-min-score", "0.9"], "--language-min-score with --no-language"),
    (["--no-score", "--no-language", "--language-model", "{tmp}/lid.176.bin"], "--language-model with --no-language"),
])
def test_an_option_the_other_options_make_unused_is_refused(tmp_path, args, message):
    """`--no-score --min-similarity 0.3` kept every decoded image, and `--resize-mode no
    --image-size 128` stored the downloads at their own size, silently: the user asked for a
    filter or a size they did not get. Refused before anything is written (the same options
    without the one that makes them moot run)."""
    (tmp_path / "in.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    result = runner.invoke(app, ["run", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o"), "--no-progress",
                                 *(a.format(tmp=tmp_path) for a in args)], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--connect-timeout", "20", "--timeout", "5"],
     "--connect-timeout 20 is above --timeout 5, the deadline of the whole attempt (connect, headers and body), "
     "so it would never be reached; raise --timeout or lower --connect-timeout"),
    (["--read-timeout", "12.5"],  # above the default --timeout 10
     "--read-timeout 12.5 is above --timeout 10, the deadline of the whole attempt (connect, headers and body), "
     "so it would never be reached; raise --timeout or lower --read-timeout"),
    (["--timeout", "2", "--connect-timeout", "3", "--read-timeout", "4"],
     "--connect-timeout 3 and --read-timeout 4 are above --timeout 2, the deadline of the whole attempt (connect, "
     "headers and body), so they would never be reached; raise --timeout or lower --connect-timeout and "
     "--read-timeout"),
    (["--timeout", "2", "--connect-timeout", "5"],  # the default, but written out: asked for
     "--connect-timeout 5 is above --timeout 2, the deadline of the whole attempt (connect, headers and body), "
     "so it would never be reached; raise --timeout or lower --connect-timeout"),
])
def test_a_timeout_above_the_whole_attempts_deadline_is_refused(tmp_path, args, message):
    """--timeout bounds the whole attempt: `--connect-timeout 20 --timeout 5` ran, silently
    cutting every connect at 5 s. Refused in one line naming both, exit 2, nothing written."""
    (tmp_path / "in.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    result = invoke_cli(["run", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o"), "--no-progress", "--no-score",
                         "--no-language", *args], env={"COLUMNS": "300"})
    assert (result.returncode, result.stderr) == (2, f"error: {message}\n")
    assert not (tmp_path / "o").exists()


def test_a_timeout_under_the_default_phase_timeouts_runs(tmp_path):
    """--timeout 3 alone is below the default --connect-timeout and --read-timeout (5 s): those
    were not asked for, so they are 3 s, as config.json says (it said 5, a phase the deadline
    always came before); phase timeouts equal to --timeout run too, and one not set above it
    keeps its default."""
    (tmp_path / "in.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    for i, (args, phases) in enumerate((
            (["--timeout", "3"], (3, 3)),
            (["--timeout", "4", "--read-timeout", "1.5"], (4, 1.5)),
            (["--timeout", "6", "--connect-timeout", "6", "--read-timeout", "6"], (6, 6)),
            (["--timeout", "8", "--connect-timeout", "2"], (2, 5)))):
        result = invoke_cli(["run", str(tmp_path / "in.txt"), "-o", str(tmp_path / f"o{i}"), "--no-progress",
                             "--no-score", "--no-language", *args])
        assert result.returncode == 0, result.stderr
        assert (tmp_path / f"o{i}" / "00000_stats.json").is_file()
        saved = json.loads((tmp_path / f"o{i}" / "config.json").read_text())["download"]
        assert (saved["connect_timeout_s"], saved["read_timeout_s"]) == phases


def test_bad_flag_values_are_refused_by_the_parser(tmp_path):
    for args in (["--shard-size", "ten"], ["--resize-mode", "stretch"], ["--input-format", "xml"]):
        result = runner.invoke(app, ["run", "x.csv", "-o", str(tmp_path), *args])
        assert result.exit_code == 2
        assert "Traceback" not in result.output


@pytest.mark.parametrize("args, message, command", [
    (["run", "--bogus"], "no such option: --bogus (possible options: --gpus)", "run"),
    # a near miss: the option meant first (click listed them sorted: --no-progress first)
    (["run", "-o", "x", "--proceses", "2"],
     "no such option: --proceses (possible options: --processes, --progress, --no-progress)", "run"),
    (["run", "-o", "x", "--processes"], "option '--processes' requires an argument", "run"),
    (["run", "-o", "x", "--processes", "two"], "invalid value for '--processes': not a whole number;", "run"),
    (["run", "-o", "x", "--processes", "2.5"], "invalid value for '--processes': not a whole number;", "run"),
    (["run", "-o", "x", "--min-similarity", "high"], "invalid value for '--min-similarity': not a number;", "run"),
    (["run", "-o", "x", "--resize-mode", "stretch"],
     "invalid value for '--resize-mode': 'stretch' is not one of 'center_crop', 'keep_ratio', 'border', 'no';", "run"),
    (["search", "x", "-k", "ten"], "invalid value for '-k': not a whole number;", "search"),
    (["stats"], "missing argument 'OUT'", "stats"),
    (["stats", "a", "b"], "got unexpected extra argument(s) (b)", "stats"),
    (["subset", "en", "--from", "x", "-o", "y", "--bogus"], "no such option: --bogus", "subset"),
    (["search", "x", "--tex", "cat"], "no such option: --tex (possible options: --text", "search"),
    (["nosuchcommand"], "no such command 'nosuchcommand'", ""),
    (["serch", "x"], "no such command 'serch' (did you mean 'search'?)", ""),
    (["--bogus"], "no such option: --bogus", ""),
])
def test_a_usage_error_is_one_line_naming_the_help_to_see(args, message, command):
    """Click's own usage errors (an unknown option or command, a missing or bad value) were
    typer's box: the usage line, "Try '... --help' for help.", the message framed, five lines
    unlike every other error's one. Now one line, `error: MESSAGE; see 'fastlaion CMD --help'`,
    exit status 2, for the lazily built commands as for the group itself. An unknown option's
    suggestions are the close ones best first; --verbose for --bogus was the two dashes' match."""
    result = invoke_cli(args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert result.stderr.endswith(f"{(' ' + command) if command else ''} --help'\n"), result.stderr
    assert "--verbose" not in result.stderr and "╭" not in result.stderr


def test_a_usage_error_of_the_console_script_is_one_line_piped_and_on_a_terminal():
    """`python -m fastlaion run --bogus`: one plain line when stderr is a pipe (no colour codes),
    the same line with `error:` in red on a terminal, as the other errors print."""
    piped = subprocess.run([*FASTLAION, "run", "--bogus"], capture_output=True, text=True, timeout=60)
    assert piped.returncode == 2
    assert piped.stdout == ""
    assert piped.stderr == ("error: no such option: --bogus (possible options: --gpus); "
                            "see 'python -m fastlaion run --help'\n")

    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([*FASTLAION, "run", "-o", "x", "--proceses", "2"], stdin=subprocess.DEVNULL,
                                stdout=follower, stderr=follower, env={**os.environ, "TERM": "xterm", "COLUMNS": "80"})
        os.close(follower)
        said = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            said += chunk
        assert proc.wait(timeout=60) == 2
    finally:
        os.close(leader)
    text = said.decode()
    assert text.splitlines() == ["\x1b[31merror:\x1b[0m no such option: --proceses (possible options: --processes, "
                                 "--progress, --no-progress); see 'python -m fastlaion run --help'"], text


def test_rerun_with_other_settings_is_refused(tmp_path):
    files = {"a.jpg": Served(encode(__import__("skimage.data").data.chelsea()), "image/jpeg")}
    with LoopbackServer(files) as server:
        (tmp_path / "in.txt").write_text(server.url("a.jpg") + "\n")
        base = ["run", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o"), "--no-score", "--no-progress",
                "--allow-private-networks"]
        assert runner.invoke(app, base).exit_code == 0
        again = runner.invoke(app, base)  # same settings: nothing to do
        assert again.exit_code == 0 and "already complete" in again.output
        other = runner.invoke(app, [*base, "--image-size", "128"])
    assert other.exit_code == 2
    assert "other settings" in other.output and "image_size" in other.output


def test_border_pads_white_as_img2dataset_and_a_run_begun_with_black_resumes_only_with_black(tmp_path):
    """--resize-mode border (the default) pads the stored image with white, as img2dataset does
    (fastlaion padded black before --border-color); a run whose config.json predates the option
    was padded black, so resuming it with white is refused (its shards would mix the two) and
    --border-color black resumes it."""
    import tarfile

    files = {"a.jpg": Served(encode(__import__("skimage.data").data.chelsea()), "image/jpeg")}  # 451 x 300
    with LoopbackServer(files) as server:
        (tmp_path / "in.txt").write_text(server.url("a.jpg") + "\n")
        base = ["run", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o"), "--no-score", "--no-progress",
                "--allow-private-networks"]
        assert runner.invoke(app, base).exit_code == 0
        with tarfile.open(tmp_path / "o" / "00000.tar") as tar:
            jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
            stored = np.asarray(Image.open(io.BytesIO(tar.extractfile(jpg).read())).convert("RGB"))
        assert stored.shape == (256, 256, 3)
        assert stored[:35].min() > 235 and stored[-35:].min() > 235  # white rows above and below the photo
        assert stored[60:190].mean() < 200
        config = json.loads((tmp_path / "o" / "config.json").read_text())
        assert config["decode"].pop("border_color") == "white"
        (tmp_path / "o" / "config.json").write_text(json.dumps(config))  # as written before the option
        white = runner.invoke(app, base)
        black = runner.invoke(app, [*base, "--border-color", "black"])
    assert white.exit_code == 2 and "decode.border_color: was 'black', now 'white'" in white.output, white.output
    assert black.exit_code == 0 and "already complete" in black.output, black.output


def test_resuming_a_run_scored_with_gelu_for_quick_gelu_weights_is_refused(tmp_path):
    """A run whose finished shards an older fastlaion scored with OpenAI's ViT-B-32 weights on
    nn.GELU (its config.json has no model_build) is not resumed with this version's QuickGELU:
    the shards would mix two sets of embeddings. Other weights (trained with GELU), and runs this
    version recorded, resume as before. The weights are named by local files where open_clip's
    tags are recognised (a Hugging Face cache folder), so nothing is loaded or downloaded."""
    hub = tmp_path / "hub"
    openai = hub / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "abc" / "open_clip_model.safetensors"
    laion = hub / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / "abc" / "open_clip_model.safetensors"
    for path in (openai, laion):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"never loaded")
    files = {"a.jpg": Served(encode(__import__("skimage.data").data.chelsea()), "image/jpeg")}
    with LoopbackServer(files) as server:
        pl.DataFrame({"url": [server.url("a.jpg")], "caption": ["a cat"]}).write_csv(tmp_path / "in.csv")
        base = ["run", str(tmp_path / "in.csv"), "-o", str(tmp_path / "o"), "--no-progress", "--allow-private-networks"]
        assert runner.invoke(app, [*base, "--no-score"]).exit_code == 0
        config = tmp_path / "o" / "config.json"
        recorded = json.loads(config.read_text())
        assert recorded["model_build"] == 2

        def scored_by(weights: Path, build: int | None) -> dict:
            old = {**recorded, "score": {**recorded["score"], "enabled": True, "model": "ViT-B-32",
                                         "pretrained": str(weights)}}
            if build is None:
                del old["model_build"]
            config.write_text(json.dumps(old))
            return runner.invoke(app, [*base, "--model", "ViT-B-32", "--pretrained", str(weights)],
                                 env={"COLUMNS": "400"})

        old_openai = scored_by(openai, None)
        assert old_openai.exit_code == 2, old_openai.output
        assert "older fastlaion" in old_openai.output and "QuickGELU" in old_openai.output
        assert "Traceback" not in old_openai.output
        assert json.loads(config.read_text()).get("model_build") is None  # the refusal rewrote nothing
        for weights, build in ((laion, None), (openai, 2)):
            resumed = scored_by(weights, build)
            assert resumed.exit_code == 0 and "already complete" in resumed.output, resumed.output


def test_warnings_to_a_file_or_pipe_are_one_plain_line_each(tmp_path):
    """stderr not a terminal (a log file, a pipe): each warning is one line, "warning: ..." as
    the error line is "error: ...", never folded at 80 columns (rich's log handler folded them,
    its level in a column of its own, so a grep for a message found part of it)."""
    from test_dataset_helpers import command_line

    files = {"a.jpg": Served(encode(__import__("skimage.data").data.chelsea()), "image/jpeg")}
    with LoopbackServer(files) as server:
        (tmp_path / "in.txt").write_text(server.url("a.jpg") + "\n")
        done = subprocess.run([*command_line(), "run", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o"),
                               "--no-score", "--no-progress", "--allow-private-networks", "--decoder", "cpu",
                               "--stored-encoder", "nvimgcodec"], capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k != "COLUMNS"})
    assert done.returncode == 0, done.stderr
    said = "--stored-encoder nvimgcodec applies to the GPU decoders; the CPU decoder encodes the stored images itself"
    assert len(said) > 80
    assert f"warning: {said}" in done.stderr.splitlines(), done.stderr


def test_no_score_funnel_claims_no_scoring(tmp_path):
    """With --no-score the closing funnel has no `scored` line (nothing was scored) and says so
    on the kept line; its levels still add up: input - drops = kept."""
    files = {"a.jpg": Served(encode(__import__("skimage.data").data.chelsea()), "image/jpeg"),
             "b.jpg": Served(b"not an image", "image/jpeg")}
    with LoopbackServer(files) as server:
        (tmp_path / "in.txt").write_text("".join(server.url(n) + "\n" for n in ("a.jpg", "b.jpg", "missing.jpg")))
        result = runner.invoke(app, ["run", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o"), "--no-score",
                                     "--no-progress", "--allow-private-networks", "--retries", "0"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    funnel = lines[lines.index(next(l for l in lines if l.startswith("funnel over"))) + 1:][:4]
    assert [l.split()[:2] for l in funnel] == [["input", "3"], ["downloaded", "2"], ["decoded", "1"], ["kept", "1"]]
    assert "not CLIP-scored: --no-score" in funnel[-1]
    assert "scored" not in result.output.replace("not CLIP-scored", "")
    assert " score " not in result.output  # no score stage time either


@pytest.mark.parametrize("shard_size, row_digits", [(5, 1), (20, 2), (10_000, 4)])
def test_keys_are_the_shard_then_the_row_padded_to_the_shard_sizes_digits(tmp_path, shard_size, row_digits):
    """What README.md says of keys: `{shard:05d}` then the row in its shard, zero-padded to the
    digits of --shard-size - 1 (not a fixed 4)."""
    n = shard_size + 3  # a second shard
    (tmp_path / "in.txt").write_text("".join(f"http://127.0.0.1:9/{i}.jpg\n" for i in range(n)))
    result = runner.invoke(app, ["run", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o"), "--no-score",
                                 "--no-language", "--no-progress", "--shard-size", str(shard_size)])
    assert result.exit_code == 0, result.output
    keys = pl.concat([pl.read_parquet(p, columns=["key"]) for p in sorted((tmp_path / "o").glob("0*.parquet"))])
    assert keys["key"].to_list() == [f"{i // shard_size:05d}{i % shard_size:0{row_digits}d}" for i in range(n)]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "{row:04d}" not in readme and "as many digits as `--shard-size - 1` has" in readme


def test_sigkill_midway_then_rerun_loses_and_duplicates_nothing(tmp_path, photos):
    """Kill a run with SIGKILL after some shards, rerun the same command, check every row once."""
    n_rows, shard_size = 60, 6
    files = {f"{i}.jpg": Served(encode(photos[name][: 200 + 7 * i]), "image/jpeg")
             for i, name in enumerate(list(photos) * 15) if i < n_rows - 5}
    with LoopbackServer(files, delay_s=0.08) as server:
        urls = [server.url(f"{i}.jpg") for i in range(n_rows)]  # the last 5 are 404s
        pl.DataFrame({"url": urls, "caption": [f"photo {i}" for i in range(n_rows)]}).write_parquet(tmp_path / "in.parquet")
        out = tmp_path / "out"
        cmd = FASTLAION + ["run", str(tmp_path / "in.parquet"), "-o", str(out), "--shard-size", str(shard_size),
                           "--workers", "2", "--no-score", "--no-progress", "--retries", "0",
                           "--allow-private-networks"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90
        while len(list(out.glob("*_stats.json"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        done_before = sorted(p.name for p in out.glob("*_stats.json"))
        assert 3 <= len(done_before) < n_rows // shard_size, "the kill should land midway"
        assert (out / ".partial").exists()  # it died inside a shard
        before = {p: p.stat().st_mtime_ns for p in out.glob("0000[0-2]*")}
        server.delay_s = 0  # the delay let the kill land midway; the rerun needs none
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert "already complete" in rerun.stderr + rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished shards left untouched
    assert not (out / ".partial").exists()
    table = pl.concat([pl.read_parquet(p) for p in sorted(out.glob("[0-9]*.parquet"))])
    assert table.height == n_rows
    assert table["url"].to_list() == urls  # every input row once, in order
    assert table["key"].n_unique() == n_rows
    assert dict(table.group_by("status").len().iter_rows()) == {"kept": n_rows - 5, "dropped": 5}
    import tarfile

    keys = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys += [n.rsplit(".", 1)[0] for n in tf.getnames() if n.endswith(".jpg")]
    assert len(keys) == len(set(keys)) == n_rows - 5
    assert sorted(keys) == sorted(table.filter(pl.col("status") == "kept")["key"].to_list())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["funnel"]["input"] == n_rows and summary["funnel"]["kept"] == n_rows - 5
    assert summary["shards_skipped"] == len(done_before)


def test_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(FASTLAION + ["demo", "-o", str(out), "--no-progress"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stdout and "mean nothing" in result.stdout
    assert f"dataset written to {out.resolve()}" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    f = summary["funnel"]
    assert f["kept"] >= 20 and f["input"] == f["kept"] + sum(sum(d.values()) for d in f["drops"].values())
    for reason in ("http_404", "connection_error", "invalid_url"):
        assert f["drops"]["download"].get(reason), reason
    for reason in ("not_an_image", "truncated", "too_few_bytes", "unsupported_format", "empty_body"):
        assert f["drops"]["decode"].get(reason), reason
    assert list(out.glob("*.tar"))
    # a second demo into the same folder replaces the first (in this process: the console script's
    # start-up, torch's and open_clip's imports, was checked by the first)
    assert invoke_cli(["demo", "-o", str(out), "--no-progress"]).returncode == 0
    other = tmp_path / "notdemo"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    refused = invoke_cli(["demo", "-o", str(other)])
    assert refused.returncode == 2 and "does not hold an earlier demo" in refused.stderr
    assert (other / "precious.txt").read_text() == "keep me"


def test_demo_where_it_cannot_write_is_one_line(tmp_path):
    """As for `run`: the system's refusal (a read-only place, no permission) is one line naming the
    path, exit status 1."""
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        target = tmp_path / "ro" / "demo"
    elif Path("/sys/kernel").is_dir():
        target = Path("/sys/fastlaion-demo")  # root may write anywhere else: sysfs takes no new folder
    else:
        pytest.skip("no place here that root cannot write to")
    result = subprocess.run(FASTLAION + ["demo", "-o", str(target), "--no-progress"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.rstrip().endswith(f": {target}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--device", "tpu", "--device must be"),
    ("--workers", "0", "--workers must be at least 1"),
    ("--image-size", "4", "--image-size must be between"),
    ("--language-min-score", "2", "--language-min-score must be between"),
])
def test_every_validated_flag_is_checked_before_work(tmp_path, flag, value, message):
    pl.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}).write_csv(tmp_path / "in.csv")
    result = runner.invoke(app, ["run", str(tmp_path / "in.csv"), "-o", str(tmp_path / "o"), flag, value])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize("command", [["run", "in.csv", "-o", "o", "--no-score"], ["search", "ds", "-t", "cat"],
                                     ["classify", "--from", "ds", "-o", "o", "-c", "cat"], ["evaluate", "images"],
                                     ["dedup", "--from", "ds", "-o", "o", "--by", "embedding"]])
@pytest.mark.parametrize("device", ["cuda:x", "cuda:-1", "cuda:99999999999999999999", "cuda:"])
def test_a_device_that_is_no_device_string_is_refused_before_work(tmp_path, monkeypatch, command, device):
    """`--device cuda:x` passed the check (anything after "cuda:") and torch refused it once the
    work began: a traceback (run, search, classify)."""
    monkeypatch.chdir(tmp_path)
    pl.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}).write_csv(tmp_path / "in.csv")
    result = runner.invoke(app, [*command, "--device", device, "--no-progress"], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert f"error: --device must be auto, cpu, cuda or cuda:N, got '{device}'" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_paths_and_messages_print_as_they_are(tmp_path):
    """rich read ":x:" as an emoji and "[bold]" as markup: `--device cuda:x` was told as
    "cuda❌ ...", a missing "a:x:b.csv" as "a❌b.csv", and the funnel's output folder
    "o[bold]:x:" as "o❌"."""
    missing = tmp_path / "a:x:b.csv"
    result = runner.invoke(app, ["run", str(missing), "-o", str(tmp_path / "o"), "--no-score", "--no-progress"],
                           terminal_width=400)
    assert result.exit_code == 2
    assert result.output == f"error: input file not found: {missing}\n"
    (tmp_path / "in.txt").write_text("http://127.0.0.1:9/never.jpg\n")  # private_address: never fetched
    out = tmp_path / "o[bold]:x:"
    result = runner.invoke(app, ["run", str(tmp_path / "in.txt"), "-o", str(out), "--no-score", "--no-language",
                                 "--no-progress"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert f"funnel over 1 shard(s) in {out}:\n" in result.output, result.output


def test_more_download_workers_than_urls_start_no_more_than_the_urls(tmp_path):
    """--workers 10^12 (a valid count: at least 1) made one coroutine per worker before the first
    download: the run hung, its memory growing. Two URLs take two."""
    with LoopbackServer(_served_jpegs(2)) as server:
        (tmp_path / "in.txt").write_text(server.url("0.jpg") + "\n" + server.url("1.jpg") + "\n")
        result = subprocess.run(FASTLAION + ["run", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o"), "--no-score",
                                             "--no-language", "--no-progress", "--allow-private-networks",
                                             "--workers", str(10**12)],
                                capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "  kept          2" in result.stdout, result.stdout


@pytest.mark.parametrize("args", [
    ["run", "in.txt", "--no-score", "--no-language", "--timeout", "inf"],
    ["run", "in.txt", "--no-score", "--no-language", "--connect-timeout", "inf"],
    ["run", "in.txt", "--no-score", "--no-language", "--read-timeout", "inf"],
    ["run", "in.txt", "--no-score", "--no-language", "--max-crawl-delay", "inf"],
    ["run", "in.txt", "--no-score", "--no-language", "--per-host-rate", "inf"],
    ["extract", "in.warc", "--http-timeout", "inf"],
])
def test_an_endless_time_or_rate_is_refused_before_work(tmp_path, monkeypatch, args):
    """inf was taken: no bound on an attempt (--timeout, --connect-timeout and --read-timeout inf
    together: an OverflowError traceback from the event loop), on a wait or a rate. (The input's
    URL is a private address: never fetched.)"""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("http://127.0.0.1:9/never.jpg\n")
    result = runner.invoke(app, [*args, "-o", "o", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert result.output == f"error: {args[-2]} must be a finite number, got inf\n"
    assert not (tmp_path / "o").exists()


def test_no_score_run_does_not_load_torch(tmp_path):
    """Downloading without CLIP (language tags on) must not pay torch's start-up."""
    (tmp_path / "u.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    script = (
        "import sys\nfrom typer.testing import CliRunner\nfrom fastlaion.cli import app\n"
        f"r = CliRunner().invoke(app, ['run', {str(tmp_path / 'u.txt')!r}, '-o', {str(tmp_path / 'o')!r},"
        " '--no-score', '--no-progress', '--retries', '0'])\n"
        "print(r.exit_code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["0", "False"], result.stdout + result.stderr


# --- start-up (issue #3): a command imports only what it needs --------------------------------

# Modules that no command needs at start-up: the pipeline's, the dataset commands', the ML stack.
HEAVY = ("numpy", "polars", "torch", "PIL", "pyarrow", "open_clip", "fastlaion.pipeline", "fastlaion.batch",
         "fastlaion.workers", "fastlaion.decode", "fastlaion.reader", "fastlaion.writer", "fastlaion.download",
         "fastlaion.score", "fastlaion.dataset", "fastlaion.cli_dataset", "fastlaion.extract", "rich.progress")


def loaded_after(code: str, modules: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of `modules` a fresh interpreter has imported once `code` has run."""
    script = f"import sys\n{code}\nprint('LOADED', *sorted(m for m in {modules!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1].split()[1:]


def run_main(args: list[str]) -> str:
    """`fastlaion ARGS` in the same interpreter, as the console script runs it, but through app():
    main() would end the process when done (cli._exit_now), before the caller's code looks."""
    return (f"sys.argv = ['fastlaion', *{args!r}]\nfrom fastlaion.cli import app\n"
            "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code")


def test_importing_the_cli_loads_no_heavy_module():
    assert loaded_after("import fastlaion.cli") == []


@pytest.mark.parametrize("args", [["extract", "--help"], ["run", "--help"], ["version"]])
def test_a_command_reads_only_its_own_signature(args):
    assert loaded_after(run_main(args)) == []


def test_extract_without_a_bar_prints_plain_lines_without_rich(tmp_path):
    """`fastlaion extract --no-progress` writes its summary with print: rich (~40 ms of start-up
    per process) is not imported, and the summary is all there."""
    import gzip

    wat = tmp_path / "in.wat.gz"
    wat.write_bytes(gzip.compress(b"WARC/1.0\r\nWARC-Type: warcinfo\r\nContent-Length: 0\r\n\r\n\r\n\r\n"))
    args = ["extract", str(wat), "-o", str(tmp_path / "out"), "--no-progress", "--processes", "1"]
    assert loaded_after(run_main(args), ("rich", "rich.console", "rich.logging")) == []
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "records" in result.output and "written: candidates-00000.parquet and extract_stats.json" in result.output


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_extract_processes_past_the_usable_cores_is_one_warning(tmp_path):
    """`extract --processes 3` allowed one core reads three files at once, as asked, and says in a
    line that past one a core they add memory, not speed (as `run` does); `--processes 0` is one
    per usable core: no warning."""
    import gzip

    one_core = min(os.sched_getaffinity(0))
    wats = []
    for i in range(3):
        wats.append(tmp_path / f"in{i}.wat.gz")
        wats[-1].write_bytes(gzip.compress(b"WARC/1.0\r\nWARC-Type: warcinfo\r\nContent-Length: 0\r\n\r\n\r\n\r\n"))
    for processes, said in (("3", ["warning: --processes 3: 3 worker processes on 1 core: each reads an input file of "
                                   "its own, and past one a core they add memory, not speed"]), ("0", [])):
        result = subprocess.run([*FASTLAION, "extract", *map(str, wats), "-o", str(tmp_path / f"out{processes}"),
                                 "--no-progress", "--processes", processes], capture_output=True, text=True,
                                timeout=120, preexec_fn=lambda: os.sched_setaffinity(0, {one_core}))
        assert result.returncode == 0, result.stderr
        assert [line for line in result.stderr.splitlines() if line.startswith("warning:")] == said, result.stderr


def test_every_command_is_listed_and_built_when_looked_up():
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    names = ["run", "demo", "extract", "subset", "dedup", "stats", "index", "search", "classify", "evaluate",
             "version"]
    positions = [result.output.index(f" {name} ") for name in names]
    assert positions == sorted(positions), result.output
    import typer.main

    group = typer.main.get_command(app)
    assert group.list_commands(None) == names
    assert all(group.commands[n].help for n in names)  # the real commands (placeholders have no help)
    assert [p.name for p in group.commands["subset"].params][:3] == ["source", "output", "name"]


def _raw_values(annotation, tmp_path):
    """Values a parameter of this type may receive from the command line (or as its default)."""
    import enum

    if annotation is str:
        return ["abc", "", " x ", "ünï", "-", "1"]
    if annotation is int:
        return ["0", "1", "-1", "42", "007", "+3", " 4", "1_000", "1.5", "abc", "", "-0", "99999999999999999999", 5,
                True]
    if annotation is float:
        return ["0", "0.5", "-1.25", "1e3", "1.", ".5", "abc", "", "-0", "-0.0", "-0.5", "12.000", "nan", "inf", 3, 2.5]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [*(m.value for m in annotation), *annotation, *(str(m.value).upper() for m in annotation), "bogus", ""]
    if annotation is Path:
        (tmp_path / "f.txt").write_text("x")
        return [str(tmp_path / "f.txt"), str(tmp_path), str(tmp_path / "missing"), "-", "", "rel/dir", tmp_path]
    if annotation == list[str]:
        return [("a.wat", "b.warc.gz"), (), ["x"], ("a", 1)]
    if annotation == list[Path]:
        (tmp_path / "f.txt").write_text("x")
        return [(str(tmp_path / "f.txt"), str(tmp_path)), (), [str(tmp_path / "missing")], ("rel/q.npy", ""),
                ("a", 1), (str(tmp_path / "f.txt"), tmp_path)]
    return []


def _outcome(runtime_param, value, param, ctx):
    import typer._click as click

    try:
        out = runtime_param.coerce(value, param=param, ctx=ctx)
    except click.exceptions.BadParameter as e:
        return ("error", e.format_message())
    return ("value", repr(out), type(out), [type(x) for x in out] if isinstance(out, (list, tuple)) else None)


def test_fast_value_conversion_matches_typers_own(tmp_path):
    """fastlaion/cli_typer.py converts plain option values without pydantic: for every parameter of
    every command, and odd spellings and bad values too, the outcome (value, its type, or the error
    message) is the one typer's own pydantic conversion gives."""
    import typing

    import typer._click as click
    import typer.main
    from typer._coercion import build_runtime_param

    from fastlaion.cli_typer import _PlainValue, _fast

    group = typer.main.get_command(app)
    checked = set()
    for name in group.list_commands(None):
        cmd = group.commands[name]
        ctx = click.Context(cmd, info_name=name)
        params = _fast(cmd.get_params(ctx))
        for param in params:
            d = param.type_descriptor
            if not isinstance(param._runtime_param, _PlainValue):
                continue
            typers = build_runtime_param(d)
            for value in [None, *_raw_values(d.annotation, tmp_path)]:
                assert _outcome(param._runtime_param, value, param, ctx) == _outcome(typers, value, param, ctx), \
                    (name, param.name, value)
            checked.add(str(d.annotation) if typing.get_origin(d.annotation) else d.annotation.__name__)
    assert {"str", "int", "float", "bool", "Path", "DedupMode", "list[str]", "list[pathlib.Path]"} <= checked, checked


def _served_jpegs(n: int) -> dict[str, Served]:
    cat = __import__("skimage.data").data.chelsea()
    return {f"{i}.jpg": Served(encode(cat[: 150 + 10 * i]), "image/jpeg") for i in range(n)}


def test_a_run_that_finished_no_shard_starts_over_with_other_settings(tmp_path):
    """A run that stopped before its first shard (here: a checkpoint that does not load) leaves
    its config.json but nothing to keep: a corrected rerun into the folder starts over, with a
    warning; once a shard is finished, other settings are refused as before."""
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with LoopbackServer(_served_jpegs(2)) as server:
        pl.DataFrame({"url": [server.url("0.jpg"), server.url("1.jpg")], "caption": ["a cat", "another cat"]}).write_csv(
            tmp_path / "in.csv")
        base = ["run", str(tmp_path / "in.csv"), "-o", str(tmp_path / "o"), "--no-progress", "--allow-private-networks"]
        failed = runner.invoke(app, [*base, "--model", "fastlaion-tiny", "--pretrained", str(tmp_path / "notes.txt")])
        assert failed.exit_code == 2 and (tmp_path / "o" / "config.json").exists()
        fixed = runner.invoke(app, [*base, "--no-score"], env={"COLUMNS": "400"})  # the warning on one line
        assert fixed.exit_code == 0, fixed.output
        assert "finished no shard; starting over with these settings" in fixed.output
        assert json.loads((tmp_path / "o" / "summary.json").read_text())["funnel"]["kept"] == 2
        other = runner.invoke(app, [*base, "--no-score", "--image-size", "128"])
    assert other.exit_code == 2 and "other settings" in other.output


def test_an_input_file_changed_since_the_run_began_is_refused(tmp_path):
    """Rows appended to the input after some shards finished would shift what each shard holds
    (rows lost, others repeated): the rerun is refused, naming the file. A file only touched, or
    copied back as it was, resumes."""
    with LoopbackServer(_served_jpegs(5)) as server:
        urls = [server.url(f"{i}.jpg") for i in range(5)]
        inp = tmp_path / "in.txt"
        inp.write_text("\n".join(urls[:3]) + "\n")
        base = ["run", str(inp), "-o", str(tmp_path / "o"), "--no-score", "--no-progress", "--allow-private-networks",
                "--shard-size", "2"]
        assert runner.invoke(app, base).exit_code == 0
        os.utime(inp, (time.time() + 60, time.time() + 60))  # touched: the same rows
        again = runner.invoke(app, base)
        assert again.exit_code == 0 and "already complete" in again.output, again.output
        inp.write_text("\n".join(urls) + "\n")  # two rows appended
        changed = runner.invoke(app, base)
    assert changed.exit_code == 2
    assert f"input {inp} changed since the run" in changed.output and "Traceback" not in changed.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["funnel"]["input"] == 3  # untouched


def test_a_rerun_naming_the_same_input_otherwise_resumes(tmp_path, monkeypatch):
    """The same command rerun from another folder (a relative path there), an absolute path, the
    input moved: the same file by its size and content, so the run resumes. The file changed
    since is refused, as is another file of the same size (other rows) at another path."""
    with LoopbackServer(_served_jpegs(4)) as server:
        (tmp_path / "data").mkdir()
        inp = tmp_path / "data" / "in.txt"
        inp.write_text("\n".join(server.url(f"{i}.jpg") for i in range(3)) + "\n")
        out = str(tmp_path / "o")
        rest = ["-o", out, "--no-score", "--no-progress", "--allow-private-networks", "--shard-size", "2"]
        monkeypatch.chdir(tmp_path / "data")
        assert runner.invoke(app, ["run", "in.txt", *rest]).exit_code == 0
        monkeypatch.chdir(tmp_path)
        for spelled in ("data/in.txt", str(inp), "./data//in.txt"):
            again = runner.invoke(app, ["run", spelled, *rest])
            assert again.exit_code == 0 and "already complete" in again.output, (spelled, again.output)
        moved = tmp_path / "moved.txt"
        inp.rename(moved)
        again = runner.invoke(app, ["run", str(moved), *rest])
        assert again.exit_code == 0 and "already complete" in again.output, again.output
        moved.write_text("\n".join(server.url(f"{i}.jpg") for i in range(4)) + "\n")  # a row more
        changed = runner.invoke(app, ["run", str(moved), *rest])
        assert changed.exit_code == 2 and f"input {moved} changed since the run" in changed.output, changed.output
        inp.write_text("\n".join(server.url(f"{i}.jpg") for i in range(2, -1, -1)) + "\n")  # its rows reordered
        other = runner.invoke(app, ["run", str(inp), *rest])
        assert other.exit_code == 2 and "other settings" in other.output, other.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["funnel"]["input"] == 3
    assert json.loads((tmp_path / "o" / "config.json").read_text())["input"]["paths"] == [str(moved)]


def test_crawl_files_without_a_crawl_is_refused_and_does_not_stop_a_resume(tmp_path):
    """`--crawl-files 10` / extract's `--files 10` with WAT files given and no --crawl were
    silently ignored (every file given is read): now one line. A run an earlier fastlaion began
    with the option so still resumes without it: the option read nothing, so it is no setting."""
    wat = tmp_path / "a.warc.wat.gz"
    wat.write_bytes(b"")
    run = runner.invoke(app, ["run", str(wat), "-o", str(tmp_path / "o"), "--crawl-files", "10", "--no-score"])
    assert run.exit_code == 2
    assert run.output.startswith("error: --crawl-files 10 reads that many of a crawl's WAT files: it needs --crawl ID")
    extract = runner.invoke(app, ["extract", str(wat), "-o", str(tmp_path / "c"), "--files", "10", "--no-progress"])
    assert extract.exit_code == 2 and extract.output.startswith("error: --files 10 reads that many"), extract.output
    # --cc-base-url alike: where --crawl's files come from; without --crawl nothing reads it
    mirror = "http://127.0.0.1:9/cc/"
    run_base = runner.invoke(app, ["run", str(wat), "-o", str(tmp_path / "o"), "--cc-base-url", mirror, "--no-score"])
    assert run_base.exit_code == 2, run_base.output
    assert run_base.output.startswith(f"error: --cc-base-url {mirror} is where --crawl's files"), run_base.output
    extract_base = runner.invoke(app, ["extract", str(wat), "-o", str(tmp_path / "c"), "--cc-base-url", mirror,
                                       "--no-progress"])
    assert extract_base.exit_code == 2, extract_base.output
    assert extract_base.output.startswith(f"error: --cc-base-url {mirror} is where --crawl's files"), extract_base.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()
    saved = RunConfig(output_dir=tmp_path / "o", input=InputConfig(paths=(str(wat),))).to_dict()
    earlier = {**saved, "input": {**saved["input"], "crawl_files": 10, "cc_base_url": "https://example.org/"}}
    assert resume_key(earlier) == resume_key(saved)
    crawled = {**saved, "input": {**saved["input"], "crawl": "CC-MAIN-2024-22"}}
    assert resume_key({**crawled, "input": {**crawled["input"], "crawl_files": 10}}) != resume_key(crawled)


def test_an_output_path_through_a_file_names_the_file(tmp_path):
    """`-o notes.txt/out`: the OS says "Not a directory: notes.txt/out"; the line names the part
    that is a file. The run stops before any download (its input is never fetched), as bad input
    (exit 2; it was 1, an OS error: test_an_output_folder_under_a_file_is_bad_input)."""
    (tmp_path / "notes.txt").write_text("a file\n")
    inp = tmp_path / "in.txt"
    inp.write_text("http://127.0.0.1:9/never.jpg\n")
    out = tmp_path / "notes.txt" / "out" / "deeper"
    result = runner.invoke(app, ["run", str(inp), "-o", str(out), "--no-score", "--no-progress"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: --output {out}: {tmp_path / 'notes.txt'} is a file, not a folder"


@pytest.mark.parametrize("args, named", [
    (["run", "in.txt", "-o", "", "--no-score", "--no-progress"], "'--output' / '-o'"),
    (["run", "in.txt", "--output=", "--no-score", "--no-progress"], "'--output' / '-o'"),
    (["extract", "in.warc", "-o", "", "--no-progress"], "'--output' / '-o'"),
    (["demo", "-o", "", "--no-progress"], "'--output' / '-o'"),
    (["subset", "en", "--from", "ds", "-o", ""], "'--output' / '-o'"),
    (["subset", "en", "--from", "", "-o", "sub"], "'--from'"),
    (["dedup", "--from", "ds", "-o", ""], "'--output' / '-o'"),
    (["classify", "--from", "ds", "-o", "", "-c", "cat"], "'--output' / '-o'"),
    (["classify", "--from", "ds", "-o", "cls", "--classes", ""], "'--classes'"),
    (["stats", ""], "'OUT'"),
    (["stats", "ds", "--json", ""], "'--json'"),
    (["stats", "ds", "--html", ""], "'--html'"),
    (["index", ""], "'OUT'"),
    (["search", "ds", "-t", "cat", "--json", ""], "'--json'"),
    (["search", "ds", "--image", "a.jpg", "--image", ""], "'--image'"),
    (["search", "ds", "--vector", ""], "'--vector'"),
    (["evaluate", ""], "'IMAGES_DIR'"),
    (["evaluate", "images", "--json", ""], "'--json'"),
    (["evaluate", "images", "--classnames", ""], "'--classnames'"),
])
def test_an_empty_path_is_refused_naming_the_option(tmp_path, monkeypatch, args, named):
    """`-o ''` (`-o "$OUT"` with OUT unset): typer made it Path(''), the current folder, and `run`
    wrote its shards there, `subset` its metadata.parquet, `stats` read it. Refused by the
    parser, naming the option, before anything is read or written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("http://127.0.0.1:9/never.jpg\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 2, result.output
    assert f"error: invalid value for {named}: an empty path" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", ["run", "extract"])
def test_an_empty_input_path_is_refused(tmp_path, monkeypatch, command):
    """`run "$LIST" -o out` with LIST unset: the empty INPUT was taken for the current folder
    ("directory: ."). Refused in one line before anything is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("http://127.0.0.1:9/never.jpg\n")
    args = [command, "in.txt", "", "-o", "out", "--no-progress"] + (["--no-score"] if command == "run" else [])
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: INPUT '' is an empty path; give a file name or URL"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


@pytest.mark.parametrize("held", [("metadata.parquet", "dataset.json"), ("metadata.parquet",), ("dataset.json",)])
def test_a_run_into_a_dataset_commands_output_is_refused_and_touches_nothing(tmp_path, held):
    """A `subset --shards` folder holds its own 00000.tar and embeddings but no finished shard of
    a run: a run into it "started over" and wrote its shard 00000 over them (the exported
    samples lost; dataset.json still described them)."""
    out = tmp_path / "sub"
    out.mkdir()
    for name in (*held, "00000.tar", "00000_img_emb.npy", "shards.json"):
        (out / name).write_bytes(b"the subset's own " + name.encode())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "in.txt").write_text("http://127.0.0.1:9/never.jpg\n")  # private_address: never fetched
    result = runner.invoke(app, ["run", str(tmp_path / "in.txt"), "-o", str(out), "--no-score", "--no-language",
                                 "--no-progress"], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: {out} holds the output of `fastlaion subset`, `dedup` or `classify` "
                             f"({', '.join(held)}), which a run would write its shards over; choose another output "
                             "folder\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_run_into_an_img2dataset_output_is_refused_and_touches_nothing(tmp_path):
    """An img2dataset output (00000.tar, 00000.parquet, 00000_stats.json; no config.json) given as
    -o: the run took it for a new folder and wrote its shard 00000 over those files. A folder with
    other files (notes.txt) is still a fine new output folder."""
    out = tmp_path / "wds"
    out.mkdir()
    for name in ("00000.tar", "00000.parquet", "00000_stats.json", "00001.tar", "notes.txt"):
        (out / name).write_bytes(b"img2dataset's " + name.encode())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "in.txt").write_text("http://127.0.0.1:9/never.jpg\n")  # private_address: never fetched
    args = ["run", str(tmp_path / "in.txt"), "--no-score", "--no-language", "--no-progress"]
    result = runner.invoke(app, [*args, "-o", str(out)], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: {out} holds 4 file(s) named as a run's shards (00000.parquet, 00000.tar, "
                             "00000_stats.json, 00001.tar) but no config.json: not a fastlaion run's (an img2dataset "
                             "output?), which this run would write over; choose another output folder\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    for name in ("00000.tar", "00000.parquet", "00000_stats.json", "00001.tar"):
        (out / name).unlink()
    assert runner.invoke(app, [*args, "-o", str(out)]).exit_code == 0
    assert (out / "notes.txt").read_bytes() == before["notes.txt"] and (out / "00000.tar").is_file()


def test_a_resume_under_other_download_rules_says_so(tmp_path):
    """Opt-outs, robots.txt, blocklists decide which rows a shard keeps; a resume may change them
    (a blocklist grown), but the finished shards were downloaded under the old ones: said in one
    line. The same rules, or other speed settings, say nothing."""
    with LoopbackServer(_served_jpegs(2)) as server:
        inp = tmp_path / "in.txt"
        inp.write_text(f"{server.url('0.jpg')}\n{server.url('1.jpg')}\n")
        base = ["run", str(inp), "-o", str(tmp_path / "o"), "--no-score", "--no-progress", "--allow-private-networks"]
        assert runner.invoke(app, base).exit_code == 0
        same = runner.invoke(app, [*base, "--workers", "3"], env={"COLUMNS": "400"})
        assert same.exit_code == 0 and "other rules" not in same.output, same.output
        blocklist = tmp_path / "block.txt"
        blocklist.write_text("")
        other = runner.invoke(app, [*base, "--opt-out-tags", "noai", "--url-blocklist", str(blocklist)],
                              env={"COLUMNS": "400"})
    assert other.exit_code == 0 and "already complete" in other.output, other.output
    assert "its finished shards were downloaded under other rules (opt_out_tags: was ['noai', 'noimageai', " \
           "'noindex', 'noimageindex'], now ['noai']; url_blocklist: was None, now " in other.output, other.output


def test_a_finished_shard_whose_files_were_lost_or_cut_is_run_again(tmp_path):
    """Its stats file says a shard is finished, but its tar was deleted or its Parquet cut since:
    the rerun says so and writes that shard again; the intact one is skipped. Every row is there
    once at the end."""
    with LoopbackServer(_served_jpegs(6)) as server:
        inp = tmp_path / "in.txt"
        inp.write_text("\n".join(server.url(f"{i}.jpg") for i in range(6)) + "\n")
        out = tmp_path / "o"
        base = ["run", str(inp), "-o", str(out), "--no-score", "--no-progress", "--allow-private-networks",
                "--shard-size", "2"]
        assert runner.invoke(app, base).exit_code == 0
        (out / "00000.tar").unlink()
        parquet = (out / "00002.parquet").read_bytes()
        (out / "00002.parquet").write_bytes(parquet[: len(parquet) // 2])
        again = runner.invoke(app, base, env={"COLUMNS": "400"})  # each warning on one line
    assert again.exit_code == 0, again.output
    assert "shard 00000: 00000.tar is missing; it is run again" in again.output
    assert f"shard 00002: 00002.parquet holds {len(parquet) // 2:,} bytes, {len(parquet):,} when written" in again.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_run"] == 2 and summary["shards_skipped"] == 1 and summary["funnel"]["kept"] == 6
    table = pl.concat([pl.read_parquet(out / f"0000{s}.parquet") for s in range(3)])
    assert table.height == 6 and table["url"].n_unique() == 6


def test_input_marks_are_made_of_regular_files_only(tmp_path):
    """`fastlaion run <(cat urls.txt)`: the resume check's mark must not read a pipe (what it read
    would be lost to the run, or it would wait for a writer); remote and missing paths have none."""
    import threading

    from fastlaion.pipeline import input_files

    fifo = tmp_path / "urls"
    os.mkfifo(fifo)
    (tmp_path / "a.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    marks: dict = {}
    t = threading.Thread(target=lambda: marks.update(input_files(
        [str(fifo), str(tmp_path / "a.txt"), "https://h.example/x.parquet", str(tmp_path / "missing.txt")])), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "input_files opened the pipe"
    assert list(marks) == [str(tmp_path / "a.txt")]


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path):
    """While one run writes into a folder (its lock held: here by this process), another into it
    is refused at once, naming the first one's process, and touches nothing there; once the first
    ends (lock and lock file gone), the same command runs."""
    from fastlaion.pipeline import LOCK_FILE, output_lock

    out = tmp_path / "o"
    out.mkdir()
    with LoopbackServer(_served_jpegs(1)) as server:
        (tmp_path / "in.txt").write_text(server.url("0.jpg") + "\n")
        args = ["run", str(tmp_path / "in.txt"), "-o", str(out), "--no-score", "--no-progress", "--allow-private-networks"]
        with output_lock(out):
            before = sorted(os.listdir(out))
            second = subprocess.run(FASTLAION + args, capture_output=True, text=True, timeout=120,
                                    env={**os.environ, "COLUMNS": "400"})
            assert second.returncode == 2, second.stderr
            assert f"another fastlaion run is writing into it (process {os.getpid()})" in second.stderr
            assert sorted(os.listdir(out)) == before == [LOCK_FILE]
        assert not (out / LOCK_FILE).exists()
        after = runner.invoke(app, args)
    assert after.exit_code == 0, after.output
    assert not (out / LOCK_FILE).exists() and (out / "00000.tar").exists()


def test_stats_of_a_no_score_run_shows_no_score_step(tmp_path):
    """`fastlaion stats` on a --no-score run's output: no `scored` level (nothing was scored, so
    the step dropped nothing and claims nothing), and the levels still add up to the kept rows."""
    with LoopbackServer(_served_jpegs(3)) as server:
        (tmp_path / "in.txt").write_text("\n".join([server.url("0.jpg"), server.url("1.jpg"), server.url("9.jpg")]) + "\n")
        out = tmp_path / "o"
        assert runner.invoke(app, ["run", str(tmp_path / "in.txt"), "-o", str(out), "--no-score", "--no-progress",
                                   "--allow-private-networks", "--retries", "0"]).exit_code == 0
    result = runner.invoke(app, ["stats", str(out), "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    funnel = json.loads((tmp_path / "s.json").read_text())["funnel"]
    names = [level["name"] for level in funnel]
    assert "scored" not in names and names[0] == "input" and names[-1] == "kept", names
    assert [level["rows"] for level in funnel][0] == 3 and funnel[-1]["rows"] == 2
    assert funnel[0]["rows"] - sum(level["dropped"] for level in funnel[1:]) == funnel[-1]["rows"]


# --- a real Ctrl-C at the edges of a command's work -----------------------------------------------------------

_CTRL_C = ("import os, signal, sys, time\ndef ctrl_c(sig=signal.SIGINT):\n    os.kill(os.getpid(), sig)\n"
           "    time.sleep(0.2)\n")


def _fastlaion_after(setup: str, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`python -m fastlaion ARGS` (runpy runs fastlaion/__main__.py as -m does), in a process that
    first runs `setup`, which has `ctrl_c()`: a real SIGINT to the process, as the terminal sends."""
    script = (f"{_CTRL_C}{setup}\nsys.argv = ['fastlaion', *{[str(a) for a in args]!r}]\n"
              "import runpy\nrunpy.run_module('fastlaion', run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, **kwargs)


def _ctrl_c_at_import(module: str, sig: str = "SIGINT") -> str:
    """`setup` for _fastlaion_after: a Ctrl-C (or `sig`) when `module` is first imported."""
    return ("class CtrlCAt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name == {module!r}:\n"
            "            sys.meta_path.remove(self)\n"
            f"            ctrl_c(signal.{sig})\n"
            "sys.meta_path.insert(0, CtrlCAt())\n")


def _one_parquet(tmp_path) -> Path:
    src = tmp_path / "rows.parquet"
    pl.DataFrame({"url": ["http://a.example/x.jpg", "http://a.example/y.jpg"], "caption": ["a cat", "a dog"],
                  "status": ["kept", "kept"], "key": ["000000000", "000000001"]}).write_parquet(src)
    return src


@pytest.mark.parametrize("command, flag", [
    (["run", "{tmp}/in.txt", "--no-score", "--no-language"], "--output"),
    (["demo"], "--output"),
    (["extract", "{tmp}/in.warc"], "--output"),
    (["subset", "--from", "{tmp}/rows.parquet", "--where", "true"], "-o"),
    (["dedup", "--from", "{tmp}/rows.parquet", "--by", "url"], "-o"),
    (["classify", "--from", "{tmp}/rows.parquet", "--class", "cat"], "-o"),
])
@pytest.mark.parametrize("under", ["notes.txt/out", "notes.txt/out/deeper"])
def test_an_output_folder_under_a_file_is_bad_input(tmp_path, command, flag, under):
    """`-o notes.txt/out`, notes.txt a file: mkdir's NotADirectoryError made it exit 1, an OS
    error, where `-o notes.txt` and every other bad path exit 2 (bad input). Now exit 2 in one line
    naming the option and the file in the way, before any work (classify loaded its model first)."""
    (tmp_path / "notes.txt").write_text("a file")
    (tmp_path / "in.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    (tmp_path / "in.warc").write_bytes(b"")
    _one_parquet(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / under
    result = invoke_cli([a.format(tmp=tmp_path) for a in command] + ["-o", str(out), "--no-progress"],
                        env={"COLUMNS": "300"})
    assert (result.returncode, result.stderr) == (2, f"error: {flag} {out}: {tmp_path / 'notes.txt'} is a file, "
                                                     "not a folder\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "notes.txt").read_text() == "a file"


@pytest.mark.parametrize("module, sig", [("typer", "SIGINT"), ("fastlaion.cli_dataset", "SIGINT"),
                                         ("fastlaion.cli_dataset", "SIGTERM")])
def test_a_ctrl_c_while_the_command_line_starts_is_one_line_and_exit_130(tmp_path, module, sig):
    """A Ctrl-C while fastlaion.cli's imports run (typer: it died by SIGINT with a traceback) or
    while the command's own ones do, typer having parsed the arguments (the dataset commands':
    typer's exit 130 without a word): one line, exit 130, nothing written. SIGTERM (it died
    without a word): the same, naming it, exit 143."""
    out = tmp_path / "sub"
    result = _fastlaion_after(_ctrl_c_at_import(module, sig), ["subset", "--from", _one_parquet(tmp_path), "-o", out,
                                                               "--where", "true"])
    said, code = ("terminated (SIGTERM)", 143) if sig == "SIGTERM" else ("interrupted", 130)
    assert (result.returncode, result.stderr, result.stdout) == (code, f"{said} while starting; nothing was written\n", "")
    assert not out.exists()


@pytest.mark.parametrize("when", ["as it exits", "in the interpreter's teardown"])
def test_a_finished_command_exits_0_through_a_ctrl_c_after_its_last_line(tmp_path, when):
    """The command has written its output and said so: a Ctrl-C as typer exits (it died by SIGINT
    with a traceback) or in the interpreter's teardown (after the atexit handlers, Python's own:
    a traceback) leaves its exit status 0 and adds nothing."""
    setup = ({"as it exits": "real_exit = sys.exit\ndef exit_after_a_ctrl_c(code=None):\n    ctrl_c()\n"
                             "    real_exit(code)\nsys.exit = exit_after_a_ctrl_c\n",
              "in the interpreter's teardown": "import atexit\natexit.register(ctrl_c)\n"})[when]
    out = tmp_path / "sub"
    result = _fastlaion_after(setup, ["subset", "--from", _one_parquet(tmp_path), "-o", out, "--where", "caption = 'a cat'",
                                      "--no-progress"])
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout == f"subset --where \"caption = 'a cat'\": 1 of 2 kept samples (50.0%) -> {out / 'metadata.parquet'}\n"
    assert pl.read_parquet(out / "metadata.parquet")["caption"].to_list() == ["a cat"]


@pytest.mark.parametrize("stop, line, code", [
    ("ctrl_c", "interrupted: nothing was replaced; rerun the command", 130),
    ("bad_input", "error: --where names unknown column(s) 'nosuch'; columns are: url, caption, hash, status, key, shard", 2)])
def test_a_second_ctrl_c_while_the_command_says_why_it_stopped_leaves_the_line_whole(tmp_path, stop, line, code):
    """A Ctrl-C (or bad input) stops the command, and a second Ctrl-C comes while its line is
    written (half of it out): the line was cut there and typer exited 130 without the rest. Now
    the line is whole, once, and the exit status the first stop's."""
    setup = ("import fastlaion.dataset.subset as subset_module\n"
             "real_subset = subset_module.subset\n"
             f"def subset(*args, **kwargs):\n    {'ctrl_c()' if stop == 'ctrl_c' else 'pass'}\n"
             "    return real_subset(*args, **kwargs)\n"
             "subset_module.subset = subset\n"
             "class HalfThenCtrlC:\n"
             "    def __init__(self, f):\n        self.f = f\n"
             "    def write(self, s):\n"
             "        self.f.write(s[:len(s) // 2])\n        self.f.flush()\n        ctrl_c()\n"
             "        return self.f.write(s[len(s) // 2:])\n"
             "    def __getattr__(self, name):\n        return getattr(self.f, name)\n"
             "sys.stderr = HalfThenCtrlC(sys.stderr)\n")
    where = "caption = 'a cat'" if stop == "ctrl_c" else "nosuch = 1"
    result = _fastlaion_after(setup, ["subset", "--from", _one_parquet(tmp_path), "-o", tmp_path / "sub",
                                      "--where", where, "--no-progress"])
    assert (result.returncode, result.stderr) == (code, line + "\n")
    assert not (tmp_path / "sub").exists()


@pytest.mark.parametrize("command, what, when", [
    ("subset", "the subset was", "while its files are written aside"),
    ("subset", "the subset was", "between the renames that put them in place"),
    ("dedup", "the deduplicated dataset was", "between the renames that put them in place")])
def test_sigterm_stops_a_dataset_command_as_a_ctrl_c_does(tmp_path, command, what, when):
    """SIGTERM (kill, timeout, a batch system) killed the command at once without a word: OUT/.lock
    and OUT/.partial/ stayed, and between the renames the output was left half replaced. Now it
    stops it as a Ctrl-C does, in one line that names it, exit status 143: nothing replaced while
    the files are written aside; between the renames they all go in first, and it says so."""
    if when.startswith("while"):
        setup = ("from fastlaion.dataset import output\nreal_finish = output.OutputDir.finish\n"
                 "def finish(*args, **kwargs):\n    ctrl_c(signal.SIGTERM)\n    return real_finish(*args, **kwargs)\n"
                 "output.OutputDir.finish = finish\n")
    else:
        setup = ("from fastlaion.dataset import output\nreal_replace = os.replace\nmoved = []\n"
                 "def replace(src, dst, *args, **kwargs):\n    real_replace(src, dst, *args, **kwargs)\n"
                 "    if os.path.basename(os.path.dirname(src)) == output.PARTIAL_DIR and not moved:\n"
                 "        moved.append(dst)\n        ctrl_c(signal.SIGTERM)\n"
                 "output.os = type(sys)('os_in_output')\noutput.os.__dict__.update(os.__dict__)\n"
                 "output.os.replace = replace\n")
    out = tmp_path / "out"
    source = _one_parquet(tmp_path)
    if command == "dedup":  # what dedup reads of a run's rows besides
        pl.read_parquet(source).with_columns(stage=pl.lit(None, pl.String), reason=pl.lit(None, pl.String)).write_parquet(source)
    args = [command, "--from", source, "-o", out, "--no-progress"]
    args += ["--where", "true"] if command == "subset" else ["--by", "url"]
    result = _fastlaion_after(setup, args)
    said = f"{what} written, whole, to {out}" if when.startswith("between") else "nothing was replaced; rerun the command"
    assert (result.returncode, result.stderr) == (143, f"terminated (SIGTERM): {said}\n"), result.stderr
    if when.startswith("between"):
        assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "metadata.parquet"]  # no .lock, no .partial/
        assert pl.read_parquet(out / "metadata.parquet").height == 2
    else:
        assert not out.exists()  # made by this command, left empty: its lock file and .partial/ gone
    rerun = _fastlaion_after("", args)
    assert rerun.returncode == 0, rerun.stderr


def test_a_command_started_with_ctrl_c_ignored_leaves_it_ignored(tmp_path):
    """A script's background job (`fastlaion ... &`) starts with SIGINT ignored: a Ctrl-C meant
    for the script, while the command starts or while it works, does not stop it."""
    setup = (_ctrl_c_at_import("typer")
             + "import fastlaion.dataset.subset as subset_module\n"
             "real_subset = subset_module.subset\n"
             "def subset(*args, **kwargs):\n    ctrl_c()\n    return real_subset(*args, **kwargs)\n"
             "subset_module.subset = subset\n")
    out = tmp_path / "sub"
    result = _fastlaion_after(setup, ["subset", "--from", _one_parquet(tmp_path), "-o", out, "--where", "true",
                                      "--no-progress"],
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert (result.returncode, result.stderr) == (0, "")
    assert pl.read_parquet(out / "metadata.parquet").height == 2


def test_more_workers_than_the_soft_open_file_limit_allows_still_download_every_row(tmp_path):
    """One connection is one open file: `--workers 250` under a soft `ulimit -n` of 128 (1024 is
    the default of many systems, for a --workers 2000) stopped the run with "Too many open files"
    and nothing written. The run raises its soft limit as far as the hard one allows; where the
    hard one is lower, a warning says so (the run goes on)."""
    import resource

    n = 300
    jpeg = encode(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with LoopbackServer({f"{i}.jpg": Served(jpeg, "image/jpeg") for i in range(n)}, delay_s=0.5) as server:
        inp = tmp_path / "in.txt"
        inp.write_text("".join(server.url(f"{i}.jpg") + "\n" for i in range(n)))
        result = subprocess.run([*FASTLAION, "run", str(inp), "-o", str(tmp_path / "o"), "--no-score", "--no-language",
                                 "--workers", "250", "--per-host", "1000", "--allow-private-networks", "--retries", "0",
                                 "--min-image-bytes", "0", "--no-progress"], capture_output=True, text=True, timeout=120,
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard)))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["funnel"]["kept"] == n
    # a hard limit under what --workers needs: the soft one goes up to it, and a warning names both
    low = subprocess.run([sys.executable, "-c", (
        "import logging, resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 200))\n"
        "logging.basicConfig(format='%(message)s')\n"
        "from fastlaion.download import open_file_limit\n"
        "print(open_file_limit(1256), resource.getrlimit(resource.RLIMIT_NOFILE))\n")],
        capture_output=True, text=True, timeout=60)
    assert low.stdout.strip() == "200 (200, 200)", low
    assert "--workers needs about 1256 open files, and this process may open 200 (ulimit -n; its hard limit is 200)" \
        in low.stderr, low.stderr


class _Captured(Exception):
    pass


def test_the_commands_defaults_are_laions_settings(tmp_path, monkeypatch):
    """Each default LAION.md gives a number for, as `fastlaion run` and `fastlaion extract` build
    their configuration with no option given (the CLI writes some of them out again, apart from
    the dataclasses): the numbers below are LAION.md's, written here by hand."""
    import fastlaion.cli as cli
    import fastlaion.extract as extract

    seen = []

    def capture(cfg, *args, **kwargs):
        seen.append(cfg)
        raise _Captured

    monkeypatch.setattr(cli, "execute", capture)
    for extra in ([], ["--multilingual-model", "xlm-roberta-base-ViT-B-32"]):
        result = runner.invoke(app, ["run", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "o"), *extra])
        assert isinstance(result.exception, _Captured), result.output
    run, multi = seen
    assert run.download.workers == 64 and run.download.timeout_s == 10  # step 4: 64 connections, 10 s
    assert run.decode.min_image_bytes == 5000 and run.decode.max_pixels == 89_478_484  # step 5
    assert run.score.model == "ViT-B-32" and run.score.pretrained == "openai"  # step 7: OpenAI ViT-B/32 ...
    assert run.score.min_similarity == 0.28  # ... >= 0.28 for English
    assert multi.score.threshold_multi == 0.26  # mCLIP's 0.26 for the others, with a multilingual model
    assert run.input.max_caption_chars == 2000  # step 2: alt cut to 2000
    assert run.tags.language and run.tags.nsfw_head == "auto"  # steps 8, 9 on by default

    monkeypatch.setattr(extract, "extract_to_parquet", lambda sources, out, cfg, *rest: capture(cfg))
    result = runner.invoke(app, ["extract", str(tmp_path / "x.wat.gz"), "-o", str(tmp_path / "c")])
    assert isinstance(result.exception, _Captured), result.output
    ext = seen[-1]
    assert ext.min_alt_chars == 5 and ext.max_text_chars == 2000 and ext.max_host_chars == 60  # step 2
    assert ext.reject_svg and ext.reject_gif  # step 2: .svg and .gif URLs rejected
    assert ext.dedup.value == "uid"  # step 3 as LAION.md's fastlaion column has it: url + text
