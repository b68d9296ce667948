"""One exception hierarchy for the whole package.

The CLI turns any ``SboraRegError`` into ``Error: <message>`` on stderr and exit status 1, so
messages are one line and say what to do next.
"""

from __future__ import annotations


class SboraRegError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(SboraRegError, ValueError):
    """An invalid SBoRA configuration (rank, variant, target modules, ...)."""


class InvalidIndicesError(SboraRegError, ValueError):
    """Duplicate, out-of-range or wrongly shaped standard-basis indices."""


class NoMatchingModulesError(SboraRegError, ValueError):
    """``target_modules`` matched no supported module of the model."""


class ShapeMismatchError(SboraRegError, ValueError):
    """An adapter, checkpoint or index file does not fit the model it is used with."""


class FingerprintMismatchError(ShapeMismatchError):
    """An adapter was made for a different base model (shape fingerprint differs)."""


class AdapterFormatError(SboraRegError, ValueError):
    """A missing, truncated, corrupt or unsupported adapter/checkpoint file."""


class PickleRefusedError(AdapterFormatError):
    """A pickle-based file (.bin, .pt, .pkl) was offered; pickle is never loaded."""


class DataError(SboraRegError, ValueError):
    """A training or evaluation data file that is missing, empty or not the expected JSONL."""


class OutputError(SboraRegError):
    """An output path that exists, is not a directory, cannot be written or has no room."""


class InternalError(SboraRegError):
    """A broken internal invariant (a bug: please report it with the command that hit it)."""


class QuantizationError(SboraRegError, ValueError):
    """An unsupported combination of quantised base and adapter operation."""


class RegistryError(SboraRegError):
    """Base class of registry errors."""


class NotFoundError(RegistryError, LookupError):
    """An unknown adapter name, version, base model or reservation."""


class InvalidNameError(RegistryError, ValueError):
    """A name with path separators, ``..`` or control characters."""


class SchemaError(RegistryError):
    """The database schema is newer than this code, or otherwise unusable."""


class CorruptBlobError(RegistryError):
    """A stored file no longer hashes to the content hash it was stored under."""


class DatabaseBusyError(RegistryError):
    """The database stayed locked by another writer past the busy timeout."""


class OverlapError(RegistryError):
    """Adapters touch the same weights where that is not allowed."""


class AllocationError(RegistryError):
    """Not enough free indices to reserve a disjoint region."""


class HubError(SboraRegError):
    """A Hugging Face Hub operation failed."""
