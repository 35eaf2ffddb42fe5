"""Plots and tables: AL curves, reliability diagrams, heatmaps, spider plots."""
