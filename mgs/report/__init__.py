"""`mgs report`: tables, figures and pages for evaluated runs (see `mgs.report.build`)."""

from mgs.report.build import make_report

__all__ = ["make_report"]
