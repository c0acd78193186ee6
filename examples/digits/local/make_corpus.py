"""Build the digits corpus: synthetic connected digit strings and real FSDD recordings, at 8 kHz.

Usage: python examples/digits/local/make_corpus.py --fsdd ../shared/data/fsdd/recordings --out data/digits

Writes OUT/wav/*.wav (16-bit mono 8 kHz) and the manifests make-shards reads
(``key<TAB>path<TAB>text``): train.tsv, cv.tsv, test_synth.tsv (held-out voices)
and test_fsdd.tsv (held-out real speakers), plus corpus.json (counts, voices,
seconds) and meta.tsv (how each utterance was made).

Why this shape: FSDD is 8 kHz telephone-band speech, so everything is brought
to 8 kHz and the model never learns to rely on a band the real test set lacks.
Several TTS engines, voices, speeds and pitches plus noise give the voice
variety that four real speakers cannot (festival's voices of other languages, each
made from one real speaker's recordings, read respelled English digits: accented
voices, female and a child's among them); real FSDD digits are also concatenated
into strings so that the real voices are heard in connected speech too.

Held out, never trained on: FSDD speakers george and yweweler (isolated
digits), and the synthetic voices slt (flite and festival both), rms (flite)
and espeak-ng's en-029 with variants no training voice uses. Everything is
deterministic for --seed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm import tqdm

RATE = 8000
DIGITS = "zero one two three four five six seven eight nine".split()
HELD_OUT_SPEAKERS = ("george", "yweweler")

ESPEAK_TRAIN = ("en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-us-nyc")
ESPEAK_TEST = ("en-029",)
# espeak-ng's variants that still sound like speech (no whisper, robot or effect voices).
VARIANTS = ("Alex Alicia Andrea Andy Annie Denis Diogo Gene Gene2 Henrique Hugo Jacky Lee Marco Mario Michael "
            "Mike Nguyen Storm adam anika announcer antonio aunty belinda benjamin boris caleb david ed edward "
            "edward2 f1 f2 f3 f4 f5 gustave iven iven2 iven3 iven4 john kaukovalta klatt klatt2 klatt3 klatt4 "
            "linda m1 m2 m3 m4 m5 m6 m7 m8 marcelo max michel miguel norbert pablo paul pedro quincy rob robert "
            "sandro shelby steph steph2 steph3 travis victor zac").split()
TEST_VARIANTS = VARIANTS[3::8]  # every eighth, never in training
TRAIN_VARIANTS = [v for v in VARIANTS if v not in TEST_VARIANTS]
FLITE_TRAIN, FLITE_TEST = ("kal", "kal16", "awb"), ("slt", "rms")
FESTIVAL_TRAIN, FESTIVAL_TEST = ("kal_diphone", "ked_diphone"), ("cmu_us_slt_arctic_hts",)
# Festival's voices of other languages, each recorded from a real speaker (diphones, units or HTS),
# read English digits spelled in their own orthography: accented English of real voices, five of
# them female or a child's, where the English training voices are all male. Training only.
RESPELLED = {
    "it": "ziro uan tuu trii for faiv sics seven eit nain ou",
    "cs": "zirou uan tuu trii foor fajv siks sevn ejt najn ou",
    "ca": "zirou uan tuu trii for faiv sics seven eit nain ou",
    "fi": "siirou uan tuu thrii foor faiv siks seven eit nain ou",
    "ru": "зироу уан тю фри фор файв сикс сэвэн эйт найн оу",
}
ACCENTED_VOICES = {"lp_diphone": "it", "pc_diphone": "it", "czech_dita": "cs", "czech_krb": "cs",
                   "czech_machac": "cs", "czech_ph": "cs", "upc_ca_ona_hts": "ca", "msu_ru_nsh_clunits": "ru",
                   "suo_fi_lj_diphone": "fi", "hy_fi_mv_diphone": "fi"}


@dataclass
class Job:
    """One synthetic utterance: what to say, with which engine and voice, how fast and how high."""
    key: str
    text: str
    engine: str
    voice: str
    speed: float          # 1.0 = the engine's default rate
    pitch: int = 50       # espeak-ng's 0..99
    gap: int = 0          # espeak-ng's extra pause between words, 10 ms units
    f0: int = 0           # flite/festival mean pitch in Hz; 0 = the voice's own
    seed: int = 0
    say: str = ""         # what the engine reads when it is not the transcript (a respelling)


def digit_string(rng: np.random.Generator, max_digits: int = 7) -> str:
    """1 to 7 digits; zero is said "oh" a quarter of the time, as people read numbers."""
    n = int(rng.integers(1, max_digits + 1))
    words = [DIGITS[d] for d in rng.integers(0, 10, n)]
    return " ".join("oh" if w == "zero" and rng.random() < 0.25 else w for w in words)


def plan_synthetic(split: str, count: int, rng: np.random.Generator) -> list[Job]:
    """``count`` jobs spread evenly over the engines and voices of ``split`` (train/cv or test)."""
    test = split == "test"
    voices = ([("espeak", v) for v in (ESPEAK_TEST if test else ESPEAK_TRAIN)]
              + [("flite", v) for v in (FLITE_TEST if test else FLITE_TRAIN)]
              + [("festival", v) for v in (FESTIVAL_TEST if test else FESTIVAL_TRAIN)])
    # espeak-ng has one voice per language variant; weight the engines, not the voice list.
    engines = {"espeak": 0.5, "flite": 0.25, "festival": 0.25} if not test else {"espeak": 0.25, "flite": 0.5,
                                                                                "festival": 0.25}
    variants = TEST_VARIANTS if test else TRAIN_VARIANTS
    jobs = []
    for i in range(count):
        engine = rng.choice(list(engines), p=list(engines.values()))
        voice = str(rng.choice([v for e, v in voices if e == engine]))
        job = Job(f"{split}_{engine}_{voice.replace('-', '')}_{i:05d}", digit_string(rng), str(engine), voice,
                  float(rng.uniform(0.8, 1.25)), seed=int(rng.integers(2**31)))
        if engine == "espeak":
            job.voice = f"{voice}+{rng.choice(variants)}"
            job.pitch, job.gap = int(rng.integers(25, 75)), int(rng.integers(0, 8))
        elif not test:
            # The flite and festival training voices are all male (about 100-115 Hz): their pitch
            # is spread up to a high female's. Held-out voices keep their own.
            job.f0 = int(rng.integers(85, 230))
        jobs.append(job)
    return jobs


def plan_accented(count: int, rng: np.random.Generator) -> list[Job]:
    """``count`` training jobs spread evenly over :data:`ACCENTED_VOICES`, each at its own pitch."""
    words = {lang: dict(zip(DIGITS + ["oh"], spelled.split())) for lang, spelled in RESPELLED.items()}
    voices = list(ACCENTED_VOICES.items())
    jobs = []
    for i in range(count):
        voice, lang = voices[i % len(voices)]
        text = digit_string(rng)
        say = " ".join(words[lang][w] for w in text.split())
        jobs.append(Job(f"train_festival_{voice}_{i:05d}", text, "festival", voice,
                        float(rng.uniform(0.8, 1.25)), seed=int(rng.integers(2**31)), say=say))
    return jobs


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what}: {' '.join(cmd[:3])} ... failed: {done.stderr.strip()[:300]}")


def synthesize(jobs: list[Job], tmp: Path, nj: int) -> dict[str, Path]:
    """Raw TTS output per key (engine sample rate); festival runs one process per voice."""
    out = {j.key: tmp / f"{j.key}.wav" for j in jobs}

    def one(job: Job) -> None:
        if job.engine == "espeak":
            _run(["espeak-ng", "-v", job.voice, "-s", str(int(175 * job.speed)), "-p", str(job.pitch),
                  "-g", str(job.gap), "-w", str(out[job.key]), job.text], job.key)
        elif job.engine == "flite":
            pitch = ["--setf", f"int_f0_target_mean={job.f0}"] if job.f0 else []
            _run(["flite", "-voice", job.voice, "--setf", f"duration_stretch={1 / job.speed:.3f}", *pitch,
                  "-t", job.text, "-o", str(out[job.key])], job.key)

    with ThreadPoolExecutor(nj) as pool:
        direct = [j for j in jobs if j.engine != "festival"]
        list(tqdm(pool.map(one, direct), total=len(direct), unit="utt",
                  desc="synthesize espeak-ng/flite"))
    for voice in sorted({j.voice for j in jobs if j.engine == "festival"}):
        script = [f"(voice_{voice})"]
        for j in (j for j in jobs if j.engine == "festival" and j.voice == voice):
            if j.f0:  # the diphone voices' linear-regression intonation, retargeted to this mean pitch
                script.append(f"(set! int_lr_params '((target_f0_mean {j.f0}) (target_f0_std {j.f0 // 7}) "
                              "(model_f0_mean 170) (model_f0_std 34)))")
            script += [f"(Parameter.set 'Duration_Stretch {1 / j.speed:.3f})",
                       f'(utt.save.wave (utt.synth (Utterance Text "{j.say or j.text}")) "{out[j.key]}" \'riff)']
        done = subprocess.run(["festival", "--pipe"], input="\n".join(script) + "\n", capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"festival voice {voice} failed: {done.stderr.strip()[:300]}")
    missing = [k for k, p in out.items() if not p.is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} utterance(s) were not synthesized, e.g. {missing[0]}")
    return out


def load_8k(path: Path) -> np.ndarray:
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != RATE:
        audio = AF.resample(torch.from_numpy(audio), rate, RATE).numpy()
    return audio


def augment(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Silence margins, a random level and (mostly) noise at 10 to 35 dB SNR: TTS output is too clean."""
    pad = [np.zeros(int(RATE * rng.uniform(0.05, 0.35)), np.float32) for _ in range(2)]
    audio = np.concatenate([pad[0], audio, pad[1]])
    speech_power = float(np.mean(audio[audio != 0] ** 2)) if np.any(audio) else 1e-8
    if rng.random() < 0.85:
        noise = rng.standard_normal(len(audio)).astype(np.float32)
        if rng.random() < 0.5:  # brown-ish: most energy low, like hum and room noise
            noise = np.cumsum(noise)
            noise -= np.convolve(noise, np.ones(64) / 64, mode="same")
        snr_db = rng.uniform(10, 35)
        noise *= np.sqrt(speech_power / (np.mean(noise ** 2) + 1e-12) / 10 ** (snr_db / 10))
        audio = audio + noise
    peak = np.max(np.abs(audio)) + 1e-9
    return (audio / peak * 10 ** (rng.uniform(-20, -1) / 20)).astype(np.float32)


def fsdd_files(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        sys.exit(f"make_corpus: FSDD recordings not found at {root} (the shared data folder, ../shared/data/fsdd)")
    by_speaker: dict[str, list[Path]] = {}
    for wav in sorted(root.glob("*.wav")):
        by_speaker.setdefault(wav.stem.split("_")[1], []).append(wav)
    return by_speaker


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fsdd", required=True, help="FSDD recordings folder (../shared/data/fsdd/recordings)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("--synth-train", type=int, default=4000, help="synthetic training utterances")
    p.add_argument("--synth-cv", type=int, default=160, help="synthetic CV utterances (training voices)")
    p.add_argument("--synth-test", type=int, default=240, help="synthetic test utterances (held-out voices)")
    p.add_argument("--synth-accented", type=int, default=1000,
                   help="training utterances of festival's other-language voices reading respelled digits")
    p.add_argument("--fsdd-strings", type=int, default=400, help="strings concatenated from training speakers' digits")
    p.add_argument("--fsdd-per-digit", type=int, default=50,
                   help="FSDD recordings used per speaker and digit (50: all); the last tenth of them are CV")
    p.add_argument("--nj", type=int, default=2, help="parallel TTS processes")
    args = p.parse_args()
    if not 2 <= args.fsdd_per_digit <= 50:
        p.error(f"--fsdd-per-digit must be in [2, 50] (one for training, one for CV), got {args.fsdd_per_digit}")
    out = Path(args.out)
    for tool in ("espeak-ng", "flite", "festival"):
        if shutil.which(tool) is None:
            sys.exit(f"make_corpus: {tool} is not installed (run examples/digits/local/install_tts.sh as root)")
    rng = np.random.default_rng(args.seed)
    wav_dir = out / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[tuple[str, str, str]]] = {"train": [], "cv": [], "test_synth": [], "test_fsdd": []}
    meta: list[str] = []

    jobs = {"train": plan_synthetic("train", args.synth_train, rng), "cv": plan_synthetic("cv", args.synth_cv, rng),
            "test_synth": plan_synthetic("test", args.synth_test, rng)}
    # Their own random stream: the sets above stay what they were without them.
    jobs["train"] += plan_accented(args.synth_accented, np.random.default_rng([args.seed, 1]))
    with tempfile.TemporaryDirectory() as tmp:
        raw = synthesize([j for js in jobs.values() for j in js], Path(tmp), args.nj)
        for split, js in jobs.items():
            for j in tqdm(js, unit="utt", desc=f"augment {split}"):
                path = wav_dir / f"{j.key}.wav"
                sf.write(str(path), augment(load_8k(raw[j.key]), np.random.default_rng(j.seed)), RATE,
                         subtype="PCM_16")
                rows[split].append((j.key, str(path.resolve()), j.text))
                meta.append(f"{j.key}\t{j.engine}\t{j.voice}\t{j.speed:.3f}\t{j.pitch}\t{j.gap}\t{j.f0}")

    speakers = fsdd_files(Path(args.fsdd))
    cv_from = args.fsdd_per_digit - max(1, args.fsdd_per_digit // 10)
    train_pool: dict[str, list[Path]] = {}
    for speaker, wavs in speakers.items():
        for wav in wavs:
            digit, _, index = wav.stem.split("_")
            if int(index) >= args.fsdd_per_digit:
                continue
            text = DIGITS[int(digit)]
            if speaker in HELD_OUT_SPEAKERS:
                rows["test_fsdd"].append((wav.stem, str(wav.resolve()), text))
            elif int(index) >= cv_from:
                rows["cv"].append((wav.stem, str(wav.resolve()), text))
            else:
                rows["train"].append((wav.stem, str(wav.resolve()), text))
                train_pool.setdefault(speaker, []).append(wav)
    pool_speakers = sorted(train_pool)
    for i in tqdm(range(args.fsdd_strings), unit="utt", desc="concatenate FSDD strings"):
        speaker = pool_speakers[i % len(pool_speakers)]
        picks = [train_pool[speaker][k] for k in rng.choice(len(train_pool[speaker]), int(rng.integers(2, 6)))]
        parts = []
        for wav in picks:
            parts += [load_8k(wav), np.zeros(int(RATE * rng.uniform(0.02, 0.25)), np.float32)]
        key = f"train_fsdd_{speaker}_{i:05d}"
        path = wav_dir / f"{key}.wav"
        audio = np.concatenate(parts)
        sf.write(str(path), (audio / (np.max(np.abs(audio)) + 1e-9) * 0.7).astype(np.float32), RATE, subtype="PCM_16")
        rows["train"].append((key, str(path.resolve()), " ".join(DIGITS[int(w.stem.split('_')[0])] for w in picks)))
        meta.append(f"{key}\tfsdd\t{speaker}\t1.000\t-\t-\t-")

    summary = {"seed": args.seed, "sample_rate": RATE, "utterances": {k: len(v) for k, v in rows.items()},
               "voices": {"espeak-ng train": list(ESPEAK_TRAIN), "espeak-ng test": list(ESPEAK_TEST),
                          "espeak-ng test variants": TEST_VARIANTS, "flite train": list(FLITE_TRAIN),
                          "flite test": list(FLITE_TEST), "festival train": list(FESTIVAL_TRAIN),
                          "festival test": list(FESTIVAL_TEST), "festival accented train": list(ACCENTED_VOICES),
                          "fsdd test": list(HELD_OUT_SPEAKERS)}}
    for split, r in rows.items():
        (out / f"{split}.tsv").write_text("".join(f"{k}\t{p}\t{t}\n" for k, p, t in r))
    (out / "meta.tsv").write_text("key\tengine\tvoice\tspeed\tpitch\tgap\tf0\n" + "\n".join(meta) + "\n")
    (out / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("make_corpus: " + ", ".join(f"{k} {v}" for k, v in summary["utterances"].items()) + f" utterances in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
