"""The U2++ model: shared Conformer encoder, CTC head, L2R and R2L attention decoders.

Loss = ``ctc_weight * CTC + (1 - ctc_weight) * ((1 - rw) * L2R + rw * R2L)``
plus the MoE auxiliary losses (zero unless enabled). Trained with dynamic
chunk masks so the same weights decode streaming and full context.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_asr.model.cmvn import GlobalCMVN
from moe_asr.model.config import ModelConfig
from moe_asr.model.ctc import CTC
from moe_asr.model.decoder import BiTransformerDecoder
from moe_asr.model.encoder import ConformerEncoder
from moe_asr.model.loss import label_smoothing_loss, token_accuracy
from moe_asr.model.targets import add_sos_eos, reverse_padded
from moe_asr.moe.layer import MoEFeedForward
from moe_asr.symbols import sos_eos_id

# The loss and its parts, as `U2PPModel.forward` returns them (the engine logs and plots these).
LOSS_KEYS = ("loss", "loss_ctc", "loss_l2r", "loss_r2l")


class U2PPModel(nn.Module):
    def __init__(self, cfg: ModelConfig, cmvn: GlobalCMVN | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.sos = self.eos = sos_eos_id(cfg.vocab_size, cfg.sos_eos_id)
        self.encoder = ConformerEncoder(cfg.encoder, cfg.input_dim, cfg.moe, cmvn)
        d = cfg.encoder.output_size
        self.decoder = BiTransformerDecoder(cfg.vocab_size, d, cfg.decoder, cfg.moe)
        self.ctc = CTC(cfg.vocab_size, d, cfg.encoder.dropout_rate)

    def moe_layers(self) -> list[MoEFeedForward]:
        return [m for m in self.modules() if isinstance(m, MoEFeedForward)]

    def encode(self, feats: Tensor, feats_lengths: Tensor, chunk_size: int = -1,
               num_left_chunks: int = -1) -> tuple[Tensor, Tensor]:
        """Encoder output and mask for decoding; ``chunk_size < 0`` is full context."""
        return self.encoder(feats, feats_lengths, chunk_size, num_left_chunks)

    def forward(self, feats: Tensor, feats_lengths: Tensor, targets: Tensor,
                target_lengths: Tensor) -> dict[str, Tensor]:
        """Training loss and its parts; ``targets [B, U]`` padded with -1."""
        cfg = self.cfg
        for m in self.moe_layers():
            m.aux_loss = None
        enc, enc_mask = self.encoder(feats, feats_lengths)
        zero = enc.new_zeros((), dtype=torch.float32)
        out = {"loss_ctc": zero, "loss_l2r": zero, "loss_r2l": zero}
        if cfg.ctc_weight > 0:
            out["loss_ctc"] = self.ctc(enc, enc_mask.squeeze(1).sum(1), targets, target_lengths)
        loss_att = zero
        if cfg.ctc_weight < 1:
            ys_in, ys_out = add_sos_eos(targets, self.sos, self.eos)
            r_targets = reverse_padded(targets, target_lengths)
            r_ys_in, r_ys_out = add_sos_eos(r_targets, self.sos, self.eos)
            l2r, r2l, _ = self.decoder(enc, enc_mask, ys_in, target_lengths + 1, r_ys_in, cfg.reverse_weight)
            out["loss_l2r"] = label_smoothing_loss(l2r, ys_out, cfg.lsm_weight, cfg.length_normalized_loss)
            out["acc_l2r"] = token_accuracy(l2r.detach(), ys_out)
            if cfg.reverse_weight > 0:
                out["loss_r2l"] = label_smoothing_loss(r2l, r_ys_out, cfg.lsm_weight, cfg.length_normalized_loss)
            loss_att = (1 - cfg.reverse_weight) * out["loss_l2r"] + cfg.reverse_weight * out["loss_r2l"]
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        out["moe_aux"] = torch.stack(aux).sum() if aux else zero
        out["loss"] = cfg.ctc_weight * out["loss_ctc"] + (1 - cfg.ctc_weight) * loss_att + out["moe_aux"]
        return out


def build_model(cfg: ModelConfig, load_cmvn: bool = True) -> U2PPModel:
    """The model for ``cfg``. ``load_cmvn=False`` makes placeholder CMVN buffers
    (for loading a checkpoint, which carries the real statistics)."""
    cfg.require_vocabulary()
    cmvn = None
    if cfg.cmvn:
        d = cfg.input_dim
        cmvn = (GlobalCMVN.from_json(cfg.cmvn, d) if load_cmvn
                else GlobalCMVN(torch.zeros(d), torch.ones(d)))
    return U2PPModel(cfg, cmvn)
