"""Helpers shared by the tests: synthetic image sets, the bundled fixtures, the hostile-input driver."""
