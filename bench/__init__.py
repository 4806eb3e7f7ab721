"""The benchmark suite run by ``make bench`` (``python -m bench [SECTION ...]``).

Every figure is printed as a ratio against a floor or a peer library measured in the same run,
on a private Redis server the suite starts itself (or ``REDIS_URL`` when set, which is only read
and written under a unique key prefix, never flushed). Repetitions of the contenders are
interleaved round by round and the medians compared, so noise on a small VM does not decide a
ratio. Sections are registered in :mod:`bench.sections`; one whose API is not importable yet is
reported as skipped.
"""
