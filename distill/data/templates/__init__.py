"""Package data: prompt templates per dataset (one per line, "{}" = class name)."""
