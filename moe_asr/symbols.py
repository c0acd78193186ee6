"""The special token ids that the tokenizer, the model and decoding must agree on.

They follow WeNet's symbol table convention, so its ``units.txt`` files and
recipes carry over: ``<blank>`` = 0 is the CTC blank, ``<unk>`` = 1 stands for
every token missing from the table, the real tokens fill the other ids, and one
``<sos/eos>`` symbol both starts and ends the attention decoders' sequences.
Padded target positions hold ``IGNORE_ID``, which is no token, so every loss can
skip them.

``<sos/eos>`` takes the last id by default (our tables, WeNet's older recipes);
WeNet's newer recipes put it at a fixed id (2). The config key
``model.sos_eos_id`` says which (``SosEos``): the model takes its ids from
:func:`sos_eos_id`, and the tokenizer lays out and checks its table with
:func:`special_ids`, so another convention is a change to this module alone.
"""
from __future__ import annotations

from typing import Literal, Union

BLANK = "<blank>"
UNK = "<unk>"
SOS_EOS = "<sos/eos>"
SPECIAL_SYMBOLS = (BLANK, UNK, SOS_EOS)

BLANK_ID = 0
UNK_ID = 1
IGNORE_ID = -1

LAST = "last"
# Where <sos/eos> sits: the last id of the vocabulary, or a fixed id past <unk>.
SosEos = Union[Literal["last"], int]


def sos_eos_id(vocab_size: int, where: SosEos = LAST) -> int:
    """Id of ``<sos/eos>`` in a vocabulary of ``vocab_size`` symbols; ValueError if ``where`` cannot be."""
    if where == LAST:
        return vocab_size - 1
    if isinstance(where, bool) or not isinstance(where, int) or not UNK_ID < where < vocab_size:
        raise ValueError(f"<sos/eos> id must be {LAST!r} or in [{UNK_ID + 1}, {vocab_size - 1}] "
                         f"for {vocab_size} symbols, got {where!r}")
    return where


def special_ids(vocab_size: int, sos_eos: SosEos = LAST) -> dict[str, int]:
    """Each of ``SPECIAL_SYMBOLS`` and its id in a vocabulary of ``vocab_size`` symbols."""
    return {BLANK: BLANK_ID, UNK: UNK_ID, SOS_EOS: sos_eos_id(vocab_size, sos_eos)}
