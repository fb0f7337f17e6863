"""Serving PipeSD to existing clients: an OpenAI-compatible HTTP API on the edge.

``pipesd edge-server --cloud HOST:PORT`` runs it; :func:`create_app` builds the FastAPI app
around an :class:`pipesd.edge.EdgeClient`, :func:`serve` / :func:`start_in_thread` run it
with uvicorn. Needs the ``serve`` extra (``pip install pipesd[serve]``).
"""
from pipesd.serving.openai_api import create_app, generation_stats
from pipesd.serving.schemas import APIError
from pipesd.serving.server import ServerThread, serve, start_in_thread

__all__ = ["APIError", "ServerThread", "create_app", "generation_stats", "serve", "start_in_thread"]
