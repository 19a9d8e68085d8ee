"""Measuring unlearning: eval items, scoring, metrics (TOFU/MUSE), reports, attacks."""
