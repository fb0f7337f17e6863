"""The edge: drafts with the small model, ships token batches, applies verdicts."""
from pipesd.edge.client import EdgeClient, Generation, GenerationStats
from pipesd.edge.config import METHODS, EdgeConfig
from pipesd.edge.offline import OFFLINE_POLICIES, CloudUnavailableError, StreamEvent
from pipesd.edge.trigger import DualThresholdTrigger, TriggerConfig

__all__ = ["EdgeClient", "EdgeConfig", "Generation", "GenerationStats", "METHODS", "TriggerConfig",
           "DualThresholdTrigger", "CloudUnavailableError", "StreamEvent", "OFFLINE_POLICIES"]
