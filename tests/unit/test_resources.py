"""How a service process keeps the memory it frees (services/common/resources.py)."""

import json
import platform
import subprocess
import sys

import pytest

# In a fresh process (the setting is process-wide): a 64 MiB block allocated, written and
# freed on a worker thread, as a network's activations are; glibc's own counters
# (mallinfo2: the main heap, and blocks mapped on their own) before, during and after.
BLOCK_ON_A_WORKER_THREAD = """
import ctypes, json, sys, threading
from services.common.resources import keep_freed_memory_for_reuse

tuned = keep_freed_memory_for_reuse() if sys.argv[1] == "tuned" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
libc.mallinfo2.restype = Mallinfo2
size = 64 << 20
seen = {}
def work():
    seen["before"] = libc.mallinfo2()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    seen["during"] = libc.mallinfo2()
    libc.free(block)
    seen["after"] = libc.mallinfo2()
thread = threading.Thread(target=work)
thread.start()
thread.join()
before, during, after = seen["before"], seen["during"], seen["after"]
print(json.dumps({
    "tuned": tuned,
    "mapped_blocks": during.hblks - before.hblks,
    "main_heap_growth": during.uordblks - before.uordblks,
    "main_heap_kept": after.arena,
}))
"""


def block_counters(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_ON_A_WORKER_THREAD, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (mallopt)")
def test_a_big_block_freed_on_a_worker_thread_stays_in_the_heap_for_reuse():
    kept = block_counters("tuned")
    assert kept["tuned"] is True
    # Served from the one main heap, not mapped on its own (nor from a thread arena)...
    assert kept["mapped_blocks"] == 0 and kept["main_heap_growth"] >= 64 << 20
    # ...and still there once freed, for the next tile's activations to reuse.
    assert kept["main_heap_kept"] >= 64 << 20
    # glibc's default, which the setting changes: the block mapped on its own, unmapped when freed.
    default = block_counters("default")
    assert default["mapped_blocks"] == 1 and default["main_heap_growth"] < 64 << 20
