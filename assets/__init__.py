"""The embedded model (`embedded-model/`), installed as package data so that a wheel carries it."""
