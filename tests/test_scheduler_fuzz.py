"""Scheduler fuzzing (issue #18) on CPU: the scenario and checks of
`vllm_nsa.scheduler_fuzz` (its docstring) through the torch path, for each model and seed.
benchmarks/cuda_scheduler_check.py runs the same on CUDA (Triton kernels, CUDA graphs).

A negative control drops the entries that land in reused pages and must be caught.

NSA_FUZZ_SEEDS (e.g. "0-9" or "3,7") picks the seeds (CI: 0, 1, 2); NSA_FUZZ_REQUESTS the
requests per seed (200). The counts of each run are printed (pytest -s).
"""
from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch

pytest.importorskip("vllm")

from vllm_nsa.engine_runner import (  # noqa: E402
    start_inprocess_engine,
    stop_inprocess_engine,
)
from vllm_nsa.scheduler_fuzz import (  # noqa: E402
    FUZZ_ENGINE,
    MODELS,
    REFERENCE_ENGINE,
    EngineInternals,
    build_model,
    compare,
    entry_end,
    make_requests,
    parse_seeds,
    run_alone,
    run_fuzz,
    verdict,
)

# The references and the seeds' runs take ~1 min per model on an idle 2-core machine;
# the limit leaves room for a busy one.
pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]

SEEDS = parse_seeds(os.environ.get("NSA_FUZZ_SEEDS", "0-2"))
NUM_REQUESTS = int(os.environ.get("NSA_FUZZ_REQUESTS", "200"))


NEGATIVE_CONTROL_REQUESTS = 60       # the start of the first seed's stream


@pytest.fixture(scope="module", params=MODELS)
def fuzz_engine(request, tmp_path_factory):
    """(name, engine, internals, references by prompt): the references of every seed come
    from a reference engine first (one in-process engine at a time), then the pressured
    engine starts and stays up for the module's tests of this model."""
    directory = str(tmp_path_factory.mktemp(request.param))
    model_kwargs = build_model(request.param, directory)
    started = time.time()
    engine = start_inprocess_engine(directory, **model_kwargs, **REFERENCE_ENGINE)
    try:
        references = run_alone(engine, [r for seed in SEEDS
                                        for r in make_requests(seed, NUM_REQUESTS)])
    finally:
        stop_inprocess_engine(engine)
    print(f"\n[{request.param}] references: {len(references)} prompts alone in "
          f"{time.time() - started:.0f}s")
    engine = start_inprocess_engine(directory, **model_kwargs, **FUZZ_ENGINE)
    try:
        yield request.param, engine, EngineInternals(engine), references
    finally:
        stop_inprocess_engine(engine)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_matches_requests_run_alone(fuzz_engine, seed, monkeypatch):
    name, engine, internals, references = fuzz_engine
    requests = make_requests(seed, NUM_REQUESTS)
    started = time.time()
    results, counts, errors = run_fuzz(engine, internals, requests, monkeypatch)
    problems, worst, excused = compare(requests, results, references)
    print(f"\n[{name} seed {seed}] {time.time() - started:.0f}s, max |logprob diff| "
          f"{worst:.1e}, {excused} compared up to a selection near-tie: {counts}")
    failures, unexercised = verdict(counts, errors, problems, excused)
    assert not failures, failures
    assert not unexercised, f"seed {seed} exercised no {unexercised}: {counts}"


def test_poisoned_pages_catch_missing_entries(fuzz_engine, monkeypatch):
    """The harness's power: drop the emission of every entry that lands in a page some
    earlier request held, as if a recompute or a reused page skipped it (behind the
    audit's back: it records the metadata as built). The NaN poison those pages got when
    handed out must surface twice: as entries that are not their windows' means, and as
    outputs that differ from the requests run alone."""
    name, engine, internals, references = fuzz_engine

    def drop_entries_in_reused_pages(audit, md):
        config, reused = audit.config, audit.reused_holdings
        keep = []
        for row, index in zip(md.emit_req.tolist(), md.emit_index.tolist()):
            last = entry_end(config, index)
            page = int(md.block_table[row, last // audit.page]) if row >= 0 else -1
            keep.append(row >= 0 and page not in reused)
        keep = torch.tensor(keep, dtype=torch.bool)
        return dataclasses.replace(
            md, emit_req=torch.where(keep, md.emit_req, -1),
            emit_index=torch.where(keep, md.emit_index, -1))

    requests = make_requests(SEEDS[0], NEGATIVE_CONTROL_REQUESTS)
    results, counts, errors = run_fuzz(engine, internals, requests, monkeypatch,
                                       corrupt_emission=drop_entries_in_reused_pages)
    problems, _, _ = compare(requests, results, references)
    print(f"\n[{name} negative control] {len(problems)} of {len(requests)} requests "
          f"differ, {len(errors)} audit errors: {problems[:1]} {errors[:1]}")
    assert counts["reused_pages"] > 0
    assert problems, "outputs did not notice entries dropped in reused pages"
    assert errors and all("is not the summary of their raw windows" in e for e in errors), \
        errors[:3]
