"""The server's services, one job each, wired together by the composition root
(``deskfleet.orchestrator``):

- :mod:`.runs` — runs as clients see them: admit and submit (one or a batch), cancel,
  long-poll, read (attempts, events, artifacts, counts);
- :mod:`.dispatch` — the scheduling loop, assignments and stop orders to agents, what an
  ended attempt means for the scheduler (a free machine, a learnt duration);
- :mod:`.finals` — runs that reached a final state: counted, and their long-polls woken
  here and on the other replicas;
- :mod:`.machines` — machines and pools: enrolment, agent keys and uploads, cordon and
  drain, pools;
- :mod:`.catalog` — what submit checks a run against (automations, pools, machine shapes),
  cached for a moment;
- :mod:`.keys` — the keyring the database must agree with, re-read during a rotation;
- :mod:`.webhooks` — final runs posted to their webhook URLs, signed, by the leader;
- :mod:`.replicas` — hints to the other replicas over the bus, and who handles each kind.

They do not import one another's classes: what one calls on another is a small protocol
it declares (``runs.Dispatcher``, ``dispatch.Finals``, ``machines.Changes``…), so the
graph stays a tree the root builds bottom up.
"""
