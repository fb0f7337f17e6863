"""A verifier fleet on Ray core actors: ``pipesd serve --replicas N`` (docs/fleet.md).

- :mod:`pipesd.fleet.replica`: one :class:`~pipesd.cloud.CloudServer` per Ray actor.
- :mod:`pipesd.fleet.router`: :class:`Fleet`, the one address edges connect to; least-loaded
  routing per connection, replica loss and draining.
- :mod:`pipesd.fleet.observe`: every per-server metric with a ``replica`` label, and ``/fleet``
  (the replicas as JSON) on the metrics port.

Ray is imported only when a fleet starts (the ``[fleet]`` extra).
"""
from pipesd.fleet.router import RAY_MISSING, Fleet, FleetConfig, import_ray, start_ray

__all__ = ["Fleet", "FleetConfig", "RAY_MISSING", "import_ray", "start_ray"]
