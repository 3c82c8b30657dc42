"""The Redis job store: key names, the Lua library, records (store/record.py parses one into typed fields) and their one transition, invariants.

- ``keys.py``: every key name; ``lua.py``: the Lua library (one function per atomic rule).
- ``jobstore.py``: records, their one transition, the due set, ``run_script``.
- ``record.py``: the typed :class:`~kie_extend.store.record.JobRecord`, and the timestamp format.
- ``packing.py``: a job's request body in its own key (JSON or packed).
- ``steps.py``: follow-up step entries in a record and the script that moves each one.
- ``invariants.py``: what ``kie-extend doctor`` checks.
"""
