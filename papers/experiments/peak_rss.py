"""This process's resident set, and its peak sampled every 2 ms on a daemon thread: the memory readings of the lab
scripts beside it (``from peak_rss import PeakRSS``; they run as ``python papers/experiments/<script>.py``)."""
import threading
import time


def rss() -> float:
    """MiB resident now (``VmRSS`` of /proc/self/status)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    """``start()`` returns the resident set and restarts the peak there; ``peak`` is the highest sample since."""

    def __init__(self, every: float = 0.002):
        self.peak, self.every = 0.0, every
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while True:
            self.peak = max(self.peak, rss())
            time.sleep(self.every)

    def start(self) -> float:
        self.peak = base = rss()
        return base
