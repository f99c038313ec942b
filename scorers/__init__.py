"""The built-in scoring methods, one file each, registered as `curate.scorers` entry points (pyproject.toml).

This package builds on the core (`curate.scoring.contract`); the core never imports it. Use
`curate.scoring.get_scorer(name, **params)` to build one.
"""
