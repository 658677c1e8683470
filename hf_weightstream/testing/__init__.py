"""Tools for tests, benchmarks and offline demos; nothing in the streaming path imports them.

`HubServer` (``hub_server.py``) is a local Hub that plays today's Hugging Face Hub (Xet-style redirects to a
bridge with signed URLs, or a mirror), with a latency and bandwidth model, fault injection and a request log.
``hf-weightstream serve-hub`` runs it from the command line. ``hub_repo.py`` is what it serves: a folder scanned
into an immutable commit of a model repo, with the hashes the real Hub reports. Both need only the standard library.

``checkpoints.py`` writes tiny pre-quantized checkpoints to each format's published layout (FP8, MXFP4,
compressed-tensors), for tests and benchmarks that need real quantized files. It needs torch, so it is not
imported here: ``from hf_weightstream.testing import checkpoints``.
"""

from .hub_server import Fault, HubServer, RequestRecord

__all__ = ["Fault", "HubServer", "RequestRecord"]
