"""Train Gemma-Scope-style JumpReLU SAEs (or ReLU + L1 ones, for comparison) on a model's activations.

Several sites train at once from ONE truncated forward pass per chunk of contexts. The recipe is the
Gemma Scope one (see docs/gemma-scope.md, "Training recipe"), with the knobs a short CPU budget needs
(threshold init and learning rate, dead-latent resampling, a target-L0 controller) in `TrainConfig`.

    from featurescope.models import load_model
    from featurescope.training import TrainConfig, train_saes, train_demo_saes
    lm = load_model("smollm2-135m")
    paths = train_saes(lm, TrainConfig(sites=("6-res", "12-res"), target_l0=50), "out/")   # {Site: folder}
    paths = train_demo_saes(lm, "~/.cache/featurescope/saes")    # the demo SAEs, reused when cached

Or from the shell: `featurescope train --site 6-res --site 12-res --target-l0 50 --out out/`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from featurescope.corpus import content_mask, pack_contexts, pick_spread, python_docs_corpus, split_contexts
from featurescope.models import LoadedModel
from featurescope.positions import counted_positions, norm_limit
from featurescope.sae import JumpReLUSAE, SAEConfig
from featurescope.sae_loading import CARD_FILE, save_sae
from featurescope.sites import Site, SiteActivations, capture_sites, check_site, parse_site, site_width
from featurescope.train_config import TrainConfig

CHECKPOINT_FILE = "checkpoint.pt"


# ---------------------------------------------------------------------------------------------------
# Straight-through estimators (JumpReLU paper, rectangle kernel K(u) = 1 on (-1/2, 1/2)).

class JumpReLUFn(torch.autograd.Function):
    """(z * H(z - theta), L0 per row = sum_i H(z_i - theta_i)) in one pass over z.

    d/dz := H(z - theta) on the activations (the true gradient), none through the L0;
    d/dtheta := -(theta/eps) K((z - theta)/eps) from the activations and -(1/eps) K((z - theta)/eps)
    from the L0, with the rectangle kernel K(u) = 1 on (-1/2, 1/2). One function for both, because every
    pass over the (batch x d_sae) pre-activations costs as much as a fifth of the encoder's matmul on a CPU."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, theta: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        fires = z > theta
        ctx.save_for_backward(z, theta, fires)
        ctx.eps = eps
        return z * fires, fires.sum(-1, dtype=z.dtype)

    @staticmethod
    def backward(ctx, grad_acts: torch.Tensor, grad_l0: torch.Tensor):
        z, theta, fires = ctx.saved_tensors
        window = ((z - theta).abs_() < ctx.eps / 2).to(z.dtype)  # K((z - theta)/eps), (B, d_sae)
        grad_theta = (-(theta / ctx.eps) * (grad_acts * window).sum(0)  # (d_sae,)
                      - (grad_l0 @ window) / ctx.eps)
        return grad_acts * fires, grad_theta, None


# ---------------------------------------------------------------------------------------------------
# The SAE being trained: works on inputs scaled to E||x||^2 = 1.

class TrainingSAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, architecture: str, threshold_init: float, generator: torch.Generator):
        super().__init__()
        self.architecture = architecture
        bound = math.sqrt(6.0 / d_in)  # He-uniform; only the direction survives the row normalisation
        W_dec = (torch.rand(d_sae, d_in, generator=generator) * 2 - 1) * bound
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # (d_sae, d_in), unit-norm rows
        self.W_enc = nn.Parameter(W_dec.t().clone())  # (d_in, d_sae)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(threshold_init)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def forward(self, x: torch.Tensor, eps: float, autocast: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, d_in) -> (x_hat (B, d_in), acts (B, d_sae), sparsity per token (B,): L0 or L1).

        autocast: both matmuls in bfloat16, and with them the (B, d_sae) pre-activations and activations (half
        the memory traffic of the elementwise passes); the parameters, their gradients and x_hat stay float32."""
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            pre = torch.addmm(self.b_enc, x, self.W_enc)  # (B, d_sae)
        if self.architecture == "relu":
            acts = torch.relu(pre)
            sparsity = acts.sum(-1)  # L1; decoder rows are unit norm so no norm weighting is needed
        else:
            acts, sparsity = JumpReLUFn.apply(pre, self.threshold, eps)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            x_hat = torch.addmm(self.b_dec, acts, self.W_dec)
        return x_hat.float(), acts, sparsity

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each (unit-norm) decoder row."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)  # (d_sae, 1)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    def to_inference(self, scale: float, cfg: SAEConfig) -> JumpReLUSAE:
        """Fold the input scale in: the result on raw x gives acts / scale and x_hat / scale of this SAE on scale * x.

        pre_raw = x @ W_enc + b_enc / scale = pre(scale * x) / scale, compared with threshold / scale: the
        same latents fire, activations are in raw units, and the decoder rows stay unit norm.
        """
        with torch.no_grad():
            threshold = torch.zeros_like(self.b_enc) if self.architecture == "relu" else self.threshold
            params = {"W_enc": self.W_enc.detach().clone(), "W_dec": self.W_dec.detach().clone(),
                      "b_enc": self.b_enc.detach() / scale, "b_dec": self.b_dec.detach() / scale,
                      "threshold": threshold.detach() / scale}
        return JumpReLUSAE(cfg, params)


# ---------------------------------------------------------------------------------------------------
# Data: a deterministic schedule of (epoch, chunk) so that step -> data is a function of seed and step.

@dataclass
class Chunk:
    epoch: int
    index: int
    contexts: torch.Tensor  # (n,) indices into the context tensor
    n_batches: int
    first_step: int


def chunk_schedule(mask: torch.Tensor, cfg: TrainConfig) -> list[Chunk]:
    """Chunks of contexts covering cfg.n_steps steps; each epoch reshuffles the context order."""
    n_contexts, per_chunk = mask.shape[0], max(1, cfg.buffer_tokens // cfg.context_len)
    counts = mask.sum(1)  # (n_contexts,) trainable tokens per context
    if counts.sum() < cfg.batch_size:
        raise ValueError(f"The corpus has {int(counts.sum())} trainable tokens, fewer than one batch ({cfg.batch_size}).")
    chunks, step, epoch = [], 0, 0
    while step < cfg.n_steps:
        if n_contexts <= per_chunk:  # all activations fit in the buffer: one chunk, computed once
            orders = [torch.arange(n_contexts)]
        else:
            perm = torch.randperm(n_contexts, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
            orders = list(perm.split(per_chunk))
        for k, idx in enumerate(orders):
            n_batches = min(int(counts[idx].sum()) // cfg.batch_size, cfg.n_steps - step)
            if n_batches > 0:
                chunks.append(Chunk(epoch, k, idx, n_batches, step))
                step += n_batches
            if step >= cfg.n_steps:
                break
        epoch += 1
    return chunks


@torch.no_grad()
def capture_contexts(lm: LoadedModel, contexts: torch.Tensor, sites: list[Site], model_batch: int,
                     progress: bool = False) -> SiteActivations:
    """Every site's activations [n, T, d_in] (float32, CPU) over `contexts` [n, T], one truncated pass per
    batch of model_batch contexts (the batches the precompute job runs, so its values are the same)."""
    n, T = contexts.shape
    acts = {s: torch.empty(n, T, site_width(lm, s)) for s in sites}
    from tqdm.auto import tqdm

    with tqdm(total=contexts.numel(), unit="tok", unit_scale=True, desc=f"model pass, {len(sites)} site(s)",
              disable=not progress, dynamic_ncols=True) as bar:
        for first in range(0, n, model_batch):
            ids = contexts[first: first + model_batch]  # (b, T)
            captured = capture_sites(lm, ids, sites)
            for s in sites:
                acts[s][first: first + len(ids)] = captured[s].float().cpu()
            bar.update(ids.numel())
    return SiteActivations(contexts, acts)


def site_max_norms(lm: LoadedModel, captured: SiteActivations, max_norm_ratio: float | None) -> dict[Site, float | None]:
    """Each site's max_norm (featurescope/positions.py), set from these activations: training takes them
    from its first chunk and keeps them in the SAEs' cards."""
    mask = content_mask(lm, captured.contexts)
    return {s: norm_limit(a, mask, max_norm_ratio) for s, a in captured.acts.items()}


def trained_positions(lm: LoadedModel, captured: SiteActivations, limits: dict[Site, float | None]) -> dict[Site, torch.Tensor]:
    """{site: indices into the flattened [n * T] positions of `captured` that count at that site}."""
    return {s: counted_positions(lm, captured.contexts, a, limits[s]).flatten().nonzero().squeeze(1)
            for s, a in captured.acts.items()}


def chunk_activations(lm: LoadedModel, contexts: torch.Tensor, sites: list[Site], model_batch: int,
                      max_norm_ratio: float | None = None) -> dict[Site, torch.Tensor]:
    """{site: (n_tokens, d_in) float32} over the positions of `contexts` that count at that site (no special
    tokens; with max_norm_ratio, no norm outliers), one truncated pass per batch."""
    captured = capture_contexts(lm, contexts, sites, model_batch)
    kept = trained_positions(lm, captured, site_max_norms(lm, captured, max_norm_ratio))
    return {s: a.flatten(0, 1)[kept[s]] for s, a in captured.acts.items()}


class ActivationStream:
    """Batches of activations for every site; `batches(start_step)` resumes mid-chunk without replaying steps.

    A chunk's activations are captured once at every position of its contexts and kept until the next
    chunk; when the whole data set is one chunk, `site_activations()` hands them on (to the demo's precompute)."""

    def __init__(self, lm: LoadedModel, contexts: torch.Tensor, cfg: TrainConfig):
        self.lm, self.contexts, self.cfg = lm, contexts, cfg
        self.sites = [parse_site(s) for s in cfg.sites]
        self.schedule = chunk_schedule(content_mask(lm, contexts), cfg)
        self._cached: tuple[torch.Tensor, SiteActivations, dict[Site, torch.Tensor]] | None = None  # chunk, captured, kept
        self._max_norms: dict[Site, float | None] | None = None  # set by the first chunk, see max_norm()
        self.model_seconds = 0.0  # time spent in the model's forward pass

    def _captured(self, chunk: Chunk) -> tuple[SiteActivations, dict[Site, torch.Tensor]]:
        if self._cached is None or not torch.equal(self._cached[0], chunk.contexts):
            if self._max_norms is None and chunk is not self.schedule[0]:
                self._captured(self.schedule[0])  # every chunk uses the limits of the first one
            self._cached = None  # free the previous chunk before computing the next one
            t0 = time.perf_counter()
            captured = capture_contexts(self.lm, self.contexts[chunk.contexts], self.sites, self.cfg.model_batch,
                                        progress=self.cfg.progress)
            if self._max_norms is None:
                self._max_norms = site_max_norms(self.lm, captured, self.cfg.max_norm_ratio)
            kept = trained_positions(self.lm, captured, self._max_norms)
            self.model_seconds += time.perf_counter() - t0
            self._cached = (chunk.contexts, captured, kept)
        return self._cached[1], self._cached[2]

    def max_norm(self, site: Site) -> float | None:
        """The site's SAE's max_norm: cfg.max_norm_ratio x the median norm at the site over the first chunk."""
        if self._max_norms is None:
            self._captured(self.schedule[0])
        return self._max_norms[site]

    def tokens(self, chunk: Chunk, site: Site) -> torch.Tensor:
        """(n_tokens, d_in): the chunk's activations at `site` that training uses."""
        captured, kept = self._captured(chunk)
        return captured.acts[site].flatten(0, 1)[kept[site]]

    def site_activations(self) -> SiteActivations | None:
        """Every position's activations over all the contexts, in order, if one chunk holds them all and
        it was captured; else None."""
        whole = torch.arange(self.contexts.shape[0])
        if self._cached is None or not torch.equal(self._cached[0], whole):
            return None
        return self._cached[1]

    def batches(self, start_step: int = 0) -> Iterator[tuple[int, dict[Site, torch.Tensor]]]:
        """(step, {site: (batch_size, d_in)}) from start_step to the end of the schedule."""
        B = self.cfg.batch_size
        for chunk in self.schedule:
            if chunk.first_step + chunk.n_batches <= start_step:
                continue
            captured, kept = self._captured(chunk)
            flat = {s: a.flatten(0, 1) for s, a in captured.acts.items()}  # views, (n * T, d_in)
            seed = self.cfg.seed * 1_000_003 + chunk.epoch * 1009 + chunk.index + 1
            # one order per site: a norm outlier at one site is still trained on at the others
            orders = {s: k[torch.randperm(len(k), generator=torch.Generator().manual_seed(seed))] for s, k in kept.items()}
            for b in range(max(0, start_step - chunk.first_step), chunk.n_batches):
                # the schedule counted tokens before norm outliers were dropped: wrap in the rare short chunk
                span = torch.arange(b * B, (b + 1) * B)
                yield chunk.first_step + b, {s: flat[s][order[span % len(order)]] for s, order in orders.items()}


def input_scale(acts: torch.Tensor) -> float:
    """The scalar s with E||s x||^2 = 1 over these (non-special) activations."""
    return float(1.0 / acts.double().pow(2).sum(-1).mean().sqrt())


# ---------------------------------------------------------------------------------------------------
# Optimisation pieces.

def make_optimizer(sae: TrainingSAE, cfg: TrainConfig) -> torch.optim.Adam:
    groups = [{"params": [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], "lr": cfg.lr, "base_lr": cfg.lr}]
    if cfg.architecture == "jumprelu":
        thr_lr = cfg.threshold_lr if cfg.threshold_lr is not None else cfg.lr
        groups.append({"params": [sae.log_threshold], "lr": thr_lr, "base_lr": thr_lr})
    return torch.optim.Adam(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Cosine warm-up from 0.1, constant, then a linear decay to 0 over the last lr_decay_frac of the steps."""
    if step < cfg.lr_warmup_steps:
        return 0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * step / cfg.lr_warmup_steps))
    decay_start = cfg.n_steps * (1 - cfg.lr_decay_frac)
    if cfg.lr_decay_frac > 0 and step >= decay_start:
        return max(0.0, (cfg.n_steps - step) / (cfg.n_steps - decay_start))
    return 1.0


def sparsity_warmup(step: int, cfg: TrainConfig) -> float:
    return min(1.0, step / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps > 0 else 1.0


@dataclass
class SiteState:
    """Everything that evolves during training for one SAE; all of it goes into the checkpoint."""
    site: Site
    sae: TrainingSAE
    optimizer: torch.optim.Adam
    scale: float
    log_lambda: float  # the adapted lambda (target-L0 controller), before the warm-up factor
    steps_since_fired: torch.Tensor  # (d_sae,) steps since each latent last fired
    metrics: dict = field(default_factory=dict)  # running averages shown in the progress bar


def new_site_state(site: Site, d_in: int, scale: float, index: int, cfg: TrainConfig) -> SiteState:
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + index)
    sae = TrainingSAE(d_in, cfg.d_sae, cfg.architecture, cfg.threshold_init, gen)
    return SiteState(site, sae, make_optimizer(sae, cfg), scale, math.log(cfg.sparsity_coeff),
                     torch.zeros(cfg.d_sae, dtype=torch.long))


def train_step(st: SiteState, x: torch.Tensor, step: int, cfg: TrainConfig) -> None:
    """One optimiser step of one SAE on x (B, d_in), already scaled."""
    factor = lr_factor(step, cfg)
    for group in st.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    lam = math.exp(st.log_lambda) * sparsity_warmup(step, cfg)
    x_hat, acts, sparsity = st.sae(x, cfg.bandwidth, cfg.autocast)
    mse = (x_hat - x).pow(2).sum(-1).mean()
    loss = mse + lam * sparsity.mean()
    st.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    st.sae.project_decoder_grad()
    st.optimizer.step()
    st.sae.normalize_decoder()
    with torch.no_grad():
        fired = acts.any(0)  # (d_sae,); activations are never negative
        st.steps_since_fired = torch.where(fired, 0, st.steps_since_fired + 1)
        l0 = float(torch.count_nonzero(acts)) / acts.shape[0]
        fvu = float(mse / (x - x.mean(0)).pow(2).sum(-1).mean())
    if cfg.target_l0 is not None and sparsity_warmup(step, cfg) >= 1.0:
        st.log_lambda += cfg.target_l0_gain * math.log(max(l0, 0.1) / cfg.target_l0)
    _update_metrics(st.metrics, loss=loss.item(), l0=l0, fvu=fvu, lam=lam)


def _update_metrics(metrics: dict, **values: float) -> None:
    """Exponential moving averages over ~20 steps, bias-corrected so early values do not linger."""
    n = metrics["n"] = metrics.get("n", 0) + 1
    for k, v in values.items():
        raw = metrics[f"_{k}"] = 0.95 * metrics.get(f"_{k}", 0.0) + 0.05 * v
        metrics[k] = raw / (1 - 0.95 ** n)


@torch.no_grad()
def resample_dead(st: SiteState, x: torch.Tensor, step: int, cfg: TrainConfig) -> int:
    """Re-initialise latents silent for dead_window_tokens tokens towards badly reconstructed inputs.

    A dead JumpReLU latent gets no gradient at all (its pre-activation never nears the threshold), so
    it cannot recover by itself. Each one gets the error direction of a high-error input of this batch
    as decoder row and encoder column, a bias centring its pre-activation on the batch, a threshold
    at which it fires on `resample_fire_rate` of the batch, and the Adam moments of a typical alive latent.
    """
    window_steps = max(1, cfg.dead_window_tokens // cfg.batch_size)
    dead = (st.steps_since_fired >= window_steps).nonzero().squeeze(1)  # (n_dead,)
    if dead.numel() == 0:
        return 0
    sae = st.sae
    x_hat, _, _ = sae(x, cfg.bandwidth)
    err = (x - x_hat).pow(2).sum(-1)  # (B,)
    gen = torch.Generator().manual_seed(cfg.seed * 104_729 + step)
    rows = torch.multinomial(err, dead.numel(), replacement=err.numel() < dead.numel(), generator=gen)
    directions = x[rows] - x_hat[rows]
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n_dead, d_in)
    sae.W_dec[dead] = directions
    sae.W_enc[:, dead] = directions.t()
    proj = x @ directions.t()  # (B, n_dead)
    sae.b_enc[dead] = -proj.median(0).values
    centred = proj + sae.b_enc[dead]
    threshold = torch.quantile(centred, 1 - cfg.resample_fire_rate, dim=0).clamp_min(cfg.bandwidth)  # (n_dead,)
    sae.log_threshold[dead] = threshold.log()
    alive = st.steps_since_fired < window_steps
    if alive.any():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.log_threshold):
            _reset_adam_moments(st.optimizer.state.get(p, {}), dead, alive, dim=1 if p is sae.W_enc else 0)
    st.steps_since_fired[dead] = 0
    return int(dead.numel())


def _reset_adam_moments(state: dict, dead: torch.Tensor, alive: torch.Tensor, dim: int) -> None:
    """First moment 0; second moment the alive latents' mean. A dead latent's second moment has decayed
    towards 0, and Adam would turn its first real gradient into a step ~30x the learning rate."""
    if "exp_avg" not in state:
        return
    state["exp_avg"].index_fill_(dim, dead, 0.0)
    v = state["exp_avg_sq"]
    typical = v.index_select(dim, alive.nonzero().squeeze(1)).mean(dim, keepdim=True)
    v.index_copy_(dim, dead, typical.expand_as(v.index_select(dim, dead)).contiguous())


# ---------------------------------------------------------------------------------------------------
# Checkpoints.

def save_checkpoint(path: Path, states: list[SiteState], step: int, cfg: TrainConfig, elapsed: float) -> None:
    """Atomic: write a temporary file, then rename it over the old checkpoint."""
    payload = {
        "config": cfg.to_dict(), "step": step, "elapsed_s": elapsed,
        "buffer_position": step * cfg.batch_size,  # tokens consumed; the schedule maps it back to (chunk, batch)
        "rng": torch.get_rng_state(),
        "sites": [{"site": st.site.short_name, "sae": st.sae.state_dict(), "optimizer": st.optimizer.state_dict(),
                   "scale": st.scale, "log_lambda": st.log_lambda, "steps_since_fired": st.steps_since_fired,
                   "metrics": st.metrics} for st in states],
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, states: list[SiteState], cfg: TrainConfig) -> tuple[int, float]:
    """Restore states in place; returns (step, elapsed seconds). The config must match the checkpoint's."""
    payload = torch.load(path, weights_only=False)
    saved = TrainConfig.from_dict(payload["config"])
    if replace(saved, progress=cfg.progress, checkpoint_every=cfg.checkpoint_every) != cfg:
        raise ValueError(f"Checkpoint {str(path)!r} was written by another training configuration; "
                         "use the same options to resume, or another --out folder.")
    torch.set_rng_state(payload["rng"])
    for st, saved_site in zip(states, payload["sites"], strict=True):
        st.sae.load_state_dict(saved_site["sae"])
        st.optimizer.load_state_dict(saved_site["optimizer"])
        st.scale, st.log_lambda = saved_site["scale"], saved_site["log_lambda"]
        st.steps_since_fired, st.metrics = saved_site["steps_since_fired"], saved_site["metrics"]
    return payload["step"], payload["elapsed_s"]


# ---------------------------------------------------------------------------------------------------
# The training loop.

def train_saes(lm: LoadedModel, cfg: TrainConfig, out_dir: str | Path, contexts: torch.Tensor | None = None,
               resume: bool = False, stop_after: int | None = None, stream: ActivationStream | None = None
               ) -> dict[Site, Path]:
    """Train one SAE per site in cfg.sites; save each to out_dir/<site> (params.npz + featurescope.json).

    `contexts` [n, context_len] defaults to the built-in corpus (minus cfg.held_out_contexts); or pass the
    `stream` over them, whose captured activations the caller can then reuse (`site_activations()`).
    Ctrl-C finishes the current step, writes a checkpoint and raises KeyboardInterrupt; `resume=True`
    continues from out_dir/checkpoint.pt. `stop_after` interrupts after that many steps the same way (tests).
    """
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    sites = [parse_site(s) for s in cfg.sites]
    for s in sites:
        check_site(lm, s)
    if stream is None:
        stream = ActivationStream(lm, default_contexts(lm, cfg)[0] if contexts is None else contexts, cfg)
    elif stream.cfg != cfg:
        raise ValueError("The activation stream was made for another training configuration.")
    first = stream.schedule[0]  # the normalisation scale comes from the first chunk
    states = [new_site_state(s, site_width(lm, s), input_scale(stream.tokens(first, s)), i, cfg)
              for i, s in enumerate(sites)]
    ckpt, done, elapsed = out_dir / CHECKPOINT_FILE, 0, 0.0
    if resume and ckpt.is_file():
        done, elapsed = load_checkpoint(ckpt, states, cfg)
    elif ckpt.is_file():
        ckpt.unlink()  # a fresh run: never resume from a stale checkpoint later

    bar = _progress_bar(cfg, done)
    t_start = time.perf_counter() - elapsed
    with _deferred_interrupt() as interrupted:
        for step, batch in stream.batches(done):  # batch: {site: (batch_size, d_in)}
            for st in states:
                x = batch[st.site] * st.scale  # (batch_size, d_in), E||x||^2 ~ 1
                train_step(st, x, step, cfg)
                if cfg.resample_every and (step + 1) % cfg.resample_every == 0 \
                        and step < cfg.resample_stop_frac * cfg.n_steps:
                    resample_dead(st, x, step, cfg)
            done = step + 1
            _show_progress(bar, states, cfg)
            if interrupted() or (stop_after is not None and done >= stop_after):
                save_checkpoint(ckpt, states, done, cfg, time.perf_counter() - t_start)
                bar.close()
                raise KeyboardInterrupt(f"Training interrupted after step {done}; checkpoint saved to {ckpt}.")
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.n_steps:
                save_checkpoint(ckpt, states, done, cfg, time.perf_counter() - t_start)
    bar.close()
    elapsed = time.perf_counter() - t_start
    paths = {st.site: save_trained(lm, st, cfg, out_dir / st.site.short_name, elapsed, stream) for st in states}
    ckpt.unlink(missing_ok=True)
    return paths


@contextmanager
def _deferred_interrupt():
    """Turn Ctrl-C into a flag checked between steps, so a checkpoint never holds a half-done step."""
    flag = {"hit": False}

    def handler(_signum, _frame):
        flag["hit"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C cannot reach us anyway
        previous = None
    try:
        yield lambda: flag["hit"]
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _progress_bar(cfg: TrainConfig, done: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.n_steps * cfg.batch_size, initial=done * cfg.batch_size, unit="tok", unit_scale=True,
                desc=f"train {len(cfg.sites)} SAE(s)", disable=not cfg.progress, dynamic_ncols=True)


def _show_progress(bar, states: list[SiteState], cfg: TrainConfig) -> None:
    bar.update(cfg.batch_size)
    if bar.disable:
        return
    m = [st.metrics for st in states]
    bar.set_postfix_str(f"loss {sum(x['loss'] for x in m) / len(m):.3f} "
                        "L0 " + "/".join(f"{x['l0']:.0f}" for x in m) + " FVU " + "/".join(f"{x['fvu']:.3f}" for x in m),
                        refresh=False)


def save_trained(lm: LoadedModel, st: SiteState, cfg: TrainConfig, folder: Path, elapsed: float,
                 stream: ActivationStream) -> Path:
    """Fold the input scale into the parameters and write params.npz + the card."""
    sae_cfg = SAEConfig(d_in=st.sae.W_enc.shape[0], d_sae=cfg.d_sae, hook_name=st.site.hook_name,
                        model_name=lm.name, architecture="jumprelu", source=str(folder))
    sae = st.sae.to_inference(st.scale, sae_cfg)
    window = max(1, cfg.dead_window_tokens // cfg.batch_size)
    card = {
        "model": lm.source, "site": st.site.short_name, "width": cfg.d_sae,
        "trained_architecture": cfg.architecture,  # a ReLU SAE is stored as JumpReLU with threshold 0
        "tokens_seen": cfg.n_steps * cfg.batch_size, "steps": cfg.n_steps,
        "unique_contexts": int(stream.contexts.shape[0]), "context_len": cfg.context_len,
        "input_scale": st.scale, "max_norm": stream.max_norm(st.site), "final_lambda": float(math.exp(st.log_lambda)),
        "elapsed_s": round(elapsed, 1), "model_forward_s": round(stream.model_seconds, 1),
        "train_config": cfg.to_dict(),
        "training_metrics": {"loss": st.metrics.get("loss"), "l0": st.metrics.get("l0"), "fvu": st.metrics.get("fvu"),
                             "dead_share_window": float((st.steps_since_fired >= window).float().mean())},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return save_sae(sae, folder, card)


def default_contexts(lm: LoadedModel, cfg: TrainConfig, texts: Iterable[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(train, held-out) contexts of `texts` (default: the built-in corpus).

    With `cfg.corpus_tokens`, the training contexts are that many tokens' worth spread evenly over the
    corpus (`pick_spread`: the same contexts `featurescope precompute --sample spread --tokens N` reads),
    and the held-out ones are spread over the rest; otherwise every k-th context is held out and the
    others are trained on. Either way a small budget still sees every part of the corpus.
    """
    contexts = pack_contexts(lm, python_docs_corpus() if texts is None else texts, cfg.context_len)
    held = None
    if cfg.corpus_tokens is not None:
        room = contexts.shape[0] - cfg.held_out_contexts
        if room < 1:
            raise ValueError(f"The corpus has {contexts.shape[0]} contexts: too few to hold out {cfg.held_out_contexts}.")
        contexts, rest = pick_spread(contexts, max(1, min(room, cfg.corpus_tokens // (cfg.context_len - 1))))
        if cfg.held_out_contexts > 0:
            held = pick_spread(rest, cfg.held_out_contexts)[0]
    elif cfg.held_out_contexts > 0:
        contexts, held = split_contexts(contexts, cfg.held_out_contexts)
    return contexts, held


# ---------------------------------------------------------------------------------------------------
# The demo SAEs of the embedded model (what `featurescope demo` trains once and then reuses).

# Sized for the 6-minute budget on the 2-core CPU machine; measured figures: bench/train_quality.py.
# lr 3e-3 (not 7e-4): on 123 steps at 15-res it gave held-out FVU 0.29 against 0.42.
DEMO_CONFIG = TrainConfig(
    sites=("6-res", "12-res", "18-res", "24-res"), d_sae=2048, held_out_contexts=160, corpus_tokens=100_000,
    train_tokens=400_000, buffer_tokens=131_072, batch_size=4096, lr=3e-3, lr_warmup_steps=10,
    sparsity_warmup_steps=25, target_l0=50, threshold_init=0.05, threshold_lr=2e-2, resample_every=0,
    checkpoint_every=25, autocast=True,
)


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls beat float32 on this device: GPUs that have them, CPUs with AMX or AVX512-BF16.
    Elsewhere the CPU emulates bfloat16 and autocast would slow training down."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


def demo_config(device: torch.device) -> TrainConfig:
    """DEMO_CONFIG as this device runs it: bfloat16 matmuls only where they are fast (same quality, ~2x faster
    steps: README, "The demo's first run")."""
    return replace(DEMO_CONFIG, autocast=DEMO_CONFIG.autocast and fast_bfloat16(device))


def cached_saes(lm: LoadedModel, cfg: TrainConfig, out_dir: str | Path) -> dict[Site, Path] | None:
    """The folders of SAEs already trained with this model and config, or None if any is missing or stale."""
    found = {}
    for s in cfg.sites:
        folder = Path(out_dir).expanduser() / s
        card_path = folder / CARD_FILE
        if not (card_path.is_file() and (folder / "params.npz").is_file()):
            return None
        card = json.loads(card_path.read_text())
        try:
            saved = TrainConfig.from_dict(card.get("train_config", {}))
        except (TypeError, ValueError):
            return None
        if card.get("model") != lm.source or replace(saved, progress=cfg.progress, checkpoint_every=cfg.checkpoint_every) != cfg:
            return None
        found[parse_site(s)] = folder
    return found


def train_demo_saes(lm: LoadedModel, out_dir: str | Path, cfg: TrainConfig = DEMO_CONFIG,
                    force: bool = False, stream: ActivationStream | None = None) -> dict[Site, Path]:
    """Train the demo SAEs into out_dir/<site>, or reuse them when their cards match `cfg` and the model.

    An interrupted run (Ctrl-C) resumes from its checkpoint the next time. `stream`: see train_saes.
    """
    if not force and (found := cached_saes(lm, cfg, out_dir)) is not None:
        return found
    return train_saes(lm, cfg, out_dir, resume=not force, stream=stream)
