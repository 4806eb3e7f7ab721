"""Child processes for the primitives' tests (see holder_proc.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HOLDER = Path(__file__).with_name("holder_proc.py")


class Holder:
    """A child process holding a lock or permit (see holder_proc.py)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HOLDER), "hold", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("HELD "), f"holder failed to start: {line!r}"
        self.token = int(line.split()[1])

    def command(self, text: str) -> str:
        self.proc.stdin.write(text + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self.proc.stdout.readline().strip()  # type: ignore[union-attr]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_contenders(count: int, *args: str) -> list[str]:
    """Run ``count`` contending processes at once; return their JSON outputs."""
    procs = [
        subprocess.Popen([sys.executable, str(HOLDER), "contend", *args], stdout=subprocess.PIPE,
                         text=True)
        for _ in range(count)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return outs
