"""The wrapper interned into the all-MiniLM-L6-v2 archive (see :mod:`.minilm`).

It imports torch only: torch.package copies an interned module's source and
follows every import in it, so the helpers that build the model (and import
transformers) live elsewhere.

Example:
    >>> import torch
    >>> class Encoder(torch.nn.Module):
    ...     def forward(self, input_ids, attention_mask):
    ...         return type("Out", (), {"last_hidden_state": torch.ones(1, 3, 4)})()
    >>> SentenceEmbedder(Encoder())(torch.ones(1, 3), torch.ones(1, 3)).norm().item()
    1.0
"""

from __future__ import annotations

import torch
from torch import nn


class SentenceEmbedder(nn.Module):
    """Mean-pooled, normalised sentence embeddings over a transformers encoder."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)
