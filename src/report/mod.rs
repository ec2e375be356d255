//! Reporting: metrics logs (JSON lines, CSV), tables, plots.
