"""tvkd-ray: Teacher Value-based Knowledge Distillation (DPO + teacher potential shaping) on Ray.

``tvkd_ray.fit(config, train_dataset=None, eval_dataset=None)`` is the Python API (the driver's
``tvkd_ray.driver.fit``). This front door imports the driver only when called, so importing any
core module stays light and no core module depends on the driver.
"""

__version__ = "0.1.0"


def fit(config, train_dataset=None, eval_dataset=None):
    """Train a student; see :func:`tvkd_ray.driver.fit.fit`."""
    from tvkd_ray.driver.fit import fit as _fit

    return _fit(config, train_dataset, eval_dataset)
