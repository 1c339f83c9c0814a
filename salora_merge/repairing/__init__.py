"""Repair an eroded adapter (a registry method plus the before/after measurement): ``run.run_repair``."""
