"""The typed shape of every page's data: what each view function returns, what its `.json` twin answers,
and what /-/openapi.json documents (each twin route declares its shape as `response_model`).

They are TypedDicts: at run time a view is a plain dict, so templates, the feature page's per-file cache
and orjson handle it as before (a feature page is rendered in a few ms and validating its ~45 examples on
every request would cost about as much), while pydantic reads these classes for the OpenAPI document and
tests validate the twins' answers against them (tests/test_openapi.py). `extra="forbid"` makes the
document list every key a twin may answer, so a key added to a view and not here fails those tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_type_hints

from pydantic import ConfigDict, with_config
from typing_extensions import NotRequired, TypedDict

from featurescope.app.catalog import SAEInfo

closed = with_config(ConfigDict(extra="forbid"))


# ------------------------------------------------------------------------------------------ catalog
# An SAE as the catalog holds it (app/catalog.py: SAEInfo), less its file handle and its number in the file.
SAEOut = closed(TypedDict("SAEOut", {name: hint for name, hint in get_type_hints(SAEInfo).items()
                                     if name not in SAEInfo.PRIVATE}))


@closed
class GridRow(TypedDict):
    layer: int
    cells: list[list[SAEOut]]  # one per kind of SAEGrid.kinds: that layer's SAEs at that site


@closed
class SAEGrid(TypedDict):
    kinds: list[str]  # site kinds present, in forward-pass order (att, mlp, res)
    rows: list[GridRow]  # by layer
    n_saes: int


@closed
class ModelOut(TypedDict):
    id: str
    source: str
    n_layers: int
    d_model: int
    vocab_size: int
    saes: list[SAEOut]
    grid: SAEGrid


@closed
class FileProblemOut(TypedDict):
    name: str
    error: str
    saes: list[tuple[str, str]]  # (model id, SAE id) the file holds, when that much could be read
    runs: list[str]  # the run ids of those SAEs


@closed
class HomeView(TypedDict):
    models: list[ModelOut]
    databases: int
    problems: list[FileProblemOut]


@closed
class ModelFilters(TypedDict):
    layer: int | None
    site: str | None
    width: str | None


@closed
class ModelChoices(TypedDict):
    layers: list[int]
    sites: list[str]
    widths: list[str]


@closed
class DetectorBrief(TypedDict):
    name: str
    created: str
    n_features: int
    pool: str
    held_out_auroc: float
    labels: list[str]
    url: str


@closed
class ModelView(TypedDict):
    model: ModelOut
    shown: SAEGrid  # the SAEs the filters leave
    filters: ModelFilters
    choices: ModelChoices
    detectors: list[DetectorBrief]  # saved from contrast runs (app/detectors.py)


# ---------------------------------------------------------------------------------------- SAE page
@closed
class TokenCount(TypedDict):
    token_id: int
    text: str
    count: int


@closed
class ExplanationScore(TypedDict):
    scorer: str  # the scorer model
    kind: Literal["detection", "fuzz"]
    score: float | None  # balanced accuracy over n_pos held-out activating and n_neg non-activating windows
    n_pos: int
    n_neg: int


@closed
class ExplanationOut(TypedDict):
    """An LLM's explanation of a feature (featurescope explain), from the run's side file."""
    text: str
    explainer: str  # the explainer model
    method: str
    prompt_version: str
    created_at: str
    scores: list[ExplanationScore]
    mean_score: float | None


@closed
class FeatureRow(TypedDict):
    index: int
    label: str
    label_kind: str
    explanation: str | None  # the best explanation, when the feature has one
    density: float | None
    max_act: float | None
    dead: bool
    top_tokens: list[TokenCount]


@closed
class FeatureQueryOut(TypedDict):
    sort: Literal["index", "label", "density", "max_act"]
    desc: bool
    page: int
    size: int
    show: Literal["all", "alive", "dead", "dense"]
    min_density: float | None
    max_density: float | None
    q: str
    token: str


@closed
class DensityHistogram(TypedDict):
    log10_lo: float
    bin_width_log10: float
    counts: list[int]
    dead: int


@closed
class RunOut(TypedDict):
    """One run (precompute over one corpus, one file) of an SAE."""
    run_id: str
    corpus: str | None
    n_tokens: int | None
    n_contexts: int | None
    newest: bool  # the default: what the page's URL without ?run= shows
    shown: bool  # the run this page shows


@closed
class SAEView(TypedDict):
    sae: SAEOut
    run: str | None  # the run id the URL asked for (?run=, kept by every link of the page); None: the newest
    runs: list[RunOut]  # every run of this SAE, newest first
    query: FeatureQueryOut
    total: int
    page: int
    pages: int
    features: list[FeatureRow]
    matched_token_ids: list[int] | None
    density_histogram: DensityHistogram


# ------------------------------------------------------------------------------------ feature page
@closed
class Example(TypedDict):
    context_id: int
    max_act: float | None
    max_pos: int
    token_ids: list[int]
    tokens: Sequence[str]  # texts of token_ids
    positions: list[int]  # where the feature fires, with its activation there
    acts: list[float | None]
    warmup: int  # positions 1 to warmup did not count: the context starts mid-document (featurescope/positions.py)


@closed
class Interval(TypedDict):
    bin: int
    lo: float | None
    hi: float | None
    share: float | None
    examples: list[Example]


@closed
class Histogram(TypedDict):
    bin_width: float | None
    counts: list[int]


@closed
class LogitHistogram(TypedDict):
    lo: float | None
    hi: float | None
    counts: list[int]


@closed
class LogitToken(TypedDict):
    token_id: int
    text: str
    value: float | None


@closed
class Logits(TypedDict):
    promoted: list[LogitToken]
    suppressed: list[LogitToken]
    histogram: LogitHistogram


@closed
class Neighbour(TypedDict):
    index: int
    cosine: float | None
    label: str
    label_kind: str | None
    density: float | None


@closed
class Link(TypedDict):
    sae_id: str
    layer: int
    site: str
    feature: int
    label: str
    label_kind: str | None
    density: float | None
    coact: float | None  # the linked feature's mean activation where this one peaks
    coact_rel: float | None  # that above its mean over all tokens, over its max: what ranks links
    cosine: float | None  # decoder/encoder cosine, between residual SAEs only
    run: str | None  # the ?run= of the linked feature's page (links stay in their run); None: its newest run


@closed
class FeatureLinks(TypedDict):
    computed: bool  # False: the run was precomputed with --no-links
    upstream: list[Link]
    alongside: list[Link]
    downstream: list[Link]


@closed
class TestBox(TypedDict):
    text: str
    live_encoding: bool


@closed
class FeatureView(TypedDict):
    model_id: str
    sae: SAEOut
    run: str | None  # the run id the URL asked for (?run=, kept by every link of the page); None: the newest
    runs: list[RunOut]  # every run of this SAE, newest first
    index: int
    label: str
    label_kind: str
    explanations: list[ExplanationOut]  # best (highest mean score) first; the page's headline is the first
    n_firing: int | None
    density: float | None
    max_act: float | None
    mean_act: float | None
    activation_histogram: Histogram
    logits: Logits
    top_examples: list[Example]
    intervals: list[Interval]
    neighbours: list[Neighbour]
    links: FeatureLinks
    prev: int | None
    next: int | None
    test: TestBox


# ---------------------------------------------------------------------------------- explanation search
@closed
class ExplanationHit(TypedDict):
    sae_id: str
    feature: int
    run: str | None  # the run id its links name (None: the SAE's newest run)
    text: str
    explainer: str
    method: str
    rank: float  # sum over the query's words of the best matching term's idf (a prefix match counts half)
    matched: int  # query words matched
    mean_score: float | None
    url: str


@closed
class ExplanationSearchView(TypedDict):
    model_id: str
    q: str
    results: list[ExplanationHit]
    limit: int
    explained_saes: int  # SAEs of the model with at least one explanation file


# ----------------------------------------------------------------------------------------- lineage
@closed
class LineageQueryOut(TypedDict):
    depth: int | None
    breadth: int
    by: Literal["coact", "cosine"]


@closed
class LineageColumn(TypedDict):
    column: int
    sae_ids: list[str]


@closed
class LineageNode(TypedDict):
    id: str
    sae_id: str
    run: str | None  # the ?run= of its feature page (the graph stays in one run); None: its SAE's newest run
    feature: int
    column: int
    layer: int
    site: str
    label: str
    label_kind: str | None
    density: float | None
    top_tokens: list[TokenCount]
    start: bool
    score: float | None


LineageEdge = closed(TypedDict("LineageEdge", {"from": str, "to": str, "via": Literal["up", "down"],
                                               "coact": float | None, "coact_rel": float | None, "cosine": float | None}))


@closed
class LineageView(TypedDict):
    model_id: str
    sae: SAEOut
    run: str | None  # the run id the URL asked for (?run=, kept by every link of the page); None: the newest
    index: int
    query: LineageQueryOut
    links_computed: bool
    columns: list[LineageColumn]
    nodes: list[LineageNode]
    edges: list[LineageEdge]


# -------------------------------------------------------------------------------------- live pages
@closed
class LiveFeature(TypedDict):
    sae_id: str
    layer: int
    index: int
    activation: float
    relative: float | None  # activation / max_act
    max_act: float  # its largest activation in the corpus
    density: float
    label: str
    label_kind: str | None
    explanation: NotRequired[str]  # its best explanation (featurescope explain), when it has one
    pos: NotRequired[int]  # the token where it fires most (search and prompt lists)
    token: NotRequired[str]  # that token's text (prompt lists)
    strength: NotRequired[float]  # steering


@closed
class PromptToken(TypedDict):
    pos: int
    token_id: int
    text: str
    special: bool
    warmup: bool  # a warm-up position of a prompt that continues a document: encoded, not counted


@closed
class EncodedSAE(TypedDict):
    id: str
    site: str
    layer: int
    d_sae: int


@closed
class LayerRow(TypedDict):
    sae_id: str
    layer: int
    site: str
    counted: list[bool]
    l0: list[int]
    total: list[float]
    shade: list[float]  # each cell's value (of the `metric` shown) relative to the row's largest


@closed
class TokenFeatures(TypedDict):
    sae_id: str
    layer: int
    site: str
    counted: bool
    l0: int
    features: list[LiveFeature]


@closed
class PromptFeatures(TypedDict):
    sae_id: str
    layer: int
    site: str
    features: list[LiveFeature]


@closed
class SearchResults(TypedDict):
    scope: Literal["text", "token"]
    sort: Literal["activation", "relative", "density", "layer"]
    max_density: float | None
    token: int
    total: int
    results: list[LiveFeature]


@closed
class LiveLink(Link):
    live_max: float | None  # its largest activation on the prompt's counted tokens (None: SAE not encoded)
    live_at_token: float | None  # at the selected token


@closed
class LiveLinks(TypedDict):
    upstream: list[LiveLink]
    alongside: list[LiveLink]
    downstream: list[LiveLink]


@closed
class Highlight(LiveFeature):
    acts: list[float]
    counted: list[bool]
    links: LiveLinks


@closed
class EncodeQueryOut(TypedDict):
    text: str
    ids: str
    saes: list[str]
    token: int | None
    top: int
    metric: Literal["count", "strength"]
    include_special: bool
    feature: str
    scope: Literal["text", "token"]
    sort: Literal["activation", "relative", "density", "layer"]
    max_density: float | None


@closed
class EncodeTiming(TypedDict):
    queue_ms: float
    model_ms: float
    batch_size: int


@closed
class EncodeLimits(TypedDict):
    max_prompt_tokens: int


@closed
class EncodeView(TypedDict):
    model_id: str
    text: str
    ids: list[int] | None
    tokens: list[PromptToken]
    selected_token: int
    saes: list[EncodedSAE]
    layers: list[LayerRow]
    token_features: list[TokenFeatures]
    prompt_features: list[PromptFeatures]
    search: SearchResults
    highlight: Highlight | None
    query: EncodeQueryOut
    timing: EncodeTiming
    limits: EncodeLimits


@closed
class TestToken(TypedDict):
    pos: int
    token_id: int
    text: str
    activation: float
    counted: bool


@closed
class FeatureTestView(TypedDict):
    model_id: str
    sae_id: str
    index: int
    text: str
    max_act: float
    activation: float
    relative: float | None
    tokens: list[TestToken]
    timing: EncodeTiming


@closed
class GeneratedToken(TypedDict):
    token_id: int
    text: str
    logprob: float
    probability: float  # exp(logprob)


@closed
class Continuation(TypedDict):
    text: str
    tokens: list[GeneratedToken]
    mean_logprob: float


@closed
class SteerTiming(TypedDict):
    model_ms: float


@closed
class SteerLimits(TypedDict):
    max_new_tokens: int
    strength_limit: float
    max_features: int


@closed
class SteerView(TypedDict):
    model_id: str
    text: str
    n_tokens: int
    temperature: float
    seed: int
    features: list[LiveFeature]
    prompt_tokens: list[str]
    default: Continuation | None
    steered: Continuation | None
    timing: SteerTiming | None
    limits: SteerLimits


# ------------------------------------------------------------------------------------- app and errors
@closed
class HealthProblem(TypedDict):
    database: str
    error: str


@closed
class Health(TypedDict):
    status: Literal["ok", "starting"]
    pid: int
    workers: int
    workers_ready: int
    databases: int
    models: int
    saes: int
    problems: list[HealthProblem]


@closed
class Suggestion(TypedDict):
    id: str | int
    url: str


@closed
class NotFoundError(TypedDict):
    error: Literal["not_found", "http_error"]
    message: str
    suggestions: list[Suggestion]
    kind: NotRequired[Literal["model", "sae", "feature", "run", "contrast_run", "detector"]]
    missing: NotRequired[str]
    valid_range: NotRequired[tuple[int, int]]


@closed
class InvalidParameterError(TypedDict):
    error: Literal["invalid_parameter"]
    message: str
    problems: list[str]
    retry_url: str
    suggestions: list[Suggestion]


@closed
class UnavailableError(TypedDict):
    error: Literal["busy", "live_unavailable"]
    message: str
    suggestions: list[Suggestion]
    retry_after: NotRequired[int]


# -------------------------------------------------------------------------------- contrast and detectors
@closed
class ContrastSAE(TypedDict):
    id: str
    site: str
    layer: int
    d_sae: int


@closed
class ContrastLimits(TypedDict):
    max_prompts: int
    max_upload_bytes: int
    max_prompt_tokens: int


@closed
class ContrastFormView(TypedDict):
    model_id: str
    live: bool
    saes: list[ContrastSAE]
    pools: list[str]
    limits: ContrastLimits
    detectors: list[DetectorBrief]


@closed
class ContrastRow(TypedDict):
    sae_id: str
    layer: int
    index: int
    label: str
    density: float
    auroc: float  # P(A > B) + P(A = B) / 2 of the pooled activation
    separation: float  # max(auroc, 1 - auroc)
    direction: Literal["a", "b"]  # the set it fires more on
    diff: float  # mean over A - mean over B
    mean_a: float
    mean_b: float
    fired_a: int  # prompts of A it fired on
    fired_b: int
    n_a: int
    n_b: int
    url: str
    strip_a: list[float]  # its pooled activation on each prompt of A, in order
    strip_b: list[float]


@closed
class ContrastSAERows(TypedDict):
    sae_id: str
    layer: int
    site: str
    rows: list[ContrastRow]


@closed
class ContrastRunUrls(TypedDict):
    run: str
    cancel: str
    detector: str


@closed
class ContrastRunView(TypedDict):
    model_id: str
    run_id: str
    state: Literal["running", "done", "failed", "cancelled"]
    done: int
    total: int
    error: str | None
    seconds: float | None
    pool: str
    labels: list[str]
    sizes: list[int]
    saes: list[str]
    top: int
    across: list[ContrastRow]
    per_sae: list[ContrastSAERows]
    urls: ContrastRunUrls


@closed
class DetectorFeatureDoc(TypedDict):
    sae_id: str
    index: int
    threshold: float
    weight: float
    auroc: float


@closed
class DetectorSet(TypedDict):
    label: str
    size: int
    train: int
    held_out: int


@closed
class DetectorDoc(TypedDict):
    version: int
    name: str
    model_id: str
    sae_ids: list[str]
    pool: str
    features: list[DetectorFeatureDoc]
    sets: dict[str, DetectorSet]
    held_out: dict[str, list[int]]
    held_out_auroc: float
    train_auroc: float
    created: str


@closed
class DetectorFeatureRow(TypedDict):
    sae_id: str
    layer: int
    index: int
    threshold: float
    weight: float
    auroc: float
    label: str
    url: str


@closed
class DetectorToken(TypedDict):
    pos: int
    token_id: int
    text: str
    counted: bool
    score: float
    fired: list[str]  # SAE:INDEX of the features above their threshold at this token


@closed
class DetectorFired(TypedDict):
    sae_id: str
    index: int
    pooled: float
    threshold: float
    weight: float
    fired: bool


@closed
class DetectorApplied(TypedDict):
    text: str
    score: float
    max_score: float  # the sum of the positive weights
    predicted: str  # the label of set A when score > 0, else of set B
    features: list[DetectorFired]
    tokens: list[DetectorToken]


@closed
class DetectorView(TypedDict):
    detector: DetectorDoc
    features: list[DetectorFeatureRow]
    applied: DetectorApplied | None
    url: str


ERROR_RESPONSES = {404: {"model": NotFoundError, "description": "Unknown model, SAE or feature"},
                   422: {"model": InvalidParameterError, "description": "Invalid query parameter"}}
LIVE_ERROR_RESPONSES = {**ERROR_RESPONSES, 503: {"model": UnavailableError,
                                                 "description": "Live encoding is off, loading failed, or busy"}}
