"""Offline long-context retrieval data: passkey retrieval and needle-in-a-haystack.

Seeded and deterministic; the distractor text is generated here (nothing is downloaded).
Every prompt is sized in tokens of the model's own tokenizer so that prompt + chat template
+ answer fit the nominal context length, and holds its answer exactly once.

lm-eval calls `passkey_dataset` / `niah_dataset` (the tasks' `custom_dataset`) with the task
metadata merged with `--model_args`, so the tokenizer is the evaluated model's. The docs are
written to JSONL under $NSA_EVAL_DATA_DIR (default evals/data/) and reused. To write them
without lm-eval:

    python -m evals.tasks.nsa_longctx --tokenizer models/SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Callable

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "data"
CONTEXT_LENGTHS = {"1k": 1024, "2k": 2048, "4k": 4096, "8k": 8192}
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SAMPLES_PER_DEPTH = 2
# Tokens of the nominal length kept free for the chat template and the answer
# (SmolLM2's template adds ~15 tokens; the tasks generate at most 16).
RESERVED_TOKENS = 64

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of "
                 "irrelevant text. Find it and memorize it. I will ask you about it.")
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.",
                  "Here we go.", "There and back again.")
PASSKEY_NEEDLE = "The pass key is {answer}. Remember it."
PASSKEY_QUESTION = "What is the pass key? Answer with the number only."
PASSKEY_PREFIX = "The pass key is"

NIAH_INTRO = ("Some special magic numbers are hidden inside the following text. "
              "Make sure to memorize them. I will quiz you about the numbers afterwards.")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {answer}."
NIAH_QUESTION = ("What is the special magic number for {key} mentioned in the provided "
                 "text? Answer with the number only.")
NIAH_PREFIX = "The special magic number for {key} mentioned in the provided text is"

# Distractor grammar. Needle keys come from disjoint word lists, so a key never occurs in
# the haystack; no list contains a digit, so the answer (a number) occurs only in the needle.
_SUBJECTS = ("the old farmer", "a quiet traveller", "the young painter", "the baker",
             "a tired sailor", "the librarian", "our neighbour", "the village teacher",
             "a curious child", "the gardener", "the night watchman", "a wandering poet",
             "the blacksmith", "the shepherd", "a patient doctor", "the mayor")
_VERBS = ("carried", "painted", "repaired", "noticed", "described", "admired", "sold",
          "borrowed", "cleaned", "forgot", "measured", "found", "wrapped", "watched")
_OBJECTS = ("a wooden chair", "the broken lantern", "a basket of apples", "the long letter",
            "an empty bottle", "the heavy coat", "a small boat", "the kitchen table",
            "a pair of boots", "the stone wall", "a map of the coast", "the copper kettle",
            "a bundle of firewood", "the garden gate", "a woollen blanket")
_PLACES = ("near the market", "by the river", "behind the church", "at the harbour",
           "in the orchard", "under the bridge", "beside the mill", "on the hill road",
           "outside the inn", "along the canal", "in the town square", "past the forest")
_TIMES = ("early in the morning", "after the rain", "before supper", "late at night",
          "during the festival", "on a windy afternoon", "at dawn", "in the autumn")
_KEY_COLOURS = ("amber", "crimson", "violet", "indigo", "scarlet", "turquoise", "ochre",
                "magenta", "cobalt", "emerald", "saffron", "ivory")
_KEY_ANIMALS = ("falcon", "otter", "lynx", "heron", "badger", "gecko", "walrus",
                "jaguar", "ibis", "marmot", "osprey", "tapir")


def distractor_sentence(rng: random.Random) -> str:
    sentence = (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                f"{rng.choice(_PLACES)} {rng.choice(_TIMES)}.")
    return sentence[0].upper() + sentence[1:]


def _token_counter(tokenizer) -> Callable[[str], int]:
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fit_haystack(count: Callable[[str], int], render: Callable[[int], str],
                  sentences: list[str], budget: int) -> int:
    """Largest n such that render(n) (the prompt with the first n sentences) fits budget."""
    fixed = count(render(0))
    per_sentence = [count(" " + s) for s in sentences]
    n, used = 0, fixed
    while n < len(sentences) and used + per_sentence[n] <= budget:
        used += per_sentence[n]
        n += 1
    # Token merges across sentence joins make the running sum approximate: trim to exact.
    while n > 0 and count(render(n)) > budget:
        n -= 1
    if count(render(n)) > budget:
        raise ValueError(f"the fixed prompt alone exceeds {budget} tokens")
    return n


def _make_doc(tokenizer, *, task: str, context_length: int, depth: float, index: int,
              intro: str, question: str, gen_prefix: str, needle: str, answer: str,
              sentence_source: Callable[[int], str]) -> dict[str, Any]:
    count = _token_counter(tokenizer)
    budget = context_length - RESERVED_TOKENS
    # Generous pool: every sentence is at least ~4 tokens.
    sentences = [sentence_source(i) for i in range(budget // 4 + 1)]

    def render(n: int) -> str:
        haystack = sentences[:n]
        haystack.insert(round(depth * n), needle)
        return f"{intro}\n\n{' '.join(haystack)}\n\n{question}" + " " + gen_prefix

    n = _fit_haystack(count, render, sentences, budget)
    text = render(n)
    prompt = text[: -len(" " + gen_prefix)]
    return {"id": f"{task}_{context_length}_{index}", "task": task,
            "context_length": context_length, "depth": depth, "input": prompt,
            "gen_prefix": gen_prefix, "answer": answer, "num_tokens": count(text)}


def generate_docs(tokenizer, task: str, context_length: int, depths=DEPTHS,
                  samples_per_depth: int = SAMPLES_PER_DEPTH, seed: int = 0
                  ) -> list[dict[str, Any]]:
    """Docs ordered round by round over the depths, so lm-eval's --limit k (k = number of
    depths) takes one sample at every depth."""
    docs = []
    for round_index in range(samples_per_depth):
        for depth in depths:
            index = len(docs)
            rng = random.Random(f"{task}:{context_length}:{seed}:{index}")
            if task == "passkey":
                answer = str(rng.randint(10000, 99999))
                docs.append(_make_doc(
                    tokenizer, task=task, context_length=context_length, depth=depth,
                    index=index, intro=PASSKEY_INTRO, question=PASSKEY_QUESTION,
                    gen_prefix=PASSKEY_PREFIX, needle=PASSKEY_NEEDLE.format(answer=answer),
                    answer=answer,
                    sentence_source=lambda i: PASSKEY_FILLER[i % len(PASSKEY_FILLER)]))
            elif task == "niah":
                answer = str(rng.randint(1_000_000, 9_999_999))
                key = f"{rng.choice(_KEY_COLOURS)}-{rng.choice(_KEY_ANIMALS)}"
                sentence_rng = random.Random(rng.random())
                pool: list[str] = []

                def sentence_source(i: int, pool=pool, sentence_rng=sentence_rng) -> str:
                    while len(pool) <= i:
                        pool.append(distractor_sentence(sentence_rng))
                    return pool[i]

                docs.append(_make_doc(
                    tokenizer, task=task, context_length=context_length, depth=depth,
                    index=index, intro=NIAH_INTRO, question=NIAH_QUESTION.format(key=key),
                    gen_prefix=NIAH_PREFIX.format(key=key),
                    needle=NIAH_NEEDLE.format(key=key, answer=answer), answer=answer,
                    sentence_source=sentence_source))
            else:
                raise ValueError(f"unknown task {task!r}; known: passkey, niah")
    return docs


def tokenizer_tag(tokenizer) -> str:
    """Identifies the tokenizer's vocabulary, so cached JSONL is never reused across models."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(
        tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_jsonl(tokenizer, task: str, context_length: int, data_dir: Path | None = None,
                **options) -> Path:
    """The JSONL file of these docs, generated on first use (idempotent)."""
    data_dir = Path(data_dir or os.environ.get("NSA_EVAL_DATA_DIR", DEFAULT_DATA_DIR))
    options = {"depths": tuple(options.get("depths", DEPTHS)),
               "samples_per_depth": options.get("samples_per_depth", SAMPLES_PER_DEPTH),
               "seed": options.get("seed", 0)}
    options_tag = hashlib.sha256(json.dumps(options).encode()).hexdigest()[:8]
    path = data_dir / tokenizer_tag(tokenizer) / f"nsa_{task}_{context_length}_{options_tag}.jsonl"
    if not path.is_file():
        docs = generate_docs(tokenizer, task, context_length, **options)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary name of this process's own: runners that start several engines at
        # once may write the same file concurrently (same content, one rename wins).
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        tmp.replace(path)
    return path


# ---------------------------------------------------------------- lm-eval custom_dataset
def _load_tokenizer(metadata: dict[str, Any]):
    from transformers import AutoTokenizer

    name = next((metadata[key] for key in ("tokenizer", "pretrained", "model")
                 if isinstance(metadata.get(key), str) and metadata[key]), None)
    if name is None:
        raise ValueError("nsa_ tasks size prompts with the model's tokenizer: pass "
                         "pretrained=<dir> (or tokenizer=<dir>) in --model_args")
    return AutoTokenizer.from_pretrained(name)


def _dataset(task: str, metadata: dict[str, Any]):
    import datasets

    path = write_jsonl(_load_tokenizer(metadata), task, int(metadata["nsa_context_length"]),
                       depths=metadata.get("nsa_depths", DEPTHS),
                       samples_per_depth=int(metadata.get("nsa_samples_per_depth",
                                                          SAMPLES_PER_DEPTH)))
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    return {"test": datasets.Dataset.from_list(docs)}


def passkey_dataset(**metadata):
    return _dataset("passkey", metadata)


def niah_dataset(**metadata):
    return _dataset("niah", metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description="write the nsa_ tasks' JSONL")
    parser.add_argument("--tokenizer", required=True, help="model or tokenizer directory")
    parser.add_argument("--lengths", nargs="+", default=list(CONTEXT_LENGTHS),
                        choices=list(CONTEXT_LENGTHS))
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    tokenizer = _load_tokenizer({"tokenizer": args.tokenizer})
    for task in ("passkey", "niah"):
        for length in args.lengths:
            print(write_jsonl(tokenizer, task, CONTEXT_LENGTHS[length], args.data_dir))


if __name__ == "__main__":
    main()
