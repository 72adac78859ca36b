"""Evaluation and benchmarks: perplexity, passkey/needle, decode throughput; JSON records and plots."""
