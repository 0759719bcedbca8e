"""Reports: the results table, curves and the Markdown report of a run folder."""

from kdistill.report.plots import plot_curves
from kdistill.report.table import Row, build_rows, gap_closed, markdown_table
from kdistill.report.writer import write_report

__all__ = ["Row", "build_rows", "gap_closed", "markdown_table", "plot_curves", "write_report"]
