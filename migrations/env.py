"""Alembic environment for FeatureScope's DuckDB files. target_metadata is the one schema in
featurescope/schema.py. Run through `featurescope db upgrade PATH` (see featurescope/db.py)."""

from alembic import context
from sqlalchemy import engine_from_config, pool

import featurescope.db  # noqa: F401  registers Alembic's DuckDB dialect
from featurescope.schema import metadata


config = context.config
target_metadata = metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
