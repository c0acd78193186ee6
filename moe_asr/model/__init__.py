"""The U2++ model: Conformer encoder, CTC head, left-to-right and right-to-left decoders."""
