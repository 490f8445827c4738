"""The library's error classes.

Every error steer_experts raises on purpose derives from :class:`SteerExpertsError`,
so a caller (and the CLI) can tell "the input or a file is wrong" from a bug.
Each class also keeps the builtin base it had before (``ValueError``,
``LookupError``...), so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class SteerExpertsError(Exception):
    """Base class of every error raised on purpose by steer_experts; the message says what to do."""


class InvalidArgumentError(SteerExpertsError, ValueError):
    """An argument or command-line option is out of range or of the wrong kind."""


class OutputFolderError(SteerExpertsError, FileExistsError):
    """An output folder cannot be written: it holds files we did not write, or it is a file or read-only."""


class CorruptFileError(SteerExpertsError, ValueError):
    """A saved file (expert set, steered model, cache) is truncated, altered or inconsistent."""


class UnknownConceptError(SteerExpertsError, KeyError):
    """A concept name that the data or expert set does not hold (or that matches several)."""

    def __str__(self) -> str:  # KeyError would print the message quoted, as a repr
        return str(self.args[0]) if self.args else ""


class UnitNotFoundError(SteerExpertsError, IndexError):
    """A (layer, neuron) that is not a unit of the expert set."""
