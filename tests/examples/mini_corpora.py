"""Miniature LibriSpeech and AISHELL-1 trees, laid out and formatted as the real corpora are, spoken by espeak-ng.

Each tree holds the bad entries real corpora have, so the recipes' data preparation must
skip and count them: LibriSpeech gets a transcript line whose flac is missing and a malformed
line; AISHELL gets a transcript line without audio and a wav file without a transcript. The
functions return what a correct preparation finds (utterances per set, skips per reason).
"""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from moe_asr.data.features import resample

RATE = 16000  # both corpora: 16 kHz, 16-bit mono

ENGLISH = [
    "HE HOPED THE RIVER WOULD BE CALM BY MORNING", "THE OLD MAN WALKED SLOWLY ALONG THE SHORE",
    "SHE OPENED THE WINDOW AND LOOKED AT THE GARDEN", "IT WAS A LONG JOURNEY ACROSS THE HILLS",
    "THE CHILDREN LAUGHED WHEN THE DOG RAN AWAY", "WE SHALL MEET AGAIN WHEN THE SUMMER COMES",
    "HIS VOICE WAS LOW AND FULL OF KINDNESS", "THE LETTER ARRIVED LATE IN THE EVENING",
    "THEY SAT BY THE FIRE AND TOLD OLD STORIES", "I DON'T THINK HE'LL COME BACK TONIGHT",
    "THE SHIP SAILED NORTH UNDER A GREY SKY", "A LITTLE BIRD SANG ON THE BRANCH ABOVE",
    "THE DOCTOR'S HOUSE STOOD AT THE END OF THE ROAD", "SHE READ THE BOOK TWICE BEFORE SHE SLEPT",
    "THE WIND BLEW COLD OVER THE EMPTY FIELDS", "HE GAVE HER A SMALL SILVER KEY",
    "NOBODY KNEW WHERE THE TRAVELLER HAD GONE", "THE BELLS RANG OUT ACROSS THE TOWN",
    "WE WAITED FOR HOURS BUT NO ONE CAME", "THE QUEEN'S GARDEN WAS FULL OF ROSES",
    "HIS HANDS WERE COLD AND HIS COAT WAS WET", "THE TEACHER SMILED AT THE QUIET BOY",
]
MANDARIN = [
    "今天 天气 很 好", "我们 明天 一起 去 公园", "这个 城市 的 交通 很 方便", "他 正在 学习 中文",
    "银行 的 利率 有所 下降", "房价 上涨 的 速度 放缓", "市场 需求 保持 稳定", "学生 们 在 图书馆 看书",
    "请 把 窗户 关 上", "公司 今年 的 收入 增长 了", "火车 八点 从 北京 出发", "她 喜欢 在 早上 跑步",
    "政府 出台 了 新 的 政策", "这 家 饭店 的 菜 很 好吃", "孩子 们 在 院子 里 玩", "经济 形势 逐步 好转",
]
VOICES = ["en-us", "en-gb", "en-us+m3", "en-gb+f2", "en-029", "en-us+f4", "en-gb-x-rp+m5", "en-us+klatt2"]


def _speak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng's 22.05 kHz output, resampled to 16 kHz."""
    out = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], check=True,
                         capture_output=True, timeout=60).stdout
    wave, rate = sf.read(io.BytesIO(out), dtype="float32")
    return resample(torch.from_numpy(wave), rate, RATE).numpy()


def librispeech(root: Path) -> dict:
    """``root/LibriSpeech/<subset>/<speaker>/<chapter>/``: flac files and ``<speaker>-<chapter>.trans.txt``.

    Speakers per subset: two in train-clean-100, one in each other subset, one chapter each, four
    utterances a chapter. In train-clean-100's first chapter the third line's flac is missing and a
    fifth line is malformed (an ID of another chapter).
    """
    subsets = {"train-clean-100": [(103, 1240), (1034, 121119)], "train-clean-360": [(1040, 133433)],
               "train-other-500": [(1006, 135212)], "dev-clean": [(1272, 128104)], "dev-other": [(116, 288045)],
               "test-clean": [(1089, 134686)], "test-other": [(1688, 142285)]}
    corpus, n = root / "LibriSpeech", 0
    for subset, chapters in subsets.items():
        for speaker, chapter in chapters:
            folder = corpus / subset / str(speaker) / str(chapter)
            folder.mkdir(parents=True)
            lines = []
            for i in range(4):
                key, text = f"{speaker}-{chapter}-{i:04d}", ENGLISH[n % len(ENGLISH)]
                lines.append(f"{key} {text}")
                if (subset, speaker, i) != ("train-clean-100", 103, 2):
                    sf.write(folder / f"{key}.flac", _speak(text, VOICES[n % len(VOICES)], 150 + 7 * (n % 6)), RATE,
                             subtype="PCM_16")
                n += 1
            if (subset, speaker) == ("train-clean-100", 103):
                lines.append(f"{speaker}-999-0004 A LINE OF ANOTHER CHAPTER")
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("".join(f"{line}\n" for line in lines))
    return {"corpus": corpus, "utterances": {"train": 15, "dev": 8, "test_clean": 4, "test_other": 4},
            "skipped": {"missing audio": 1, "malformed line": 1}}


def aishell(root: Path) -> dict:
    """``root/data_aishell/wav/{train,dev,test}/<speaker>/BAC009<speaker>W<NNNN>.wav`` and
    ``transcript/aishell_transcript_v0.8.txt`` (``ID 词 词 ...``, sorted by ID).

    Two training speakers, one each for dev and test, four utterances each. The transcript also
    lists an utterance whose wav is not there, and one training wav is not in the transcript.
    """
    speakers = {"train": ["S0002", "S0003"], "dev": ["S0724"], "test": ["S0764"]}
    corpus, n, lines = root / "data_aishell", 0, {}
    for set_name, names in speakers.items():
        for speaker in names:
            folder = corpus / "wav" / set_name / speaker
            folder.mkdir(parents=True)
            for i in range(4):
                key, text = f"BAC009{speaker}W{121 + i:04d}", MANDARIN[n % len(MANDARIN)]
                sf.write(folder / f"{key}.wav", _speak("".join(text.split()), "cmn", 150 + 10 * (n % 4)), RATE,
                         subtype="PCM_16")
                lines[key] = text
                n += 1
    lines["BAC009S0002W0199"] = MANDARIN[0]  # listed, no audio
    unlisted = corpus / "wav" / "train" / "S0003" / "BAC009S0003W0130"
    sf.write(unlisted.with_suffix(".wav"), _speak("你好", "cmn", 150), RATE, subtype="PCM_16")  # audio, not listed
    (corpus / "transcript").mkdir()
    (corpus / "transcript" / "aishell_transcript_v0.8.txt").write_text(
        "".join(f"{key} {lines[key]}\n" for key in sorted(lines)), encoding="utf-8")
    return {"corpus": corpus, "utterances": {"train": 8, "dev": 4, "test": 4},
            "skipped": {"missing audio": 1, "missing transcript": 1}}
