"""The whole method: the Optuna study (stage 1), trial processes and their results, claims, stage 2."""
