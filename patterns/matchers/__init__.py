"""Matchers over Dynamo FX graphs: each finds one kind of site, says why a candidate did not match, and
rewrites a site into its kvpass op call."""
from .attention import AttentionSite, Mismatch, find_attention, is_decode_step, rewrite_attention
from .catalogue import CATALOGUE, Entry
from .ffn import FFNSite, find_ffn, rewrite_ffn
from .graph import module_path, module_root, real_values
from .projections import ProjectionSite, find_projections, rewrite_projection

__all__ = ["AttentionSite", "CATALOGUE", "Entry", "FFNSite", "Mismatch", "ProjectionSite", "find_attention",
           "find_ffn", "find_projections", "is_decode_step", "module_path", "module_root", "real_values",
           "rewrite_attention", "rewrite_ffn", "rewrite_projection"]
