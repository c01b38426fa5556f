"""FeatureScope's web explorer: FastAPI + Jinja2 + htmx over the published DuckDB files.

    from featurescope.app import Settings, create_app
    app = create_app(Settings(data_dir="data"))

Layout (a request goes routes -> views -> catalog/stored -> databases):
    settings.py      the one config object
    databases.py     published files, read-only, reopened on publication; DataFile.cached, the one per-file cache
    catalog.py       every model and SAE of those files (Catalog, CatalogSource)
    stored.py        what pages read from a file besides a feature's row: vocab, contexts, labels, run config
    explanations.py  LLM explanations and scores from each run's side file (attached by databases.py), and search
    views/           one module per page's view (home, sae, feature, links, lineage, encode, feature_test, steer,
                     explanations)
    twin_models.py   the typed shape of every view, i.e. of every JSON twin (documented in /-/openapi.json)
    twins.py         the one `.json` mechanism: page(router, path, twin=...) registers a page and its twin
    moved.py         308s from the app pages' old addresses to their /-/ ones
    responses.py     Jinja pages, JSON twins, htmx fragments; filters.py (Jinja filters), token_html.py
                     (tokens as HTML, the one highlighting rule), charts.py and graph.py (SVG)
    live.py          the live service: jobs, admission control; live_encoder.py its worker (models and SAEs
                     loaded once, requests micro-batched; the only module importing torch, only when live
                     encoding is on); sae_cache.py (the SAEs it holds, LRU under --sae-memory-budget); steering.py
    urls.py (every URL), deps.py (shared dependencies), routes/ (one router per resource), security.py,
    serving.py (uvicorn workers); the Jinja2 templates and CSS/JS live in the top-level templates/ and static/.
"""

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):
    """Import on first use, so the command line reads Settings (its `serve` options) without the server."""
    if name == "create_app":
        from featurescope.app.main import create_app

        return create_app
    if name == "Settings":
        from featurescope.app.settings import Settings

        return Settings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
