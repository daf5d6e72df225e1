"""Reading runs: contribution and accuracy curves, feature geometry, HDF5 export and the
linear probe. Plots use matplotlib's Agg canvas (no display)."""
