"""The cloud: verification server holding one session per edge stream."""
from pipesd.cloud.server import CloudConfig, CloudServer, CloudStats

__all__ = ["CloudConfig", "CloudServer", "CloudStats"]
