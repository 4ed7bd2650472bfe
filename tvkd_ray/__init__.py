"""tvkd-ray: Teacher Value-based Knowledge Distillation (DPO + teacher potential shaping) on Ray.

``tvkd_ray.fit(config, train_dataset=None, eval_dataset=None)`` is the Python API. This package
face only hands on the driver's ``fit`` (``driver/fit.py``, which loads Ray, the models and the
rest of the driver when called), so importing any core module stays light.
"""

from driver.fit import FitResult, fit  # noqa: F401  (the public API)
