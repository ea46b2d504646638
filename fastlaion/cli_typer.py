"""Typer plumbing that keeps the command line's start-up to what the command run needs (issue #3).

Typer, left to itself, spends about 0.3 CPU-s before a command starts that `fastlaion extract`,
for one, never uses:

- It turns every command's function into click parameters when the app is called, whichever
  command is run (`run` alone has fifty options), and the dataset commands' signatures import
  Polars, numpy and Pillow. `LazyGroup` holds a `Deferred` placeholder per command (see
  `add_lazy_command`) and builds the real command the first time it is looked up: to run it, or
  to list it in `fastlaion --help`, whose content is therefore unchanged.
- Typer 0.2x converts each parameter value with a pydantic TypeAdapter, built lazily but for
  every parameter of the command run, `--help` included: pydantic's import and the adapters cost
  about 0.2 CPU-s at every start. `FastCommand` converts the values of plain types in their usual
  spelling itself, to exactly what the adapter gives (a str as it is, a decimal integer or
  number, an enum value, a path through typer's own path checks, a list of str or of paths); anything else
  (a bad value, another spelling, another type) goes on to typer's own conversion, so its results
  and error messages stay typer's. tests/test_cli.py compares the two on every parameter.

And two that are not about start-up: `--help`'s options table (typer's `_print_options_panel`)
is laid out by `_whole_names`, so that an option's name is never cut at 80 columns (see there);
and a usage error (an unknown option or command, a missing or bad value: click's own errors, of
every command, the lazily built ones included) is one line, `error: ...` as fastlaion's other
errors, exit status 2 (`LazyGroup.usage_errors_in_one_line`), where typer printed the usage, a
"Try ... --help" line and the message in a five-line box.

All use typer's internals (`typer.core.TyperGroup`, `_TyperParameter._runtime_param`,
`typer._coercion.RuntimeParam`, `typer.rich_utils._print_options_panel`, its vendored click's
exceptions); where a later typer lacks them, the fast conversion is left out and typer converts
as it always did, and its help keeps typer's own layout.
"""

from __future__ import annotations

import difflib
import enum
import inspect
import re
import sys
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup
from typer.models import CommandInfo

try:
    from typer._click import exceptions as click_errors
except ImportError:  # a typer that uses click itself
    from click import exceptions as click_errors  # type: ignore[no-redef]

try:
    from typer._coercion import RuntimeParam, build_runtime_param
    from typer._param_types import coerce_cli_path
    from typer._typing import get_args, get_origin
except ImportError:  # another typer: it converts every value itself
    RuntimeParam = None  # type: ignore[assignment,misc]


class LazyGroup(TyperGroup):
    """A typer app's command group whose commands are built when first looked up, and whose
    usage errors, its own and its commands', are one line (`usage_errors_in_one_line`)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.commands = _Commands(self.commands)

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with self.usage_errors_in_one_line():  # `fastlaion --bogus`
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with self.usage_errors_in_one_line():  # a command's: looked up, its arguments parsed, run
            return super().invoke(ctx)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        with _with_context(ctx):
            return super().parse_args(ctx, args)

    @contextmanager
    def usage_errors_in_one_line(self) -> Iterator[None]:
        """Click's usage errors (typer's box of five lines: the usage, "Try ... --help", the
        message framed) told as `error: MESSAGE; see 'COMMAND --help'` (`usage_line`) by
        `print_error`, exit status 2 (the error's own). Typer's "no arguments: the help" is left
        as it is."""
        try:
            yield
        except click_errors.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":
                raise
            self.print_error(usage_line(e))
            raise typer.Exit(e.exit_code) from None

    def print_error(self, line: str) -> None:
        """`error: line` on stderr (fastlaion.cli's group prints it as its other errors)."""
        sys.stderr.write(f"error: {line}\n")

    def format_help(self, ctx: Any, formatter: Any) -> None:
        with _whole_names():
            super().format_help(ctx, formatter)

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)  # the names, in registration order, without building them

    def get_params(self, ctx: Any) -> list[Any]:
        return _fast(super().get_params(ctx))


class _Commands(MutableMapping[str, Any]):
    """The group's commands by name; a `Deferred` placeholder is replaced by its real command the
    first time it is read, whichever way (`get_command`, `group.commands[name]`, `.items()`)."""

    def __init__(self, commands: Mapping[str, Any]):
        self._commands = dict(commands)

    def __getitem__(self, name: str) -> Any:
        cmd = self._commands[name]
        if isinstance(cmd, Deferred):
            cmd = self._commands[name] = cmd.build()
        return cmd

    def __setitem__(self, name: str, cmd: Any) -> None:
        self._commands[name] = cmd

    def __delitem__(self, name: str) -> None:
        del self._commands[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._commands)

    def __len__(self) -> int:
        return len(self._commands)


class FastCommand(TyperCommand):
    """A typer command whose plain parameter values are converted without pydantic, and whose
    path parameters refuse an empty value (`_refuse_empty_paths`)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _fast(super().get_params(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        given = list(args)  # the parser consumes the list it is given
        with _with_context(ctx):
            rest = super().parse_args(ctx, args)  # --help, a bad value: told first, as typer does
        if not ctx.resilient_parsing:
            _refuse_empty_paths(self, ctx, given)
        return rest

    def format_help(self, ctx: Any, formatter: Any) -> None:
        with _whole_names():
            super().format_help(ctx, formatter)


@contextmanager
def _with_context(ctx: Any) -> Iterator[None]:
    """A usage error raised without its command's context (the parser's "Option '--processes'
    requires an argument.") given it, so that its line says which command's --help to see."""
    try:
        yield
    except click_errors.UsageError as e:
        if e.ctx is None:
            e.ctx, e.cmd = ctx, ctx.command
        raise


def usage_line(e: Any) -> str:
    """A click usage error as one line in fastlaion's style: its message (lower-case first, no
    closing full stop; a typo's suggestions in brackets) and the help to see.

    An unknown option's suggestions are difflib's close matches as click finds them, but among the
    option names without their dashes (`--` is two letters in common with every option: click
    offered --gpus and --verbose for --bogus), best first (click sorted them: --no-progress,
    --processes, --progress for --proceses)."""
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click_errors.NoSuchOption) and ctx is not None and e.option_name.startswith("--"):
        names = {name for param in ctx.command.get_params(ctx) for name in (*param.opts, *param.secondary_opts)
                 if name.startswith("--")}
        close = difflib.get_close_matches(e.option_name[2:], [n[2:] for n in names])
        message = e.message + (f" (possible options: {', '.join('--' + n for n in close)})" if close else "")
    else:
        message = e.format_message().rstrip()
        guess = re.fullmatch(r"(.*)\. Did you mean (.*)\?", message, re.S)  # typer's "No such command"
        message = f"{guess[1]} (did you mean {guess[2]}?)" if guess else message.removesuffix(".")
        for wordy, plain in _PLAIN_VALUE_ERRORS:
            message = message.replace(wordy, plain)
    message = " ".join(message.split())
    message = message[:1].lower() + message[1:]
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        message += f"; see '{ctx.command_path} {ctx.help_option_names[0]}'"
    return message


# typer's value conversion speaks pydantic ("Input should be a valid integer, unable to parse
# string as an integer"): said plainly in the one line (the option is named before it)
_PLAIN_VALUE_ERRORS = (
    ("Input should be a valid integer, unable to parse string as an integer", "not a whole number"),
    ("Input should be a valid integer, got a number with a fractional part", "not a whole number"),
    ("Input should be a valid number, unable to parse string as a number", "not a number"),
    ("': Value error, ", "': "),
)


def _refuse_empty_paths(command: TyperCommand, ctx: Any, args: list[str]) -> None:
    """Refuse an empty value of a path parameter (`-o ''`, `-o "$OUT"` with OUT unset), naming
    it. Typer makes it Path(''), which is '.': `run -o ''` wrote its shards into the current
    folder, `subset -o ''` its metadata.parquet there, `stats ''` read it."""
    opts, _, _ = command.make_parser(ctx).parse_args(args=list(args))
    for param in command.get_params(ctx):
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is None or descriptor.annotation not in (Path, list[Path]):
            continue
        raw = opts.get(param.name)
        if raw == "" or (isinstance(raw, (list, tuple)) and "" in raw):
            raise typer.BadParameter("an empty path; give a file or folder name ('.' for the current folder)",
                                     ctx=ctx, param=param)


class Deferred(TyperCommand):
    """Stands for a command in a `LazyGroup` until `build()` makes the real one, exactly as
    `@app.command(name, cls=FastCommand)` on the function `load()` returns would have."""

    load: Callable[[], Callable[..., Any]]
    _pretty_exceptions_short: bool

    def build(self) -> TyperCommand:
        from typer.main import get_command_from_info

        assert self.name is not None
        command = get_command_from_info(CommandInfo(name=self.name, callback=self.load(), cls=FastCommand),
                                        pretty_exceptions_short=self._pretty_exceptions_short,
                                        rich_markup_mode=self.rich_markup_mode)
        if command.help and not command.short_help:
            # `fastlaion --help` lists each command by its docstring's first paragraph, and rich
            # keeps the docstring's line ends there: one line of text, for rich to wrap
            command.short_help = " ".join(command.help.split("\n\n")[0].split())
        if command.help:  # the command's own --help alike: each paragraph one line (lists as they are)
            command.help = "\n\n".join(
                p if any(line.startswith((" ", "-", "*", "|")) for line in p.splitlines()) else " ".join(p.split())
                for p in inspect.cleandoc(command.help).split("\n\n"))
        return command


def _placeholder() -> None:
    pass


def add_lazy_command(app: typer.Typer, name: str, load: Callable[[], Callable[..., Any]]) -> None:
    """Register command `name` on `app` (made with `cls=LazyGroup`), in --help order; `load()`
    returns its function, called the first time the command is looked up."""
    cls = type(f"Deferred_{name}", (Deferred,), {"load": staticmethod(load),
                                                 "_pretty_exceptions_short": app.pretty_exceptions_short})
    app.command(name, cls=cls)(_placeholder)


# ---------------------------------------------------------------------------------------------
# --help: option names whole

@contextmanager
def _whole_names() -> Iterator[None]:
    """While typer prints a command's help, its options panels go through `_OptionsConsole`.

    Typer's options table has a column each for the names, the short names, the --no-X names,
    their short forms, the type and the help, every one of them free for rich to shrink: in an
    80-column terminal rich cut `run`'s long option names (`--max-caption-c…`, two options shown
    as `--multilingual-…`) and the defaults (`[default: noai,noimageai,n…`) with an ellipsis."""
    try:
        from typer import rich_utils

        print_panel = rich_utils._print_options_panel
    except (ImportError, AttributeError):  # another typer: its own layout
        yield
        return

    def print_options_panel(*, console: Any, **kwargs: Any) -> None:
        print_panel(console=_OptionsConsole(console), **kwargs)

    rich_utils._print_options_panel = print_options_panel
    try:
        yield
    finally:
        rich_utils._print_options_panel = print_panel


class _OptionsConsole:
    """The console typer prints an options panel on; the panel's table is laid out again before
    it is printed: an option's names (its --no-X name on the line below) in columns that are
    never wrapped nor cut, its type in at most a third of the width they leave, and its help, with
    the default, in the rest, wrapped and, for a word longer than the column, folded, not cut."""

    def __init__(self, console: Any):
        self._console = console

    def __getattr__(self, name: str) -> Any:
        return getattr(self._console, name)

    def print(self, panel: Any, *args: Any, **kwargs: Any) -> None:
        from rich.table import Table

        table = getattr(panel, "renderable", None)
        if isinstance(table, Table) and len(table.columns) in (6, 7):  # typer 0.2x's layout
            panel.renderable = _names_whole(table, self._console)
        self._console.print(panel, *args, **kwargs)


def _names_whole(table: Any, console: Any) -> Any:
    """Typer's options table (required, names, short names, --no-X names, their short names,
    type, help), laid out as `_OptionsConsole` says."""
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    *required, names, short, no_names, no_short, types, helps = [list(c.cells) for c in table.columns]

    def stacked(a: Any, b: Any) -> Any:
        return Text.assemble(a, "\n", b) if isinstance(a, Text) and isinstance(b, Text) and b.plain else a

    rows = [[*(c[i] for c in required), stacked(names[i], no_names[i]), stacked(short[i], no_short[i]),
             types[i], helps[i]] for i in range(len(names))]
    if not rows:
        return table
    fixed = len(rows[0]) - 2
    widest = [max((Measurement.get(console, console.options, row[c]).maximum for row in rows), default=0)
              for c in range(fixed)]
    room = console.width - 4 - sum(w + 2 for w in widest)  # the panel's borders and padding, each column's padding
    out = Table(highlight=True, show_header=False, expand=True, box=table.box, show_lines=table.show_lines,
                leading=table.leading, border_style=table.border_style, row_styles=table.row_styles,
                pad_edge=table.pad_edge, padding=table.padding)
    for _ in range(fixed):
        out.add_column(no_wrap=True)
    out.add_column(overflow="fold", max_width=max(10, room // 3))
    out.add_column(overflow="fold")
    for row in rows:
        for item in getattr(row[-1], "renderables", ()):  # help text, [default: ...], [required]
            if isinstance(item, Text):
                item.overflow = "fold"
        out.add_row(*row)
    return out


# ---------------------------------------------------------------------------------------------
# Parameter values without pydantic

_TYPERS = object()  # "not a plain value: let typer convert it"
_INT = re.compile(r"0|-?[1-9][0-9]{0,17}")
_FLOAT = re.compile(r"(?:0|-?[1-9][0-9]{0,14})(?:\.[0-9]{1,15})?|-0\.[0-9]{0,14}[1-9]")


def _fast(params: list[Any]) -> list[Any]:
    for param in params:
        if getattr(param, "_runtime_param", _TYPERS) is None:  # typer builds it on first use
            descriptor = getattr(param, "type_descriptor", None)
            convert = _converter(descriptor) if descriptor is not None and RuntimeParam is not None else None
            if convert is not None:
                try:
                    param._runtime_param = _PlainValue(descriptor.parameter_info, descriptor.annotation,
                                                       descriptor=descriptor, convert=convert)
                except TypeError:  # another typer's RuntimeParam: leave the conversion to it
                    return params
    return params


def _converter(descriptor: Any) -> Callable[[Any, Any, Any], Any] | None:
    """How to convert a value of this parameter's type, or None for typer to do it all."""
    info, a = descriptor.parameter_info, descriptor.annotation
    if (descriptor.file_annotation is not None or info.parser is not None
            or getattr(info, "click_type", None) is not None
            or info.min is not None or info.max is not None or info.clamp):
        return None
    if a is str:
        return lambda v, param, ctx: v if type(v) is str else _TYPERS
    if a is int:
        return _to_int
    if a is float:
        return _to_float
    if a is bool:  # typer passes a bool through untouched; only None (an unset flag) reaches here
        return lambda v, param, ctx: _TYPERS
    if isinstance(a, type) and issubclass(a, enum.Enum) and info.case_sensitive:
        by_value = {m.value: m for m in a if type(m.value) is str}

        def to_member(v: Any, param: Any, ctx: Any) -> Any:
            if isinstance(v, a):
                return v
            if type(v) is str and (ctx is None or ctx.token_normalize_func is None):
                return by_value.get(v, _TYPERS)
            return _TYPERS
        return to_member
    if a is Path and info.path_type is None:
        def to_path(v: Any, param: Any, ctx: Any) -> Any:
            if type(v) is not str or not v:
                return _TYPERS
            # typer's own checks (exists, readable, ...), given the Path pydantic would make
            return coerce_cli_path(Path(v), info, path_type=Path, param=param, ctx=ctx)
        return to_path
    if get_origin(a) is list and get_args(a) == (str,):
        return lambda v, param, ctx: (list(v) if type(v) in (tuple, list) and all(type(x) is str for x in v)
                                      else _TYPERS)
    if get_origin(a) is list and get_args(a) == (Path,) and info.path_type is None:
        def to_paths(v: Any, param: Any, ctx: Any) -> Any:  # search's --vector and --image
            if type(v) not in (tuple, list) or not all(type(x) is str and x for x in v):
                return _TYPERS
            return [coerce_cli_path(Path(x), info, path_type=Path, param=param, ctx=ctx) for x in v]
        return to_paths
    return None


def _to_int(v: Any, param: Any, ctx: Any) -> Any:
    if type(v) is int:
        return v
    return int(v) if type(v) is str and _INT.fullmatch(v) else _TYPERS


def _to_float(v: Any, param: Any, ctx: Any) -> Any:
    if type(v) is float:
        return v
    if type(v) is int:  # an int default: pydantic's lax mode makes it a float
        return float(v)
    return float(v) if type(v) is str and _FLOAT.fullmatch(v) else _TYPERS


if RuntimeParam is not None:
    @dataclass(frozen=True)
    class _PlainValue(RuntimeParam):  # type: ignore[misc,valid-type]
        """Converts a plain value itself; hands any other to the runtime param typer would have
        built (pydantic's, imported then)."""

        descriptor: Any = None
        convert: Callable[[Any, Any, Any], Any] = lambda v, param, ctx: _TYPERS
        _typers: list[Any] = field(default_factory=list)

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            out = self.convert(value, param, ctx)
            if out is not _TYPERS:
                return out
            if not self._typers:
                self._typers.append(build_runtime_param(self.descriptor))
            return self._typers[0]._coerce_value(value, param=param, ctx=ctx)
