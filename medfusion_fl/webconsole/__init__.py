"""The coordinator's web console: an index of run folders in a database, users and roles, pages and a JSON API.

It shows only what the coordinator may know (each run's metrics lines, checkpoints and exports), never a
site's data. The run folders stay the source of truth; the database indexes them. Pages, live updates,
control (start, stop, pause, resume, `flwr stop`), model versions and their comparison, users and roles:
docs/design.md, "Console".
"""
