"""The ground floor: errors, input checks, profiles, devices and seeds, safe saving, models, data, checkpoints.

Imports nothing from the other subpackages; every one of them builds on this."""
