"""The tokenizer's table, the tokenizer and the model all use the ids of ``moe_asr.symbols``."""
import pytest

from moe_asr.data.config import TokenizerConfig
from moe_asr.data.tokenizer import Tokenizer, read_symbol_table, train_tokenizer, write_symbol_table
from moe_asr.model.config import ModelConfig
from moe_asr.model.u2pp import build_model
from moe_asr.schema import ConfigError, from_dict
from moe_asr.symbols import BLANK, BLANK_ID, SOS_EOS, UNK, UNK_ID, sos_eos_id
from tests.helpers import tiny_config


def test_written_table_tokenizer_and_model_agree_on_the_special_ids(tmp_path):
    cfg, vocab = train_tokenizer(["abc cab", "bad"], TokenizerConfig(), tmp_path)
    table = read_symbol_table(cfg.symbol_table)
    assert (table[BLANK], table[UNK], table[SOS_EOS]) == (BLANK_ID, UNK_ID, sos_eos_id(vocab))
    tok = Tokenizer.from_config(cfg)
    assert (tok.blank_id, tok.unk_id, tok.sos_eos_id) == (BLANK_ID, UNK_ID, table[SOS_EOS])
    model = build_model(tiny_config(vocab_size=vocab))
    # The decoders start and end with the table's <sos/eos>, and decoding text drops it and the blank.
    assert model.sos == model.eos == table[SOS_EOS]
    assert tok.decode([BLANK_ID, *tok.encode("abc"), model.eos]) == "abc"


def test_sos_eos_at_a_fixed_id_is_one_config_key(tmp_path):
    """WeNet's newer tables put <sos/eos> at 2: model.sos_eos_id moves model, table check and decoding together."""
    vocab = write_symbol_table(["a", "b", "c"], tmp_path / "units.txt", sos_eos=2)
    table = read_symbol_table(tmp_path / "units.txt", 2)
    assert table[SOS_EOS] == 2 and table["a"] == 3 and len(table) == vocab == 6
    tok = Tokenizer.from_config(TokenizerConfig(symbol_table=str(tmp_path / "units.txt")), 2)
    model = build_model(tiny_config(vocab_size=vocab, sos_eos_id=2))
    assert model.sos == model.eos == tok.sos_eos_id == sos_eos_id(vocab, 2) == 2
    assert tok.decode([BLANK_ID, 2, *tok.encode("cab"), model.eos]) == "cab"
    # A tokenizer that expects the default convention refuses this table (and the reverse).
    with pytest.raises(ValueError, match=f"<sos/eos>={vocab - 1}"):
        Tokenizer.from_config(TokenizerConfig(symbol_table=str(tmp_path / "units.txt")))
    with pytest.raises(ValueError, match="<sos/eos>=2"):
        Tokenizer(TokenizerConfig(), {"<blank>": 0, "<unk>": 1, "a": 2, "<sos/eos>": 3}, sos_eos=2)


@pytest.mark.parametrize("value", [0, 1, 12, "first"])
def test_sos_eos_id_outside_the_vocabulary_is_refused(value):
    with pytest.raises(ConfigError, match="model.sos_eos_id"):
        from_dict(ModelConfig, {"vocab_size": 12, "sos_eos_id": value}, "model")
