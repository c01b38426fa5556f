"""What `featurescope train` trains and how: `TrainConfig`, whose fields are also the command's options.

Apart from featurescope/training.py (which needs torch), so the command line builds its options without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from featurescope.cli_options import setting
from featurescope.site_names import parse_site

ARCHITECTURES = ("jumprelu", "relu")


@dataclass
class TrainConfig:
    # what to train
    sites: tuple[str, ...] = setting(("15-res",), "Site to train an SAE on, e.g. 6-res or blocks.6.hook_resid_post; "
                                     "repeat for several (one shared forward pass).", flags=("--site", "-s"), required=True)
    architecture: str = setting("jumprelu", "jumprelu (L0 penalty, Gemma Scope) or relu (L1 penalty; saved as "
                                "JumpReLU with threshold 0).")
    d_sae: int = setting(2048, "Latents per SAE (d_sae).", flags=("--width",))
    # data (BOS/EOS/pad are never trained on)
    context_len: int = setting(128, "Tokens per context, BOS included.")
    corpus_tokens: int | None = setting(None, "Training tokens taken from the corpus, contexts spread evenly over it "
                                        "(default: all; `precompute --sample spread --tokens N` reads the same contexts).")
    held_out_contexts: int = setting(0, "Contexts kept out of training for evaluation (every k-th one).")
    train_tokens: int = setting(1_000_000, "Activations trained on, repeats over epochs counted.")
    buffer_tokens: int = setting(262_144, "Shuffling buffer size in tokens (memory: tokens x sites x d_in x 4 bytes); "
                                 "if the data set fits, later epochs reuse it.")
    model_batch: int = setting(16, "Contexts per forward pass of the model.")
    # the norm this sets is the SAE's max_norm, kept in its card (featurescope/positions.py)
    max_norm_ratio: float | None = setting(10.0, "Skip tokens whose activation norm exceeds this x the median at "
                                           "their site over the first chunk (attention sinks); 0 keeps all.")
    # optimisation (Gemma Scope: Adam betas (0, 0.999), eps 1e-8, lr warm-up; lr 7e-5 for billions of tokens)
    batch_size: int = setting(4096, "Tokens per optimiser step.")
    lr: float = setting(7e-4, "Adam learning rate of the weights and biases.")
    lr_warmup_steps: int = setting(50, "Cosine learning-rate warm-up from 0.1 x lr, in steps.")
    lr_decay_frac: float = setting(0.2, "Share of the final steps over which lr decays linearly to 0 (0: constant).")
    adam_beta1: float = setting(0.0, "Adam beta1 (Gemma Scope: 0).")
    adam_beta2: float = setting(0.999, "Adam beta2.")
    adam_eps: float = setting(1e-8, "Adam epsilon.")
    # sparsity
    sparsity_coeff: float = setting(1e-3, "lambda: weight of the L0 (jumprelu) or L1 (relu) penalty; the start "
                                    "value when --target-l0 is set.")
    sparsity_warmup_steps: int = setting(100, "Steps over which lambda grows linearly from 0.")
    target_l0: float | None = setting(None, "Adapt lambda after its warm-up so the L0 approaches this value.")
    target_l0_gain: float = setting(0.03, "Controller gain: log(lambda) += gain x log(L0 / target) per step.")
    # JumpReLU threshold (trained as log-threshold, with its own learning rate)
    bandwidth: float = setting(1e-3, "Epsilon of the rectangle-kernel straight-through estimator.")
    # Gemma Scope: 0.001; larger reaches a low L0 faster on short budgets
    threshold_init: float = setting(1e-3, "Initial JumpReLU threshold (on inputs scaled to E||x||^2 = 1).")
    threshold_lr: float | None = setting(None, "Learning rate of log(threshold) (default: --lr).")
    # dead latents: re-initialise latents that did not fire for `dead_window_tokens` tokens
    resample_every: int = setting(0, "Steps between dead-latent resampling (0: never).")
    dead_window_tokens: int = setting(200_000, "A latent silent for this many tokens is dead and gets resampled.")
    resample_stop_frac: float = setting(0.7, "No resampling after this share of the steps (let them settle).")
    resample_fire_rate: float = setting(0.01, "Share of tokens a resampled latent starts firing on.")
    # bookkeeping
    autocast: bool = setting(False, "Run the SAEs' matmuls in bfloat16 (weights, Adam state, thresholds and the "
                             "JumpReLU window stay float32): ~2x faster steps on GPUs and on CPUs with AMX or AVX512-BF16.")
    seed: int = setting(0, "Seed of the init and the data order.")
    checkpoint_every: int = setting(100, "Steps between checkpoints in OUT/checkpoint.pt (0: only on Ctrl-C).")
    progress: bool = setting(True, cli=False)

    def __post_init__(self):
        self.sites = tuple(parse_site(s).short_name for s in self.sites)
        self.max_norm_ratio = self.max_norm_ratio or None  # 0 keeps all, like None
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {self.architecture!r}: use one of {', '.join(ARCHITECTURES)}.")
        if not self.sites:
            raise ValueError("TrainConfig needs at least one site.")
        if self.buffer_tokens < self.batch_size or self.train_tokens < self.batch_size:
            raise ValueError("buffer_tokens and train_tokens must each hold at least one batch (batch_size tokens).")
        if self.target_l0 is not None and self.target_l0 <= 0:
            raise ValueError(f"target_l0 must be positive, got {self.target_l0}.")

    @property
    def n_steps(self) -> int:
        return self.train_tokens // self.batch_size

    def to_dict(self) -> dict:
        return {**asdict(self), "sites": list(self.sites)}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "sites" else v) for k, v in d.items() if k in known})
