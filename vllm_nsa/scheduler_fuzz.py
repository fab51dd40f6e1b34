"""Scheduler fuzzing (issue #18): NSA's scorer entries under preemption, aborts,
prefix-cache hits, evictions and page reuse, in vLLM's own engine step loop. The scenario
of tests/test_scheduler_fuzz.py (CPU, CI) and benchmarks/cuda_scheduler_check.py (CUDA:
Triton kernels, CUDA graphs), shared here.

NSA keeps state vLLM's other backends do not: its selection scorer's entries — compressed
entry i (raw tokens [i*d, i*d + l)), or under the "bounds" scorer the key min/max of
selection block j (raw tokens [j*l', j*l' + l')) — are written once, into the page of their
last raw token, in the step that writes that token. For each model (a dense Llama served
with attention_backend="NSA": a dense model's default "bounds" scorer; and an NSA
checkpoint: the compressed scorer) and each seed, >= 200 requests with random prompt
lengths (crossing compression windows, selection blocks and pages), random shared
prefixes, random arrivals and random aborts (waiting, mid-prefill, mid-decode) run through
an in-process engine whose KV cache is so small that vLLM preempts, evicts cached pages
and reuses them (`run_fuzz`).

Checked, per seed (`compare`, `verdict`):
- every finished request's greedy tokens and logprobs equal the same request run alone in
  an engine without pressure (`run_alone`: no prefix cache, no chunking, one request at a
  time); an aborted request's tokens are a prefix of its reference; tokens past a position
  where the reference's top-n block selection was a near-tie are not compared (see
  SELECTION_TIE);
- every page vLLM hands out is first filled with NaN (raw and scorer parts), as is
  the whole cache at the start, so a compressed entry read but not written by its
  request (stale from an earlier holder) poisons the output; every logprob is finite;
- an audit of every step's attention metadata (`KVAudit`): each request emits exactly the
  entries its new tokens complete, continuing where its previous step stopped; after a
  preemption or a new admission it restarts at a page-aligned prefix-cache hit whose pages
  hold its earlier entries; every entry a request's attention read (its own or a cached
  page's), in every layer, is the mean (bounds: the min and max) of its raw window; no
  step writes (raw or scorer entries) into a page that was prefix-cached before the step;
  a cached page's bytes never change while it stays cached;
- the engine ends with every KV block free.

The hooks go through `patch.setattr(target, name, value)`: pytest's monkeypatch, or
`Patches` outside pytest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections import deque
from unittest import mock

import torch


def parse_seeds(text: str) -> list[int]:
    """"0-9" or "3,7" or "0-2,5" -> the seeds."""
    seeds = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    return seeds


NUM_REQUESTS = 200            # per seed
LOGPROB_TOLERANCE = 1e-3      # as tests/test_nsa_engine.py
# Block scores closer than this are a near-tie: the references mark where one decided a
# selection. The tiny Llama's merged mode has exact float32 ties between two blocks'
# scores in ~1.5% of prompts (nonzero gaps seen were >= 8e-6); batch-dependent rounding
# (~1e-7) may break such a tie the other way (llama seed 18, request 84: same tokens,
# last logprob off by 0.2).
SELECTION_TIE = 1e-6
MAX_PROMPT = 360              # > 5 selection blocks of 64 / 11 pages of 32
MAX_NEW_TOKENS = 16
MAX_MODEL_LEN = 512
# The pressured engine: 8 requests of up to 12 pages each share 23 pages, prefill chunks
# of at most 128 tokens. vLLM admits a request when its first chunk fits, not its whole
# prompt (scheduler_reserve_full_isl=False), so running requests outgrow the pool and get
# preempted dozens of times per run instead of a few.
FUZZ_ENGINE = dict(max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_num_batched_tokens=128,
                   enable_chunked_prefill=True, enable_prefix_caching=True,
                   num_gpu_blocks_override=24, scheduler_reserve_full_isl=False)
# The reference engine: every request alone, whole-prompt prefill, ample pages, no cache.
REFERENCE_ENGINE = dict(max_model_len=MAX_MODEL_LEN, max_num_seqs=1,
                        max_num_batched_tokens=MAX_MODEL_LEN, enable_prefix_caching=False,
                        num_gpu_blocks_override=64)

# The dense Llama's NSA parameters (as tests/test_engine_backend.py): windows of 32 with
# stride 16, selection blocks of 64 (two pages), a 32-token window.
SPARSE = {"compress_block": 32, "compress_stride": 16, "select_block": 64,
          "select_topk": 4, "window": 32}
MODELS = ["llama-as-nsa", "nsa-checkpoint"]


# ------------------------------------------------------------------ the request stream
@dataclasses.dataclass
class FuzzRequest:
    key: str
    prompt: list[int]
    max_tokens: int
    arrival: int                  # engine step before which it is added
    abort: str | None = None      # None, "waiting", "prefill" or "decode"
    abort_after: int = 0          # "decode": abort once this many tokens came back


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]         # the tiny tokenizer's byte ids


def _length(rng: random.Random, low: int, high: int) -> int:
    """Uniform, or next to a multiple of 16 (compression stride, page and block edges)."""
    if rng.random() < 0.4:
        edge = 16 * rng.randint(max(1, low // 16), max(1, high // 16))
        return min(high, max(low, edge + rng.choice((-1, 0, 1))))
    return rng.randint(low, high)


def make_requests(seed: int, num: int = NUM_REQUESTS) -> list[FuzzRequest]:
    rng = random.Random(seed)
    # Shared prefixes: some page-aligned, some not, some longer than a prefill chunk.
    prefixes = [_tokens(rng, n) for n in (32, 64, 100, 160, 230, _length(rng, 20, 300))]
    requests: list[FuzzRequest] = []
    arrival = 0
    for i in range(num):
        kind = rng.random()
        if kind < 0.45:                                   # shared prefix + own suffix
            prefix = rng.choice(prefixes)
            prompt = prefix + _tokens(rng, _length(rng, 1, MAX_PROMPT - len(prefix)))
        elif kind < 0.55 and requests:                    # an earlier prompt again
            prompt = list(rng.choice(requests).prompt)
        else:
            prompt = _tokens(rng, _length(rng, 1, MAX_PROMPT))
        max_tokens = rng.randint(1, MAX_NEW_TOKENS)
        request = FuzzRequest(f"s{seed}-{i}", prompt, max_tokens, arrival)
        draw = rng.random()
        if draw < 0.03:
            request.abort = "waiting"
        elif draw < 0.10 and len(prompt) > FUZZ_ENGINE["max_num_batched_tokens"]:
            request.abort = "prefill"                     # prompt needs several chunks
        elif draw < 0.17 and max_tokens > 1:
            request.abort = "decode"
            request.abort_after = rng.randint(1, max_tokens - 1)
        requests.append(request)
        arrival += rng.choice((0, 0, 1, 1, 1, 2, 3))      # bursts and gaps
    return requests


def sampling_params(max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True,
                          detokenize=False, output_kind=RequestOutputKind.DELTA)


@dataclasses.dataclass
class Result:
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    aborted: str | None = None        # phase when aborted: waiting, prefill or decode
    # A reference only: the first position whose top-n block selection had two blocks
    # within SELECTION_TIE of each other. Run elsewhere (another batch, other float
    # rounding), such a choice may go the other way: tokens from there on are not compared.
    tie_position: float = math.inf

    def add(self, output) -> None:
        completion = output.outputs[0]
        self.tokens += completion.token_ids
        self.logprobs += [step[token].logprob
                          for step, token in zip(completion.logprobs, completion.token_ids)]
        if output.finished:
            self.finish_reason = completion.finish_reason

    def to_json(self) -> dict:
        return dataclasses.asdict(self)          # json writes inf as Infinity and reads it

    @classmethod
    def from_json(cls, data: dict) -> Result:
        return cls(**data)


def selection_margins(group_scores, q_positions, config) -> torch.Tensor:
    """Per query, the smallest gap (over KV heads) between the weakest block NSA's top-n
    selection chose freely and the strongest it left out (inf where nothing was free to
    choose): the replica of `reference.rank_blocks`' ranking of group scores [Q, H, NB],
    forced blocks excluded."""
    num_q, num_kv_heads, num_blocks = group_scores.shape
    scores = group_scores.double().cpu()
    blocks = torch.arange(num_blocks).view(1, -1)
    current = (q_positions.long().cpu() // config.select_block).view(-1, 1)
    candidate = blocks <= current
    forced = candidate & ((blocks < config.init_blocks)
                          | (blocks > current - config.local_blocks))
    free = (candidate & ~forced)[:, None, :]
    slots = (config.select_topk - forced.sum(-1)).clamp(min=0)           # [Q]
    ranked = scores.masked_fill(~free, -math.inf).sort(dim=-1, descending=True).values
    ranked = torch.nn.functional.pad(ranked, (0, config.select_topk), value=-math.inf)
    index = slots.clamp(min=1).view(-1, 1, 1).expand(-1, num_kv_heads, 1)
    gap = torch.gather(ranked, -1, index - 1) - torch.gather(ranked, -1, index)
    gap = gap.squeeze(-1).nan_to_num(nan=math.inf, posinf=math.inf)
    gap[slots == 0] = math.inf
    return gap.min(dim=1).values


def run_alone(engine, requests: list[FuzzRequest], counts: dict | None = None
              ) -> dict[tuple, Result]:
    """Each distinct prompt alone (max_num_seqs=1 runs them one after another) for the
    most tokens any request asks of it: greedy, so a request wanting fewer gets a prefix.
    Keyed by the prompt. Each result also notes the first position where NSA's block
    selection was a near-tie (see `Result.tie_position`).

    The torch path ranks every selection through `reference.rank_blocks`, which this
    watches. On CUDA each Triton selection stage also runs its torch twin on the same
    inputs, for the ranking to watch: the attention must then run eagerly in every step
    (no full CUDA graphs; piecewise ones are fine). counts, when given, gets
    "watched_selections": the rankings seen."""
    import vllm_nsa.kernels.reference as reference

    longest: dict[tuple, int] = {}
    for request in requests:
        prompt = tuple(request.prompt)
        longest[prompt] = max(longest.get(prompt, 0), request.max_tokens)
    results, keys = {}, {}
    for i, (prompt, max_tokens) in enumerate(longest.items()):
        keys[str(i)] = prompt
        results[prompt] = Result()
        engine.add_request(str(i), {"prompt_token_ids": list(prompt)},
                           sampling_params(max_tokens))
    internals = EngineInternals(engine)
    scheduler = internals.scheduler
    watched = dict(watched_selections=0)
    rank_blocks = reference.rank_blocks       # every scorer's top-n goes through it

    def watch_ties(group_scores, q_positions, config):
        (running,) = scheduler.running               # one request at a time
        watched["watched_selections"] += 1
        margins = selection_margins(group_scores, q_positions, config)
        near = q_positions.cpu()[margins < SELECTION_TIE]
        if near.numel():
            result = results[keys[running.request_id.rsplit("-", 1)[0]]]
            result.tie_position = min(result.tie_position, int(near.min()))
        return rank_blocks(group_scores, q_positions, config)

    with Patches() as patch:
        patch.setattr(reference, "rank_blocks", watch_ties)
        if internals.kv_caches[0].is_cuda:
            from vllm_nsa.kernels import paged, triton
            for stage in ("select", "select_bounds"):
                patch.setattr(triton, stage, _beside_twin(getattr(triton, stage),
                                                          getattr(paged, stage)))
        while engine.has_unfinished_requests():
            for output in engine.step():
                results[keys[output.request_id]].add(output)
    if counts is not None:
        counts.update(watched)
    return results


def _beside_twin(stage, twin):
    """A Triton stage that first runs its torch twin (same signature) on its inputs, for
    the twin's ranking to be watched; returns the Triton stage's result."""
    def run(*args, **kwargs):
        twin(*args, **kwargs)
        return stage(*args, **kwargs)
    return run


# ------------------------------------------------------------------ the audit
def num_entries(config, num_tokens: int) -> int:
    """Scorer entries complete among num_tokens tokens (compressed entries or blocks)."""
    from vllm_nsa.backend import emission_geometry

    span, stride = emission_geometry(config)
    return (num_tokens - span) // stride + 1 if num_tokens >= span else 0


def entry_end(config, index):
    """Last raw token of scorer entry `index`: the token whose page stores it."""
    from vllm_nsa.backend import emission_geometry

    span, stride = emission_geometry(config)
    return index * stride + span - 1


class KVAudit:
    """Hooks on the block pool, the scheduler and NSA's metadata builder that poison every
    page handed out, count preemptions, evictions and reused pages, and check every step's
    compressed-entry emission and page writes (see the module docstring)."""

    def __init__(self, internals: EngineInternals, patch):
        from vllm_nsa.backend import NSAMetadataBuilder

        self.internals = internals
        self.pool = internals.block_pool
        self.page = internals.page_size
        self.counts = dict(preemptions=0, evictions=0, pages_handed_out=0, reused_pages=0,
                           prefix_hits=0, prefix_hit_tokens=0, resumed_with_hit=0, steps=0,
                           entries_emitted=0, mixed_steps=0, decode_steps=0)
        self.config = None
        self.ever_handed_out: set[int] = set()
        self.reused_holdings: set[int] = set()    # pages whose current holder is not the first
        self.done: dict[str, int] = {}           # tokens in each request's pages so far
        self.preempted: set[str] = set()
        self.frozen: dict[int, tuple] = {}        # cached page -> (its hash, its bits)
        self.rows = None
        self._layer_caches = None
        self.errors: list[str] = []
        self.corrupt_emission = None              # test hook: edits the metadata the backend gets

        pool, scheduler = self.pool, internals.scheduler
        get_new_blocks, evict = pool.get_new_blocks, pool._maybe_evict_cached_block
        preempt = scheduler._preempt_request

        def get_new_blocks_hook(num_blocks):
            blocks = get_new_blocks(num_blocks)
            ids = {block.block_id for block in blocks}
            self.counts["pages_handed_out"] += len(ids)
            self.counts["reused_pages"] += len(ids & self.ever_handed_out)
            self.reused_holdings -= ids
            self.reused_holdings |= ids & self.ever_handed_out
            self.ever_handed_out |= ids
            self.handed_out_now |= ids
            internals.poison(ids)                 # whatever the last holder left: NaN
            return blocks

        def evict_hook(block):
            evicted = evict(block)
            self.counts["evictions"] += bool(evicted)
            return evicted

        def preempt_hook(request, *args, **kwargs):
            self.counts["preemptions"] += 1
            self.preempted.add(request.request_id)
            return preempt(request, *args, **kwargs)

        patch.setattr(pool, "get_new_blocks", get_new_blocks_hook)
        patch.setattr(pool, "_maybe_evict_cached_block", evict_hook)
        patch.setattr(scheduler, "_preempt_request", preempt_hook)

        # The step's requests in batch-row order: vLLM's V1 model runner (CPU) keeps them
        # in its persistent input batch, the V2 one (CUDA) in the batch it prepares.
        runner = internals.runner
        self.batch_req_ids = None
        if not hasattr(runner, "input_batch"):
            prepare_inputs = runner.prepare_inputs

            def prepare_inputs_hook(*args, **kwargs):
                batch = prepare_inputs(*args, **kwargs)
                self.batch_req_ids = list(batch.req_ids)
                return batch

            patch.setattr(runner, "prepare_inputs", prepare_inputs_hook)

        build = NSAMetadataBuilder.build
        audit = self

        def build_hook(builder, *args, **kwargs):
            metadata = build(builder, *args, **kwargs)
            if audit.rows is None:                # the step's first build (one KV group)
                audit.record(builder.config, metadata)
            if audit.corrupt_emission is not None:
                metadata = audit.corrupt_emission(audit, metadata)
            return metadata

        patch.setattr(NSAMetadataBuilder, "build", build_hook)
        self.handed_out_now: set[int] = set()

    # -- per step
    def before_step(self) -> None:
        self.cached_before = {block.block_id for block in self.pool.blocks
                              if block.block_hash is not None}
        self.handed_out_now = set()
        self.rows = None

    def record(self, config, md) -> None:
        """Rows of this step: (request id, tokens before, tokens after, its pages, the
        compressed indices emitted for it)."""
        self.config = config
        num_reqs = md.seq_lens.shape[0]
        req_ids = (self.batch_req_ids if self.batch_req_ids is not None
                   else self.internals.runner.input_batch.req_ids)[:num_reqs]
        query_lens = (md.query_start_loc[1:] - md.query_start_loc[:-1]).tolist()
        seq_lens = md.seq_lens.tolist()
        valid = md.emit_req >= 0
        emit_req, emit_index = md.emit_req[valid].tolist(), md.emit_index[valid].tolist()
        self.rows = []
        for r, req_id in enumerate(req_ids):
            emitted = [i for row, i in zip(emit_req, emit_index) if row == r]
            num_pages = -(-seq_lens[r] // self.page)
            pages = md.block_table[r, :num_pages].tolist()
            self.rows.append((req_id, seq_lens[r] - query_lens[r], seq_lens[r], pages, emitted))
        self.counts["decode_steps" if md.max_query_len == 1 else "mixed_steps"] += 1

    def after_step(self) -> None:
        self.counts["steps"] += 1
        if self.rows is None:
            return
        config, page = self.config, self.page
        protected = self.cached_before - self.handed_out_now
        for req_id, before, after, pages, emitted in self.rows:
            where = f"step {self.counts['steps']}, request {req_id} ({before} -> {after} tokens)"
            request = self.internals.scheduler.requests.get(req_id)
            if request is not None and request.num_computed_tokens != after:
                self.errors.append(f"{where}: the scheduler has {request.num_computed_tokens}")
            expected = list(range(num_entries(config, before), num_entries(config, after)))
            if emitted != expected:
                self.errors.append(f"{where}: emitted entries {emitted}, needs {expected}")
            self.counts["entries_emitted"] += len(emitted)
            if req_id not in self.done or req_id in self.preempted:
                # (Re)admitted: it may start only at a page-aligned prefix-cache hit, whose
                # pages carry the entries that end in them.
                if before % page:
                    self.errors.append(f"{where}: starts at {before}, not at a page edge")
                hit_pages = pages[:before // page]
                uncached = [p for p in hit_pages if self.pool.blocks[p].block_hash is None]
                if uncached:
                    self.errors.append(f"{where}: starts on uncached pages {uncached}")
                if before:
                    self.counts["prefix_hits"] += 1
                    self.counts["prefix_hit_tokens"] += before
                    self.counts["resumed_with_hit"] += req_id in self.preempted
                self.preempted.discard(req_id)
            elif before != self.done[req_id]:
                self.errors.append(f"{where}: its previous step ended at {self.done[req_id]}")
            self.done[req_id] = after
            written = {pages[p // page] for p in range(before, after)}
            written |= {pages[entry_end(config, i) // page] for i in emitted}
            if written & protected:
                self.errors.append(f"{where}: writes into cached pages {written & protected}")
            self.check_entries(where, after, pages)
        self.check_cached_pages_unchanged()

    def check_entries(self, where: str, num_tokens: int, pages: list[int]) -> None:
        """Every scorer entry the request's attention read in this step (its own and those
        of the prefix-cache pages it started on), in every layer, is the mean (bounds: the
        key min and max) of its raw window, read from the request's pages: not NaN (a
        page's poison), not stale."""
        from vllm_nsa.backend import emission_geometry

        config, page = self.config, self.page
        count = num_entries(config, num_tokens)
        if not count:
            return
        span, stride = emission_geometry(config)
        device = self.internals.kv_caches[0].device
        index = torch.arange(count, device=device)
        window = (index * stride).unsqueeze(1) + torch.arange(span, device=device)  # [E, span]
        table = torch.tensor(pages, device=device)
        last = entry_end(config, index)
        raw_at = (table[window // page], window % page)
        slot_width = config.select_block if config.uses_bounds else stride
        entry_at = (table[last // page], (last % page) // slot_width)
        for layer, caches in enumerate(self.layer_caches()):
            key, value, cmp_key, cmp_value = caches
            if config.uses_bounds:
                checks = (("K min", key, cmp_key, lambda x: x.amin(dim=1)),
                          ("K max", key, cmp_value, lambda x: x.amax(dim=1)))
            else:
                checks = (("K", key, cmp_key, lambda x: x.mean(dim=1)),
                          ("V", value, cmp_value, lambda x: x.mean(dim=1)))
            for name, raw, compressed, summary in checks:
                expected = summary(raw[raw_at].float())
                stored = compressed[entry_at].float()
                if not torch.allclose(stored, expected, rtol=1e-5, atol=1e-6):
                    bad = (~torch.isclose(stored, expected, rtol=1e-5, atol=1e-6)).flatten(1)
                    entries = bad.any(1).nonzero().flatten().tolist()
                    self.errors.append(f"{where}: layer {layer} scorer entries' {name} of "
                                       f"entries {entries} is not the summary of their raw "
                                       f"windows")
                    return

    def layer_caches(self):
        """Per layer, NSA's (key, value, cmp_key, cmp_value) views of the page buffer."""
        if self._layer_caches is None:
            from vllm_nsa.backend import split_kv_cache

            self._layer_caches = [split_kv_cache(kv, kv.shape[-1] // 2, self.config)
                                  for kv in self.internals.kv_caches]
        return self._layer_caches

    def check_cached_pages_unchanged(self) -> None:
        cached = {block.block_id: block.block_hash for block in self.pool.blocks
                  if block.block_hash is not None}
        for block_id in list(self.frozen):
            # Evicted, or evicted, handed out and cached again under the same hash in this
            # step (a request recomputing that page: equal up to batch-order rounding).
            if (cached.get(block_id) != self.frozen[block_id][0]
                    or block_id in self.handed_out_now):
                del self.frozen[block_id]
        for block_id, block_hash in cached.items():
            bits = self.internals.page_bits(block_id)
            if block_id not in self.frozen:
                self.frozen[block_id] = (block_hash, bits)
            elif not torch.equal(bits, self.frozen[block_id][1]):
                self.errors.append(f"step {self.counts['steps']}: cached page {block_id} "
                                   f"changed while cached")
                self.frozen[block_id] = (block_hash, bits)


# ------------------------------------------------------------------ one fuzz run
def run_fuzz(engine, internals: EngineInternals, requests: list[FuzzRequest], patch,
             corrupt_emission=None):
    """Drive the engine's step loop through the request stream, audited (hooks installed
    through `patch`, which the caller undoes); returns (results by request key, counts,
    audit errors)."""
    from vllm.v1.request import RequestStatus

    assert not engine.has_unfinished_requests()
    assert internals.block_pool.reset_prefix_cache()        # every seed starts cold
    internals.poison()                                       # and with a NaN cache
    audit = KVAudit(internals, patch)
    audit.corrupt_emission = corrupt_emission
    pending = deque(requests)
    results: dict[str, Result] = {}
    internal_ids: dict[str, str] = {}
    live: dict[str, FuzzRequest] = {}
    aborts = dict(waiting=0, prefill=0, decode=0)
    step = 0
    try:
        while pending or engine.has_unfinished_requests():
            while pending and pending[0].arrival <= step:
                request = pending.popleft()
                internal_ids[request.key] = engine.add_request(
                    request.key, {"prompt_token_ids": request.prompt},
                    sampling_params(request.max_tokens))
                results[request.key] = Result()
                live[request.key] = request
            for key, request in list(live.items()):
                if request.abort is None or results[key].finish_reason is not None:
                    continue
                state = internals.scheduler.requests.get(internal_ids[key])
                if state is None:
                    continue
                waiting = state.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
                tokens = len(results[key].tokens)
                if tokens:
                    phase = "decode"
                elif waiting and state.num_computed_tokens == 0:
                    phase = "waiting"
                else:
                    phase = "prefill"
                if (request.abort == "waiting"
                        or (request.abort == "prefill"
                            and 0 < state.num_computed_tokens < state.num_prompt_tokens)
                        or (request.abort == "decode" and tokens >= request.abort_after)):
                    engine.abort_request([internal_ids[key]], internal=True)
                    results[key].aborted = phase
                    aborts[phase] += 1
                    del live[key]
            audit.before_step()
            outputs = engine.step()
            audit.after_step()
            for output in outputs:
                results[output.request_id].add(output)
                if output.finished:
                    live.pop(output.request_id, None)
            step += 1
            assert step < 50 * len(requests), "the fuzz run does not finish"
    finally:
        # Leave the engine empty whatever happened (the next seed needs a free pool).
        while engine.has_unfinished_requests():
            engine.abort_request(list(internal_ids.values()), internal=True)
            engine.step()
        audit.corrupt_emission = None
    counts = dict(requests=len(requests), **audit.counts,
                  **{f"aborted_{phase}": n for phase, n in aborts.items()},
                  finished=sum(r.finish_reason == "length" for r in results.values()))
    counts["free_blocks_at_end"] = internals.num_free_blocks()
    counts["blocks"] = internals.num_blocks
    counts["blocks_held_at_end"] = internals.blocks_held()
    counts["scheduler_requests_at_end"] = len(internals.scheduler.requests)
    return results, counts, audit.errors


def compare(requests, results, references) -> tuple[list[str], float, int]:
    """Mismatches against the references, the largest |logprob difference|, and how many
    requests were compared only up to a near-tie of their reference's block selection."""
    problems, worst, excused = [], 0.0, 0
    for request in requests:
        got, ref = results[request.key], references[tuple(request.prompt)]
        if not all(math.isfinite(x) for x in got.logprobs):
            problems.append(f"{request.key}: non-finite logprobs {got.logprobs}")
            continue
        if got.aborted is None:
            if got.finish_reason != "length" or len(got.tokens) != request.max_tokens:
                problems.append(f"{request.key}: finished {got.finish_reason!r} with "
                                f"{len(got.tokens)}/{request.max_tokens} tokens")
        # Generated token j comes from position len(prompt) - 1 + j.
        comparable = len(got.tokens)
        if ref.tie_position < len(request.prompt) - 1 + comparable:
            comparable = max(0, int(ref.tie_position) - len(request.prompt) + 1)
            excused += 1
        tokens, expected = got.tokens[:comparable], ref.tokens[:comparable]
        if tokens != expected:
            problems.append(f"{request.key} ({len(request.prompt)}-token prompt, aborted="
                            f"{got.aborted}): tokens {tokens} != alone {expected}")
            continue
        if tokens:
            diff = max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs[:comparable]))
            worst = max(worst, diff)
            if diff > LOGPROB_TOLERANCE:
                problems.append(f"{request.key}: |logprob diff| {diff:.2e}")
    return problems, worst, excused




def build_model(name: str, directory: str) -> dict:
    if name == "llama-as-nsa":
        from vllm_nsa.tiny import build_tiny_llama
        build_tiny_llama(directory)
        return dict(attention_backend="NSA", additional_config={"nsa": SPARSE})
    from vllm_nsa.tiny import build_tiny_nsa
    build_tiny_nsa(directory, num_heads=4, num_kv_heads=1, seed=5)
    return {}



# ------------------------------------------------------------------ verdict
# What every full-length run must exercise (a run of a few dozen requests may miss some).
EXERCISED = ("preemptions", "evictions", "reused_pages", "prefix_hits", "resumed_with_hit",
             "aborted_waiting", "aborted_prefill", "aborted_decode")


def verdict(counts: dict, errors: list[str], problems: list[str], excused: int
            ) -> tuple[list[str], list[str]]:
    """(failures, what the run did not exercise) of one run: `run_fuzz`'s counts and audit
    errors, `compare`'s mismatches and near-tie count."""
    failures = []
    if errors:
        failures.append(f"{len(errors)} audit errors, first: {errors[:5]}")
    if problems:
        failures.append(f"{len(problems)} mismatches, first: {problems[:5]}")
    if excused > counts["requests"] // 10:
        failures.append(f"{excused} requests hit selection near-ties")
    # The engine ends empty: every block free, no request left anywhere.
    if (counts["free_blocks_at_end"] != counts["blocks"] or counts["blocks_held_at_end"]
            or counts["scheduler_requests_at_end"]):
        failures.append(f"the engine did not end empty: {counts['free_blocks_at_end']} of "
                        f"{counts['blocks']} blocks free, {counts['blocks_held_at_end']} "
                        f"held, {counts['scheduler_requests_at_end']} requests left")
    return failures, [what for what in EXERCISED if not counts[what]]


# ------------------------------------------------------------------ engine access
class Patches(contextlib.ExitStack):
    """pytest monkeypatch's `setattr` for scripts: undone when the context exits."""

    def setattr(self, target, name: str, value) -> None:
        self.enter_context(mock.patch.object(target, name, value))


class EngineInternals:
    """An in-process engine's (`vllm_nsa.engine_runner.start_inprocess_engine`) scheduler,
    block pool, model runner and per-layer KV caches."""

    def __init__(self, engine):
        core = engine.engine_core.engine_core
        self.scheduler = core.scheduler
        self.kv_cache_manager = self.scheduler.kv_cache_manager
        self.block_pool = self.kv_cache_manager.block_pool
        self.runner = core.model_executor.driver_worker.worker.model_runner
        self.kv_caches = list(self.runner.kv_caches)     # one [B, H, N, C] view per layer
        self.page_size = engine.vllm_config.cache_config.block_size

    @property
    def num_blocks(self):
        """Usable blocks (the pool's block 0 is vLLM's null block)."""
        return self.block_pool.num_gpu_blocks - 1

    def num_free_blocks(self):
        return self.block_pool.get_num_free_blocks()

    def blocks_held(self):
        """Blocks still listed in any request's block table."""
        return sum(len(blocks) for manager in self.kv_cache_manager.coordinator.single_type_managers
                   for blocks in manager.req_to_blocks.values())

    def whole_pages(self):
        """Per layer, a [num_blocks, page elements] view of each page as allocated, i.e. the
        raw K/V plus whatever a backend padded the page with (NSA's compressed entries)."""
        pages = []
        for kv in self.kv_caches:
            page = kv.stride(0)
            pages.append(torch.as_strided(kv, (kv.shape[0], page), (page, 1),
                                          kv.storage_offset()))
        return pages

    def poison(self, block_ids=None, value=float("nan")):
        """Fill whole pages (all of them when block_ids is None) with `value` in every layer."""
        for pages in self.whole_pages():
            if block_ids is None:
                pages.fill_(value)
            elif block_ids:
                pages[torch.tensor(sorted(block_ids), device=pages.device)] = value

    def page_bits(self, block_id):
        """A page's exact bits in every layer (NaN-safe comparison of page contents)."""
        return torch.stack([pages[block_id].view(torch.uint8) for pages in self.whole_pages()])
