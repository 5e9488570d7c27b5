"""Evaluation: Table 1's metrics and the search objectives, generation, the results table and figures."""
