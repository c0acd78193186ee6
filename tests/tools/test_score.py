"""`moe-asr score`: hand-made pairs with known substitutions, deletions and insertions, CER, missing and extra ids."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_asr.cli import main


def _texts(tmp_path: Path, ref: dict[str, str], hyp: dict[str, str]) -> list[str]:
    paths = []
    for name, table in (("ref", ref), ("hyp", hyp)):
        path = tmp_path / f"{name}.text"
        path.write_text("".join(f"{k} {v}\n" for k, v in table.items()))
        paths += [f"--{name}", str(path)]
    return paths


def _score(tmp_path: Path, ref: dict[str, str], hyp: dict[str, str], *extra: str) -> dict:
    out = tmp_path / "out"
    assert main(["score", *_texts(tmp_path, ref, hyp), "-o", str(out), *extra]) == 0
    return json.loads((out / ("cer.json" if "--cer" in extra else "wer.json")).read_text())


def test_substitution_and_deletion(tmp_path, capsys):
    s = _score(tmp_path, {"u1": "a b c d"}, {"u1": "a x c"})
    assert (s["substitutions"], s["deletions"], s["insertions"], s["ref_words"]) == (1, 1, 0, 4)
    assert s["wer"] == pytest.approx(0.5) and s["utterances"] == 1 and s["missing"] == s["extra"] == []
    assert "%WER 50.00 [ 2 / 4, 0 ins, 1 del, 1 sub ]" in capsys.readouterr().out
    per_utt = (tmp_path / "out" / "wer_per_utt.txt").read_text().splitlines()
    assert [ln.split() for ln in per_utt] == [["u1", "ref", "a", "b", "c", "d"], ["u1", "hyp", "a", "x", "c", "***"],
                                               ["u1", "op", "C", "S", "C", "D"], ["u1", "#csid", "2", "1", "0", "1"]]


def test_insertions_add_up_over_utterances(tmp_path):
    s = _score(tmp_path, {"u1": "one two", "u2": "three"}, {"u1": "one extra two", "u2": "three four five"})
    assert (s["substitutions"], s["deletions"], s["insertions"], s["ref_words"]) == (0, 0, 3, 3)
    assert s["wer"] == pytest.approx(1.0) and s["utterances"] == 2
    ops = [ln.split()[2:] for ln in (tmp_path / "out" / "wer_per_utt.txt").read_text().splitlines()
           if ln.split()[1] == "op"]
    assert ops == [["C", "I", "C"], ["C", "I", "I"]]


def test_missing_ids_are_full_deletions_and_extra_ids_are_ignored(tmp_path, capsys):
    s = _score(tmp_path, {"u1": "a b", "u2": "c d e"}, {"u1": "a b", "x9": "whatever words"})
    assert (s["substitutions"], s["deletions"], s["insertions"], s["ref_words"]) == (0, 3, 0, 5)
    assert s["wer"] == pytest.approx(3 / 5) and s["utterances"] == 2
    assert s["missing"] == ["u2"] and s["extra"] == ["x9"]
    out = capsys.readouterr().out
    assert "missing hypotheses: 1 (scored as deletions): u2" in out
    assert "extra hypotheses:   1 (ignored): x9" in out


def test_cer_counts_characters_without_spaces(tmp_path):
    # "ab cd" vs "a bxd": as characters without spaces abcd vs abxd, one substitution of four.
    s = _score(tmp_path, {"u1": "ab cd", "u2": "ef"}, {"u1": "a bxd", "u2": "eff"}, "--cer")
    assert s["metric"] == "cer" and s["ref_chars"] == 6
    assert (s["substitutions"], s["deletions"], s["insertions"]) == (1, 0, 1)
    assert s["cer"] == pytest.approx(2 / 6)


def test_cer_scores_mandarin_per_character_wherever_the_word_spaces_fall(tmp_path):
    """AISHELL's transcripts space the words, the recipe's references do not: the same CER either way."""
    ref, hyp = {"u1": "今天天气很好"}, {"u1": "今 天 天 汽 很"}
    s = _score(tmp_path, ref, hyp, "--cer")
    assert (s["ref_chars"], s["substitutions"], s["deletions"], s["insertions"]) == (6, 1, 1, 0)
    assert _score(tmp_path, {"u1": "今天 天气 很 好"}, {"u1": "今天天汽很"}, "--cer") == s
    per_utt = (tmp_path / "out" / "cer_per_utt.txt").read_text().splitlines()
    assert per_utt[2].split() == ["u1", "op", "C", "C", "C", "S", "C", "D"]


def test_an_empty_hypothesis_line_is_an_empty_transcript(tmp_path):
    (tmp_path / "hyp.text").write_text("u1\n")
    (tmp_path / "ref.text").write_text("u1 a b\n")
    out = tmp_path / "out"
    assert main(["score", "--ref", str(tmp_path / "ref.text"), "--hyp", str(tmp_path / "hyp.text"),
                 "-o", str(out)]) == 0
    s = json.loads((out / "wer.json").read_text())
    assert s["deletions"] == 2 and s["missing"] == []


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "twice.text").write_text("u1 a\nu1 b\n")
    for ref in (tmp_path / "absent.text", tmp_path / "twice.text"):
        assert main(["score", "--ref", str(ref), "--hyp", str(ref)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and str(ref) in err
