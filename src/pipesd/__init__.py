"""PipeSD: cloud-edge collaborative speculative decoding, pipelined.

The edge drafts tokens with a small model, ships them to the cloud in token batches planned
by dynamic programming, and the cloud verifies them with the target model. Output is exactly
the target's (greedy) or distributed exactly as the target's (sampling).
"""
__version__ = "0.1.0"
