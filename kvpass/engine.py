"""The decode engine: every decode step of a kvpass-compiled model replayed from one CUDA graph.

`kvpass.compile` puts a `DecodeEngine` where `model.compile` put the compiled call, so HF `generate` (or any caller
passing a kvpass cache) reaches it unchanged. A call that decodes one token per row over this runtime's kvpass
cache is a *decode step*; everything else (prefill, calls without a kvpass cache) goes to the compiled call as is.

A decode step's graph holds `kvpass::decode_attention` ops, whose only per-step inputs are device tensors the
runtime owns (the slot of the new token, the validity of each slot): the engine sets them on the host before the
step (`Runtime.begin_decode_step`) and advances the host's counts after it. On CUDA the step is recorded once per
(batch size, step arguments) after two eager warm-up steps, then replayed: no Python runs per layer, and nothing
recompiles or re-records as the context grows. A store reallocated to grow (`Runtime.pool_version`) drops the
recordings, which are made anew and counted in the report. HF's growing 2-D attention mask and `cache_position`
are not passed to the step: padding lives in the runtime's per-slot validity (from the prefill's mask) and the
positions come from `position_ids`.
"""
from __future__ import annotations

import collections
import copy
import dataclasses

import torch

from .cache import KVCache

# Step arguments a recorded step may take besides input_ids, position_ids and the cache; each must be the same
# on every step of a recording (they are part of its key). attention_mask and cache_position are dropped.
_STEP_ARGUMENTS = ("use_cache", "return_dict", "logits_to_keep", "output_attentions", "output_hidden_states")
_DROPPED = ("attention_mask", "cache_position")
_WARMUP_STEPS = 2  # eager steps before recording: the first compiles the decode graph, the second its dynamic form


@dataclasses.dataclass
class _Recording:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor     # (B, 1) static input, copied into before each replay
    position_ids: torch.Tensor  # (B, 1)
    output: object              # the model output the recording returns (its tensors are rewritten by replays)


class DecodeEngine:
    """Wraps a model's compiled call; drives the decode steps of one kvpass runtime."""

    def __init__(self, runtime, compiled_call, *, capture: bool = True):
        self.runtime = runtime
        self.compiled_call = compiled_call
        self.capture = capture
        self.recordings: dict[tuple, _Recording] = {}
        self._eager_steps: collections.Counter = collections.Counter()  # recording key -> eager steps taken
        self._pool = None
        self._pool_version = runtime.pool_version
        self.counts = collections.Counter()  # "records", "replays", "eager", "dropped" (stale recordings)
        self.not_captured: str | None = None  # why steps run eagerly (None while capture works or is untried)
        self.standing_aside: str | None = None  # why the engine drives no step at all (every call passes through)

    # -- the call ------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if self.standing_aside is None and self.runtime.unfused_updates:
            self.stand_aside("an attention read the kvpass cache unfused (HF's own attention, through kvpass::cache_update, "
                             "in a graph or outside one) and needs HF's mask, which the decode engine does not pass")
        step = self._decode_step(args, kwargs) if self.standing_aside is None else None
        if step is None:
            return self.compiled_call(*args, **kwargs)
        self.runtime.begin_decode_step()
        try:
            output = self._run(*step)
        finally:
            self.runtime.end_decode_step()
            held = self.runtime.tokens_held()
            for layer in step[2].layers:  # HF's counters, which a replay (or a recording) does not advance
                layer.seen = held
        return output

    def _decode_step(self, args, kwargs):
        """(input_ids, position_ids, cache, cache argument name, step arguments) if this call is a decode step of
        this runtime, else None."""
        name = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(name)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if (not isinstance(cache, KVCache) or cache.runtime is not self.runtime or not isinstance(ids, torch.Tensor)
                or ids.dim() != 2 or ids.shape[1] != 1 or self.runtime.tokens_held() == 0 or len(args) > 1):
            return None
        extra = {key: value for key, value in kwargs.items() if key not in ("input_ids", "position_ids", name)}
        if set(extra) - set(_STEP_ARGUMENTS) - set(_DROPPED):
            return None  # something the recorded step would not see (inputs_embeds, ...): run it as it comes
        steps = {key: value for key, value in extra.items() if key in _STEP_ARGUMENTS}
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = self.runtime.positions_of_next_token()
        return ids, positions, cache, name, steps

    def _run(self, ids, positions, cache, name, steps):
        recording = self._recording_for(ids, positions, cache, name, steps)
        if recording is None:
            self.counts["eager"] += 1
            return self.compiled_call(input_ids=ids, position_ids=positions, **{name: cache}, **steps)
        recording.input_ids.copy_(ids)
        recording.position_ids.copy_(positions)
        recording.graph.replay()
        self.counts["replays"] += 1
        output = copy.copy(recording.output)
        output["logits"] = recording.output.logits.clone()  # the next replay rewrites the recorded logits
        return output

    def _recording_for(self, ids, positions, cache, name, steps) -> _Recording | None:
        """The recording that replays this step, made now if its warm-up is over; None: run the step eagerly."""
        if not self.capture or not ids.is_cuda or self.not_captured is not None:
            if self.not_captured is None:
                self.not_captured = ("capture is off (kvpass.compile(..., capture=False) or Inductor's cudagraphs=True)"
                                     if not self.capture else "CUDA graphs need the model on a CUDA device")
            return None
        if self._pool_version != self.runtime.pool_version:  # a buffer the recordings read was reallocated
            self.counts["dropped"] += len(self.recordings)
            self.recordings.clear()
            self._pool = None  # recording into the dropped graphs' pool again trips the caching allocator's assert
            self._eager_steps.clear()
            self._pool_version = self.runtime.pool_version
        key = (ids.shape[0], name, tuple(sorted((k, repr(v)) for k, v in steps.items())))
        if key not in self.recordings:
            if self._eager_steps[key] < _WARMUP_STEPS:
                self._eager_steps[key] += 1
                return None
            recording = self._record(ids, positions, cache, name, steps)
            if recording is None:
                return None
            self.recordings[key] = recording
        return self.recordings[key]

    def _record(self, ids, positions, cache, name, steps) -> _Recording | None:
        """Record one decode step (recording runs no kernel: the caller replays it). None, with the reason kept,
        if the step cannot be captured."""
        static_ids, static_positions = ids.clone(), positions.clone()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                output = self.compiled_call(input_ids=static_ids, position_ids=static_positions, **{name: cache},
                                            **steps)
        except Exception as error:  # noqa: BLE001 - any capture failure: decode on, eagerly, and say why
            self.not_captured = f"recording the decode step failed ({type(error).__name__}: {error})"
            return None
        self.counts["records"] += 1
        return _Recording(graph, static_ids, static_positions, output)

    def stand_aside(self, reason: str) -> None:
        """Drive no more steps: every call goes to the compiled call as it comes (HF's mask included), and graphs
        compiled from now on keep kvpass::attention."""
        self.standing_aside = reason
        self.runtime.static_decode = False
        self.recordings.clear()

    # -- reporting -----------------------------------------------------------------------------------------
    def report(self) -> dict:
        return {"records": self.counts["records"], "replays": self.counts["replays"],
                "eager_steps": self.counts["eager"], "stale_recordings_dropped": self.counts["dropped"],
                "captured": self.counts["records"] > 0 and self.not_captured is None and self.standing_aside is None,
                "not_captured": self.not_captured, "standing_aside": self.standing_aside}
