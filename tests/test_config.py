import pytest
import torch

import kvpass


def test_defaults_and_round_trip():
    cfg = kvpass.Config(attention=kvpass.Dense(dtype=torch.float16), ffn=kvpass.DenseFFN())
    assert cfg.attention.dtype == "float16" and cfg.attention.torch_dtype is torch.float16
    assert kvpass.Config.from_dict(cfg.to_dict()) == cfg
    assert kvpass.Config().attention == kvpass.Dense()
    for method in (kvpass.AnTKV(bits=0.375, anchor_ratio=0.02, window=8, score="attention", keys="post-rope"),
                   kvpass.AnTKV(bits=1.5, value_bits=0.5), kvpass.KIVI(bits=4)):
        assert kvpass.Config.from_dict(kvpass.Config(attention=method).to_dict()).attention == method


@pytest.mark.parametrize("build, words", [
    (lambda: kvpass.Dense(dtype="int8"), ["int8", "float16"]),
    (lambda: kvpass.Dense(dtype=torch.int32), ["int32", "bfloat16"]),
    (lambda: kvpass.Config(attention="dense"), ["'dense'", "Dense()"]),
    (lambda: kvpass.Config(ffn=kvpass.Dense()), ["ffn=", "DenseFFN()"]),
    (lambda: kvpass.Config(calibration=3), ["calibration=3"]),
    (lambda: kvpass.backend(kvpass.Config(), inner="tvm"), ["'tvm'", "inductor"]),
    (lambda: kvpass.backend(kvpass.Config(), strict="yes"), ["strict='yes'"]),
    (lambda: kvpass.backend({"attention": "dense"}), ["kvpass.Config"]),
    (lambda: kvpass.Config.from_dict({"version": 99}), ["version=99"]),
    (lambda: kvpass.AnTKV(bits=5), ["bits=5", "0.375"]),
    (lambda: kvpass.AnTKV(value_bits=0.25), ["value_bits=0.25", "0.375"]),
    (lambda: kvpass.AnTKV(anchor_ratio=0.9), ["anchor_ratio=0.9", "[0, 0.5]"]),
    (lambda: kvpass.AnTKV(window=0), ["window=0", ">= 1"]),
    (lambda: kvpass.AnTKV(score="magic"), ["score='magic'", "bound"]),
    (lambda: kvpass.AnTKV(keys="rotated"), ["keys='rotated'", "'pre-rope' or 'post-rope'"]),
    (lambda: kvpass.KIVI(bits=3), ["bits=3", "2, 4 or 8"]),
    (lambda: kvpass.KIVI(group=0), ["group=0"]),
    (lambda: kvpass.Config.from_dict({"version": 1, "attention": {"method": "magic"}}), ["'magic'", "dense"]),
])
def test_bad_values_raise_value_error_naming_them(build, words):
    with pytest.raises(ValueError) as info:
        build()
    for word in words:
        assert word in str(info.value)


def test_antkv_value_bits_equal_to_bits_is_the_plain_configuration():
    assert kvpass.AnTKV(bits=2, value_bits=2.0) == kvpass.AnTKV(bits=2)
    assert kvpass.AnTKV(bits=1.5, value_bits=0.5).rate("values") == (16, 256)


def test_configs_are_frozen():
    with pytest.raises(AttributeError):
        kvpass.Dense().dtype = "float16"
