"""FeatureScope's web explorer: FastAPI + Jinja2 + htmx over the published DuckDB files.

    from featurescope.app import Settings, create_app
    app = create_app(Settings(data_dir="data"))

Layout: settings.py (the one config object), databases.py (published files, read-only, reopened on
publication), data.py (every query; one data function per view), present.py and charts.py (tokens and
SVG histograms for HTML), graph.py (the lineage graph's layout), live.py (the live service: jobs, admission
control) and live_encoder.py (its worker: models and SAEs loaded once, requests micro-batched; the only
module that imports torch, only when live encoding is on), steering.py, live_views.py (its pages' data),
render.py (pages, JSON twins, htmx fragments), urls.py (every URL), deps.py, routes/ (one router per
resource); the Jinja2 templates and CSS/JS live in the top-level templates/ and static/.
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
