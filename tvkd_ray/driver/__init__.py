"""The driver: the single controller of a run. It checks the inputs (``inputs``), plans the
teacher/reference actor pools and their cache (``pools``, ``streams``, ``cache``), launches the
Ray Train workers (``launch``) and ties it together in ``fit``. It imports the core
(``tvkd_ray``) and the roles (``actors``); neither imports it."""
