"""Sample radiographs and their reference probabilities for `pneumoflag selftest` (package data)."""
