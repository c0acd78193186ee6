"""Symbol table convention, normalisation, char, word and sentencepiece tokenizers, the CLI."""
from __future__ import annotations

import pytest

from moe_asr.cli import main as cli
from moe_asr.data.config import TokenizerConfig
from moe_asr.data.tokenizer import Tokenizer, normalize_text, read_symbol_table, train_tokenizer

TEXTS = ["Hello, world!", "it's a small WORLD", "hello again world", "the world says hello"] * 5


def test_normalisation_options():
    cfg = TokenizerConfig(case="lower", remove_punctuation=True)
    assert normalize_text("  It's,  a TEST!! (ok) ", cfg) == "it's a test ok"
    assert normalize_text("It's a TEST!", TokenizerConfig()) == "It's a TEST!"
    assert normalize_text("a-b", TokenizerConfig(case="upper", remove_punctuation=True, keep_punctuation="")) == "A B"


def test_char_tokenizer_round_trip_and_convention(tmp_path):
    cfg, vocab = train_tokenizer(TEXTS, TokenizerConfig(case="upper", remove_punctuation=True), tmp_path)
    table = read_symbol_table(cfg.symbol_table)
    assert vocab == len(table) and table["<blank>"] == 0 and table["<unk>"] == 1 and table["<sos/eos>"] == vocab - 1
    tok = Tokenizer.from_config(cfg)
    ids = tok.encode("hello, World")
    assert 0 not in ids and tok.unk_id not in ids and max(ids) < vocab - 1
    assert tok.decode(ids) == "HELLO WORLD"
    assert tok.encode("HELLO Z") [-1] == tok.unk_id


def test_word_tokenizer_units_are_words(tmp_path):
    cfg, vocab = train_tokenizer(["two oh seven", "nine  Two"], TokenizerConfig(type="word", case="lower"), tmp_path)
    table = read_symbol_table(cfg.symbol_table)
    assert vocab == 3 + 4 and cfg.bpe_model is None
    assert [t for t, i in sorted(table.items(), key=lambda x: x[1])][2:-1] == ["nine", "oh", "seven", "two"]
    tok = Tokenizer.from_config(cfg)
    ids = tok.encode("TWO nine eight")
    assert ids == [table["two"], table["nine"], tok.unk_id]
    assert tok.decode(ids[:2]) == "two nine" and tok.decode([0, *ids[:2], vocab - 1]) == "two nine"


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_tokenizer_round_trip(tmp_path, kind):
    cfg, vocab = train_tokenizer(TEXTS, TokenizerConfig(type=kind, case="lower", remove_punctuation=True),
                                 tmp_path, vocab_size=30)
    tok = Tokenizer.from_config(cfg)
    assert tok.vocab_size == vocab == len(read_symbol_table(cfg.symbol_table))
    for text in ["hello world", "the world says hello again"]:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    import pickle
    assert pickle.loads(pickle.dumps(tok)).encode("hello world") == tok.encode("hello world")


@pytest.mark.parametrize("content,message", [("<blank> 0\na 1\n<sos/eos> 2\n", "<unk>=1"),
                                             ("<blank> 0\n<unk> 1\na 4\n<sos/eos> 2\n", "without gaps"),
                                             ("<blank> 0\n<unk>\n", "expected 'token id'")])
def test_bad_symbol_tables_are_refused(tmp_path, content, message):
    (tmp_path / "units.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_symbol_table(tmp_path / "units.txt")


def test_cli_from_kaldi_text(tmp_path, capsys):
    (tmp_path / "text").write_text("".join(f"utt{i} {t}\n" for i, t in enumerate(TEXTS)))
    assert cli(["train-tokenizer", "--text", str(tmp_path / "text"), "--text-has-keys", "--type", "bpe",
                "--vocab-size", "25", "--out", str(tmp_path / "tok"), "--case", "lower"]) == 0
    out = capsys.readouterr().out
    assert "vocab_size:" in out and str(tmp_path / "tok" / "bpe.model") in out
    assert "utt0" not in (tmp_path / "tok" / "units.txt").read_text()
