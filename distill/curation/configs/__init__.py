"""Data files (JSON configs); a package so that they ship in wheels."""
