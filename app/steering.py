"""Steering: generate with SAE features pushed into the model, beside the same generation left alone.

    vector = 40.0 * sae.W_dec[1234]                       # raise feature 1234's activation by 40
    default, steered = generate_pair(lm, lm.tokenize("I think"), [SteeringVector(site, vector)],
                                     n_new=24, temperature=0.7, seed=1)

The default and the steered continuation are the two rows of one batch: the steering hook adds the
vectors to row 1 only (at every position after BOS, prompt and generated tokens alike), and each row
samples from its own generator seeded with `seed`. So strength 0 gives row 1 exactly row 0's numbers,
and the same arguments give the same tokens every time: a shared link reproduces what its author saw.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from featurescope.models import LoadedModel
from featurescope.sites import Site, site_hooks


@dataclass(frozen=True)
class SteeringVector:
    site: Site
    vector: torch.Tensor  # [d_in]: strength * W_dec[feature], in the site's activation space


@dataclass
class Continuation:
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each generated token under the model (temperature 1)


class GenerationCancelled(Exception):
    """`should_stop` said the caller no longer wants the result (e.g. the client disconnected)."""


def _steering_hook(vector: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def add(act: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros((act.shape[0], act.shape[1], act.shape[2]), dtype=act.dtype, device=act.device)
        first = 1 if act.shape[1] > 1 else 0  # the prompt pass holds BOS at position 0: leave the attention sink alone
        delta[1, first:] = vector.to(act.dtype)
        return act + delta
    return add


def _cache_argument(lm: LoadedModel) -> str:
    """transformers 5.x renamed the KV cache argument and output field past_key_values -> cache."""
    return "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate_pair(lm: LoadedModel, prompt_ids: Sequence[int], steering: Sequence[SteeringVector], n_new: int,
                  temperature: float = 0.0, seed: int = 0,
                  should_stop: Callable[[], bool] | None = None) -> tuple[Continuation, Continuation]:
    """(default, steered) continuations of `prompt_ids`, n_new tokens each (cut after EOS).
    temperature 0 is greedy decoding; otherwise tokens are sampled with a generator seeded by `seed`."""
    summed: dict[Site, torch.Tensor] = {}
    for s in steering:
        vector = s.vector.detach().to(lm.device, torch.float32)
        summed[s.site] = summed[s.site] + vector if s.site in summed else vector
    generators = [torch.Generator(device=lm.device).manual_seed(seed) for _ in range(2)]
    eos = lm.tokenizer.eos_token_id
    rows: list[Continuation] = [Continuation([], []), Continuation([], [])]
    finished = [False, False]
    step_ids = torch.tensor([list(prompt_ids)] * 2, dtype=torch.long, device=lm.device)
    cache_arg = _cache_argument(lm)
    past = None
    with site_hooks(lm, {site: _steering_hook(v) for site, v in summed.items()}):
        for _ in range(n_new):
            if should_stop is not None and should_stop():
                raise GenerationCancelled
            out = lm.model(input_ids=step_ids, use_cache=True, **{cache_arg: past})
            past = getattr(out, cache_arg)
            logits = out.logits[:, -1, :].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen = []
            for r in range(2):
                if temperature <= 0:
                    token = int(logits[r].argmax())
                else:
                    probs = torch.softmax(logits[r] / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generators[r]))
                chosen.append(token)
                if not finished[r]:
                    rows[r].token_ids.append(token)
                    rows[r].logprobs.append(float(logprobs[r, token]))
                    finished[r] = eos is not None and token == eos
            if all(finished):
                break
            step_ids = torch.tensor([[t] for t in chosen], dtype=torch.long, device=lm.device)
    return rows[0], rows[1]
