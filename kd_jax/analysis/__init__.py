"""Analyses of trained workdirs: layer-by-layer CKA, DisWOT scores of untrained students,
calibration (reliability bins, ECE)."""
