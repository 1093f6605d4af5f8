"""GPU energy over a timed window, from NVML's energy counter.

NVML keeps, per GPU, the energy it has used since the driver loaded (millijoules, Volta and
later). Reading the counter before and after the timed steps gives the joules of exactly that
window, without sampling power at some rate and integrating. The counter advances in the
driver's own update intervals (about every 20-100 ms on recent GPUs), so a window should last a
second or more for a few-percent reading; `EnergyMeter.stop` reports the window's seconds
beside the joules so a reader can judge.

NVML comes from the `nvidia-ml-py` package (import name `pynvml`, the `gpu` extra). Without it,
without a GPU, or where the counter is not supported, every reading is None and the reason is
kept in `EnergyMeter.unavailable`: a benchmark row then says why it has no energy instead of
failing.
"""
from __future__ import annotations

import time

import torch


def _nvml_handle(device: torch.device):
    """The NVML handle of a CUDA device, matched by PCI bus id: NVML numbers GPUs by the
    machine's order, CUDA by CUDA_VISIBLE_DEVICES and its own order."""
    import pynvml
    pynvml.nvmlInit()
    props = torch.cuda.get_device_properties(device)
    bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)


class EnergyMeter:
    """Joules a GPU used between `start()` and `stop()` (None where NVML cannot say)."""

    def __init__(self, device: torch.device):
        self.unavailable: str | None = None
        self._handle = None
        self._start: tuple[int, float] | None = None
        if device.type != "cuda":
            self.unavailable = f"no NVML energy counter on {device.type}"
            return
        try:
            self._handle = _nvml_handle(device)
            self._read()
        except ImportError:
            self.unavailable = "pynvml is not installed (pip install 'masep[gpu]' or nvidia-ml-py)"
        except Exception as err:  # NVML's own errors: no driver library, counter not supported
            self.unavailable = f"NVML energy counter unavailable: {err}"
            self._handle = None

    def _read(self) -> int:
        import pynvml
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))  # millijoules

    def start(self) -> None:
        if self._handle is not None:
            self._start = (self._read(), time.perf_counter())

    def stop(self) -> dict:
        """{joules, seconds, mean_watts} of the window, or {unavailable: why}."""
        if self._handle is None or self._start is None:
            return {"unavailable": self.unavailable or "stop() without start()"}
        mj, t0 = self._start
        joules, seconds = (self._read() - mj) / 1e3, time.perf_counter() - t0
        self._start = None
        return {"joules": joules, "seconds": seconds, "mean_watts": joules / seconds if seconds > 0 else None}
