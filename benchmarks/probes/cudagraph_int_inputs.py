"""Probe (GPU): does Inductor's CUDA-graph capture re-record when an int graph input changes value while
every tensor shape stays fixed? Decides how static-shape kvpass decode graphs must pass the past length.

Prints, for a decode-like step whose int `past` feeds only arithmetic (as HF's position/mask offsets do),
how many distinct CUDA graphs were recorded over 12 steps. Run: python benchmarks/probes/cudagraph_int_inputs.py
"""
import torch
from torch._dynamo.utils import counters


def step(x: torch.Tensor, past: int) -> torch.Tensor:
    offsets = torch.arange(x.shape[-1], device=x.device) + past  # values depend on past, shapes do not
    return (x * offsets).sin().sum(-1)


def main() -> None:
    compiled = torch.compile(step, mode="reduce-overhead", dynamic=None)
    x = torch.randn(4, 64, device="cuda")
    for past in range(100, 112):
        compiled(x, past)
    torch.cuda.synchronize()
    print(f"torch {torch.__version__}: 12 steps with a changing int input -> "
          f"{counters['inductor'].get('cudagraph_recorded_non_static_inputs', 'n/a')} non-static recordings; "
          f"graphs compiled {counters['stats']['unique_graphs']}; inductor counters {dict(counters['inductor'])}")
    from torch._inductor.cudagraph_trees import get_container

    tree = get_container(torch.cuda.current_device()).tree_manager
    print(f"CUDA graphs recorded: {tree.new_graph_id().id if tree is not None else 'n/a'}")


if __name__ == "__main__":
    main()
