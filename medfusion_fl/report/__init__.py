"""The evaluation report of a model: numbers (evaluation.json), figures (PNG) and one self-contained
report.html, written at the end of a run, by `medfusion-fl export` and by `medfusion-fl evaluate`.

Kept free of imports here: config.py reads report.config, and the figures need matplotlib only when a
report is written.
"""
