"""What holds GPU memory after a decode_engine speed point released its caches (the B8 point ran out of memory
behind the 128K point). Prints the memory still allocated and the referrer chain of each large live CUDA tensor.

    python benchmarks/probes/held_memory.py
"""
import gc
import sys

import torch

sys.path.insert(0, "benchmarks")
import decode_engine  # noqa: E402

import kvpass  # noqa: E402
from kvpass.attach import backend_of  # noqa: E402
from kvpass.eval import bench  # noqa: E402
from kvpass.models import load_model  # noqa: E402


def describe(obj, depth=0, seen=None):
    seen = seen if seen is not None else set()
    if depth > 4:
        return
    for ref in gc.get_referrers(obj):
        if id(ref) in seen or ref is seen or isinstance(ref, type(sys._getframe())):
            continue
        seen.add(id(ref))
        text = type(ref).__name__
        if isinstance(ref, dict):
            text += " keys=" + ",".join(map(str, list(ref)[:6]))
        print("  " * (depth + 1) + text, flush=True)
        if isinstance(ref, (dict, list, tuple)) or depth < 1:
            describe(ref, depth + 1, seen)


model = load_model("random:llama:8b", dtype=torch.bfloat16, device="cuda")[0]
kvpass.compile(model, decode_engine.DENSE)
backend = backend_of(model)
weights = torch.cuda.memory_allocated()
bandwidth = bench.measured_bandwidth(torch.device("cuda"))
decode_engine._speed_point(model, backend, bandwidth, 1, 16384, 10, 4)
gc.collect()
torch.cuda.empty_cache()
print(f"weights {weights / 2**30:.2f} GiB, after the point {torch.cuda.memory_allocated() / 2**30:.2f} GiB", flush=True)
big = [o for o in gc.get_objects() if torch.is_tensor(o) and o.is_cuda and o.numel() * o.element_size() > 2**24
       and not isinstance(o, torch.nn.Parameter)]
print(f"{len(big)} large non-parameter CUDA tensors", flush=True)
for tensor in big[:6]:
    print(tuple(tensor.shape), tensor.dtype, flush=True)
    describe(tensor)
