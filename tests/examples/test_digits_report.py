"""The digits recipe's report (examples/digits/local/report.py): WER broken down by voice, from `score`'s output.

Needs no speech synthesizer, so it runs wherever the package does.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "digits"


def _report_module():
    spec = importlib.util.spec_from_file_location("digits_report", RECIPE / "local" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_breaks_scores_down_by_voice(tmp_path):
    report = _report_module()
    refs = {"6_george_1": "six", "6_george_2": "six", "2_yweweler_0": "two",
            "test_flite_slt_00001": "one two three", "test_festival_cmu_us_slt_arctic_hts_00002": "four five",
            "test_espeak_en029_00003": "six seven"}
    hyps = {"6_george_1": "eight", "6_george_2": "six", "2_yweweler_0": "two",
            "test_flite_slt_00001": "one two", "test_festival_cmu_us_slt_arctic_hts_00002": "four nine",
            "test_espeak_en029_00003": "eight seven oh"}
    for name, table in (("ref", refs), ("hyp", hyps)):
        (tmp_path / name).write_text("".join(f"{k} {v}\n" for k, v in table.items()))
    subprocess.run([sys.executable, "-m", "moe_asr.cli", "score", "--ref", str(tmp_path / "ref"), "--hyp",
                    str(tmp_path / "hyp"), "-o", str(tmp_path)], check=True, capture_output=True, timeout=120)
    wer, subs = report.breakdown(tmp_path / "wer_per_utt.txt")
    assert wer == {"george": 50.0, "yweweler": 0.0, "flite slt": 100 / 3, "festival cmu_us_slt_arctic_hts": 50.0,
                   "espeak en029": 100.0}
    assert sorted(subs) == [("five", "nine", 1), ("six", "eight", 2)]
