"""The pieces of ``bench/peers.py``: one module per system compared, and what they share.

- :mod:`peers.workload` — the plan (runs, durations, arrivals, kills; seeded, the same for
  every system), the harness that drives one system through it, the measures, and what
  runs inside a peer's worker process (a simulated desktop executing ``sim.work``);
- :mod:`peers.deskfleet_side`, :mod:`peers.celery_side`, :mod:`peers.procrastinate_side` —
  how each system is set up, fed, watched and torn down. The Celery and Procrastinate
  modules are also what their worker processes load.

Worker processes import this package with ``bench/`` on ``PYTHONPATH``, so these modules
import each other as ``peers.…``, never relative to the script.
"""
