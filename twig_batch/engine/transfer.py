"""Host values to the device without the host waiting for the device.

`torch.tensor(values, device=...)` and a plain `.to(device)` from ordinary host memory wait until the
device has finished everything queued before them: one such copy per step is enough to stop the host
from preparing the next step while the device runs this one. Values staged in pinned memory are
copied behind the queued work instead (the pinned block is not reused before its copy has run).
"""
from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """`values` (a list of numbers or a host tensor) as a `dtype` tensor on `device`, queued."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
