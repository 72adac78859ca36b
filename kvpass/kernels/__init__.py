"""Triton kernels, one package per family, each with a plain fp32 PyTorch reference beside it.

The families live in the repository's top-level ``kernels/`` folder (the design card's layout) and are shipped
here by ``[tool.setuptools] package-dir``. That folder has no ``__init__.py`` on purpose: a folder without one is
only a namespace portion, which Python never lets shadow a regular package, so running ``python`` or ``pytest``
in the repository root cannot hide an installed distribution that is also called ``kernels`` (Hugging Face's,
which transformers imports).
"""
