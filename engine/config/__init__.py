"""Typed run configuration and the command line: config keys with help and ranges, recipes, fire's entry wrapper, the
run plan, optional extras, arch registries and the precision choice."""
