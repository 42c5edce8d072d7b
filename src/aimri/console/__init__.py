"""The console: a local web app over a run directory (`mri serve`)."""
