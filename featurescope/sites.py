"""Hook sites: where in the model an SAE reads, and one forward pass that captures many of them.

A site is (layer, kind) with kind one of:
    res  blocks.L.hook_resid_post   output of decoder layer L
    mlp  blocks.L.hook_mlp_out      MLP output after the post-MLP RMSNorm (Gemma 2), else the MLP output
    att  blocks.L.attn.hook_z       concatenated head outputs, i.e. the input of o_proj
Both spellings parse: "blocks.20.hook_resid_post" and "20-res".

    acts = capture_sites(lm, input_ids, [parse_site("3-res"), parse_site("5-mlp")])
    # the forward pass stops right after layer 5: later layers never run

`SiteActivations` holds one pass's activations over many contexts, so a second user of the same
contexts (the demo's precompute after its training) does not run the model again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from featurescope.models import LoadedModel
from featurescope.site_names import SITE_KINDS, Site, SiteError, parse_site  # noqa: F401 - the names live there


def check_site(lm: LoadedModel, site: Site) -> None:
    if not 0 <= site.layer < lm.n_layers:
        raise SiteError(
            f"Site {site.hook_name} is out of range: model {lm.name!r} has {lm.n_layers} layers (0 to {lm.n_layers - 1})."
        )


def site_width(lm: LoadedModel, site: Site) -> int:
    """d_in of an SAE at this site: d_model for res/mlp, n_heads * head_dim for att."""
    check_site(lm, site)
    if site.kind == "att":
        return lm.layers[site.layer].self_attn.o_proj.in_features
    return lm.d_model


def hook_point(lm: LoadedModel, site: Site) -> tuple[nn.Module, str]:
    """The module whose output ('output') or first input ('input') is the site's activation."""
    check_site(lm, site)
    layer = lm.layers[site.layer]
    if site.kind == "res":
        return layer, "output"
    if site.kind == "mlp":
        # Gemma 2 normalises the MLP output before adding it to the residual; its MLP SAEs read that.
        return getattr(layer, "post_feedforward_layernorm", None) or layer.mlp, "output"
    return layer.self_attn.o_proj, "input"


class _StopForward(Exception):
    """Raised by the hook of the deepest needed layer so later layers never run."""


def _hidden(output):
    """A decoder layer returns a tensor (recent transformers) or a tuple whose first item is it."""
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, new: torch.Tensor):
    return (new, *output[1:]) if isinstance(output, tuple) else new


@contextmanager
def site_hooks(lm: LoadedModel, site_fns: dict[Site, Callable[[torch.Tensor], torch.Tensor | None]]):
    """Attach fn(activation) at each site; if fn returns a tensor it replaces the activation (splicing)."""
    handles = []
    try:
        for site, fn in site_fns.items():
            module, where = hook_point(lm, site)
            if where == "output":
                def out_hook(_m, _args, output, fn=fn):
                    new = fn(_hidden(output))
                    return None if new is None else _replace_hidden(output, new)
                handles.append(module.register_forward_hook(out_hook))
            else:
                def in_hook(_m, args, fn=fn):
                    new = fn(args[0])
                    return None if new is None else (new, *args[1:])
                handles.append(module.register_forward_pre_hook(in_hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def stop_after_layer(lm: LoadedModel, layer: int):
    """Raise _StopForward right after `layer` has run; callers catch it with `run_truncated`."""
    def stop(_m, _args, _output):
        raise _StopForward
    handle = lm.layers[layer].register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def record_layer_outputs(lm: LoadedModel, layers: Iterable[int]):
    """Yield {layer: output} filled by the next forward pass: what each of `layers` returned, as returned."""
    outputs: dict[int, object] = {}
    handles = [lm.layers[i].register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
               for i in layers]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replay_layers(lm: LoadedModel, outputs: dict[int, object]):
    """Layers in `outputs` return their recorded output instead of running: a pass that changes nothing before
    layer L (an SAE spliced in at layer L) then costs only the layers from L on. The recorded outputs must come
    from the same inputs (record_layer_outputs on the clean pass), so the result is the full pass's, bit for bit."""
    replaced = [lm.layers[i] for i in outputs]
    for i, out in outputs.items():
        lm.layers[i].forward = lambda *_a, out=out, **_k: out
    try:
        yield
    finally:
        for module in replaced:
            del module.forward  # back to the class's forward


def run_truncated(lm: LoadedModel, input_ids: torch.Tensor, last_layer: int, attention_mask: torch.Tensor | None = None):
    """Forward pass that runs only layers 0..last_layer (the bare baseline every benchmark compares to)."""
    with stop_after_layer(lm, last_layer):
        try:
            lm.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass


def capture_sites(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    sites: Iterable[Site | str],
    attention_mask: torch.Tensor | None = None,
) -> dict[Site, torch.Tensor]:
    """Activations [batch, seq, d_in] at every site, from one forward pass stopped at the deepest site's layer."""
    sites = sorted({parse_site(s) for s in sites})
    if not sites:
        raise SiteError("No sites requested.")
    captured: dict[Site, torch.Tensor] = {}

    def keep(site: Site):
        def fn(act: torch.Tensor) -> None:
            captured[site] = act.detach()
        return fn

    with torch.no_grad(), site_hooks(lm, {s: keep(s) for s in sites}):
        run_truncated(lm, input_ids.to(lm.device), max(s.layer for s in sites),
                      None if attention_mask is None else attention_mask.to(lm.device))
    return captured


@dataclass
class SiteActivations:
    """Activations [n, T, d_in] (float32, CPU) at each site for the contexts [n, T] they were captured on,
    by capture_sites over batches of those contexts."""
    contexts: torch.Tensor
    acts: dict[Site, torch.Tensor]

    def __post_init__(self):
        for site, a in self.acts.items():
            if a.shape[:2] != self.contexts.shape:
                raise ValueError(f"Activations at {site} are {tuple(a.shape)} for contexts {tuple(self.contexts.shape)}.")

    def rows(self, index: slice | torch.Tensor, sites: Iterable[Site]) -> dict[Site, torch.Tensor]:
        """{site: [b, T, d_in]} of the contexts `index` selects, for `sites` (all held here)."""
        missing = set(sites) - set(self.acts)
        if missing:
            raise SiteError(f"No activations captured at {', '.join(sorted(s.hook_name for s in missing))}.")
        return {s: self.acts[s][index] for s in set(sites)}
