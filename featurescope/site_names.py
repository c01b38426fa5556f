"""Site names: (layer, kind) and the two spellings of each, "blocks.20.hook_resid_post" and "20-res".

Apart from featurescope/sites.py (the hooks), so configs and the command line parse site names without
importing torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from featurescope.errors import FeatureScopeError

SITE_KINDS = ("res", "mlp", "att")
_HOOK_NAME_SUFFIX = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
_HOOK_NAME_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_mlp_out|attn\.hook_z)$")
_SHORT_NAME_RE = re.compile(r"^(\d+)-(res|mlp|att)$")


class SiteError(FeatureScopeError, ValueError):
    """A site name that does not parse, or that the model does not have."""


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    kind: str  # "res" | "mlp" | "att"

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.{_HOOK_NAME_SUFFIX[self.kind]}"

    @property
    def short_name(self) -> str:
        return f"{self.layer}-{self.kind}"

    def __str__(self) -> str:
        return self.hook_name


def parse_site(name: str | Site) -> Site:
    """'blocks.20.hook_resid_post' or '20-res' -> Site(20, 'res')."""
    if isinstance(name, Site):
        return name
    text = name.strip()
    if m := _SHORT_NAME_RE.match(text):
        return Site(int(m.group(1)), m.group(2))
    if m := _HOOK_NAME_RE.match(text):
        kind = {v: k for k, v in _HOOK_NAME_SUFFIX.items()}[m.group(2)]
        return Site(int(m.group(1)), kind)
    raise SiteError(
        f"Unknown site {name!r}: use a hook name like 'blocks.20.hook_resid_post', 'blocks.20.hook_mlp_out', "
        f"'blocks.20.attn.hook_z', or a short name like '20-res', '20-mlp', '20-att'."
    )
