"""The tokenizer's table, the tokenizer and the model all use the ids of ``moe_asr.symbols``."""
from moe_asr.data.config import TokenizerConfig
from moe_asr.data.tokenizer import Tokenizer, read_symbol_table, train_tokenizer
from moe_asr.model.u2pp import build_model
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
