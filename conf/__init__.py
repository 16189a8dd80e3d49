"""Hydra configs (a package, so that entry points find them as pkg://specdec.conf once installed)."""
