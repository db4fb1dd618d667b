"""What the data layer reports: `DataError` for input that cannot be used, `DataWarning` for
damage that was skipped. Every data module and the command line share these, so they live apart
from any one format."""
from __future__ import annotations

from guie.errors import UserError


class DataError(UserError):
    """Bad input data: the message names the file and the record, row or field at fault."""


class DataWarning(UserWarning):
    """A damaged record or image that was skipped."""
