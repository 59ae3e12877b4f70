"""The training skeleton and loop every stage runs: the stage plan, fit, schedules, step guards, label checks,
evaluation placement, frozen helpers and FLOPs."""
