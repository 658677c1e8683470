"""Tools for tests, benchmarks and offline demos; nothing in the streaming path imports them.

`HubServer` (``hub_server.py``) is a local Hub that plays today's Hugging Face Hub (Xet-style redirects to a
bridge with signed URLs, or a mirror), with a latency and bandwidth model, fault injection and a request log.
``hf-weightstream serve-hub`` runs it from the command line.
"""

from .hub_server import Fault, HubServer, RequestRecord

__all__ = ["Fault", "HubServer", "RequestRecord"]
