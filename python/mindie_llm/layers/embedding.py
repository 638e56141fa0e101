# SPDX-License-Identifier: Apache-2.0
"""Vocabulary embedding and the LM head (tied to the embedding or not). At tp_size > 1 both are
replicated (the vocabulary of the supported models is small next to their layers).
Must not import the engine, executor, loader, models or a backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mindie_llm.layers.linear import copy_checked

__all__ = ["VocabEmbedding", "LMHead"]


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        copy_checked(param, loaded, "embedding")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden[S, H] -> logits[S, V] in float32. ``tie_to`` shares the embedding's weight."""

    def __init__(self, vocab_size: int, hidden_size: int, tie_to: VocabEmbedding | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tie_to is not None
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        self.linear_method = None  # set by a quantization transform

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        copy_checked(param, loaded, "lm_head")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.linear_method is not None:
            return self.linear_method(self, hidden).float()
        return F.linear(hidden, self.weight).float()
