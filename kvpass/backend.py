"""The torch.compile backend: rewrite the Dynamo graph with the pattern catalogue, then hand it to the
inner compiler (Inductor by default).

A backend serves one model: `Backend.bind` ties them (`backend_of(model)` finds it). What binding means for the
model's calls (the kvpass cache in `generate`, the decode engine, calibrations) is the face's (kvpass/attach.py),
which gives each backend it makes a `meet_model` for a model met only at its first compile."""
from __future__ import annotations

import importlib
import time
import warnings
import weakref

import torch

from . import graph_inputs
from . import ops  # noqa: F401  (registers torch.ops.kvpass.* before any graph names them)
from ._logging import configure_from_env, explained_nodes, logger
from .config import Config
from .runtime import Runtime

_INNER = ("inductor", "eager", "aot_eager")
_ATTR = "_kvpass_backend"  # the model's attribute holding its backend


class KvpassMatchError(RuntimeError):
    """Raised with strict=True when a requested rewrite did not cover every site."""


def _compiled_module(gm: torch.fx.GraphModule) -> torch.nn.Module | None:
    """The module whose forward Dynamo traced `gm` from: the root of the graph's own module paths (L['self'], or
    L['args'][0] when a decorator wraps forward), looked up in the locals of the frame being compiled, the way
    Dynamo evaluates its own sources. None outside Dynamo or when the graph names no module."""
    from kvpass.patterns.matchers import module_root

    roots = {module_root(node) for node in gm.graph.nodes} - {None}
    if len(roots) != 1:
        return None
    (name, indices), = roots
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        value = InstructionTranslator.current_tx().f_locals[name]
        for index in indices:
            value = value[index]
    except Exception:  # noqa: BLE001 - called outside Dynamo, or its private API moved: bind nothing
        return None
    return value if isinstance(value, torch.nn.Module) else None


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule


def backend_of(model, required: bool = False) -> Backend | None:
    backend = _unwrap(model).__dict__.get(_ATTR)
    if backend is None and required:
        raise ValueError(f"{type(model).__name__} has no kvpass backend attached; call kvpass.compile(model, config) "
                         f"(compiled) or kvpass.attach(model, config) (eager reference semantics) first")
    return backend


class Backend:
    """Callable for `torch.compile(..., backend=...)`. Holds the runtime of the one model it compiles.

    meet_model(model, backend): called when a graph of a model the backend is not bound to is compiled (the model
    is the graph's root); kvpass.backend(config) gives the face's, which binds them. None: such a model stays
    unbound (its graphs are rewritten all the same)."""

    def __init__(self, config: Config, *, inner: str = "inductor", strict: bool = False, cudagraphs: bool = False,
                 meet_model=None):
        if not isinstance(config, Config):
            raise ValueError(f"config={config!r} is not a kvpass.Config")
        if inner not in _INNER:
            raise ValueError(f"inner={inner!r} is not a supported inner compiler; use one of {list(_INNER)}")
        if not isinstance(strict, bool):
            raise ValueError(f"strict={strict!r} must be True or False")
        if not isinstance(cudagraphs, bool):
            raise ValueError(f"cudagraphs={cudagraphs!r} must be True or False")
        if cudagraphs and inner != "inductor":
            raise ValueError(f"cudagraphs=True needs inner='inductor', not {inner!r}")
        if cudagraphs and not hasattr(importlib.import_module("torch._inductor.config"), "graph_partition"):
            raise ValueError("cudagraphs=True needs Inductor graph partitioning (torch >= 2.9)")
        self.config, self.inner, self.strict, self.cudagraphs = config, inner, strict, cudagraphs
        self.runtime = Runtime(config)
        self.records = []
        self._model = None
        self.engine = None  # the kvpass.engine.DecodeEngine driving the model's decode steps, once installed
        self._meet_model = meet_model
        self._met = False  # bound by meet_model (at a compile), not by the face before compiling

    # -- binding to a model --------------------------------------------------------------------------
    def bind(self, model: torch.nn.Module, calibrations=None) -> None:
        """Serve `model` (backend_of(model) is this backend from now on). calibrations: method config -> its loaded
        calibration for this model (the face's resolver), given to the runtime."""
        bound = self.model
        if bound is not None and bound is not model:
            raise ValueError(f"this kvpass backend already serves a {type(bound).__name__}; create one backend per "
                             f"model (kvpass.backend(config) or kvpass.compile(model, config))")
        self._model = weakref.ref(model)
        model.__dict__[_ATTR] = self
        self.runtime.use_calibrations(calibrations)

    def unbind(self) -> None:
        model = self.model
        if model is not None and model.__dict__.get(_ATTR) is self:
            del model.__dict__[_ATTR]
        self._model = None
        self.runtime.use_calibrations(None)

    @property
    def model(self):
        return None if self._model is None else self._model()

    # -- the compile entry point ---------------------------------------------------------------------
    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from kvpass.rewrite import rewrite

        configure_from_env()
        root = _compiled_module(gm)
        if root is not None and self._meet_model is not None and backend_of(root) is None and (
                self.model is None or (self._met and any(module is self.model for module in root.modules()))):
            # Also when the model met first is a submodule of this graph's: an outer forward that breaks its graph
            # before any module runs (CTRL, BigBird) has the inner model's frame compiled first.
            self._meet_model(root, self)
            self._met = True
        started = time.perf_counter()
        record, misses = rewrite(gm, self.runtime.id, rewrite_ffn_sites=self.config.ffn is not None,
                                 root=root, explain=explained_nodes(), plan=self.runtime.chess_plan(),
                                 example_inputs=example_inputs, captured_decode=self.runtime.static_decode)
        record.rewrite_seconds = time.perf_counter() - started
        self.records.append(record)
        if record.decode_needs_hf_mask and self.runtime.static_decode:
            # HF's own attention runs somewhere in this model and reads HF's mask in decode: the decode engine,
            # which passes no mask, stands aside from now on (graphs compiled later keep kvpass::attention).
            self.runtime.static_decode = False
            if self.engine is not None:
                self.engine.stand_aside("an attention site is left as the model wrote it (or reads the kvpass cache "
                                        "unfused) and needs HF's mask, which the decode engine does not pass")
        logger.info("compile %d (%d nodes):\n%s", len(self.records), record.nodes, record.table())
        self._check(record, misses)
        started = time.perf_counter()
        compiled = self._inner(gm, example_inputs)
        record.inner_compile_seconds = time.perf_counter() - started
        return compiled

    def _check(self, record, misses) -> None:
        problems = []
        if record.attention_sites == 0:
            first = misses[0].describe() if misses else "no SDPA call or matmul-softmax-matmul in the graph"
            problems.append(f"no attention site was rewritten in this graph ({record.nodes} nodes; first unmatched: "
                            f"{first}); it runs unrewritten")
        elif record.unmatched_attention:
            problems.append("attention sites that did not match: " + "; ".join(record.unmatched_attention))
        if self.config.ffn is not None and (record.unmatched_ffn or record.ffn_sites < record.layers):
            first = record.unmatched_ffn[0] if record.unmatched_ffn else "none"
            problems.append(f"FFN method {self.config.ffn.method!r} rewrote {record.ffn_sites} FFN sites for "
                            f"{record.layers} layers (first unmatched: {first})")
        if not problems:
            return
        message = "kvpass: " + " | ".join(problems) + " (KVPASS_LOGS=debug or KVPASS_EXPLAIN=<node> explains)"
        if self.strict:
            raise KvpassMatchError(message)
        warnings.warn(message, stacklevel=2)

    def _inner(self, gm, example_inputs):
        if self.inner == "eager":
            return gm.forward
        # AOTAutograd takes the tensors the rewrite added (thresholds, weight copies) only as graph inputs.
        gm, added = graph_inputs.lift(gm, example_inputs)
        example_inputs = [*example_inputs, *added]
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            # The stateful kvpass ops are tagged cudagraph_unsafe: with partitioning Inductor captures the
            # pieces between them as CUDA graphs (piecewise, like vLLM) instead of giving up on the graph.
            patches = {"triton.cudagraphs": True, "graph_partition": True} if self.cudagraphs else {}
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
        else:
            compiled = torch._dynamo.lookup_backend(self.inner)(gm, example_inputs)
        return graph_inputs.passing(compiled, added)

