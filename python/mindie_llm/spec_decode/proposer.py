# SPDX-License-Identifier: Apache-2.0
"""The proposer interface: given a request's tokens so far, guess the next k tokens.

A proposer is told about every step after the target has sampled (``ProposalRequest`` per
sampling row: the prompt and output tokens including the ones accepted this step), returns up to
k proposals per row, and owns whatever state it keeps (a draft model's KV cache, an EAGLE head's
features); it forgets a request when ``drop`` is called (the step message's finished ids).

Exactness: the runner verifies proposals by sampling every position with its own
(seed, output position) draw and accepting up to the first mismatch, so the output is exactly
that of decoding without proposals whatever the proposals are. Model-based proposers draw their
own tokens with the *same* counter-based noise as the target (``draw_coupled``): when the draft's
distribution q is close to the target's p, the two exponential races pick the same token, which
is what makes sampled (temperature > 0) drafts accepted often while the output stays identical.

Must not import the engine, the executor or the server.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from mindie_llm.ops import sampling as sampling_ops

__all__ = ["ProposalRequest", "Proposer", "draw_coupled"]


@dataclass(slots=True)
class ProposalRequest:
    """One sampling row after this step's tokens were appended."""

    req_id: int
    token_ids: np.ndarray        # [L] int32 prompt + outputs so far
    num_outputs: int             # outputs among them (the next token is output position num_outputs)
    k: int                       # most proposals wanted (already capped by max_model_len)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


class Proposer(abc.ABC):
    """Guesses the next tokens of requests. ``uses_hidden_states``: it reads the target's final
    hidden states of every step (``observe_hidden``)."""

    uses_hidden_states: bool = False

    @abc.abstractmethod
    def propose(self, reqs: Sequence[ProposalRequest]) -> list[np.ndarray]:
        """One int32 array of at most ``req.k`` proposed tokens per request (may be empty)."""

    def observe_hidden(self, req_ids: np.ndarray, step: Any, hidden: torch.Tensor | None,
                       valid: np.ndarray) -> None:
        """The target's hidden states of this step ([T, H] in token order, or None when the step
        ran from a captured graph) and, per scheduled row (``req_ids`` [B]), how many of its
        leading token rows hold real (verified) tokens ``valid`` [B]. ``step`` is the runner's
        FlatBatch (positions, query_start_loc)."""

    def drop(self, req_ids: Sequence[int]) -> None:
        """Forgets finished, aborted requests."""


def draw_coupled(logits: torch.Tensor, reqs: Sequence[ProposalRequest], offsets: Sequence[int]) -> np.ndarray:
    """Draft tokens from draft logits [R, V]: argmax for greedy rows; for the others the exponential
    race of ``ops.sampling.sample_seeded`` with the noise of the output position the token would
    take (``req.num_outputs + offsets[i]``), after temperature and top-k/top-p (no penalties: a
    draft is only a guess). Returns [R] int32."""
    logits = logits.float()
    out = logits.argmax(dim=-1)
    rows = [i for i, r in enumerate(reqs) if r.temperature > 0]
    if rows:
        idx = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        dev = logits.device
        temp = torch.tensor([reqs[i].temperature for i in rows], dtype=torch.float32, device=dev)
        x = sampling_ops.apply_temperature(logits[idx], temp)
        top_k = torch.tensor([reqs[i].top_k for i in rows], dtype=torch.int64, device=dev)
        top_p = torch.tensor([reqs[i].top_p for i in rows], dtype=torch.float32, device=dev)
        if bool((top_k > 0).any() or (top_p < 1).any()):
            x = sampling_ops.apply_top_k_top_p(x, top_k, top_p)
        drawn = sampling_ops.sample_seeded(x, [reqs[i].seed for i in rows],
                                           [reqs[i].num_outputs + int(offsets[i]) for i in rows])
        out = out.index_copy(0, idx, drawn)
    return out.to("cpu", torch.int32).numpy()
