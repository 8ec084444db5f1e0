"""The sweep: Ray Tune + Optuna around Ray Train running psdet.engine (entry point: orchestrate/tune.py)."""
