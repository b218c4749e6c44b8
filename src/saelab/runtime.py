"""Process settings that make CPU training and harvesting fast and steady; call before torch is imported.

- OMP_WAIT_POLICY=PASSIVE (unless set): on a shared or oversubscribed machine OpenMP threads spinning at barriers
  for a descheduled partner slow small parallel ops (e.g. the index sort in the sparse backward) by up to 100x.
- glibc malloc keeps freed large buffers instead of unmapping them and page-faulting them back every step
  (the same as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>); measured 1.07x faster training on our path.
"""

from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameter codes


def tune_malloc() -> bool:
    """Serve large buffers from the heap and never trim it; False where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def configure_process() -> bool:
    """Apply both settings; returns whether the malloc tuning took effect."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads the OpenMP runtime
    return tune_malloc()
