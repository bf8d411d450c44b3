"""Training configurations for `run_train.py` (`--config configs/<name>.py`); each variant edits `default.py`."""
