"""The one private torch API we use, fenced here with a test (tests/test_private_apis.py) that fails loudly.

Direct reads reuse a unit's aligned buffer for the next unit once the unit is evicted. That is safe only if no
tensor outside the engine still views the buffer (a user who kept ``layer.weight`` of an evicted unit would
see it change). torch has no public way to ask how many tensors share a storage, so we ask its use count.
"""

from __future__ import annotations

import torch


def storage_users(tensor: torch.Tensor) -> int:
    """How many tensors (``tensor`` included) hold ``tensor``'s storage alive."""
    storage = tensor.untyped_storage()
    # The count includes the Python storage object made just above; it goes when this function returns.
    return torch._C._storage_Use_Count(storage._cdata) - 1
