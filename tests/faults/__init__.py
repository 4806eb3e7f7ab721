"""The fault-injection kit: a TCP proxy, server faults, paused holders and a history checker.

``proxy`` (network faults), ``servers`` (restart, stall), ``holders`` (a lock holder in a child
process and a fenced resource), ``history`` (the grant log and its invariants), ``workload``
(the processes the chaos run drives) and ``chaos`` (the driver: ``python -m tests.faults.chaos``).
"""
