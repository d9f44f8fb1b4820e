"""The CPU tuning table: every CPU-side performance choice, measured on the machine that
runs it (identity.py keys it)."""
