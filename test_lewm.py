"""Tests for LeWM: model, SIGReg, simulators, data, training, planning and evaluation (CPU only).

Run: python -m pytest -q test_lewm.py
"""

# --- model tests

# --- sigreg tests

# --- env tests

# --- data tests

# --- plan tests

# --- train tests

# --- eval tests
