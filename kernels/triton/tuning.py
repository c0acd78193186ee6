"""Tiles of the GEMM kernels and how a call gets one.

Not ``triton.autotune``, for four reasons:

* inside CUDA-graph capture nothing may be benchmarked: a key tuned before
  keeps its tile, a new key takes the default tile;
* a tile whose estimated shared memory exceeds the device's is never compiled,
  and one that still fails for lack of resources is remembered per dtype
  instead of being compiled again for every new key;
* ``MOE_KERNELS_TUNE=0`` pins the default tile (one compile per kernel
  variant: tests, first runs on a new machine);
* a caller may name the tile (the benchmark sweep runs every tile).

Under ``TRITON_INTERPRET=1`` every call takes the kernel's one interpreter tile.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton
from triton.runtime.errors import OutOfResources, PTXASError

from .common import INTERPRET

RESOURCE_ERRORS = (OutOfResources, PTXASError)


@dataclass(frozen=True)
class Tile:
    """Block sizes and launch shape of one compiled variant (``block_m``: the rows a step takes)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}"

    def launch_kwargs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                    num_warps=self.num_warps, num_stages=self.num_stages)


def tuning_enabled() -> bool:
    return os.environ.get("MOE_KERNELS_TUNE", "1") != "0"


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def smem_limit(device: torch.device) -> int:
    """Shared memory one block may opt into on ``device`` (227 KiB on sm90)."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


class Tuner:
    """The tiles of one kernel, the tuned tile per key, the tiles that failed per dtype."""

    def __init__(self, tiles: list[Tile], interpret_tile: Tile, smem: Callable[[Tile, int], int]):
        self.tiles = tiles
        self.interpret_tile = interpret_tile
        self.smem = smem
        self.best: dict[tuple, Tile] = {}
        self.failed: set[tuple[Tile, torch.dtype]] = set()

    def candidates(self, dtype: torch.dtype, device: torch.device) -> list[Tile]:
        """Tiles that fit the device's shared memory in ``dtype`` and have not failed."""
        if INTERPRET or device.type != "cuda":
            return [self.interpret_tile]
        limit = smem_limit(device)
        size = torch.empty((), dtype=dtype).element_size()
        return [t for t in self.tiles if self.smem(t, size) <= limit and (t, dtype) not in self.failed]

    def default(self, candidates: list[Tile], rows_per_group: int) -> Tile:
        """The first candidate whose row block suits the average group (16 rows for streaming sizes)."""
        want = 16 if rows_per_group <= 16 else 32 if rows_per_group <= 32 else 64 if rows_per_group <= 128 else 128
        return next((t for t in candidates if t.block_m == want), candidates[0])

    def run(self, key: tuple, dtype: torch.dtype, device: torch.device, rows_per_group: int,
            launch: Callable[[Tile], None]) -> Tile:
        """Launch with the tile for ``key`` (tuning it first where allowed); returns the tile used."""
        while True:
            tiles = self.candidates(dtype, device)
            if not tiles:
                raise RuntimeError(f"no tile of this kernel fits the device's shared memory in {dtype}")
            tile = self.best.get(key)
            if tile is None or tile not in tiles:
                if tuning_enabled() and not _capturing(device) and len(tiles) > 1:
                    tile = self._tune(tiles, dtype, launch)
                    self.best[key] = tile
                else:
                    tile = self.default(tiles, rows_per_group)
            try:
                launch(tile)
                return tile
            except RESOURCE_ERRORS:
                self.failed.add((tile, dtype))
                self.best.pop(key, None)

    def _tune(self, tiles: list[Tile], dtype: torch.dtype, launch: Callable[[Tile], None]) -> Tile:
        times = {}
        for tile in tiles:
            try:
                times[tile] = triton.testing.do_bench(lambda: launch(tile), warmup=5, rep=20)
            except RESOURCE_ERRORS:
                self.failed.add((tile, dtype))
        if not times:
            raise RuntimeError(f"every tile of this kernel failed for lack of resources in {dtype}")
        return min(times, key=times.get)


def mm_smem(tile: Tile, elem_bytes: int) -> int:
    """Pipelined operand buffers of ``[BM, BK] @ [BK, BN]`` (the forward GEMM)."""
    return tile.num_stages * (tile.block_m * tile.block_k + tile.block_k * tile.block_n) * elem_bytes


def wgrad_smem(tile: Tile, elem_bytes: int) -> int:
    """Pipelined operand buffers of ``[BK, BM] @ [BM, BN]`` (the weight gradient: rows are the reduction)."""
    return tile.num_stages * (tile.block_k * tile.block_m + tile.block_m * tile.block_n) * elem_bytes
