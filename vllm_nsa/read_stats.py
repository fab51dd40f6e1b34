"""The decode read counters' file format: written by the backend, read by tests, evals and
benchmarks (the one owner of the format).

When $VLLM_NSA_STATS_FILE is set, the backend appends one JSON line per decode step and
tensor-parallel rank (`append`): the decode read counts (`reference.decode_read_counts_batch`),
in raw-token equivalents (one token's K and V) per KV head per layer, summed over the
step's decode requests (`compressed`, `bounds` (the "bounds" scorer's block bounds),
`selected`, `window`, `total`, `dense`), plus `decode_requests`, `tp_rank`, `kv_heads` (KV
heads that rank holds), `config` (the NSA parameters in force) and `gated` (the NSA
model's three-branch mode). Lines written before `bounds` existed read it as 0.
Importable without vLLM.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

STATS_FILE_ENV = "VLLM_NSA_STATS_FILE"
COUNTS = ("compressed", "bounds", "selected", "window", "total", "dense")
SUMMED = COUNTS + ("decode_requests",)


def stats_path() -> str | None:
    """Where the backend writes, from the environment (None: counters off)."""
    return os.environ.get(STATS_FILE_ENV) or None


def append(path: str | os.PathLike, line: dict) -> None:
    with open(path, "a") as stats_file:
        stats_file.write(json.dumps(line) + "\n")


def read_lines(path: str | os.PathLike | None, start: int = 0) -> tuple[list[dict], int]:
    """(the lines from line `start` on, the number of lines now): for reading a file that
    is still being appended to in rounds. A missing file or path reads as empty."""
    if not path or not Path(path).is_file():
        return [], start
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines[start:]], len(lines)


def summarize(lines: list[dict]) -> dict | None:
    """Sums of the counts over `lines` plus `steps` (their number); None when empty."""
    if not lines:
        return None
    return {key: sum(line.get(key, 0) for line in lines) for key in SUMMED} | {
        "steps": len(lines)}


def config_in_force(lines: list[dict]) -> dict | None:
    """The NSA parameters the backend wrote with its last line (None when none)."""
    return lines[-1].get("config") if lines else None


def read_summary(path: str | os.PathLike | None) -> dict | None:
    """`summarize` of the whole file, or None when it holds no lines."""
    return summarize(read_lines(path)[0])


def read_fraction(summary: dict | None) -> float | None:
    """Tokens NSA read per decode step relative to dense attention, from a summary."""
    if not summary or not summary["dense"]:
        return None
    return summary["total"] / summary["dense"]
