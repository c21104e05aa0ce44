"""Measuring a compressed model: accuracy against a reference (validate), speed in back-to-back pairs
(bench, speedup), and the images and labels both read."""
