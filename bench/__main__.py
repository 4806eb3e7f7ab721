"""``python -m bench [SECTION ...] [--rounds N] [--scale X]``: run benchmark sections.

Uses ``REDIS_URL`` when set (never flushed: only keys under a unique prefix are written and
deleted), else starts a private server (``celery_rediskit.devserver.PrivateServer``). Prints,
per section, detail tables and a verdict table (ours, floor/peer, ratio, target, PASS/FAIL),
then how many targets passed. The exit code is 0 whatever the verdicts: this is a report.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
from typing import Any

import redis

from .common import (
    TARGET_HEADERS,
    BenchEnv,
    SectionResult,
    render_table,
    target_rows,
    unique_prefix,
)
from .sections import BY_NAME, SECTIONS, lookup


def _log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def _server_info(client: Any) -> str:
    data = client.info("server")
    name = "valkey" if "valkey_version" in data else "redis"
    version = data.get("valkey_version") or data.get("redis_version")
    return f"{name} {version}"


def _print_section(res: SectionResult) -> None:
    print(f"\n=== {res.name}: {res.title}")
    if res.skipped:
        print(f"skipped: {res.skipped}")
        return
    for caption, headers, rows in res.tables:
        print(f"\n{caption}\n{render_table(headers, rows)}")
    print(f"\nverdict ({res.name})\n{render_table(TARGET_HEADERS, target_rows(res.targets))}")
    for note in res.notes:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("sections", nargs="*", choices=[[], *BY_NAME], metavar="SECTION",
                        help=f"sections to run (default: all): {', '.join(BY_NAME)}")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of each contended benchmark (default 3)")
    parser.add_argument("--scale", type=float, default=float(os.environ.get("BENCH_SCALE", 1)),
                        help="multiply every measuring window (default 1, env BENCH_SCALE)")
    args = parser.parse_args(argv)
    chosen = [BY_NAME[n] for n in args.sections] if args.sections else SECTIONS

    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        url = os.environ.get("REDIS_URL")
        owns = not url
        if owns:
            from celery_rediskit.devserver import PrivateServer

            url = stack.enter_context(PrivateServer()).url
        assert url is not None
        admin = redis.Redis.from_url(url)
        stack.callback(admin.close)
        env = BenchEnv(url=url, prefix=unique_prefix(), owns_server=owns, admin=admin,
                       rounds=args.rounds, scale=args.scale)
        where = "private server" if owns else "REDIS_URL: command counts may include others"
        print(f"celery-rediskit bench: {_server_info(admin)} ({where}), "
              f"python {sys.version.split()[0]}, redis-py {redis.__version__}, "
              f"{os.cpu_count()} cpus, prefix {env.prefix}")

        results: list[SectionResult] = []
        for section in chosen:
            missing = section.missing()
            if missing:
                res = SectionResult(section.name, section.title,
                                    skipped=f"not available ({missing} is not importable)")
            else:
                _log(f"section {section.name}")
                try:
                    res = lookup(section.runner)(env, _log)  # type: ignore[operator]
                except Exception:
                    res = SectionResult(section.name, section.title,
                                        skipped="error:\n" + traceback.format_exc())
                finally:
                    with contextlib.suppress(Exception):
                        env.cleanup()
            results.append(res)
            _print_section(res)
        # The library's wake-up listeners outlive their clients and would log the server's
        # shutdown as a lost connection: nothing a reader of this report should worry about.
        logging.getLogger("celery_rediskit._redis.wakeup").setLevel(logging.ERROR)

    targets = [t for r in results for t in r.targets if t.passed is not None]
    passed = sum(bool(t.passed) for t in targets)
    ran = [r.name for r in results if not r.skipped]
    skipped = [r.name for r in results if r.skipped]
    print(f"\nSUMMARY: {passed}/{len(targets)} targets passed"
          + (f", FAILED: {', '.join(t.what for t in targets if not t.passed)}"
             if passed < len(targets) else "")
          + f"; sections run: {', '.join(ran) or 'none'}"
          + (f"; skipped: {', '.join(skipped)}" if skipped else "")
          + f"; {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
