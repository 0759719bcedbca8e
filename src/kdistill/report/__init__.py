"""Reports: the results table, model cost, curves and the Markdown/HTML report of a run folder."""

from kdistill.models.cost import ModelCost, model_cost
from kdistill.report.plots import plot_curves, plot_tradeoff
from kdistill.report.style import ReportStyle
from kdistill.report.table import Row, build_rows, gap_closed, markdown_table
from kdistill.report.writer import write_report

__all__ = [
    "ModelCost",
    "ReportStyle",
    "Row",
    "build_rows",
    "gap_closed",
    "markdown_table",
    "model_cost",
    "plot_curves",
    "plot_tradeoff",
    "write_report",
]
