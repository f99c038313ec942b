"""curate: budgeted, diversity-balanced data selection for LLM instruction tuning."""

__version__ = "0.1.0"
