"""The driver: the single controller of a run. It checks the inputs (``inputs``), plans the
teacher/reference actor pools and their caches (``pools``, ``streams``, ``cache``), launches the
Ray Train workers (``launch``) and ties it together in ``fit`` (``tvkd_ray.fit``). It imports the
core (``tvkd_ray``) and the roles (``actors``); neither imports it, but for the core's package
face, which hands ``fit`` on."""
