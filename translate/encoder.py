"""Recurrent encoder: embeddings, then a (bi)directional LSTM or GRU over packed sequences."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

RNN_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class Encoder(nn.Module):
    """Reads a padded source batch; padding never enters the RNN because the input is packed."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, layers: int = 1,
                 bidirectional: bool = True, cell: str = "lstm", dropout: float = 0.0, pad_id: int = 0,
                 layer_norm: bool = False):
        super().__init__()
        self.directions = 2 if bidirectional else 1
        self.hidden_dim = hidden_dim  # per direction
        self.output_dim = hidden_dim * self.directions
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        self.rnn = RNN_CELLS[cell](embed_dim, hidden_dim, num_layers=layers, batch_first=True,
                                   bidirectional=bidirectional, dropout=dropout if layers > 1 else 0.0)
        self.norm = nn.LayerNorm(self.output_dim) if layer_norm else None  # over the RNN's outputs

    def forward(self, src: torch.Tensor, lengths: torch.Tensor):
        """Returns outputs (batch, src_len, directions*hidden), zero at padding, and the final
        states, each (layers, batch, directions*hidden) with both directions concatenated."""
        embedded = self.dropout(self.embed(src))  # (batch, src_len, embed)
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        outputs, final = self.rnn(packed)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=src.size(1))
        finals = final if isinstance(final, tuple) else (final,)
        if self.norm is not None:  # LayerNorm would give padding its bias: padding stays zero
            outputs = self.norm(outputs).masked_fill((src == self.embed.padding_idx).unsqueeze(-1), 0.0)
        return self.dropout(outputs), tuple(self._join_directions(h) for h in finals)

    def _join_directions(self, h: torch.Tensor) -> torch.Tensor:
        # h: (layers*directions, batch, hidden) -> (layers, batch, directions*hidden)
        layers = h.size(0) // self.directions
        h = h.view(layers, self.directions, h.size(1), h.size(2))
        return torch.cat([h[:, d] for d in range(self.directions)], dim=-1)
