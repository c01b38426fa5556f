"""The JumpReLU sparse autoencoder of Gemma Scope, at inference.

    pre   = x @ W_enc + b_enc
    acts  = pre * (pre > threshold)        # per-latent threshold; exactly at it -> 0
    recon = acts @ W_dec + b_dec

Math runs in float32 whatever the model's dtype. Parameters keep the Gemma Scope names and shapes
(W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], threshold [d_sae]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

PARAM_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    hook_name: str  # where it reads, e.g. "blocks.20.hook_resid_post"
    model_name: str = ""  # the model it was trained on, e.g. "google/gemma-2-2b"; "" when unknown
    architecture: str = "jumprelu"
    source: str = ""  # what it was loaded from (hub path, release:id, local path)
    metadata: dict = field(default_factory=dict)  # training card / quality metrics when known

    def to_dict(self) -> dict:
        return asdict(self)


class JumpReLUSAE(nn.Module):
    def __init__(self, cfg: SAEConfig, params: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
        for name, shape in shapes.items():
            value = torch.zeros(shape) if params is None else params[name]
            if tuple(value.shape) != shape:
                raise ValueError(f"SAE parameter {name} has shape {tuple(value.shape)}, expected {shape} for d_in={d_in}, d_sae={d_sae}.")
            # nn.Parameter wraps the tensor without copying: a 1M-wide SAE stays one copy in memory.
            setattr(self, name, nn.Parameter(value.float(), requires_grad=False))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] activations -> [..., d_sae] feature activations (float32)."""
        pre = self.pre_acts(x)
        # Same values as pre * (pre > threshold), without materialising a float mask.
        return pre.masked_fill_(pre <= self.threshold, 0.0)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts.float() @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def numpy_params(self) -> dict[str, np.ndarray]:
        """Parameters in the exact Gemma Scope params.npz layout (float32)."""
        return {name: getattr(self, name).detach().float().cpu().numpy() for name in PARAM_NAMES}
