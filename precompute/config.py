"""What a precompute run computes: `PrecomputeConfig`, whose fields are also `featurescope precompute`'s
options, and the run id made of every field that can change the result.

Apart from precompute/job.py (which needs torch), so the command line builds its options without it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from featurescope.cli_options import setting
from featurescope.precompute.corpus_sources import CorpusSpec

# Part of every run id: bump it when a code change alters what a run stores, so old runs are not reused.
RESULTS_VERSION = 7  # 3: cross-layer links; 4: one row per feature (schema 0004); 5: id of every result field;
# 6: bounded streaming state (128-sub-bin histograms, examples re-encoded); 7: warm-up positions of contexts
# that start mid-document do not count (featurescope/positions.py, schema 0005)
# Metadata of a field that cannot change what a run stores: it stays out of the run's id.
SAME_RESULT = {"result": False}
SAMPLES = ("first", "spread")
TOP_N = 5  # links of each kind per feature and neighbour SAE
NEIGHBOURS = 10  # nearest features by decoder cosine per feature
PEAK_WIDTH = 64  # strongest (feature, act) pairs of a neighbour kept at each top example's max position


@dataclass
class PrecomputeConfig:
    model: str = setting("smollm2-135m", "Hub id, local folder, .gguf file, or 'smollm2-135m' (embedded).",
                         flags=("--model", "-m"))
    saes: list[str] = setting(default_factory=list, help="SAE source (anything load_sae reads) or release pattern "
                              "(e.g. google/gemma-scope-2b-pt-res/layer_*/width_16k/canonical); repeat for several "
                              "SAEs.", flags=("--sae",))
    # Expanded into `saes` (featurescope/sae_sources.py) before the run id is taken: the SAEs count, not the file.
    sae_list: str | None = setting(None, "File of SAE sources or patterns, one per line ('#' comments), after the "
                                   "--sae ones.", metadata=SAME_RESULT)
    sae_ids: list[str] | None = setting(None, "URL id per SAE, in --sae order (default e.g. 6-res-2k).", flags=("--sae-id",))
    site: str | None = setting(None, "Site of bare params.npz SAEs, e.g. 15-res.")
    corpus: CorpusSpec = setting(default_factory=CorpusSpec)
    max_tokens: int = setting(200_000, "Corpus tokens to read (BOS not counted).", flags=("--tokens",))
    sample: str = setting("first", "'first': the corpus's first --tokens tokens; 'spread': --tokens worth of contexts "
                          "spread evenly over the whole corpus (what `train --corpus-tokens` trains on).")
    context_len: int = setting(128, "Tokens per context, BOS first.")
    batch_size: int = setting(16, "Contexts per forward pass.", metadata=SAME_RESULT)
    top_k: int = setting(20, "Top examples kept per feature.")
    n_intervals: int = setting(5, "Equal-width activation intervals from 0 to the max.")
    examples_per_interval: int = setting(5, "Examples sampled per interval.")
    links: bool = setting(True, "Cross-layer links between the SAEs of neighbouring layers/sites (precompute/links.py).")
    links_per_neighbour: int = setting(TOP_N, "Links kept per feature and neighbouring SAE, by co-activation and by "
                                       "weights each.", min=1)
    links_peak_width: int = setting(PEAK_WIDTH, "A neighbour's strongest features kept at each top example's peak "
                                    "token; memory at the end of the run: distinct peak positions x this x 8 bytes per SAE.", min=1)
    neighbours: int = setting(NEIGHBOURS, "Nearest features of the same SAE by decoder cosine kept per feature; 0 skips "
                              "them. Exact, so they cost d_sae^2 x d_in: seconds for 16k features, over an hour for a "
                              "1M-wide SAE on a CPU (bench/scale.py).", min=0)
    device: str = setting("auto", "auto, cpu, cuda or mps.", metadata=SAME_RESULT)
    memory_budget: int | None = setting(None, "Memory for the SAEs' state in one model pass, e.g. 8GB (default: half "
                                        "the device's free memory); SAEs that do not fit together run in several passes.",
                                        metadata=SAME_RESULT)
    dtype: str = setting("float32", "Model dtype: float32, bfloat16 or float16 (SAEs always run in float32).")
    data_dir: str = setting("data", "Where runs, checkpoints and published DuckDB files go.", metadata=SAME_RESULT)
    checkpoint_every: int = setting(200, "Batches between checkpoints (a killed run resumes from the last).",
                                    metadata=SAME_RESULT)
    force: bool = setting(False, "Recompute a run that is already published.", flags=("--force",), metadata=SAME_RESULT)
    shard: tuple[int, int] | None = setting(None, "I/N: process only slice I of N of the contexts (e.g. 0/4) and save "
                                            "its statistics.", metadata=SAME_RESULT)
    merge_shards: int = setting(0, "N: merge the N saved shards of this run and publish it.", metadata=SAME_RESULT)
    # `--ray` alone reads as `--ray local` (featurescope/cli.py: with_optional_values).
    ray: str | None = setting(None, "Run on Ray (precompute/distributed.py): no value starts a local Ray instance, "
                              "'auto' joins the running cluster (ray start), ray://HOST:PORT or HOST:PORT a remote one.",
                              metadata=SAME_RESULT)
    ray_workers: int | None = setting(None, "Ray workers, one model copy each (default: one per GPU of the cluster, "
                                      "else one per CPU).", metadata=SAME_RESULT, min=1)
    progress: bool = setting(True, cli=False, metadata=SAME_RESULT)

    def result_config(self) -> dict:
        """The fields that can change what the run stores (all but the SAME_RESULT ones), as JSON values."""
        values = asdict(self)
        return {f.name: values[f.name] for f in fields(self) if f.metadata.get("result", True)}

    def run_id(self) -> str:
        """Same inputs -> same id, so the same command finds its checkpoint and its published file."""
        keys = {"results_version": RESULTS_VERSION, **self.result_config()}
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
