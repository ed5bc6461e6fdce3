"""Tests of secondorder.schedules (ABS/ABSA adaptive batch size)."""
