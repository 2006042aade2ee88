"""Closed-loop evaluation of VLA policies in the LIBERO / LIBERO-PRO simulator (see docs/LIBERO_EVAL.md)."""
