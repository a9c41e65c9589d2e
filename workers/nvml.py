"""The accelerator's own utilisation reading (NVML) on CUDA, when nvidia-ml-py is installed; None elsewhere.
The engine's busy fraction is reported everywhere; this is the driver's view beside it."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class GpuUtilization:
    def __init__(self, device) -> None:
        self._handle = None
        if getattr(device, "type", None) != "cuda":
            return
        try:
            import pynvml  # nvidia-ml-py: the `gpu` extra

            pynvml.nvmlInit()
            index = device.index if device.index is not None else 0
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception as exc:  # no library or no driver: the busy fraction still reports utilisation
            log.info("NVML utilisation unavailable: %s", exc)

    def read(self) -> float | None:
        """GPU utilisation over the driver's last sample period, as a fraction."""
        if self._handle is None:
            return None
        try:
            return self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0
        except Exception:
            return None
