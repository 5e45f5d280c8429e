"""The sequence-to-sequence model: ``encode`` once per source, then ``decode_step`` per token.

Training (teacher-forced or scheduled) and search use only these two calls plus ``forward`` for
a whole teacher-forced target.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .decoder import DECODERS, Decoder, DecoderState, Memory, OutputVocab
from .encoder import Encoder
from .tokenizer import PAD


class Seq2Seq(nn.Module):
    def __init__(self, config: ModelConfig, src_vocab: int, tgt_vocab: int):
        super().__init__()
        self.config = config
        enc_hidden = config.hidden_dim // 2 if config.bidirectional else config.hidden_dim
        self.encoder = Encoder(src_vocab, config.embed_dim, enc_hidden, config.layers, config.bidirectional,
                               config.cell, config.dropout, PAD, config.layer_norm)
        shared = dict(layers=config.layers, cell=config.cell, attention=config.attention, dropout=config.dropout,
                      tie_embeddings=config.tie_embeddings, bridge=config.bridge, pad_id=PAD,
                      layer_norm=config.layer_norm)
        if config.decoder == "luong":
            shared["input_feeding"] = config.input_feeding
        self.decoder: Decoder = DECODERS[config.decoder](tgt_vocab, config.embed_dim, config.hidden_dim,
                                                         self.encoder.output_dim, **shared)

    def encode(self, src: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor) -> tuple[Memory, DecoderState]:
        """src, mask: (batch, src_len); lengths: (batch,). Returns the memory to attend over
        (keys projected once) and the decoder's initial state."""
        outputs, finals = self.encoder(src, lengths)  # (batch, src_len, enc_dim)
        memory = Memory(outputs, self.decoder.attention.project_keys(outputs), mask)
        return memory, self.decoder.init_state(finals, src.size(0))

    def decode_step(self, prev: torch.Tensor, memory: Memory, state: DecoderState, vocab: OutputVocab | None = None):
        """prev: (batch,) last tokens -> logits (batch, vocab), or (batch, n) over ``vocab.ids``, next
        state, attention (batch, src_len)."""
        return self.decoder.step(prev, memory, state, vocab)

    def output_vocab(self, ids: torch.Tensor) -> OutputVocab:
        """What ``decode_step`` takes to score only the target tokens ``ids`` (n,), sorted."""
        return self.decoder.restrict(ids)

    def forward(self, src: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor, tgt_in: torch.Tensor):
        """Teacher-forced logits (batch, tgt_len, vocab) for a whole target."""
        memory, state = self.encode(src, lengths, mask)
        logits, _, _ = self.decoder(tgt_in, memory, state)
        return logits

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config: ModelConfig, src_vocab: int, tgt_vocab: int) -> Seq2Seq:
    """A new model; with ``config.init_uniform`` above 0, every parameter is drawn again uniformly in
    +-init_uniform, as OpenNMT-py initialises its RNN models (its ``param_init``), with the padding
    rows of the embeddings kept at zero. (PyTorch's per-layer defaults give the embeddings unit
    variance, far more than any other weight.)"""
    model = Seq2Seq(config, src_vocab, tgt_vocab)
    if config.init_uniform > 0:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.uniform_(-config.init_uniform, config.init_uniform)
            model.encoder.embed.weight[PAD].zero_()
            model.decoder.embed.weight[PAD].zero_()
    return model
