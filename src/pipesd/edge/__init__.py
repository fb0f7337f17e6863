"""The edge: drafts with the small model, ships token batches, applies verdicts."""
from pipesd.edge.client import EdgeClient, Generation, GenerationStats
from pipesd.edge.config import ALIASES, METHODS, EdgeConfig, canonical_method
from pipesd.edge.offline import OFFLINE_POLICIES, CloudUnavailableError, StreamEvent
from pipesd.edge.trigger import DualThresholdTrigger, EdgeLLMTrigger, TriggerConfig

__all__ = ["EdgeClient", "EdgeConfig", "Generation", "GenerationStats", "METHODS", "ALIASES", "canonical_method",
           "TriggerConfig", "DualThresholdTrigger", "EdgeLLMTrigger", "CloudUnavailableError", "StreamEvent", "OFFLINE_POLICIES"]
