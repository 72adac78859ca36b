"""Does a weight stored input-major in place (CHESS's layout: shape (out, in), strides (1, out)) slow the dense
products that still read it? F.linear and Inductor-compiled F.linear over Llama-3-8B's down projection (4096 x
14336, bf16) in both layouts, at decode (M = 1, 8) and prefill (M = 4096) sizes; CUDA-graph replays, mean us.

    python benchmarks/probes/weight_layout.py
"""
import torch
import torch.nn.functional as F

from kvpass.eval.bench import graph_time_ms

torch.manual_seed(0)
out_features, in_features = 4096, 14336
row_major = torch.randn(out_features, in_features, dtype=torch.bfloat16, device="cuda") / in_features ** 0.5
input_major = row_major.t().contiguous().t()
compiled = torch.compile(F.linear)
print(torch.cuda.get_device_name(), torch.__version__)
print(f"{'M':>6} {'path':>9} {'row-major us':>13} {'input-major us':>15} {'ratio':>6}")
for m in (1, 8, 4096):
    x = torch.randn(m, in_features, dtype=torch.bfloat16, device="cuda")
    for name, fn in (("F.linear", F.linear), ("inductor", compiled)):
        torch.testing.assert_close(fn(x, row_major), fn(x, input_major), rtol=2e-2, atol=2e-2)
        times = [1e3 * graph_time_ms(lambda w=w: fn(x, w)) for w in (row_major, input_major)]
        print(f"{m:>6} {name:>9} {times[0]:>13.1f} {times[1]:>15.1f} {times[1] / times[0]:>6.3f}", flush=True)
