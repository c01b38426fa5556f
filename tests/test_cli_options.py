"""The command line generated from the config dataclasses (featurescope/cli_options.py): one option per
field, with the field's default and help, and the command gets the config's values back."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import typer
from typer.testing import CliRunner

from featurescope.app.settings import Settings
from featurescope.cli import app
from featurescope.cli_options import options_from, setting
from featurescope.precompute.config import PrecomputeConfig
from featurescope.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    source: str = setting("here", "Where from.", flags=("--from",))


@dataclasses.dataclass
class Toy:
    sites: tuple[str, ...] = setting(("a",), "Sites.", flags=("--site",))
    inner: Inner = setting(default_factory=Inner)
    pair: tuple[int, int] | None = setting(None, "I/N.")
    limit: int | None = setting(3, "A limit.", cli_default=None, min=1)
    quiet: bool = setting(False, cli=False)


def _toy_app(seen: list) -> typer.Typer:
    toy = typer.Typer()

    @toy.command()
    @options_from(Toy, parsers={"pair": lambda text: tuple(int(p) for p in text.split("/"))})
    def run(name: str = "x", **config) -> None:
        seen.append((name, Toy(**config)))

    return toy


def test_a_command_gets_its_configs_values_from_the_generated_options():
    seen = []
    result = CliRunner().invoke(_toy_app(seen), ["--site", "b", "--site", "c", "--from", "there", "--pair", "1/4",
                                                 "--name", "y"])
    assert result.exit_code == 0, result.output
    assert seen == [("y", Toy(sites=["b", "c"], inner=Inner("there"), pair=(1, 4), limit=None))]
    seen.clear()
    assert CliRunner().invoke(_toy_app(seen), []).exit_code == 0
    assert seen == [("x", Toy(sites=["a"], limit=None))]  # the field's defaults, or its cli_default
    assert CliRunner().invoke(_toy_app(seen), ["--limit", "0"]).exit_code == 2  # typer settings (min=1) apply
    assert CliRunner().invoke(_toy_app(seen), ["--quiet"]).exit_code == 2  # cli=False: no option


def _options(command: str) -> dict[str, object]:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}


def _fields(cls) -> list[dataclasses.Field]:
    out = []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out += _fields(f.default_factory)
        elif f.metadata.get("cli", True):
            out.append(f)
    return out


def _field_default(f: dataclasses.Field):
    if "cli_default" in f.metadata:
        return f.metadata["cli_default"]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return list(default) if isinstance(default, tuple) else default


def test_every_config_field_is_an_option_of_its_command_with_the_fields_help_and_default():
    for command, cls in (("train", TrainConfig), ("precompute", PrecomputeConfig), ("serve", Settings)):
        options = _options(command)
        for f in _fields(cls):
            option = options[f.name]
            assert option.help and option.help == f.metadata["help"], (command, f.name)
            assert option.required or option.default == _field_default(f), (command, f.name)
    assert _options("precompute")["max_tokens"].opts == ["--tokens"] and _options("train")["d_sae"].opts == ["--width"]
    assert _options("serve")["workers"].default is None and _options("serve")["load_models"].default == "startup"


def test_db_commands_do_not_import_torch():
    """Every command's options are built for any --help, so the configs they come from must not need torch."""
    for command in ("current", "upgrade"):
        code = ("import sys\nfrom featurescope.cli import app\n"
                f"try:\n    app(['db', '{command}', '--help'])\nexcept SystemExit:\n    pass\n"
                "print('torch loaded:', 'torch' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "Usage" in done.stdout and "torch loaded: False" in done.stdout


class _Stop(Exception):
    pass


def test_precompute_and_train_options_build_the_configs_the_api_builds(monkeypatch, tmp_path):
    import featurescope.models
    import featurescope.precompute.job
    import featurescope.training
    from featurescope.precompute.corpus_sources import CorpusSpec

    built = []
    monkeypatch.setattr(featurescope.precompute.job, "run_precompute", lambda cfg, log: built.append(cfg))
    result = CliRunner().invoke(app, ["precompute", "--sae", "a", "--sae", "b", "--tokens", "500", "--corpus", "c.txt",
                                      "--split", "test", "--shard", "1/3", "--no-links", "--force"])
    assert result.exit_code == 0, result.output
    expected = PrecomputeConfig(saes=["a", "b"], max_tokens=500, corpus=CorpusSpec("c.txt", split="test"), shard=(1, 3),
                                links=False, force=True)
    assert built == [expected] and built[0].run_id() == expected.run_id()

    def capture(lm, cfg, texts=None):
        built.append(cfg)
        raise _Stop

    monkeypatch.setattr(featurescope.models, "load_model", lambda *a, **k: None)
    monkeypatch.setattr(featurescope.training, "default_contexts", capture)
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path), "-s", "6-res", "--site", "blocks.12.hook_resid_post",
                                      "--width", "64", "--max-norm-ratio", "0", "--target-l0", "40"])
    assert isinstance(result.exception, _Stop), result.output
    assert built[-1] == TrainConfig(sites=("6-res", "12-res"), d_sae=64, max_norm_ratio=None, target_l0=40)


def test_precompute_takes_an_sae_list_instead_of_sae_flags_and_a_memory_budget_in_bytes(monkeypatch):
    import featurescope.precompute.job

    built = []
    monkeypatch.setattr(featurescope.precompute.job, "run_precompute", lambda cfg, log: built.append(cfg))
    result = CliRunner().invoke(app, ["precompute", "--sae-list", "saes.txt", "--memory-budget", "1.5GB"])
    assert result.exit_code == 0, result.output
    assert built == [PrecomputeConfig(saes=[], sae_list="saes.txt", memory_budget=3 << 29)]
    # neither changes the run id: the expanded SAEs do, and results do not depend on the grouping
    assert built[0].run_id() == PrecomputeConfig(saes=[]).run_id()
    result = CliRunner().invoke(app, ["precompute", "--sae", "a", "--memory-budget", "lots"])
    assert result.exit_code == 2 and "'lots' is not a memory" in result.output


def test_serve_takes_an_sae_memory_budget_in_bytes(monkeypatch, tmp_path):
    import featurescope.cli

    served = []
    monkeypatch.setattr(featurescope.cli, "_serve", lambda settings, preloaded=None: served.append(settings))
    result = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path), "--sae-memory-budget", "4GB"])
    assert result.exit_code == 0, result.output
    assert served[0].sae_memory_budget == 4 << 30
    result = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0 and served[1].sae_memory_budget is None  # a share of the device's free memory
    result = CliRunner().invoke(app, ["serve", "--sae-memory-budget", "lots"])
    assert result.exit_code == 2 and "'lots' is not a memory" in result.output
