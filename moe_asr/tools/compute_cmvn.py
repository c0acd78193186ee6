"""Compute global CMVN statistics of the fbank features over shards (WeNet JSON format).

The features are those of training (the config's data.features: rate, mel
bins, frame sizes) without dither or augmentation. Point the model config's
`model.cmvn` at the output file; the encoder loads it.
"""
from __future__ import annotations

import argparse
import logging

from tqdm import tqdm

from moe_asr.data.cmvn import compute_cmvn, save_cmvn
from moe_asr.data.config import DataConfig
from moe_asr.data.shards import check_shards_exist, read_shard_list
from moe_asr.data.stats import skip_summary
from moe_asr.run.config import load_config
from moe_asr.schema import from_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="shard list file (shards.list from make-shards)")
    parser.add_argument("--out", required=True, help="output JSON file")
    parser.add_argument("--config", help="experiment YAML whose data.features section is used (default: defaults)")
    parser.add_argument("--num-workers", type=int, default=1, help="shards processed in parallel")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.config:
        features = load_config(args.config).data.features
    else:
        features = from_dict(DataConfig, {}).features
    shards = read_shard_list(args.shards)
    check_shards_exist(shards)
    with tqdm(total=len(shards), unit="shard", desc="compute-cmvn") as bar:
        stats = compute_cmvn(shards, features, args.num_workers, on_done=lambda _: bar.update(1))
    if stats.frames == 0:
        logging.getLogger(__name__).error("no usable frames in %s", args.shards)
        return 1
    save_cmvn(stats, args.out)
    print(f"compute-cmvn: {stats.utterances} utterances, {stats.frames} frames "
          f"({stats.frames * features.frame_shift_ms / 3.6e6:.3f} h) -> {args.out}")
    for line in skip_summary(stats.skipped):
        print(line)
    return 0
