"""Transcripts <-> token ids: text normalisation, character, word and sentencepiece tokenizers.

Ids follow the special-symbol convention of ``moe_asr.symbols``, which the
model relies on; the real tokens fill the other ids. The table is a file
``units.txt`` of ``token id`` lines; spaces are written as ``▁`` so every token
is one field.
"""
from __future__ import annotations

import unicodedata
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

from moe_asr import symbols
from moe_asr.data.config import TokenizerConfig

SPACE = "\u2581"  # sentencepiece's word boundary mark
SENTENCEPIECE = ("bpe", "unigram")


def normalize_text(text: str, cfg: TokenizerConfig) -> str:
    """Case folding and punctuation removal as the config says; whitespace always collapsed."""
    if cfg.case == "lower":
        text = text.lower()
    elif cfg.case == "upper":
        text = text.upper()
    if cfg.remove_punctuation:
        text = "".join(" " if unicodedata.category(c).startswith("P") and c not in cfg.keep_punctuation else c
                       for c in text)
    return " ".join(text.split())


def read_symbol_table(path: str | Path, sos_eos: symbols.SosEos = symbols.LAST) -> dict[str, int]:
    """Load ``units.txt`` and check the id convention, so a wrong table fails here, not in the loss.

    ``sos_eos`` is where the model expects ``<sos/eos>`` (``model.sos_eos_id``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: symbol table not found (make one with `moe-asr train-tokenizer`)")
    table: dict[str, int] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{path}:{n}: expected 'token id', got {line!r}")
        table[parts[0]] = int(parts[1])
    check_symbol_table(table, sos_eos, str(path))
    return table


def check_symbol_table(table: dict[str, int], sos_eos: symbols.SosEos = symbols.LAST,
                       source: str = "symbol table") -> None:
    """Ids ``0..N-1`` without gaps, the special symbols at the ids of ``moe_asr.symbols``."""
    ids = sorted(table.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"{source}: ids must be 0..{len(ids) - 1} without gaps or repeats")
    try:
        special = symbols.special_ids(len(ids), sos_eos)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if any(table.get(s) != i for s, i in special.items()):
        need = ", ".join(f"{s}={i}" for s, i in special.items())
        raise ValueError(f"{source}: needs {need} (model.sos_eos_id: {sos_eos})")


def write_symbol_table(tokens: Iterable[str], path: str | Path, sos_eos: symbols.SosEos = symbols.LAST) -> int:
    """Write the special symbols at their ids and ``tokens`` in order in the others; returns vocab_size."""
    real = [t for t in dict.fromkeys(tokens) if t not in symbols.SPECIAL_SYMBOLS]
    vocab_size = len(real) + len(symbols.SPECIAL_SYMBOLS)
    special = {i: s for s, i in symbols.special_ids(vocab_size, sos_eos).items()}
    rest = iter(real)
    units = [special[i] if i in special else next(rest) for i in range(vocab_size)]
    Path(path).write_text("".join(f"{u} {i}\n" for i, u in enumerate(units)), encoding="utf-8")
    return len(units)


class Tokenizer:
    """Normalise, split into tokens, map through the symbol table (unknown tokens -> ``<unk>``).

    ``sos_eos`` is the model's ``model.sos_eos_id``: the table must hold ``<sos/eos>``
    there, so a tokenizer and a model that disagree fail when the tokenizer is made.
    """

    blank_id = symbols.BLANK_ID
    unk_id = symbols.UNK_ID

    def __init__(self, cfg: TokenizerConfig, symbol_table: dict[str, int], sp_model: Optional[bytes] = None,
                 sos_eos: symbols.SosEos = symbols.LAST):
        check_symbol_table(symbol_table, sos_eos, cfg.symbol_table or "symbol table")
        self.cfg = cfg
        self.sos_eos = sos_eos
        self.symbol_table = symbol_table
        self.id_to_token = {i: t for t, i in symbol_table.items()}
        self._sp_model = sp_model
        self._sp = None

    @classmethod
    def from_config(cls, cfg: TokenizerConfig, sos_eos: symbols.SosEos = symbols.LAST) -> "Tokenizer":
        if cfg.symbol_table is None:
            raise ValueError("data.tokenizer.symbol_table is not set (make one with `moe-asr train-tokenizer`)")
        sp_model = None
        if cfg.type in SENTENCEPIECE:
            model = Path(cfg.bpe_model or "")
            if not model.is_file():
                raise FileNotFoundError(f"{model}: sentencepiece model (data.tokenizer.bpe_model) not found")
            sp_model = model.read_bytes()
        return cls(cfg, read_symbol_table(cfg.symbol_table, sos_eos), sp_model, sos_eos)

    @property
    def sp_model(self) -> Optional[bytes]:
        """The sentencepiece model (bpe/unigram), None for characters and words."""
        return self._sp_model

    @property
    def vocab_size(self) -> int:
        return len(self.symbol_table)

    @property
    def sos_eos_id(self) -> int:
        return symbols.sos_eos_id(self.vocab_size, self.sos_eos)

    def __getstate__(self) -> dict:
        # The sentencepiece processor is rebuilt from the model bytes in each DataLoader worker.
        return {**self.__dict__, "_sp": None}

    def _processor(self):
        if self._sp is None:
            import sentencepiece as spm
            self._sp = spm.SentencePieceProcessor(model_proto=self._sp_model)
        return self._sp

    def tokenize(self, text: str) -> list[str]:
        text = normalize_text(text, self.cfg)
        if self.cfg.type == "char":
            return [SPACE if c == " " else c for c in text]
        if self.cfg.type == "word":
            return text.split()
        return self._processor().encode(text, out_type=str)

    def encode(self, text: str) -> list[int]:
        return [self.symbol_table.get(t, self.unk_id) for t in self.tokenize(text)]

    def no_known_token(self, ids: Sequence[int]) -> bool:
        """True when ``ids`` hold nothing but ``<unk>`` and word boundaries: nothing to learn from."""
        boundary = self.symbol_table.get(SPACE, self.unk_id)
        return all(i in (self.unk_id, boundary) for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        special = (self.blank_id, self.sos_eos_id)
        tokens = [self.id_to_token.get(int(i), symbols.UNK) for i in ids if int(i) not in special]
        if self.cfg.type == "word":
            return " ".join(tokens)
        return "".join(tokens).replace(SPACE, " ").strip()


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: str | Path,
                    vocab_size: int = 0) -> tuple[TokenizerConfig, int]:
    """Build the symbol table (and sentencepiece model for bpe/unigram) from transcripts.

    ``vocab_size`` is sentencepiece's target size (a soft limit, so tiny corpora
    still train). Returns the tokenizer config with the written file paths and
    the model's vocab_size (the symbol table's line count).
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    normalized = [t for t in (normalize_text(x, cfg) for x in texts) if t]
    if not normalized:
        raise ValueError("no transcripts to train a tokenizer on")
    units_path = out_dir / "units.txt"
    if cfg.type in ("char", "word"):
        tokens = sorted({SPACE if c == " " else c for t in normalized for c in t} if cfg.type == "char"
                        else {w for t in normalized for w in t.split()})
        return replace(cfg, symbol_table=str(units_path), bpe_model=None), write_symbol_table(tokens, units_path)
    import sentencepiece as spm
    if vocab_size < 2:
        raise ValueError(f"a {cfg.type} tokenizer needs --vocab-size >= 2, got {vocab_size}")
    prefix = out_dir / cfg.type
    # These are sentencepiece's own piece ids, not the table's: its unknown piece at 0 (left
    # out of the table, which has its own), no bos/eos/pad pieces (-1 disables them).
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(normalized), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type=cfg.type, character_coverage=1.0, hard_vocab_limit=False,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    tokens = [sp.id_to_piece(i) for i in range(1, sp.get_piece_size())]
    model_path = str(prefix) + ".model"
    return replace(cfg, symbol_table=str(units_path), bpe_model=model_path), write_symbol_table(tokens, units_path)
