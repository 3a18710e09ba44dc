"""The ``unifusion`` command keeps freed host memory for reuse (glibc mallopt)."""

import os
import subprocess
import sys

import pytest

import unifusion.cli as cli

_PROBE = """
import ctypes, torch
from unifusion.allocator import retain_freed_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
applied = retain_freed_memory()
before = mallinfo2()
x = torch.empty(24 << 20, dtype=torch.uint8)  # 24 MiB: a large activation
during = mallinfo2()
del x
after = mallinfo2()
print(applied, during.hblkhd - before.hblkhd, during.arena - after.arena)
"""


def _probe(env_value: str | None) -> tuple[bool, int, int]:
    """(applied, bytes newly mmapped for the block, heap bytes given back after its free)."""
    env = dict(os.environ)
    env.pop("UNIFUSION_MALLOC", None)
    if env_value is not None:
        env["UNIFUSION_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, mmapped, trimmed = out.stdout.split()
    return applied == "True", int(mmapped), int(trimmed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt / mallinfo2")
def test_large_blocks_come_from_the_heap_and_stay_there():
    applied, mmapped, trimmed = _probe(None)
    assert applied
    # served from the heap (no fresh mmap pages to fault in) and kept after free for the next step
    assert mmapped == 0 and trimmed == 0
    applied, mmapped, trimmed = _probe("default")
    # the opt-out leaves glibc alone: a 24 MiB block is its own mmap (unmapped again on free)
    assert not applied and mmapped >= 24 << 20


def test_the_command_sets_the_allocator_first(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["--help"]) == 0
    assert calls == [1]
