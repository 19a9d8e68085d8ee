"""Measuring unlearning: eval items, scoring, metrics (TOFU/MUSE), reports, attacks.

The protocol constants live here, free of torch, so the CLI can parse its flags without importing it.
"""

SPLITS = ("forget", "retain", "holdout", "real_authors", "world_facts", "general")  # evaluate()'s data splits
MAX_NEW_TOKENS = 200  # greedy answer length for ROUGE, as TOFU and open-unlearning
