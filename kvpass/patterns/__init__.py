"""Graph patterns: the matchers that find attention, FFN and projection sites in a Dynamo FX graph
(:mod:`kvpass.patterns.matchers`) and the catalogue of the graph variants they know.

The code lives in the repository's top-level ``patterns/`` folder (the design card's layout), shipped here by
``[tool.setuptools] package-dir``; like ``kernels/`` it has no ``__init__.py``, so it never shadows an installed
distribution called ``patterns``. The pass that rewrites a graph with them is :mod:`kvpass.rewrite`.
"""
