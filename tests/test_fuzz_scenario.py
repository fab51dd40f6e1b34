"""The scheduler fuzz's engine-free parts (`vllm_nsa.scheduler_fuzz`), which the CPU test
and the CUDA check (benchmarks/cuda_scheduler_check.py) share: fast, no engine."""
import json
import math

from vllm_nsa import scheduler_fuzz as fuzz


def test_request_streams_are_seeded_and_extend():
    assert fuzz.parse_seeds("0-2,5") == [0, 1, 2, 5]
    stream = fuzz.make_requests(3, 80)
    assert stream == fuzz.make_requests(3, 80)
    # A shorter stream is the longer one's start (the negative control and --smoke rely on
    # the references of the long one).
    assert fuzz.make_requests(3, 30) == stream[:30]
    assert all(1 <= len(r.prompt) <= fuzz.MAX_PROMPT for r in stream)
    assert {r.abort for r in stream} == {None, "waiting", "prefill", "decode"}


def test_results_cross_processes_as_json():
    result = fuzz.Result([5, 7], [-0.5, -1.25], "length")
    back = fuzz.Result.from_json(json.loads(json.dumps(result.to_json())))
    assert back == result and math.isinf(back.tie_position)


def test_verdict():
    counts = dict(requests=20, free_blocks_at_end=23, blocks=23, blocks_held_at_end=0,
                  scheduler_requests_at_end=0, **{what: 1 for what in fuzz.EXERCISED})
    assert fuzz.verdict(counts, [], [], excused=2) == ([], [])
    counts |= dict(free_blocks_at_end=22, preemptions=0)
    failures, unexercised = fuzz.verdict(counts, ["audit"], ["mismatch"], excused=3)
    assert len(failures) == 4 and unexercised == ["preemptions"]


def test_patches_are_undone():
    class Target:
        value = 1

    with fuzz.Patches() as patch:
        patch.setattr(Target, "value", 2)
        assert Target.value == 2
    assert Target.value == 1
