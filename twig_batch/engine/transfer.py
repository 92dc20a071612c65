"""Values between host and device without the host waiting for everything queued.

`torch.tensor(values, device=...)`, a plain `.to(device)` from ordinary host memory and a plain
`.cpu()` or `.tolist()` of a device tensor wait until the device has finished everything queued before
them: one such copy per step is enough to stop the host from preparing the next step while the device
runs this one. Values staged in pinned memory are copied behind the queued work instead (the pinned
block is not reused before its copy has run); a copy back (`HostCopy`) is waited for on its own,
when its values are needed, not on whatever was queued after it.
"""
from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """`values` (a list of numbers or a host tensor) as a `dtype` tensor on `device`, queued."""
    if isinstance(values, torch.Tensor) and values.device.type != "cpu":
        return values.to(device, dtype)
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor's copy on the host, started now (into pinned memory, behind the work queued so
    far); `values` waits for that copy alone."""

    def __init__(self, tensor: torch.Tensor):
        self._ready = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tensor

    def values(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._host
