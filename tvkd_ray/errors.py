"""User-facing errors: one clear line naming what is wrong and where.

The CLI prints ``error: <message>`` for these and exits non-zero without a traceback; anything
else is a bug and keeps its traceback.
"""


class TVKDError(Exception):
    """Base class for errors caused by the user's input (config, data, models, cluster)."""


class ConfigError(TVKDError):
    """Invalid configuration: unknown key, wrong type, out-of-range value, incompatible options."""


class DataError(TVKDError):
    """Invalid preference data; the message names the source, row and field."""


class ModelError(TVKDError):
    """A model or tokenizer cannot be loaded, or teacher and student tokenizers differ."""


class ResourceError(TVKDError):
    """The Ray cluster cannot satisfy a resource request; the message names the pool."""


class CheckpointError(TVKDError):
    """A checkpoint is missing, corrupted or truncated; the message names the file."""
