"""The suites of ``jobs/bench.py`` (SPEC §7), one module each, each with ``run(bench) -> (results,
table text)``; ``common`` holds the plan and the models and batches they share, ``report`` the
machine record and tables, ``fit_history`` the steady state of a ``tvkd_ray.fit`` run and ``bare``
the single-process baseline. Importing this package does no work; ``jobs/bench.py`` sets the
environment first.
"""
