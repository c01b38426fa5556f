"""The project keeps its promises about itself: the README's commands are the real ones, and the
layers import one way only (app/ and precompute/ both use the featurescope core, never each other)."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _readme_commands() -> list[str]:
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", README, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_gives_exactly_two_setup_commands_and_ci_runs_the_test_one():
    demo, test = _readme_commands()
    assert demo == "bash scripts/demo.sh" and test == "bash scripts/test.sh"
    ci_lines = [l.strip() for l in (ROOT / ".ci/run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert test in ci_lines


def test_every_cli_command_is_documented_in_the_readme():
    from featurescope.cli import app

    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert names, "no commands registered"
    for name in names:
        assert f"featurescope {name}" in README, f"`featurescope {name}` is not documented in README.md"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _imports_any(modules: set[str], forbidden: set[str]) -> set[str]:
    return {m for m in modules for f in forbidden if m == f or m.startswith(f + ".")}


@pytest.mark.parametrize("folder,forbidden", [
    ("featurescope", {"featurescope.app", "featurescope.precompute", "app", "precompute"}),
    ("app", {"featurescope.precompute", "app", "precompute"}),
    ("precompute", {"featurescope.app", "app", "precompute", "fastapi", "jinja2"}),
])
def test_imports_point_one_way(folder, forbidden):
    """One import package: the core never imports the server or the job, and those two never import each
    other; nothing imports the repository folders as top-level packages (`app`, `precompute`)."""
    files = list((ROOT / folder).rglob("*.py"))
    assert files, f"{folder}/ must exist"
    for path in files:
        if path == ROOT / "featurescope" / "cli.py":
            continue  # the command line is the composition root: it wires the job and the server together
        bad = _imports_any(_imported_modules(path), forbidden)
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_explorer_benchmark_runs_against_a_real_server():
    """bench/serve.py stays runnable (its figures are read, not asserted): a factory database, a real
    `featurescope serve` with two worker processes, every page answered."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--requests", "40", "--workers", "2"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("feature ")]
    assert len(lines) == 4 and all(line.endswith("errors 0") for line in lines), result.stdout


def test_scale_benchmark_runs_every_part_on_a_small_synthetic_release(tmp_path):
    """bench/scale.py stays runnable (its figures are read, not asserted): a 2-layer synthetic release in the
    Gemma Scope layout precomputed in a child process, the wide SAE published and served, the growth table."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "bench.scale", "--work", str(tmp_path), "--width", "256",
                             "--wide-width", "2048", "--layers", "0-1", "--tokens", "1024", "--growth", "1,6"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "1 model pass for 6 SAEs (1,536 features)" in out and "bare/stream" in out
    pages = [line for line in out.splitlines() if line.startswith("/model/12-res-2k")]
    assert [line.split()[1] for line in pages] == ["200"] * 9 + ["404"], out  # SAE page, sorts, searches, features
    assert len([line for line in out.splitlines() if line.split()[:1] in (["1"], ["6"]) and "GiB" not in line]) >= 2, out
