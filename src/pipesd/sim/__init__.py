"""A discrete-event simulator of many edges sharing a fleet of verifier replicas (SimPy).

See docs/fleet-sim.md. :func:`simulate_fleet` runs one configuration; :class:`EdgeModel` is an
edge's response to cloud latency (from the single-edge model :mod:`pipesd.tuning.sim`, or from a
measured single-edge point); :class:`CostCurve` is a replica's verification time per launch; :class:`HostCPU` the
cores edges and replicas share when they run on one machine.
"""
from pipesd.sim.fleet import (ROUTING, CostCurve, EdgeModel, FleetConfig, FleetResult, HostCPU,
                              capacity_bound, simulate_fleet)

__all__ = ["ROUTING", "CostCurve", "EdgeModel", "FleetConfig", "FleetResult", "HostCPU", "capacity_bound", "simulate_fleet"]
