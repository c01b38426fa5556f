"""The runs of an SAE (one precompute over one corpus each) as the SAE and feature pages list them, and which
one a URL's `?run=` picks.

    sae, run = chosen_run(catalog, "gemma-2-2b", "20-res-16k", "3f2a")   # run: "3f2a9c..." (full id) or None
    run_choices(catalog, sae)                                             # newest first, with the shown one marked
"""

from __future__ import annotations

from featurescope.app.catalog import Catalog, SAEInfo
from featurescope.app.twin_models import RunOut


def chosen_run(catalog: Catalog, model_id: str, sae_id: str, run: str | None) -> tuple[SAEInfo, str | None]:
    """The SAE in the run a URL asks for, and the full run id its page's links keep (None: no run asked
    for, the newest run shown). A run id prefix resolves to the whole id, so links never depend on a prefix
    staying unambiguous as runs are published."""
    sae = catalog.sae(model_id, sae_id, run)
    return sae, (sae.run_id if run else None)


def run_choices(catalog: Catalog, sae: SAEInfo) -> list[RunOut]:
    runs = catalog.runs_of(sae)
    return [{"run_id": r.run_id, "corpus": r.corpus, "n_tokens": r.n_tokens, "n_contexts": r.n_contexts,
             "newest": i == 0, "shown": r.run_id == sae.run_id} for i, r in enumerate(runs)]
