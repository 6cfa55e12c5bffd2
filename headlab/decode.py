"""Greedy generation with each decode step replayed from a CUDA graph.

Batch-1 decoding is host-bound: a step of an 8B-shaped model costs milliseconds of Python and
kernel launches against a few of GPU time, and a patched attention call (plan, stats) adds its own
launches per layer. `greedy_decode` runs the prefill as usual, then captures one decode step —
the whole model forward, the argmax, the stats — in a CUDA graph and replays it, so every later
step costs one graph launch whatever the plan.

What makes the step replayable: the keys and values live in preallocated buffers of the final
length (`StepCache`), the step writes its token at a position held on the device, and a key mask
[B, 1, 1, L] (the prompt's padding, then one more key per step) hides the slots not written yet.
Token, position and step counters advance inside the graph; stats of each replay are copied into
per-step buffers inside the graph and handed to the session's `HeadStats` after the loop, one call
per step and layer as `generate()` records them (received attention cut to the keys the step saw).

Without a graph (CPU, or a session the graph cannot hold: see `graph_blocker`) the same step runs
eagerly — the same numbers, which is how the CPU tests check this module against `generate()`.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import torch

from headlab.attention import static_decode_steps
from headlab.errors import HeadlabError
from headlab.stats import HeadStats, LayerStats

if TYPE_CHECKING:
    from headlab.attention import PatchSession
    from headlab.model import HeadModel

log = logging.getLogger("headlab.decode")

_SAMPLING_SETTINGS = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "sequence_bias": None, "min_length": 0, "min_new_tokens": None, "exponential_decay_length_penalty": None,
}
"""generation_config settings that change greedy decoding (their neutral values); `greedy_decode`
implements none of them, so a model whose config sets one is refused rather than decoded differently."""
MIN_GRAPH_STEPS = 3
"""Fewer decode steps than this run eagerly even where a graph could hold them: the capture costs
about one eager step (30-40 ms each for the 8B shape on an H100, `phases_s` in
benchmarks/results/decode_graph_bench_h100.json), so the graph pays from the third step on."""


class StepCache:
    """Keys and values of every layer in buffers [B, Hkv, L, D] of the final length L, written at
    the device-side position `write_at` [1] — a cache a captured decode step can replay, since its
    tensors never move and no host value changes from step to step. Implements the part of
    transformers' `Cache` interface a decoder layer calls (`update`)."""

    is_compileable = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write_at: torch.Tensor) -> None:
        self.keys, self.values, self.write_at = keys, values, write_at
        self.length = 0
        """Slots written so far, kept on the host for `get_seq_length` (not read by the step)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's keys/values [B, Hkv, 1, D] at `write_at`; return the whole buffers [B, Hkv, L, D]."""
        self.keys[layer_idx].index_copy_(2, self.write_at, key_states)
        self.values[layer_idx].index_copy_(2, self.write_at, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def __len__(self) -> int:
        return len(self.keys)


def _prefill_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) [B, Hkv, T, D] per layer of the cache a prefill returned (transformers' `DynamicCache`)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def graph_blocker(model: "HeadModel", session: "PatchSession | None") -> str | None:
    """Why a decode step of `model` under `session` cannot be captured in a CUDA graph (None when it can).

    A captured step may not read a GPU value on the host or change shape: the calls that do are
    VAR plans, token-match stats, row plans and attribution captures, and any patched call the
    Triton kernels do not run (the reference kernel decides on the host). ACT's input-adaptive sink
    sets are held: a decode step's sets are bounded on the host (`LayerPlan.act_decode_sink_bound`).
    """
    if model.device.type != "cuda":
        return f"the model is on {model.device.type}; CUDA graphs need a GPU"
    if model.multi_device:
        return "the model is split over several devices"
    if session is None:
        return None
    if session.row_plans is not None:
        return "row plans (patched(row_plans=...)) group batch rows on the host"
    if session.capture is not None:
        return "an attribution capture records a single forward"
    request = session.request
    if request is not None and request.matches:
        return "token-match stats (StatsRequest.matches) run on the reference kernel"
    spec = model.spec
    for layer in range(spec.n_layers):
        plan = session.layer_plan(layer, model.device)
        if plan is None:
            continue
        if plan.has_var:
            return f"layer {layer}: VAR attention redistribution runs on the reference kernel"
    patched = not session.plan.is_empty() or (request is not None and request.wants_probabilities())
    if patched:
        from headlab.kernels import _kernel_for

        probe = torch.empty(1, spec.n_heads, 1, spec.head_dim, device=model.device, dtype=model.dtype)
        kv = torch.empty(1, spec.n_kv_heads, 2, spec.head_dim, device=model.device, dtype=model.dtype)
        name, why = _kernel_for(probe, kv, kv, None, None, None)
        if name != "triton":
            return f"the patched attention runs on the PyTorch reference here ({why})"
    return None


def generation_blocker(model: "HeadModel") -> str | None:
    """Why greedy_decode would not match `generate(do_sample=False)` for this model (None when it does)."""
    if model.spec.modality != "text":
        return "vision-language models decode through generate() (their forward takes pixel values)"
    config = model.model.config.get_text_config() if hasattr(model.model.config, "get_text_config") else model.model.config
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "layers with sliding-window attention keep a cache of another length"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding-window attention keeps a cache of another length"
    gen = getattr(model.model, "generation_config", None)
    if gen is not None:
        changed = [name for name, neutral in _SAMPLING_SETTINGS.items() if getattr(gen, name, neutral) not in (neutral, None)]
        if changed:
            return f"its generation_config sets {', '.join(changed)}, which change greedy decoding"
    return None


def _token_ids(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def greedy_decode(model: "HeadModel", input_ids: torch.Tensor, max_new_tokens: int, *,
                  attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
                  pad_token_id: int | None = None, cuda_graph: bool | None = None, check_every: int = 8) -> torch.Tensor:
    """Greedy continuation of `input_ids` [B, T] (left-padded when `attention_mask` [B, T] has
    zeros): the tokens [B, T + n] that `model.generate(input_ids, do_sample=False, ...)` returns,
    n ≤ max_new_tokens (fewer once every row has produced an end token, later tokens of a finished
    row are `pad_token_id`).

    Runs inside or outside `model.patched(plan, stats)`: the plan applies to every step and the
    stats are recorded per call as `generate()` records them. `cuda_graph`: None replays the decode
    step from a CUDA graph where it can be captured (`graph_blocker` says when not) and runs it
    eagerly otherwise; True requires that it can be (HeadlabError naming why not); False never uses
    one. Under MIN_GRAPH_STEPS decode steps run eagerly either way (the capture would cost more).
    `eos_token_id` defaults to the model's generation_config. The all-finished check reads the GPU
    every `check_every` steps.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise HeadlabError("input_ids must be a [batch, tokens] tensor with at least one token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise HeadlabError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise HeadlabError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise HeadlabError("attention_mask pads a row on the right; greedy decoding continues on the right, so pad on the "
                           "left (tokenizer.padding_side = 'left')")
    reason = generation_blocker(model)
    if reason:
        raise HeadlabError(f"greedy_decode cannot match generate() for {model.name}: {reason}. Use model.generate(...)")
    session = model._active
    blocker = graph_blocker(model, session)
    if cuda_graph and blocker:
        raise HeadlabError(f"cuda_graph=True, but this decode step cannot be captured: {blocker}. "
                           "Pass cuda_graph=None to decode step by step where it cannot")
    use_graph = cuda_graph is not False and blocker is None
    if cuda_graph is None and blocker and model.device.type == "cuda":
        log.info("greedy_decode: decode steps run eagerly (%s)", blocker)
    gen = getattr(model.model, "generation_config", None)
    eos = _token_ids(eos_token_id if eos_token_id is not None else getattr(gen, "eos_token_id", None))
    if pad_token_id is None:
        pad_token_id = getattr(gen, "pad_token_id", None)
    pad = int(pad_token_id if pad_token_id is not None else (eos[0] if eos else 0))
    with torch.no_grad():
        return _Decoder(model, session, input_ids.to(model.device), attention_mask, eos, pad).run(
            max_new_tokens, use_graph, check_every)


class _Decoder:
    """One greedy generation: the prefill, then the decode steps (eager or replayed)."""

    def __init__(self, model: "HeadModel", session: "PatchSession | None", ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, eos: list[int], pad: int) -> None:
        self.model, self.session, self.ids = model, session, ids
        # the last position's logits only: a 32k prefill's full logits would be GBs
        takes = inspect.signature(model.model.forward).parameters
        self.lm_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}
        self.mask2d = (torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device)).long()
        self.eos = torch.tensor(eos, device=ids.device, dtype=torch.long) if eos else None
        self.pad = pad

    def _mark(self, name: str) -> None:
        """With the logger at DEBUG: the seconds since the last mark, under `name` (a device sync
        each; nothing otherwise) — where a generation's time goes, logged at its end."""
        if not log.isEnabledFor(logging.DEBUG):
            return
        if self.ids.is_cuda:
            torch.cuda.synchronize(self.ids.device)
        now = time.perf_counter()
        self.timings[name] = round(now - self._last, 4)
        self._last = now

    def run(self, max_new: int, use_graph: bool, check_every: int) -> torch.Tensor:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()
        out = self._run(max_new, use_graph, check_every)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("greedy_decode seconds: %s", self.timings)
        return out

    def _run(self, max_new: int, use_graph: bool, check_every: int) -> torch.Tensor:
        B, T = self.ids.shape
        dev = self.ids.device
        position_ids = self.mask2d.cumsum(-1) - 1
        position_ids.masked_fill_(self.mask2d == 0, 0)  # as generate() numbers left padding (masked keys)
        out = self.model.model(input_ids=self.ids, attention_mask=self.mask2d, position_ids=position_ids, use_cache=True,
                               **self.lm_kwargs)
        first = out.logits[:, -1].argmax(-1)
        self._mark("prefill")
        self.tokens = torch.full((B, max_new), self.pad, dtype=torch.long, device=dev)
        self.tokens[:, 0] = first
        self.finished = self._is_eos(first)
        steps = max_new - 1
        if steps == 0 or self._all_finished():
            return torch.cat([self.ids, self.tokens[:, :1]], dim=1)
        L = T + steps  # keys the last decode step sees
        kv = _prefill_kv(out.past_key_values)
        del out
        keys, values = [], []
        for k, v in kv:
            kb = k.new_zeros(B, k.shape[1], L, k.shape[3])
            vb = v.new_zeros(B, v.shape[1], L, v.shape[3])
            kb[:, :, :T].copy_(k)
            vb[:, :, :T].copy_(v)
            keys.append(kb)
            values.append(vb)
        del kv
        self.write_at = torch.tensor([T], device=dev)
        self.step_index = torch.zeros(1, dtype=torch.long, device=dev)
        self.cache = StepCache(keys, values, self.write_at)
        self.cache.length = T
        self.key_mask = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=dev)
        self.key_mask[:, 0, 0, :T] = self.mask2d.bool()
        self.step_ids = first[:, None].clone()
        self.step_positions = position_ids[:, -1:] + 1
        self.T, self.steps = T, steps
        self._mark("static_cache")
        graphed = use_graph and steps >= MIN_GRAPH_STEPS
        done = self._graph_steps(steps, check_every) if graphed else self._eager_steps(steps, check_every)
        n_new = self._generated(done + 1)
        return torch.cat([self.ids, self.tokens[:, :n_new]], dim=1)

    # ---- one step --------------------------------------------------------------------------
    def _is_eos(self, token: torch.Tensor) -> torch.Tensor:
        if self.eos is None:
            return torch.zeros_like(token, dtype=torch.bool)
        return (token[:, None] == self.eos[None]).any(-1)

    def _all_finished(self) -> bool:
        return self.eos is not None and bool(self.finished.all())

    def _step(self) -> None:
        """One decode step on device tensors only: feed `step_ids` at `write_at`, pick the next token,
        advance the counters. Nothing here reads a GPU value on the host (it is what the graph holds)."""
        self.key_mask.index_fill_(3, self.write_at, True)
        with static_decode_steps():
            logits = self.model.model(input_ids=self.step_ids, attention_mask=self.key_mask,
                                      position_ids=self.step_positions, past_key_values=self.cache, use_cache=True,
                                      **self.lm_kwargs).logits[:, -1]
        nxt = logits.argmax(-1)
        if self.eos is not None:
            nxt = torch.where(self.finished, torch.full_like(nxt, self.pad), nxt)
            self.finished.logical_or_(self._is_eos(nxt))
        self.tokens.index_copy_(1, self.step_index + 1, nxt[:, None])
        self.step_ids.copy_(nxt[:, None])
        self.step_positions.add_(1)
        self.write_at.add_(1)
        self.step_index.add_(1)

    def _recording(self) -> "_Recording":
        return _Recording(self.session)

    # ---- eager -----------------------------------------------------------------------------
    def _eager_steps(self, steps: int, check_every: int) -> int:
        """Run the decode steps one by one; returns how many ran."""
        for s in range(steps):
            with self._recording() as rec:
                self._step()
            rec.commit(self, s)
            self.cache.length += 1
            if (s + 1) % check_every == 0 and self._all_finished():
                steps = s + 1
                break
        self._mark(f"eager_steps_{steps}")
        return steps

    # ---- graphed ---------------------------------------------------------------------------
    def _graph_steps(self, steps: int, check_every: int) -> int:
        """Step 0 eagerly on a side stream (it compiles kernels and builds every cache the step
        reads), capture step 1, replay it for the rest; returns how many steps ran."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._recording() as first:
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        first.commit(self, 0)
        self.cache.length += 1
        self._mark("first_step")
        if steps == 1:
            return 1
        buffers = first.allocate(steps)  # outside the capture: a buffer made inside would be re-zeroed by each replay
        seen = self.session.positions() if self.session is not None else None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                with self._recording() as captured:
                    self._step()
                captured.write(buffers, self.step_index - 1)  # the step index has advanced: its slot is one less
        except RuntimeError as exc:
            raise HeadlabError(f"capturing the decode step in a CUDA graph failed ({exc}); "
                               "pass cuda_graph=False to decode step by step") from exc
        finally:
            if self.session is not None:
                self.session.restore_positions(seen)  # the capture ran no step
        self._mark("capture")
        ran = 1
        try:
            while ran < steps:
                graph.replay()
                ran += 1
                if ran % check_every == 0 and self._all_finished():
                    break
            torch.cuda.current_stream().synchronize()
        finally:
            del graph
        self._mark(f"replays_{ran - 1}")
        captured.commit_replays(self, buffers, range(1, ran))
        self.cache.length += ran - 1
        if self.session is not None:
            self.session.skip_positions(ran - 1)
        return ran

    def _generated(self, produced: int) -> int:
        """How many new tokens generate() would return of the `produced`: up to the step at which
        every row had finished."""
        if self.eos is None:
            return produced
        hit = self._is_eos(self.tokens[:, :produced].reshape(-1)).view(self.tokens.shape[0], produced)
        if not bool(hit.any(-1).all()):
            return produced
        return int(hit.float().argmax(-1).max()) + 1


class _Recording:
    """Takes the stats the session records during one step (`session.stats` swapped for a fresh
    HeadStats), then hands them to the session's real stats with the step's query positions."""

    def __init__(self, session: "PatchSession | None") -> None:
        self.session = session
        self.calls: list[tuple[int, LayerStats]] = []

    def __enter__(self) -> "_Recording":
        if self.session is not None:
            self._real, self.session.stats = self.session.stats, HeadStats()
            self.session.stats.home = self._real.home
        return self

    def __exit__(self, *exc: object) -> None:
        if self.session is None:
            return
        step_stats, self.session.stats = self.session.stats, self._real
        for layer in step_stats.layers:  # one call per layer in a decode step
            for call in step_stats.calls(layer):
                self.calls.append((layer, call))

    def commit(self, decoder: _Decoder, step: int) -> None:
        """Add an eagerly run step's stats (received attention cut to the keys it saw)."""
        for layer, call in self.calls:
            self.session.stats.add(layer, _cut(call, decoder.T + step + 1))

    def allocate(self, steps: int) -> list[dict[str, Any]]:
        """Per recorded call, a zeroed [steps, ...] buffer for each of its stat tensors (by field name;
        dict fields — span and match masses — by field and key)."""
        out = []
        for _, call in self.calls:
            entry: dict[str, Any] = {}
            for f in fields(call):
                value = getattr(call, f.name)
                if f.name == "query_positions" or value is None:
                    continue
                if isinstance(value, dict):
                    entry[f.name] = {k: v.new_zeros((steps,) + tuple(v.shape)) for k, v in value.items()}
                elif isinstance(value, torch.Tensor):
                    entry[f.name] = value.new_zeros((steps,) + tuple(value.shape))
            out.append(entry)
        return out

    def write(self, buffers: list[dict[str, Any]], slot: torch.Tensor) -> None:
        """Copy this step's stat tensors into `buffers` at the device-side index `slot` [1] (inside
        the capture: each replay writes its own slot)."""
        if len(buffers) != len(self.calls):
            raise HeadlabError(f"the captured decode step recorded {len(self.calls)} stat calls, the step before "
                               f"{len(buffers)}; pass cuda_graph=False")
        for (_, call), entry in zip(self.calls, buffers):
            for name, buf in entry.items():
                value = getattr(call, name)
                if isinstance(buf, dict):
                    for k, b in buf.items():
                        b.index_copy_(0, slot, value[k].unsqueeze(0))
                else:
                    buf.index_copy_(0, slot, value.unsqueeze(0))

    def commit_replays(self, decoder: _Decoder, buffers: list[dict[str, Any]], steps: range) -> None:
        """Add the stats of replayed steps `steps`, in step order, one call per layer each."""
        if self.session is None:
            return
        for s in steps:
            for (layer, template), entry in zip(self.calls, buffers):
                values = {name: ({k: v[s] for k, v in value.items()} if isinstance(value, dict) else value[s])
                          for name, value in entry.items()}
                # captured at step 1: the positions of step s are s − 1 further on
                call = LayerStats(query_positions=template.query_positions + (s - 1), **values)
                self.session.stats.add(layer, _cut(call, decoder.T + s + 1))


def _cut(call: LayerStats, n_keys: int) -> LayerStats:
    """The call's stats with received attention over its first `n_keys` keys (the static cache's
    later slots are not keys of this step: generate() never had them)."""
    if call.received is None:
        return call
    out = LayerStats(**{f.name: getattr(call, f.name) for f in fields(call)})
    out.received = call.received[..., :n_keys]
    if call.received_count is not None:
        out.received_count = call.received_count[..., :n_keys]
    return out


__all__ = ["StepCache", "generation_blocker", "graph_blocker", "greedy_decode"]
