"""The special token ids that the tokenizer, the model and decoding must agree on.

They follow WeNet's symbol table convention, so its ``units.txt`` files and
recipes carry over: ``<blank>`` = 0 is the CTC blank, ``<unk>`` = 1 stands for
every token missing from the table, the real tokens follow, and ``<sos/eos>``
takes the last id (one symbol both starts and ends the attention decoders'
sequences). Padded target positions hold ``IGNORE_ID``, which is no token, so
every loss can skip them. Only ``sos_eos_id`` depends on the vocabulary.

The tokenizer lays out and checks its table with ``special_ids``, and the model
and decoding take their ids from here, so another convention is a change to
this module alone.
"""
from __future__ import annotations

BLANK = "<blank>"
UNK = "<unk>"
SOS_EOS = "<sos/eos>"
SPECIAL_SYMBOLS = (BLANK, UNK, SOS_EOS)

BLANK_ID = 0
UNK_ID = 1
IGNORE_ID = -1


def sos_eos_id(vocab_size: int) -> int:
    """Id of ``<sos/eos>`` in a vocabulary of ``vocab_size`` symbols: the last one."""
    return vocab_size - 1


def special_ids(vocab_size: int) -> dict[str, int]:
    """Each of ``SPECIAL_SYMBOLS`` and its id in a vocabulary of ``vocab_size`` symbols."""
    return {BLANK: BLANK_ID, UNK: UNK_ID, SOS_EOS: sos_eos_id(vocab_size)}
