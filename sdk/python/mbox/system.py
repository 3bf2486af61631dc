"""Hardware metrics sampled in a background thread: CPU, memory, disk and network
I/O (psutil) and, when NVML is available, per-GPU utilisation, memory, power,
temperature and SM clock, logged under ``system/...``."""

import logging
import threading

log = logging.getLogger("mbox")


class SystemMetrics:
    def __init__(self, experiment, interval_s: float = 10.0):
        import psutil  # the "system" extra

        self._psutil = psutil
        self._process = psutil.Process()
        self.experiment = experiment
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mbox-system-metrics", daemon=True)
        self._nvml = None
        self._gpus = []
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._gpus = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as e:  # noqa: BLE001 - no NVML, no driver, or no GPU
            log.debug("mbox: no GPU metrics: %s", e)
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)

    def start(self) -> "SystemMetrics":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> dict:
        ps = self._psutil
        vm = ps.virtual_memory()
        m = {
            "system/cpu_percent": ps.cpu_percent(None),
            "system/process_cpu_percent": self._process.cpu_percent(None),
            "system/process_rss_bytes": self._process.memory_info().rss,
            "system/memory_used_bytes": vm.used,
            "system/memory_percent": vm.percent,
        }
        disk = ps.disk_io_counters()
        if disk is not None:
            m["system/disk_read_bytes"] = disk.read_bytes
            m["system/disk_write_bytes"] = disk.write_bytes
        net = ps.net_io_counters()
        if net is not None:
            m["system/net_sent_bytes"] = net.bytes_sent
            m["system/net_recv_bytes"] = net.bytes_recv
        nv = self._nvml
        for i, h in enumerate(self._gpus):
            prefix = f"system/gpu{i}/"
            try:
                util = nv.nvmlDeviceGetUtilizationRates(h)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                m[prefix + "utilization_percent"] = util.gpu
                m[prefix + "memory_used_bytes"] = mem.used
                m[prefix + "memory_total_bytes"] = mem.total
                m[prefix + "power_watts"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
                m[prefix + "temperature_c"] = nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
                m[prefix + "sm_clock_mhz"] = nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)
            except Exception as e:  # noqa: BLE001 - one GPU's failure must not stop the rest
                log.debug("mbox: GPU %d metrics: %s", i, e)
        return m

    def _run(self):
        step = 0
        while not self._stop.wait(self.interval_s):
            try:
                self.experiment.log_metrics(self.sample(), step=step)
            except Exception as e:  # noqa: BLE001 - keep sampling
                log.warning("mbox: system metrics sample failed: %s", e)
            step += 1
