"""Capture sources: each turns packets into `imaptap.segment.Segment`s for the analyzer."""
