"""Slow, obvious reference implementations, written like the original psdet and its
siblings (loops over batch, marks, pairs and cells), that the tests and the benchmarks
check psdet's vectorised code against. psdet itself never imports them.

- `reference_loops`: point targets and losses (tests/test_models.py, benchmarks/train_step.py)
- `reference_augment`: the per-image colour jitter (tests/test_data.py, benchmarks/input_pipeline.py)
- `reference_postprocess`: point-map decoding, NMS and slot inference
  (tests/test_postprocess.py, benchmarks/postprocess.py)
"""
