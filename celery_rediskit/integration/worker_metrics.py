"""A worker's metrics endpoint (``rediskit_metrics_port``), one for all its pool processes.

Prefork pool processes count into prometheus_client's multiprocess files, and the main
process serves their sum:

- At ``worker_init`` (main process, before the pool forks) the worker makes a directory of
  its own (``rediskit-metrics-*`` under the temp dir), sets ``PROMETHEUS_MULTIPROC_DIR`` to
  it and switches prometheus_client to its multiprocess values, then makes the metrics and
  connects their receivers (``metrics.enable``). Pool processes inherit all of it with the
  fork: each writes ``counter_<pid>.db`` and ``histogram_<pid>.db`` there (its own metrics
  made by task code then are aggregated too). A ``PROMETHEUS_MULTIPROC_DIR`` set before the
  worker started is used as it is, and left as it is.
- Each scrape first folds the files of pool processes that have exited (replaced at
  ``worker_max_tasks_per_child``, or killed) into one archive file per metric type, then
  deletes them: counts are kept (counters never go back) and the directory does not grow
  with every replaced process. Then it reads the files, as ``MultiProcessCollector`` does.
- At ``worker_shutdown`` the server stops and the directory is removed.

Why this way: the pool processes are forked from the main process, which alone can serve a
port, and an mmap'ed file per process needs no locking and no messages between them.
"""

from __future__ import annotations

import glob
import inspect
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from . import metrics
from .settings import Settings

__all__ = ["WorkerMetrics", "fold_dead_files"]

log = logging.getLogger("celery_rediskit")

ENV = "PROMETHEUS_MULTIPROC_DIR"

# counter_<pid>.db, histogram_<pid>.db (gauges of the live modes are per live process)
_PROCESS_FILE = re.compile(r"^(counter|histogram|summary)_(\d+)\.db$")
# prometheus_client 0.17+ stores a timestamp next to each value
_TIMESTAMPED = "timestamp" in inspect.signature(MmapedDict.write_value).parameters


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fold_dead_files(path: str) -> int:
    """Add the values of every exited process's counter and histogram files under ``path``
    into ``<type>_archive.db`` and delete them; the number of files folded."""
    folded = 0
    for file in sorted(glob.glob(os.path.join(path, "*.db"))):
        match = _PROCESS_FILE.match(os.path.basename(file))
        if match is None or _alive(int(match.group(2))):
            continue
        archive = MmapedDict(os.path.join(path, f"{match.group(1)}_archive.db"))
        try:
            for entry in MmapedDict.read_all_values_from_file(file):
                key, value = entry[0], entry[1]
                old = archive.read_value(key)
                total = (old[0] if isinstance(old, tuple) else old) + value
                if _TIMESTAMPED:
                    archive.write_value(key, total, 0.0)
                else:
                    archive.write_value(key, total)  # type: ignore[call-arg]
        finally:
            archive.close()
        os.unlink(file)
        folded += 1
    return folded


class _Collector:
    """The sum of every process's files, folding the exited ones' files first."""

    def __init__(self, path: str, fold: bool) -> None:
        self.path = path
        self.fold = fold
        self.lock = threading.Lock()
        self.reader = MultiProcessCollector(None, path)

    def collect(self) -> Iterator[Any]:
        with self.lock:  # a fold and a read never interleave
            if self.fold:
                fold_dead_files(self.path)
            yield from self.reader.collect()


class WorkerMetrics:
    """The endpoint of one worker, started at ``worker_init`` (see the module doc)."""

    def __init__(self, settings: Settings) -> None:
        given = os.environ.get(ENV)
        self.own = not given
        self.path = given or tempfile.mkdtemp(prefix="rediskit-metrics-")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self.path, fold=self.own))
        try:
            self.server = metrics.serve(registry, settings.metrics_address,
                                        settings.metrics_port or 0)
        except OSError:  # the port is taken: leave nothing behind
            if self.own:
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        self.port = self.server.server_port
        os.environ[ENV] = self.path
        if not getattr(values.ValueClass, "_multiprocess", False):
            # prometheus_client chose its values when imported, before ENV was set
            values.ValueClass = values.MultiProcessValue()
        metrics.enable()
        self.address = settings.metrics_address

    def announce(self) -> None:
        """Log where the metrics are (at ``worker_ready``: at ``worker_init`` Celery has not
        set up logging yet)."""
        log.info("rediskit: metrics of this worker and its pool processes on "
                 "http://%s:%d/metrics (files in %s)", self.address, self.port, self.path)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.own:
            shutil.rmtree(self.path, ignore_errors=True)
