"""A bench.train variant's file overrides pick its files; every other override reaches its YAML."""
from __future__ import annotations

from bench.train import split_overrides, variants


def test_variant_overrides_split_into_files_and_yaml_sets():
    run = {"config": "moe.yaml", "deepspeed_config": "zero2.json"}
    files, sets = split_overrides(["deepspeed_config=overlap.json", "parallel.ep_size=2", "a.b=x=y"], run)
    assert files == {"config": "moe.yaml", "deepspeed_config": "overlap.json"}
    assert sets == ["parallel.ep_size=2", "a.b=x=y"]
    assert run == {"config": "moe.yaml", "deepspeed_config": "zero2.json"}  # the run's own files stay
    files, sets = split_overrides(["config=dense.yaml"], run)
    assert files == {"config": "dense.yaml", "deepspeed_config": "zero2.json"} and sets == []


def test_the_dense_twin_trains_its_own_config():
    run = {"config": "moe.yaml", "deepspeed_config": "zero2.json"}
    files, sets = split_overrides(variants(2, "dense.yaml")["dense"][1], run)
    assert files == {"config": "dense.yaml", "deepspeed_config": "zero2.json"} and sets == ["parallel.ep_size=1"]
    assert split_overrides(variants(2, "dense.yaml")["grouped"][1], run)[0] == run
