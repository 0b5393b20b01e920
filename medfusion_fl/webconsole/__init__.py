"""The coordinator's web console: an index of run folders in a database, users and roles, and a JSON API.

It shows only what the coordinator may know (each run's metrics lines, checkpoints and exports), never a
site's data. The run folders stay the source of truth; the database indexes them. Work in progress on
issue 19: the index, users, sessions and the read API are here; pages, live updates, control and model
comparison are not yet.
"""
