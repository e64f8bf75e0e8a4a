"""Reporting helpers (figures) for qbdl experiments."""
