"""The operator contract of METHOD.md: input checks and the canonical layout backends receive."""

from cossim_fast.contract.inputs import Rows, rows_of, set_value_checks, value_checks_enabled

__all__ = ["Rows", "rows_of", "set_value_checks", "value_checks_enabled"]
