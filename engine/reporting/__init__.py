"""What a run reports: device-side metrics and their writers, optional experiment trackers, pictures."""
