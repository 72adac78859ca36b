"""A compiled model generating through both kernel paths: the plain PyTorch references and the Triton kernels
(on a GPU, or the interpreter on CPU). Tests of a method's kernels hold the two to the same tokens and logits."""
from __future__ import annotations

import torch

import kvpass


def assert_kernel_paths_agree(model, compile_for, ids, monkeypatch, new_tokens: int = 4) -> None:
    """compile_for(model, kernels) compiles `model` for KVPASS_KERNELS=kernels ("reference" or "triton"); both
    runs greedily generate `new_tokens` after `ids` and must give the same tokens and logits within 1e-3."""
    device = "cuda" if torch.cuda.is_available() else "cpu"    # Triton needs CUDA tensors or the interpreter
    model = model.to(device)
    outs = {}
    for kernels in ("reference", "triton"):
        monkeypatch.setenv("KVPASS_KERNELS", kernels)
        compile_for(model, kernels)
        try:
            outs[kernels] = model.generate(ids.to(device), max_new_tokens=new_tokens, do_sample=False,
                                           output_logits=True, return_dict_in_generate=True)
        finally:
            kvpass.detach(model)
            torch._dynamo.reset()
    model.to("cpu")
    assert torch.equal(outs["reference"].sequences, outs["triton"].sequences)
    for a, b in zip(outs["reference"].logits, outs["triton"].logits):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
