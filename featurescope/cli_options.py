"""Command-line options generated from config dataclasses: a field's name, default and help are written
once, in the dataclass (SAELens generates its runner's CLI from its config the same way).

    @dataclass
    class PrecomputeConfig:
        top_k: int = setting(20, "Top examples kept per feature.")
        max_tokens: int = setting(200_000, "Corpus tokens to read.", flags=("--tokens",))

    @app.command()
    @options_from(PrecomputeConfig)
    def precompute(**config) -> None:         # the command's own parameters may come first
        run_precompute(PrecomputeConfig(**config))

A field whose type is itself a dataclass contributes its fields' options, and arrives rebuilt. Nothing here
imports torch: `featurescope db current --help` builds every command's options.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any

_NO_CLI_DEFAULT = object()


def setting(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
            flags: tuple[str, ...] = (), cli: bool = True, required: bool = False, cli_default: Any = _NO_CLI_DEFAULT,
            metadata: dict | None = None, **option: Any) -> Any:
    """A dataclass field with what its command-line option needs.

    help: the option's help text. flags: its names, when not --field-name. cli=False: no option.
    required: the option has no default. cli_default: the option's default, when it differs from the
    field's (e.g. None for "decided by another option"). `option`: more typer.Option settings (min=1).
    `metadata`: merged into the field's metadata."""
    meta = {"help": help, "flags": flags, "cli": cli, "required": required, "option": option, **(metadata or {})}
    if cli_default is not _NO_CLI_DEFAULT:
        meta["cli_default"] = cli_default
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def options_from(cls: type, *, exclude: Iterable[str] = (), parsers: dict[str, Callable[[str], Any]] | None = None
                 ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command taking **config: typer sees one option per field of `cls` (after the command's
    own parameters), and the command gets each field's value by name, nested dataclasses rebuilt.
    `parsers`: per field, a function from the option's text to the field's value."""
    exclude, parsers = set(exclude), parsers or {}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p.replace(kind=p.KEYWORD_ONLY) for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.kind is not p.VAR_KEYWORD]
        generated = [_parameter(f, hint, parsers.get(f.name)) for f, hint in _cli_fields(cls, exclude)]

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            return command(**_nest(cls, values, exclude))

        params = own + generated
        del run.__wrapped__  # typer must read the signature below, not the command's
        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


def _cli_fields(cls: type, exclude: set[str]) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out += _cli_fields(hints[f.name], exclude)
        else:
            out.append((f, hints[f.name]))
    return out


def _nest(cls: type, values: dict[str, Any], exclude: set[str]) -> dict[str, Any]:
    """The command's keyword arguments: its own ones as given, and each nested dataclass built from its fields."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        nested = hints[f.name]
        if f.name not in exclude and f.metadata.get("cli", True) and dataclasses.is_dataclass(nested):
            inner = _nest(nested, values, exclude)
            names = {g.name for g in dataclasses.fields(nested)}
            values = {k: v for k, v in inner.items() if k not in names}
            values[f.name] = nested(**{k: v for k, v in inner.items() if k in names})
    return values


def _parameter(f: dataclasses.Field, hint: Any, parser: Callable[[str], Any] | None) -> inspect.Parameter:
    import typer  # only the command line needs it, not the modules that declare configs

    meta = f.metadata
    if parser is not None:
        hint = str | None if _default(f) is None else str
    info = typer.Option(*meta.get("flags", ()), help=meta.get("help") or None, parser=parser, **meta.get("option", {}))
    default = inspect.Parameter.empty if meta.get("required") else _default(f)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[_cli_type(hint), info])


def _default(f: dataclasses.Field) -> Any:
    if "cli_default" in f.metadata:
        return f.metadata["cli_default"]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _cli_type(hint: Any) -> Any:
    """tuple[X, ...] -> list[X] (a repeatable option), also inside `| None`; other types as they are."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [_cli_type(a) for a in typing.get_args(hint)]
        return functools.reduce(lambda a, b: a | b, args)
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
        return list[typing.get_args(hint)[0]]
    return hint
