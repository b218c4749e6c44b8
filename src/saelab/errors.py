"""One exception family, so the CLI can print a clear message and exit non-zero instead of a traceback.

Every message names the problem and the fix.
"""


class SaelabError(Exception):
    """Base for errors caused by user input or on-disk state (not by bugs)."""


class ConfigError(SaelabError):
    """A config field is unknown, mistyped or inconsistent."""


class HookpointError(SaelabError):
    """A hookpoint name does not resolve on this model."""


class ModelNotFoundError(SaelabError):
    """A model name/path cannot be loaded (e.g. offline without a local copy)."""


class StoreError(SaelabError):
    """An activation store is missing, incomplete, corrupted or incompatible."""


class DataError(SaelabError):
    """Input data (corpus, activations) is unusable: empty, non-finite, wrong shape."""


class CheckpointError(SaelabError):
    """A checkpoint or saved SAE is missing, corrupted or incompatible."""


class DistributedError(SaelabError):
    """A data-parallel job cannot go on: a rank died, hung, or could not join the process group."""
