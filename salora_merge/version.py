"""The version, in one place (read by the package, the reports and the provenance files)."""

__version__ = "0.1.0"
