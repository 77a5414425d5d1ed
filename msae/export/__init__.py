"""Exports of a store's results to other tools' formats (plain library code, no Dagster)."""


class ExportError(ValueError):
    """Nothing to export where asked (a partition without concepts, no partition at all), or a
    record that does not match its format."""
