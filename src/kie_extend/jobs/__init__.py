"""The life of a job: request rules, intake, states, the pipeline, events, batches, listings.

Domain code: nothing here knows Celery or HTTP; the store, the Redis client and the provider client
come in through the process's Runtime. Two rules that must hold across every worker at once keep
their Lua script beside them: idempotency claims (idempotency.py) and progress marks (progress.py).
"""
