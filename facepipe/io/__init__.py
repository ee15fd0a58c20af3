"""Readers and writers for images and the data set formats users bring."""
