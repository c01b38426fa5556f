"""DuckDB files: create/upgrade them with Alembic, open them for writing or read-only.

    featurescope db upgrade data/db/run.duckdb      # what the precompute job does before writing
    engine = open_readonly("data/db/run.duckdb")    # what the server does
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic.ddl.impl import DefaultImpl

from featurescope.assets import asset_dir



class DuckDBImpl(DefaultImpl):
    """Alembic has no built-in DuckDB dialect; defining this subclass registers one (DuckDB speaks
    enough PostgreSQL-style DDL for the default implementation)."""
    __dialect__ = "duckdb"
    transactional_ddl = True


def engine_for(path: str | Path, read_only: bool = False) -> sa.Engine:
    args = {"read_only": True} if read_only else {}
    return sa.create_engine(f"duckdb:///{Path(path)}", connect_args=args, poolclass=sa.pool.NullPool if not read_only else None)


def alembic_config(path: str | Path):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(asset_dir("migrations")))
    cfg.set_main_option("sqlalchemy.url", f"duckdb:///{Path(path)}")
    return cfg


def upgrade(path: str | Path, revision: str = "head") -> str:
    """Apply migrations up to `revision`; creates the file if needed. Returns the resulting revision."""
    from alembic import command

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = engine_for(path)
    cfg = alembic_config(path)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)
    engine.dispose()
    return current_revision(path)


def current_revision(path: str | Path) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = engine_for(path)
    with engine.connect() as connection:
        revision = MigrationContext.configure(connection).get_current_revision()
    engine.dispose()
    return revision


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(":memory:")).get_current_head()
