"""Dependency rules, one module per primitive family. Importing ``families`` registers them all."""
