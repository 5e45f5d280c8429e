"""Attention over encoder states: additive (Bahdanau et al., 2015) and multiplicative
(Luong et al., 2015, "dot" and "general").

Keys are projected once per source by ``project_keys`` (called from ``model.encode``) and passed
in on every call; the modules keep no state between calls. Queries may cover many target
positions at once, so a teacher-forced decoder attends for the whole sentence in one call.
"""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    def project_keys(self, memory: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project_query(self, query: torch.Tensor) -> torch.Tensor:
        """The query's projection where the score has one (``query_layer``, or None)."""
        return query if self.query_layer is None else self.query_layer(query)

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query projected (``project_query``), keys projected (``project_keys``) -> scores."""
        raise NotImplementedError

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
        """query: (batch, tgt_len, query_dim); keys: (batch, src_len, key_dim) projected;
        values: (batch, src_len, value_dim); mask: (batch, src_len), True on real tokens.
        Returns the context (batch, tgt_len, value_dim) and the weights (batch, tgt_len, src_len)."""
        return self.attend(self.project_query(query), keys, values, mask)

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
        """``forward`` with the query already projected (a decoder loop projects it itself)."""
        scores = self.score(query, keys)  # (batch, tgt_len, src_len)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = scores.softmax(dim=-1)  # (batch, tgt_len, src_len)
        context = weights.bmm(values)  # (batch, tgt_len, value_dim)
        return context, weights


class BahdanauAttention(Attention):
    """Additive attention (Bahdanau et al., 2015): score = v . tanh(W_q q + W_k k)."""

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int):
        super().__init__()
        self.key_layer = nn.Linear(key_dim, attn_dim, bias=False)
        self.query_layer = nn.Linear(query_dim, attn_dim, bias=False)
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def project_keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.key_layer(memory)  # (batch, src_len, attn_dim)

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """v . tanh(a) computed as 2 v . sigmoid(2a), which differs from it by sum(v), the same for
        every source position, so the softmax over positions is unchanged. This is the largest
        elementwise step of training and decoding (batch x tgt_len x src_len x attn_dim), and
        torch's CPU sigmoid runs it several times faster than its tanh. Without gradients it runs
        in chunks of batch rows, so that long sources do not make a large intermediate."""
        q = 2 * query.unsqueeze(2)  # (batch, tgt_len, 1, attn_dim)
        rows = max(1, self.CHUNK // (q.size(1) * keys.size(1) * keys.size(2)))  # batch rows per chunk
        if rows >= q.size(0) or torch.is_grad_enabled():  # (training keeps it all for backward anyway)
            return self._score(q, keys)
        return torch.cat([self._score(q[i: i + rows], keys[i: i + rows]) for i in range(0, q.size(0), rows)])

    CHUNK = 1 << 22  # elements of the (rows, tgt_len, src_len, attn_dim) intermediate, when decoding

    def _score(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        hidden = torch.add(q, keys.unsqueeze(1), alpha=2).sigmoid_()  # (batch, tgt_len, src_len, attn_dim)
        return 2 * self.v(hidden).squeeze(-1)  # (batch, tgt_len, src_len)


class LuongAttention(Attention):
    """Multiplicative attention (Luong et al., 2015): "dot" q.k, or "general" q.W k."""

    def __init__(self, query_dim: int, key_dim: int, general: bool = True):
        super().__init__()
        if not general and query_dim != key_dim:
            raise ValueError(f"dot attention needs equal query and key sizes, got {query_dim} and {key_dim}; "
                             f"use luong-general or bahdanau")
        self.key_layer = nn.Linear(key_dim, query_dim, bias=False) if general else None
        self.query_layer = None

    def project_keys(self, memory: torch.Tensor) -> torch.Tensor:
        return memory if self.key_layer is None else self.key_layer(memory)  # (batch, src_len, query_dim)

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return query.bmm(keys.transpose(1, 2))  # (batch, tgt_len, src_len)


def make_attention(kind: str, query_dim: int, key_dim: int) -> Attention:
    if kind == "bahdanau":
        return BahdanauAttention(query_dim, key_dim, query_dim)
    if kind in ("luong-dot", "luong-general"):
        return LuongAttention(query_dim, key_dim, general=kind == "luong-general")
    raise ValueError(f"unknown attention {kind!r}; use bahdanau, luong-dot or luong-general")
