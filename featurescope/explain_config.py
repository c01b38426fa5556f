"""What `featurescope explain` does: `ExplainConfig`, whose fields are also the command's options.
Apart from featurescope/explain.py, so `--help` builds without importing httpx or torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featurescope.cli_options import setting

PROMPT_VERSION = "v1"  # bump when the explainer's prompt changes: a re-run then explains every feature again
METHOD = "max-act+logits"  # top examples and interval samples with token highlights, plus promoted logits
LOCAL = "local"


@dataclass
class ExplainConfig:
    run: Path | None = setting(None, "Published run file (data/db/NAME.duckdb); default: the newest one holding --sae.")
    sae: str | None = setting(None, "SAE id in the run (default: the run's only SAE).")
    data_dir: Path = setting(Path("data"), "Data dir whose db/ holds the published runs (when --run is not given).")
    features: str | None = setting(None, "Features to explain: e.g. 0-49 or 3,7,10-12.")
    all_features: bool = setting(False, "Explain every feature of the SAE.", flags=("--all",))
    endpoint: str = setting(LOCAL, "OpenAI-compatible base URL (e.g. http://127.0.0.1:8080/v1), or 'local': start "
                            "`transformers serve` with the embedded SmolLM2-135M-Instruct for this run.")
    model: str | None = setting(None, "Explainer model name the endpoint serves (default for 'local': the embedded one).")
    api_key_env: str = setting("OPENAI_API_KEY", "Environment variable holding the endpoint's API key (sent as a "
                               "Bearer token when set).")
    concurrency: int = setting(8, "Chat completions in flight at once.", min=1)
    batch_size: int = setting(16, "Features per published batch (each batch replaces the explanations file "
                              "atomically).", min=1)
    max_tokens: int = setting(48, "Longest explanation, in tokens.", min=1)
    retries: int = setting(5, "Retries of a request that got 429, 5xx, a timeout or a broken connection "
                           "(exponential backoff, Retry-After honoured).", min=0)
    timeout: float = setting(120.0, "Seconds a request may take.", flags=("--timeout",), min=1.0)
    examples_shown: int = setting(8, "Top examples shown to the explainer (with the first sample of each "
                                  "activation interval; the other samples are held out for scoring).", min=1)
    window: int = setting(24, "Tokens of each example shown: around its maximum.", min=4)
    score: str = setting("detection,fuzz", "Scorers to run on each new explanation: detection, fuzz, both "
                         "(comma-separated) or none.")
    scorer_model: str | None = setting(None, "Scorer model name (default: the explainer model).")
    score_examples: int = setting(4, "Held-out activating examples per scorer (as many non-activating ones).", min=1)
    force: bool = setting(False, "Explain features again even when this explainer and prompt version already did.")
    seed: int = setting(0, "Seed of the non-activating contexts' choice.")
    progress: bool = setting(True, "Show a progress bar.", flags=("--progress/--no-progress",))

    @property
    def scorers(self) -> tuple[str, ...]:
        from featurescope.explanations import METHODS

        if self.score.strip().lower() in ("", "none"):
            return ()
        kinds = tuple(k.strip().lower() for k in self.score.split(",") if k.strip())
        unknown = [k for k in kinds if k not in METHODS]
        if unknown:
            raise ValueError(f"--score takes detection, fuzz or none, not {', '.join(unknown)}.")
        return kinds
