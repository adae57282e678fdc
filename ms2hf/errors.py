"""The one exception type users see.

Every problem with the user's input, flags or environment is raised as a ``Ms2hfError`` (or a
subclass), whose message already names the file, parameter, rank or flag involved. The command
line prints that message alone and exits non-zero; anything else escaping is a bug in ms2hf.
"""

from __future__ import annotations


class Ms2hfError(Exception):
    """A problem the user can fix: bad input, disagreeing flags, an unusable output folder."""


class FormatError(Ms2hfError):
    """A file is not what its format promises (safetensors header, strategy file, index)."""


class LayoutError(Ms2hfError):
    """The strategy and the rank files do not describe one consistent set of slices."""


class CoverageError(LayoutError):
    """Some part of a parameter is held by no rank file."""


class ModelError(Ms2hfError):
    """The parameters do not form the model the rules expect (unknown keys, odd shapes, flags)."""


class OutputError(Ms2hfError):
    """The output folder cannot be written safely."""
