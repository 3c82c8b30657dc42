"""The life of a job: request rules, intake, states, the pipeline, events, batches, listings.

Plain domain code: nothing here knows Celery; the store and the provider client are passed in.
"""
